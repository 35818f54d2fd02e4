"""Two processes give the run of one: `accelerate launch` with 2 CPU processes (gloo) against a
single process with the same global batch, for a tiny NP-BTL and a tiny NP-DPO (Qwen2-family
base built from scratch, FiLM + LoRA, gradient checkpointing, context embeddings from the base),
under DDP and under accelerate's FSDP2 preparation (tests/fsdp_cpu.py). The DDP policy run stops
after step 4 and resumes from the checkpoint process 0 wrote.

accelerate's `--cpu` launcher starts one process unless it is given an MPI hostfile, so the
processes are started with `--multi_gpu` (torchrun) and the GPUs hidden: each process's
Accelerator then runs on the CPU over gloo. Every run records how many processes it had.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.bundle import load_policy_bundle, load_reward_bundle, read_manifest
from core.config import read_config_file, split_job
from core.data.pairs import write_pairs
from core.data.synthetic import one_d_pairs
from core.data.tasks import TaskConfig, TaskSampler
from core.reward import config_from_dict
from core.tinylm import tiny_model, train_tokenizer
from core.train import _job, _rank_share, build_parser, policy_config
from core.train import main as train_main
from tests.test_policy import TOPICS, _answers, toy_pairs

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rel=1e-4, abs=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2(*args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m core.train ARGS` (or of `script ARGS`) on 2 CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           *(["-m", "core.train"] if script is None else [str(script)]), *args, "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for ha, hb in zip(a, b):
        assert set(ha) == set(hb)
        for k in ha:
            assert ha[k] == pytest.approx(hb[k], **TOL), (ha["step"], k)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# Adam at lr 0.03 turns rounding differences (the order of a sum) into weight differences of
# ~1e-3 after a few steps: one process on 1 thread vs 2 threads differs by 4e-4. Losses and
# metrics still agree to 1e-4; weights are compared at the level Adam's rounding allows.
ADAM_TOL = dict(rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_reward_two_processes_match_one(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", one_d_pairs(1500, seed=2))
    (tmp_path / "run.yaml").write_text(
        f"job: {{pairs: {tmp_path / 'pairs.jsonl'}, model: np-btl, out: {tmp_path / 'two'}}}\n"
        "train: {steps: 12, batch_size: 8, lr: 0.03, warmup_steps: 2, eval_every: 4, val_tasks: 300}\n"
        "tasks: {n_targets: 12, max_context: 10}\nmodel: {d_hidden: 16}\n")
    t = time.time()
    launch2("reward", "--config", str(tmp_path / "run.yaml"))
    t_two = time.time() - t
    _in_process("reward", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "one"))

    one, m1 = load_reward_bundle(tmp_path / "one")  # strict: every key present, none unexpected
    two, m2 = load_reward_bundle(tmp_path / "two")
    assert (m1["metrics"]["processes"], m2["metrics"]["processes"]) == (1, 2)
    _same_history(m1["metrics"]["history"], m2["metrics"]["history"])
    assert m1["metrics"]["history"][0]["val_nll"] != m1["metrics"]["history"][-1]["val_nll"]  # it trained
    assert m2["metrics"]["best_val_nll"] == pytest.approx(m1["metrics"]["best_val_nll"], **TOL)
    _close(one.state_dict(), two.state_dict(), **ADAM_TOL)
    # process 0's files load back exactly
    on_disk = {**load_file(tmp_path / "two" / "reward.safetensors"),
               **{f"encoder.{k}": v for k, v in load_file(tmp_path / "two" / "encoder.safetensors").items()}}
    got = two.state_dict()
    assert on_disk.keys() == got.keys() and all(torch.equal(on_disk[k], got[k]) for k in got)
    assert not (tmp_path / "two.ckpt").exists()
    print(f"2-process reward launch: {t_two:.1f} s")


@pytest.fixture(scope="module")
def policy_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    texts = []
    for topic in TOPICS:
        short, long = _answers(topic)
        texts += [f"How do I get into {topic}?", short, long] * 3
    tok = train_tokenizer(texts, vocab_size=400)
    tiny_model("qwen2", tok, seed=0).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    write_pairs(d / "pairs.jsonl", toy_pairs())
    return d


def _policy_config(d: Path, out: Path) -> Path:
    cfg = d / f"{out.name}.yaml"
    cfg.write_text(
        f"job: {{pairs: {d / 'pairs.jsonl'}, model: np-dpo, out: {out}, base: {d / 'base'}}}\n"
        "train: {steps: 8, batch_size: 4, lr: 0.03, warmup_steps: 1, eval_every: 2, val_tasks: 16,"
        " checkpoint_every: 100}\n"
        "tasks: {n_targets: 4, max_context: 3}\n"
        "model: {embedder: base, d_z: 4, lora_r: 2, lora_alpha: 4, gradient_checkpointing: true}\n")
    return cfg


def _checkpoint(ckpt: Path) -> dict:
    return {"meta": read_manifest(ckpt), **{g: load_file(ckpt / f"{g}.safetensors") for g in ("model", "optim", "reference")}}


def _stop_and_resume(run, d: Path, out: Path) -> dict:
    """Train `out` to step 4 (stop), keep the checkpoint's contents, then train on to the end."""
    cfg = str(_policy_config(d, out))
    r = run("policy", "--config", cfg, "--stop-at", "4")
    ckpt = out.parent / f"{out.name}.ckpt"
    assert not out.exists() and ckpt.is_dir()
    saved = {**_checkpoint(ckpt), "stdout": getattr(r, "stdout", "")}
    run("policy", "--config", cfg)
    assert not ckpt.exists()
    return saved


def _in_process(*args: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process has; 2 threads on 2 busy cores are slower
    try:
        rc = train_main([*args, "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return rc


@pytest.fixture(scope="module")
def one_process(policy_setup):
    """The reference: one process, stopped after step 4 and resumed."""
    return _stop_and_resume(_in_process, policy_setup, policy_setup / "one")


def _same_policy_run(d: Path, out: Path, ck: dict, ck_one: dict, processes: int) -> None:
    # the step-4 checkpoints agree: trained tensors, optimiser moments, cached reference log-probs
    assert (ck["meta"]["step"], ck["meta"]["processes"]) == (4, processes)
    _same_history(ck_one["meta"]["history"], ck["meta"]["history"])
    _close(ck_one["model"], ck["model"], **ADAM_TOL)
    _close(ck_one["optim"], ck["optim"], **ADAM_TOL)
    r1, r2 = ck_one["reference"]["ref"], ck["reference"]["ref"]
    seen = ~torch.isnan(r1) & ~torch.isnan(r2)
    assert seen.any()
    torch.testing.assert_close(r1[seen], r2[seen], rtol=1e-5, atol=1e-4)

    p1, m1 = load_policy_bundle(d / "one")  # strict loads
    p2, m2 = load_policy_bundle(out)
    assert (m1["metrics"]["processes"], m2["metrics"]["processes"]) == (1, processes)
    h1, h2 = m1["metrics"]["history"], m2["metrics"]["history"]
    assert [h["step"] for h in h2] == [2, 4, 6, 8]
    _same_history(h1, h2)
    assert h1[0]["train_loss"] != h1[-1]["train_loss"]  # it trained
    s1, s2 = p1.adapter_state(), p2.adapter_state()
    _close(s1, s2, **ADAM_TOL)
    assert any(k.startswith("film.") for k in s2) and any(k.startswith("encoder.") for k in s2)
    # process 0's files load back exactly
    on_disk = {f"lora.{k}": v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    for g in ("film", "encoder"):
        on_disk.update({f"{g}.{k}": v for k, v in load_file(out / f"{g}.safetensors").items()})
    assert on_disk.keys() == s2.keys() and all(torch.equal(on_disk[k], s2[k]) for k in s2)
    assert json.loads((out / "bundle.json").read_text())["embedder"]["spec"] == "base"


@pytest.mark.slow
def test_policy_two_processes_match_one_and_resume(policy_setup, one_process):
    t = time.time()
    ck = _stop_and_resume(launch2, policy_setup, policy_setup / "ddp")
    assert ck["stdout"].count("stopped after step 4") == 1  # printed by process 0 only
    _same_policy_run(policy_setup, policy_setup / "ddp", ck, one_process, 2)
    print(f"2-process DDP policy launches (stop + resume): {time.time() - t:.1f} s")


@pytest.mark.slow
def test_policy_under_fsdp2_matches_one(policy_setup, one_process):
    """accelerate's FSDP2 preparation (decoder blocks sharded; LoRA, FiLM and encoder as DTensors;
    frozen base) on 2 CPU processes gives the same run; a checkpoint is gathered and written at
    step 4 on the way. (Stop + resume under FSDP2 was checked by hand: bitwise the same bundle.)"""
    t = time.time()
    cfg = _policy_config(policy_setup, policy_setup / "fsdp")
    cfg.write_text(cfg.read_text().replace("checkpoint_every: 100", "checkpoint_every: 4"))
    launch2("policy", "--config", str(cfg), script=ROOT / "tests" / "fsdp_cpu.py")
    p1, m1 = load_policy_bundle(policy_setup / "one")
    p2, m2 = load_policy_bundle(policy_setup / "fsdp")
    assert m2["metrics"]["processes"] == 2
    _same_history(m1["metrics"]["history"], m2["metrics"]["history"])
    _close(p1.adapter_state(), p2.adapter_state(), **ADAM_TOL)
    assert not (policy_setup / "fsdp.ckpt").exists()
    print(f"2-process FSDP2 policy launch: {time.time() - t:.1f} s")


# -- fast checks: recipes, the job section, the global batch ---------------------------------

RECIPES = sorted((ROOT / "recipes").glob("uf_hh_*.yaml"))


def test_recipes_parse_and_build_the_models_they_name():
    """Each recipe gives a complete job and valid train / tasks / model sections; the policies'
    config is built the way train_policy builds it, with the reward recipe's encoder."""
    assert {p.name for p in RECIPES} == {"uf_hh_reward.yaml", "uf_hh_policy_qwen05b.yaml",
                                         "uf_hh_policy_qwen15b.yaml", "uf_hh_policy_smol.yaml"}
    reward_args = build_parser().parse_args(["reward", "--config", str(ROOT / "recipes" / "uf_hh_reward.yaml")])
    rjob, rrun = _job(reward_args, "reward")
    rcfg = config_from_dict({"model": rjob.model, "d_in": 384, **rrun.model})  # MiniLM is 384-d
    assert rcfg.is_np and rjob.embedder == "minilm" and rjob.pairs == "data/uf_hh.jsonl"
    for path in RECIPES:
        if path.name == "uf_hh_reward.yaml":
            continue
        job, run = _job(build_parser().parse_args(["policy", "--config", str(path)]), "policy")
        assert job.init_encoder == rjob.out and job.embed_cache == rjob.embed_cache
        cfg = policy_config(run.model, job.model, job.base, None, rcfg.to_dict())
        assert cfg.conditioned and cfg.encoder == rcfg.encoder and cfg.embedder == rjob.embedder
        assert cfg.gradient_checkpointing and run.train.precision == "auto"
        assert all(run.train.batch_size % n == 0 for n in (1, 2, 4, 8)), path.name
        assert run.tasks.max_context <= run.tasks.n_targets
    bases = {_job(build_parser().parse_args(["policy", "--config", str(p)]), "policy")[0].base
             for p in RECIPES if "policy" in p.name}
    assert bases == {"Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "smollm2-135m-instruct"}


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_machines == 1
    fsdp = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config  # taken from the base model


def test_job_section_flags_win_and_bad_keys_are_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("job: {pairs: a.jsonl, model: np-dpo, out: o, base: b, init_encoder: r}\n"
                   "train: {steps: 7}\n")
    job, run = _job(build_parser().parse_args(["policy", "--config", str(cfg), "--out", "elsewhere",
                                               "--model", "dpo", "--init-encoder", "none", "--steps", "9"]),
                    "policy")
    assert (job.pairs, job.out, job.model, job.base, job.init_encoder) == ("a.jsonl", "elsewhere", "dpo", "b", None)
    assert run.train.steps == 9 and run.train.batch_size == 4  # the policy defaults fill the rest
    # the old all-flags form still works without a config file
    job, _ = _job(build_parser().parse_args(["reward", "--pairs", "p.jsonl", "--model", "btl", "--out", "o"]),
                  "reward")
    assert (job.pairs, job.model, job.out, job.embedder) == ("p.jsonl", "btl", "o", None)

    def err(text: str, kind: str = "policy", *flags: str) -> str:
        cfg.write_text(text)
        with pytest.raises(ValueError) as e:
            _job(build_parser().parse_args([kind, "--config", str(cfg), *flags]), kind)
        return str(e.value)

    assert "job: unknown key(s) ['pair']" in err("job: {pair: a.jsonl}\n")
    assert "['base'] are for policy runs" in err("job: {base: x}\n", "reward")
    assert "model.embedder" in err("job: {embedder: minilm}\n", "policy")
    assert "missing --pairs (or job.pairs in --config), --base (or job.base in --config)" in err(
        "job: {model: np-dpo, out: o}\n")
    assert "model 'np-btl' is not a policy model" in err("job: {pairs: a, model: np-btl, out: o, base: b}\n")
    assert "job.include_base must be true or false" in err("job: {include_base: maybe}\n")
    assert "unknown section(s) ['jobs']" in err("jobs: {}\n")
    with pytest.raises(ValueError, match="read by the CLI"):
        from core.config import run_config_from_dict
        run_config_from_dict({"job": {}})
    # library loaders check the job section, then set it aside
    cfg.write_text("job: {pairs: a}\ntrain: {steps: 3}\n")
    from core.config import load_run_config
    assert load_run_config(cfg).train.steps == 3
    job, rest = split_job(read_config_file(cfg), "reward", "c")
    assert job.pairs == "a" and "job" not in rest


def test_process_shares_make_up_the_global_batch():
    """Process r of W trains on tasks [r·B/W, (r+1)·B/W) of the batch one process would draw."""
    pairs = one_d_pairs(400, seed=1)
    sampler = TaskSampler(pairs, TaskConfig(n_targets=6, max_context=5), "train", seed=3)
    whole = sampler.sample(7, 8)
    parts = [_rank_share(sampler.sample(7, 8), r, 4) for r in range(4)]
    assert all(len(p) == 2 for p in parts)
    for f in ("target_idx", "target_choice", "context_idx", "context_mask", "unseen_mask", "user_type"):
        assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(whole, f)), f
    from core.train import _check_batch

    with pytest.raises(ValueError, match=r"batch_size=6 .* divisible by the number of processes \(4\)"):
        _check_batch(6, 4)


def test_recipe_flow_on_text_pairs_in_miniature(policy_setup, tmp_path, capsys):
    """The recipes' chain at toy size, one process: an NP-BTL reward on MiniLM embeddings of text
    pairs (job.embedder, shared cache), then an NP-DPO policy whose encoder config and weights come
    from that bundle (job.init_encoder) and whose context embedder must match it."""
    d = policy_setup
    cache = tmp_path / "minilm.safetensors"
    (tmp_path / "reward.yaml").write_text(
        f"job: {{pairs: {d / 'pairs.jsonl'}, model: np-btl, out: {tmp_path / 'rw'}, embedder: minilm,"
        f" embed_cache: {cache}}}\n"
        "train: {steps: 4, batch_size: 4, eval_every: 2, val_tasks: 4, warmup_steps: 1}\n"
        "tasks: {n_targets: 4, max_context: 3}\nmodel: {d_hidden: 16, input_norm: true, encoder: {d_z: 4}}\n")
    _in_process("reward", "--config", str(tmp_path / "reward.yaml"))
    _, rmeta = load_reward_bundle(tmp_path / "rw")
    assert rmeta["embedder"] == {"name": "all-minilm-l6-v2", "spec": "minilm", "dim": 384}
    assert cache.is_file()
    (tmp_path / "policy.yaml").write_text(
        f"job: {{pairs: {d / 'pairs.jsonl'}, model: np-dpo, out: {tmp_path / 'pol'}, base: {d / 'base'},"
        f" init_encoder: {tmp_path / 'rw'}, embed_cache: {cache}}}\n"
        "train: {steps: 2, batch_size: 2, eval_every: 2, val_tasks: 2, warmup_steps: 1}\n"
        "tasks: {n_targets: 4, max_context: 3}\n"
        "model: {embedder: minilm, freeze_encoder: true, lora_r: 2, lora_alpha: 4}\n")
    _in_process("policy", "--config", str(tmp_path / "policy.yaml"))
    policy, pmeta = load_policy_bundle(tmp_path / "pol")
    reward, _ = load_reward_bundle(tmp_path / "rw")
    assert policy.cfg.encoder == reward.cfg.encoder and policy.cfg.d_z == 4
    assert all(torch.equal(v, reward.encoder.state_dict()[k]) for k, v in policy.encoder.state_dict().items())
    assert pmeta["init_encoder"] == str(tmp_path / "rw") and pmeta["embedder"]["spec"] == "minilm"
    # a policy that embeds its contexts differently from the encoder's training is refused
    (tmp_path / "policy.yaml").write_text((tmp_path / "policy.yaml").read_text().replace("embedder: minilm",
                                                                                       "embedder: base, d_in: 384"))
    assert train_main(["policy", "--config", str(tmp_path / "policy.yaml"), "--out", str(tmp_path / "pol2")]) == 2
    assert "its encoder read 'minilm' embeddings, the policy's model.embedder is 'base'" in capsys.readouterr().err
    assert not (tmp_path / "pol2").exists()
