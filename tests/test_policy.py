"""SteerablePolicy, FiLM and NP-DPO on tiny random Llama, Qwen2 and GPT-2 configs (no downloads)."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import torch

from core.bundle import BundleError, load_policy_bundle, save_policy_bundle
from core.config import TrainConfig
from core.data.pairs import pairs_from_records
from core.data.tasks import TaskConfig
from core.embed import LMEmbedder, last_token_index
from core.film import FiLM, FiLMConfig, UnsupportedModelError, find_decoder_layers, unwrap
from core.policy import PolicyConfig, PolicyData, SteerablePolicy, collate
from core.tinylm import tiny_model, train_tokenizer
from core.train import policy_run_config, train_policy

FAMILIES = ["llama", "qwen2", "gpt2"]
TOPICS = ["sleep", "tea", "rain", "bikes", "maps", "bread", "music", "chess", "paint", "boats", "trees", "birds"]


def _answers(topic: str) -> tuple[str, str]:
    short = f"Try {topic} daily."
    long = (f"Here is a thorough answer about {topic}. First, start slowly with {topic}. "
            f"Then practise {topic} every day. Finally, review what you learned about {topic}.")
    return short, long


@pytest.fixture(scope="module")
def tok():
    texts = []
    for t in TOPICS:
        s, l = _answers(t)
        texts += [f"How do I get into {t}?", s, l] * 3
    return train_tokenizer(texts, vocab_size=400)


def toy_pairs(seed: int = 0):
    """Two user types that always disagree: 'terse' prefers the short answer, 'thorough' the long one."""
    rng = random.Random(seed)
    recs = []
    for i, t in enumerate(TOPICS):
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        for k in range(4):
            short, long = _answers(t)
            b_long = rng.random() < 0.5
            a, b = (short, long) if b_long else (long, short)
            recs.append({"id": f"{t}-{k}", "prompt": f"How do I get into {t}?" + " Please." * k, "a": a, "b": b,
                         "choices": {"terse": 0 if b_long else 1, "thorough": 1 if b_long else 0}, "split": split})
    return pairs_from_records(recs, "toy")


def toy_emb(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """4-d option features that reveal the answer's length (what the users care about)."""
    def f(text: str) -> list[float]:
        n = len(text.split())
        return [n / 20, 1.0 - n / 20, 0.5, -0.5]
    return torch.tensor([f(x) for x in pairs.a]), torch.tensor([f(x) for x in pairs.b])


def make_policy(family: str, tok, conditioned: bool = True, seed: int = 0, **kw) -> SteerablePolicy:
    cfg = PolicyConfig(base="tiny", conditioned=conditioned, d_in=4, d_z=4, **kw)
    torch.manual_seed(seed)
    return SteerablePolicy(cfg, tiny_model(family, tok, seed=seed), tok)


def _perturb(policy: SteerablePolicy, seed: int = 1) -> None:
    """Make LoRA and FiLM non-trivial, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad and ("lora_" in n or n.startswith("film.")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


PROMPTS = ["How do I get into tea?", "How do I get into chess? Please."]


@pytest.mark.parametrize("family", FAMILIES)
def test_film_at_init_is_identity_for_any_z(family, tok):
    base = tiny_model(family, tok, seed=3)
    policy = make_policy(family, tok, seed=3)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = base(**enc).logits
        for z in (torch.zeros(2, 4), 5 * torch.randn(2, 4)):
            with policy.conditioned(z):
                got = policy.lm(**enc).logits
            assert torch.equal(got, want)
        with policy.conditioned(None):
            assert torch.equal(policy.lm(**enc).logits, want)


@torch.no_grad()
def _rows_as_if_alone(policy, enc, z: torch.Tensor) -> torch.Tensor:
    """Logits of a batch conditioned row by row on z, asserting each row equals that row run alone."""
    with policy.conditioned(z):
        both = policy.lm(**enc).logits
    for i in range(z.shape[0]):
        with policy.conditioned(z[i:i + 1]):
            one = policy.lm(input_ids=enc.input_ids[i:i + 1], attention_mask=enc.attention_mask[i:i + 1]).logits
        torch.testing.assert_close(both[i], one[0], rtol=1e-5, atol=1e-5)
    return both


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_gets_its_own_z(family, tok):
    policy = make_policy(family, tok)
    _perturb(policy)
    enc = tok(PROMPTS[:1] * 2, return_tensors="pt")
    both = _rows_as_if_alone(policy, enc, torch.randn(2, 4))
    assert not torch.allclose(both[0], both[1])


def test_film_subset_of_layers_and_unknown_family(tok):
    m = tiny_model("llama", tok, n_layers=3)
    cfg = FiLMConfig(d_z=2, hidden_size=64, n_layers=3, layers=[-1])
    assert cfg.modulated() == [2]
    film = FiLM(cfg).attach(m)
    assert len(film._handles) == 1 and film.weight.shape == (1, 128, 2)
    with pytest.raises(ValueError, match="distinct indices"):
        FiLMConfig(d_z=2, hidden_size=64, n_layers=3, layers=[0, 3])
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="bert.*supports.*gpt2.*llama.*qwen2"):
        find_decoder_layers(bert)


def test_response_span_is_exact_for_a_chat_template(tok):
    policy = make_policy("llama", tok)
    prompt, response = "How do I get into tea?", "Try tea daily."
    (p_ids, r_ids), = policy.encode([prompt], [response])
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(p_ids) == rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tok.decode(r_ids) == response + "<|im_end|>"  # every response token and the end of turn
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    assert full.startswith(tok.decode(p_ids + r_ids))
    s = collate([(p_ids, r_ids), (p_ids[:3], r_ids)], policy.pad_id)
    assert s.response_mask[0].sum() == len(r_ids)
    # sequence_logprobs sums exactly the response positions of the full-logit computation
    with torch.no_grad():
        got = policy.sequence_logprobs(s)
        logits = policy.lm(input_ids=s.input_ids, attention_mask=s.attention_mask).logits.log_softmax(-1)
    for i, (pl, rl) in enumerate([(len(p_ids), len(r_ids)), (3, len(r_ids))]):
        want = sum(logits[i, t - 1, s.input_ids[i, t]] for t in range(pl, pl + rl))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_ignores_z_and_equals_the_plain_base(family, tok):
    base = tiny_model(family, tok, seed=5)
    policy = make_policy(family, tok, seed=5)
    _perturb(policy)
    s = collate(policy.encode(PROMPTS, ["Try tea daily.", "Here is a thorough answer about chess."]), policy.pad_id)
    with torch.no_grad():
        logp = base(input_ids=s.input_ids, attention_mask=s.attention_mask).logits.log_softmax(-1)
        tm = s.response_mask[:, 1:]
        want = (logp[:, :-1].gather(-1, s.input_ids[:, 1:, None])[..., 0] * tm).sum(1)
        refs = []
        for z in (torch.zeros(2, 4), torch.randn(2, 4)):
            with policy.conditioned(z):  # a z set outside must not leak into the reference
                refs.append(policy.reference_logprobs(s))
        with policy.conditioned(torch.randn(2, 4)):
            steered = policy.sequence_logprobs(s)
    torch.testing.assert_close(refs[0], want, rtol=1e-5, atol=1e-4)
    assert torch.equal(refs[0], refs[1])
    assert not torch.allclose(steered, want)


def _step_inputs(policy, pairs, seed=0):
    from core.data.tasks import TaskSampler

    data = PolicyData(policy, pairs, toy_emb(pairs))
    batch = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, min_context=2), "train", seed).sample(0, 2)
    return data, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_np_dpo_steps_move_only_lora_film_and_encoder(family, tok):
    pairs = toy_pairs()
    policy = make_policy(family, tok)
    policy.train()
    data, batch = _step_inputs(policy, pairs)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    enc_grad = 0.0
    for _ in range(2):  # FiLM starts at zero, so the encoder's first gradient is exactly 0
        inp = data.inputs(policy, batch, batch.target_mask)
        loss, m = policy(inp)
        opt.zero_grad()
        loss.backward()
        enc_grad += sum(p.grad.abs().sum().item() for p in policy.encoder.parameters() if p.grad is not None)
        opt.step()
    assert enc_grad > 0
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(("lora_" in n) or n.startswith(("film.", "encoder.")) for n in moved), moved
    assert any("lora_B" in n for n in moved) and any(n.startswith("film.") for n in moved)
    assert any(n.startswith("encoder.") for n in moved)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or n.startswith(("film.", "encoder.")) for n in trainable)


def test_dpo_logit_is_zero_at_init_and_cached_reference_matches(tok):
    pairs = toy_pairs()
    policy = make_policy("qwen2", tok)
    data, batch = _step_inputs(policy, pairs)
    with torch.no_grad():
        cached = policy.dpo_logits(data.inputs(policy, batch, batch.target_mask, cache_reference=True))
        fresh = policy.dpo_logits(data.inputs(policy, batch, batch.target_mask, cache_reference=False))
    assert torch.equal(cached, torch.zeros_like(cached)) and torch.equal(fresh, cached)
    assert not torch.isnan(data.ref[batch.target_idx[batch.target_mask]]).any()


def test_train_mode_log_probs_are_deterministic_and_dpo_logit_starts_at_zero(tok):
    """GPT-2 configs carry dropout 0.1: in train mode it would make log π and the cached
    reference two different random draws. The policy switches the frozen base's dropout off."""
    base = tiny_model("gpt2", tok, seed=0)
    assert base.config.resid_pdrop > 0 and base.config.attn_pdrop > 0  # the default this guards against
    policy = make_policy("gpt2", tok)
    pairs = toy_pairs()
    policy.train()
    data, batch = _step_inputs(policy, pairs)
    inp = data.inputs(policy, batch, batch.target_mask)
    with torch.no_grad():
        first, second = policy.dpo_logits(inp), policy.dpo_logits(inp)
    assert torch.equal(first, second) and torch.equal(first, torch.zeros_like(first))
    assert policy.lm.get_base_model().config.resid_pdrop == 0.0


def test_length_normalised_logit_is_the_mean_token_log_ratio_times_the_scale(tok):
    pairs = toy_pairs()
    plain = make_policy("llama", tok)
    _perturb(plain)
    normed = make_policy("llama", tok)
    normed.load_adapter_state(plain.adapter_state())
    normed.cfg.length_normalize, normed.cfg.length_scale = True, 10.0
    data, batch = _step_inputs(plain, pairs)
    inp = data.inputs(plain, batch, batch.target_mask)
    with torch.no_grad():
        lp_logit, lp = plain.dpo_logits(inp, return_logprobs=True)
        n_logit = normed.dpo_logits(inp)
    d = (lp - inp.ref) / inp.seqs.response_mask.sum(1).float() * 10.0  # (2R,)
    d_a, d_b = d.chunk(2)
    torch.testing.assert_close(n_logit, plain.cfg.beta * (d_b - d_a))
    assert not torch.allclose(n_logit, lp_logit)


@pytest.mark.parametrize("family,gated", [(f, False) for f in FAMILIES] + [("llama", True)])
def test_length_grouped_scoring_gives_the_same_logits_and_gradients(family, gated, tok):
    """length_group_rows scores sorted groups of rows, each with its own rows' z: the same DPO
    logits and the same gradients as one padded batch (up to float rounding)."""
    pairs = toy_pairs()
    one = make_policy(family, tok, lora_gates=gated)
    _perturb(one)
    grouped = make_policy(family, tok, length_group_rows=3, lora_gates=gated)
    grouped.load_adapter_state(one.adapter_state())
    for p in (one, grouped):
        p.train()
    data, batch = _step_inputs(one, pairs)
    inp = data.inputs(one, batch, batch.target_mask)
    assert inp.seqs.input_ids.shape[0] > 3 and len(set(inp.seqs.attention_mask.sum(1).tolist())) > 1
    grads = []
    for p in (one, grouped):
        loss, _ = p(inp)
        p.zero_grad()
        loss.backward()
        grads.append({n: q.grad.clone() for n, q in p.named_parameters() if q.grad is not None})
    with torch.no_grad():
        torch.testing.assert_close(grouped.dpo_logits(inp), one.dpo_logits(inp), atol=1e-5, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("film.") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
    assert grouped.film._active is None  # the FiLM state is cleared after scoring


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_uncached(family, tok):
    policy = make_policy(family, tok)
    _perturb(policy)
    z = torch.randn(2, 4)
    cached = policy.generate(PROMPTS, z, max_new_tokens=12, return_tokens=True)
    uncached = policy.generate(PROMPTS, z, max_new_tokens=12, use_cache=False, return_tokens=True)
    assert cached == uncached
    assert any(len(t) > 0 for t in cached)


def test_stream_yields_growing_rows_and_ends_at_the_generated_text(tok):
    policy = make_policy("gpt2", tok)
    _perturb(policy)
    z = torch.randn(2, 4)
    final = policy.generate(PROMPTS, z, max_new_tokens=10)
    chunks = list(policy.stream(PROMPTS, z, max_new_tokens=10))
    assert 1 <= len(chunks) <= 10
    assert [c.strip() for c in chunks[-1]] == final


def test_seeded_sampling_is_reproducible_thread_safe_and_reduces_to_greedy(tok):
    policy = make_policy("gpt2", tok)
    _perturb(policy)
    z = torch.randn(2, 4)
    kw = dict(max_new_tokens=12, return_tokens=True, do_sample=True, temperature=1.5)
    a = policy.generate(PROMPTS, z, seed=7, **kw)
    torch.manual_seed(0)  # the global RNG plays no part
    assert policy.generate(PROMPTS, z, seed=7, **kw) == a
    assert any(policy.generate(PROMPTS, z, seed=s, **kw) != a for s in (8, 9, 10))
    # two seeded generations at once in two threads (the demo streams steered and baseline together)
    outs: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, policy.generate(PROMPTS, z, seed=7, **kw)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs[0] == outs[1] == a
    # a nucleus smaller than the top token's mass keeps only the top token: greedy
    greedy = policy.generate(PROMPTS, z, max_new_tokens=12, return_tokens=True)
    assert policy.generate(PROMPTS, z, seed=3, top_p=1e-6, **kw) == greedy
    with pytest.raises(ValueError, match="temperature"):
        policy.generate(PROMPTS, z, do_sample=True, temperature=0.0)


def test_answer_repetition_penalty_closed_form():
    from core.policy import AnswerRepetitionPenalty

    scores = torch.tensor([[2.0, -1.0, 3.0, 0.5, 4.0], [1.0, 1.0, -2.0, -3.0, 6.0]])  # (B=2, V=5)
    ids = torch.tensor([[0, 3, 2, 2, 4], [3, 3, 0, 0, 1]])  # prompt of 2 columns, then the answer so far
    out = AnswerRepetitionPenalty(2.0, prompt_len=2, exempt=[4])(ids, scores)
    # row 0's answer is 2, 2, 4: token 2 is penalised once however often it appears, 4 is exempt (the
    # end of turn), 0 and 3 sit only in the prompt; row 1's answer is 0, 0, 1
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.0, 1.5, 0.5, 4.0], [0.5, 0.5, -2.0, -3.0, 6.0]]))
    torch.testing.assert_close(AnswerRepetitionPenalty(2.0, 5)(ids, scores), scores)  # nothing generated yet
    neg = AnswerRepetitionPenalty(3.0, 0)(torch.tensor([[1]]), torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(neg, torch.tensor([[0.0, -3.0]]))  # a negative logit is multiplied
    with pytest.raises(ValueError, match="repetition_penalty"):
        AnswerRepetitionPenalty(0.0, 1)


def test_repetition_controls_in_decoding(tok):
    policy = make_policy("gpt2", tok)
    _perturb(policy)
    z = torch.randn(2, 4)
    plain = policy.generate(PROMPTS, z, max_new_tokens=40, return_tokens=True)
    assert policy.generate(PROMPTS, z, max_new_tokens=40, return_tokens=True, repetition_penalty=1.0,
                           no_repeat_ngram_size=0) == plain  # the neutral values are plain greedy decoding

    def repeats(row: list[int], n: int) -> int:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        return len(grams) - len(set(grams))

    assert any(repeats(r, 2) for r in plain)  # the perturbed toy policy loops, so the control has work to do
    capped = policy.generate(PROMPTS, z, max_new_tokens=40, return_tokens=True, no_repeat_ngram_size=2)
    assert all(repeats(r, 2) == 0 for r in capped)
    sampled = policy.generate(PROMPTS, z, max_new_tokens=40, return_tokens=True, no_repeat_ngram_size=2,
                              do_sample=True, temperature=1.5, seed=3)
    assert all(repeats(r, 2) == 0 for r in sampled)  # applied before our seeded sampler draws
    penalised = policy.generate(PROMPTS, z, max_new_tokens=40, return_tokens=True, repetition_penalty=5.0)
    assert penalised != plain
    with pytest.raises(ValueError, match="repetition_penalty"):
        policy.generate(PROMPTS, z, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        policy.generate(PROMPTS, z, no_repeat_ngram_size=-1)


def test_lm_embedder_last_token_is_padding_invariant(tok):
    policy = make_policy("llama", tok)
    _perturb(policy)
    assert last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]
    emb = LMEmbedder(policy.lm, tok, "tiny", context=policy.reference)
    texts = ["Try tea daily.", "Here is a thorough answer about chess. First, start slowly."]
    tok.padding_side = "right"
    right = emb.embed(texts)
    tok.padding_side = "left"
    left = emb.embed(texts)
    tok.padding_side = "right"
    alone = emb.embed(texts[:1])
    torch.testing.assert_close(right, left, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(right[:1], alone, rtol=1e-4, atol=1e-5)


def _train(tmp_path, family, tok, model="np-dpo", steps=30, model_overrides=None, base_seed=0, **kw):
    pairs = toy_pairs()
    run = policy_run_config({"train": {"steps": steps, "batch_size": 4, "lr": 3e-2, "warmup_steps": 2,
                                       "eval_every": 10, "val_tasks": 4, "checkpoint_every": 10},
                             "tasks": {"n_targets": 4, "max_context": 3},
                             "model": {"d_z": 4, "d_in": 4, "lora_r": 4, "lora_alpha": 8, **(model_overrides or {})}})
    base = (tiny_model(family, tok, seed=base_seed), tok, {"kind": "test", "name": f"tiny-{family}"})
    meta = train_policy(pairs, model, tmp_path / "bundle", run, base, emb=toy_emb(pairs), include_base=True,
                        quiet=True, **kw)
    return pairs, meta


def test_trained_rows_with_different_z_differ_and_bundle_round_trips(tmp_path, tok):
    pairs, meta = _train(tmp_path, "llama", tok)
    assert meta["metrics"]["history"] and meta["base"]["kind"] == "test"
    policy, bmeta = load_policy_bundle(tmp_path / "bundle")
    assert bmeta["base"]["kind"] == "bundled" and bmeta["model"] == "np-dpo"
    ea, eb = toy_emb(pairs)
    # one context pair per opposite user: the short answer chosen vs the long one chosen
    i = 0
    short_is_a = len(pairs.a[i]) < len(pairs.b[i])
    z = policy.latent(ea[[i, i]][:, None], eb[[i, i]][:, None],
                      torch.tensor([[0.0 if short_is_a else 1.0], [1.0 if short_is_a else 0.0]]),
                      torch.ones(2, 1, dtype=torch.bool))
    s = collate(policy.encode(PROMPTS[:1] * 2, ["Try tea daily."] * 2), policy.pad_id)
    with torch.no_grad(), policy.conditioned(z):
        lp = policy.sequence_logprobs(s)
    assert abs(lp[0] - lp[1]) > 1e-3  # the two users' rows differ
    # exact round trip: a second load gives identical tensors and log-probs
    again, _ = load_policy_bundle(tmp_path / "bundle")
    a, b = policy.adapter_state(), again.adapter_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad(), again.conditioned(z):
        assert torch.equal(again.sequence_logprobs(s), lp)


def test_dpo_baseline_has_no_encoder_and_tampered_bundles_fail(tmp_path, tok):
    _train(tmp_path, "gpt2", tok, model="dpo", steps=6)
    policy, meta = load_policy_bundle(tmp_path / "bundle")
    assert policy.encoder is None and policy.film is None and meta["embedder"] is None
    with pytest.raises(ValueError, match="unconditioned"):
        policy.generate(PROMPTS, torch.zeros(2, 4))
    f = tmp_path / "bundle" / "adapter" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="adapter_model.safetensors does not match its sha256"):
        load_policy_bundle(tmp_path / "bundle")


def test_policy_bundle_names_missing_and_unexpected_keys(tmp_path, tok):
    policy = make_policy("qwen2", tok)
    save_policy_bundle(tmp_path / "b", policy, {"base": {"kind": "test", "name": "tiny-qwen2"}, "model": "np-dpo"},
                       include_base=True)
    # peft's record of the folder the base came from is replaced by the base's name: no build path
    assert json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "tiny-qwen2"
    from core.bundle import read_manifest, save_bundle, read_file_checked

    meta = read_manifest(tmp_path / "b")
    files = {n: read_file_checked(tmp_path / "b", n, meta) for n in meta["files"]}
    from safetensors.torch import load as st_load

    film = st_load(files.pop("film.safetensors"))
    film["extra"] = torch.zeros(1)
    del film["bias"]
    body = {k: v for k, v in meta.items() if k not in ("files", "format_version")}
    save_bundle(tmp_path / "c", body, {"film": film}, files)
    with pytest.raises(BundleError, match=r"missing keys \['film.bias'\].*unexpected keys \['film.extra'\]"):
        load_policy_bundle(tmp_path / "c")


def test_reference_cache_holds_the_base_log_probs_and_is_shared_and_checked(tmp_path, tok, monkeypatch, capsys):
    from core.bundle import load_bundle_tensors, read_manifest

    cache = tmp_path / "reference"
    pairs, _ = _train(tmp_path / "np", "gpt2", tok, steps=4, reference_cache=cache)
    ref = load_bundle_tensors(cache, "reference", read_manifest(cache))["ref"]  # (n, 2)
    rows = np.concatenate([pairs.indices("train"), pairs.indices("val")])
    assert torch.isnan(ref[pairs.indices("test")]).all()  # never scored in training
    # each row is the base's own log-prob of a and b (adapters off), whatever it was batched with
    policy = make_policy("gpt2", tok, seed=0)
    s = collate(policy.encode([pairs.prompts[i] for i in rows] * 2,
                              [pairs.a[i] for i in rows] + [pairs.b[i] for i in rows]), policy.pad_id)
    with torch.no_grad():
        want = policy.reference_logprobs(s)  # (2m,)
    torch.testing.assert_close(ref[rows], torch.stack(want.chunk(2), 1), rtol=1e-4, atol=1e-4)

    # a second policy on the same base (the DPO baseline) loads the table: no reference forward at all
    def no_forward(self, *a, **k):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(SteerablePolicy, "reference_logprobs", no_forward)
    _train(tmp_path / "dpo", "gpt2", tok, model="dpo", steps=4, reference_cache=cache)
    monkeypatch.undo()

    # another base's weights do not match: recomputed, with a note, and the folder rewritten
    capsys.readouterr()
    _train(tmp_path / "other", "gpt2", tok, model="dpo", steps=2, base_seed=1, reference_cache=cache)
    assert "reference log-probs for another base" in capsys.readouterr().err
    other = load_bundle_tensors(cache, "reference", read_manifest(cache))["ref"]
    assert not torch.allclose(other[rows], ref[rows])


def test_precomputed_reference_is_what_training_loads(tmp_path, tok, monkeypatch):
    from core.bundle import load_bundle_tensors, read_manifest
    from core.train import precompute_reference

    pairs = toy_pairs()
    run = policy_run_config({"train": {"steps": 2, "batch_size": 4}, "tasks": {"n_targets": 4, "max_context": 3},
                             "model": {"d_z": 4, "d_in": 4, "lora_r": 4, "lora_alpha": 8}})
    base = (tiny_model("gpt2", tok, seed=0), tok, {"kind": "test", "name": "tiny-gpt2"})
    path = precompute_reference(pairs, run, base, tmp_path / "reference")
    first = (path / "reference.safetensors").read_bytes()
    # a matching folder is left as it is (no second computation)
    monkeypatch.setattr(SteerablePolicy, "reference_logprobs", lambda *a, **k: pytest.fail("recomputed"))
    precompute_reference(pairs, run, (tiny_model("gpt2", tok, seed=0), tok, base[2]), path)
    assert (path / "reference.safetensors").read_bytes() == first
    _train(tmp_path / "np", "gpt2", tok, steps=3, reference_cache=path)  # trains without a reference forward
    ref = load_bundle_tensors(path, "reference", read_manifest(path))["ref"]
    assert not torch.isnan(ref[np.concatenate([pairs.indices("train"), pairs.indices("val")])]).any()


def test_train_policy_resumes_to_the_same_bundle(tmp_path, tok, monkeypatch):
    import core.train as tr

    _, full = _train(tmp_path / "full", "gpt2", tok, steps=20)
    real = tr.TaskSampler.sample

    def crash(self, index, *a, **k):
        if index == 14:  # training batch 14; validation batches sit at large offsets
            raise KeyboardInterrupt
        return real(self, index, *a, **k)

    monkeypatch.setattr(tr.TaskSampler, "sample", crash)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", "gpt2", tok, steps=20)
    monkeypatch.setattr(tr.TaskSampler, "sample", real)
    assert (tmp_path / "cut" / "bundle.ckpt").is_dir()
    _, resumed = _train(tmp_path / "cut", "gpt2", tok, steps=20)
    a, _ = load_policy_bundle(tmp_path / "full" / "bundle")
    b, _ = load_policy_bundle(tmp_path / "cut" / "bundle")
    sa, sb = a.adapter_state(), b.adapter_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full["metrics"]["history"] == resumed["metrics"]["history"]


def test_policy_cli_trains_and_evaluates_from_a_local_base_folder(tmp_path, tok, capsys):
    from core.data.pairs import write_pairs
    from core.evaluate import main as evaluate_main
    from core.train import main as train_main

    tiny_model("llama", tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    write_pairs(tmp_path / "pairs.jsonl", toy_pairs())
    (tmp_path / "run.yaml").write_text(
        "train: {steps: 4, batch_size: 2, eval_every: 2, val_tasks: 2, warmup_steps: 1}\n"
        "tasks: {n_targets: 4, max_context: 3}\n"
        "model: {embedder: base, d_z: 4, lora_r: 2, lora_alpha: 4}\n")
    out = tmp_path / "pol"
    rc = train_main(["policy", "--pairs", str(tmp_path / "pairs.jsonl"), "--base", str(tmp_path / "base"),
                     "--model", "np-dpo", "--out", str(out), "--config", str(tmp_path / "run.yaml"), "--quiet"])
    assert rc == 0 and (out / "adapter" / "adapter_config.json").is_file()
    rc = evaluate_main(["policy", "--bundle", str(out), "--pairs", str(tmp_path / "pairs.jsonl"),
                        "--contexts", "0,1", "--tasks", "3", "--targets", "4", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["accuracy"]) == {"terse", "thorough"} and set(res["accuracy"]["terse"]) == {"0", "1"}
    assert set(res["conflict_sum"]["terse + thorough"]) == {"0", "1"}
    cell = res["conflict_sum"]["terse + thorough"]["1"]
    assert cell["sum"] == pytest.approx(cell["terse"] + cell["thorough"])
    # a base that does not exist gets a message, not a traceback
    rc = train_main(["policy", "--pairs", str(tmp_path / "pairs.jsonl"), "--base", str(tmp_path / "nope"),
                     "--model", "dpo", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_sft_term_adds_the_chosen_per_token_nll(tok):
    pairs = toy_pairs()
    plain = make_policy("llama", tok)
    sft = make_policy("llama", tok, sft_weight=0.5)
    data, batch = _step_inputs(plain, pairs)
    inp = data.inputs(plain, batch, batch.target_mask)
    with torch.no_grad():
        l0, m0 = plain(inp)
        l1, m1 = sft(inp)
        lp = plain.sequence_logprobs(inp.seqs) / inp.seqs.response_mask.sum(1)  # (2R,) per-token
    a, b = lp.chunk(2)
    want = -torch.where(inp.choice > 0.5, b, a).mean()
    torch.testing.assert_close(l1 - l0, 0.5 * want, rtol=1e-5, atol=1e-5)
    assert m1["sft_nll"] == pytest.approx(want.item(), rel=1e-5)


def test_film_output_keeps_standard_strides_while_decoding(tok):
    """Odd strides from a broadcast view would push CPU matmuls onto a 3x slower copying path."""
    policy = make_policy("llama", tok)
    _perturb(policy)
    layers = find_decoder_layers(policy.lm)
    seen = []
    layers[-1].register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).stride()))
    policy.generate(PROMPTS, torch.randn(2, 4), max_new_tokens=3, min_new_tokens=3)
    assert len(seen) == 3
    for st, T in zip(seen, [None, 1, 1]):
        if T == 1:
            assert st == (1 * 64, 64, 1)


def test_reference_shares_the_weights_and_merging_keeps_outputs(tok):
    policy = make_policy("llama", tok)
    _perturb(policy)
    base_params = sum(p.numel() for n, p in policy.lm.named_parameters() if "lora_" not in n)
    storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert len(storages) == len(list(policy.parameters()))  # nothing duplicated
    fresh = tiny_model("llama", tok)
    assert base_params == sum(p.numel() for p in fresh.parameters())  # one copy of the base, no reference copy
    s = collate(policy.encode(PROMPTS, ["Try tea daily.", "Try chess daily."]), policy.pad_id)
    z = torch.randn(2, 4)
    with torch.no_grad():
        ref = policy.reference_logprobs(s)
        with policy.conditioned(z):
            steered = policy.sequence_logprobs(s)
        policy.merge_for_inference()
        assert policy.merged
        with policy.conditioned(z):
            torch.testing.assert_close(policy.sequence_logprobs(s), steered, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(policy.reference_logprobs(s), ref, rtol=1e-4, atol=1e-4)
    assert policy.merged


def test_length_bucketed_batches_pad_less_and_keep_the_draws():
    from core.tinylm import length_bucketed_batches

    lengths = [int(x) for x in torch.randint(5, 200, (500,), generator=torch.Generator().manual_seed(0))]
    plain = length_bucketed_batches(lengths, 16, 64, 1, torch.Generator().manual_seed(1))
    bucketed = length_bucketed_batches(lengths, 16, 64, 8, torch.Generator().manual_seed(1))
    assert len(bucketed) == 64 and all(len(b) == 16 for b in bucketed)
    # the same draws, only regrouped: the first 8 batches hold the first 128 draws
    g = torch.Generator().manual_seed(1)
    first = torch.randint(len(lengths), (16 * 8,), generator=g).tolist()
    assert sorted(i for b in bucketed[:8] for i in b) == sorted(first)

    def real(batches):  # share of a padded batch that is real tokens
        return sum(sum(lengths[i] for i in b) for b in batches) / sum(16 * max(lengths[i] for i in b) for b in batches)

    assert real(bucketed) > 0.8 > real(plain)
    assert length_bucketed_batches(lengths, 16, 64, 8, torch.Generator().manual_seed(1)) == bucketed
    with pytest.raises(ValueError, match="buckets"):
        length_bucketed_batches(lengths, 16, 4, 0, torch.Generator())


def test_train_lm_with_length_buckets_learns_and_is_reproducible(tok):
    from core.tinylm import train_lm

    examples = [(f"How do I get into {t}?", a) for t in TOPICS for a in _answers(t)]
    runs = []
    for _ in range(2):
        model = tiny_model("gpt2", tok, seed=0, dropout=0.0)
        hist = train_lm(model, tok, examples, steps=40, batch_size=4, lr=1e-2, seed=0, log_every=10, length_buckets=4)
        runs.append((hist, model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0][-1]["loss"] < 0.6 * runs[0][0][0]["loss"]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gates_start_as_plain_lora_then_steer_each_row(family, tok):
    """z-gated LoRA: with the gates at zero it is exactly the plain LoRA (for any z); trained
    gates make rows with different z differ, each row as if run alone; the reference ignores them."""
    plain = make_policy(family, tok)
    _perturb(plain)
    gated = make_policy(family, tok, lora_gates=True)
    state = plain.adapter_state()
    state["film.gate_weight"] = torch.zeros_like(gated.film.gate_weight)
    gated.load_adapter_state(state)
    n_lora = sum(1 for n, _ in gated.lm.named_modules() if n.endswith(".lora_A"))
    assert gated.film.gate_weight.shape == (n_lora, gated.cfg.lora_r, 4) and n_lora > 0
    enc = tok(PROMPTS[:1] * 2, return_tensors="pt")
    z = 3 * torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with plain.conditioned(z):
            want = plain.lm(**enc).logits
        with gated.conditioned(z):
            assert torch.equal(gated.lm(**enc).logits, want)
        gated.film.gate_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        both = _rows_as_if_alone(gated, enc, z)
        assert not torch.allclose(both, want, atol=1e-4)  # the gates change the update
        # with the same z on both rows, FiLM's and the gates' effects are the row's own
        with gated.conditioned(z[:1].expand(2, -1).contiguous()):
            same = gated.lm(**enc).logits
        torch.testing.assert_close(same[0], same[1])
        s = collate(gated.encode(PROMPTS, ["Try tea daily.", "Here is a thorough answer about chess."]), gated.pad_id)
        with gated.conditioned(z):
            ref_g = gated.reference_logprobs(s)
        torch.testing.assert_close(ref_g, plain.reference_logprobs(s))


def test_gated_policy_stays_unmerged_and_round_trips(tmp_path, tok):
    pairs, meta = _train(tmp_path, "gpt2", tok, steps=12, model_overrides={"lora_gates": True})
    policy, bmeta = load_policy_bundle(tmp_path / "bundle")
    assert policy.cfg.lora_gates and policy.film.gated and bmeta["policy_config"]["lora_gates"] is True
    assert policy.film.gate_weight.abs().sum() > 0  # trained
    s = collate(policy.encode(PROMPTS, ["Try tea daily."] * 2), policy.pad_id)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), policy.conditioned(z):
        before = policy.sequence_logprobs(s)
    policy.merge_for_inference()
    assert not policy.merged  # a z-dependent update cannot live in the base weights
    with torch.no_grad(), policy.conditioned(z):
        assert torch.equal(policy.sequence_logprobs(s), before)
    with pytest.raises(ValueError, match="lora_gates needs a conditioned policy"):
        PolicyConfig(base="tiny", conditioned=False, lora_gates=True)


def test_tiny_config_activation():
    from transformers.activations import ACT2FN

    from core.tinylm import tiny_config

    assert tiny_config("gpt2", 64).activation_function == "gelu_new"  # the family's default when not given
    assert tiny_config("gpt2", 64, activation="gelu").activation_function == "gelu"
    assert tiny_config("llama", 64, activation="gelu").hidden_act == "gelu"
    tok = train_tokenizer(["hello there", "general kenobi"], vocab_size=300)
    m = tiny_model("gpt2", tok, activation="gelu")
    assert all(type(blk.mlp.act) is type(ACT2FN["gelu"]) for blk in m.transformer.h)


def _toy_teacher(tmp_path):
    """A random NP-BTL reward bundle on the toy 4-d option features."""
    from core.bundle import save_reward_bundle
    from core.reward import PreferenceModel, config_from_dict

    torch.manual_seed(4)
    model = PreferenceModel(config_from_dict({"model": "np-btl-latent", "d_in": 4, "d_hidden": 16,
                                              "decoder": "bilinear", "encoder": {"d_z": 4}}))
    save_reward_bundle(tmp_path / "teacher", model, {"model": "np-btl-latent"})
    return tmp_path / "teacher"


def test_teacher_rewards_give_the_reward_models_predictions(tmp_path, tok):
    from core.bundle import load_reward_bundle
    from core.data.tasks import TaskSampler
    from core.reward import gather_features
    from core.train import _teacher_rewards

    pairs = toy_pairs()
    teacher, _ = load_reward_bundle(_toy_teacher(tmp_path))
    policy = make_policy("gpt2", tok)
    data = PolicyData(policy, pairs, toy_emb(pairs))
    sampler = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3), "train", seed=0)
    batch = sampler.sample(0, 3)
    score = batch.target_mask.clone()
    score[0, 1] = False  # rows follow the scored targets, as in PolicyData.inputs
    r = _teacher_rewards(teacher, data, batch, score, torch.device("cpu"))  # (2R,)
    R = int(score.sum())
    assert r.shape == (2 * R,)
    r_a, r_b = r.chunk(2)
    with torch.no_grad():
        want = torch.sigmoid(teacher.logits(gather_features(batch, data.emb_a, data.emb_b)))[score]  # (R,)
    p = torch.sigmoid(r_b - r_a)
    torch.testing.assert_close(p, want)
    assert ((p > 0) & (p < 1)).all()


def grouped_pairs():
    """Three pairs per prompt over four answers per topic, one answer repeated across pairs."""
    recs = []
    for i, t in enumerate(TOPICS):
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        short, long = _answers(t)
        mid, tiny = f"Start {t} slowly, then practise it every day.", f"{t.title()}: daily."
        for k, (a, b) in enumerate([(short, long), (mid, tiny), (short, mid)]):
            b_long = len(b) > len(a)
            recs.append({"id": f"{t}-{k}", "prompt": f"How do I get into {t}?", "a": a, "b": b,
                         "choices": {"terse": 0 if b_long else 1, "thorough": 1 if b_long else 0}, "split": split})
    return pairs_from_records(recs, "grouped")


def test_prompt_groups_draw_targets_on_shared_prompts():
    from core.data.tasks import TaskSampler

    pairs = grouped_pairs()
    sampler = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, prompt_group=2, context_mode="disjoint"),
                          "train", seed=0)
    train = set(pairs.indices("train").tolist())
    for step in range(5):
        batch = sampler.sample(step, 3)
        for row in batch.target_idx.tolist():
            assert len(set(row)) == 4 and set(row) <= train
            prompts = [pairs.prompts[r] for r in row]
            assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    again = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, prompt_group=2, context_mode="disjoint"),
                        "train", seed=0).sample(3, 3)
    assert torch.equal(again.target_idx, sampler.sample(3, 3).target_idx)  # a pure function of (seed, step)
    with pytest.raises(ValueError, match="prompt_group must be >= 1 and divide n_targets"):
        TaskConfig(n_targets=4, max_context=3, prompt_group=3)
    with pytest.raises(ValueError, match="prompts have 4 or more target pairs"):
        TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, prompt_group=4, context_mode="disjoint"), "train")


def test_cross_pairs_compare_every_other_answer_to_a_prompt_once(tok):
    from core.data.tasks import TaskSampler

    pairs = grouped_pairs()
    policy = make_policy("gpt2", tok)
    data = PolicyData(policy, pairs, toy_emb(pairs))
    sampler = TaskSampler(pairs, TaskConfig(n_targets=6, max_context=3, prompt_group=3, context_mode="disjoint"),
                          "train", seed=0)
    batch = sampler.sample(0, 2)  # each task: all three pairs of two prompts (4 distinct answers per prompt)
    ia, ib = data.cross_pairs(batch, batch.target_mask)
    task, pos = batch.target_mask.nonzero(as_tuple=True)
    idx = batch.target_idx[task, pos].tolist()
    R = len(idx)
    text = [pairs.a[i] for i in idx] + [pairs.b[i] for i in idx]
    prompt = [pairs.prompts[idx[k % R]] for k in range(2 * R)]
    keys = set()
    for i, j in zip(ia.tolist(), ib.tolist()):
        assert task[i % R] == task[j % R] and prompt[i] == prompt[j] and text[i] != text[j]
        key = (int(task[i % R]), frozenset((text[i], text[j])))
        assert key not in keys
        keys.add(key)
    targets = {(int(task[k]), frozenset((text[k], text[k + R]))) for k in range(R)}
    assert not keys & targets
    # 4 distinct answers per prompt: C(4, 2) = 6 pairs, 3 of them the targets themselves
    assert len(keys) == 2 * 2 * (6 - 3)
    # with one pair per prompt there is nothing else to compare
    plain = TaskSampler(toy_pairs(), TaskConfig(n_targets=4, max_context=3), "train", seed=0).sample(0, 2)
    toy = PolicyData(policy, toy_pairs(), toy_emb(toy_pairs()))
    assert len(toy.cross_pairs(plain, plain.target_mask)[0]) == 0


def test_np_dpo_loss_adds_the_cross_pairs_at_their_targets(tok):
    from core.data.tasks import TaskSampler
    from core.losses import btl_nll

    pairs = grouped_pairs()
    policy = make_policy("gpt2", tok, teacher_weight=1.0, teacher_all_pairs=True)
    _perturb(policy)
    data = PolicyData(policy, pairs, toy_emb(pairs))
    batch = TaskSampler(pairs, TaskConfig(n_targets=6, max_context=3, prompt_group=3, context_mode="disjoint"),
                        "train", seed=0).sample(1, 2)
    inp = data.inputs(policy, batch, batch.target_mask)
    inp.target = torch.full_like(inp.choice, 0.7)
    plain_loss, _ = policy(inp)
    inp.cross_a, inp.cross_b = data.cross_pairs(batch, batch.target_mask)
    inp.cross_target = torch.linspace(0.1, 0.9, len(inp.cross_a))
    loss, metrics = policy(inp)
    with torch.no_grad():
        d, _ = policy.log_ratios(inp)  # (2R,)
        d_a, d_b = d.chunk(2)
        beta = policy.cfg.beta
        nll = torch.cat([btl_nll(beta * (d_b - d_a), inp.target),
                         btl_nll(beta * (d[inp.cross_b] - d[inp.cross_a]), inp.cross_target)])
    torch.testing.assert_close(loss, nll.mean())
    torch.testing.assert_close(plain_loss, btl_nll(beta * (d_b - d_a), inp.target).mean())
    assert not torch.allclose(loss, plain_loss)
    torch.testing.assert_close(policy.dpo_logits(inp), beta * (d_b - d_a))  # the pairs' logits are unchanged
    with pytest.raises(ValueError, match="teacher_all_pairs needs NP-DPO with a teacher"):
        PolicyConfig(base="tiny", d_in=4, d_z=4, teacher_all_pairs=True)


def test_teacher_blends_into_np_dpo_targets_and_bad_settings_are_refused(tmp_path, tok, monkeypatch):
    import core.policy as pol

    teacher = _toy_teacher(tmp_path)
    seen = []
    real = pol.SteerablePolicy.forward

    def spy(self, inp):
        seen.append((inp.choice.clone(), None if inp.target is None else inp.target.clone()))
        return real(self, inp)

    monkeypatch.setattr(pol.SteerablePolicy, "forward", spy)
    _, meta = _train(tmp_path / "t", "gpt2", tok, steps=3, model_overrides={"teacher_weight": 0.25}, teacher=teacher)
    monkeypatch.undo()
    assert meta["teacher"] == str(teacher) and len(seen) == 3
    for choice, target in seen:
        # (1 - w) click + w p: within w of the click, and strictly between 0 and 1
        assert target is not None and ((target - choice).abs() <= 0.25 + 1e-6).all()
        assert ((target > 0) & (target < 1)).all()
    with pytest.raises(ValueError, match="needs a teacher"):
        _train(tmp_path / "a", "gpt2", tok, steps=1, model_overrides={"teacher_weight": 0.5})
    with pytest.raises(ValueError, match="needs a teacher"):
        _train(tmp_path / "b", "gpt2", tok, steps=1, teacher=teacher)
    with pytest.raises(ValueError, match="teacher_weight needs a conditioned policy"):
        _train(tmp_path / "c", "gpt2", tok, model="dpo", steps=1, model_overrides={"teacher_weight": 0.5},
               teacher=teacher)


def test_teacher_context_reaches_only_the_teacher(tmp_path, tok, monkeypatch):
    import core.train as tr

    teacher = _toy_teacher(tmp_path)
    seen = []
    real = tr._teacher_rewards

    def spy(model, data, batch, score, device):
        seen.append((batch.n_context.clone(), batch.teacher_view().n_context.clone()))
        return real(model, data, batch, score, device)

    monkeypatch.setattr(tr, "_teacher_rewards", spy)
    pairs = toy_pairs()
    run = policy_run_config({"train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2,
                                       "val_tasks": 2, "checkpoint_every": 2},
                             "tasks": {"n_targets": 2, "max_context": 2, "min_context": 1, "context_mode": "disjoint",
                                       "teacher_context": 3},
                             "model": {"d_z": 4, "d_in": 4, "lora_r": 4, "lora_alpha": 8, "teacher_weight": 1.0}})
    base = (tiny_model("gpt2", tok, seed=0), tok, {"kind": "test", "name": "tiny-gpt2"})
    train_policy(pairs, "np-dpo", tmp_path / "b", run, base, emb=toy_emb(pairs), quiet=True, teacher=teacher)
    assert len(seen) == 2
    for policy_n, teacher_n in seen:  # the policy's context is 1-2 clicks, the teacher's 3 more
        assert ((policy_n >= 1) & (policy_n <= 2)).all() and torch.equal(teacher_n, policy_n + 3)
    run.model["teacher_weight"] = 0.0  # the extra clicks with no teacher to read them
    with pytest.raises(ValueError, match="only a teacher reads"):
        train_policy(pairs, "np-dpo", tmp_path / "c", run, base, emb=toy_emb(pairs), quiet=True)


def test_training_with_all_pairs_sends_the_teachers_cross_targets(tmp_path, tok, monkeypatch):
    import core.policy as pol

    teacher = _toy_teacher(tmp_path)
    seen = []
    real = pol.SteerablePolicy.forward

    def spy(self, inp):
        seen.append(inp)
        return real(self, inp)

    monkeypatch.setattr(pol.SteerablePolicy, "forward", spy)
    pairs = grouped_pairs()
    run = policy_run_config({"train": {"steps": 3, "batch_size": 2, "lr": 3e-2, "warmup_steps": 1, "eval_every": 10,
                                       "val_tasks": 2, "checkpoint_every": 10},
                             "tasks": {"n_targets": 4, "max_context": 3, "prompt_group": 2, "context_mode": "disjoint"},
                             "model": {"d_z": 4, "d_in": 4, "lora_r": 4, "lora_alpha": 8, "teacher_weight": 1.0,
                                       "teacher_all_pairs": True}})
    base = (tiny_model("gpt2", tok, seed=0), tok, {"kind": "test", "name": "tiny-gpt2"})
    meta = train_policy(pairs, "np-dpo", tmp_path / "bundle", run, base, emb=toy_emb(pairs), quiet=True,
                        include_base=True, teacher=teacher)
    monkeypatch.undo()
    assert len(seen) == 3
    for inp in seen:
        assert inp.cross_a is not None and len(inp.cross_a) > 0 and ((inp.cross_target > 0) & (inp.cross_target < 1)).all()
        assert inp.cross_a.max() < inp.seqs.input_ids.shape[0] and inp.cross_b.max() < inp.seqs.input_ids.shape[0]
    assert meta["run_config"]["tasks"]["prompt_group"] == 2
    policy, bmeta = load_policy_bundle(tmp_path / "bundle")
    assert policy.cfg.teacher_all_pairs and bmeta["policy_config"]["teacher_all_pairs"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_film_is_identity_at_init_then_biases_each_logit(family, tok):
    base = tiny_model(family, tok, seed=3)
    policy = make_policy(family, tok, seed=3, film_final_norm=True)
    film = policy.film
    n_blocks = len(film.cfg.modulated())
    assert film.cfg.n_sites() == n_blocks + 1 and film.weight.shape[0] == n_blocks + 1
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    z = 5 * torch.randn(2, 4)
    with torch.no_grad():
        want = base(**enc).logits  # (2, T, V)
        with policy.conditioned(z):
            assert torch.equal(policy.lm(**enc).logits, want)  # zero FiLM: exactly the base for any z
        # only the final norm's shift β(z) set: every position's logits move by E·β(z), E the output embeddings
        H = film.cfg.hidden_size
        film.weight[n_blocks, H:].normal_(0.0, 0.5)
        with policy.conditioned(z):
            got = policy.lm(**enc).logits
        shift = z @ film.weight[n_blocks, H:].T  # (2, H): β(z) of each row
        head = unwrap(policy.lm).get_output_embeddings()
        bias = shift @ head.weight.T  # (2, V)
        torch.testing.assert_close(got, want + bias[:, None, :], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[0, -1] - want[0, -1], got[1, -1] - want[1, -1])  # each row its own z
    with pytest.raises(ValueError, match="film_final_norm needs a conditioned policy"):
        PolicyConfig(base="tiny", conditioned=False, d_in=4, d_z=4, film_final_norm=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_film_hidden_generator_is_identity_at_init_then_a_nonlinear_bias(family, tok):
    """film_hidden: the factors get W_o·gelu(W_h z + b_h) beside the affine map; W_o starts at zero."""
    base = tiny_model(family, tok, seed=3)
    policy = make_policy(family, tok, seed=3, film_final_norm=True, film_hidden=6)
    film = policy.film
    assert film.hidden_weight.shape == (6, 4) and film.out_weight.shape == (film.cfg.n_sites(), 2 * film.cfg.hidden_size, 6)
    assert film.hidden_weight.abs().sum() > 0 and not film.out_weight.any()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    z = 5 * torch.randn(2, 4)
    with torch.no_grad():
        want = base(**enc).logits  # (2, T, V)
        with policy.conditioned(z):
            assert torch.equal(policy.lm(**enc).logits, want)  # exactly the base for any z
        # only the hidden path's final-norm shift set: logits move by E·W_o·gelu(W_h z + b_h), row by row
        n, H = len(film.cfg.modulated()), film.cfg.hidden_size
        film.out_weight[n, H:].normal_(0.0, 0.5)
        film.hidden_bias.normal_(0.0, 0.5)
        with policy.conditioned(z):
            got = policy.lm(**enc).logits
        hidden = torch.nn.functional.gelu(z @ film.hidden_weight.T + film.hidden_bias)  # (2, 6)
        bias = (hidden @ film.out_weight[n, H:].T) @ unwrap(policy.lm).get_output_embeddings().weight.T  # (2, V)
        torch.testing.assert_close(got, want + bias[:, None, :], rtol=1e-4, atol=1e-4)
        # nonlinear in z: the shift of z and of 2z are not in proportion (the affine path's would be)
        s1, s2 = (torch.nn.functional.gelu(zz @ film.hidden_weight.T + film.hidden_bias) for zz in (z, 2 * z))
        assert not torch.allclose(2 * s1, s2, atol=1e-3)
    # the trained tensors round-trip strictly, and a policy without the hidden path refuses them
    state = policy.adapter_state()
    assert {"film.hidden_weight", "film.hidden_bias", "film.out_weight"} <= set(state)
    other = make_policy(family, tok, seed=4, film_final_norm=True, film_hidden=6)
    other.load_adapter_state(state)
    for k, v in other.adapter_state().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match=r"unexpected keys \[.film.hidden_bias., .film.hidden_weight., .film.out_weight.\]"):
        make_policy(family, tok, seed=4, film_final_norm=True).load_adapter_state(state)
    with pytest.raises(ValueError, match="film_hidden needs a conditioned policy"):
        PolicyConfig(base="tiny", conditioned=False, d_in=4, d_z=4, film_hidden=4)
    with pytest.raises(ValueError, match="film_hidden must be >= 0"):
        PolicyConfig(base="tiny", d_in=4, d_z=4, film_hidden=-1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_response_ids_equal_one_at_a_time(family, tok):
    policy = make_policy(family, tok)
    responses = ["Try tea daily.", "  Here is a thorough answer about chess. First, start slowly. ", "", "ok" * 300]
    one = [policy.chat.response_ids(r, 40) for r in responses]
    assert policy.chat.responses_ids(responses, 40) == one
    assert policy.chat.responses_ids([], 40) == []
    assert [r for _, r in policy.encode(["How do I get into tea?"] * 4, responses)] == [
        policy.chat.response_ids(r, policy.cfg.max_response_tokens) for r in responses]
    with pytest.raises(ValueError):  # every response needs its prompt
        policy.encode(["How do I get into tea?"], responses)
