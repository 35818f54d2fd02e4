"""Run configuration: dataclasses read from YAML, with unknown keys rejected by name.

A config file has up to four sections: `train` (TrainConfig), `tasks` (TaskConfig), `model`
(the reward or policy model's options) and, for the CLI only, `job` (JobConfig: what to train
on and where to write it, i.e. the command-line flags). `train` / `tasks` / `model` make the
RunConfig, which is fingerprinted for resume and stored in the bundle; `job` is not (moving
the output folder or the data file must not change what a run is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.data.tasks import TaskConfig


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64  # tasks per optimiser step (global, split over processes)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    eval_every: int = 100
    val_tasks: int = 512  # fixed validation tasks for checkpoint selection
    checkpoint_every: int = 250
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPUs that support it

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based): linear warm-up, then cosine or flat."""
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


@dataclass
class RunConfig:
    """Everything a reward training run needs besides the data: train / tasks / model sections."""

    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    model: dict[str, Any] = field(default_factory=dict)  # RewardConfig fields except model and d_in

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def run_config_from_dict(d: dict[str, Any] | None, where: str = "config") -> RunConfig:
    d = dict(d or {})
    if "job" in d:
        raise ValueError(f"{where}: the 'job' section is read by the CLI (core.config.split_job), "
                         "not by run_config_from_dict; split it off first")
    unknown = sorted(set(d) - {"train", "tasks", "model"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: ['job', 'model', 'tasks', 'train']")
    return RunConfig(
        train=_build(TrainConfig, d.get("train") or {}, f"{where}: train"),
        tasks=_build(TaskConfig, d.get("tasks") or {}, f"{where}: tasks"),
        model=dict(d.get("model") or {}),
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file = {}), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping with sections train / tasks / model")
    return d or {}


def load_run_config(path: str | Path | None, kind: Literal["reward", "policy"] = "reward") -> RunConfig:
    """The train / tasks / model sections of a config file (a `job` section is checked, then set aside)."""
    if path is None:
        return RunConfig()
    _, rest = split_job(read_config_file(path), kind, str(path))
    return run_config_from_dict(rest, str(path))


# -- the CLI's `job` section ------------------------------------------------------------------

JOB_COMMON = ("pairs", "model", "out", "embed_cache")
JOB_ONLY: dict[str, tuple[str, ...]] = {
    "reward": ("embedder",),
    "policy": ("base", "base_dtype", "init_encoder", "include_base", "reference_cache", "teacher"),
}


@dataclass
class JobConfig:
    """What a CLI run trains on and where it writes: each field is also a flag (--pairs, --init-encoder,
    ...), and a flag given on the command line wins over the file. Relative paths are relative to the
    working directory, as on the command line.
    """

    pairs: str | None = None  # JSONL pairs file (core.data.pairs)
    model: str | None = None  # reward: np-btl | np-btl-latent | btl | dpl; policy: np-dpo | dpo
    out: str | None = None  # bundle folder to write (the checkpoint goes to OUT.ckpt/)
    embed_cache: str | None = None  # safetensors file caching option embeddings
    # reward runs on text pairs: "minilm" (384-d sentence embeddings), "minilm+style" (plus 12 style
    # features, core.embed.StyleFeatures), "style+words" (the style features and hashed word rates,
    # core.embed.WordRates; no MiniLM), other "+" joins of minilm, style, words, or "lm:SPEC" (the last-token
    # hidden state of a causal LM given as a core.basemodels spec: a hub id or a local folder)
    embedder: str | None = None
    # policy runs
    base: str | None = None  # base LM: smollm2-135m-instruct, a local folder or a hub id
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # frozen base weights; auto: bf16 when training in bf16
    init_encoder: str | None = None  # NP-BTL reward bundle whose context encoder starts the policy's
    include_base: bool = False  # store the base weights in the bundle (small models)
    # folder keeping the reference log-probs of every train/val pair (core.train.train_policy), so that
    # NP-DPO and the DPO baseline on one base compute them once
    reference_cache: str | None = None
    teacher: str | None = None  # NP-BTL reward bundle for model.teacher_weight > 0 (core.policy.PolicyConfig)

    def __post_init__(self) -> None:
        if self.base_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"job.base_dtype must be auto, float32 or bfloat16, got {self.base_dtype!r}")
        for name in ("pairs", "model", "out", "embed_cache", "embedder", "base", "init_encoder", "reference_cache", "teacher"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"job.{name} must be a string, got {v!r}")
        if not isinstance(self.include_base, bool):
            raise ValueError(f"job.include_base must be true or false, got {self.include_base!r}")

    def merged(self, **flags: Any) -> "JobConfig":
        """A copy with every flag that is not None put over the file's value."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError("missing " + ", ".join(f"--{n.replace('_', '-')} (or job.{n} in --config)"
                                                     for n in missing))


def split_job(d: dict[str, Any], kind: Literal["reward", "policy"], where: str = "config"
              ) -> tuple[JobConfig, dict[str, Any]]:
    """(JobConfig, the other sections) of a config mapping; job keys that belong to the other kind
    of run, or to neither, are named in the error."""
    d = dict(d)
    job = d.pop("job", None) or {}
    if not isinstance(job, dict):
        raise ValueError(f"{where}: job must be a mapping of keys to values, got {type(job).__name__}")
    allowed = set(JOB_COMMON) | set(JOB_ONLY[kind])
    other = "policy" if kind == "reward" else "reward"
    wrong = sorted(set(job) & set(JOB_ONLY[other]))
    if wrong:
        raise ValueError(f"{where}: job: key(s) {wrong} are for {other} runs, this is a {kind} run"
                         + ("; a policy's context embedder is model.embedder (minilm | minilm+style | style+words | ... | base)" if "embedder" in wrong
                            else ""))
    unknown = sorted(set(job) - allowed)
    if unknown:
        raise ValueError(f"{where}: job: unknown key(s) {unknown}; known: {sorted(allowed)}")
    try:
        return JobConfig(**job), d
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
