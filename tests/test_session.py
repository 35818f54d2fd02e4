"""core.session on the shipped persona-tiny bundle (reward model, map and pool only: fast)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import personas as P
from core.persona import load_persona_bundle
from core.session import MAX_PROFILE_BYTES, Engine, SessionError, SessionState

TINY = Path(__file__).resolve().parent.parent / "assets" / "models" / "persona-tiny"
pytestmark = pytest.mark.skipif(not (TINY / "bundle.json").is_file(), reason="assets/models/persona-tiny not built")


@pytest.fixture(scope="module")
def engine():
    return Engine.from_bundle(load_persona_bundle(TINY, policy=False, dpo=False))


def _autopilot(engine, weights, n, mode="informative", seed=0):
    s = SessionState(mode=mode, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        s = engine.next_pair(s)
        s = engine.choose(s, engine.simulate_choice(s, weights, rng=rng))
    return s


def test_empty_session_is_the_prior(engine):
    lat = engine.latent(SessionState())
    assert lat["n_clicks"] == 0 and lat["accuracy"] is None and len(lat["trajectory"]) == 1
    prior = engine.reward.encoder.prior(1)
    np.testing.assert_allclose(lat["z"], prior.mean[0].detach().numpy(), atol=1e-6)
    cov = np.asarray(lat["cov"])
    assert cov.shape == (2, 2) and np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0


def test_clicks_move_the_posterior_and_shrink_it(engine):
    s = _autopilot(engine, P.ARCHETYPES["friendly tutor"], 10)
    lat = engine.latent(s)
    assert lat["n_clicks"] == 10 and len(lat["trajectory"]) == 11 and len(lat["running_accuracy"]) == 10
    # the posterior after clicks is tighter than the prior
    assert np.trace(lat["cov"]) < np.trace(lat["trajectory_cov"][0])
    # the trajectory's last point is the current posterior
    assert lat["trajectory"][-1][:2] == pytest.approx([lat["map"]["x"], lat["map"]["y"]])
    # each click's recorded probability is the model's belief *before* that click
    before = SessionState(clicks=s.clicks[:4], current=s.clicks[4]["pair"])
    p_b = float(engine.p_b(before, [s.clicks[4]["pair"]])[0])
    want = p_b if s.clicks[4]["choice"] == "B" else 1 - p_b
    assert s.clicks[4]["p_choice"] == pytest.approx(want, abs=1e-6)


def test_opposite_autopilots_end_in_opposite_corners(engine):
    ends = {}
    for name in ("busy executive", "friendly tutor", "thorough analyst", "casual texter"):
        lat = engine.latent(_autopilot(engine, P.ARCHETYPES[name], 12))
        ends[name] = np.array([lat["map"]["x"], lat["map"]["y"]])
        assert np.all(np.sign(ends[name]) == np.sign(P.ARCHETYPES[name])), (name, ends[name])
    assert np.linalg.norm(ends["busy executive"] - ends["friendly tutor"]) > 1.0


def test_skip_does_not_change_the_posterior_and_undo_restores(engine):
    s = _autopilot(engine, P.ARCHETYPES["busy executive"], 3)
    s = engine.next_pair(s)
    z_before = engine.z_of(s)
    on_screen = s.current
    s2 = engine.choose(s, "skip")
    assert torch.allclose(engine.z_of(s2), z_before) and s2.clicks[-1]["p_choice"] is None
    assert engine.latent(s2)["n_skipped"] == 1
    s3 = engine.undo(s2)
    assert s3.current == on_screen and s3.clicks == s.clicks
    with pytest.raises(SessionError, match="nothing to undo"):
        engine.undo(SessionState())


def test_next_pair_never_repeats_and_modes(engine):
    s = SessionState(mode="random", seed=3)
    seen = set()
    for _ in range(25):
        s = engine.next_pair(s)
        assert s.current not in seen
        seen.add(s.current)
        s = engine.choose(s, "A")
    # reproducible by seed
    a = engine.next_pair(SessionState(mode="random", seed=5)).current
    assert a == engine.next_pair(SessionState(mode="random", seed=5)).current
    with pytest.raises(SessionError, match="mode"):
        engine.next_pair(SessionState(), mode="clever")


def test_informative_pairs_are_the_most_uncertain(engine):
    s = _autopilot(engine, P.ARCHETYPES["thorough analyst"], 4)
    nxt = engine.next_pair(s, "informative")
    ps = engine.p_b(s, samples=True)  # (S, P)
    ent = lambda p: -(p * np.log(p + 1e-9) + (1 - p) * np.log(1 - p + 1e-9))  # noqa: E731
    info = ent(ps.mean(0)) - ent(ps).mean(0)
    left = engine.candidates(s)
    assert info[nxt.current] >= info[left].max() - 1e-6


def test_informative_selection_learns_faster_than_random(engine):
    """Mean map error after 6 clicks over several simulated users: informative <= random."""
    errs = {"random": [], "informative": []}
    for mode in errs:
        for seed in range(6):
            for name, w in P.ARCHETYPES.items():
                lat = engine.latent(_autopilot(engine, w, 6, mode=mode, seed=seed))
                errs[mode].append(np.hypot(lat["map"]["x"] - w[0], lat["map"]["y"] - w[1]))
    assert np.mean(errs["informative"]) <= np.mean(errs["random"]) + 0.02, {k: np.mean(v) for k, v in errs.items()}


def test_bad_clicks_change_nothing(engine):
    s = SessionState()
    with pytest.raises(SessionError, match="next pair first"):
        engine.choose(s, "A")
    s = engine.next_pair(s)
    with pytest.raises(SessionError, match="choice must be"):
        engine.choose(s, "C")
    with pytest.raises(SessionError, match="next pair first"):
        engine.pair_view(SessionState())
    v = engine.pair_view(s)
    assert set(v) == {"pair_id", "prompt", "a", "b", "p_a"} and 0 < v["p_a"] < 1


def test_manual_point_round_trips_through_the_map(engine):
    z = engine.z_at([0.5, -0.5])
    np.testing.assert_allclose(engine.map(z.double().numpy()), [0.5, -0.5], atol=1e-5)
    with pytest.raises(SessionError, match="finite"):
        engine.z_at([float("nan"), 0.0])
    with pytest.raises(SessionError, match="2 finite"):
        engine.z_at([0.1])


def test_profile_round_trip(engine):
    s = _autopilot(engine, P.ARCHETYPES["casual texter"], 5)
    s = engine.choose(engine.next_pair(s), "skip")
    prof = engine.export_profile(s, "persona-tiny")
    back = engine.import_profile(json.dumps(prof))
    assert [c["pair"] for c in back.clicks] == [c["pair"] for c in s.clicks]
    assert [c["choice"] for c in back.clicks] == [c["choice"] for c in s.clicks]
    np.testing.assert_allclose([c["p_choice"] or 0 for c in back.clicks], [c["p_choice"] or 0 for c in s.clicks], atol=1e-6)
    assert engine.latent(back)["map"] == pytest.approx(engine.latent(s)["map"])


@pytest.mark.parametrize("bad, msg", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"format": "x"}), "format"),
    (json.dumps({"format": "few-shot-alignment-profile", "version": 9, "clicks": []}), "version"),
    (json.dumps({"format": "few-shot-alignment-profile", "version": 1, "clicks": {}}), "must be a list"),
    (json.dumps({"format": "few-shot-alignment-profile", "version": 1, "clicks": [{"pair_id": "nope", "choice": "A"}]}),
     "not in this model's pool"),
    (json.dumps({"format": "few-shot-alignment-profile", "version": 1, "clicks": [{"pair_id": 3, "choice": "A"}]}),
     "not in this model's pool"),
    (json.dumps({"format": "few-shot-alignment-profile", "version": 1, "mode": "x", "clicks": []}), "mode"),
    ("x" * (MAX_PROFILE_BYTES + 1), "limit"),
])
def test_bad_profiles_are_refused(engine, bad, msg):
    with pytest.raises(SessionError, match=msg):
        engine.import_profile(bad)


def test_bad_click_choice_in_profile(engine):
    pid = engine.pool[0]["id"]
    bad = {"format": "few-shot-alignment-profile", "version": 1, "clicks": [{"pair_id": pid, "choice": "maybe"}]}
    with pytest.raises(SessionError, match="choice must be"):
        engine.import_profile(bad)
    bad["clicks"] = [{"pair_id": pid, "choice": "A", "extra": 1}]
    with pytest.raises(SessionError, match="only"):
        engine.import_profile(bad)


def test_state_dict_round_trip(engine):
    s = _autopilot(engine, P.ARCHETYPES["busy executive"], 3)
    back = SessionState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert SessionState.from_dict(None) == SessionState()


def test_posterior_cache_is_exact_bounded_and_not_shared_by_reference(engine):
    s = _autopilot(engine, P.ARCHETYPES["casual texter"], 6, seed=3)
    ans = s.answered
    mean, std = engine._posteriors(s.clicks)
    fresh = engine._encode(ans, [len(ans)])
    torch.testing.assert_close(mean, fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(std, fresh[1], rtol=0, atol=0)
    # the trajectory from cached prefixes equals one batched pass over all prefixes
    pm, ps = engine._posteriors(s.clicks, prefixes=True)
    bm, bs = engine._encode(ans, list(range(len(ans) + 1)))
    assert pm.shape == (len(ans) + 1, bm.shape[1])
    torch.testing.assert_close(pm, bm, rtol=0, atol=1e-5)
    torch.testing.assert_close(ps, bs, rtol=0, atol=1e-5)
    # skips do not change the key: the same answered clicks give the same posterior object
    skipped = SessionState(clicks=[*s.clicks, {"pair": 0, "choice": "skip", "p_choice": None}])
    assert engine._posteriors(skipped.clicks)[0] is engine._posteriors(s.clicks)[0]
    # another order of the same clicks is another context: its own entry
    rev = list(reversed(s.clicks))
    assert engine._posteriors(rev)[0] is not engine._posteriors(s.clicks)[0]
    # z_of hands out a copy, so a caller that writes into it cannot change what others get
    z = engine.z_of(s)
    z += 100.0
    assert torch.allclose(engine.z_of(s), fresh[0][0])
    # a cold trajectory is one batched pass that fills every prefix; the cache stays bounded
    small = Engine(engine.reward, engine.map, engine.pool, (engine.emb_a, engine.emb_b), cache_size=4)
    cm, _ = small._posteriors(s.clicks, prefixes=True)
    torch.testing.assert_close(cm, bm, rtol=0, atol=0)  # the same batch as above
    seqs = [tuple((c["pair"], c["choice"]) for c in ans[:k]) for k in range(len(ans) + 1)]
    assert list(small._cache) == seqs[-4:]  # the oldest entries went first


def test_cached_option_features_give_the_reward_heads_own_predictions(engine):
    s = _autopilot(engine, P.ARCHETYPES["thorough analyst"], 5, seed=1)
    fast = engine.p_b(s, None, samples=True)  # (S, R) through the per-pool features
    mean, std = engine._posteriors(s.clicks)
    g = torch.Generator().manual_seed(1234)
    z = mean + std * torch.randn(engine.n_samples, *mean.shape[1:], generator=g)
    with torch.no_grad():
        ref = torch.sigmoid(engine.reward.reward(engine.emb_b[None], z) - engine.reward.reward(engine.emb_a[None], z))
    assert engine._feats is not None and fast.shape == tuple(ref.shape)
    np.testing.assert_allclose(fast, ref.numpy(), atol=1e-5)


def test_selection_run_measures_what_the_demo_shows(engine):
    """core.experiments.selection: its cells are the demo's own sessions, re-measured here by hand."""
    from core.experiments.selection import SelectionConfig, format_table, run_selection, session_curve

    cfg = SelectionConfig(clicks=[6, 2], seeds=2, edge_users=1)
    assert cfg.clicks == [2, 6]
    res = run_selection(engine, cfg)
    cells = {(c["mode"], c["users"], c["clicks"]): c for c in res["cells"]}
    assert len(cells) == 2 * 3 * 2 and cells[("random", "archetype", 6)]["map_error"]["n"] == 4 * 2
    assert cells[("informative", "all", 2)]["accuracy"]["n"] == 5 * 2
    # one archetype session by hand: the map point the demo shows and the held-out sign agreement
    w = np.asarray(P.ARCHETYPES["casual texter"])
    s = _autopilot(engine, w, 6, mode="informative", seed=1)
    lat = engine.latent(s)
    u = np.array([w @ [r["attributes"]["b"][a] - r["attributes"]["a"][a] for a in engine.axes] for r in engine.pool])
    seen = {c["pair"] for c in s.clicks}
    keep = [i for i in range(len(u)) if i not in seen and u[i] != 0]
    acc = np.mean((engine.p_b(s)[keep] > 0.5) == (u[keep] > 0))
    got = session_curve(engine, w, "informative", 1, [6])[6]
    assert got["map_error"] == pytest.approx(np.hypot(lat["map"]["x"] - w[0], lat["map"]["y"] - w[1]))
    assert got["accuracy"] == pytest.approx(acc)
    # the informative rule predicts unseen clicks better after 6 clicks (its point on the map aside: README)
    assert cells[("informative", "archetype", 6)]["accuracy"]["mean"] > cells[("random", "archetype", 6)]["accuracy"]["mean"]
    table = format_table(res, "archetype")
    assert [ln.split(" | ")[0] for ln in table.splitlines()[3:]] == ["| 2", "| 6"] and "held-out acc., informative" in table
    with pytest.raises(ValueError, match="clicks"):
        SelectionConfig(clicks=[0])
