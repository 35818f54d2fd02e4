"""The persona world: content, responses, gold scorers, archetype choices, pairs files."""

import collections
import json
import math
import re

import numpy as np
import pytest

from core.data import personas as P
from core.data.pairs import SPLITS, load_pairs, pairs_from_records, write_pairs

SMALL = dict(n_pairs_per_request=2)


@pytest.fixture(scope="module")
def records():
    return P.generate_pairs(P.PersonaConfig(seed=0, conflict_rate=0.5, choice_temperature=0.0, **SMALL))


def _first_sentence(text):
    return re.split(r"(?<=[.!?])\s+", text.strip())[0]


# --- content -----------------------------------------------------------------------------------

def test_counts_and_unique_prompts():
    assert len(P.REQUESTS) >= 300
    assert len(P.TOPICS) >= 40
    assert len({r.text for r in P.REQUESTS}) == len(P.REQUESTS)
    assert len({r.id for r in P.REQUESTS}) == len(P.REQUESTS)
    for t in P.TOPICS:
        assert len(t.tips) >= 6 and all(tip.text and tip.reason for tip in t.tips)


def test_content_is_tone_neutral():
    """Tips, reasons and goals carry no tone cues beyond contractible forms, so the register of a
    response comes from its frames only."""
    for topic in P.TOPICS:
        for s in [topic.goal] + [x for tip in topic.tips for x in (tip.text, tip.reason)]:
            c = P.tone_cues(s)
            assert c["casual"] == 0, s
            assert c["formal"] == pytest.approx(0.8 * c["uncontracted"]), s


def test_phrase_banks_carry_their_register():
    def fill(ph):
        return ph.lstrip("^").replace("{x}", "x").replace("{X}", "X").replace("{r}", "r").replace("{goal}", "g")

    strict = [P.OPENERS, P.INTROS, P.TIP_FRAMES, P.SUMMARIES, P.CLOSERS]
    loose = [P.CONNECTIVES, P.REASON_INLINE, P.REASON_SENTENCES]
    for bank in strict + loose:
        for ph in bank[P.FORMAL]:
            c = P.tone_cues(fill(ph))
            assert "!" not in ph and c["contractions"] == 0, ph
            assert c["formal"] > 0 if bank in (strict) else c["formal"] >= 0, ph
            assert c["casual"] == 0, ph
        for ph in bank[P.CASUAL]:
            c = P.tone_cues(fill(ph))
            assert (c["casual"] > c["formal"]) if bank in strict else (c["casual"] >= c["formal"]), ph
        for ph in bank[P.NEUTRAL]:
            c = P.tone_cues(fill(ph))
            assert c["casual"] == 0 and c["formal"] == 0, ph
    # dozens of phrasings per tone level where it matters most
    for bank in (P.OPENERS, P.CLOSERS, P.TIP_FRAMES):
        assert len(bank[P.FORMAL]) >= 20 and len(bank[P.CASUAL]) >= 20 and len(bank[P.NEUTRAL]) >= 16


# --- scorers -----------------------------------------------------------------------------------

MARKDOWN = ("Sure! Here are some tips for better sleep:\n\n"
            "1. **Stick to a schedule**: Go to bed and wake up at the same time every day, even on weekends.\n"
            "2. **Create a relaxing bedtime routine**: Engage in calming activities like reading or taking a bath.\n"
            "3. **Limit screen time**: Avoid screens for at least an hour before bed, as the blue light can "
            "interfere with sleep.\n"
            "4. **Watch your diet**: Avoid heavy meals, caffeine, and alcohol close to bedtime.\n"
            "5. **Exercise regularly**: Regular physical activity can help you fall asleep faster.\n\n"
            "By following these tips, you can improve the quality of your sleep.")
ONE_LINER = "Go to bed at the same time every night."
CHATTY = ("Omg yes!! \U0001F634 Honestly, just put your phone down an hour before bed and you'll sleep like a "
          "baby. Trust me, it's a game changer lol \U0001F4A4")
FORMAL_PARAGRAPH = ("It is advisable to maintain a consistent sleep schedule. Furthermore, one should refrain from "
                    "consuming caffeine in the afternoon, as it may impair the ability to fall asleep. Additionally, "
                    "individuals are encouraged to ensure that the bedroom remains dark and quiet. In conclusion, "
                    "adherence to these measures should result in considerably improved rest.")
LONG_FORMAL_WITH_YOU = " ".join(["You should keep a regular schedule and you should avoid caffeine late in the day, "
                                 "as it is known to disrupt sleep. It is also important that you do not use "
                                 "screens before bed."] * 5)
LONG_CASUAL = " ".join(["Hey, you'll totally love this! Keep your phone out of the bedroom, it's honestly the "
                        "best trick I know. Don't drink coffee late, okay?"] * 4)


def test_scorers_on_hand_written_texts():
    s = {name: P.score_all(t) for name, t in [("md", MARKDOWN), ("one", ONE_LINER), ("chat", CHATTY),
                                               ("formal", FORMAL_PARAGRAPH), ("lfy", LONG_FORMAL_WITH_YOU),
                                               ("lcas", LONG_CASUAL)]}
    for v in s.values():
        assert set(v) == set(P.AXES) and all(-1 <= x <= 1 for x in v.values())
    # verbosity: signs and ordering
    assert s["one"]["verbosity"] < -0.9
    assert s["chat"]["verbosity"] < 0 < s["formal"]["verbosity"]
    assert s["md"]["verbosity"] > 0.8 and s["lfy"]["verbosity"] > 0.9
    assert s["one"]["verbosity"] < s["chat"]["verbosity"] < s["formal"]["verbosity"] < s["md"]["verbosity"]
    # tone: signs and ordering
    assert s["formal"]["tone"] < -0.8
    assert s["lfy"]["tone"] < -0.3  # long, full of "you", no contractions: formal, not casual
    assert abs(s["one"]["tone"]) < 0.05  # no cues at all
    assert -0.1 < s["md"]["tone"] < 0.4  # one "Sure!" in a long list: about neutral
    assert s["chat"]["tone"] > 0.9 and s["lcas"]["tone"] > 0.9
    assert s["formal"]["tone"] < s["lfy"]["tone"] < s["one"]["tone"] < s["md"]["tone"] < s["chat"]["tone"]


def test_scorers_edge_cases():
    for t in ("", "   \n", "...", "**", "\U0001F44D"):
        out = P.score_all(t)
        assert all(math.isfinite(x) and -1 <= x <= 1 for x in out.values())
    assert P.score_verbosity("") == -1.0 and P.score_tone("") == 0.0
    assert P.score_tone("\U0001F44D") > 0
    # contractions vs uncontracted forms, possessives are not contractions
    assert P.score_tone("It's easy, you'll see.") > 0 > P.score_tone("It is easy, you will see.")
    assert P.score_tone("Read the owner's manual.") == 0.0
    assert P.score_tone("Don\u2019t worry, it\u2019s fine") > 0  # curly apostrophes
    # verbosity is monotone in length
    lens = [P.score_verbosity(" ".join(["word"] * n)) for n in (1, 5, 15, 37, 90, 300)]
    assert lens == sorted(lens) and abs(lens[3]) < 1e-9


def test_repetition_flags_loops_not_fluent_answers():
    # closed forms: k distinct trigrams in n trigrams -> 1 - k / n
    assert P.repetition("a b c a b c") == 1 - 3 / 4  # trigrams abc bca cab abc
    assert P.repetition("one two three four five") == 0.0
    assert P.repetition("") == P.repetition("just three words") == 0.0
    assert P.repetition("DREI drei-drei, drei drei") == 1 - 1 / 3  # case and punctuation split like the scorers
    loop = "The best way to study is to be more flexible than you " + "-".join(["drei"] * 40)
    assert P.repetition(loop) > 0.6 and P.is_looping(loop)
    assert P.is_looping("Hey! yeah, try something new! " + "\U0001F34F" * 40)  # emoji loops count too
    fluent = ("Set a schedule and keep it. Work in focused 25-minute blocks, then take a short break. "
              "Sleep matters more than one more hour of study, so protect it. Keep water and snacks nearby, "
              "and switch subjects when your focus drops.")
    assert P.repetition(fluent) < 0.05 and not P.is_looping(fluent)
    for text in P.corpus(n=200):  # the generator's own answers never read as loops
        assert not P.is_looping(text[2]), text[2]


def test_compression_ratio_sees_loops_that_dodge_exact_repeats():
    import zlib

    assert P.compression_ratio("") == 1.0
    assert P.compression_ratio("abc abc") == len(zlib.compress(b"abc abc", 9)) / 7  # the definition
    # what a decoder that forbids repeated 4-grams made of a loop: no trigram repeats twice in a row
    rng = np.random.default_rng(0)
    variant = "-".join("dre" + "e" * int(rng.integers(0, 4)) + "abcdefgh"[int(rng.integers(0, 8))] for _ in range(80))
    assert P.repetition(variant) < 0.1 and P.compression_ratio(variant) < 0.3
    assert P.compression_ratio("The best way to study is " + "-".join(["drei"] * 80)) < 0.2
    long = [t[2] for t in P.corpus(n=600) if len(t[2]) >= P.COMPRESSION_MIN_CHARS]
    assert len(long) > 50 and min(map(P.compression_ratio, long)) > 0.5  # fluent answers


# --- responses -------------------------------------------------------------------------------

def test_scores_track_the_rendering_style():
    rng = np.random.default_rng(123)
    styles, scores = [], []
    for i in range(300):
        st = rng.uniform(-1, 1, len(P.AXES))
        text = P.render_response(P.REQUESTS[i % len(P.REQUESTS)], dict(zip(P.AXES, st)), rng)
        styles.append(st)
        scores.append([P.score_all(text)[a] for a in P.AXES])
    styles, scores = np.array(styles), np.array(scores)
    for k, axis in enumerate(P.AXES):
        assert np.corrcoef(styles[:, k], scores[:, k])[0, 1] > 0.8, axis
    assert abs(np.corrcoef(scores[:, 0], scores[:, 1])[0, 1]) < 0.3


def test_lengths_at_the_corners_and_center():
    rng = np.random.default_rng(7)
    for v, lo, hi in ((-1.0, 6, 30), (0.0, 18, 60), (1.0, 55, P.MAX_WORDS)):
        for t in (-1.0, 0.0, 1.0):
            n = [P.word_count(P.render_response(P.REQUESTS[i], {"verbosity": v, "tone": t}, rng))
                 for i in range(0, 385, 5)]
            assert lo <= min(n) and max(n) <= hi, (v, t, min(n), max(n))


def test_formal_corner_has_no_contractions_or_exclamations():
    rng = np.random.default_rng(3)
    for i in range(100):
        text = P.render_response(P.REQUESTS[i], {"verbosity": 1.0, "tone": -1.0}, rng)
        c = P.tone_cues(text)
        assert "!" not in text and c["contractions"] == 0 and c["casual"] == 0, text
        casual = P.render_response(P.REQUESTS[i], {"verbosity": 1.0, "tone": 1.0}, rng)
        assert P.tone_cues(casual)["formal"] == 0, casual


def test_phrasing_diversity_at_each_corner():
    rng = np.random.default_rng(11)
    for corner in P.CORNERS + ((0.0, 0.0),):
        texts = [P.render_response(P.REQUESTS[int(rng.integers(len(P.REQUESTS)))], dict(zip(P.AXES, corner)), rng)
                 for _ in range(200)]
        firsts = collections.Counter(_first_sentence(t) for t in texts)
        assert firsts.most_common(1)[0][1] < 20, (corner, firsts.most_common(3))
        assert len(set(texts)) >= 0.97 * len(texts)  # short answers may repeat now and then
        lasts = collections.Counter(re.split(r"(?<=[.!?])\s+", t.strip())[-1] for t in texts)
        assert lasts.most_common(1)[0][1] < 40, (corner, lasts.most_common(3))


def test_render_accepts_request_text_and_id():
    req = P.REQUESTS[0]
    a = P.render_response(req, {"verbosity": 0.3, "tone": 0.2}, np.random.default_rng(0))
    b = P.render_response(req.text, {"verbosity": 0.3, "tone": 0.2}, np.random.default_rng(0))
    c = P.render_response(req.id, {"verbosity": 0.3, "tone": 0.2}, np.random.default_rng(0))
    assert a == b == c and a.strip()
    with pytest.raises(KeyError):
        P.render_response("What is the meaning of life?", {"verbosity": 0, "tone": 0}, np.random.default_rng(0))


# --- users and pairs -------------------------------------------------------------------------

def test_archetypes_and_opposites():
    assert P.AXES == ("verbosity", "tone")
    assert P.ARCHETYPES["busy executive"] == (-1.0, -1.0) and P.ARCHETYPES["friendly tutor"] == (1.0, 1.0)
    assert set(P.OPPOSITE_PAIRS) == {("busy executive", "thorough analyst"), ("casual texter", "friendly tutor")}
    assert set(P.opposite_pairs("tone")) == {("busy executive", "casual texter"),
                                            ("thorough analyst", "friendly tutor")}
    assert P.utility("friendly tutor", {"verbosity": 0.5, "tone": -0.25}) == pytest.approx(0.25)
    assert P.utility((0.5, 0.0), ONE_LINER) == pytest.approx(0.5 * P.score_verbosity(ONE_LINER))


def test_btl_choice():
    assert P.btl_choice(0.1, 0.2, 0.0) == 1.0 and P.btl_choice(0.2, 0.1, 0.0) == 0.0
    assert P.btl_choice(0.3, 0.3, 0.0) == 0.5
    rng = np.random.default_rng(0)
    draws = [P.btl_choice(0.0, 0.2, 0.2, rng) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)
    with pytest.raises(ValueError):
        P.btl_choice(0.0, 1.0, 0.5)


def test_generation_is_deterministic_by_seed(records):
    again = P.generate_pairs(P.PersonaConfig(seed=0, conflict_rate=0.5, choice_temperature=0.0, **SMALL))
    assert again == records
    other = P.generate_pairs(P.PersonaConfig(seed=1, conflict_rate=0.5, choice_temperature=0.0, **SMALL))
    assert [r["a"] for r in other] != [r["a"] for r in records]
    assert P.request_splits(P.PersonaConfig(seed=1)) != P.request_splits(P.PersonaConfig(seed=0))
    c1 = P.corpus(P.PersonaConfig(seed=0), 50, "train")
    assert c1 == P.corpus(P.PersonaConfig(seed=0), 50, "train") != P.corpus(P.PersonaConfig(seed=2), 50, "train")


def test_record_shape(records):
    assert len(records) == len(P.REQUESTS) * SMALL["n_pairs_per_request"]
    assert len({r["id"] for r in records}) == len(records)
    for r in records[:50]:
        assert set(r) == {"id", "prompt", "a", "b", "choices", "attributes", "split"}
        assert r["a"] != r["b"] and r["prompt"] in P.REQUEST_BY_TEXT
        assert list(r["choices"]) == list(P.ARCHETYPES)
        assert r["attributes"]["a"] == {a: pytest.approx(P.score_all(r["a"])[a], abs=1e-4) for a in P.AXES}
        assert max(P.word_count(r["a"]), P.word_count(r["b"])) <= P.MAX_WORDS


def test_splits_are_by_request(records):
    seen = collections.defaultdict(set)
    for r in records:
        seen[r["prompt"]].add(r["split"])
    assert len(seen) == len(P.REQUESTS) and all(len(s) == 1 for s in seen.values())
    counts = collections.Counter(next(iter(s)) for s in seen.values())
    n = len(P.REQUESTS)
    assert counts["train"] == round(0.8 * n) and counts["val"] == round(0.1 * n) and set(counts) == set(SPLITS)
    for split in SPLITS:  # the corpus of a split only uses that split's requests
        prompts = {p for p, _, _ in P.corpus(P.PersonaConfig(seed=0), 40, split)}
        assert all(seen[p] == {split} for p in prompts)


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_conflict_rate_is_controlled(rate, records):
    recs = records if rate == 0.5 else P.generate_pairs(
        P.PersonaConfig(seed=3, conflict_rate=rate, choice_temperature=0.0, **SMALL))
    ps = pairs_from_records(recs)
    assert P.measured_conflict_rate(ps) == pytest.approx(rate, abs=0.01)
    for a, b in P.OPPOSITE_PAIRS:  # at temperature 0 the choices disagree exactly where utilities do
        assert ps.conflicting(a, b).mean() == pytest.approx(rate, abs=0.01)
    for a, b in P.opposite_pairs("tone"):  # the pairs opposed on the other axis disagree on the rest
        assert P.conflict_rate(ps, a, b) == pytest.approx(1 - rate, abs=0.01)
    for a, b in P.DIAGONAL_PAIRS:
        assert P.conflict_rate(ps, a, b) == 1.0


def test_temperature_zero_choices_follow_the_utility_sign(records):
    for u, w in P.ARCHETYPES.items():
        du = P.utility_differences(records, u)
        ch = np.array([r["choices"][u] for r in records], dtype=float)
        assert np.all(np.abs(du) >= 0.1 - 1e-6)  # min_margin: no near ties
        np.testing.assert_array_equal(ch, (du > 0).astype(float))


def test_btl_noise_in_choices():
    recs = P.generate_pairs(P.PersonaConfig(seed=0, conflict_rate=0.5, choice_temperature=0.5, **SMALL))
    agree = []
    for u in P.ARCHETYPES:
        du = P.utility_differences(recs, u)
        ch = np.array([r["choices"][u] for r in recs], dtype=float)
        agree.append(np.mean(ch == (du > 0)))
    assert 0.6 < np.mean(agree) < 0.97  # noisy, but mostly following utilities


def test_jsonl_round_trip(tmp_path, records):
    path = write_pairs(tmp_path / "personas.jsonl", records)
    ps = load_pairs(path)
    assert len(ps) == len(records) and ps.user_types == list(P.ARCHETYPES)
    assert ps.attribute_names == list(P.AXES)
    assert ps.to_records() == records  # attributes are float32-exact, choices 0/1
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_cli(tmp_path, capsys):
    out = tmp_path / "pw.jsonl"
    assert P.main(["--out", str(out), "--seed", "4", "--pairs-per-request", "1", "--conflict", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "measured conflict rate: 1.000" in text and "train" in text
    ps = load_pairs(out)
    assert len(ps) == len(P.REQUESTS)


def test_corpus():
    cfg = P.PersonaConfig(seed=0, corpus_corner_fraction=0.5)
    items = P.corpus(cfg, 200, "train")
    assert len(items) == 200
    corners = sum(tuple(s[a] for a in P.AXES) in P.CORNERS for _, s, _ in items)
    assert 60 < corners < 140
    for prompt, style, text in items:
        assert set(style) == set(P.AXES) and all(-1 <= x <= 1 for x in style.values())
        assert text.strip() and P.word_count(text) <= P.MAX_WORDS


def test_config_validation():
    for bad in (dict(conflict_rate=1.5), dict(n_pairs_per_request=0), dict(split_fractions=(0.5, 0.5, 0.5)),
                dict(conflict_axis="humor"), dict(choice_temperature=-1), dict(user_types=("nobody",)),
                dict(seed=-1)):
        with pytest.raises(ValueError):
            P.PersonaConfig(**bad)


def test_continuous_users_in_the_task_sampler(records):
    from core.data.tasks import TaskConfig, TaskSampler

    ps = pairs_from_records(records)
    s = TaskSampler(ps, TaskConfig(n_targets=8, max_context=4, users="continuous", weight_prior="sphere"),
                    "train", seed=0)
    batch = s.sample(0, 4)
    assert batch.user_weights.shape == (4, len(P.AXES))


def test_edge_users_are_sphere_directions_on_the_square_boundary():
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(200):
        e, s = np.asarray(P.sample_user(r1, "edge")), np.asarray(P.sample_user(r2, "sphere"))
        assert np.abs(e).max() == pytest.approx(1.0) and np.linalg.norm(s) == pytest.approx(1.0)
        np.testing.assert_allclose(e, s / np.abs(s).max())  # same direction, scaled onto the boundary
    with pytest.raises(ValueError, match="unknown prior"):
        P.sample_user(r1, "disc")
