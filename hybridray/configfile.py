"""Config files, read the same way everywhere: safe YAML, ``key.sub=value`` overrides, every
problem at once.

Cluster files, train configs and serve files come from users and sometimes from strangers,
so the reader refuses what a plain ``yaml.safe_load`` would let through: duplicate keys (YAML
silently keeps the last), alias bombs (a few KB that expand to billions of nodes), multi-document
files, non-mapping documents and huge files. Overrides are applied before validation so that an
override is checked exactly like the file, and pydantic's errors become one line per problem,
``file: key.path: message``, with the allowed keys named when a key is unknown.
"""

from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from hybridray.exceptions import ConfigError

MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 100_000
_STR_TAG = "tag:yaml.org,2002:str"
M = TypeVar("M", bound=BaseModel)


def read_config_text(path: str | os.PathLike, *, kind: str, example: str) -> str:
    """The text of a ``kind`` file ("cluster file"), or a ``ConfigError`` naming why not
    and ``example``, a path that would do."""
    label = str(path)
    p = Path(path)
    if not p.exists():
        from hybridray.shipped import shipped_path

        # `hybridray up clusters/local.yaml` outside a checkout: the copy shipped in the package
        p = shipped_path(path) or p
    if not p.exists():
        raise ConfigError(f"{label}: no such file; pass a path like {example}")
    if p.is_dir():
        raise ConfigError(f"{label}: is a directory; pass a {kind} inside it, like {example}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{label}: file is {size} bytes; {kind}s are limited to "
                          f"{MAX_FILE_BYTES} bytes")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{label}: cannot read the file as UTF-8 text ({e})") from None


def validate_config(model: type[M], data: dict[str, Any], *, label: str,
                    overrides: list[str] | tuple[str, ...] = (), **format_options: Any) -> M:
    """Apply ``overrides`` to a copy of ``data`` and validate it into ``model``.

    Raises:
        ConfigError: every problem, as ``file: key.path: message``.
    """
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        try:
            apply_override(data, item)
        except ValueError as e:
            problems.append(f"{label}: override {item!r}: {e}")
    if problems:
        raise ConfigError(problems)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label, model, **format_options)) from None


def safe_yaml(text: str, label: str, *, kind: str = "cluster file",
              needs: str = "name, head and sites", allow_empty: bool = False) -> dict[str, Any]:
    """Parse one YAML document into a dict, refusing the hostile and the ambiguous.

    ``kind`` and ``needs`` word the messages for an empty or non-mapping document; with
    ``allow_empty`` an empty (or comment-only) file is ``{}``.
    """
    try:
        docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start and mark and start.line != mark.line:
            what += f" ({context} that starts at line {start.line + 1})"
        raise ConfigError(f"{label}: invalid YAML{where}: {what}") from None
    docs = [d for d in docs if d is not None]
    if not docs:
        if allow_empty:
            return {}
        raise ConfigError(f"{label}: the file is empty; a {kind} needs {needs}")
    if len(docs) > 1:
        raise ConfigError(f"{label}: holds {len(docs)} YAML documents; put one {kind.split()[0]} "
                          "per file")
    root = docs[0]
    if not isinstance(root, yaml.MappingNode):
        what = {"ScalarNode": "a single value", "SequenceNode": "a list"}.get(
            type(root).__name__, type(root).__name__)
        raise ConfigError(f"{label}: the document is {what}; it must be a mapping with keys "
                          f"{needs}")
    _check_nodes(root, label)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(root)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return data


def _check_nodes(root: yaml.Node, label: str) -> None:
    """Refuse duplicate keys, non-string keys and alias expansion beyond a sane size."""
    sizes: dict[int, int] = {}

    def expanded(node: yaml.Node, path: str, depth: int) -> int:
        if depth > 64:
            raise ConfigError(f"{label}: {path or '<root>'}: nested more than 64 levels deep")
        key = id(node)
        if key in sizes:  # an alias: the same node object again
            if sizes[key] < 0:
                raise ConfigError(f"{label}: {path or '<root>'}: a YAML alias refers to the value "
                                  "that contains it (a recursive alias); write the value out")
            return sizes[key]
        sizes[key] = -1  # in progress: meeting it again below means a recursive alias
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                if not isinstance(k, yaml.ScalarNode):
                    raise ConfigError(f"{label}: {path or '<root>'}: keys must be plain strings, "
                                      f"not a list or mapping (line {line})")
                if k.value == "<<":
                    raise ConfigError(f"{label}: {path or '<root>'}: YAML merge keys (<<) are "
                                      "not supported; write the keys out")
                if k.tag != _STR_TAG:  # 1, 1.5, yes, ~ as keys load as int, float, bool, None
                    raise ConfigError(
                        f"{label}: {_join(path, k.value)}: key is not a string (YAML reads it as "
                        f"{k.tag.rsplit(':', 1)[-1]}, line {line}); quote it: \"{k.value}\"")
                if k.value in seen:
                    raise ConfigError(
                        f"{label}: {_join(path, k.value)}: duplicate key (lines {seen[k.value]} "
                        f"and {line}); keep one")
                seen[k.value] = line
                total += expanded(v, _join(path, k.value), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                total += expanded(v, f"{path}[{i}]", depth + 1)
        if total > MAX_EXPANDED_NODES:
            raise ConfigError(f"{label}: {path or '<root>'}: expands to more than "
                              f"{MAX_EXPANDED_NODES} values through YAML aliases (an alias "
                              "bomb?); write the file without deep aliases")
        sizes[key] = total
        return total

    expanded(root, "", 0)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.0.c=value`` override in place; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, _, raw = item.partition("=")
    parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p != ""]
    if not parts:
        raise ValueError("empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{where}: no list item {part!r} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"{'.'.join(parts[:i])}: is a value, not a mapping or list")


def format_validation_error(error: ValidationError, label: str, root: type[BaseModel], *,
                            name_pattern: str | None = None, name_help: str = ""
                            ) -> list[str]:
    """One line per problem: ``file: key.path: message``, with unknown keys and fixes named.

    A validator may name a deeper key than the one it sits on by starting its message with
    ``@sub.path@ ``. ``name_pattern``/``name_help`` word a failed name pattern in plain terms.
    """
    lines = []
    errors = error.errors(include_url=False)
    for err in errors:
        raw_loc = tuple(err["loc"])
        etype = err["type"]
        if etype == "too_short" and any(  # a list is "too short" when one of its items failed
                len(o["loc"]) > len(raw_loc) and tuple(o["loc"][:len(raw_loc)]) == raw_loc
                for o in errors):
            continue
        loc = [p for p in raw_loc if not _is_type_tag(p)]
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("@"):
            sub, _, msg = msg[1:].partition("@ ")
            loc.extend(p for p in sub.replace("[", ".[").split(".") if p)
        if etype == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"unknown key{hint} (allowed here: {', '.join(allowed)})"
        elif etype == "missing":
            msg = "missing required key"
        elif etype in ("model_type", "model_attributes_type", "dict_type") and not isinstance(
                err["input"], dict):
            keys = _allowed_keys(root, loc)
            what = f"a mapping with keys {', '.join(keys)}" if keys else "a mapping"
            msg = f"must be {what} (got {_describe(err['input'])})"
        elif etype == "too_short":
            msg = f"must not be empty (needs at least {err['ctx']['min_length']} entry)"
        elif etype == "list_type" and not isinstance(err["input"], list):
            msg = f"must be a list (got {_describe(err['input'])})"
        elif etype == "string_pattern_mismatch" and name_pattern and \
                err.get("ctx", {}).get("pattern") == name_pattern:
            msg = f"must be {name_help} (got {err['input']!r})"
        elif "input" in err and etype not in ("value_error", "assertion_error") and not isinstance(
                err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{label}: {_format_loc(loc) or '<root>'}: {msg}")
    return list(dict.fromkeys(lines))


def _is_type_tag(part: Any) -> bool:
    """pydantic's names for the branch of a union (``int``, ``tuple[int, ...]``), not keys."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool")
                                      or ("[" in part and not part.startswith("[")))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing: the key has no value"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    kind = {str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("["):
            out += part
        else:
            out += f".{part}" if out else str(part)
    return out


def _allowed_keys(root: type[BaseModel], loc: list[Any]) -> list[str]:
    """The field names of the model found by walking ``loc`` from ``root`` (through
    optionals, unions, lists, tuples and dicts)."""
    tp: Any = root
    for part in loc:
        tp = _model_in(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        else:   # a list/tuple (int index) or a dict (str key): step into its items
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[-1] if args else None
    tp = _model_in(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _model_in(tp: Any) -> Any:
    """The model inside ``X | None`` or a union of a model and plain types (else ``tp``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)),
                    args[0] if len(args) == 1 else tp)
    return tp
