"""The HTML report toolkit and the data exploration report (``pneumodet eda``)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt  # Agg: tests/conftest.py sets MPLBACKEND
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from pneumodet.data.records import PatientRecord
from pneumodet.reports.eda import box_frame, patient_frame
from pneumodet.reports.html import HtmlReport, encode_png

_DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _embedded_images(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in _DATA_URI.findall(html)]


# ---------------------------------------------------------------- HTML toolkit
def test_text_is_escaped_and_markdownish_rendered():
    report = HtmlReport("<Title & co>")
    sec = report.section("A <b>section</b>", "first")
    sec.text("Some **bold** and `code <x>` here.\n\n- item <one>\n- item **two**")
    sec.note("<script>alert(1)</script>")
    sec.pre("(0010,0010) Patient's Name  PN: '<anon>'")
    html = report.render()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<title>&lt;Title &amp; co&gt;</title>" in html
    assert "<h2>A &lt;b&gt;section&lt;/b&gt;</h2>" in html
    assert "<strong>bold</strong>" in html and "<code>code &lt;x&gt;</code>" in html
    assert "<ul><li>item &lt;one&gt;</li><li>item <strong>two</strong></li></ul>" in html
    assert "PN: &#x27;&lt;anon&gt;&#x27;" in html


def test_toc_links_every_section_and_ids_are_checked():
    report = HtmlReport("r")
    for i, title in enumerate(["One", "Two", "Three"]):
        report.section(title, f"s{i}")
    html = report.render()
    for i, title in enumerate(["One", "Two", "Three"]):
        assert f'<a href="#s{i}">{title}</a>' in html
        assert f'<section class="report-section" id="s{i}">' in html
    with pytest.raises(ValueError, match="already used"):
        report.section("Again", "s1")
    with pytest.raises(ValueError, match="must start with a letter"):
        report.section("Bad", "1 bad id")


def test_image_round_trips_losslessly_and_bad_images_are_refused():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
    report = HtmlReport("r")
    sec = report.section("Pictures", "pics")
    sec.image(grey, "grey")
    grid = sec.grid(200)
    grid.image(rgb, "rgb")
    grid.image(encode_png(grey), "png bytes")
    got = _embedded_images(report.render())
    assert len(got) == 3
    np.testing.assert_array_equal(got[0], grey)
    np.testing.assert_array_equal(got[1], rgb)
    np.testing.assert_array_equal(got[2], grey)
    with pytest.raises(ValueError, match="uint8"):
        sec.image(grey.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        sec.image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="not a PNG"):
        sec.image(b"GIF89a...")


def test_figure_is_embedded_at_its_size_and_closed():
    fig = plt.figure(figsize=(4, 2))
    fig.gca().plot([0, 1], [0, 1])
    report = HtmlReport("r")
    report.section("Chart", "chart").figure(fig, "a line", dpi=50)
    assert fig.number not in plt.get_fignums()  # closed: no leak over a long report
    (img,) = _embedded_images(report.render())
    assert 150 <= img.shape[1] <= 200 and 75 <= img.shape[0] <= 100  # 4x2 in at 50 dpi, tight bbox
    standalone = Figure(figsize=(3, 3))  # not managed by pyplot: embedded all the same
    standalone.subplots().bar(["a"], [1])
    report.section("Chart 2", "chart2").figure(standalone)
    assert len(_embedded_images(report.render())) == 2


def test_table_escapes_formats_and_truncates():
    frame = pd.DataFrame({"name": ["<b>x</b>", "y", "z"], "count": [1234567, 2, 3], "share": [0.5, 0.25, 0.125]})
    report = HtmlReport("r")
    sec = report.section("Tables", "tables")
    sec.table(frame, "Counts `c.csv`")
    sec.table(frame, "First rows", max_rows=2)
    html = report.render()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert '<td class="num">1,234,567</td>' in html and '<td class="num">0.12</td>' in html
    assert '<td>&lt;b&gt;x&lt;/b&gt;</td>' in html  # text column: left-aligned (no num class)
    assert '<div class="table-caption">Counts <code>c.csv</code></div>' in html
    assert html.count("<tr>") == 2 * 1 + 3 + 2  # two header rows, 3 + 2 body rows
    assert "Showing the first 2 of 3 rows." in html


def test_write_is_atomic_and_leaves_nothing_behind(tmp_path):
    report = HtmlReport("r")
    report.section("S", "s").text("hello")
    out = report.write(tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    assert out.stat().st_mode & 0o044  # readable by others, as an ordinary file (not mkstemp's 0600)


# ---------------------------------------------------------------- frames
def _records() -> list[PatientRecord]:
    return [
        PatientRecord("a", "Lung Opacity", 1, ((100.0, 200.0, 300.0, 600.0), (500.0, 100.0, 700.0, 200.0))),
        PatientRecord("b", "Normal", 0),
        PatientRecord("c", "No Lung Opacity / Not Normal", 0),
        PatientRecord("d", "Lung Opacity", 1, ((0.0, 0.0, 50.0, 25.0),)),
    ]


def test_patient_and_box_frames_map_boxes_back_to_csv_geometry():
    patients = patient_frame(_records())
    assert patients["boxes"].tolist() == [2, 0, 0, 1]
    assert patients["label_rows"].tolist() == [2, 1, 1, 1]  # one CSV row per box, or one without a box
    assert not patients["has_image"].any()
    boxes = box_frame(_records())
    assert boxes["patient_id"].tolist() == ["a", "a", "d"]
    first = boxes.iloc[0]
    assert (first["x"], first["y"], first["width"], first["height"]) == (100, 200, 200, 400)
    assert (first["cx"], first["cy"], first["area"], first["aspect"]) == (200, 400, 80000, 0.5)
    assert boxes["aspect"].tolist()[1:] == [2.0, 2.0]


def _cli(argv: list[str]) -> int:
    from pneumodet.cli import main

    return main(argv)


def _load(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())
