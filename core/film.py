"""FiLM: condition a transformers decoder on a user latent z without forking its code.

For each modulated transformer block m, the block's output hidden states (the residual
stream) become

    o'_m = (1 + γ_m(z)) ⊙ o_m + β_m(z),      γ_m, β_m: linear maps R^{d_z} -> R^H,

shared across positions, so z applies to prompt and generated tokens alike, with or without
the KV cache. γ and β start at exactly zero, so an untrained FiLM is the identity for any z;
with no z set (`z=None`) the hooks return the block output untouched, which is exactly the
base model. Each batch row has its own z.

FiLM attaches with forward hooks on the decoder layers, found by `find_decoder_layers`
for the Llama (SmolLM2), Mistral, Qwen2/3, Gemma 1/2/3 and GPT-2 families. This sits on the
layer output, as in the authors' code (the paper's text says the attention output).

The conditioning is module state set by `FiLM.condition(z)`: keep the block open through
`backward()` when gradient checkpointing recomputes layers. Callers that share one model
between threads serialise their forwards (SteerablePolicy holds a lock).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn

# model_type -> dotted path of the decoder layer list, relative to the *ForCausalLM model.
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
}


class UnsupportedModelError(ValueError):
    """The FiLM layer finder does not know this model family."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under peft / accelerate wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        else:
            break
    return model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a supported decoder-only model (peft-wrapped or not)."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in LAYER_PATHS:
        raise UnsupportedModelError(
            f"FiLM cannot attach to {type(base).__name__} (model_type {model_type!r}): the layer finder supports "
            f"{', '.join(sorted(LAYER_PATHS))}. Add its decoder-layer path to core.film.LAYER_PATHS if its "
            "blocks return the hidden states as the first output.")
    obj: object = base
    for part in LAYER_PATHS[model_type].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
        raise UnsupportedModelError(f"{type(base).__name__} ({model_type}): no decoder layers at "
                                    f"{LAYER_PATHS[model_type]!r}; is this a *ForCausalLM model?")
    return obj


def hidden_size(model: nn.Module) -> int:
    cfg = unwrap(model).config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise UnsupportedModelError(f"{type(unwrap(model)).__name__}: config has no hidden size")


@dataclass
class FiLMConfig:
    d_z: int
    hidden_size: int
    n_layers: int  # blocks in the base model
    layers: list[int] | None = None  # which blocks to modulate (negative counts from the end); None = all

    def __post_init__(self) -> None:
        if self.layers is not None:
            idx = [i % self.n_layers if -self.n_layers <= i < self.n_layers else None for i in self.layers]
            if None in idx or len(set(idx)) != len(idx):
                raise ValueError(f"FiLM layers {self.layers} must be distinct indices into {self.n_layers} blocks")

    def modulated(self) -> list[int]:
        if self.layers is None:
            return list(range(self.n_layers))
        return sorted(i % self.n_layers for i in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)


class FiLM(nn.Module):
    """γ(z), β(z) for each modulated block, applied by forward hooks (exact identity at init)."""

    def __init__(self, cfg: FiLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, H = len(cfg.modulated()), cfg.hidden_size
        # One affine map per block: rows [0:H] give γ - 1, rows [H:2H] give β. Zero = identity.
        self.weight = nn.Parameter(torch.zeros(L, 2 * H, cfg.d_z))
        self.bias = nn.Parameter(torch.zeros(L, 2 * H))
        self._active: torch.Tensor | None = None  # (L, B, 2H) while conditioned
        self._ready: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def factors(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, d_z) -> (L, B, 2H): [γ - 1 ‖ β] per modulated block and row."""
        return torch.einsum("lod,bd->lbo", self.weight, z.to(self.weight.dtype)) + self.bias[:, None, :]

    def set_factors(self, f: torch.Tensor | None) -> None:
        """Set the active [γ - 1 ‖ β] (L, B, 2H) directly (None = off); `condition` is the usual way."""
        self._active = f
        self._ready = {}

    def _scale_shift(self, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + γ_j), β_j as contiguous (B, 1, H) tensors in the hidden states' dtype, made once per z.

        Contiguous standard strides matter: a broadcast view would hand odd strides to every
        later op of a decoding step, and CPU matmuls then take a copying slow path (3x slower).
        """
        key = (j, dtype)
        if key not in self._ready:
            g, b = self._active[j].chunk(2, -1)  # 2 x (B, H)
            self._ready[key] = ((1 + g).to(dtype).unsqueeze(1).contiguous(), b.to(dtype).unsqueeze(1).contiguous())
        return self._ready[key]

    def attach(self, model: nn.Module) -> "FiLM":
        """Register the hooks on `model`'s decoder layers (once)."""
        if self._handles:
            raise RuntimeError("FiLM is already attached; call detach() first")
        layers = find_decoder_layers(model)
        if len(layers) != self.cfg.n_layers:
            raise ValueError(f"FiLM was built for {self.cfg.n_layers} blocks, the model has {len(layers)}")
        for j, i in enumerate(self.cfg.modulated()):
            self._handles.append(layers[i].register_forward_hook(self._hook(j)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, j: int):
        def hook(module: nn.Module, args: tuple, out):
            f = self._active
            if f is None:
                return out
            h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
            g, b = self._scale_shift(j, h.dtype)  # 2 x (Bz, 1, H)
            if h.shape[0] != g.shape[0]:  # generate() may expand rows (num_return_sequences)
                if h.shape[0] % g.shape[0]:
                    raise ValueError(f"FiLM: {g.shape[0]} latents for a batch of {h.shape[0]} rows")
                rep = h.shape[0] // g.shape[0]
                g, b = g.repeat_interleave(rep, 0), b.repeat_interleave(rep, 0)
            h = torch.addcmul(b, h, g)  # (B, T, H): (1 + γ) ⊙ h + β
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    @contextlib.contextmanager
    def condition(self, z: torch.Tensor | None) -> Iterator[None]:
        """Within the block, the model runs conditioned on z (B, d_z); z=None is the plain base."""
        if z is not None and (z.ndim != 2 or z.shape[1] != self.cfg.d_z):
            raise ValueError(f"FiLM: z must be (batch, {self.cfg.d_z}), got {tuple(z.shape)}")
        prev = self._active
        self.set_factors(None if z is None else self.factors(z))
        try:
            yield
        finally:
            self.set_factors(prev)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the hooks pass outputs through unchanged, whatever z was set."""
        with self.condition(None):
            yield
