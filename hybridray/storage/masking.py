"""Per-column masking that runs at the source site, and the scan that proves it worked.

A masking spec names, per column, what to do before data leaves its site::

    # masks/tickets.yaml — used by: hybridray sync onprem:datasets/tickets \\
    #                                 cloud-a:datasets/tickets --mask masks/tickets.yaml
    output_class: internal          # the class of the output once every rule has run
    columns:
      customer_email: hash          # keyed BLAKE2b with the cluster's salt: joinable, not readable
      phone: drop
      body: {rule: redact, patterns: [email, phone]}   # "[EMAIL]" / "[PHONE]" in the text
      created_at: {rule: generalize, to: month}        # timestamps/dates floored to the month
      amount: {rule: generalize, bucket: 100}          # numbers floored to buckets of 100
      ticket_ref: keep              # reviewed: holds no personal data (skips the scan)

Rules are vectorised Arrow compute (RE2 regular expressions, ``floor_temporal``); hashing
hashes each distinct value once. After masking, ``scan`` checks every batch before it is
encoded: redacted columns must hold no match of their patterns, hashed values must differ from
the raw ones, and every other string column (nested ones included) must hold none of the PII
kinds in ``PATTERNS`` (email, phone, ssn, card, iban, ipv4). A hit fails the sync, naming the
file and column, and nothing is committed.

A spec that lowers the class must earn it (``check_coverage``): every column above the output
class needs a rule, ``keep`` being the explicit "reviewed" one, so ``{output_class: public,
scan: false}`` with no rules lowers nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridray.exceptions import ConfigError, MaskingError
from hybridray.topology.models import DataClass

# RE2 syntax (pyarrow.compute). Phone numbers need separators between groups so dates
# (2024-01-15), plain ids and hex digests are not mistaken for them.
PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\b\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b",
    # US social security numbers written with dashes: 123-45-6789.
    "ssn": r"\b\d{3}-\d{2}-\d{4}\b",
    # Payment card numbers: 13-19 digits in groups of 4 (separated by spaces or dashes) or
    # 15-16 digits in one run.
    "card": r"\b(?:\d{4}[ -]){3}\d{1,7}\b|\b\d{15,16}\b",
    # IBANs: country code, 2 check digits, 11-30 letters/digits (spaces every 4 allowed).
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
    # IPv4 addresses.
    "ipv4": r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b",
}
PLACEHOLDER = {"email": "[EMAIL]", "phone": "[PHONE]", "ssn": "[SSN]", "card": "[CARD]",
               "iban": "[IBAN]", "ipv4": "[IP]"}
# Every kind above: docs/data.md lists the same ones (a test checks they agree).
SCAN_PATTERNS = tuple(PATTERNS)
_WHAT = {"email": "an email address", "phone": "a phone number",
         "ssn": "a social security number", "card": "a payment card number",
         "iban": "an IBAN", "ipv4": "an IP address"}
# Arrow field metadata a source may use to mark one column's class (b"restricted", ...).
COLUMN_CLASS_KEY = b"hybridray.data_class"


class ColumnRule(BaseModel):
    """What happens to one column. A bare string in YAML (``email: hash``) is the rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["drop", "hash", "redact", "generalize", "keep"]
    patterns: tuple[str, ...] = Field(
        ("email", "phone"), description="redact: built-in names (email, phone) or RE2 regexes.")
    to: Literal["year", "month", "day", "hour"] | None = Field(
        None, description="generalize: floor timestamps/dates to this unit.")
    bucket: float | None = Field(None, gt=0, description="generalize: floor numbers to "
                                                          "multiples of this width.")

    @model_validator(mode="after")
    def _fits_rule(self) -> ColumnRule:
        if self.rule == "generalize" and (self.to is None) == (self.bucket is None):
            raise ValueError("generalize needs exactly one of `to` (year, month, day, hour "
                             "for dates) or `bucket` (a width for numbers)")
        if self.rule != "generalize" and (self.to is not None or self.bucket is not None):
            raise ValueError(f"`to`/`bucket` only apply to generalize, not {self.rule}")
        if self.rule == "redact":
            import pyarrow.compute as pc

            for p in self.patterns:
                try:
                    pc.match_substring_regex("", PATTERNS.get(p, p))
                except Exception as e:  # pyarrow raises ArrowInvalid for bad RE2
                    raise ValueError(f"pattern {p!r} is not a valid RE2 regex: {e}") from None
        return self


class MaskingSpec(BaseModel):
    """Column rules plus the data class their output has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_class: DataClass | None = Field(
        None, description="Class of the output once all rules ran (lowers the source's).")
    columns: dict[str, ColumnRule] = Field(default_factory=dict)
    scan: bool = Field(True, description="Scan every other string column for the PII kinds "
                                         "in SCAN_PATTERNS (emails, phone numbers, SSNs, "
                                         "payment cards, IBANs, IP addresses) after masking.")

    @field_validator("columns", mode="before")
    @classmethod
    def _shorthand(cls, value):
        if isinstance(value, dict):
            return {k: {"rule": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    def output_class_for(self, source_class: DataClass) -> DataClass:
        """The output's class: the spec's, never above the source's."""
        if self.output_class is None:
            return source_class
        return min(self.output_class, source_class)

    def fingerprint(self, salt_id: str) -> str:
        """Changes whenever the rules or the salt do (so outputs are recomputed)."""
        body = json.dumps({"spec": self.model_dump(mode="json"), "salt": salt_id},
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def load_spec(source: MaskingSpec | dict | str | os.PathLike | None) -> MaskingSpec | None:
    """A spec from a model, a dict, or a YAML/JSON file; errors name the file and key."""
    if source is None or isinstance(source, MaskingSpec):
        return source
    where = "masking spec"
    data = source
    if not isinstance(source, dict):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: masking spec not found")
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return MaskingSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"{where}: {'.'.join(str(x) for x in err['loc']) or '(top)'}: "
                           f"{err['msg']}" for err in e.errors(include_url=False)]) from None


# ---- applying ------------------------------------------------------------------------------

def check_against_schema(spec: MaskingSpec, schema, source: str):
    """Refuse rules for absent columns or of the wrong type; return the output schema."""
    import pyarrow as pa

    problems = []
    for name, rule in spec.columns.items():
        if name not in schema.names:
            problems.append(f"columns.{name}: no such column in {source} (columns: "
                            f"{', '.join(schema.names)})")
            continue
        typ = schema.field(name).type
        if rule.rule == "redact" and not _is_string(typ):
            problems.append(f"columns.{name}: redact needs a string column, got {typ}")
        if rule.rule == "generalize" and rule.to and not (pa.types.is_timestamp(typ)
                                                          or pa.types.is_date(typ)):
            problems.append(f"columns.{name}: generalize to {rule.to} needs a timestamp or "
                            f"date column, got {typ}")
        if rule.rule == "generalize" and rule.bucket and not (pa.types.is_integer(typ)
                                                              or pa.types.is_floating(typ)):
            problems.append(f"columns.{name}: generalize by bucket needs a numeric column, "
                            f"got {typ}")
    if problems:
        raise ConfigError(["masking spec: " + p for p in problems])
    return apply(schema.empty_table(), spec, b"\0" * 32).schema


def check_coverage(spec: MaskingSpec, schema, source_class: DataClass, source: str) -> None:
    """A spec that lowers the class must say what happens to every column that holds data
    above the output class: a column marked (Arrow field metadata ``hybridray.data_class``)
    above the output class, or unmarked (it is then of the source's class), needs a rule.
    ``keep`` counts: it is the explicit, audited "reviewed, fine to move" rule. Declaring a
    lower ``output_class`` alone lowers nothing.
    """
    out = spec.output_class_for(source_class)
    if out >= source_class:
        return
    uncovered = []
    for f in schema:
        marked = (f.metadata or {}).get(COLUMN_CLASS_KEY)
        cls = DataClass(marked.decode()) if marked else source_class
        if cls > out and f.name not in spec.columns:
            uncovered.append(f"{f.name} ({cls.value})")
    if uncovered:
        raise MaskingError(
            f"{source}: the masking spec lowers {source_class.value} to {out.value} but has no "
            f"rule for {len(uncovered)} column(s) above {out.value}: {', '.join(uncovered)}; "
            "give each a rule (drop, hash, redact, generalize), or `keep` once reviewed to "
            "hold nothing above the output class")


def actions(spec: MaskingSpec | None, source_class: DataClass) -> dict[str, Any] | None:
    """What a spec actually does, for the sync result and the audit log."""
    if spec is None:
        return None
    out = spec.output_class_for(source_class)
    rules = {name: r.rule for name, r in spec.columns.items()}
    return {"rules": rules, "reviewed_keep": sorted(n for n, r in rules.items() if r == "keep"),
            "changed_columns": sorted(n for n, r in rules.items() if r != "keep"),
            "scan": spec.scan, "scan_kinds": list(SCAN_PATTERNS) if spec.scan else [],
            "class_from": source_class.value, "class_to": out.value,
            "lowered": out < source_class}


def apply(table, spec: MaskingSpec, salt: bytes):
    """The masked table (columns in their original order, dropped ones removed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays, names = [], []
    for name in table.column_names:
        col = table.column(name)
        rule = spec.columns.get(name)
        if rule is None or rule.rule == "keep":
            arrays.append(col)
        elif rule.rule == "drop":
            continue
        elif rule.rule == "hash":
            arrays.append(_hash(col, salt))
        elif rule.rule == "redact":
            for p in rule.patterns:
                col = pc.replace_substring_regex(col, PATTERNS.get(p, p),
                                                 PLACEHOLDER.get(p, "[REDACTED]"))
            arrays.append(col)
        elif rule.to:
            arrays.append(pc.floor_temporal(col, unit=rule.to))
        else:
            as_float = pc.cast(col, pa.float64())
            floored = pc.multiply(pc.floor(pc.divide(as_float, rule.bucket)), rule.bucket)
            arrays.append(floored.cast(col.type, safe=False))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _hash(col, salt: bytes):
    """Keyed BLAKE2b (128-bit, hex) of each value's text; nulls stay null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = col if _is_string(col.type) else pc.cast(col, pa.string())
    encoded = pc.dictionary_encode(text).combine_chunks()  # hash each distinct value once
    digests = pa.array([hashlib.blake2b(v.encode(), key=salt, digest_size=16).hexdigest()
                        for v in encoded.dictionary.to_pylist()], pa.string())
    return pa.DictionaryArray.from_arrays(encoded.indices, digests).dictionary_decode()


# ---- proving it ---------------------------------------------------------------------------

def scan(original, masked, spec: MaskingSpec, source: str) -> None:
    """Raise ``MaskingError`` if any raw value the rules should have removed survived."""
    import pyarrow.compute as pc

    for name, rule in spec.columns.items():
        if rule.rule == "drop" and name in masked.column_names:
            raise MaskingError(f"{source}: column {name!r} should have been dropped")
        if rule.rule == "redact":
            for p in rule.patterns:
                if _any_match(masked.column(name), PATTERNS.get(p, p)):
                    raise MaskingError(f"{source}: column {name!r} still matches {p!r} after "
                                       "redaction")
        if rule.rule == "hash":
            raw = original.column(name)
            raw = raw if _is_string(raw.type) else pc.cast(raw, "string")
            if pc.any(pc.equal(raw, masked.column(name))).as_py():
                raise MaskingError(f"{source}: column {name!r} holds raw values after hashing")
    if not spec.scan:
        return
    for name in masked.column_names:
        rule = spec.columns.get(name)
        if rule is not None and rule.rule in ("hash", "keep", "generalize", "redact"):
            continue  # transformed (or reviewed) above
        for leaf in _string_leaves(masked.column(name)):
            for p in SCAN_PATTERNS:
                if _any_match(leaf, PATTERNS[p]):
                    raise MaskingError(
                        f"{source}: column {name!r} holds what looks like {_WHAT[p]}, and "
                        f"no rule masks it; add a rule for it (drop, hash or redact), or "
                        f"`{name}: keep` if it is reviewed and fine to move")


def _any_match(col, pattern: str) -> bool:
    import pyarrow.compute as pc

    if len(col) == 0:
        return False
    return bool(pc.any(pc.match_substring_regex(col, pattern)).as_py())


def _string_leaves(col):
    """Every string array inside ``col`` (lists and structs unpacked)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    typ = arr.type
    if _is_string(typ):
        yield arr
    elif pa.types.is_dictionary(typ) and _is_string(typ.value_type):
        yield arr.dictionary
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(
            typ):
        yield from _string_leaves(pc.list_flatten(arr))
    elif pa.types.is_struct(typ):
        for i in range(typ.num_fields):
            yield from _string_leaves(arr.field(i))
    elif pa.types.is_map(typ):
        yield from _string_leaves(arr.keys)
        yield from _string_leaves(arr.items)


def _is_string(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or \
        pa.types.is_string_view(typ)
