"""The bad-input corpus: every case goes through a real entry point and its outcome is asserted.

Bad DICOMs, label CSVs and submissions are generated here (``tests/badinputs.py``). A user mistake
ends in one clear line naming the file (and line) and exit code 2; a bad file among good ones is
skipped, counted and named while the good ones are still processed. docs/ROBUSTNESS.md lists the cases.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badinputs import (
    CLASSES_HEADER,
    LABELS_HEADER,
    VOI_LUT,
    broken_dicom_cases,
    dicom_cases,
    make_dicom,
    small_patients,
    symlink_loop,
    write_big_classes,
    write_big_labels,
    write_csv,
    write_dataset,
)
from pneumodet.cli import main
from pneumodet.data.cache import ImageCache
from pneumodet.data.dicom import read_dicom
from pneumodet.errors import DicomReadError, SubmissionError
from pneumodet.submission import read_submission

PID = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"


@pytest.fixture(autouse=True)
def _quiet_stale_log_handlers(monkeypatch):
    """Library loggers may hold a stream captured by an earlier test; a write to it must not print a
    logging traceback into the stderr these tests read."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, command: str, *patterns: str) -> None:
    """Exit 2, a single ``pneumodet COMMAND: error: ...`` line, no traceback, every pattern in it."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"pneumodet {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])


# ============================================================================================ DICOM
@pytest.fixture(scope="module")
def good_dicoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dicom_cases(tmp_path_factory.mktemp("good_dicoms"))


@pytest.fixture(scope="module")
def broken_dicoms(tmp_path_factory: pytest.TempPathFactory, good_dicoms) -> dict[str, tuple[Path, str]]:
    return broken_dicom_cases(tmp_path_factory.mktemp("broken_dicoms"), good_dicoms["monochrome2_8bit"])


#: case -> (shape, (row, col) inside the bright box, (row, col) of the dark background)
DECODED = {
    "monochrome2_8bit": ((128, 128), (60, 60), (5, 5)),
    "monochrome1": ((128, 128), (60, 60), (5, 5)),
    "12bit_window": ((128, 128), (60, 60), (5, 5)),
    "12bit_no_window": ((128, 128), (60, 60), (5, 5)),
    "16bit_voi_lut": ((128, 128), (60, 60), (5, 5)),
    "16bit_voi_lut_8bit_entries": ((128, 128), (60, 60), (5, 5)),
    "signed_16bit": ((128, 128), (60, 60), (5, 5)),
    "rgb": ((128, 128), (60, 60), (5, 5)),
    "palette_colour": ((128, 128), (60, 60), (5, 5)),
    "multi_frame": ((128, 128), (60, 60), (5, 5)),
    "non_square": ((96, 160), (30, 30), (80, 120)),
    "tiny_16px": ((16, 16), (8, 8), (1, 1)),
    "huge_4096px": ((4096, 4096), (2000, 2000), (100, 100)),
    "missing_tags": ((128, 128), (60, 60), (5, 5)),
    "jpeg_baseline": ((128, 128), (60, 60), (5, 5)),
}


@pytest.mark.parametrize("case", sorted(DECODED))
def test_every_pixel_format_decodes_bright_where_dense(good_dicoms, case):
    """Each variant comes out uint8 at its own size, the dense box bright and the background dark
    (MONOCHROME1 inverted, > 8 bits windowed, colour to grey, first frame of many)."""
    shape, inside, outside = DECODED[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, meta = read_dicom(good_dicoms[case])
    assert image.dtype == np.uint8 and image.shape == shape
    assert image[inside] >= 200 and image[outside] <= 60, (image[inside], image[outside])
    assert (meta["rows"], meta["columns"]) == shape
    frame_warnings = [w for w in caught if "frames, only the first" in str(w.message)]
    assert len(frame_warnings) == (1 if case == "multi_frame" else 0)


def test_voi_lut_is_applied_not_a_plain_min_max(good_dicoms):
    """The square-root LUT lifts the background from 100 (of 4000) to 40 % grey; min-max would give ~0."""
    image, _ = read_dicom(good_dicoms["16bit_voi_lut"])
    assert image[5, 5] == round(int(VOI_LUT[100]) * 255 / 4095)
    assert image[60, 60] == round(int(VOI_LUT[4000]) * 255 / 4095)


def test_an_8_bit_voi_lut_longer_than_256_entries_does_not_wrap(good_dicoms):
    """4096 entries of 8 bits (entry i = i // 16): 4000 maps to 250, not to entry 4000 mod 256."""
    image, _ = read_dicom(good_dicoms["16bit_voi_lut_8bit_entries"])
    assert image[60, 60] == 250 and image[5, 5] == 100 // 16


def test_missing_tags_give_none_not_an_error(good_dicoms):
    _, meta = read_dicom(good_dicoms["missing_tags"])
    assert meta["patient_id"] is None and meta["age"] is None and meta["sex"] is None
    assert meta["view_position"] is None and meta["rows"] == 128


@pytest.mark.parametrize("case", ["empty", "truncated_header", "truncated_pixels", "random_bytes", "png_renamed",
                                  "text_renamed", "no_pixel_data", "private_transfer_syntax",
                                  "pixel_data_too_short"])
def test_broken_dicom_is_one_clear_error_naming_the_file(broken_dicoms, case):
    path, cause = broken_dicoms[case]
    with pytest.raises(DicomReadError) as info:
        read_dicom(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert re.search(cause, info.value.cause), info.value.cause


def test_missing_decoder_plugin_is_named(real_sample, monkeypatch):
    """A JPEG file whose every decoder is unavailable: the error names the syntax and what is missing."""
    from pydicom.pixels.decoders import JPEGBaseline8BitDecoder

    monkeypatch.setattr(JPEGBaseline8BitDecoder, "_available", {})
    monkeypatch.setattr(JPEGBaseline8BitDecoder, "_unavailable", {"pillow": ("requires Pillow",)})
    path = real_sample / "stage_2_train_images" / f"{PID}.dcm"
    with pytest.raises(DicomReadError, match=r"JPEG Baseline.*(missing|plugin)") as info:
        read_dicom(path)
    assert info.value.path == str(path)


def test_folder_and_missing_file_are_dicom_errors(tmp_path):
    with pytest.raises(DicomReadError, match="is a folder"):
        read_dicom(tmp_path)
    with pytest.raises(DicomReadError, match="file not found"):
        read_dicom(tmp_path / "nope.dcm")


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory, broken_dicoms) -> Path:
    """A Kaggle-layout folder of 12 patients whose first four images are broken files."""
    root = write_dataset(tmp_path_factory.mktemp("mixed"), small_patients(12))
    images = root / "stage_2_train_images"
    for pid, case in zip(("p000", "p001", "p002", "p003"), ("empty", "random_bytes", "png_renamed", "no_pixel_data"),
                         strict=True):
        shutil.copy(broken_dicoms[case][0], images / f"{pid}.dcm")
    return root


def test_cache_command_skips_counts_and_names_bad_images(mixed_dataset, tmp_path, capsys):
    out = tmp_path / "cache"
    code, stdout, err = run_cli(capsys, "cache", mixed_dataset, "--size", 32, "--out", out, "--workers", 1)
    assert code == 0, err
    assert "cached 8," in stdout and "failed 4," in stdout
    for pid, cause in (("p000", "empty file"), ("p001", "not a DICOM"), ("p002", "not a DICOM"),
                       ("p003", "no pixel data")):
        assert re.search(rf"failed {pid}: .*{cause}", stdout), stdout
    cache = ImageCache.open(out)
    assert sorted(cache.patient_ids) == [f"p{i:03d}" for i in range(4, 12)]
    assert cache.verify() == []


def test_eda_command_counts_unreadable_images_and_reports_the_rest(mixed_dataset, tmp_path, capsys):
    out = tmp_path / "eda"
    code, stdout, err = run_cli(capsys, "eda", mixed_dataset, "--out", out, "--workers", 1, "--samples", 1)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_unreadable"] == 4 and summary["images_found"] == 12
    assert "4 unreadable image(s)" in stdout


def test_link_loops_in_the_images_folder_do_not_stop_split_or_cache(tmp_path, capsys):
    """``p000.dcm`` -> ``x.dcm`` -> ``p000.dcm`` and a link from the folder to itself: p000 is reported
    image_missing (file:line) and the other five patients are split and cached."""
    root = write_dataset(tmp_path / "data", small_patients(6), size=64)
    images = root / "stage_2_train_images"
    (images / "p000.dcm").unlink()
    (images / "p000.dcm").symlink_to(images / "x.dcm")
    (images / "x.dcm").symlink_to(images / "p000.dcm")
    (images / "again").symlink_to(images, target_is_directory=True)
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "split", "--val", 0.2, "--test", 0.2)
    assert code == 0, err
    assert "images: 5 found, 1 missing" in err and "stage_2_train_labels.csv:2: image_missing: patient p000" in err
    code, stdout, err = run_cli(capsys, "cache", root, "--size", 16, "--out", tmp_path / "cache", "--workers", 1)
    assert code == 0, err
    assert "cached 5," in stdout and "missing 1;" in stdout
    assert sorted(ImageCache.open(tmp_path / "cache").patient_ids) == [f"p{i:03d}" for i in range(1, 6)]


@pytest.mark.slow
def test_train_leaves_out_unreadable_images_and_says_which(mixed_dataset, tmp_path, capsys):
    """Four broken images among twelve: ``train`` finishes on the rest, prints how many it left out per
    set and lists them in done.json (none is silently dropped)."""
    split = tmp_path / "split"
    code, _, err = run_cli(capsys, "split", mixed_dataset, "--out", split, "--val", 0.25, "--test", 0.25)
    assert code == 0, err
    run = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", mixed_dataset, "--split", split, "--out", run,
                                "--encoder", "resnet18", "--image-size", 64, "--batch-size", 2, "--num-workers", 0,
                                "--epochs", 1, "--aug", "resize_only", "--precision", "32-true",
                                "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    excluded = json.loads((run / "done.json").read_text())["images_excluded"]
    assert sorted(pid for ids in excluded.values() for pid in ids) == ["p000", "p001", "p002", "p003"]
    counts = ", ".join(f"{name} {len(ids)}" for name, ids in excluded.items())
    assert f"patients left out for an unreadable or missing image: {counts}" in stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A run folder with a random 64-px resnet18 (what predict loads; boxes do not matter here)."""
    import torch

    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("tiny_run")
    save_checkpoint(run / "best_model.pt", build_model(ModelConfig(encoder="resnet18", image_size=64)),
                    extra={"threshold": 0.5, "image_size": 64})
    return run


def test_predict_on_a_folder_of_every_case(tiny_model, good_dicoms, broken_dicoms, tmp_path, capsys):
    """Every decodable variant is predicted, every broken file is listed with its cause, a link loop
    ends, a file whose PatientID differs from its name is predicted under the PatientID with a warning,
    and a second file of the same patient is reported as a duplicate, not predicted twice."""
    folder = tmp_path / "in"
    (folder / "good").mkdir(parents=True)
    for path in good_dicoms.values():
        shutil.copy(path, folder / "good" / path.name)
    (folder / "bad").mkdir()
    for path, _ in broken_dicoms.values():
        shutil.copy(path, folder / "bad" / path.name)
    make_dicom(folder / "renamed.dcm", np.zeros((64, 64), np.uint8), patient_id="the-real-id")
    make_dicom(folder / "zz_copy.dcm", np.zeros((64, 64), np.uint8), patient_id="rgb")
    symlink_loop(folder / "loop")
    sub = tmp_path / "sub.csv"
    code, stdout, err = run_cli(capsys, "predict", tiny_model, folder, "--out", sub, "--json", tmp_path / "p.json")
    assert code == 0, err
    predicted = pd.read_csv(sub)["patientId"].tolist()
    missing_tags = {"missing_tags"}  # no PatientID tag: the file name is the id
    assert set(predicted) == set(good_dicoms) | missing_tags | {"the-real-id"}
    assert len(predicted) == len(set(predicted))
    for path, _ in broken_dicoms.values():
        assert f"unreadable {folder / 'bad' / path.name}" in stdout
    assert f"unreadable {folder / 'loop' / 'a'}: symbolic link loop" in stdout
    assert f"unreadable: {len(broken_dicoms) + 2};" in stdout  # + the two links of the a -> b -> a cycle
    assert "differs from the file name" in stdout and "the-real-id" in stdout
    assert re.search(r"duplicate rgb: .*zz_copy\.dcm \(kept .*rgb\.dcm\)", stdout), stdout


def test_predict_on_nothing_readable_is_one_line(tiny_model, tmp_path, capsys):
    empty = symlink_loop(tmp_path / "only_loops")
    code, _, err = run_cli(capsys, "predict", tiny_model, empty, "--out", tmp_path / "s.csv")
    assert_one_line_error(code, err, "predict", r"no DICOM files")
    assert not (tmp_path / "s.csv").exists()


# ============================================================================================ CSV
def dataset_with(tmp_path: Path, labels: list[str], classes: list[str], **kw) -> Path:
    root = tmp_path / "data"
    write_csv(root / "stage_2_train_labels.csv", labels, **kw)
    write_csv(root / "stage_2_detailed_class_info.csv", classes, **kw)
    return root


GOOD_L = ["a1,100,100,200,300,1", "a2,,,,,0", "a3,500,400,100,100,1", "a4,,,,,0", "a5,,,,,0", "a6,,,,,0",
          "a7,10,10,50,50,1", "a8,,,,,0", "a9,,,,,0", "a10,20,20,50,50,1"]
GOOD_C = ["a1,Lung Opacity", "a2,Normal", "a3,Lung Opacity", "a4,No Lung Opacity / Not Normal", "a5,Normal",
          "a6,Normal", "a7,Lung Opacity", "a8,Normal", "a9,Normal", "a10,Lung Opacity"]

#: case -> (extra labels rows, extra class rows, problem kind, 1-based line in its file, patient kept?)
ROW_CASES = {
    "nan_box_on_target_1": (["b1,,,,,1"], ["b1,Lung Opacity"], "missing_box", "labels:12", False),
    "box_on_target_0": (["b1,10,10,50,50,0"], ["b1,Normal"], "unexpected_box", "labels:12", False),
    "zero_width": (["b1,10,10,0,50,1"], ["b1,Lung Opacity"], "bad_box_size", "labels:12", False),
    "negative_height": (["b1,10,10,50,-5,1"], ["b1,Lung Opacity"], "bad_box_size", "labels:12", False),
    "box_off_image": (["b1,2000,2000,50,50,1"], ["b1,Lung Opacity"], "box_off_image", "labels:12", False),
    "box_partly_outside": (["b1,1000,1000,50,50,1"], ["b1,Lung Opacity"], "box_outside", "labels:12", True),
    "non_numeric": (["b1,ten,10,50,50,1"], ["b1,Lung Opacity"], "non_numeric", "labels:12", False),
    "unknown_class": (["b1,,,,,0"], ["b1,Pneumothorax"], "unknown_class", "classes:12", False),
    "class_target_disagree": (["b1,,,,,0"], ["b1,Lung Opacity"], "class_target_mismatch", "labels:12", False),
    "only_in_labels": (["b1,,,,,0"], [], "missing_class", "labels:12", False),
    "only_in_classes": ([], ["b1,Normal"], "missing_labels", "classes:12", False),
    "duplicate_row": (["a1,100,100,200,300,1"], ["a1,Lung Opacity"], "duplicate_row", "labels:12", True),
    "target_conflict": (["b1,,,,,0", "b1,10,10,50,50,1"], ["b1,Normal", "b1,Lung Opacity"], "target_conflict",
                        "labels:12", False),
    "wrong_field_count": (["b1,10,10,50,50,1,7,8"], ["b1,Lung Opacity"], "wrong_field_count", "labels:12", False),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_label_row_is_reported_with_file_and_line_and_the_split_goes_on(tmp_path, capsys, case):
    """``split`` reports the problem (kind, file:line) on stderr, drops or keeps the patient as
    documented, and still writes a split of the good patients."""
    extra_l, extra_c, kind, where, kept = ROW_CASES[case]
    root = dataset_with(tmp_path, [LABELS_HEADER, *GOOD_L, *extra_l], [CLASSES_HEADER, *GOOD_C, *extra_c])
    out = tmp_path / "split"
    code, _, err = run_cli(capsys, "split", root, "--out", out, "--labels-only", "--val", 0.2, "--test", 0.2)
    assert code == 0, err
    file, line = where.split(":")
    name = "stage_2_train_labels.csv" if file == "labels" else "stage_2_detailed_class_info.csv"
    assert re.search(rf"{name}:{line}: {kind}:", err), err
    patients = set(pd.concat([pd.read_csv(out / f"{s}.csv") for s in ("train", "val", "test")])["patientId"])
    assert {f"a{i}" for i in range(1, 11)} <= patients
    subject = "a1" if case == "duplicate_row" else "b1"
    assert (subject in patients) is kept


def test_strict_turns_a_row_problem_into_one_line(tmp_path, capsys):
    root = dataset_with(tmp_path, [LABELS_HEADER, *GOOD_L, "b1,10,10,0,50,1"], [CLASSES_HEADER, *GOOD_C,
                                                                               "b1,Lung Opacity"])
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "s", "--labels-only", "--strict")
    assert_one_line_error(code, err, "split", r"under --strict", r"stage_2_train_labels\.csv:12: bad_box_size")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("labels, message", [
    (["patientId,x,y,width,height"], r"missing column\(s\) Target"),
    (["patientId;x;y;width;height;Target"], r"has a header but no data rows"),
    ([], r"file is empty"),
    ([LABELS_HEADER], r"has a header but no data rows"),
    (["pid,x,y,w,h,t", "a1,1,1,1,1,1"], r"missing column\(s\) patientId, width, height, Target \(header has: pid, x, y, w, h, t\)"),
])
def test_unusable_labels_file_is_one_line_naming_it(tmp_path, capsys, labels, message):
    root = tmp_path / "data"
    path = root / "stage_2_train_labels.csv"
    if labels:
        write_csv(path, labels)
    else:
        root.mkdir()
        path.write_bytes(b"")
    write_csv(root / "stage_2_detailed_class_info.csv", [CLASSES_HEADER, *GOOD_C])
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "s", "--labels-only")
    assert_one_line_error(code, err, "split", re.escape(str(path)) if labels != [] else r"stage_2_train_labels",
                          message)


def test_extra_columns_are_ignored_and_noted(tmp_path, capsys):
    labels = [LABELS_HEADER + ",comment", *(row + ",hello" for row in GOOD_L)]
    root = dataset_with(tmp_path, labels, [CLASSES_HEADER, *GOOD_C])
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "s", "--labels-only", "--val", 0.2,
                           "--test", 0.2)
    assert code == 0, err
    assert "note extra_columns: 1" in err and "patients: 10 kept (0 dropped), 4 boxes" in err


def test_excel_resave_semicolons_crlf_bom_reads_the_same(tmp_path, capsys):
    """A ``;``-separated, CRLF, BOM re-save (decimal commas) gives the same split as the plain file."""
    plain = dataset_with(tmp_path / "plain", [LABELS_HEADER, *GOOD_L], [CLASSES_HEADER, *GOOD_C])
    excel_l = [row.replace(",", ";") for row in [LABELS_HEADER, *GOOD_L]]
    excel_l[1] = "a1;100,0;100;200;300;1"  # decimal comma
    excel_c = [row.replace(",", ";") for row in [CLASSES_HEADER, *GOOD_C]]
    excel = dataset_with(tmp_path / "excel", excel_l, excel_c, newline="\r\n", bom=True)
    outs = []
    for root in (plain, excel):
        out = root.parent / "split"
        code, _, err = run_cli(capsys, "split", root, "--out", out, "--labels-only", "--val", 0.2, "--test", 0.2)
        assert code == 0, err
        outs.append(out)
        if root == excel:
            for kind in ("utf8_bom", "crlf_line_endings", "semicolon_delimiter"):
                assert f"note {kind}" in err, err
    for name in ("train.csv", "val.csv", "test.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(outs[0] / name), pd.read_csv(outs[1] / name))


@pytest.mark.slow
def test_a_100_mb_labels_file_is_read_in_bounded_memory(tmp_path):
    """A ~100 MB labels CSV (800 000 patients) is read chunk by chunk: every row is accounted for and the
    peak memory growth of the whole load stays under 8x the size of the two files (measured: about 6x,
    most of it the records themselves; an unchunked read of the text plus the frames would go past it)."""
    labels, classes = tmp_path / "labels.csv", tmp_path / "classes.csv"
    rows = write_big_labels(labels, 100)
    write_big_classes(classes, labels)
    probe = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        from pneumodet.data.rsna import load_rsna
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data = load_rsna(None, labels=Path({str(labels)!r}), classes=Path({str(classes)!r}))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"patients": len(data.records), "boxes": data.report.boxes,
                          "problems": len(data.report.problems), "growth": (after - before) * 1024}}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["patients"] == rows // 2 and result["boxes"] == rows and result["problems"] == 0
    size = labels.stat().st_size + classes.stat().st_size
    assert labels.stat().st_size >= 100_000_000
    assert result["growth"] < 8 * size, (result["growth"] / size, result)


# ============================================================================================ submissions
@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score")
    return write_csv(root / "labels.csv", [LABELS_HEADER, *GOOD_L])


@pytest.mark.parametrize("rows, message", [
    (["a1,0.9 100 100 200"], r"line 2: patient a1: PredictionString has 4 numbers, not groups of 5"),
    (["a1,0.9 100 100 200 300 0.5"], r"line 2: .*6 numbers"),
    (["a1,0.9 100 abc 200 300"], r"line 2: .*value 'abc' is not a number"),
    (["a1,0.9 100 100 -200 300"], r"line 2: .*negative width or height"),
    (["a1,0.9 100 100 nan 300"], r"line 2: .*NaN or infinity"),
    (["a1,0.9 100 100 200 300", "a1,"], r"line 3: patient a1 already listed on line 2"),
    (["a1,", "ghost,0.5 1 1 1 1", "ghost2,"], r"line 3: patient ghost is not in the labels \(2 of the file's 3"),
    (["a1,0.9 100 100 200 300,extra"], r"line 2: expected 2 fields"),
    ([",0.5 1 1 1 1"], r"line 2: empty patientId"),
])
def test_malformed_submission_is_one_line_naming_file_and_line(tmp_path, capsys, labels_csv, rows, message):
    sub = write_csv(tmp_path / "sub.csv", ["patientId,PredictionString", *rows])
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels_csv)
    assert_one_line_error(code, err, "score", re.escape(str(sub)), message)


def test_wrong_header_and_empty_submission(tmp_path, capsys, labels_csv):
    for text, message in (("id,boxes\na1,\n", r"line 1: header is 'id,boxes'"), ("", r"empty file")):
        sub = tmp_path / "sub.csv"
        sub.write_text(text)
        code, _, err = run_cli(capsys, "score", sub, "--labels", labels_csv)
        assert_one_line_error(code, err, "score", message)


def test_good_submission_still_scores(tmp_path, capsys, labels_csv):
    """The control: the same labels and a perfect submission score 1."""
    rows = ["a1,1.0 100 100 200 300", "a2,", "a3,1.0 500 400 100 100"]
    sub = write_csv(tmp_path / "sub.csv", ["patientId,PredictionString", *rows])
    code, stdout, err = run_cli(capsys, "score", sub, "--labels", labels_csv, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["score"] == pytest.approx(1.0)


# ============================================================================================ commands
@pytest.mark.parametrize("args, pattern", [
    (["evaluate", "{tmp}/empty"], r"empty is not a finished training run: config\.yaml is missing"),
    (["predict", "{tmp}/no_model", "{tmp}", "--out", "{tmp}/s.csv"], r"no_model: no such checkpoint"),
    (["export", "{tmp}/no_model", "--onnx", "{tmp}/m.onnx"], r"no_model: no such checkpoint"),
    (["score", "{tmp}/no.csv", "--labels", "{tmp}/no_labels.csv"], r"no(_labels)?\.csv: cannot read"),
    (["cache", "{data}", "--size", "0", "--out", "{tmp}/c"], r"cache size must be positive, got 0"),
    (["split", "{data}", "--out", "{tmp}/s", "--val", "1.5"], r"val fraction must be between 0 and 1"),
    (["eda", "{tmp}/no_folder", "--out", "{tmp}/e"], r"no_folder: not a folder"),
    (["compare", "{tmp}/empty", "--out", "{tmp}/c"], r"at least one run"),
    (["grid", "--data", "{data}", "--out", "{tmp}/g", "--samples", "10,abc"], r"--samples takes .* whole numbers"),
    (["train", "--config", "{tmp}/no.yaml", "--out", "{tmp}/r"], r"no\.yaml: cannot read config"),
    (["train", "--out", "{tmp}/empty", "--resume"], r"--data and --split are required"),
    (["augment-preview", "{data}", "--level", "extreme"], r"unknown augmentation level 'extreme'"),
])
def test_each_command_names_a_user_mistake_in_one_line(tmp_path, capsys, args, pattern):
    data = dataset_with(tmp_path, [LABELS_HEADER, *GOOD_L], [CLASSES_HEADER, *GOOD_C])
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, data=data) for a in args]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, argv[0], pattern)


# ============================================================================================ fuzzing
@pytest.fixture(scope="module")
def seed_dicoms(good_dicoms, real_sample) -> list[bytes]:
    return [(real_sample / "stage_2_train_images" / f"{PID}.dcm").read_bytes(),
            good_dicoms["12bit_window"].read_bytes(), good_dicoms["rgb"].read_bytes()]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other) - 1))
            data[at:at] = other[start:start + draw(st.integers(1, 4096))]
        elif op == "zero":
            data[at:at + draw(st.integers(1, 64))] = bytes(64)[: len(data[at:at + 64])]
    return bytes(data)


def test_fuzzed_dicom_bytes_only_ever_raise_dicom_read_error(seed_dicoms, tmp_path_factory):
    """Truncated, bit-flipped and spliced real files: a uint8 image or DicomReadError, nothing else."""
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes = {"decoded": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(data=mutated(seed_dicoms))
    def check(data: bytes) -> None:
        path = folder / "fuzz.dcm"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image, _ = read_dicom(path)
        except DicomReadError as exc:
            assert exc.path == str(path)
            outcomes["refused"] += 1
            return
        assert image.dtype == np.uint8 and image.ndim == 2 and image.size > 0
        outcomes["decoded"] += 1

    check()
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes  # the fuzzer reached both sides


_SUB_ALPHABET = st.sampled_from(list("abc019.,- \n\r\"e+;\t") + ["nan", "inf", "PredictionString", "patientId"])


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(_SUB_ALPHABET, max_size=60).map("".join), header=st.booleans(),
       raw=st.binary(max_size=40))
def test_fuzzed_submission_only_ever_raises_submission_error(tmp_path_factory, body, header, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz_sub.csv"
    path.write_bytes((b"patientId,PredictionString\n" if header else b"") + body.encode() + raw)
    try:
        predictions = read_submission(path, known_ids={"a", "b", "c"})
    except SubmissionError as exc:
        assert str(path) in str(exc)
        return
    for pid, boxes in predictions.items():
        assert pid in {"a", "b", "c"}
        assert boxes.shape[1] == 5 and np.isfinite(boxes).all() and (boxes[:, 3:] >= 0).all()
