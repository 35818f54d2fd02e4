"""UltraFeedback → HH/HHT pairs, on tests/fixtures/ultrafeedback_*.jsonl (invented rows).

Fixture ratings per completion, (helpfulness, honesty, truthfulness), and what each row gives:

  row 1  (5,3,4) (3,5,4) (4,4,2) (2,2,5)   hh: conflict 01 02 12, agree 03 13 23
                                           hht: tie 01 (truth), conflict 02 03 12 13 23
  row 2  honesty is 4 for all four         hh and hht: 6 ties
  row 3  (4,2,3) (2,4,3) (3,3,1)           3 completions. hh: conflict 01 02 12; hht: tie 01, conflict 02 12
  row 4  (5,5,5) (4,NA,4) (3,3,3) (1,2,2)  pairs with completion 1 are N/A (3); 02 03 23 agree
  row 5  (2,5,NA) (5,1,5) (4,2,3) (3,3,1)  hh: 6 conflict (truthfulness unused);
                                           hht: 3 N/A (with 0), conflict 12 13 23
  row 6  (5,5,5) (4,4,4) (3,3,3) (2,2,2)   6 agree (one instruction_following is N/A: not inspected)
  row 7  (5,4,4) (5,3,3) (2,1,2) (1,1,1)   tie 01 (help) and 23 (hon); 4 agree
  row 8  (4,5,3) (5,4,4) (1,3,5) (3,1,2)   hh: conflict 01 23, agree 4; hht: conflict 01 02 12 23, agree 03 13

  hh:  45 candidates = 3 N/A + 8 ties + 14 conflicting + 20 agreeing
  hht: 45 candidates = 6 N/A + 10 ties + 14 conflicting + 15 agreeing
"""

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from core.data.pairs import SPLITS, load_pairs
from core.data.ultrafeedback import (PAPER_SPLIT_SIZES, UFConfig, UltraFeedbackError, build_pairs,
                                     conflict_counts, main, prompt_split, read_rows)

FIXTURES = Path(__file__).parent / "fixtures"
MINI = FIXTURES / "ultrafeedback_mini.jsonl"
BAD = FIXTURES / "ultrafeedback_bad.jsonl"

HH_IDS = {"uf-1-0-1", "uf-1-0-2", "uf-1-1-2", "uf-3-0-1", "uf-3-0-2", "uf-3-1-2", "uf-8-0-1", "uf-8-2-3"} \
    | {f"uf-5-{i}-{j}" for i in range(4) for j in range(i + 1, 4)}
HHT_IDS = {"uf-1-0-2", "uf-1-0-3", "uf-1-1-2", "uf-1-1-3", "uf-1-2-3", "uf-3-0-2", "uf-3-1-2",
           "uf-5-1-2", "uf-5-1-3", "uf-5-2-3", "uf-8-0-1", "uf-8-0-2", "uf-8-1-2", "uf-8-2-3"}


def mini_rows():
    return [json.loads(line) for line in MINI.read_text().splitlines()]


def located(rows, name="mem"):
    return [(f"{name}: row {k}", r) for k, r in enumerate(rows, start=1)]


def content(ps):
    """Pairs as a set of order-free tuples (ids and file order depend on row order)."""
    return {(ps.prompts[i], ps.a[i], ps.b[i], str(ps.split[i]), tuple(ps.choices[i].tolist()))
            for i in range(len(ps))}


@pytest.mark.parametrize("variant, ids, n_na, n_tie, n_conf, n_agree, na", [
    ("hh", HH_IDS, 3, 8, 14, 20, {"helpfulness": 0, "honesty": 1}),
    ("hht", HHT_IDS, 6, 10, 14, 15, {"helpfulness": 0, "honesty": 1, "truthfulness": 1}),
])
def test_fixture_counts_by_hand(variant, ids, n_na, n_tie, n_conf, n_agree, na):
    ps, s = build_pairs(read_rows(MINI), UFConfig(variant=variant))
    assert (s.rows_read, s.rows_used, s.bad_rows, s.completions) == (8, 8, [], 31)
    assert s.candidate_pairs == 45
    assert (s.dropped_na, s.dropped_tie) == (n_na, n_tie)
    assert sum(s.conflicting.values()) == n_conf and sum(s.agreeing.values()) == n_agree
    assert s.na_ratings == na
    assert set(ps.ids) == ids and len(ps) == len(ids)  # conflict rate 1.0 keeps exactly the conflicting pairs
    assert ps.user_types == list(UFConfig(variant=variant).aspects)
    assert ps.attribute_names == ps.user_types


def test_choices_and_ratings_of_one_pair():
    ps, _ = build_pairs(read_rows(MINI), UFConfig(variant="hh"))
    k = ps.ids.index("uf-1-0-1")  # row 1: a = (5, 3), b = (3, 5)
    assert ps.a[k].startswith("Give it the sunniest") and ps.b[k].startswith("Basil likes warmth")
    assert ps.choices[k].tolist() == [0.0, 1.0]  # helpfulness prefers a, honesty prefers b
    np.testing.assert_array_equal(ps.attributes[k], [[5, 3], [3, 5]])
    assert ps.prompts[k] == "How do I keep a pot of basil alive on a kitchen windowsill?"


@pytest.mark.parametrize("variant", ["hh", "hht"])
def test_ties_and_na_never_enter(variant):
    ps, _ = build_pairs(read_rows(MINI), UFConfig(variant=variant, conflict_rate=0.5))
    assert not (ps.attributes[:, 0] == ps.attributes[:, 1]).any()  # no tie on any used aspect
    assert not (ps.choices == 0.5).any()
    assert not any(i.startswith("uf-2-") for i in ps.ids)  # row 2: honesty tied everywhere
    assert not any(i in ("uf-4-0-1", "uf-4-1-2", "uf-4-1-3") for i in ps.ids)  # honesty N/A


def random_rows(n_rows=300, seed=0):
    """Invented rows with correlated random ratings (aspects mostly agree, as in UltraFeedback)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        comps = []
        for k in range(4):
            quality = int(rng.integers(1, 6))
            ann = {a: {"Rating": str(int(np.clip(quality + rng.integers(-1, 2), 1, 5)))}
                   for a in ("helpfulness", "honesty", "truthfulness")}
            comps.append({"response": f"answer {k} to question {r}", "annotations": ann})
        rows.append({"instruction": f"Invented question number {r}?", "completions": comps})
    return rows


@pytest.mark.parametrize("variant", ["hh", "hht"])
def test_conflict_rate_is_achieved_with_the_same_split_sizes(variant):
    rows = located(random_rows())
    sizes, prompt_splits = {}, {}
    for rate in (0.5, 0.75, 1.0):
        ps, s = build_pairs(rows, UFConfig(variant=variant, conflict_rate=rate))
        conflicting = (ps.choices != ps.choices[:, :1]).any(axis=1)  # the aspects do not all agree
        for split in SPLITS:
            rows_s = ps.indices(split)
            n_c = s.conflicting[split]
            assert s.agreeing[split] >= n_c  # enough agreeing pairs for any rate, so no split shrinks
            assert len(rows_s) == n_c
            assert conflicting[rows_s].sum() == int(np.floor(rate * n_c + 0.5))
            assert abs(conflicting[rows_s].mean() - rate) <= 1 / n_c
        assert not s.notes
        sizes[rate] = {sp: len(ps.indices(sp)) for sp in SPLITS}
        prompt_splits[rate] = {(ps.prompts[i], str(ps.split[i])) for i in range(len(ps))}
    assert sizes[0.5] == sizes[0.75] == sizes[1.0]
    for rate in prompt_splits:  # a prompt's split does not depend on the conflict rate
        assert all(s == prompt_split(p) for p, s in prompt_splits[rate])
    if variant == "hh":  # PairSet.conflicting agrees with the definition used here
        ps, _ = build_pairs(rows, UFConfig(variant="hh", conflict_rate=0.75))
        assert ps.conflicting("helpfulness", "honesty").sum() == (ps.choices[:, 0] != ps.choices[:, 1]).sum()


@pytest.mark.parametrize("n_conf, n_agree, rate, expected", [
    (10, 100, 1.0, (10, 0)),
    (10, 100, 0.5, (5, 5)),
    (10, 100, 0.75, (8, 2)),  # round(7.5) = 8
    (3, 100, 0.5, (2, 1)),  # round(1.5) = 2
    (10, 2, 0.5, (2, 2)),  # too few agreeing pairs: the total shrinks so the rate holds
    (10, 1, 0.75, (3, 1)),
    (10, 0, 0.5, (0, 0)),
    (10, 4, 0.0, (0, 4)),
    (0, 50, 0.5, (0, 0)),
])
def test_conflict_counts(n_conf, n_agree, rate, expected):
    assert conflict_counts(n_conf, n_agree, rate) == expected


def test_shortage_of_agreeing_pairs_is_reported():
    _, s = build_pairs(read_rows(MINI), UFConfig(variant="hht", conflict_rate=0.5))
    short = [sp for sp in SPLITS if s.agreeing[sp] < s.conflicting[sp] - int(np.floor(0.5 * s.conflicting[sp] + 0.5))]
    assert short  # the fixture's splits are small
    assert len(s.notes) == len(short) and all("agreeing pairs" in n for n in s.notes)
    for sp in SPLITS:
        k_c, k_a = s.kept_conflicting[sp], s.kept_agreeing[sp]
        assert k_a <= s.agreeing[sp] and k_c <= s.conflicting[sp]
        assert (k_c == k_a) if sp in short else (k_c == int(np.floor(0.5 * s.conflicting[sp] + 0.5)))
        assert (k_a == s.agreeing[sp]) if sp in short else (k_c + k_a == s.conflicting[sp])


def test_deterministic_and_independent_of_row_order(tmp_path):
    rows = random_rows(120, seed=3) + mini_rows()
    cfg = UFConfig(variant="hh", conflict_rate=0.75, seed=7)
    ps1, _ = build_pairs(located(rows), cfg)
    ps2, _ = build_pairs(located(rows), cfg)
    assert ps1.to_records() == ps2.to_records()
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    ps3, _ = build_pairs(located(shuffled), cfg)
    assert content(ps3) == content(ps1)
    ps4, _ = build_pairs(located(rows), UFConfig(variant="hh", conflict_rate=0.75, seed=8))
    assert content(ps4) != content(ps1)  # the seed does matter
    # the CLI writes byte-identical files
    for name in ("x.jsonl", "y.jsonl"):
        assert main(["--src", str(MINI), "--conflict", "0.5", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "x.jsonl").read_bytes() == (tmp_path / "y.jsonl").read_bytes()


def test_prompt_split_fractions_and_stability():
    prompts = [f"Invented prompt {k}: what should I do about thing {k * 7}?" for k in range(5000)]
    splits = [prompt_split(p) for p in prompts]
    frac = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert abs(frac["train"] - 0.8) < 0.025 and abs(frac["val"] - 0.1) < 0.02 and abs(frac["test"] - 0.1) < 0.02
    assert prompt_split("  Is 91 a prime number?\n") == prompt_split("Is 91 a prime number?")
    assert [prompt_split(p, seed=1) for p in prompts] != splits


def test_every_pair_of_a_prompt_shares_a_split():
    rows = random_rows(60)
    rows += [copy.deepcopy(rows[0])]  # a repeated instruction (as happens in UltraFeedback)
    ps, _ = build_pairs(located(rows), UFConfig(variant="hh", conflict_rate=0.5))
    by_prompt = {}
    for p, s in zip(ps.prompts, ps.split):
        by_prompt.setdefault(p, set()).add(str(s))
    assert all(len(v) == 1 for v in by_prompt.values())


def mutate(path, value=None, delete=False):
    def edit(row):
        obj = row
        for key in path[:-1]:
            obj = obj[key]
        if delete:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return edit


H = ("completions", 1, "annotations", "honesty")


@pytest.mark.parametrize("edit, field, problem", [
    (mutate(("instruction",), delete=True), "instruction", "missing field"),
    (mutate(("instruction",), None), "instruction", "missing (null)"),
    (mutate(("instruction",), 42), "instruction", "must be a string, got int"),
    (mutate(("instruction",), "   "), "instruction", "empty text"),
    (mutate(("completions",), delete=True), "completions", "missing field"),
    (mutate(("completions",), {"response": "x"}), "completions", "must be a list, got dict"),
    (mutate(("completions",), []), "completions", "has 0 completion(s); a pair needs at least 2"),
    (lambda r: r["completions"].__delitem__(slice(1, None)), "completions", "has 1 completion(s)"),
    (mutate(("completions", 2), "a string"), "completions[2]", "expected an object, got str"),
    (mutate(("completions", 1, "response"), delete=True), "completions[1].response", "missing field"),
    (mutate(("completions", 1, "response"), ["a", "list"]), "completions[1].response", "must be a string, got list"),
    (mutate(("completions", 1, "response"), ""), "completions[1].response", "empty text"),
    (mutate(("completions", 1, "annotations"), delete=True), "completions[1].annotations", "missing field"),
    (mutate(("completions", 1, "annotations"), "5"), "completions[1].annotations", "must be an object, got str"),
    (mutate(H, delete=True), "completions[1].annotations.honesty", "missing field"),
    (mutate(H, "5"), "completions[1].annotations.honesty", "must be an object with a 'Rating', got str"),
    (mutate(H + ("Rating",), delete=True), "completions[1].annotations.honesty.Rating", "missing field"),
    (mutate(H + ("Rating",), None), "completions[1].annotations.honesty.Rating", "missing (null)"),
    (mutate(H + ("Rating",), "excellent"), "completions[1].annotations.honesty.Rating", "'excellent' is neither"),
    (mutate(H + ("Rating",), "7"), "completions[1].annotations.honesty.Rating", "'7' is neither"),
    (mutate(H + ("Rating",), "0"), "completions[1].annotations.honesty.Rating", "'0' is neither"),
    (mutate(H + ("Rating",), 3.5), "completions[1].annotations.honesty.Rating", "3.5 (float) is neither"),
    (mutate(H + ("Rating",), True), "completions[1].annotations.honesty.Rating", "True (bool) is neither"),
    (mutate(H + ("Rating",), ["4"]), "completions[1].annotations.honesty.Rating", "(list) is neither"),
    (lambda r: r.clear() or r.update(x=1), "instruction", "missing field"),
])
def test_malformed_row_names_row_and_field(edit, field, problem):
    rows = mini_rows()
    edit(rows[2])  # the third row
    with pytest.raises(UltraFeedbackError) as e:
        build_pairs(located(rows, "fx"), UFConfig(variant="hh"))
    msg = str(e.value)
    assert msg.startswith(f"fx: row 3: {field}: ") and problem in msg and "--skip-bad" in msg
    # with skip_bad the row is skipped and counted, the rest is used
    ps, s = build_pairs(located(rows, "fx"), UFConfig(variant="hh", skip_bad=True))
    assert s.rows_read == 8 and s.rows_used == 7 and len(s.bad_rows) == 1
    assert s.bad_rows[0].startswith(f"fx: row 3: {field}: ")
    assert not any(i.startswith("uf-3-") for i in ps.ids)


def test_non_object_row_and_unused_aspects():
    rows = mini_rows()
    with pytest.raises(UltraFeedbackError, match=r"^fx: row 2: <row>: expected an object, got list"):
        build_pairs(located([rows[0], [1, 2]], "fx"), UFConfig())
    # truthfulness is not inspected for hh, but is required for hht
    del rows[0]["completions"][3]["annotations"]["truthfulness"]
    ps, _ = build_pairs(located(rows, "fx"), UFConfig(variant="hh"))
    assert "uf-1-0-1" in ps.ids
    with pytest.raises(UltraFeedbackError, match=r"fx: row 1: completions\[3\]\.annotations\.truthfulness: missing"):
        build_pairs(located(rows, "fx"), UFConfig(variant="hht"))


def test_integer_and_padded_ratings_are_accepted():
    rows = mini_rows()
    for c in rows[0]["completions"]:
        c["annotations"]["helpfulness"]["Rating"] = int(c["annotations"]["helpfulness"]["Rating"])
        c["annotations"]["honesty"]["Rating"] = f" {c['annotations']['honesty']['Rating']} "
    a, _ = build_pairs(located(rows), UFConfig())
    b, _ = build_pairs(read_rows(MINI), UFConfig())
    assert a.to_records() == b.to_records()


def test_jsonl_level_problems(tmp_path):
    good = MINI.read_text().splitlines()[0]
    for text, problem in [("{oops\n", "<row>: not JSON"), ("\n", "<row>: empty line")]:
        p = tmp_path / "src.jsonl"
        p.write_text(good + "\n" + text + good + "\n")
        with pytest.raises(UltraFeedbackError, match=f"src.jsonl: row 2: {problem}"):
            build_pairs(read_rows(p), UFConfig())


def test_bad_fixture_strict_and_skip_bad(capsys, tmp_path):
    out = tmp_path / "bad.jsonl"
    assert main(["--src", str(BAD), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ultrafeedback_bad.jsonl: row 2: instruction: missing field" in err and "--skip-bad" in err
    assert not out.exists()  # nothing written on error

    assert main(["--src", str(BAD), "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "rows: 7 read, 2 used, 5 skipped as malformed" in printed
    for where in ("row 2: instruction: missing field",
                  "row 3: completions[1].annotations.honesty.Rating: rating 'excellent'",
                  "row 4: completions: has 1 completion(s)",
                  "row 5: <row>: not JSON",
                  "row 6: completions: must be a list, got str"):
        assert where in printed
    ps = load_pairs(out)
    assert sorted(ps.ids) == ["uf-7-0-1", "uf-7-2-3"]  # row 1 only agrees; row 7 has two conflicting pairs


def test_cli_round_trip(capsys, tmp_path):
    out = tmp_path / "hh.jsonl"
    assert main(["--src", str(MINI), "--variant", "hh", "--conflict", "1.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ps = load_pairs(out)
    assert set(ps.ids) == HH_IDS
    assert ps.user_types == ["helpfulness", "honesty"] and ps.attribute_names == ["helpfulness", "honesty"]
    assert ps.conflicting("helpfulness", "honesty").all()
    assert f"wrote {len(HH_IDS)} pairs" in printed
    assert "45 candidates, 3 dropped (N/A rating), 8 dropped (tie" in printed
    for k, split in enumerate(SPLITS):  # our size next to the paper's
        line = next(l for l in printed.splitlines() if l.startswith(split + " "))
        assert line.split()[1] == str(len(ps.indices(split)))
        assert line.split()[-1] == f"{PAPER_SPLIT_SIZES['hh'][k]:,d}"
    ours, _ = build_pairs(read_rows(MINI), UFConfig())
    assert ps.to_records() == ours.to_records()


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--src", str(MINI), "--conflict", "1.5", "--out", str(tmp_path / "x.jsonl")])
    assert "conflict_rate must be in [0, 1]" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown variant"):
        UFConfig(variant="hhh")


def test_parquet_file_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = mini_rows()
    (tmp_path / "snap").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), tmp_path / "snap" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), tmp_path / "snap" / "train-00001-of-00002.parquet")
    (tmp_path / "mixed").mkdir()  # a snapshot folder: files are read in sorted path order
    (tmp_path / "mixed" / "a_first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "mixed" / "b_rest.parquet")
    want, _ = build_pairs(read_rows(MINI), UFConfig(variant="hht"))
    for src in (tmp_path / "uf.parquet", tmp_path / "snap", tmp_path / "mixed"):
        got, s = build_pairs(read_rows(src), UFConfig(variant="hht"))
        assert s.rows_read == 8
        assert got.to_records() == want.to_records()
    # errors name the parquet file and its row
    rows[3]["completions"][0]["annotations"]["honesty"]["Rating"] = "seven"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(UltraFeedbackError, match=r"bad\.parquet: row 4: completions\[0\]\.annotations\.honesty\.Rating"):
        build_pairs(read_rows(tmp_path / "bad.parquet"), UFConfig())
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(UltraFeedbackError, match="column 'instruction' missing"):
        build_pairs(read_rows(tmp_path / "other.parquet"), UFConfig())


def test_missing_optional_packages_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UltraFeedbackError, match="needs the `datasets` package"):
        read_rows("openbmb/UltraFeedback")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UltraFeedbackError, match="reading parquet needs pyarrow"):
        read_rows(tmp_path / "x.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UltraFeedbackError, match="folder holds no .jsonl or .parquet or .pq files"):
        read_rows(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UltraFeedbackError, match="unknown file type '.csv'"):
        read_rows(tmp_path / "x.csv")
