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

from _helpers import assert_one_line_error
from badinputs import (
    ABSURD_BOXES,
    CLASSES_HEADER,
    LABELS_HEADER,
    VOI_LUT,
    blob_image,
    broken_dicom_cases,
    crowded_submission,
    decompression_bombs,
    dicom_cases,
    display_cases,
    jpeg_bytes,
    jpeg_frames_dicom,
    make_dicom,
    non_utf8_path,
    small_patients,
    symlink_loop,
    with_jpeg_frame_size,
    write_big_classes,
    write_big_labels,
    write_csv,
    write_dataset,
)
from pneumodet.cli import main
from pneumodet.data.cache import ImageCache
from pneumodet.data.dicom import read_dicom
from pneumodet.data.split import read_split
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
    a second image of a patient is predicted and shares the patient's one submission row, and a second
    copy of an image (same SOP Instance UID) is reported as a duplicate, not predicted twice."""
    folder = tmp_path / "in"
    (folder / "good").mkdir(parents=True)
    for path in good_dicoms.values():
        shutil.copy(path, folder / "good" / path.name)
    (folder / "bad").mkdir()
    for path, _ in broken_dicoms.values():
        shutil.copy(path, folder / "bad" / path.name)
    make_dicom(folder / "renamed.dcm", np.zeros((64, 64), np.uint8), patient_id="the-real-id")
    make_dicom(folder / "zz_copy.dcm", np.zeros((64, 64), np.uint8), patient_id="rgb")  # rgb's second image
    shutil.copy(good_dicoms["rgb"], folder / "zz_same.dcm")  # the same image again
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
    assert "patients with several images: 1 (" in stdout and "several images of rgb: 2" in stdout
    assert re.search(r"duplicate rgb: .*zz_same\.dcm \(kept .*rgb\.dcm; same SOP Instance UID\)", stdout), stdout


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
    (["compare", "{tmp}/empty", "--out", "{tmp}/c"], r"no training run found in .*empty"),
    (["grid", "--data", "{data}", "--out", "{tmp}/g", "--samples", "10,abc"], r"--samples takes .* whole numbers"),
    (["train", "--config", "{tmp}/no.yaml", "--out", "{tmp}/r"], r"no\.yaml: file not found"),
    (["train", "--out", "{tmp}/empty", "--resume"], r"empty: no run to resume \(config.yaml not found\)"),
    (["augment-preview", "{data}", "--level", "extreme"], r"unknown augmentation level 'extreme'"),
    (["train", "--data", "{data}", "--split", "{tmp}/s", "--out", "{tmp}/r", "--seed", "-1"],
     r"seed must be in \[0, 4294967295\], got -1"),
    (["train", "--data", "{data}", "--split", "{tmp}/s", "--out", "{tmp}/r", "--num-workers", "-1"],
     r"num_workers must be in \[0, 256\], got -1"),
    (["train", "--data", "{data}", "--split", "{tmp}/s", "--out", "{tmp}/r", "--image-size", "100"],
     r"image_size must be a multiple of 32 in \[64, 2048\], got 100"),
    (["train", "--data", "{data}", "--split", "{tmp}/no_split", "--out", "{tmp}/r", "--epochs", "1"],
     r"no_split/train\.csv: cannot read"),
    (["grid", "--data", "{data}", "--out", "{tmp}/g", "--seed", "-5"], r"seed must be in \[0, 4294967295\], got -5"),
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


# ================================================================================ labels, submissions, paths
def test_absurd_coordinates_are_a_row_problem_and_every_command_reading_labels_goes_on(tmp_path, capsys):
    """Boxes of 1e300 px (and 2e6, -1e300, the largest float) once passed the reader and crashed eda
    (overflow in its histograms). Each is now ``labels.csv:N: absurd_value`` and its patient is dropped;
    split, eda and cache go on with the others, and score refuses the labels in one line."""
    root = write_dataset(tmp_path / "data", small_patients(6), size=64)
    labels, classes = root / "stage_2_train_labels.csv", root / "stage_2_detailed_class_info.csv"
    first = len(labels.read_text().splitlines()) + 1
    absurd = {f"z{i}": box for i, box in enumerate(ABSURD_BOXES.values())}
    with labels.open("a") as fl, classes.open("a") as fc:
        for pid, box in absurd.items():
            fl.write(f"{pid},{box},1\n")
            fc.write(f"{pid},Lung Opacity\n")
            make_dicom(root / "stage_2_train_images" / f"{pid}.dcm", np.zeros((64, 64), np.uint8),
                       patient_id=pid)

    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "split", "--val", 0.2, "--test", 0.2)
    assert code == 0, err
    for line, pid in list(enumerate(absurd, start=first))[:3]:  # the summary shows three of a kind
        assert f"stage_2_train_labels.csv:{line}: absurd_value: patient {pid}" in err, err
    assert f"error absurd_value: {len(absurd)}" in err and f"({len(absurd)} dropped)" in err
    split = read_split(tmp_path / "split")
    assert sorted(r.patient_id for recs in split.values() for r in recs) == [f"p{i:03d}" for i in range(6)]

    code, _, err = run_cli(capsys, "eda", root, "--out", tmp_path / "eda", "--workers", 1, "--samples", 1)
    assert code == 0, err
    summary = json.loads((tmp_path / "eda" / "summary.json").read_text())
    assert summary["patients"] == 6 and summary["label_problems"] == len(absurd)

    code, _, err = run_cli(capsys, "cache", root, "--size", 16, "--out", tmp_path / "cache", "--workers", 1)
    assert code == 0, err
    assert sorted(ImageCache.open(tmp_path / "cache").patient_ids) == [f"p{i:03d}" for i in range(6)]

    sub = write_csv(tmp_path / "sub.csv", ["patientId,PredictionString", "p000,"])
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels)
    assert_one_line_error(code, err, "score", rf"stage_2_train_labels\.csv:{first}: absurd_value")


def test_score_refuses_absurd_predicted_coordinates_in_one_line(tmp_path, capsys, labels_csv):
    sub = write_csv(tmp_path / "sub.csv", ["patientId,PredictionString", "a1,0.9 1e300 100 200 300"])
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels_csv)
    assert_one_line_error(code, err, "score", r"line 2: patient a1: PredictionString has a coordinate beyond")


def test_a_submission_with_6000_boxes_for_one_patient_is_read_and_scored(tmp_path, capsys, labels_csv):
    """6,000 boxes make a 190 kB field, past the csv module's default limit (131,072 characters): read
    and scored (one box matches, 5,999 are false positives at every threshold)."""
    sub = crowded_submission(tmp_path / "sub.csv", "a1", 6000)
    assert sub.stat().st_size > 131_072
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels_csv, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["score"] == pytest.approx(1 / 6000)


@pytest.mark.parametrize(("boxes", "group", "message"), [
    (10_001, "0.5 100 100 200 300",
     r"line 2: patient a1: PredictionString has 10001 boxes, more than the 10000"),
    (100_000, "1 0 0 1 1", r"line 2: patient a1: PredictionString has 100000 boxes, more than the 10000"),
    (1, "1 0 0 1 " + "1" * 1_300_000, r"line 2: not a readable CSV row \(field larger than field limit"),
])
def test_a_crowded_or_huge_submission_row_is_one_line_naming_it(tmp_path, capsys, labels_csv, boxes, group,
                                                                  message):
    """A file of at most about 1 MB never costs minutes or gigabytes: a patient may have at most 10,000
    boxes (scoring grows with boxes x ground-truth boxes per image) and a field at most 1.25 M characters."""
    sub = crowded_submission(tmp_path / "sub.csv", "a1", boxes, group)
    assert sub.stat().st_size <= 1_400_000
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels_csv)
    assert_one_line_error(code, err, "score", re.escape(str(sub)), message)


def test_label_and_submission_problems_name_the_line_where_their_row_starts(tmp_path, capsys):
    """Quoted fields holding line breaks (an extra column of the labels, a patient id of the submission)
    no longer shift the reported line numbers."""
    head = LABELS_HEADER + ",note"
    rows = [row + (',"see\nthe\r\nreport"' if i % 3 == 0 else ",") for i, row in enumerate(GOOD_L)]
    rows.append('b1,10,10,0,50,1,"zero\nwidth"')
    root = dataset_with(tmp_path, [head, *rows], [CLASSES_HEADER, *GOOD_C, "b1,Lung Opacity"])
    line = 2 + sum(row.count("\n") + 1 for row in rows[:-1])
    assert line == 2 + len(GOOD_L) + 2 * 4  # four notes of three lines each
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "split", "--labels-only", "--val", 0.2,
                           "--test", 0.2)
    assert code == 0, err
    assert f"stage_2_train_labels.csv:{line}: bad_box_size: patient b1" in err, err

    labels = write_csv(tmp_path / "labels.csv", [LABELS_HEADER, *GOOD_L])
    sub = write_csv(tmp_path / "sub.csv", ["patientId,PredictionString", '"a\n1",', "a2,", "a3,0.5 1 2 3"])
    code, _, err = run_cli(capsys, "score", sub, "--labels", labels)
    assert_one_line_error(code, err, "score", r"line 5: patient a3: PredictionString has 4 numbers")


def test_a_data_folder_named_with_non_utf8_bytes_is_split_and_explored(tmp_path, capsys, monkeypatch):
    """A folder named with byte 0xff (a str with a surrogate escape) made printing the summary or a
    DICOM warning, and writing the report, raise UnicodeEncodeError. Text shows it as ``\\xff``; the
    split CSVs keep the exact bytes, so every image path read back from them opens the file."""
    def show_on_stderr(message, category, filename, lineno, file=None, line=None):  # as outside pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show_on_stderr)
    root = write_dataset(non_utf8_path(tmp_path), small_patients(6), size=64)
    (root / "stage_2_train_images" / "p000.dcm").write_bytes(b"broken")  # its path lands in the report
    code, _, err = run_cli(capsys, "split", root, "--out", tmp_path / "split", "--val", 0.2, "--test", 0.2)
    assert code == 0 and "Traceback" not in err, err
    assert "data\\xff" in err
    meta = json.loads((tmp_path / "split" / "split.json").read_bytes().decode("utf-8"))  # strict UTF-8
    assert meta["source"] == str(tmp_path / "data\\xff")
    records = [r for recs in read_split(tmp_path / "split").values() for r in recs]
    assert len(records) == 6 and all(r.image_path.is_file() for r in records)
    assert {r.image_path.parent.parent for r in records} == {root.resolve()}

    code, _, err = run_cli(capsys, "eda", root, "--out", tmp_path / "eda", "--workers", 1, "--samples", 1)
    assert code == 0 and "Traceback" not in err, err
    assert "data\\xff/stage_2_train_images/p004.dcm: the decoded image is constant" in err  # a DICOM warning
    report = (tmp_path / "eda" / "report.html").read_bytes().decode("utf-8")  # strict UTF-8
    assert "data\\xff" in report
    assert "data\\xff" in (tmp_path / "eda" / "unreadable_files.csv").read_bytes().decode("utf-8")


# ============================================================================================ bombs
#: Address space a child reading bombs may use: a decoder taking what a bomb declares fails inside it.
_READ_LIMIT = 1536 * 2**20
#: The peak resident memory of this program (VmHWM: ru_maxrss would count the parent forked before exec).
_PEAK_RSS = textwrap.dedent("""
    def peak_rss():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
""")
_READ_PROBE = _PEAK_RSS + textwrap.dedent("""
    import json, resource, sys, warnings
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
    from pneumodet.data.dicom import read_dicom
    from pneumodet.errors import DicomReadError
    warnings.simplefilter("ignore")
    out = {}
    for path in sys.argv[2:]:
        for metadata_only in (False, True):
            try:
                image, meta = read_dicom(path, metadata_only=metadata_only)
                result = {"shape": None if image is None else list(image.shape), "notes": meta["image_notes"]}
            except DicomReadError as exc:
                result = {"refused": exc.cause}
            out[f"{path}|{metadata_only}"] = result
    out["maxrss"] = peak_rss()
    print(json.dumps(out))
""")


def test_decompression_bombs_are_refused_before_any_decoder_runs(tmp_path):
    """1-2 KB files declaring 65535 x 65535 pixels (in the header, or only in the JPEG / JPEG 2000 frame
    header), RLE and uncompressed likewise, 2^31 frames, more pixel bytes than declared, a JPEG stream
    whose size disagrees with the header, a 4 GB element in a 1 KB file and a 0.5 MB deflated data set
    inflating to 512 MB: each is one ``DicomReadError`` naming its cause, and reading them all, in a
    child limited to 1.5 GB of address space, peaks below 400 MB (unchecked, a decoder takes 4-8 GB).
    A multi-frame JPEG whose second frame is a bomb decodes: only the first frame is ever decoded."""
    bombs = decompression_bombs(tmp_path / "bombs")
    grey = blob_image(16, 16, (4, 4, 12, 12))
    bomb_frame = with_jpeg_frame_size(jpeg_bytes(grey), 65535, 65535)
    frames = jpeg_frames_dicom(tmp_path / "frames.dcm", [jpeg_bytes(grey), bomb_frame], grey)
    paths = [str(path) for path, _ in bombs.values()] + [str(frames)]
    done = subprocess.run([sys.executable, "-c", _READ_PROBE, str(_READ_LIMIT), *paths], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # a decoder that aborts on a failed allocation ends here
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (path, cause) in bombs.items():
        outcome = result[f"{path}|False"]
        assert "refused" in outcome and re.search(cause, outcome["refused"]), (name, outcome)
        assert "\n" not in outcome["refused"]
    for name in ("deflate_512mb", "huge_element"):  # bounded even when only the header is read
        assert "refused" in result[f"{bombs[name][0]}|True"], name
    assert result[f"{frames}|False"] == {"shape": [16, 16], "notes": ["2 frames, only the first is used"]}
    assert result["maxrss"] < 400 * 2**20, result["maxrss"] / 2**20


_CLI_PROBE = _PEAK_RSS + textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
    from pneumodet.cli import main
    code = main(sys.argv[2:])
    print(f"maxrss {peak_rss()}", file=sys.stderr)
    sys.exit(code)
""")
#: Address space for a whole command in a child (torch alone maps about 4.5 GB); a safety net only.
_CLI_LIMIT = 8 * 2**30


def run_cli_bounded(*args: object) -> tuple[int, str, str, int]:
    """``pneumodet ARGS`` in a child with :data:`_CLI_LIMIT` of address space: exit code, stdout,
    stderr and the child's peak resident memory in bytes."""
    done = subprocess.run([sys.executable, "-c", _CLI_PROBE, str(_CLI_LIMIT), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    peak = re.findall(r"^maxrss (\d+)$", done.stderr, flags=re.MULTILINE)
    return done.returncode, done.stdout, done.stderr, int(peak[-1]) if peak else -1


def test_cache_and_predict_skip_bombs_and_still_do_the_next_good_file(tiny_model, tmp_path):
    """A folder where p001, p003, p005 and p006 are bombs (JPEG, JPEG 2000 stream, RLE, deflate), each
    followed by a good file: ``cache`` and ``predict`` skip, count and name each bomb, do every good
    file (the one after a bomb too: a decoder that took gigabytes and kept them made it fail), exit 0,
    and peak far below what one bomb would take (each child under 2.5 GB)."""
    root = write_dataset(tmp_path / "data", small_patients(8), size=64)
    images = root / "stage_2_train_images"
    bombs = decompression_bombs(tmp_path / "bombs")
    placed = {"p001": "jpeg_65535", "p003": "j2k_stream_65535", "p005": "rle_65535", "p006": "deflate_512mb"}
    for pid, case in placed.items():
        shutil.copy(bombs[case][0], images / f"{pid}.dcm")
    good = sorted(f"p{i:03d}" for i in range(8) if f"p{i:03d}" not in placed)

    code, stdout, err, peak = run_cli_bounded("cache", root, "--size", 32, "--out", tmp_path / "cache",
                                              "--workers", 1)
    assert code == 0, err[-3000:]
    assert f"cached {len(good)}," in stdout and f"failed {len(placed)}," in stdout, stdout
    for pid, case in placed.items():
        assert re.search(rf"failed {pid}: .*{bombs[case][1]}", stdout), (pid, stdout)
    assert sorted(ImageCache.open(tmp_path / "cache").patient_ids) == good
    assert 0 < peak < 2.5 * 2**30, peak / 2**30

    sub = tmp_path / "sub.csv"
    code, stdout, err, peak = run_cli_bounded("predict", tiny_model, images, "--out", sub)
    assert code == 0, err[-3000:]
    assert sorted(pd.read_csv(sub)["patientId"]) == good
    for pid, case in placed.items():
        listed = rf"unreadable {re.escape(str(images / pid))}\.dcm: .*{bombs[case][1]}"
        assert re.search(listed, stdout), (pid, stdout)
    assert f"unreadable: {len(placed)};" in stdout, stdout
    assert 0 < peak < 2.5 * 2**30, peak / 2**30


# ============================================================================================ display
@pytest.fixture(scope="module")
def display_dicoms(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return display_cases(tmp_path_factory.mktemp("display"))


@pytest.mark.parametrize("case", ["lut_first_beyond_data", "lut_all_zero", "lut_shorter_than_declared",
                                  "lut_16_bit_declared_12_bit_entries", "window_far_off", "mostly_uniform"])
def test_an_unusable_voi_lut_or_window_never_gives_a_flat_image(display_dicoms, case):
    """A VOI LUT whose first mapped value is beyond the data, whose entries are all 0 or fewer than
    declared, or whose entries are 12-bit under a 16-bit descriptor, and a window far from the data,
    each used to give a black (or near-black) image without a word: now the next usable mapping is
    used and ``image_notes`` (and a warning) says which and why. A mostly uniform image whose robust
    percentiles coincide keeps its small bright object."""
    path, note = display_dicoms[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, meta = read_dicom(path)
    inside = (42, 42) if case == "mostly_uniform" else (60, 60)
    assert image[inside] >= 240 and image[5, 5] <= 60, (image[inside], image[5, 5])
    assert meta["constant_image"] is False
    if case == "mostly_uniform":
        assert meta["image_notes"] == []
    else:
        assert len(meta["image_notes"]) == 1 and re.search(note, meta["image_notes"][0]), meta["image_notes"]
        assert [str(w.message) for w in caught] == [f"{path}: {meta['image_notes'][0]}"]


def test_constant_images_are_counted_and_named_by_cache_and_eda(display_dicoms, tmp_path, capsys):
    """Six patients with textured 12-bit images, but p001's VOI LUT starts beyond its data (the window
    is used instead, with a note) and p002's pixels are all one value: ``cache`` keeps both and names
    p002 as constant (again when the row is reused); ``eda`` counts it in ``images_constant`` and lists
    both files with their notes in ``image_notes.csv``."""
    root = write_dataset(tmp_path / "data", small_patients(6), size=64, images=False)
    images = root / "stage_2_train_images"
    wide = blob_image(128, 128, (40, 30, 90, 100), dtype=np.uint16, high=4000, low=100)
    for i in range(6):
        make_dicom(images / f"p{i:03d}.dcm", wide, bits_stored=12, window=(2050, 3900))
    shutil.copy(display_dicoms["lut_first_beyond_data"][0], images / "p001.dcm")
    make_dicom(images / "p002.dcm", np.full((128, 128), 4000, np.uint16), bits_stored=12)

    for build in ("first", "again"):
        code, stdout, err = run_cli(capsys, "cache", root, "--size", 32, "--out", tmp_path / "cache",
                                    "--workers", 1)
        assert code == 0, err
        assert "cached 6," in stdout if build == "first" else "reused 6," in stdout
        assert "constant images (one value everywhere; cached, worth a look): 1: p002" in stdout, stdout
    assert ImageCache.open(tmp_path / "cache").constant == {"p002"}

    code, stdout, err = run_cli(capsys, "eda", root, "--out", tmp_path / "eda", "--workers", 1,
                                "--samples", 6)
    assert code == 0, err
    summary = json.loads((tmp_path / "eda" / "summary.json").read_text())
    assert summary["images_decoded"] == 6 and summary["images_constant"] == 1
    notes = pd.read_csv(tmp_path / "eda" / "image_notes.csv")
    assert notes["patient_id"].tolist() == ["p001", "p002"] and notes["constant"].tolist() == [False, True]
    assert "VOI LUT starts at value 30000" in notes["note"][0] and "constant" in notes["note"][1]
    assert "Images to look at" in (tmp_path / "eda" / "report.html").read_text(encoding="utf-8")
