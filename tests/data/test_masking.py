"""Masking rules, the class they lower to, and the scan that refuses what they miss."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hybridray.exceptions import ConfigError, MaskingError
from hybridray.storage.masking import PATTERNS, apply, check_against_schema, load_spec, scan
from hybridray.topology.models import DataClass
from tests.data.conftest import EMAIL_RE, PHONE_RE, tickets
from tests.paths import ROOT

SALT = b"s" * 32
SPEC = {"output_class": "confidential",
        "columns": {"customer_email": "hash", "customer_phone": "drop",
                    "body": {"rule": "redact"}, "created_at": {"rule": "generalize", "to": "month"},
                    "amount": {"rule": "generalize", "bucket": 100}}}


def test_rules_mask_every_column_they_name():
    table = tickets(50)
    spec = load_spec(SPEC)
    out = apply(table, spec, SALT)
    assert out.column_names == ["id", "customer_email", "body", "created_at", "amount"]
    assert out.num_rows == table.num_rows
    body = out.column("body").to_pylist()
    assert all("[PHONE]" in b and "[EMAIL]" in b for b in body)
    assert not pc.any(pc.match_substring_regex(out.column("body"), EMAIL_RE)).as_py()
    assert not pc.any(pc.match_substring_regex(out.column("body"), PHONE_RE)).as_py()
    emails = set(table.column("customer_email").to_pylist())
    hashed = out.column("customer_email").to_pylist()
    assert not emails & set(hashed) and all(len(h) == 32 for h in hashed)
    assert {d.day for d in out.column("created_at").to_pylist()} == {1}
    assert all(a % 100 == 0 for a in out.column("amount").to_pylist())
    scan(table, out, spec, "tickets.parquet")  # nothing raw survived: no error


def test_hash_is_keyed_and_stable():
    table = pa.table({"e": ["a@b.co", "a@b.co", None, "c@d.co"]})
    spec = load_spec({"columns": {"e": "hash"}})
    one = apply(table, spec, SALT).column("e").to_pylist()
    assert one[0] == one[1] and one[2] is None and one[0] != one[3]
    assert apply(table, spec, SALT).column("e").to_pylist() == one
    assert apply(table, spec, b"t" * 32).column("e").to_pylist()[0] != one[0]


def test_patterns_leave_dates_ids_and_digests_alone():
    text = pa.array(["2024-01-15", "order 1234567890", "a3f9123456789012bc", "v1.2.3"])
    for pattern in PATTERNS.values():
        assert not pc.any(pc.match_substring_regex(text, pattern)).as_py()
    phones = pa.array(["+1 555 123 4567", "(020) 7946 0958", "555-123-4567", "+44 20 7946 0958"])
    assert pc.all(pc.match_substring_regex(phones, PATTERNS["phone"])).as_py()


def test_scan_refuses_an_unmasked_text_column_naming_file_and_column():
    table = tickets(10)
    spec = load_spec({"output_class": "internal", "columns": {"customer_email": "hash",
                                                              "customer_phone": "drop"}})
    with pytest.raises(MaskingError, match=r"part-7.parquet: column 'body' holds what looks "
                                           r"like an email address"):
        scan(table, apply(table, spec, SALT), spec, "part-7.parquet")


def test_scan_looks_inside_nested_columns_and_keep_opts_out():
    table = pa.table({"meta": pa.array([{"note": "call 555-123-4567"}])})
    spec = load_spec({"columns": {}})
    with pytest.raises(MaskingError, match="phone number"):
        scan(table, apply(table, spec, SALT), spec, "f")
    keep = load_spec({"columns": {"meta": "keep"}})
    scan(table, apply(table, keep, SALT), keep, "f")


def test_output_class_never_rises_above_the_source():
    spec = load_spec({"output_class": "confidential"})
    assert spec.output_class_for(DataClass.restricted) is DataClass.confidential
    assert spec.output_class_for(DataClass.internal) is DataClass.internal
    assert load_spec({}).output_class_for(DataClass.restricted) is DataClass.restricted


def test_fingerprint_changes_with_rules_and_salt():
    a, b = load_spec(SPEC), load_spec({**SPEC, "output_class": "internal"})
    assert a.fingerprint("s1") != b.fingerprint("s1")
    assert a.fingerprint("s1") != a.fingerprint("s2")
    assert a.fingerprint("s1") == load_spec(SPEC).fingerprint("s1")


@pytest.mark.parametrize("spec, message", [
    ({"columns": {"x": "scramble"}}, "columns.x.rule"),
    ({"columns": {"x": {"rule": "generalize"}}}, "exactly one of `to`"),
    ({"columns": {"x": {"rule": "hash", "bucket": 5}}}, "only apply to generalize"),
    ({"columns": {"x": {"rule": "redact", "patterns": ["(unclosed"]}}}, "not a valid RE2"),
    ({"output_class": "secret"}, "output_class"),
    ({"colums": {}}, "colums"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(spec)


def test_rules_checked_against_the_source_schema():
    schema = tickets(1).schema
    with pytest.raises(ConfigError, match=r"columns.emial: no such column in src"):
        check_against_schema(load_spec({"columns": {"emial": "hash"}}), schema, "src")
    with pytest.raises(ConfigError, match=r"columns.id: redact needs a string column"):
        check_against_schema(load_spec({"columns": {"id": "redact"}}), schema, "src")
    out = check_against_schema(load_spec(SPEC), schema, "src")
    assert "customer_phone" not in out.names and out.field("customer_email").type == pa.string()


def test_shipped_mask_config_loads_and_fits_the_ticket_schema(tmp_path):
    spec = load_spec(ROOT / "configs" / "masks" / "tickets.yaml")
    assert spec.output_class is DataClass.confidential
    check_against_schema(spec, tickets(1).schema, "tickets")
    bad = tmp_path / "bad.yaml"
    bad.write_text("columns:\n  a: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_spec(bad)
