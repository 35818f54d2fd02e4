"""FiLM: condition a transformers decoder on a user latent z without forking its code.

For each modulated transformer block m, the block's output hidden states (the residual
stream) become

    o'_m = (1 + γ_m(z)) ⊙ o_m + β_m(z),      γ_m, β_m: linear maps R^{d_z} -> R^H,

shared across positions, so z applies to prompt and generated tokens alike, with or without
the KV cache. Optionally (`final_norm`) the output of the decoder's final norm, the hidden state
the LM head reads, is modulated the same way: its β(z) then adds a z-dependent bias to every
token's logit (E·β(z) for output embeddings E), a direct path from the user to word choice that
no later normalisation rescales. γ and β start at exactly zero, so an untrained FiLM is the identity for any z;
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
# model_type -> dotted path of the final norm (the LM head's input), for FiLMConfig.final_norm.
FINAL_NORM_PATHS: dict[str, str] = {**{k: "model.norm" for k in LAYER_PATHS if k != "gpt2"}, "gpt2": "transformer.ln_f"}


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


def _module_at(base: nn.Module, path: str) -> object:
    obj: object = base
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    return obj


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a supported decoder-only model (peft-wrapped or not): the LM head's input."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    obj = _module_at(base, FINAL_NORM_PATHS[model_type]) if model_type in FINAL_NORM_PATHS else None
    if not isinstance(obj, nn.Module):
        raise UnsupportedModelError(f"{type(base).__name__} ({model_type}): no final norm at "
                                    f"{FINAL_NORM_PATHS.get(model_type)!r}; add it to core.film.FINAL_NORM_PATHS")
    return obj


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
    obj = _module_at(base, LAYER_PATHS[model_type])
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
    lora_gates: int = 0  # LoRA modules whose rank components z gates (0 = none; see FiLM)
    lora_rank: int = 0  # their rank r
    gate_init_std: float = 0.0  # std of the gates' initial weights (the policy is still the base: LoRA's B is 0)
    final_norm: bool = False  # also modulate the final norm's output (the LM head's input)
    # > 0: the factors also get a one-hidden-layer path, W_o·gelu(W_h z + b_h), beside the affine map, so they
    # can be a nonlinear function of z (W_h random, W_o zero: still exactly the identity at init)
    generator_hidden: int = 0

    def __post_init__(self) -> None:
        if (self.lora_gates > 0) != (self.lora_rank > 0) or self.lora_gates < 0 or self.lora_rank < 0:
            raise ValueError(f"FiLM lora_gates ({self.lora_gates}) and lora_rank ({self.lora_rank}) must both be "
                             "positive or both 0")
        if self.layers is not None:
            idx = [i % self.n_layers if -self.n_layers <= i < self.n_layers else None for i in self.layers]
            if None in idx or len(set(idx)) != len(idx):
                raise ValueError(f"FiLM layers {self.layers} must be distinct indices into {self.n_layers} blocks")
        if self.generator_hidden < 0:
            raise ValueError(f"FiLM generator_hidden must be >= 0, got {self.generator_hidden}")

    def modulated(self) -> list[int]:
        if self.layers is None:
            return list(range(self.n_layers))
        return sorted(i % self.n_layers for i in self.layers)

    def n_sites(self) -> int:
        """Modulated hidden states: the chosen blocks, plus the final norm when final_norm."""
        return len(self.modulated()) + int(self.final_norm)

    def to_dict(self) -> dict:
        return asdict(self)


class FiLM(nn.Module):
    """γ(z), β(z) for each modulated block, applied by forward hooks (exact identity at init).

    Optionally z also gates LoRA (cfg.lora_gates > 0): a gated module's update becomes
    B·diag(1 + G_k z)·A x, so each of its r rank-one components is scaled by its own linear
    function of z and the weight update itself depends on the user, not only the residual
    stream. G_k starts at zero (a gated LoRA is then the plain LoRA), or random with
    cfg.gate_init_std > 0: each user starts with its own mix of rank components, and since LoRA's
    up-projection B starts at zero the policy is still exactly the base (zero gates get no gradient
    until B has grown). A gated policy cannot fold LoRA into the base weights (the update differs
    per row).
    """

    def __init__(self, cfg: FiLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, H = cfg.n_sites(), cfg.hidden_size
        # One affine map per block (then the final norm): rows [0:H] give γ - 1, rows [H:2H] give β. Zero = identity.
        self.weight = nn.Parameter(torch.zeros(L, 2 * H, cfg.d_z))
        self.bias = nn.Parameter(torch.zeros(L, 2 * H))
        if cfg.generator_hidden:
            G = cfg.generator_hidden
            self.hidden_weight = nn.Parameter(torch.randn(G, cfg.d_z) / cfg.d_z ** 0.5)  # (G, d_z)
            self.hidden_bias = nn.Parameter(torch.zeros(G))
            self.out_weight = nn.Parameter(torch.zeros(L, 2 * H, G))  # zero: the hidden path adds nothing at init
        if cfg.lora_gates:
            gw = torch.zeros(cfg.lora_gates, cfg.lora_rank, cfg.d_z)  # (G, r, d_z)
            if cfg.gate_init_std > 0:
                gw.normal_(0.0, cfg.gate_init_std)
            self.gate_weight = nn.Parameter(gw)
        self._active: torch.Tensor | None = None  # (B, F) while conditioned; F = L·2H + G·r
        self._ready: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gates_ready: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def gated(self) -> bool:
        return self.cfg.lora_gates > 0

    def factors(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, d_z) -> (B, F): per row, [γ - 1 ‖ β] of each modulated block and the final norm (L·2H), then the
        LoRA gates minus one (G·r). Rows can be taken from it (f[rows]) like any batch."""
        z = z.to(self.weight.dtype)
        film = torch.einsum("lod,bd->blo", self.weight, z) + self.bias  # (B, L, 2H)
        if self.cfg.generator_hidden:
            h = nn.functional.gelu(z @ self.hidden_weight.T + self.hidden_bias)  # (B, G)
            film = film + torch.einsum("log,bg->blo", self.out_weight, h)  # (B, L, 2H)
        parts = [film.flatten(1)]  # (B, L·2H)
        if self.gated:
            parts.append(torch.einsum("grd,bd->bgr", self.gate_weight, z).flatten(1))  # (B, G·r)
        return torch.cat(parts, 1)  # (B, F)

    def set_factors(self, f: torch.Tensor | None) -> None:
        """Set the active factors (B, F) of `factors` directly (None = off); `condition` is the usual way."""
        self._active = f
        self._ready = {}
        self._gates_ready = {}

    def _scale_shift(self, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + γ_j), β_j as contiguous (B, 1, H) tensors in the hidden states' dtype, made once per z.

        Contiguous standard strides matter: a broadcast view would hand odd strides to every
        later op of a decoding step, and CPU matmuls then take a copying slow path (3x slower).
        """
        key = (j, dtype)
        if key not in self._ready:
            H = self.cfg.hidden_size
            g, b = self._active[:, 2 * H * j:2 * H * (j + 1)].chunk(2, -1)  # 2 x (B, H)
            self._ready[key] = ((1 + g).to(dtype).unsqueeze(1).contiguous(), b.to(dtype).unsqueeze(1).contiguous())
        return self._ready[key]

    def _gate(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """1 + G_k z as a contiguous (B, 1, r) tensor, made once per z."""
        key = (k, dtype)
        if key not in self._gates_ready:
            r, off = self.cfg.lora_rank, 2 * self.cfg.hidden_size * self.cfg.n_sites()
            g = self._active[:, off + r * k:off + r * (k + 1)]  # (B, r)
            self._gates_ready[key] = (1 + g).to(dtype).unsqueeze(1).contiguous()
        return self._gates_ready[key]

    def attach(self, model: nn.Module, lora_a: list[nn.Module] | None = None) -> "FiLM":
        """Register the hooks on `model`'s decoder layers (once), and on the gated LoRA down-projections
        `lora_a` (cfg.lora_gates of them, in a fixed order) when the config gates LoRA."""
        if self._handles:
            raise RuntimeError("FiLM is already attached; call detach() first")
        layers = find_decoder_layers(model)
        if len(layers) != self.cfg.n_layers:
            raise ValueError(f"FiLM was built for {self.cfg.n_layers} blocks, the model has {len(layers)}")
        if len(lora_a or []) != self.cfg.lora_gates:
            raise ValueError(f"FiLM was built to gate {self.cfg.lora_gates} LoRA modules, got {len(lora_a or [])}")
        for j, i in enumerate(self.cfg.modulated()):
            self._handles.append(layers[i].register_forward_hook(self._hook(j)))
        if self.cfg.final_norm:
            self._handles.append(find_final_norm(model).register_forward_hook(self._hook(len(self.cfg.modulated()))))
        for k, m in enumerate(lora_a or []):
            if getattr(m, "out_features", self.cfg.lora_rank) != self.cfg.lora_rank:
                raise ValueError(f"LoRA module {k} has rank {m.out_features}, FiLM gates rank {self.cfg.lora_rank}")
            self._handles.append(m.register_forward_hook(self._gate_hook(k)))
        return self

    @staticmethod
    def _rows_for(h: torch.Tensor, f: torch.Tensor, what: str) -> torch.Tensor:
        """f (Bz, 1, D) repeated to h's batch of rows: generate() may expand rows (num_return_sequences)."""
        if h.shape[0] == f.shape[0]:
            return f
        if h.shape[0] % f.shape[0]:
            raise ValueError(f"FiLM: {f.shape[0]} latents for a batch of {h.shape[0]} rows ({what})")
        return f.repeat_interleave(h.shape[0] // f.shape[0], 0)

    def _gate_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            if self._active is None:
                return out
            return out * self._rows_for(out, self._gate(k, out.dtype), "LoRA gate")  # (B, T, r)
        return hook

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
            g, b = self._rows_for(h, g, "block"), self._rows_for(h, b, "block")  # 2 x (B, 1, H)
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
