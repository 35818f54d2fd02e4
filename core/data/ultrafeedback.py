"""UltraFeedback → preference pairs in the JSONL contract (paper §4.2 "HH", App. D.1 "HHT").

Input: rows as published in `openbmb/UltraFeedback` (train split). Each row has an
`instruction` and a list of `completions`; each completion has a `response` and
`annotations.<aspect>.Rating`, a string "1".."5" or "N/A", for the aspects `helpfulness`,
`honesty`, `truthfulness` and `instruction_following`. Other fields are ignored.

Construction (paper §2.2 / §2.5 of ../shared/docs/PAPER.md):

- Every unordered pair (i < j) of one row's completions is a candidate: 6 for 4 completions.
  Option a is completion i, b is completion j.
- Each used aspect is one user type of the contract, named after the aspect. Its choice is
  0 if a is rated higher, 1 if b is; the aspect's ratings are also written as per-option
  `attributes` (so continuous users, r = w · ratings, can be drawn from the same file).
- `hh`: user types helpfulness, honesty. `hht`: helpfulness, honesty, truthfulness.
- A pair is dropped if either completion is rated "N/A" on a used aspect (counted as "N/A"), or
  else if a used aspect is tied (counted as "tie"). An N/A rating is a missing rating for that
  aspect only: the completion still enters pairs of a variant that does not use the aspect
  (hh never inspects truthfulness). The N/A ratings of the used aspects are counted.
- Conflicting pairs: the used aspects do not all choose the same option (for hh, helpfulness
  ≠ honesty). All other surviving pairs agree.
- Splits: by prompt, from a salted hash of the stripped instruction text, so they do not depend
  on row order and every pair of a prompt (and every copy of a repeated prompt) lands in the
  same split. Fractions are 80/10/10 in expectation, not exactly.
- Conflict rate r (§4.3.2): inside each split, of the n_c conflicting pairs keep round(r · n_c)
  and fill up to n_c with agreeing pairs, so split sizes do not change with r (as in the
  authors' `split_uf_data.py`, which hard-codes r = 1). Which pairs are kept is a hash of
  (seed, prompt, a, b): deterministic and independent of row order. If a split has too few
  agreeing pairs, all of them are kept and the conflicting ones cut so that the rate holds;
  that split is then smaller, and the summary says so.

Malformed rows (missing or mistyped fields, a rating that is neither 1–5 nor "N/A", fewer
than two completions, empty responses, lines that are not JSON) raise `UltraFeedbackError`
naming the source, the row number (1-based: JSONL line, or row of the parquet file) and the
field. With `skip_bad=True` (`--skip-bad`) such rows are skipped instead; each one is counted
and reported in the summary, never dropped silently.

Known differences from the authors' pipeline, so sizes will not match the paper's
28,763 / 3,673 / 3,509 exactly: they split pairs (not prompts) at random; they group
completions by identical instruction text across rows; and they drop a completion entirely
when any of its four ratings is not an integer.

CLI: `python -m core.data.ultrafeedback --src PATH_OR_HUB_ID --variant hh|hht --conflict 1.0
--out FILE [--seed 42 --skip-bad]`. PATH is a .jsonl or .parquet file, or a folder of them
(e.g. a downloaded snapshot of the dataset repository); a SRC that is not a path is passed to
`datasets.load_dataset(SRC, split="train")`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from core.data.pairs import SPLITS, PairSet, pairs_from_records, write_pairs

VARIANTS: dict[str, tuple[str, ...]] = {
    "hh": ("helpfulness", "honesty"),
    "hht": ("helpfulness", "honesty", "truthfulness"),
}
# Split sizes reported in the paper (conflict rate 1.0, full train split): §4.2 and App. D.1.
PAPER_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "hh": (28_763, 3_673, 3_509),
    "hht": (27_475, 3_415, 3_415),
}
RATING_MIN, RATING_MAX = 1, 5
NA_RATING = "N/A"
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl",)


class UltraFeedbackError(ValueError):
    """A source row breaks the UltraFeedback schema, or the source cannot be read."""


class RowError(ValueError):
    """One row's problem: `field` is a path into the row such as completions[2].response."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass
class UFConfig:
    """How `build_pairs` turns UltraFeedback rows into pairs (all randomness keyed by `seed`)."""

    variant: str = "hh"  # "hh" (helpfulness, honesty) or "hht" (+ truthfulness)
    conflict_rate: float = 1.0  # share of kept pairs that conflict; 1.0 = the paper's datasets
    seed: int = 42  # salts the prompt-split hash and the choice of kept pairs
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test, over prompts
    skip_bad: bool = False  # skip (and count) malformed rows instead of raising

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if not 0.0 <= self.conflict_rate <= 1.0:
            raise ValueError(f"conflict_rate must be in [0, 1], got {self.conflict_rate}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 \
                or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, "
                             f"got {self.split_fractions}")

    @property
    def aspects(self) -> tuple[str, ...]:
        return VARIANTS[self.variant]


@dataclass
class UFSummary:
    """Counts of everything read, dropped and kept (printed by the CLI)."""

    aspects: tuple[str, ...]
    conflict_rate: float
    rows_read: int = 0
    rows_used: int = 0
    bad_rows: list[str] = field(default_factory=list)  # "where: field: problem", one per skipped row
    completions: int = 0
    na_ratings: dict[str, int] = field(default_factory=dict)  # aspect -> completions rated N/A
    candidate_pairs: int = 0
    dropped_na: int = 0
    dropped_tie: int = 0
    conflicting: dict[str, int] = field(default_factory=dict)  # split -> conflicting pairs available
    agreeing: dict[str, int] = field(default_factory=dict)  # split -> agreeing pairs available
    kept_conflicting: dict[str, int] = field(default_factory=dict)
    kept_agreeing: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)  # split -> distinct prompts with kept pairs
    notes: list[str] = field(default_factory=list)

    def split_sizes(self) -> dict[str, int]:
        return {s: self.kept_conflicting.get(s, 0) + self.kept_agreeing.get(s, 0) for s in SPLITS}

    @property
    def kept(self) -> int:
        return sum(self.split_sizes().values())


@dataclass
class _Row:
    """One validated row: ratings (K, A) with NaN where the rating is N/A."""

    number: int  # 1-based position in the whole source
    prompt: str
    responses: list[str]
    ratings: np.ndarray


@dataclass
class _Candidate:
    row: int
    i: int
    j: int
    prompt: str
    a: str
    b: str
    choices: tuple[float, ...]  # per aspect, 0 = a preferred, 1 = b
    ratings_a: tuple[float, ...]
    ratings_b: tuple[float, ...]

    @property
    def conflicting(self) -> bool:
        return len(set(self.choices)) > 1


class _Unreadable:
    """Stands in for a row the reader could not decode (e.g. a JSONL line that is not JSON)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------


def _unit_hash(*parts: str) -> float:
    """A number in [0, 1) from the text parts; stable across runs and platforms."""
    h = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def prompt_split(prompt: str, seed: int = 42,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split of every pair of `prompt`: a salted hash of the stripped text cut by `fractions`."""
    u = _unit_hash("split", str(seed), prompt.strip())
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _rating(v: Any, where: str) -> float:
    """1..5 as float, NaN for "N/A"; anything else is a RowError."""
    if isinstance(v, str):
        s = v.strip()
        if s == NA_RATING:
            return math.nan
        if s.isascii() and s.isdigit() and RATING_MIN <= int(s) <= RATING_MAX:
            return float(int(s))
        raise RowError(where, f"rating {v!r} is neither an integer {RATING_MIN}-{RATING_MAX} nor {NA_RATING!r}")
    if isinstance(v, int) and not isinstance(v, bool) and RATING_MIN <= v <= RATING_MAX:
        return float(v)
    if v is None:
        raise RowError(where, "missing (null)")
    raise RowError(where, f"rating {v!r} ({type(v).__name__}) is neither an integer "
                          f"{RATING_MIN}-{RATING_MAX} nor {NA_RATING!r}")


def _get(obj: dict, key: str, where: str) -> Any:
    if key not in obj or obj[key] is None:
        raise RowError(where, "missing field" if key not in obj else "missing (null)")
    return obj[key]


def parse_row(raw: Any, number: int, aspects: Sequence[str]) -> _Row:
    """Validate one UltraFeedback row; raise RowError(field, problem) at the first problem."""
    if isinstance(raw, _Unreadable):
        raise RowError("<row>", raw.problem)
    if not isinstance(raw, dict):
        raise RowError("<row>", f"expected an object, got {type(raw).__name__}")
    prompt = _get(raw, "instruction", "instruction")
    if not isinstance(prompt, str):
        raise RowError("instruction", f"must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RowError("instruction", "empty text")
    comps = _get(raw, "completions", "completions")
    if not isinstance(comps, (list, tuple)):
        raise RowError("completions", f"must be a list, got {type(comps).__name__}")
    if len(comps) < 2:
        raise RowError("completions", f"has {len(comps)} completion(s); a pair needs at least 2")
    responses, ratings = [], []
    for k, c in enumerate(comps):
        at = f"completions[{k}]"
        if not isinstance(c, dict):
            raise RowError(at, f"expected an object, got {type(c).__name__}")
        resp = _get(c, "response", f"{at}.response")
        if not isinstance(resp, str):
            raise RowError(f"{at}.response", f"must be a string, got {type(resp).__name__}")
        if not resp.strip():
            raise RowError(f"{at}.response", "empty text")
        ann = _get(c, "annotations", f"{at}.annotations")
        if not isinstance(ann, dict):
            raise RowError(f"{at}.annotations", f"must be an object, got {type(ann).__name__}")
        row_ratings = []
        for aspect in aspects:
            a_at = f"{at}.annotations.{aspect}"
            entry = _get(ann, aspect, a_at)
            if not isinstance(entry, dict):
                raise RowError(a_at, f"must be an object with a 'Rating', got {type(entry).__name__}")
            row_ratings.append(_rating(_get(entry, "Rating", f"{a_at}.Rating"), f"{a_at}.Rating"))
        responses.append(resp)
        ratings.append(row_ratings)
    return _Row(number=number, prompt=prompt, responses=responses, ratings=np.asarray(ratings, dtype=np.float64))


def _pair_choice(ra: float, rb: float) -> float:
    return 0.0 if ra > rb else (1.0 if rb > ra else 0.5)


def row_candidates(row: _Row, summary: UFSummary) -> list[_Candidate]:
    """All pairs of one row that have every used rating and no tie; counts the dropped ones."""
    out = []
    n = len(row.responses)
    for i in range(n):
        for j in range(i + 1, n):
            summary.candidate_pairs += 1
            ra, rb = row.ratings[i], row.ratings[j]
            if np.isnan(ra).any() or np.isnan(rb).any():
                summary.dropped_na += 1
                continue
            choices = tuple(_pair_choice(x, y) for x, y in zip(ra, rb))
            if 0.5 in choices:
                summary.dropped_tie += 1
                continue
            out.append(_Candidate(row=row.number, i=i, j=j, prompt=row.prompt, a=row.responses[i],
                                  b=row.responses[j], choices=choices, ratings_a=tuple(ra.tolist()),
                                  ratings_b=tuple(rb.tolist())))
    return out


def conflict_counts(n_conflicting: int, n_agreeing: int, rate: float) -> tuple[int, int]:
    """(conflicting, agreeing) pairs to keep: n_conflicting in all, round(rate · n_conflicting)
    of them conflicting. With too few agreeing pairs, all of those are kept and the conflicting
    ones are cut to round(rate / (1 − rate) · n_agreeing), so the rate still holds."""
    def round_half_up(x: float) -> int:
        return int(math.floor(x + 0.5))

    k_conf = round_half_up(rate * n_conflicting)
    k_agree = n_conflicting - k_conf
    if k_agree > n_agreeing:  # only possible for rate < 1
        k_agree = n_agreeing
        k_conf = min(n_conflicting, round_half_up(rate / (1.0 - rate) * n_agreeing))
    return k_conf, k_agree


def _keep_order(c: _Candidate, seed: int) -> tuple[float, int, int, int]:
    return (_unit_hash("keep", str(seed), c.prompt, c.a, c.b), c.row, c.i, c.j)


def build_pairs(rows: Iterable[tuple[str, Any]], cfg: UFConfig) -> tuple[PairSet, UFSummary]:
    """UltraFeedback rows → (PairSet, summary). `rows` yields (location for messages, raw row)."""
    aspects = cfg.aspects
    summary = UFSummary(aspects=aspects, conflict_rate=cfg.conflict_rate, na_ratings={a: 0 for a in aspects})
    pools: dict[str, dict[bool, list[_Candidate]]] = {s: {True: [], False: []} for s in SPLITS}
    for number, (where, raw) in enumerate(rows, start=1):
        summary.rows_read += 1
        try:
            row = parse_row(raw, number, aspects)
        except RowError as e:
            msg = f"{where}: {e.field}: {e.problem}"
            if not cfg.skip_bad:
                raise UltraFeedbackError(f"{msg} (use --skip-bad to skip and count malformed rows)") from None
            summary.bad_rows.append(msg)
            continue
        summary.rows_used += 1
        summary.completions += len(row.responses)
        for k, aspect in enumerate(aspects):
            summary.na_ratings[aspect] += int(np.isnan(row.ratings[:, k]).sum())
        split = prompt_split(row.prompt, cfg.seed, cfg.split_fractions)
        for c in row_candidates(row, summary):
            pools[split][c.conflicting].append(c)

    kept: list[tuple[_Candidate, str]] = []
    for s in SPLITS:
        conf, agree = pools[s][True], pools[s][False]
        summary.conflicting[s], summary.agreeing[s] = len(conf), len(agree)
        k_conf, k_agree = conflict_counts(len(conf), len(agree), cfg.conflict_rate)
        if k_conf + k_agree < len(conf):
            summary.notes.append(f"{s}: only {len(agree)} agreeing pairs, so {k_conf + k_agree} pairs kept "
                                 f"instead of {len(conf)} to reach conflict rate {cfg.conflict_rate:g}")
        chosen = sorted(conf, key=lambda c: _keep_order(c, cfg.seed))[:k_conf] \
            + sorted(agree, key=lambda c: _keep_order(c, cfg.seed))[:k_agree]
        summary.kept_conflicting[s], summary.kept_agreeing[s] = k_conf, k_agree
        summary.prompts[s] = len({c.prompt.strip() for c in chosen})
        kept.extend((c, s) for c in chosen)
    if not kept:
        raise UltraFeedbackError(
            f"no pairs left: {summary.rows_used} usable rows gave {summary.candidate_pairs} candidate pairs, "
            f"{summary.dropped_na} dropped for N/A ratings, {summary.dropped_tie} for ties, "
            f"{sum(summary.conflicting.values())} conflicting and {sum(summary.agreeing.values())} agreeing")

    kept.sort(key=lambda cs: (cs[0].row, cs[0].i, cs[0].j))  # source order
    records = [{
        "id": f"uf-{c.row}-{c.i}-{c.j}",
        "prompt": c.prompt,
        "a": c.a,
        "b": c.b,
        "choices": {aspect: int(ch) for aspect, ch in zip(aspects, c.choices)},
        "attributes": {"a": dict(zip(aspects, c.ratings_a)), "b": dict(zip(aspects, c.ratings_b))},
        "split": split,
    } for c, split in kept]
    pairs = pairs_from_records(records, source=f"ultrafeedback-{cfg.variant}[conflict={cfg.conflict_rate:g}]")
    return pairs, summary


def format_summary(summary: UFSummary, variant: str) -> list[str]:
    """Human-readable summary lines; the paper's split sizes sit next to ours."""
    s = summary
    lines = [f"rows: {s.rows_read} read, {s.rows_used} used, {len(s.bad_rows)} skipped as malformed"]
    for msg in s.bad_rows[:10]:
        lines.append(f"  skipped {msg}")
    if len(s.bad_rows) > 10:
        lines.append(f"  ... and {len(s.bad_rows) - 10} more")
    na = ", ".join(f"{a} {n}" for a, n in s.na_ratings.items())
    lines.append(f"completions: {s.completions}; rated {NA_RATING} (left out of pairs on that aspect): {na}")
    n_conf, n_agree = sum(s.conflicting.values()), sum(s.agreeing.values())
    lines.append(f"pairs: {s.candidate_pairs} candidates, {s.dropped_na} dropped ({NA_RATING} rating), "
                 f"{s.dropped_tie} dropped (tie on {'/'.join(s.aspects)}); {n_conf} conflicting, {n_agree} agreeing")
    k_conf, k_agree = sum(s.kept_conflicting.values()), sum(s.kept_agreeing.values())
    lines.append(f"conflict rate {s.conflict_rate:.2f}: kept {k_conf} conflicting + {k_agree} agreeing = {s.kept}")
    lines.extend(f"  note: {n}" for n in s.notes)
    paper = PAPER_SPLIT_SIZES[variant]
    lines.append(f"{'split':6s} {'pairs':>8s} {'prompts':>8s} {'conflict':>9s} {'paper':>8s}")
    for k, split in enumerate(SPLITS):
        n = s.split_sizes()[split]
        rate = f"{s.kept_conflicting[split] / n:.3f}" if n else "-"
        lines.append(f"{split:6s} {n:8d} {s.prompts[split]:8d} {rate:>9s} {paper[k]:8,d}")
    lines.append(f"(paper: {variant.upper()} sizes at conflict rate 1.0 from the full train split, "
                 f"random pair-level split; ours split by prompt)")
    return lines


# ---------------------------------------------------------------------------------------------
# IO edges
# ---------------------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}: row {line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _Unreadable(f"not valid UTF-8 (byte {e.start})")
                continue
            if not text.strip():
                yield where, _Unreadable("empty line (every line must be one JSON object)")
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _Unreadable(f"not JSON ({e.msg} at column {e.colno})")


def _parquet_rows(paths: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    try:  # imported here so that the error comes before any row is read
        import pyarrow.parquet as pq
    except ImportError:
        raise UltraFeedbackError("reading parquet needs pyarrow, which is not installed: "
                                 "pip install -c constraints.txt -r requirements.txt (pins pyarrow)") from None

    def rows() -> Iterator[tuple[str, Any]]:
        for path in paths:
            pf = pq.ParquetFile(path)
            missing = [c for c in ("instruction", "completions") if c not in pf.schema_arrow.names]
            if missing:
                raise UltraFeedbackError(f"{path}: column {missing[0]!r} missing "
                                         f"(has {', '.join(pf.schema_arrow.names)})")
            row_no = 0
            for batch in pf.iter_batches(batch_size=1024, columns=["instruction", "completions"]):
                for rec in batch.to_pylist():  # plain dicts and lists, like json.loads gives
                    row_no += 1
                    yield f"{path}: row {row_no}", rec

    return rows()


def _hub_rows(hub_id: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UltraFeedbackError(
            f"{hub_id!r} is not a local file or folder, and loading it from the Hugging Face Hub needs the "
            f"`datasets` package, which is not installed (pip install datasets). Offline, download the "
            f"parquet files and pass their file or folder instead.") from None
    ds = datasets.load_dataset(hub_id, split=split)
    return ((f"{hub_id}[{split}]: row {k}", rec) for k, rec in enumerate(ds, start=1))


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows([path])
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path)
    raise UltraFeedbackError(f"{path}: unknown file type {suffix!r}; expected "
                             f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} or a folder of such files")


def read_rows(src: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of a .jsonl or .parquet file, of a folder of such files
    (read in sorted path order, e.g. a downloaded dataset snapshot), or of a Hugging Face Hub
    dataset id (train split)."""
    path = Path(src)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise UltraFeedbackError(f"{path}: folder holds no {' or '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files")
        return itertools.chain.from_iterable([_file_rows(f) for f in files])  # opens lazily, checks eagerly
    if path.is_file():
        return _file_rows(path)
    if path.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES or str(src).startswith((".", "/", "~")):
        raise UltraFeedbackError(f"{path}: no such file")
    return _hub_rows(str(src))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.data.ultrafeedback",
                                 description="Write UltraFeedback HH/HHT preference pairs (JSONL contract).")
    ap.add_argument("--src", required=True,
                    help="a .jsonl or .parquet file, a folder of them, or a hub id (needs `datasets`)")
    ap.add_argument("--variant", choices=list(VARIANTS), default="hh",
                    help="hh: helpfulness vs honesty; hht: + truthfulness")
    ap.add_argument("--conflict", type=float, default=1.0,
                    help="share of kept pairs that are conflicting (paper §4.3.2 uses 0.5, 0.75, 1.0)")
    ap.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    ap.add_argument("--seed", type=int, default=42, help="salt of the prompt split and the kept-pair choice")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip malformed rows (each is counted and listed) instead of stopping at the first")
    args = ap.parse_args(argv)
    try:
        cfg = UFConfig(variant=args.variant, conflict_rate=args.conflict, seed=args.seed, skip_bad=args.skip_bad)
    except ValueError as e:
        ap.error(str(e))
    try:
        pairs, summary = build_pairs(read_rows(args.src), cfg)
    except UltraFeedbackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = write_pairs(args.out, pairs)
    print(f"wrote {len(pairs)} pairs ({cfg.variant}, user types {', '.join(cfg.aspects)}) to {path}")
    for line in format_summary(summary, cfg.variant):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
