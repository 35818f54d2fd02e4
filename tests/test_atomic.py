import os
import stat

import pytest

from core.atomic import current_umask, write_jsonl_atomic, write_text_atomic
from core.experiments.figures import write_html, write_json


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    p = write_text_atomic(tmp_path / "sub" / "a.txt", "old")
    assert p.read_text() == "old" and stat.S_IMODE(p.stat().st_mode) == 0o666 & ~current_umask()
    write_text_atomic(p, "new")
    assert p.read_text() == "new"
    j = write_jsonl_atomic(tmp_path / "r.jsonl", [{"t": "é"}, {"t": 2}])
    assert j.read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
    for f in (write_json(tmp_path / "x.json", {"a": 1}), write_html(tmp_path / "x.html", [], "title")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~current_umask()  # the experiments' outputs too


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(p, "bad \ud800")  # a lone surrogate cannot be written as UTF-8
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
