"""The experiment CLIs run end to end (quick mode: the pipeline, not the numbers) and write
valid JSON and plotly figures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.data.synthetic import bayes_error_one_pair, conflict_rate, gaussian_pairs, one_d_pairs
from core.experiments import figures as F

ROOT = Path(__file__).resolve().parents[1]


def figures_in(html: str) -> list[dict]:
    """Recover the figure specs from the page's Plotly.newPlot calls and validate them with plotly."""
    import plotly.graph_objects as go

    decoder = json.JSONDecoder()
    figs, pos = [], 0
    while (i := html.find("Plotly.newPlot('fig", pos)) != -1:
        j = html.index(", ", i) + 2
        data, k = decoder.raw_decode(html, j)
        layout, k = decoder.raw_decode(html, k + 2)
        figs.append(go.Figure({"data": data, "layout": layout}))  # raises on any invalid property
        pos = k
    return figs


@pytest.mark.parametrize("name, n_figs", [("synthetic", 4), ("identifiability", 1)])
def test_experiment_cli_quick(tmp_path, name, n_figs):
    r = subprocess.run([sys.executable, "-m", "core.experiments", name, "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / f"{name}.json").read_text())
    html = (tmp_path / f"{name}.html").read_text()
    assert "<script>" in html and len(html) > 1_000_000  # plotly.js inlined: works offline
    figs = figures_in(html)
    assert len(figs) == n_figs and all(len(f.data) > 0 for f in figs)
    assert "targets" in res
    if name == "synthetic":
        assert set(res["domains"]) == {"U[0,1]", "U[-1,1]"}
        acc = res["domains"]["U[0,1]"]["accuracy"]
        assert set(acc) == {"btl", "dpl", "np-btl", "np-btl-latent"}
        assert set(acc["np-btl"]["overall"]) == {"0", "1", "3", "5", "10"}
        assert abs(res["domains"]["U[0,1]"]["user_blind_ceiling"] - 0.75) < 0.02
        curves = res["domains"]["U[0,1]"]["curves"]
        assert set(curves["models"]["np-btl"]) == {"up", "tent"}
    else:
        assert set(res["runs"]) == {"-1.00", "-0.70", "+0.00", "+0.70"}
        cell = res["runs"]["+0.00"]["test"]["+0.00"]
        assert cell["bayes"] == pytest.approx(0.25)


def test_synthetic_generators_match_the_paper():
    ps = one_d_pairs(40_000, (0.0, 1.0), seed=1)
    assert ps.conflicting("up", "tent").mean() == pytest.approx(0.5, abs=0.01)  # half conflict on U[0,1]^2
    assert {str(s) for s in ps.split} == {"train", "val", "test"}
    for rho in (-1.0, -0.7, 0.0, 0.7):
        g = gaussian_pairs(40_000, rho, seed=2)
        assert g.conflicting("h0", "h1").mean() == pytest.approx(conflict_rate(rho), abs=0.01)
    assert bayes_error_one_pair(-1.0) == pytest.approx(0.0)
    assert bayes_error_one_pair(0.7) == pytest.approx(0.3734, abs=1e-3)


def test_figure_helpers_build_valid_plotly(tmp_path):
    import plotly.graph_objects as go

    fig = F.figure([F.line([0, 1], [1, 2], "a", error=[0.1, 0.1]), F.band([0, 1], [0, 1], [2, 3], "b")],
                   "t", "x", "y")
    go.Figure(fig)
    p = F.write_html(tmp_path / "f.html", [fig], "title <&>", "notes")
    assert "title &lt;&amp;&gt;" in p.read_text()


def test_steering_cli_quick_on_the_shipped_tiny_bundle(tmp_path):
    """The persona steering experiment runs end to end on the shipped tiny bundle, with the
    bundle's own embedder and seeded sampling; every target is checked and reported."""
    out = tmp_path / "steer.json"
    cmd = [sys.executable, "-m", "core.experiments", "steering", "--bundle", str(ROOT / "assets/models/persona-tiny"),
           "--json", str(out), "--quick", "--decoding", "sample", "--temperature", "0.7"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rp = json.loads((ROOT / "assets/models/persona-tiny/bundle.json").read_text())["decoding"]["repetition_penalty"]
    assert res["generation"]["decoding"] == f"sample T=0.7 top-p 0.95, repetition penalty {rp}"  # the bundle's, as in the demo
    assert res["generation"]["repetition_penalty"] == rp and res["generation"]["no_repeat_ngram"] == 0
    assert set(res["reward"]["accuracy"]["busy executive"]) == {"0", "1", "5"}
    assert len(res["targets"]) == 9 and all("met" in v for v in res["targets"].values())
    figs = figures_in(out.with_suffix(".html").read_text())
    assert len(figs) >= 3
    g = res["generation"]
    assert g["columns"] == ["verbosity", "tone", "words", "repetition", "looping"]
    rows = [json.loads(x) for x in Path(g["texts"]).read_text().splitlines()]  # every generated text, scored
    assert {r["condition"] for r in rows} >= {"steered", "wrong", "baseline"}
    base = [r for r in rows if r["condition"] == "baseline"]
    assert len(base) == g["seeds"] * g["prompts_per_seed"]
    assert abs(np.mean([r["words"] for r in base]) - g["baseline"]["words"]["mean"]) < 1e-6
    assert all(r["looping"] == float(r["repetition"] > 0.3) for r in rows)
    from core.experiments.steering import texts_main, texts_summary

    table = texts_summary(rows)  # rescoring reproduces the run's own means
    assert table["baseline"]["n"] == len(base) and abs(table["baseline"]["tone"] - g["baseline"]["tone"]["mean"]) < 1e-6
    n_long = sum(len(r["text"]) >= 300 for r in base)
    assert table["baseline"]["n_long"] == n_long and np.isnan(table["baseline"]["compression"]) == (n_long == 0)
    assert texts_main([g["texts"]]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"condition": "baseline", "text": 3}\n')
    assert texts_main([str(bad)]) == 2
    again = tmp_path / "again.json"
    r = subprocess.run(cmd[:-6] + [str(again), "--quick", "--parts", "generation", "--decoding", "sample",
                                   "--temperature", "0.7"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(again.read_text())["generation"]["examples"] == res["generation"]["examples"]  # seeded
    plain = tmp_path / "plain.json"
    r = subprocess.run(cmd[:-6] + [str(plain), "--quick", "--parts", "generation", "--repetition-penalty", "1",
                                   "--no-repeat-ngram", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    g = json.loads(plain.read_text())["generation"]  # flags override the bundle's settings
    assert g["decoding"] == "greedy, no repeated 3-grams" and g["repetition_penalty"] == 1.0 and g["no_repeat_ngram"] == 3


def test_selection_cli_on_the_shipped_tiny_bundle(tmp_path):
    """random vs informative next pairs: tables printed, JSON written; bad input named, nothing written."""
    out = tmp_path / "sel.json"
    cmd = [sys.executable, "-m", "core.experiments", "selection", "--bundle", str(ROOT / "assets/models/persona-tiny"),
           "--clicks", "1,3", "--seeds", "1", "--edge-users", "2"]
    r = subprocess.run(cmd + ["--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert all(f"users: {g}" in r.stdout for g in ("archetype", "edge", "all"))
    res = json.loads(out.read_text())
    assert res["config"]["clicks"] == [1, 3] and len(res["cells"]) == 2 * 3 * 2
    assert all(0 <= c["accuracy"]["mean"] <= 1 and c["map_error"]["mean"] >= 0 for c in res["cells"])
    bad = subprocess.run(cmd[:-6] + ["--clicks", "0,3", "--json", str(tmp_path / "no.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "clicks must be whole numbers" in bad.stderr and not (tmp_path / "no.json").exists()


def test_steering_contexts_flag_scores_the_same_tasks_at_fewer_click_counts(tmp_path, capsys):
    """--contexts 10 scores exactly the N_C = 10 cells of a run over more click counts with the same
    seed (the tasks depend on the seed and batch only; NP-DPO's score is deterministic, NP-BTL's
    Monte Carlo draws are not shared between cells), and bad values are named, nothing written."""
    from core.experiments.steering import main, parse_whole_numbers

    base = ["--bundle", str(ROOT / "assets/models/persona-tiny"), "--parts", "policy", "--policy-tasks", "3",
            "--seed", "3"]
    assert main(base + ["--json", str(tmp_path / "one.json"), "--contexts", "10"]) == 0
    assert main(base + ["--json", str(tmp_path / "two.json"), "--contexts", "10,0"]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["config"]["contexts"] == [10] and two["config"]["contexts"] == [0, 10]
    assert set(one["policy"]["accuracy"]) == set(two["policy"]["accuracy"]) >= {"busy executive", "continuous"}
    for u, cells in one["policy"]["accuracy"].items():
        assert set(cells) == {"10"} and cells["10"] == two["policy"]["accuracy"][u]["10"]
    assert one["policy"]["conflict_sum"] == {k: {"10": v["10"]} for k, v in two["policy"]["conflict_sum"].items()}
    assert "N_C=10" in next(iter(one["targets"]))  # targets are checked at the largest N_C scored
    # the misses breakdown scores the same tasks pair by pair: its per-task means are the policy's cells
    from core.experiments.misses import main as misses_main

    m_out = tmp_path / "misses.json"
    assert misses_main(["--bundle", base[1], "--json", str(m_out), "--seeds", "3", "--tasks", "3",
                        "--users", "busy executive,friendly tutor"]) == 0
    mres = json.loads(m_out.read_text())["users"]
    for u in ("busy executive", "friendly tutor"):
        cell = one["policy"]["accuracy"][u]["10"]
        assert mres[u]["policy"]["task_mean"] == pytest.approx(cell["mean"]) and mres[u]["policy"]["n"] == cell["n"]
        assert 0 <= mres[u]["reward"]["accuracy"] <= 1 and mres[u]["tasks"] == 3
    recs = [json.loads(x) for x in m_out.with_suffix(".pairs.jsonl").read_text().splitlines()]
    assert len(recs) == sum(mres[u]["pairs"] for u in mres) and all(r["choice"] != 0.5 for r in recs)
    assert misses_main(["--bundle", base[1], "--json", str(tmp_path / "no.json"), "--users", "night owl"]) == 2
    assert "unknown user(s) ['night owl']" in capsys.readouterr().err
    for flag, bad in [("--seeds", "1,1"), ("--models", "reward,dpo")]:
        with pytest.raises(SystemExit):
            misses_main(["--bundle", base[1], "--json", str(tmp_path / "no.json"), flag, bad])
        assert flag in capsys.readouterr().err
    assert parse_whole_numbers(" 5, 0,10 ", "--contexts") == (0, 5, 10)
    for bad, msg in [("1,x", "distinct whole numbers"), ("3,3", "distinct whole numbers"), ("-1", "distinct whole numbers"),
                     (",", "distinct whole numbers")]:
        with pytest.raises(SystemExit) as e:
            main(base + ["--json", str(tmp_path / "no.json"), "--contexts", bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base[:2] + ["--parts", "generation", "--json", str(tmp_path / "no.json"), "--contexts", "0,10"])
    assert "include it in --contexts" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


def test_misses_breakdown_closed_form():
    """The breakdown's counts on hand-made pairs of a terse + formal user (w = (-1, -1))."""
    from core.experiments.misses import breakdown

    def rec(task, delta, choice, p, logit):
        d_ = [-x for x in delta]  # w_i * delta_i
        return {"user": "busy executive", "task": task, "choice": choice, "d": sum(d_), "contrib": d_,
                "delta": delta, "reward_p": p, "policy_logit": logit}

    records = [
        rec(0, [-1.0, -1.0], 1.0, 0.9, 2.0),   # b shorter and more formal: axes agree, d = 2; both right
        rec(0, [1.0, -0.2], 0.0, 0.2, 1.0),    # b longer but formal: pull apart, d = -0.8; policy wrong (prefers longer b)
        rec(1, [0.1, -0.3], 1.0, 0.4, 0.5),    # pull apart, d = 0.2; reward wrong (prefers a)
        rec(1, [0.5, 0.5], 1.0, 0.1, -1.0),    # axes agree, d = -1, yet b chosen (BTL noise): both "wrong"
    ]
    out = breakdown(records, ("verbosity", "tone"), margins=(0.5,))["busy executive"]
    assert out["pairs"] == 4 and out["tasks"] == 2
    assert out["label_ceiling"] == {"n": 4, "accuracy": 0.75}  # the last choice goes against the utility
    assert out["axes_conflict_share"] == 0.5
    r, pol = out["reward"], out["policy"]
    assert r["accuracy"] == 0.5 and r["task_mean"] == 0.5 and r["axes_agree"] == {"n": 2, "accuracy": 0.5}
    assert pol["accuracy"] == 0.5 and pol["task_mean"] == 0.5 and pol["axes_conflict"] == {"n": 2, "accuracy": 0.5}
    assert pol["margin"]["[0, 0.5)"] == {"n": 1, "accuracy": 1.0} and pol["margin"]["[0.5, inf)"]["n"] == 3
    assert pol["agrees_with_utility"] == 0.75  # only the second pair's pick goes against d
    # policy's mistakes: pair 2 (preferred b: longer, more formal) and pair 4 (preferred a: shorter, more formal)
    assert pol["mistakes"] == {"n": 2, "preferred higher verbosity": 0.5, "preferred higher tone": 0.0}
    assert out["models_agree"] == 0.5


def test_feature_probe_recovers_linear_attributes_and_flags_unreadable_ones():
    """Attributes that are linear in the features give R² ≈ 1 and full sign agreement; an attribute
    the features don't carry gives R² ≈ 0 and a coin flip for a user who only cares about it."""
    from core.experiments.misses import feature_probe

    rng = np.random.default_rng(0)
    B = rng.normal(size=(6, 1))  # (D, 1)
    x, y = {}, {}
    for split, n in (("train", 3000), ("val", 500), ("test", 2000)):
        x[split] = rng.normal(size=(n, 2, 6))  # (n, 2, D)
        readable = x[split] @ B  # (n, 2, 1)
        hidden = rng.normal(size=(n, 2, 1))  # independent of x
        y[split] = np.concatenate([readable, hidden], -1)  # (n, 2, 2)
    out = feature_probe(x, y, {"reads": (1.0, 0.0), "hidden": (0.0, 1.0)}, ("a", "b"))
    assert out["test_r2"]["a"] > 0.999 and abs(out["test_r2"]["b"]) < 0.02
    assert out["sign_agreement"]["reads"] > 0.995 and abs(out["sign_agreement"]["hidden"] - 0.5) < 0.05
    assert out["lambda"] in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0) and out["options"]["test"] == 4000
