"""The preference-pairs contract: one JSON object per line (see ../shared/DESIGN.md).

    {"id": "p-0001", "prompt": "How do I ...?",            # prompt optional for numeric options
     "a": "first answer" | [0.31], "b": "second answer" | [0.77],
     "choices": {"terse": 0, "thorough": 1},               # 0 = a preferred, 1 = b, 0.5 = tie
     "attributes": {"a": {"verbosity": 0.1}, "b": {"verbosity": 0.8}},   # optional
     "split": "train"}                                       # train | val | test

`load_pairs` validates every line and stops at the first bad one with
`file:line: field: problem`; nothing is skipped. `write_pairs` emits the same format, so
generators and the loader agree by construction (a round trip is tested).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from core.atomic import write_jsonl_atomic

SPLITS = ("train", "val", "test")
CHOICE_VALUES = (0.0, 0.5, 1.0)
_KNOWN_FIELDS = {"id", "prompt", "a", "b", "choices", "attributes", "split"}


class PairsFormatError(ValueError):
    """A pairs file (or an in-memory pair list) breaks the contract."""


@dataclass
class PairSet:
    """A validated set of preference pairs held as arrays.

    Options are either text (`a`, `b` are lists of str) or numeric (`a`, `b` are float32
    arrays of shape (n, d)). `choices[i, u]` is user type `user_types[u]`'s choice on pair i.
    """

    ids: list[str]
    prompts: list[str | None]
    a: list[str] | np.ndarray
    b: list[str] | np.ndarray
    user_types: list[str]
    choices: np.ndarray  # (n, U) float32 in {0, 0.5, 1}
    split: np.ndarray  # (n,) '<U5' in SPLITS
    attribute_names: list[str] = field(default_factory=list)
    attributes: np.ndarray | None = None  # (n, 2, A) float32: [:, 0] for a, [:, 1] for b
    source: str = "<memory>"

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, value in (("prompts", self.prompts), ("a", self.a), ("b", self.b),
                            ("choices", self.choices), ("split", self.split)):
            if len(value) != n:
                raise PairsFormatError(f"{self.source}: {name}: has {len(value)} rows, ids has {n}")
        if self.attributes is not None and len(self.attributes) != n:
            raise PairsFormatError(f"{self.source}: attributes: has {len(self.attributes)} rows, ids has {n}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_numeric(self) -> bool:
        return isinstance(self.a, np.ndarray)

    @property
    def option_dim(self) -> int | None:
        return int(self.a.shape[1]) if isinstance(self.a, np.ndarray) else None

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (or all rows), in file order."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == split)

    def type_index(self, user_type: str) -> int:
        try:
            return self.user_types.index(user_type)
        except ValueError:
            raise KeyError(f"unknown user type {user_type!r}; this data has {self.user_types}") from None

    def take(self, rows: Sequence[int] | np.ndarray) -> "PairSet":
        """A new PairSet with the given rows, in that order."""
        r = np.asarray(rows, dtype=np.int64)
        opt = (lambda v: v[r]) if self.is_numeric else (lambda v: [v[i] for i in r])
        return PairSet(ids=[self.ids[i] for i in r], prompts=[self.prompts[i] for i in r], a=opt(self.a),
                       b=opt(self.b), user_types=list(self.user_types), choices=self.choices[r], split=self.split[r],
                       attribute_names=list(self.attribute_names),
                       attributes=None if self.attributes is None else self.attributes[r], source=self.source)

    def conflicting(self, type_a: str, type_b: str) -> np.ndarray:
        """Boolean mask (n,) of pairs on which two user types make opposite strict choices."""
        ca = self.choices[:, self.type_index(type_a)]
        cb = self.choices[:, self.type_index(type_b)]
        return (ca != 0.5) & (cb != 0.5) & (ca != cb)

    def to_records(self) -> list[dict[str, Any]]:
        """The pairs as contract dicts (what `write_pairs` writes)."""
        out = []
        for i in range(len(self)):
            rec: dict[str, Any] = {"id": self.ids[i]}
            if self.prompts[i] is not None:
                rec["prompt"] = self.prompts[i]
            if self.is_numeric:
                rec["a"] = [float(v) for v in self.a[i]]
                rec["b"] = [float(v) for v in self.b[i]]
            else:
                rec["a"], rec["b"] = self.a[i], self.b[i]
            rec["choices"] = {u: _choice_out(self.choices[i, k]) for k, u in enumerate(self.user_types)}
            if self.attributes is not None:
                rec["attributes"] = {
                    side: {name: float(self.attributes[i, s, k]) for k, name in enumerate(self.attribute_names)}
                    for s, side in enumerate(("a", "b"))
                }
            rec["split"] = str(self.split[i])
            out.append(rec)
        return out


def _choice_out(c: float) -> float | int:
    return 0.5 if c == 0.5 else int(c)


_F32_MAX = float(np.finfo(np.float32).max)


def _is_number(v: Any) -> bool:
    """A JSON number that is finite and fits float32 (values are stored as float32)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v) and abs(float(v)) <= _F32_MAX
    except OverflowError:  # integers beyond float range
        return False


class _Builder:
    """Validates records one at a time against the contract and the lines seen so far."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids: list[str] = []
        self.seen: dict[str, int] = {}
        self.prompts: list[str | None] = []
        self.a: list[Any] = []
        self.b: list[Any] = []
        self.choices: list[list[float]] = []
        self.split: list[str] = []
        self.attributes: list[list[list[float]]] = []
        self.kind: str | None = None  # "text" | "numeric"
        self.dim: int | None = None
        self.user_types: list[str] | None = None
        self.attribute_names: list[str] | None = None
        self.first_line = 0

    def fail(self, line: int, fld: str, problem: str) -> PairsFormatError:
        return PairsFormatError(f"{self.source}:{line}: {fld}: {problem}")

    def add(self, rec: Any, line: int) -> None:
        if not isinstance(rec, dict):
            raise self.fail(line, "<line>", f"expected a JSON object, got {type(rec).__name__}")
        if not self.ids:
            self.first_line = line
        unknown = sorted(set(rec) - _KNOWN_FIELDS)
        if unknown:
            raise self.fail(line, unknown[0], f"unknown field (allowed: {', '.join(sorted(_KNOWN_FIELDS))})")
        for name in ("id", "a", "b", "choices", "split"):
            if name not in rec:
                raise self.fail(line, name, "missing field")

        pid = rec["id"]
        if not isinstance(pid, str) or not pid:
            raise self.fail(line, "id", "must be a non-empty string")
        if pid in self.seen:
            raise self.fail(line, "id", f"duplicate id {pid!r} (first on line {self.seen[pid]})")

        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise self.fail(line, "prompt", f"must be a string, got {type(prompt).__name__}")

        a, b = self._option(rec["a"], line, "a"), self._option(rec["b"], line, "b")
        kind_a, kind_b = _kind(a), _kind(b)
        if kind_a != kind_b:
            raise self.fail(line, "b", f"is {kind_b} but a is {kind_a}; a and b must be the same kind")
        if kind_a == "numeric" and len(a) != len(b):
            raise self.fail(line, "b", f"has dimension {len(b)} but a has {len(a)}")
        if self.kind is None:
            self.kind = kind_a
            self.dim = len(a) if kind_a == "numeric" else None
        elif kind_a != self.kind:
            raise self.fail(line, "a", f"is {kind_a} but line {self.first_line} has {self.kind} options")
        elif kind_a == "numeric" and len(a) != self.dim:
            raise self.fail(line, "a", f"has dimension {len(a)} but line {self.first_line} has {self.dim}")
        if kind_a == "text" and prompt is None:
            raise self.fail(line, "prompt", "missing field (required for text options)")

        choices = self._choices(rec["choices"], line, has_attributes="attributes" in rec)
        attrs = self._attributes(rec["attributes"], line) if "attributes" in rec else None
        if attrs is None and self.attribute_names:
            raise self.fail(line, "attributes", f"missing field (line {self.first_line} has attributes)")

        split = rec["split"]
        if split not in SPLITS:
            raise self.fail(line, "split", f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

        self.seen[pid] = line
        self.ids.append(pid)
        self.prompts.append(prompt)
        self.a.append(a)
        self.b.append(b)
        self.choices.append(choices)
        self.split.append(split)
        if attrs is not None:
            self.attributes.append(attrs)

    def _option(self, v: Any, line: int, name: str) -> str | list[float]:
        if isinstance(v, str):
            if not v.strip():
                raise self.fail(line, name, "empty text")
            return v
        if isinstance(v, list):
            if not v:
                raise self.fail(line, name, "empty list")
            if not all(_is_number(x) for x in v):
                raise self.fail(line, name, "numeric options must be a list of finite numbers within float32 range")
            return [float(x) for x in v]
        raise self.fail(line, name, f"must be a string or a list of numbers, got {type(v).__name__}")

    def _choices(self, v: Any, line: int, has_attributes: bool) -> list[float]:
        if not isinstance(v, dict):
            raise self.fail(line, "choices", f"must be an object {{user type: 0|1|0.5}}, got {type(v).__name__}")
        if not v and not has_attributes:
            raise self.fail(line, "choices", "empty (a pair needs at least one user type's choice, or attributes)")
        for user, c in v.items():
            if not _is_number(c) or float(c) not in CHOICE_VALUES:
                raise self.fail(line, f"choices.{user}", f"choice {c!r} not in {{0, 1, 0.5}}")
        keys = list(v)
        if self.user_types is None:
            self.user_types = keys
        elif set(keys) != set(self.user_types):
            missing = sorted(set(self.user_types) - set(keys))
            extra = sorted(set(keys) - set(self.user_types))
            what = "; ".join(s for s in (f"missing {missing}" if missing else "",
                                           f"unexpected {extra}" if extra else "") if s)
            raise self.fail(line, "choices", f"user types differ from line {self.first_line}: {what}")
        return [float(v[u]) for u in self.user_types]

    def _attributes(self, v: Any, line: int) -> list[list[float]]:
        if not isinstance(v, dict) or set(v) != {"a", "b"}:
            raise self.fail(line, "attributes", 'must be {"a": {name: number}, "b": {name: number}}')
        names_a = v["a"]
        if not isinstance(names_a, dict) or not isinstance(v["b"], dict):
            raise self.fail(line, "attributes", 'must be {"a": {name: number}, "b": {name: number}}')
        if set(names_a) != set(v["b"]):
            raise self.fail(line, "attributes.b", f"names {sorted(v['b'])} differ from attributes.a {sorted(names_a)}")
        if not names_a:
            raise self.fail(line, "attributes.a", "empty")
        if self.attribute_names is None:
            if self.ids:  # earlier lines had no attributes
                raise self.fail(line, "attributes", f"present here but absent on line {self.first_line}")
            self.attribute_names = list(names_a)
        elif set(names_a) != set(self.attribute_names):
            raise self.fail(line, "attributes.a",
                            f"names {sorted(names_a)} differ from line {self.first_line}: {sorted(self.attribute_names)}")
        out = []
        for side in ("a", "b"):
            row = []
            for name in self.attribute_names:
                x = v[side][name]
                if not _is_number(x):
                    raise self.fail(line, f"attributes.{side}.{name}", f"must be a finite number within float32 range, got {x!r}")
                row.append(float(x))
            out.append(row)
        return out

    def build(self) -> PairSet:
        if not self.ids:
            raise PairsFormatError(f"{self.source}: no pairs")
        numeric = self.kind == "numeric"
        return PairSet(
            ids=self.ids,
            prompts=self.prompts,
            a=np.asarray(self.a, dtype=np.float32) if numeric else self.a,
            b=np.asarray(self.b, dtype=np.float32) if numeric else self.b,
            user_types=list(self.user_types or []),
            choices=np.asarray(self.choices, dtype=np.float32).reshape(len(self.ids), -1),
            split=np.asarray(self.split, dtype="<U5"),
            attribute_names=list(self.attribute_names or []),
            attributes=np.asarray(self.attributes, dtype=np.float32) if self.attribute_names else None,
            source=self.source,
        )


def _kind(v: str | list[float]) -> str:
    return "text" if isinstance(v, str) else "numeric"


def load_pairs(path: str | os.PathLike) -> PairSet:
    """Read and validate a JSONL pairs file; raise PairsFormatError at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise PairsFormatError(f"{path}: no such file")
    builder = _Builder(str(path))
    with path.open("rb") as f:
        for line_no, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise builder.fail(line_no, "<line>", f"not valid UTF-8 (byte {e.start})") from None
            if not raw.strip():
                raise builder.fail(line_no, "<line>", "empty line (every line must be one JSON object)")
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise builder.fail(line_no, "<line>", f"not JSON ({e.msg} at column {e.colno})") from None
            builder.add(rec, line_no)
    return builder.build()


def pairs_from_records(records: Iterable[dict[str, Any]], source: str = "<memory>") -> PairSet:
    """Validate in-memory records exactly as `load_pairs` validates lines (1-based indices)."""
    builder = _Builder(source)
    for i, rec in enumerate(records, start=1):
        builder.add(rec, i)
    return builder.build()


def write_pairs(path: str | os.PathLike, pairs: PairSet | Sequence[dict[str, Any]]) -> Path:
    """Write pairs as JSONL, atomically; records are validated first, so a bad one writes nothing."""
    path = Path(path)
    pairset = pairs if isinstance(pairs, PairSet) else pairs_from_records(pairs, source=str(path))
    return write_jsonl_atomic(path, pairset.to_records())
