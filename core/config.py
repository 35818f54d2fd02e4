"""Run configuration: dataclasses read from YAML, with unknown keys rejected by name."""

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
    unknown = sorted(set(d) - {"train", "tasks", "model"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: ['model', 'tasks', 'train']")
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


def load_run_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig()
    return run_config_from_dict(read_config_file(path), str(path))
