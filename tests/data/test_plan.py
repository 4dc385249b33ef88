"""What a sync decides to move: carried files, parts, deletions, classes, schemas."""

from __future__ import annotations

import pytest

from hybridray.exceptions import DataError
from hybridray.storage.fs import DatasetAddress
from hybridray.storage.manifest import Manifest, Part, SchemaInfo, SourceFile
from hybridray.storage.objects import LocalStore
from hybridray.storage.plan import (
    FileInfo,
    Source,
    carry,
    carry_probed,
    check_schemas,
    discover,
    plan_parts,
    resolve_class,
    transform_fp,
)
from hybridray.topology.models import DataClass

T = transform_fp(None, None, "zstd")
ADDR = DatasetAddress("onprem", "datasets/x")


def manifest(files: dict[str, tuple[str, int, int]], transform: str = T) -> Manifest:
    """A committed version with one part per file: {file: (sha, size, mtime)}."""
    parts = [Part(path=f"_parts/{sha}.parquet", sha256=sha, bytes=10, rows=5,
                  source=SourceFile(file=f, sha256=sha, size=size, mtime_ns=mtime,
                                    schema_fp="s1"))
             for f, (sha, size, mtime) in files.items()]
    return Manifest(dataset_id="d", version=1, committed_at="now", data_class="internal",
                    source={"address": str(ADDR)}, transform=transform,
                    schema=SchemaInfo(fingerprint="s1", fields=[], arrow=""),
                    rows=5 * len(parts), bytes=10 * len(parts), parts=parts)


def source(files: dict[str, tuple[int, int]]) -> Source:
    return Source(ADDR, LocalStore("/nonexistent"), {f: FileInfo(f, s, m) for f, (s, m) in
                                                      files.items()})


def test_unchanged_stat_is_carried_changed_and_new_are_probed_deleted_dropped():
    prev = manifest({"a": ("sa", 100, 1), "b": ("sb", 100, 1), "gone": ("sg", 1, 1)})
    stored = {p.path: 10 for p in prev.parts}
    src = source({"a": (100, 1), "b": (100, 2), "new": (5, 5)})
    plan = carry(src, prev, T, stored, checksum=False)
    assert list(plan.carried) == ["a"] and plan.to_probe == ["b", "new"]
    assert plan.deleted == ["gone"]
    assert src.files["a"].sha256 == "sa" and src.files["a"].rows == 5


def test_checksum_probes_everything_and_missing_parts_are_not_carried():
    prev = manifest({"a": ("sa", 100, 1), "b": ("sb", 100, 1)})
    src = source({"a": (100, 1), "b": (100, 1)})
    assert carry(src, prev, T, {p.path: 10 for p in prev.parts}, checksum=True).to_probe == \
        ["a", "b"]
    damaged = {"_parts/sa.parquet": 10, "_parts/sb.parquet": 9}  # b's part has the wrong size
    assert carry(src, prev, T, damaged, checksum=False).to_probe == ["b"]


def test_a_new_transform_moves_everything():
    prev = manifest({"a": ("sa", 100, 1)})
    other = transform_fp("maskfp", None, "zstd")
    plan = carry(source({"a": (100, 1)}), prev, other, {"_parts/sa.parquet": 10},
                 checksum=False)
    assert plan.to_probe == ["a"] and not plan.carried


def test_touched_but_identical_file_is_carried_after_probing():
    prev = manifest({"a": ("sa", 100, 1), "b": ("sb", 100, 1)})
    stored = {p.path: 10 for p in prev.parts}
    src = source({"a": (100, 7), "b": (100, 7)})
    plan = carry(src, prev, T, stored, checksum=False)
    src.files["a"].sha256, src.files["b"].sha256 = "sa", "changed"
    changed = carry_probed(plan, src, prev, T, stored)
    assert changed == ["b"] and list(plan.carried) == ["a"]
    assert plan.carried["a"][0].source.mtime_ns == 7  # the next sync skips it by stat again


def test_parts_copy_small_files_whole_and_cut_others_by_row_groups():
    info = FileInfo("f", 1000, 0, "sha", 30, [(10, 40), (10, 40), (10, 40)], "s1")
    [whole] = plan_parts(info, T, copy_ok=True)
    assert (whole.mode, whole.row_groups, whole.rows) == ("copy", None, 30)
    cut = plan_parts(info, T, copy_ok=False, part_bytes=80)
    assert [(p.row_groups, p.rows) for p in cut] == [((0, 2), 20), ((2, 3), 10)]
    assert len({p.path for p in cut}) == 2
    again = plan_parts(info, T, copy_ok=False, part_bytes=80)
    assert [p.path for p in again] == [p.path for p in cut]  # same input, same names
    other = FileInfo("f", 1000, 0, "sha2", 30, [(10, 40)] * 3, "s1")
    assert plan_parts(other, T, copy_ok=False, part_bytes=80)[0].path != cut[0].path
    empty = plan_parts(FileInfo("e", 10, 0, "e", 0, [], "s1"), T, copy_ok=False)
    assert [(p.row_groups, p.rows) for p in empty] == [((0, 0), 0)]


def test_class_comes_from_manifest_or_declaration_else_restricted():
    assert resolve_class(source({"a": (1, 1)}), None) == (DataClass.restricted, "default")
    assert resolve_class(source({"a": (1, 1)}), "internal") == (DataClass.internal, "declared")
    src = source({"a": (1, 1)})
    src.manifest = manifest({"a": ("sa", 1, 1)})
    assert resolve_class(src, None) == (DataClass.internal, "manifest")
    assert resolve_class(src, "confidential")[0] is DataClass.confidential
    with pytest.raises(DataError, match="would lower it without masking"):
        resolve_class(src, "public")


def test_mismatched_schemas_name_the_files():
    src = source({f"f{i}": (1, 1) for i in range(5)})
    for i, info in enumerate(src.files.values()):
        info.schema_fp = "odd" if i == 3 else "common"
    with pytest.raises(DataError, match=r"f0, f1, f2 and 1 more \(4 files\); versus f3 "
                                        r"\(1 file\)"):
        check_schemas(src)


def test_discover_skips_hidden_files_and_names_missing_or_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(LocalStore(str(tmp_path / "ds")), ADDR, "file:///x")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "_SUCCESS").write_text("")
    with pytest.raises(DataError, match="holds no data files"):
        discover(LocalStore(str(tmp_path / "ds")), ADDR, "file:///x")
    (tmp_path / "ds" / "sub").mkdir()
    (tmp_path / "ds" / "sub" / "a.parquet").write_bytes(b"x")
    (tmp_path / "ds" / ".a.crc").write_bytes(b"x")
    found = discover(LocalStore(str(tmp_path / "ds")), ADDR, "file:///x")
    assert list(found.files) == ["sub/a.parquet"] and found.manifest is None
