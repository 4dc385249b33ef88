"""The checkpoint contract: what a hybridray checkpoint directory holds, and reading it safely.

A checkpoint is a directory (written by rank 0, uploaded by Ray Train to the site's storage)::

    model.safetensors    weights: the model's state_dict, each shared tensor once (GPT's
                         tied output layer is stored as transformer.wte.weight)
    model_config.json    GPTConfig fields, or {"kind": "custom", "factory", "kwargs",
                         "block_size", "vocab_size"} for your own model (train/kinds.py)
    optimizer.pt         {"optimizer": AdamW state, "scaler": GradScaler state or None,
                          "wan": DiLoCo outer state or None}
    state.json           {"step", "data": {"cursor", ...}, "rng", "precision", ...}
    hybridray.json       {"format": 1, "data_class", "site", "tokenizer": "bytes", ...}

Whoever loads one (training to resume, serving to answer) gets a ``TrainError`` that names
the file when anything is missing, corrupt or does not match, never a bare ``KeyError``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridray.exceptions import TrainError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
META_FILE = "hybridray.json"
FORMAT = 1


class CheckpointReader:
    """Files of one checkpoint directory, wherever it lives (local, a URI, a filesystem)."""

    def __init__(self, location: Any, filesystem: Any = None):
        import pyarrow.fs as pafs

        if hasattr(location, "filesystem") and hasattr(location, "path") and filesystem is None:
            filesystem, location = location.filesystem, location.path   # ray.train.Checkpoint
        location = os.fspath(location)
        if filesystem is None:
            if "://" in location:
                try:
                    filesystem, location = pafs.FileSystem.from_uri(location)
                except Exception as e:
                    raise TrainError(f"{location}: cannot open checkpoint location ({e})") \
                        from None
            else:
                filesystem, location = pafs.LocalFileSystem(), str(Path(location).absolute())
        self.fs = filesystem
        self.path = location.rstrip("/")
        self.label = self.path

    def where(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.where(name)) as f:
                return f.read()
        except FileNotFoundError:
            raise TrainError(f"{self.where(name)}: missing; a hybridray checkpoint holds "
                             f"{', '.join(ALL_FILES)}") from None
        except OSError as e:
            raise TrainError(f"{self.where(name)}: cannot read ({e})") from None

    def json(self, name: str) -> dict[str, Any]:
        raw = self.read(name)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrainError(f"{self.where(name)}: corrupt JSON ({e})") from None
        if not isinstance(data, dict):
            raise TrainError(f"{self.where(name)}: expected a JSON object")
        return data

    def check_complete(self) -> None:
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self.path)
        except OSError as e:
            raise TrainError(f"{self.path}: cannot open checkpoint directory ({e})") from None
        if info.type == pafs.FileType.NotFound:
            raise TrainError(f"{self.path}: no such checkpoint directory")
        if info.type != pafs.FileType.Directory:
            raise TrainError(f"{self.path}: not a directory; a checkpoint is a directory "
                             f"holding {', '.join(ALL_FILES)}")
        infos = self.fs.get_file_info([self.where(n) for n in ALL_FILES])
        missing = [n for n, i in zip(ALL_FILES, infos, strict=True)
                   if i.type == pafs.FileType.NotFound]
        if missing:
            raise TrainError(f"{self.path}: not a complete hybridray checkpoint; missing "
                             f"{', '.join(missing)}")


ALL_FILES = (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE, META_FILE)
# Training writes checkpoint-00000040 (loop.py); Ray Train's own default is checkpoint_000001.
CHECKPOINT_PREFIXES = ("checkpoint-", "checkpoint_")


def complete_checkpoints(fs: Any, run_dir: str) -> Iterator[CheckpointReader]:
    """The complete checkpoints of a run directory, newest first (by name: the step number
    is zero-padded). A checkpoint whose upload was cut short is skipped."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(CHECKPOINT_PREFIXES)), reverse=True)
    for path in dirs:
        reader = CheckpointReader(path, fs)
        try:
            reader.check_complete()
        except TrainError:
            continue
        yield reader


# ---- writing ------------------------------------------------------------------------------

def save_checkpoint(directory: str | os.PathLike, model: Any, *, optimizer: dict[str, Any],
                    state: dict[str, Any], meta: dict[str, Any],
                    model_config: dict[str, Any] | None = None,
                    signing_key: bytes | None = None) -> Path:
    """Write the five files of the contract into the local ``directory`` (created).
    ``model_config`` defaults to a GPT's own ``config``; your own model needs it given.
    ``signing_key`` (the cluster's) signs ``hybridray.json`` so an edit is refused."""
    import torch
    from safetensors.torch import save_file

    from hybridray.train.kinds import unique_state

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in unique_state(model).items()}
    save_file(tensors, str(out / MODEL_FILE), metadata={"format": "pt", "hybridray": str(FORMAT)})
    if model_config is None:
        if not hasattr(getattr(model, "config", None), "model_dump"):
            raise TypeError("save_checkpoint: pass model_config for a model that is not a GPT")
        model_config = model.config.model_dump()
    (out / CONFIG_FILE).write_text(json.dumps(model_config, indent=2, default=str))
    torch.save(optimizer, out / OPTIMIZER_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    meta = {"format": FORMAT, **meta}
    if signing_key is not None:
        meta = sign_meta(meta, signing_key)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


def sign_meta(meta: dict[str, Any], key: bytes) -> dict[str, Any]:
    """``meta`` with ``signature``: HMAC-SHA256 of every other key (canonical JSON)."""
    from hybridray.storage.manifest import sign

    body = {k: v for k, v in meta.items() if k != "signature"}
    return {**body, "signature": sign(key, json.loads(json.dumps(body, default=str)))}


def verify_meta(meta: dict[str, Any], key: bytes, where: str,
                default_class: str = "restricted") -> dict[str, Any]:
    """Check ``hybridray.json`` against the cluster's key.

    Signed and matching: returned as is. Signed and not matching (a hand edit, or another
    cluster's key): ``TrainError``. Unsigned (written outside a hybridray training run): its
    class is raised to ``default_class`` (the cluster's default), so removing a signature
    can never lower a class.
    """
    import hmac

    from hybridray.storage.manifest import sign
    from hybridray.topology.models import DataClass

    if "signature" not in meta:
        cls = max(DataClass(meta.get("data_class", default_class)), DataClass(default_class))
        return {**meta, "data_class": cls.value, "signed": False}
    body = {k: v for k, v in meta.items() if k != "signature"}
    if not hmac.compare_digest(str(meta["signature"]), sign(key, body)):
        raise TrainError(f"{where}: signature does not match its content (edited after the "
                         "run wrote it, e.g. data_class) or was signed by another cluster's "
                         "key; refusing this checkpoint. Use the checkpoint as training wrote "
                         "it, or train again")
    return {**meta, "signed": True}


# ---- reading ------------------------------------------------------------------------------

def read_meta(reader: CheckpointReader, signing_key: bytes | None = None,
              default_class: str = "restricted") -> dict[str, Any]:
    """``hybridray.json``, checked for the keys every reader relies on, and against the
    cluster's ``signing_key`` when one is given (``verify_meta``)."""
    meta = reader.json(META_FILE)
    if signing_key is not None:
        meta = verify_meta(meta, signing_key, reader.where(META_FILE), default_class)
    missing = [k for k in ("data_class", "site", "tokenizer") if k not in meta]
    if missing:
        raise TrainError(f"{reader.where(META_FILE)}: missing {', '.join(missing)}")
    if meta["tokenizer"] != "bytes":
        raise TrainError(f"{reader.where(META_FILE)}: tokenizer {meta['tokenizer']!r} is not "
                         "supported; hybridray models are byte-level (\"bytes\")")
    if meta.get("format", FORMAT) > FORMAT:
        raise TrainError(f"{reader.where(META_FILE)}: checkpoint format {meta['format']} is "
                         f"newer than this hybridray reads ({FORMAT}); upgrade hybridray")
    return meta


def read_config(reader: CheckpointReader):
    """``GPTConfig``, or ``CustomModelConfig`` for a checkpoint of your own model."""
    from pydantic import ValidationError

    from hybridray.train.kinds import CustomModelConfig
    from hybridray.train.model import GPTConfig

    raw = reader.json(CONFIG_FILE)
    custom = raw.get("kind") == "custom"
    try:
        return (CustomModelConfig if custom else GPTConfig).model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}"
                             for x in e.errors(include_url=False))
        what = "custom model config" if custom else "GPT config"
        raise TrainError(f"{reader.where(CONFIG_FILE)}: not a valid {what} ({problems})") \
            from None


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
MAX_HEADER_BYTES = 100 << 20


def check_same_shape(have: Any, want: Any, reader: CheckpointReader) -> None:
    """Raise unless checkpoint config ``have`` has the shape this run asks for (``want``)."""
    diff = [f"{f}={getattr(have, f)} (this run: {getattr(want, f)})" for f in SHAPE_FIELDS
            if getattr(have, f) != getattr(want, f)]
    if diff:
        raise TrainError(f"{reader.where(CONFIG_FILE)}: the checkpoint's model differs from "
                         f"this run's: {', '.join(diff)}; set model.* to match, or start a new "
                         "run (train.resume=never, or another name)")


def read_header(reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header, without reading the weights."""
    import struct

    where = reader.where(MODEL_FILE)
    try:
        with reader.fs.open_input_file(where) as f:
            size = f.size()
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise TrainError(f"{where}: corrupt or not a safetensors file (bad header "
                                 "length)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise TrainError(f"{where}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{where}: corrupt or not a safetensors file ({e})") from None
    try:
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, ValueError, AttributeError, IndexError):
        raise TrainError(f"{where}: corrupt safetensors header") from None
    if 8 + n + end != size:
        raise TrainError(f"{where}: truncated or corrupt (header describes {8 + n + end} "
                         f"bytes, the file has {size})")
    return shapes


def check_fits(reader: CheckpointReader, have: Any, kind: Any) -> None:
    """Raise unless a checkpoint (config ``have``) can load into this run's model ``kind``:
    the same kind of model and, for your own model, the same tensor names and shapes."""
    from hybridray.train.kinds import CustomKind, CustomModelConfig

    custom = isinstance(have, CustomModelConfig)
    if custom != isinstance(kind, CustomKind):
        held = f"a custom model ({have.factory})" if custom else "a hybridray GPT"
        raise TrainError(f"{reader.where(CONFIG_FILE)}: the checkpoint holds {held}, this run "
                         f"trains {kind.label}; set model.factory to match, or start a new "
                         "run (train.resume=never, or another name)")
    if not custom:
        check_same_shape(have, kind.config, reader)
        return
    _compare_shapes(reader, kind.expected_shapes(), read_header(reader),
                    f"the model {kind.config.factory} builds")


def _check_shapes(reader: CheckpointReader, config: Any, shapes: dict[str, tuple]) -> None:
    """The weights match the config (for your own model this needs its factory: see
    ``check_fits``; here only the file's own integrity was checked)."""
    import torch

    from hybridray.train.kinds import CustomModelConfig, unique_state
    from hybridray.train.model import GPT

    if isinstance(config, CustomModelConfig):
        return
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in unique_state(GPT(config)).items()}
    _compare_shapes(reader, expected, shapes, CONFIG_FILE)


def _compare_shapes(reader: CheckpointReader, expected: dict[str, tuple],
                    shapes: dict[str, tuple], against: str) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} is {v}, expected {expected[k]}"
             for k, v in shapes.items() if k in expected and v != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}"
                         + (" ..." if len(unexpected) > 5 else ""))
        parts.extend(wrong[:5])
        raise TrainError(f"{reader.where(MODEL_FILE)}: does not match {against} ("
                         + "; ".join(parts) + ")")


def read_weights(reader: CheckpointReader, config: Any) -> dict[str, Any]:
    """The tensors of ``model.safetensors``, checked against the shapes ``config`` implies."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(reader.read(MODEL_FILE))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TrainError(f"{reader.where(MODEL_FILE)}: corrupt or not a safetensors file "
                         f"({e})") from None
    _check_shapes(reader, config, {k: tuple(v.shape) for k, v in tensors.items()})
    return tensors


def inspect_checkpoint(location: Any, filesystem: Any = None, *,
                       signing_key: bytes | None = None, default_class: str = "restricted"
                       ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(meta, GPTConfig, state)`` of a checkpoint, checked without loading its weights:
    all files present, JSON valid, the safetensors header complete and matching the config.
    Cheap enough for a driver to vet a checkpoint before any worker starts."""
    reader = location if isinstance(location, CheckpointReader) else CheckpointReader(
        location, filesystem)
    reader.check_complete()
    meta = read_meta(reader, signing_key, default_class)
    config = read_config(reader)
    _check_shapes(reader, config, read_header(reader))
    return meta, config, read_state(reader)


def read_state(reader: CheckpointReader) -> dict[str, Any]:
    state = reader.json(STATE_FILE)
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise TrainError(f"{reader.where(STATE_FILE)}: 'step' must be a whole number >= 0")
    return state


def read_optimizer(reader: CheckpointReader) -> dict[str, Any]:
    import pickle

    import torch

    try:
        data = torch.load(io.BytesIO(reader.read(OPTIMIZER_FILE)), map_location="cpu",
                          weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise TrainError(f"{reader.where(OPTIMIZER_FILE)}: corrupt ({str(e).splitlines()[0]})") \
            from None
    if not isinstance(data, dict) or "optimizer" not in data:
        raise TrainError(f"{reader.where(OPTIMIZER_FILE)}: expected a dict with 'optimizer'")
    return data


def load_model(location: Any, filesystem: Any = None, *, device: Any = "cpu",
               dtype: Any = None, factory: Any = None):
    """``(model, meta)`` from a checkpoint; see ``hybridray.train.model.load_model``."""
    from hybridray.train.kinds import CustomKind, kind_of

    reader = CheckpointReader(location, filesystem)
    reader.check_complete()
    meta = read_meta(reader)
    config = read_config(reader)
    kind = kind_of(config, factory)
    if isinstance(kind, CustomKind):
        _compare_shapes(reader, kind.expected_shapes(), read_header(reader),
                        f"the model {config.factory} builds")
    tensors = read_weights(reader, config)
    state = read_state(reader)
    model = kind.build()
    model.load_state_dict(tensors, strict=False)   # shared tensors are stored once
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, {**meta, "step": state["step"], "precision": state.get("precision"),
                   "model_config": config.model_dump(), "path": reader.label}
