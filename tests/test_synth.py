"""The synthetic dataset: the Kaggle layout exactly, the real label statistics, opacities that are really
there (inside the lungs, brighter, textured), determinism, and DICOMs that read back with the RSNA tags."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from pneumodet.cli import main
from pneumodet.data.dicom import read_dicom
from pneumodet.data.records import CLASS_NAMES
from pneumodet.data.synth import (
    BOX_LOG_H,
    BOX_LOG_W,
    BOXES_PER_PATIENT,
    CLASS_SHARES,
    CLASSES_FILE,
    IMAGES_DIR,
    LABELS_FILE,
    SUBMISSION_FILE,
    TEST_IMAGES_DIR,
    make_synthetic_dataset,
    render_chest,
    sample_patients,
)
from pneumodet.errors import ConfigError

NORMAL, OPACITY, NOT_NORMAL = CLASS_NAMES


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def opacity_chests() -> list:
    """30 Lung Opacity patients drawn at 256 px, with their specs."""
    specs = [s for s in sample_patients(400, seed=11) if s.label_class == OPACITY][:30]
    return [(spec, render_chest(spec, 256)) for spec in specs]


# ------------------------------------------------------------------------------------------ layout
def test_layout_and_headers_match_the_real_files(synth_dataset: Path, real_sample: Path) -> None:
    for name in (LABELS_FILE, CLASSES_FILE):
        real_header = (real_sample / name).open().readline()
        assert (synth_dataset / name).open().readline() == real_header
    labels = read_rows(synth_dataset / LABELS_FILE)
    classes = read_rows(synth_dataset / CLASSES_FILE)
    assert [r["patientId"] for r in labels] == [r["patientId"] for r in classes]  # same row order
    ids = {r["patientId"] for r in labels}
    files = {p.stem for p in (synth_dataset / IMAGES_DIR).glob("*.dcm")}
    assert ids == files and len(files) == 40
    assert {p.name for p in synth_dataset.iterdir()} == {LABELS_FILE, CLASSES_FILE, IMAGES_DIR, TEST_IMAGES_DIR,
                                                         SUBMISSION_FILE}


def test_test_images_and_sample_submission_as_kaggle_has_them(synth_dataset: Path, real_sample: Path) -> None:
    """Kaggle's download also holds the test images (no labels) and a sample submission listing them."""
    real, synth = (real_sample / SUBMISSION_FILE).read_bytes(), (synth_dataset / SUBMISSION_FILE).read_bytes()
    assert synth.split(b"\n", 1)[0] == real.split(b"\n", 1)[0] == b"patientId,PredictionString\r"  # CRLF too
    rows = read_rows(synth_dataset / SUBMISSION_FILE)
    real_rows = read_rows(real_sample / SUBMISSION_FILE)
    assert {r["PredictionString"] for r in rows} == {r["PredictionString"] for r in real_rows} == {"0.5 0 0 100 100"}
    ids = [r["patientId"] for r in rows]
    assert ids == sorted(ids) and len(ids) == 4  # 11 % of 40 patients, as Kaggle's 3000 of 26684
    assert {p.stem for p in (synth_dataset / TEST_IMAGES_DIR).glob("*.dcm")} == set(ids)
    train_ids = {r["patientId"] for r in read_rows(synth_dataset / LABELS_FILE)}
    assert not train_ids & set(ids)  # test patients are nobody's training patients
    assert {pydicom.dcmread(synth_dataset / TEST_IMAGES_DIR / f"{i}.dcm").PatientID for i in ids} == set(ids)


def test_loading_and_eda_see_the_training_set_only(synth_dataset: Path, tmp_path: Path) -> None:
    """The records (what split, cache and train use) and the data report hold the training patients only."""
    from pneumodet.data.rsna import load_rsna
    from pneumodet.reports.eda import build_eda_report

    data = load_rsna(synth_dataset)
    train_ids = {r["patientId"] for r in read_rows(synth_dataset / LABELS_FILE)}
    assert {r.patient_id for r in data.records} == train_ids
    assert {r.image_path.parent.name for r in data.records} == {IMAGES_DIR}
    assert data.report.images_found == 40 and data.report.counts_by_kind().get("image_unlabelled", 0) == 0
    summary = build_eda_report(synth_dataset, tmp_path / "eda", seed=0, max_images=8, samples_per_class=1)
    assert (summary["patients"], summary["images_found"], summary["images_missing"]) == (40, 40, 0)


def test_test_patients_leave_the_training_files_unchanged(tmp_path: Path) -> None:
    none, some = tmp_path / "none", tmp_path / "some"
    make_synthetic_dataset(none, patients=6, size=96, seed=5, test_patients=0)
    summary = make_synthetic_dataset(some, patients=6, size=96, seed=5, test_patients=3)
    assert {p.name for p in none.iterdir()} == {LABELS_FILE, CLASSES_FILE, IMAGES_DIR}
    assert summary.test_files == 3 and len(list((some / TEST_IMAGES_DIR).glob("*.dcm"))) == 3
    assert f"3 unlabelled test DICOMs in {TEST_IMAGES_DIR}/" in str(summary)
    for name in (LABELS_FILE, CLASSES_FILE):
        assert (none / name).read_bytes() == (some / name).read_bytes()
    # overwriting with another seed replaces the test set too, and with none removes it
    make_synthetic_dataset(some, patients=6, size=96, seed=6, test_patients=2, overwrite=True)
    assert len(read_rows(some / SUBMISSION_FILE)) == 2 == len(list((some / TEST_IMAGES_DIR).glob("*.dcm")))
    make_synthetic_dataset(some, patients=6, size=96, seed=6, test_patients=0, overwrite=True)
    assert not (some / SUBMISSION_FILE).exists() and not list((some / TEST_IMAGES_DIR).glob("*.dcm"))
    # another dataset's test images alone are refused as its training images are
    other = tmp_path / "other"
    (other / TEST_IMAGES_DIR).mkdir(parents=True)
    (other / TEST_IMAGES_DIR / "someone.dcm").write_bytes(b"DICM")
    with pytest.raises(ConfigError, match=r"already holds a dataset \(1 test DICOMs of other patients\)"):
        make_synthetic_dataset(other, patients=2, size=96, seed=1)
    assert not (other / LABELS_FILE).exists()


def test_rows_follow_the_kaggle_conventions(synth_dataset: Path, real_sample: Path) -> None:
    """Box rows as '264.0,152.0,213.0,379.0,1', box-less rows as ',,,,,0', a patient's rows together."""
    real_lines = (real_sample / LABELS_FILE).read_text().splitlines()[1:200]
    line_re = re.compile(r"^[0-9a-f-]{36},(,,,,0|(\d+\.0,){4}1)$")
    assert all(line_re.match(line) for line in real_lines)
    lines = (synth_dataset / LABELS_FILE).read_text().splitlines()[1:]
    assert all(line_re.match(line) for line in lines), lines[:3]
    ids = [line.split(",")[0] for line in lines]
    assert ids == sorted(ids, key=ids.index)  # consecutive per patient


def test_class_target_and_boxes_agree(synth_dataset: Path) -> None:
    labels = read_rows(synth_dataset / LABELS_FILE)
    classes = read_rows(synth_dataset / CLASSES_FILE)
    per_patient: dict[str, list] = {}
    for label, cls in zip(labels, classes, strict=True):
        per_patient.setdefault(label["patientId"], []).append((cls["class"], label))
    seen_classes = set()
    for pid, rows in per_patient.items():
        names = {name for name, _ in rows}
        assert len(names) == 1, pid
        name = names.pop()
        seen_classes.add(name)
        targets = {r["Target"] for _, r in rows}
        has_box = [r["x"] != "" for _, r in rows]
        if name == OPACITY:
            assert targets == {"1"} and all(has_box) and 1 <= len(rows) <= 4
        else:
            assert targets == {"0"} and has_box == [False]
    assert seen_classes == set(CLASS_NAMES)


def test_boxes_inside_the_image(synth_dataset: Path) -> None:
    for row in read_rows(synth_dataset / LABELS_FILE):
        if row["Target"] == "1":
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            assert x >= 0 and y >= 0 and w >= 5 and h >= 5
            assert x + w <= 256 and y + h <= 256


# ------------------------------------------------------------------------------------------ statistics
def test_embedded_statistics_are_the_real_ones(real_sample: Path) -> None:
    """The constants in synth.py match the real labels (re-measured here from the full CSVs)."""
    labels = read_rows(real_sample / LABELS_FILE)
    classes = read_rows(real_sample / CLASSES_FILE)
    patient_class = {r["patientId"]: r["class"] for r in classes}
    counts = {name: 0 for name in CLASS_NAMES}
    for name in patient_class.values():
        counts[name] += 1
    for name, share in CLASS_SHARES.items():
        assert counts[name] / len(patient_class) == pytest.approx(share, abs=0.001)
    boxes = [r for r in labels if r["Target"] == "1"]
    per_patient = np.bincount(np.unique([r["patientId"] for r in boxes], return_counts=True)[1])
    for n, share in BOXES_PER_PATIENT.items():
        assert per_patient[n] / per_patient.sum() == pytest.approx(share, abs=0.001)
    log_w = np.log([float(r["width"]) / 1024 for r in boxes])
    assert log_w.mean() == pytest.approx(BOX_LOG_W[0], abs=0.002)


def test_class_shares_follow_the_real_ones() -> None:
    specs = sample_patients(300, seed=3)
    for name, share in CLASS_SHARES.items():
        assert sum(s.label_class == name for s in specs) / 300 == pytest.approx(share, abs=0.005)
    n_boxes = [s.n_boxes for s in specs if s.label_class == OPACITY]
    assert set(n_boxes) <= {1, 2, 3, 4} and 0.3 < np.mean(np.equal(n_boxes, 1)) < 0.6


def test_box_sizes_and_positions_follow_the_real_ones(opacity_chests: list) -> None:
    boxes = np.concatenate([chest.boxes for _, chest in opacity_chests]) / 256
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    # medians of the real boxes: width 0.21, height 0.29 of the frame; lung borders trim a little
    assert np.median(w) == pytest.approx(np.exp(BOX_LOG_W[0]), rel=0.3)
    assert np.median(h) == pytest.approx(np.exp(BOX_LOG_H[0]), rel=0.3)
    assert 0.3 < np.mean(cx < 0.5) < 0.7  # both lungs, about as often
    # boxes are as many as asked (room permitting) and never overlap within a patient
    assert sum(len(c.boxes) for _, c in opacity_chests) >= 0.95 * sum(s.n_boxes for s, _ in opacity_chests)


def test_box_sizes_scale_with_the_image() -> None:
    spec = next(s for s in sample_patients(50, seed=2) if s.n_boxes)
    small, large = render_chest(spec, 128).boxes, render_chest(spec, 512).boxes
    assert len(small) == len(large)
    np.testing.assert_allclose(small / 128, large / 512, atol=0.03)


# ------------------------------------------------------------------------------------------ opacities
def test_every_box_is_the_visible_extent_of_an_opacity_inside_one_lung(opacity_chests: list) -> None:
    for _, chest in opacity_chests:
        assert len(chest.boxes) >= 1
        for x0, y0, x1, y1 in chest.boxes.astype(int):
            window = chest.lung_field[y0:y1 + 1, x0:x1 + 1]
            signal = chest.opacity[y0:y1 + 1, x0:x1 + 1]
            visible = signal >= 0.25 * signal.max()
            assert np.all(window[visible]), "opacity pixels outside the lung field"
            # the box is tight: its edges touch visible opacity
            assert visible[0].any() or visible[-1].any() or visible[:, 0].any() or visible[:, -1].any()
            # one lung: the box does not straddle the midline
            assert x1 < 128 or x0 > 128


def test_opacities_are_brighter_than_the_surrounding_lung(opacity_chests: list) -> None:
    """Same patient drawn with and without its opacities: the box region brightens, the rest does not."""
    for spec, chest in opacity_chests[:10]:
        clear = render_chest(dataclasses.replace(spec, n_boxes=0, label_class=NORMAL), 256)
        diff = chest.image.astype(float) - clear.image.astype(float)
        inside = np.zeros(diff.shape, bool)
        for x0, y0, x1, y1 in chest.boxes.astype(int):
            inside[y0:y1 + 1, x0:x1 + 1] = True
        core = inside & (chest.opacity > 0.5 * chest.opacity.max())
        assert diff[core].mean() > 25, "the opacity is not visible"
        assert abs(diff[~inside & chest.lung_field].mean()) < 3
        # and within one film: brighter than the lung around it
        lung_outside = chest.lung_field & ~inside
        assert chest.image[core].mean() > chest.image[lung_outside].mean() + 15


def test_opacities_are_textured_not_rectangles(opacity_chests: list) -> None:
    for _, chest in opacity_chests[:10]:
        for x0, y0, x1, y1 in chest.boxes.astype(int):
            signal = chest.opacity[y0:y1 + 1, x0:x1 + 1]
            visible = signal >= 0.25 * signal.max()
            assert visible.mean() < 0.95, "the opacity fills its box like a rectangle"
            assert signal[visible].std() / signal[visible].mean() > 0.1, "the opacity is uniform"


def test_other_classes_have_no_opacity_and_ap_films_show_a_smaller_patient() -> None:
    specs = sample_patients(60, seed=4)
    lung_area = {"AP": [], "PA": []}
    for spec in specs:
        if spec.label_class == OPACITY:
            continue
        chest = render_chest(spec, 128)
        assert len(chest.boxes) == 0 and not chest.opacity.any()
        lung_area[spec.view].append(chest.lung_field.mean())
    assert np.mean(lung_area["AP"]) < 0.9 * np.mean(lung_area["PA"])


# ------------------------------------------------------------------------------------------ files
def test_dicoms_read_back_with_the_rsna_tags(synth_dataset: Path) -> None:
    labels = read_rows(synth_dataset / LABELS_FILE)
    views = set()
    for path in sorted((synth_dataset / IMAGES_DIR).glob("*.dcm"))[:10]:
        image, meta = read_dicom(path)
        assert image.shape == (256, 256) and image.dtype == np.uint8
        assert meta["patient_id"] == path.stem
        assert meta["modality"] == "CR" and meta["body_part"] == "CHEST"
        assert meta["view_position"] in {"AP", "PA"} and meta["sex"] in {"M", "F"}
        assert isinstance(meta["age"], float) and 1 <= meta["age"] <= 92
        assert meta["photometric_interpretation"] == "MONOCHROME2"
        assert meta["transfer_syntax"] == "JPEG Baseline (Process 1)"
        assert meta["rows"] == meta["columns"] == 256
        assert meta["pixel_spacing"] == pytest.approx((0.572, 0.572))
        views.add(meta["view_position"])
        ds = pydicom.dcmread(path)
        assert re.fullmatch(r"\d+", ds.PatientAge)  # as RSNA writes it: '51', no 'Y'
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.BitsStored == 8 and ds.SamplesPerPixel == 1
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert frame[:2] == b"\xff\xd8" and b"\xff\xc0" in frame  # a JPEG with a baseline (SOF0) frame
        assert any(r["patientId"] == path.stem for r in labels)
    assert len(views) >= 1


def test_stored_pixels_are_the_drawn_image(tmp_path: Path) -> None:
    spec = next(s for s in sample_patients(20, seed=0) if s.n_boxes)
    chest = render_chest(spec, 256)
    make_synthetic_dataset(tmp_path, patients=20, size=256, seed=0)
    image, _ = read_dicom(tmp_path / IMAGES_DIR / f"{spec.patient_id}.dcm")
    assert np.abs(image.astype(int) - chest.image.astype(int)).mean() < 3.0  # JPEG quality 90 on film noise
    rows = [r for r in read_rows(tmp_path / LABELS_FILE) if r["patientId"] == spec.patient_id]
    written = np.array([[float(r[k]) for k in ("x", "y", "width", "height")] for r in rows])
    expected = np.c_[chest.boxes[:, :2], chest.boxes[:, 2:] - chest.boxes[:, :2] + 1]
    np.testing.assert_array_equal(written, expected)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic_dataset(a, patients=8, size=96, seed=7)
    make_synthetic_dataset(b, patients=8, size=96, seed=7)
    make_synthetic_dataset(c, patients=8, size=96, seed=8)
    for name in (LABELS_FILE, CLASSES_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    files = sorted((a / IMAGES_DIR).glob("*.dcm"))
    assert len(files) == 8
    for path in files:
        np.testing.assert_array_equal(read_dicom(path)[0], read_dicom(b / IMAGES_DIR / path.name)[0])
        assert path.read_bytes() == (b / IMAGES_DIR / path.name).read_bytes()


def test_summary_counts_what_was_written(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(tmp_path, patients=12, size=96, seed=1)
    labels = read_rows(tmp_path / LABELS_FILE)
    assert summary.patients == 12 and summary.files == 12 == len(list((tmp_path / IMAGES_DIR).iterdir()))
    assert summary.label_rows == len(labels)
    assert summary.boxes == sum(r["Target"] == "1" for r in labels)
    assert sum(summary.view_counts.values()) == 12
    text = str(summary)
    assert "12 patients" in text and f"{summary.boxes} boxes" in text and str(tmp_path) in text


def test_existing_dataset_is_refused_unless_overwritten(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, patients=6, size=96, seed=1)
    before = (tmp_path / LABELS_FILE).read_bytes()
    with pytest.raises(ConfigError, match="already holds a dataset"):
        make_synthetic_dataset(tmp_path, patients=4, size=96, seed=2)
    assert (tmp_path / LABELS_FILE).read_bytes() == before  # nothing touched
    summary = make_synthetic_dataset(tmp_path, patients=4, size=96, seed=2, overwrite=True)
    ids = {r["patientId"] for r in read_rows(tmp_path / LABELS_FILE)}
    assert {p.stem for p in (tmp_path / IMAGES_DIR).glob("*.dcm")} == ids and summary.files == 4


def test_interrupted_run_with_the_same_seed_resumes(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, patients=5, size=96, seed=3)
    (tmp_path / LABELS_FILE).unlink()
    (tmp_path / CLASSES_FILE).unlink()
    next((tmp_path / IMAGES_DIR).glob("*.dcm")).unlink()
    assert make_synthetic_dataset(tmp_path, patients=5, size=96, seed=3).files == 5
    assert len(list((tmp_path / IMAGES_DIR).glob("*.dcm"))) == 5


def test_patient_ids_are_version_4_uuids() -> None:
    uuid_re = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    ids = [s.patient_id for s in sample_patients(200, seed=0)]
    assert all(uuid_re.match(i) for i in ids) and len(set(ids)) == 200


def test_cli_synth_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "ds"), "--patients", "5", "--size", "96", "--seed", "2"]) == 0
    assert "5 patients" in capsys.readouterr().out
    assert len(list((tmp_path / "ds" / IMAGES_DIR).glob("*.dcm"))) == 5
    assert main(["synth", str(tmp_path / "bad"), "--patients", "0"]) == 2
    assert "patients must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="size"):
        make_synthetic_dataset(tmp_path / "tiny", patients=2, size=16)


@pytest.mark.slow
def test_a_tiny_cnn_learns_to_find_the_opacities() -> None:
    """Learnable: a 4-layer CNN trained for 300 steps (~15 s of one core) on 240 films at 96 px locates
    opacities on 100 unseen films (box-mask heat map; patient score = its maximum)."""
    import torch
    from torch import nn

    size = 96

    def films(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        x = np.zeros((n, 1, size, size), np.float32)
        y = np.zeros((n, 1, size, size), np.float32)
        for i, spec in enumerate(sample_patients(n, seed=seed)):
            chest = render_chest(spec, size)
            x[i, 0] = (chest.image / 255.0 - 0.5) / 0.25  # normalised, as every encoder's input is
            for x0, y0, x1, y1 in chest.boxes.astype(int):
                y[i, 0, y0:y1 + 1, x0:x1 + 1] = 1.0
        return torch.from_numpy(x), nn.functional.avg_pool2d(torch.from_numpy(y), 4), y.max(axis=(1, 2, 3))

    x_train, y_train, _ = films(240, seed=1)
    x_test, y_test, positive = films(100, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(32, 1, 1))
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(300):
            idx = torch.randint(0, len(x_train), (16,), generator=gen)
            loss = nn.functional.binary_cross_entropy_with_logits(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            heat = torch.sigmoid(net(x_test))
    finally:
        torch.set_num_threads(threads)
    score = heat.amax(dim=(1, 2, 3)).numpy()
    pos, neg = score[positive == 1], score[positive == 0]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    truth, found = y_test > 0.5, heat > 0.5
    iou = float((truth & found).sum() / (truth | found).sum())
    assert auc > 0.85, f"patient-level AUC {auc:.3f}"
    assert iou > 0.25, f"pixel IoU {iou:.3f}"
