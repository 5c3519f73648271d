"""Paths and text shown to people: always printable, one line, unchanged when ordinary."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from pneumodet.textsafe import display_path, display_text


@pytest.mark.parametrize(("path", "shown"), [
    (Path("/data/rsna/stage_2_train_labels.csv"), "/data/rsna/stage_2_train_labels.csv"),
    ("données/é ü 漢字", "données/é ü 漢字"),
    (Path(os.fsdecode(b"/tmp/data\xff/x.csv")), "/tmp/data\\xff/x.csv"),
    (b"/tmp/\xfe\xffname", "/tmp/\\xfe\\xffname"),
    ("/tmp/two\nlines\tand\x1b[31m", "/tmp/two\\nlines\\tand\\x1b[31m"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
])
def test_display_path_is_printable_utf8_on_one_line(path, shown):
    text = display_path(path)
    assert text == shown
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a terminal or a captured stream
    print(text, file=stream)
    assert "\n" not in text


def test_display_text_keeps_ordinary_text_and_escapes_the_rest():
    assert display_text("patient 0004cfab: Target 0, é") == "patient 0004cfab: Target 0, é"
    assert display_text("p\r\n1\x00\udcff") == "p\\r\\n1\\x00\\udcff"
