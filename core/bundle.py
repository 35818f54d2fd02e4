"""Bundles and checkpoints: folders of safetensors + json, written atomically, loaded strictly.

A bundle folder holds `bundle.json` (kind, model config, data provenance, metrics, and a
manifest of every other file with its sha256) plus the files it lists. Loading checks the
manifest (so a truncated or edited file is named), never unpickles, and loads weights with
strict key and shape checks that name what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.atomic import current_umask

FORMAT_VERSION = 1
MANIFEST = "bundle.json"


class BundleError(ValueError):
    """A bundle or checkpoint is missing, damaged or does not fit the model."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def write_dir_atomic(path: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write `files` (relative name -> content) as folder `path`, replacing it all at once.

    The folder is built beside the target and swapped in with renames, so a reader sees the
    old folder or the new one, never a mix; a crash leaves the old one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; give the folder normal permissions
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_bundle(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                files: dict[str, bytes] | None = None) -> Path:
    """Write a bundle: `tensors[group]` becomes `group.safetensors`; `files` are extra raw files."""
    payload: dict[str, bytes] = {f"{g}.safetensors": tensors_to_bytes(t) for g, t in tensors.items()}
    payload.update(files or {})
    if MANIFEST in payload:
        raise BundleError(f"{MANIFEST} is reserved for the manifest")
    manifest = dict(meta)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {name: sha256(data) for name, data in sorted(payload.items())}
    payload[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return write_dir_atomic(path, payload)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (it does not exist or is not a directory)")
    if not mf.is_file():
        raise BundleError(f"{path}: not a bundle folder ({MANIFEST} is missing)")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise BundleError(f"{mf}: no 'files' manifest")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mf}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def read_file_checked(path: str | os.PathLike, name: str, meta: dict[str, Any]) -> bytes:
    """Read one file listed in the manifest and check its hash."""
    path = Path(path)
    if name not in meta["files"]:
        raise BundleError(f"{path}: {name} is not in the bundle manifest")
    f = path / name
    if not f.is_file():
        raise BundleError(f"{path}: {name} is listed in {MANIFEST} but missing")
    data = f.read_bytes()
    if sha256(data) != meta["files"][name]:
        raise BundleError(f"{path}: {name} does not match its sha256 in {MANIFEST} (damaged or edited)")
    return data


def load_bundle_tensors(path: str | os.PathLike, group: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    data = read_file_checked(path, f"{group}.safetensors", meta)
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise BundleError(f"{Path(path)}: {group}.safetensors is not a valid safetensors file ({e})") from None


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Raise BundleError naming missing, unexpected and mis-shaped keys of `state` against `expected`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:8]}")
    if problems:
        raise BundleError(f"{what}: " + "; ".join(problems))


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module`, failing with the names of missing/unexpected/mis-shaped keys."""
    check_state(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


# -- reward bundles -------------------------------------------------------------------------

def save_reward_bundle(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """A reward bundle: encoder.safetensors (NP models) + reward.safetensors + bundle.json."""
    state = {k: v for k, v in model.state_dict().items()}
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    tensors = {"reward": rest}
    if enc:
        tensors["encoder"] = enc
    full = {"kind": "reward", "reward_config": model.cfg.to_dict(), **meta}
    return save_bundle(path, full, tensors)


def load_reward_bundle(path: str | os.PathLike):
    """Returns (PreferenceModel in eval mode, bundle metadata)."""
    from core.reward import PreferenceModel, config_from_dict  # local: bundle stays importable alone

    meta = read_manifest(path)
    if meta.get("kind") != "reward":
        raise BundleError(f"{path}: bundle kind is {meta.get('kind')!r}, expected 'reward'")
    try:
        cfg = config_from_dict(meta["reward_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: bad reward_config in {MANIFEST} ({e})") from None
    model = PreferenceModel(cfg)
    state = dict(load_bundle_tensors(path, "reward", meta))
    if cfg.is_np:
        state.update({f"encoder.{k}": v for k, v in load_bundle_tensors(path, "encoder", meta).items()})
    elif "encoder.safetensors" in meta["files"]:
        raise BundleError(f"{path}: encoder.safetensors present but {cfg.model} has no encoder")
    load_state_strict(model, state, f"{path}")
    return model.eval(), meta


# -- policy bundles -------------------------------------------------------------------------

def model_files(model: torch.nn.Module, tokenizer) -> dict[str, bytes]:
    """A transformers model + tokenizer as folder files (safetensors weights, json configs)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def save_policy_bundle(path: str | os.PathLike, policy, meta: dict[str, Any], include_base: bool = False) -> Path:
    """A policy bundle: adapter/ (peft LoRA), film.safetensors, encoder.safetensors, bundle.json;
    with include_base, the base model's own files under base/ (for small from-scratch models)."""
    state = policy.adapter_state()
    lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
    tensors = {g: {k[len(g) + 1:]: v for k, v in state.items() if k.startswith(g + ".")} for g in ("film", "encoder")}
    tensors = {g: t for g, t in tensors.items() if t}
    peft_cfg = policy.lm.peft_config["default"].to_dict()
    # peft records the local folder the base was loaded from: name the base instead, so that a
    # bundle's bytes do not depend on where it was built (bundle.json says how to get the base)
    peft_cfg["base_model_name_or_path"] = (meta.get("base") or {}).get("name")
    files = {"adapter/adapter_model.safetensors": tensors_to_bytes(lora),
             "adapter/adapter_config.json": (json.dumps(peft_cfg, indent=2, sort_keys=True, default=sorted) + "\n").encode()}
    if include_base:
        files.update({f"base/{k}": v for k, v in _plain_base_files(policy).items()})
    full = {"kind": "policy", "policy_config": policy.cfg.to_dict(), **meta}
    if include_base:
        full["base"] = {**full.get("base", {}), "kind": "bundled"}
    return save_bundle(path, full, tensors, files)


def _plain_base_files(policy) -> dict[str, bytes]:
    """The base LM's files without LoRA: a fresh model of the same config with the frozen weights."""
    from transformers import AutoModelForCausalLM

    base = policy.lm.get_base_model()
    plain = AutoModelForCausalLM.from_config(base.config)
    sd = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(sd, strict=True)
    return model_files(plain, policy.tokenizer)


def load_policy_bundle(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       base_dir: str | os.PathLike | None = None):
    """Returns (SteerablePolicy in eval mode, bundle metadata). Checks every file's hash first.

    base_dir: a plain transformers folder holding the base weights, for bundles that share one
    base stored beside them (a persona bundle's `base/`); its weights must hash to the sha256
    the policy was trained on.
    """
    from core.policy import PolicyConfig, SteerablePolicy

    path = Path(path)
    meta = read_manifest(path)
    if meta.get("kind") != "policy":
        raise BundleError(f"{path}: bundle kind is {meta.get('kind')!r}, expected 'policy'")
    try:
        cfg = PolicyConfig.from_dict(meta["policy_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: bad policy_config in {MANIFEST} ({e})") from None
    for name in meta["files"]:  # hash-check everything before any of it is parsed
        read_file_checked(path, name, meta)
    base_meta = meta.get("base") or {}
    if base_meta.get("kind") == "bundled":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if "base/config.json" not in meta["files"]:
            raise BundleError(f"{path}: base kind 'bundled' but base/config.json is not in the bundle")
        lm = AutoModelForCausalLM.from_pretrained(str(path / "base"), trust_remote_code=False, use_safetensors=True,
                                                  dtype=dtype or torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path / "base"), trust_remote_code=False)
    else:
        from core.basemodels import load_base

        spec = str(base_dir) if base_dir is not None else str(base_meta.get("spec", cfg.base))
        if spec.startswith(("./", "../")):  # a base stored beside the bundle (persona bundles)
            spec = str((path / spec).resolve())
        lm, tok, info = load_base(spec, dtype=dtype or torch.float32)
        want, got = base_meta.get("sha256"), info.get("sha256")
        if want and got and want != got:
            raise BundleError(f"{path}: trained on base weights {want[:12]}…, but {spec} "
                              f"resolves to {got[:12]}…; the bundle would not behave as trained")
    policy = SteerablePolicy(cfg, lm, tok)
    state = {f"lora.{k}": v for k, v in load_bundle_tensors(path, "adapter/adapter_model", meta).items()}
    for g in ("film", "encoder"):
        if f"{g}.safetensors" in meta["files"]:
            state.update({f"{g}.{k}": v for k, v in load_bundle_tensors(path, g, meta).items()})
    policy.load_adapter_state(state, str(path))
    return policy.to(device).eval(), meta
