"""The HTML report toolkit and the data exploration report (``pneumodet eda``)."""

from __future__ import annotations

import base64
import io
import json
import re
import warnings
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


# ---------------------------------------------------------------- small datasets written here
def _write_dicom(path: Path, patient_id: str, age: str, sex: str = "F", view: str = "PA", size: int = 256) -> None:
    """An uncompressed 8-bit MONOCHROME2 chest-X-ray-like DICOM with the RSNA header fields."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = ds.PatientName = patient_id
    with warnings.catch_warnings():  # RSNA stores ages without the unit ("51", not "051Y"): pydicom warns
        warnings.simplefilter("ignore", UserWarning)
        ds.PatientAge = age
    ds.PatientSex, ds.ViewPosition = sex, view
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    yy, xx = np.mgrid[0:size, 0:size]
    ds.PixelData = ((xx + yy) * 255 // (2 * size - 2)).astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


# patient id, class, boxes (x, y, w, h), age, sex, view; "bad" gets a corrupt file
_SMALL = [
    ("p-old", "Lung Opacity", [(40, 50, 60, 90), (150, 40, 50, 100)], "150", "M", "AP"),
    ("p-40", "Normal", [], "40", "F", "PA"),
    ("p-60", "No Lung Opacity / Not Normal", [], "60", "M", "PA"),
    ("p-bad", "Normal", [], "30", "F", "PA"),
    ("p-noimage", "Lung Opacity", [(100, 60, 80, 120)], None, None, None),
]


@pytest.fixture()
def small_dataset(tmp_path) -> Path:
    """Kaggle layout: 5 patients, 4 image files, one of them corrupt, one age of 150."""
    root = tmp_path / "small"
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    labels, classes = ["patientId,x,y,width,height,Target"], ["patientId,class"]
    for pid, cls, boxes, age, sex, view in _SMALL:
        for box in boxes or [None]:
            labels.append(f"{pid}," + (",".join(map(str, box)) + ",1" if box else ",,,,0"))
            classes.append(f"{pid},{cls}")
        if pid == "p-bad":
            (images / f"{pid}.dcm").write_bytes(b"this is not a DICOM file" * 10)
        elif age is not None:
            _write_dicom(images / f"{pid}.dcm", pid, age, sex, view)
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    return root


def test_impossible_age_is_flagged_and_a_bad_file_is_skipped(small_dataset, tmp_path):
    from pneumodet.reports.eda import build_eda_report

    out = tmp_path / "eda"
    summary = build_eda_report(small_dataset, out, seed=1)
    assert (summary["patients"], summary["label_rows"], summary["boxes"]) == (5, 6, 3)
    assert (summary["images_found"], summary["images_missing"]) == (4, 1)
    assert summary["boxes_per_patient"] == {"0": 3, "1": 1, "2": 1}
    assert summary["multi_box_patients"] == 1
    # one corrupt file: skipped, counted, named; the run goes on
    assert summary["headers_read"] == 3 and summary["headers_failed"] == 1
    assert summary["images_unreadable"] == 1
    unreadable = pd.read_csv(out / "unreadable_files.csv")
    assert unreadable["path"].map(lambda p: Path(p).name).tolist() == ["p-bad.dcm"]
    assert unreadable["reason"].str.len().gt(0).all()
    # age 150 is impossible: counted, listed, left out of the statistics
    assert summary["age"] == {"min": 40.0, "median": 50.0, "max": 60.0, "impossible": 1,
                              "impossible_threshold": 100.0, "missing": 0}
    impossible = pd.read_csv(out / "impossible_ages.csv")
    assert impossible[["patient_id", "age"]].values.tolist() == [["p-old", 150.0]]
    by_class = pd.read_csv(out / "age_by_class.csv").set_index("class")
    assert by_class.loc["Lung Opacity", "impossible_ages"] == 1
    assert by_class.loc["Lung Opacity", "patients"] == 0
    assert summary["sex"] == {"F": 1, "M": 2} and summary["view_position"] == {"AP": 1, "PA": 2}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "impossible age(s) (&gt; 100 years)" in html
    assert "p-bad.dcm" in html and 'id="unreadable"' in html
    assert "in original 256-px image coordinates" in html  # boxes live in the images' frame, not RSNA's 1024
    metadata = pd.read_csv(out / "dicom_metadata.csv")
    assert sorted(metadata["patient_id"]) == ["p-40", "p-60", "p-old"]
    assert dict(zip(metadata["patient_id"], metadata["class"], strict=True))["p-old"] == "Lung Opacity"


def test_header_cap_reads_a_seeded_subset(small_dataset):
    from pneumodet.data.rsna import load_rsna
    from pneumodet.reports.eda import scan_metadata

    records = load_rsna(small_dataset).records
    first = scan_metadata(records, max_images=2, seed=3)
    again = scan_metadata(records, max_images=2, seed=3)
    other = [scan_metadata(records, max_images=2, seed=s) for s in range(8)]
    assert first.present == 4 and first.scanned == 2  # the cap limits header reading, not the counts
    assert first.frame.equals(again.frame) and first.failed == again.failed
    picked = {tuple(sorted(o.frame["patient_id"])) + tuple(p for p, _ in o.failed) for o in other}
    assert len(picked) > 1  # the seed chooses the subset


def test_worker_pool_reads_the_same_headers_as_one_process(small_dataset, monkeypatch):
    from pneumodet.data.rsna import load_rsna
    from pneumodet.reports import eda

    records = load_rsna(small_dataset).records
    serial = eda.scan_metadata(records, workers=1)
    monkeypatch.setattr(eda.headers, "_POOL_MIN_FILES", 1)  # the module that reads the headers
    pooled = eda.scan_metadata(records, workers=2)
    pd.testing.assert_frame_equal(serial.frame, pooled.frame)
    assert [Path(p).name for p, _ in pooled.failed] == ["p-bad.dcm"]
    assert pooled.present == 4 and pooled.scanned == 4


def test_cli_eda_exits_0_and_writes_the_report(small_dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(["eda", str(small_dataset), "--out", str(out), "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "5 patients, 6 label rows, 3 boxes" in printed and "1 unreadable image(s)" in printed
    assert f"wrote {out / 'report.html'}" in printed
    summary = _load(out)
    for name in ["report.html", "summary.json", *summary["tables"]]:
        assert (out / name).stat().st_size > 0, name
    assert "impossible_ages.csv" in summary["tables"]
    # the age is corrected and the report re-run in the same folder: no stale table is left behind
    _write_dicom(small_dataset / "stage_2_train_images" / "p-old.dcm", "p-old", "70", "M", "AP")
    assert _cli(["eda", str(small_dataset), "--out", str(out), "--samples", "1"]) == 0
    summary = _load(out)
    assert summary["age"]["impossible"] == 0 and summary["age"]["max"] == 70
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", "summary.json", *summary["tables"]])


def test_cli_eda_reports_bad_input_in_one_line(small_dataset, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert _cli(["eda", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumodet eda: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # unreadable labels: nothing written
    assert _cli(["eda", str(small_dataset), "--out", str(tmp_path / "out"), "--max-images", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "pneumodet eda: error: max_images must be >= 0, got -3"
    assert not (tmp_path / "out").exists()  # refused before anything is written
    (tmp_path / "a-file").write_text("not a folder")
    assert _cli(["eda", str(small_dataset), "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumodet eda: error: {tmp_path / 'a-file'}: cannot create the report folder")


# ---------------------------------------------------------------- the real sample
def _expected_from_csv(real_sample: Path) -> dict:
    """The headline numbers computed straight from the two CSVs, independently of pneumodet."""
    labels = pd.read_csv(real_sample / "stage_2_train_labels.csv")
    classes = pd.read_csv(real_sample / "stage_2_detailed_class_info.csv")
    labels["class"] = classes["class"]  # same row order (SOURCES.md)
    per_patient = labels.groupby("patientId").agg(cls=("class", "first"), target=("Target", "first"),
                                                  boxes=("Target", "sum"))
    return {
        "label_rows": len(labels),
        "patients": len(per_patient),
        "boxes": int(labels["Target"].sum()),
        "patients_per_class": per_patient["cls"].value_counts().to_dict(),
        "rows_per_class": labels["class"].value_counts().to_dict(),
        "patients_per_target": {str(k): v for k, v in per_patient["target"].value_counts().items()},
        "boxes_per_patient": {str(k): v for k, v in per_patient["boxes"].value_counts().sort_index().items()},
    }


@pytest.fixture()
def real_eda(real_eda_report) -> tuple[Path, dict]:
    return real_eda_report  # built once per session (tests/conftest.py), shared with the browser test


def test_real_sample_summary_numbers(real_eda, real_sample):
    out, summary = real_eda
    assert (summary["patients"], summary["label_rows"], summary["boxes"]) == (26684, 30227, 9555)
    assert (summary["images_found"], summary["images_missing"]) == (16, 26684 - 16)
    assert summary["label_problems"] == 0
    expected = _expected_from_csv(real_sample)
    for key, value in expected.items():
        assert summary[key] == value, key
    assert list(summary["boxes_per_patient"]) == ["0", "1", "2", "3", "4"]
    assert summary["multi_box_patients"] == sum(v for k, v in expected["boxes_per_patient"].items() if int(k) > 1)
    assert summary == _load(out)
    # the 16 images: 5 Lung Opacity, 4 Normal, 7 other (SOURCES.md); all CR chest films with real ages
    assert summary["headers_read"] == 16 and summary["images_unreadable"] == 0
    metadata = pd.read_csv(out / "dicom_metadata.csv")
    stems = sorted(p.stem for p in (real_sample / "stage_2_train_images").glob("*.dcm"))
    assert sorted(metadata["patient_id"]) == stems
    assert metadata["class"].value_counts().to_dict() == {
        "No Lung Opacity / Not Normal": 7, "Lung Opacity": 5, "Normal": 4}
    assert set(metadata["modality"]) == {"CR"} and set(metadata["view_position"]) <= {"AP", "PA"}
    formats = pd.read_csv(out / "image_format.csv")
    assert formats.values.tolist() == [[1024, 1024, "MONOCHROME2", "JPEG Baseline (Process 1)", "CR", "CHEST", 16]]
    assert sum(summary["view_position"].values()) == sum(summary["sex"].values()) == 16
    assert 0 < summary["age"]["min"] <= summary["age"]["median"] <= summary["age"]["max"] <= 100


def test_real_sample_tables_agree_with_summary(real_eda):
    out, summary = real_eda
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(summary["tables"])
    bpp = pd.read_csv(out / "boxes_per_patient.csv", dtype={"boxes": str}).set_index("boxes")
    totals = bpp["all patients"]
    assert totals.drop("all patients").to_dict() == summary["boxes_per_patient"]
    assert totals["all patients"] == summary["patients"]
    n_boxes = totals.drop("all patients").index.astype(int)
    assert int((n_boxes * totals.drop("all patients")).sum()) == summary["boxes"]
    assert bpp.loc["0", "Lung Opacity (Target 1)"] == 0  # every Lung Opacity patient has a box
    per_class = pd.read_csv(out / "patients_per_class.csv").set_index("class")
    assert per_class["patients"].to_dict() == summary["patients_per_class"]
    assert per_class["label_rows"].to_dict() == summary["rows_per_class"]
    assert per_class["patients_%"].sum() == pytest.approx(100)
    per_target = pd.read_csv(out / "patients_per_target.csv")
    assert {str(t): n for t, n in zip(per_target["target"], per_target["patients"], strict=True)} == \
        summary["patients_per_target"]
    overview = pd.read_csv(out / "overview.csv").set_index("quantity")["value"]
    for quantity, key in [("label rows (CSV lines)", "label_rows"), ("unique patients (images)", "patients"),
                          ("boxes in total", "boxes"), ("images found", "images_found"),
                          ("images missing", "images_missing"), ("label problems found", "label_problems"),
                          ("patients with several rows (multi-box)", "multi_box_patients")]:
        assert overview[quantity] == summary[key], quantity
    views = pd.read_csv(out / "view_by_class.csv").set_index("class")
    assert views.loc["all"].drop("all").to_dict() == summary["view_position"]
    stats = pd.read_csv(out / "box_stats.csv").set_index("quantity")
    assert (stats["count"] == summary["boxes"]).all()
    assert stats.loc["x", "min"] >= 0 and stats.loc["width", "max"] <= 1024


def test_real_sample_report_has_every_section(real_eda):
    out, summary = real_eda
    html = (out / "report.html").read_text(encoding="utf-8")
    for anchor in ("overview", "boxes-per-patient", "classes", "dicom", "samples", "box-analysis"):
        assert f'id="{anchor}"' in html and f'href="#{anchor}"' in html
    for name in summary["tables"]:
        assert f"<code>{name}</code>" in html, name
    assert "No images present" not in html
    # the technical header of one image: allow-listed elements only, the rest counted
    assert "(0002,0010) Transfer Syntax UID" in html and "(0028,0010) Rows" in html
    assert "(0010,0020) Patient ID" in html and "20 other element(s) withheld" in html
    assert "Patient&#x27;s Name" not in html and "Study Date" not in html and "Instance UID" not in html
    assert summary["images_decoded"] > 0 and summary["images_constant"] == 0  # real images are never flat
    assert "10 of 9,555 boxes, from 5 patients" in html  # the view split covers images present only
    positive = summary["patients_per_target"]["1"]
    several = positive - summary["boxes_per_patient"]["1"]
    assert (f"<strong>{100 * positive / summary['patients']:.1f} %</strong> of patients have Target 1, with "
            f"{summary['boxes'] / positive:.2f} boxes each on average; {100 * several / positive:.1f} %") in html
    images = _embedded_images(html)
    thumbs = [im for im in images if im.shape[:2] == (360, 360)]
    assert len(thumbs) == 4 + 4 + 4 + 5  # per-class samples (4 each) and the 5 Lung Opacity images
    drawn = [im for im in thumbs if ((im[..., 0] > 200) & (im[..., 1] < 80)).sum() > 200]
    assert len(drawn) == 5  # red boxes only on the Lung Opacity grid


def test_labels_only_run_says_there_are_no_images(real_sample, tmp_path):
    from pneumodet.reports.eda import build_eda_report

    data = tmp_path / "labels-only"
    data.mkdir()
    bad_rows = {"stage_2_train_labels.csv": "bad-patient,12,abc,100,100,1",  # y not a number: line 402
                "stage_2_detailed_class_info.csv": "bad-patient,Lung Opacity"}
    for name, bad in bad_rows.items():
        lines = (real_sample / name).read_text().splitlines()[:401]  # header + 400 rows, same order
        (data / name).write_text("\n".join([*lines, bad]) + "\n")
    out = tmp_path / "eda"
    summary = build_eda_report(data, out)
    assert summary["label_rows"] == 401 and summary["images_found"] == 0
    # the bad row is reported with its file and line, its patient dropped, the rest kept
    assert summary["label_problems"] == 1
    problems = pd.read_csv(out / "label_problems.csv")
    assert problems[["line", "kind", "patient_id"]].values.tolist() == [[402, "non_numeric", "bad-patient"]]
    assert problems["file"].str.endswith("stage_2_train_labels.csv").all()
    good = pd.read_csv(data / "stage_2_train_labels.csv").head(400)
    assert summary["patients"] == good["patientId"].nunique()  # the bad patient dropped, no other
    assert sum(summary["rows_per_class"].values()) == 400
    assert summary["images_missing"] == summary["patients"] > 0
    assert summary["headers_read"] == 0 and summary["view_position"] == {} and summary["sex"] == {}
    assert summary["age"]["median"] is None and summary["age"]["impossible"] == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    dicom = html[html.index('id="dicom"'):html.index('id="samples"')]
    samples = html[html.index('id="samples"'):html.index('id="box-analysis"')]
    assert "No images present" in dicom and "No images present" in samples
    assert "<img" not in dicom and "<img" not in samples
    assert "No images folder: a labels-only run" in html
    assert "Row counts cover the 400 rows of the patients kept; the labels CSV has 401 rows" in html
    boxes = html[html.index('id="box-analysis"'):]
    assert boxes.count("<img") == 3  # centres, shape, position/size; no view split without headers
    assert "0 of " in boxes and "no split by view position" in boxes
    assert not (out / "dicom_metadata.csv").exists()



def test_synthetic_dataset_report_is_complete(synth_dataset, tmp_path):
    from pneumodet.reports.eda import build_eda_report

    out = tmp_path / "eda"
    summary = build_eda_report(synth_dataset, out, seed=0)
    labels = pd.read_csv(synth_dataset / "stage_2_train_labels.csv")
    n_patients = labels["patientId"].nunique()
    assert (summary["patients"], summary["label_rows"]) == (n_patients, len(labels))
    assert summary["boxes"] == int(labels["Target"].sum())
    assert summary["images_found"] == summary["headers_read"] == n_patients
    assert summary["images_missing"] == summary["images_unreadable"] == summary["label_problems"] == 0
    assert sum(summary["view_position"].values()) == sum(summary["sex"].values()) == n_patients
    assert summary["age"]["impossible"] == 0 and 1 <= summary["age"]["min"] <= summary["age"]["max"] <= 100
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(summary["tables"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "No images present" not in html and "No label problems found" in html
    sections = re.findall(r'<section class="report-section" id="([^"]+)"', html)
    assert sections == ["overview", "boxes-per-patient", "classes", "dicom", "samples", "box-analysis"]
    samples = html[html.index('id="samples"'):html.index('id="box-analysis"')]
    assert samples.count("<img") == 3 * 4 + 8  # 4 per class, 8 Lung Opacity images with boxes
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", samples, re.S)
    assert sum("Target 1 · Lung Opacity" in c for c in captions) == 4 + 8
    assert sum("box(es)" in c for c in captions) == 8
    formats = pd.read_csv(out / "image_format.csv")
    assert formats[["rows", "columns", "images"]].values.tolist() == [[256, 256, n_patients]]
