import json

import numpy as np
import pytest

from core.data.pairs import PairsFormatError, load_pairs, pairs_from_records, write_pairs


def rec(i=0, **over):
    r = {"id": f"p{i}", "prompt": "How do I boil an egg?", "a": "Boil it.", "b": "Place the egg in water...",
         "choices": {"terse": 0, "thorough": 1}, "split": "train"}
    r.update(over)
    return r


def write_lines(tmp_path, lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
    return p


def test_round_trip_text_with_attributes(tmp_path):
    recs = [rec(i, attributes={"a": {"verbosity": 0.1, "tone": -0.5}, "b": {"verbosity": 0.9, "tone": 0.5}},
                split=s, choices={"terse": 0, "thorough": c})
            for i, (s, c) in enumerate([("train", 1), ("val", 0.5), ("test", 1)])]
    p = write_pairs(tmp_path / "x.jsonl", recs)
    ps = load_pairs(p)
    assert len(ps) == 3 and not ps.is_numeric
    assert ps.user_types == ["terse", "thorough"]
    assert ps.attribute_names == ["verbosity", "tone"]
    assert ps.attributes.shape == (3, 2, 2)
    np.testing.assert_array_equal(ps.choices[:, 1], [1, 0.5, 1])
    assert list(ps.split) == ["train", "val", "test"]
    # writing what was read gives the same records back
    p2 = write_pairs(tmp_path / "y.jsonl", ps)
    assert [json.loads(l) for l in p.read_text().splitlines()] == [json.loads(l) for l in p2.read_text().splitlines()]


def test_round_trip_numeric_without_prompt(tmp_path):
    recs = [{"id": f"n{i}", "a": [0.1 * i, 1.0], "b": [0.5, -2.0], "choices": {"u": i % 2}, "split": "test"}
            for i in range(4)]
    ps = load_pairs(write_pairs(tmp_path / "n.jsonl", recs))
    assert ps.is_numeric and ps.option_dim == 2
    assert ps.a.dtype == np.float32 and ps.a.shape == (4, 2)
    assert ps.prompts == [None] * 4
    np.testing.assert_allclose(ps.a[:, 0], [0, 0.1, 0.2, 0.3], atol=1e-7)


@pytest.mark.parametrize("lines, where, problem", [
    (["{not json\n"], ":1: <line>:", "not JSON"),
    ([rec(0), {k: v for k, v in rec(1).items() if k != "choices"}], ":2: choices:", "missing field"),
    ([{k: v for k, v in rec(0).items() if k != "split"}], ":1: split:", "missing field"),
    ([rec(0, choices={"terse": 2, "thorough": 1})], ":1: choices.terse:", "not in {0, 1, 0.5}"),
    ([rec(0, choices={"terse": True, "thorough": 1})], ":1: choices.terse:", "not in {0, 1, 0.5}"),
    ([rec(0, a=[0.5])], ":1: b:", "same kind"),
    ([rec(0, a=[1.0, 2.0], b=[1.0], prompt=None)], ":1: b:", "dimension 1 but a has 2"),
    ([rec(0, a=[1.0], b=[2.0]), rec(1, a=[1.0, 2.0], b=[1.0, 3.0])], ":2: a:", "dimension 2 but line 1 has 1"),
    ([rec(0), rec(1, a=[1.0], b=[2.0])], ":2: a:", "numeric but line 1 has text"),
    ([rec(0), rec(0)], ":2: id:", "duplicate id 'p0' (first on line 1)"),
    ([rec(0, split="dev")], ":1: split:", "unknown split 'dev'"),
    ([rec(0), rec(1, choices={"terse": 0})], ":2: choices:", "missing ['thorough']"),
    ([rec(0, extra=1)], ":1: extra:", "unknown field"),
    ([rec(0, a="   ")], ":1: a:", "empty text"),
    ([rec(0), "\n"], ":2: <line>:", "empty line"),
    ([{k: v for k, v in rec(0).items() if k != "prompt"}], ":1: prompt:", "required for text options"),
    ([rec(0), rec(1, attributes={"a": {"v": 1}, "b": {"v": 2}})], ":2: attributes:", "absent on line 1"),
    ([rec(0, attributes={"a": {"v": 1}, "b": {"w": 2}})], ":1: attributes.b:", "differ"),
])
def test_loader_errors_name_file_line_field(tmp_path, lines, where, problem):
    p = write_lines(tmp_path, lines)
    with pytest.raises(PairsFormatError) as e:
        load_pairs(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + where), msg
    assert problem in msg


def test_nan_numbers_are_refused(tmp_path):
    p = tmp_path / "nan.jsonl"
    p.write_text('{"id": "x", "a": [NaN], "b": [1.0], "choices": {"u": 0}, "split": "train"}\n')
    with pytest.raises(PairsFormatError, match=r":1: a: numeric options must be a list of finite numbers"):
        load_pairs(p)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(PairsFormatError, match="no such file"):
        load_pairs(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PairsFormatError, match="no pairs"):
        load_pairs(tmp_path / "empty.jsonl")


def test_writer_validates_before_writing(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old content\n")
    with pytest.raises(PairsFormatError, match=r":2: id: duplicate"):
        write_pairs(target, [rec(0), rec(0)])
    assert target.read_text() == "old content\n"  # unchanged
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


def test_conflicting_mask():
    ps = pairs_from_records([rec(0, choices={"terse": 0, "thorough": 1}), rec(1, choices={"terse": 1, "thorough": 1}),
                             rec(2, choices={"terse": 0.5, "thorough": 1})])
    np.testing.assert_array_equal(ps.conflicting("terse", "thorough"), [True, False, False])


@pytest.mark.parametrize("body, where", [
    ('{"id": "x", "a": [1' + "0" * 400 + '], "b": [1], "choices": {"u": 0}, "split": "train"}', ":1: a:"),
    ('{"id": "x", "a": [1e300], "b": [1], "choices": {"u": 0}, "split": "train"}', ":1: a:"),
    ('{"id": "x", "a": [1], "b": [2], "choices": {"u": 0}, "attributes": {"a": {"v": 1e39}, "b": {"v": 0}}, '
     '"split": "train"}', ":1: attributes.a.v:"),
])
def test_numbers_beyond_float32_are_refused(tmp_path, body, where):
    p = tmp_path / "big.jsonl"
    p.write_text(body + "\n")
    with pytest.raises(PairsFormatError, match="float32 range") as e:
        load_pairs(p)
    assert str(e.value).startswith(str(p) + where)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(json.dumps(rec(0)).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(PairsFormatError, match=r":2: <line>: not valid UTF-8"):
        load_pairs(p)


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    p = write_pairs(tmp_path / "perm.jsonl", [rec(0)])
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
