import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.bundle import BundleError, load_reward_bundle, read_manifest, save_bundle
from core.config import RunConfig, TrainConfig, load_run_config
from core.data.pairs import write_pairs
from core.data.synthetic import one_d_pairs
from core.data.tasks import TaskConfig
from core.evaluate import evaluate_reward
from core.train import train_reward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs():
    return one_d_pairs(4000, seed=0)


def small_run(steps=60, **train):
    train = {"lr": 3e-3, "warmup_steps": 10, "eval_every": 20, "val_tasks": 64, "batch_size": 32, **train}
    return RunConfig(train=TrainConfig(steps=steps, **train),
                     tasks=TaskConfig(n_targets=12, max_context=10), model={"d_hidden": 32})


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """Seconds-long runs of NP-BTL and BTL on the synthetic task."""
    out = tmp_path_factory.mktemp("bundles")
    for m in ("np-btl", "btl"):
        train_reward(pairs, m, out / m, small_run(250), quiet=True)
    return out


def test_short_training_beats_chance_and_the_user_blind_model(pairs, trained):
    emb = (torch.from_numpy(pairs.a), torch.from_numpy(pairs.b))
    np_model, meta = load_reward_bundle(trained / "np-btl")
    btl, _ = load_reward_bundle(trained / "btl")
    r_np = evaluate_reward(np_model, pairs, emb, "test", (0, 10), n_tasks=200, n_targets=12)
    r_btl = evaluate_reward(btl, pairs, emb, "test", (0, 10), n_tasks=200, n_targets=12)
    # a user-blind model tops out at 75 % here; context must lift NP-BTL well above it
    assert r_btl["overall"]["10"]["mean"] < 0.80
    assert r_np["overall"]["10"]["mean"] > 0.88
    assert r_np["overall"]["10"]["mean"] > r_np["overall"]["0"]["mean"] + 0.08
    assert meta["metrics"]["val_acc"] > 0.75
    assert set(r_np["accuracy"]) == {"up", "tent"}
    cell = r_np["accuracy"]["up"]["10"]
    assert cell["n"] == 200 * 2 and 0 <= cell["se"] < 0.05  # 12 targets - 10 context = 2 unseen each


def test_bundle_round_trip_is_exact(pairs, trained, tmp_path):
    model, meta = load_reward_bundle(trained / "np-btl")
    assert meta["kind"] == "reward" and meta["model"] == "np-btl"
    assert set(meta["files"]) == {"encoder.safetensors", "reward.safetensors"}
    from core.bundle import save_reward_bundle

    save_reward_bundle(tmp_path / "copy", model, {k: v for k, v in meta.items()
                                                  if k not in ("files", "format_version", "kind", "reward_config")})
    again, _ = load_reward_bundle(tmp_path / "copy")
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_tampered_or_incomplete_bundles_fail_clearly(trained, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(trained / "np-btl", b)
    data = bytearray((b / "reward.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (b / "reward.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"reward.safetensors does not match its sha256"):
        load_reward_bundle(b)

    (b / "reward.safetensors").unlink()
    with pytest.raises(BundleError, match=r"reward.safetensors is listed in bundle.json but missing"):
        load_reward_bundle(b)

    with pytest.raises(BundleError, match="not a bundle folder"):
        load_reward_bundle(tmp_path / "nowhere")

    # a bundle whose weights lack a key names the key (strict load)
    model, meta = load_reward_bundle(trained / "np-btl")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    state.pop("decoder.0.bias")
    enc = {k[8:]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    enc["surprise"] = torch.zeros(1)
    save_bundle(tmp_path / "c", {"kind": "reward", "reward_config": meta["reward_config"]},
                {"reward": state, "encoder": enc})
    with pytest.raises(BundleError, match=r"missing keys \['decoder.0.bias'\]; unexpected keys \['encoder.surprise'\]"):
        load_reward_bundle(tmp_path / "c")


def test_resume_after_interruption_matches_an_uninterrupted_run(pairs, tmp_path, monkeypatch):
    run = small_run(40, checkpoint_every=20)
    run.model = {"d_hidden": 16, "encoder": {"d_z": 4}}
    train_reward(pairs, "np-btl-latent", tmp_path / "full", run, quiet=True)

    from core.data import tasks

    real = tasks.TaskSampler.sample

    def boom(self, batch_index, batch_size, **kw):
        if batch_index == 27 and batch_size == 32:
            raise KeyboardInterrupt
        return real(self, batch_index, batch_size, **kw)

    monkeypatch.setattr(tasks.TaskSampler, "sample", boom)
    with pytest.raises(KeyboardInterrupt):
        train_reward(pairs, "np-btl-latent", tmp_path / "cut", run, quiet=True)
    assert read_manifest(tmp_path / "cut.ckpt")["step"] == 20
    monkeypatch.setattr(tasks.TaskSampler, "sample", real)
    train_reward(pairs, "np-btl-latent", tmp_path / "cut", run, quiet=True)
    assert not (tmp_path / "cut.ckpt").exists()

    a, _ = load_reward_bundle(tmp_path / "full")
    b, _ = load_reward_bundle(tmp_path / "cut")
    for (k, v1), v2 in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v1, v2), k


def interrupted_btl_run(pairs, out, monkeypatch):
    """Train BTL into `out` until batch 25 raises, leaving the step-20 checkpoint behind."""
    from core.data import tasks

    real = tasks.TaskSampler.sample

    def boom(self, batch_index, batch_size, **kw):
        if batch_index == 25:
            raise KeyboardInterrupt
        return real(self, batch_index, batch_size, **kw)

    monkeypatch.setattr(tasks.TaskSampler, "sample", boom)
    with pytest.raises(KeyboardInterrupt):
        train_reward(pairs, "btl", out, small_run(40, checkpoint_every=20), quiet=True)
    monkeypatch.setattr(tasks.TaskSampler, "sample", real)


def test_resume_refuses_a_checkpoint_from_another_config(pairs, tmp_path, monkeypatch):
    interrupted_btl_run(pairs, tmp_path / "x", monkeypatch)
    with pytest.raises(BundleError, match="different config or data"):
        train_reward(pairs, "btl", tmp_path / "x", small_run(40, checkpoint_every=20, lr=1e-2), quiet=True)


def test_a_reward_model_refuses_teacher_only_clicks(pairs, tmp_path):
    run = RunConfig(train=TrainConfig(steps=2), tasks=TaskConfig(n_targets=4, max_context=3, context_mode="disjoint",
                                                                  teacher_context=5))
    with pytest.raises(ValueError, match="teacher_context=5 is for a policy's teacher"):
        train_reward(pairs, "np-btl", tmp_path / "r", run, quiet=True)
    assert not (tmp_path / "r").exists()


def test_config_yaml_unknown_keys_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['learning_rate'\]"):
        load_run_config(p)
    p.write_text("train:\n  steps: 5\ntasks:\n  n_targets: 8\n  max_context: 4\n")
    run = load_run_config(p)
    assert run.train.steps == 5 and run.tasks.max_context == 4


def cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_train_then_evaluate(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", one_d_pairs(1500, seed=2))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 30\n  eval_every: 10\n  val_tasks: 32\n  batch_size: 16\n"
                   "tasks:\n  n_targets: 12\n  max_context: 10\nmodel:\n  d_hidden: 16\n")
    r = cli("-m", "core.train", "reward", "--pairs", str(data), "--model", "np-btl", "--out", str(tmp_path / "b"),
            "--config", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    r = cli("-m", "core.evaluate", "reward", "--bundle", str(tmp_path / "b"), "--pairs", str(data),
            "--split", "test", "--contexts", "0,1,3", "--tasks", "20", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["accuracy"]) == {"up", "tent"} and set(res["overall"]) == {"0", "1", "3"}
    cell = res["overall"]["3"]
    assert set(cell) >= {"mean", "se", "n"} and 0 <= cell["mean"] <= 1
    assert "N_C=3" in r.stdout and "overall" in r.stdout


def test_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "a": [1], "b": [2], "choices": {"u": 3}, "split": "train"}\n')
    r = cli("-m", "core.train", "reward", "--pairs", str(bad), "--model", "btl", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert f"{bad}:1: choices.u: choice 3 not in {{0, 1, 0.5}}" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    r = cli("-m", "core.evaluate", "reward", "--bundle", str(tmp_path / "none"), "--pairs", str(bad))
    assert r.returncode == 2 and "not a bundle folder" in r.stderr


def test_resume_refuses_a_checkpoint_from_other_data(pairs, tmp_path, monkeypatch):
    interrupted_btl_run(pairs, tmp_path / "x", monkeypatch)
    other = one_d_pairs(4000, seed=123)  # same shape, different data, no data_meta given
    with pytest.raises(BundleError, match="different config or data"):
        train_reward(other, "btl", tmp_path / "x", small_run(40, checkpoint_every=20), quiet=True)
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.ckpt").stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


def test_evaluate_cli_scores_a_text_reward_bundle(tmp_path, capsys):
    """Text options are embedded for the reward CLI with the embedder the bundle records (the
    shipped persona reward: MiniLM + style features), or with --embedder for a bundle that does
    not record one, and an error that says so without it. A cache of another embedder, or an
    embedder of the wrong width, is refused. The shipped model must beat chance clearly at N_C = 10."""
    import shutil

    from core.evaluate import main as evaluate_main

    shipped, pairs = ROOT / "assets/models/persona-tiny/reward", ROOT / "assets/data/persona-small.jsonl"
    out = tmp_path / "e.json"

    def args(bundle):
        return ["reward", "--bundle", str(bundle), "--pairs", str(pairs), "--split", "test", "--contexts", "0,10",
                "--tasks", "40", "--targets", "11", "--context-mode", "subset", "--json", str(out)]

    assert json.loads((shipped / "bundle.json").read_text())["embedder"]["spec"] == "minilm+style"
    cache = tmp_path / "minilm-style.safetensors"
    assert evaluate_main(args(shipped) + ["--embed-cache", str(cache)]) == 0
    res = json.loads(out.read_text())
    assert cache.is_file() and set(res["overall"]) == {"0", "10"}
    assert res["overall"]["10"]["mean"] > res["overall"]["0"]["mean"] + 0.15
    out.unlink()
    bare = tmp_path / "bare"  # the same reward, trained (say) from precomputed vectors: no record
    shutil.copytree(shipped, bare)
    meta = json.loads((bare / "bundle.json").read_text())
    del meta["embedder"]
    (bare / "bundle.json").write_text(json.dumps(meta))
    assert evaluate_main(args(bare)) == 2
    assert "does not record how its options were embedded" in capsys.readouterr().err and not out.exists()
    assert evaluate_main(args(bare) + ["--embedder", "base"]) == 2
    assert "for policies" in capsys.readouterr().err
    assert evaluate_main(args(bare) + ["--embedder", "minilm", "--embed-cache", str(tmp_path / "m.safetensors")]) == 2
    assert "396" in capsys.readouterr().err and not out.exists()  # 384-d vectors for a 396-d model
    assert evaluate_main(args(bare) + ["--embedder", "minilm+style", "--embed-cache", str(tmp_path / "m.safetensors")]) == 2
    assert "cache is for 'all-minilm-l6-v2'" in capsys.readouterr().err  # a cache of the other embedder
    assert evaluate_main(args(bare) + ["--embedder", "minilm+style", "--embed-cache", str(cache)]) == 0
    assert json.loads(out.read_text())["overall"] == res["overall"]
