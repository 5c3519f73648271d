"""Prediction: file search, box mapping, TTA merge (WBF), gating, outputs, the ``predict`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_one_line_error, assert_same_detections, kaggle_to_xyxy, write_spread_run
from pneumodet.inference import (
    ImagePrediction,
    PredictionResult,
    find_dicom_files,
    hflip_boxes,
    merge_views,
    overlay_filename,
    prepare_image,
    weighted_boxes_fusion,
    xyxy_to_kaggle,
)


def by_patient(result: PredictionResult) -> dict[str, ImagePrediction]:
    """The result's images by patient id, where every patient has one image (as in most tests here)."""
    patients = result.patients()
    assert all(len(images) == 1 for images in patients.values()), patients
    return {pid: images[0] for pid, images in patients.items()}


# ---------------------------------------------------------------- WBF and box functions
def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_wbf_identical_boxes_fuse_to_the_box_with_the_mean_score():
    boxes, scores = weighted_boxes_fusion([_t([[10, 20, 50, 80]]), _t([[10, 20, 50, 80]])],
                                          [torch.tensor([0.8]), torch.tensor([0.6])])
    torch.testing.assert_close(boxes, _t([[10, 20, 50, 80]]))
    torch.testing.assert_close(scores, torch.tensor([0.7]))


def test_wbf_averages_coordinates_weighted_by_score():
    boxes, scores = weighted_boxes_fusion([_t([[0, 0, 10, 10]]), _t([[1, 0, 11, 10]])],
                                          [torch.tensor([0.9]), torch.tensor([0.3])], iou_thresh=0.55)
    # x1 = (0.9 * 0 + 0.3 * 1) / 1.2 = 0.25; IoU of the two boxes is 9/11 > 0.55
    torch.testing.assert_close(boxes, _t([[0.25, 0, 10.25, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.6]))


def test_wbf_box_seen_in_one_view_keeps_half_its_score_and_clusters_stay_apart():
    boxes, scores = weighted_boxes_fusion(
        [_t([[0, 0, 10, 10], [100, 100, 140, 150]]), _t([[0, 0, 10, 10]])],
        [torch.tensor([0.5, 0.9]), torch.tensor([0.7])],
    )
    torch.testing.assert_close(boxes, _t([[0, 0, 10, 10], [100, 100, 140, 150]]))
    torch.testing.assert_close(scores, torch.tensor([0.6, 0.45]))  # sorted by fused score


def test_wbf_below_iou_threshold_does_not_merge():
    boxes, scores = weighted_boxes_fusion([_t([[0, 0, 10, 10]]), _t([[5, 0, 15, 10]])],  # IoU 1/3
                                          [torch.tensor([0.8]), torch.tensor([0.4])], iou_thresh=0.55)
    torch.testing.assert_close(boxes, _t([[0, 0, 10, 10], [5, 0, 15, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.4, 0.2]))


def test_wbf_of_nothing_is_empty():
    boxes, scores = weighted_boxes_fusion([_t([]), _t([])], [torch.zeros(0), torch.zeros(0)])
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_nms_merge_keeps_the_best_of_overlapping_views():
    boxes, scores = merge_views([_t([[0, 0, 10, 10]]), _t([[1, 0, 11, 10]])],
                                [torch.tensor([0.3]), torch.tensor([0.9])], method="nms", iou_thresh=0.5)
    torch.testing.assert_close(boxes, _t([[1, 0, 11, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.9]))


def test_hflip_boxes_matches_flipping_the_image_and_is_its_own_inverse():
    image = torch.zeros(64, 100)
    box = _t([[10, 20, 30, 40]])
    image[20:40, 10:30] = 1
    flipped = image.flip(-1)
    ys, xs = torch.nonzero(flipped, as_tuple=True)
    expected = _t([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    torch.testing.assert_close(hflip_boxes(box, 100.0), expected)
    torch.testing.assert_close(hflip_boxes(hflip_boxes(box, 100.0), 100.0), box)


def test_xyxy_to_kaggle_sorts_by_confidence_and_uses_width_height():
    out = xyxy_to_kaggle(_t([[0, 0, 10, 20], [5, 6, 7, 9]]), torch.tensor([0.2, 0.9]))
    np.testing.assert_allclose(out, [[0.9, 5, 6, 2, 3], [0.2, 0, 0, 10, 20]])


def test_prepare_image_area_resizes_and_scales_to_unit_range():
    pixels = np.zeros((8, 8), np.uint8)
    pixels[:4, :4] = 255  # top-left quarter white
    pixels[4:, 4:] = 51
    out = prepare_image(pixels, 2)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0], [0.0, 0.2]]]))
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(pixels.astype(np.uint16), 2)


def _image(patient_id: str, sop: str | None = "1.2.3", source: str = "/in/x.dcm") -> ImagePrediction:
    return ImagePrediction(patient_id, np.zeros((0, 5), np.float32), np.array([0.2, 0.7, 0.1], np.float32),
                           Path(source), (8, 8), sop)


def test_overlay_filename_is_short_stays_in_its_folder_and_is_unique_per_image():
    name = overlay_filename(_image("../../etc/passwd"))
    assert name.startswith("_.._etc_passwd_") and name.endswith(".png") and "/" not in name
    assert overlay_filename(_image("abc-1.2_x")).startswith("abc-1.2_x_")
    assert overlay_filename(_image("")).startswith("__")
    long = overlay_filename(_image("x" * 300))
    assert len(long) == 40 + 1 + 12 + 4  # a bounded prefix, "_", 12 hex digits, ".png"
    assert overlay_filename(_image("a/b")) != overlay_filename(_image("a_b", sop="1.2.4"))  # alike once sanitised
    assert overlay_filename(_image("p", sop=None, source="/in/1.dcm")) != overlay_filename(
        _image("p", sop=None, source="/in/2.dcm"))
    weird = overlay_filename(_image("\udcff\x00\u00e9\u2028 id"))
    assert weird.isascii() and weird.isprintable() and weird.startswith("_____id_")


# ---------------------------------------------------------------- finding files
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_dicom_files_recurses_and_does_not_follow_links_out_of_the_folder(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    a = _touch(root / "a.dcm")
    b = _touch(root / "sub" / "b.DCM")
    _touch(root / "notes.txt")
    _touch(outside / "c.dcm")
    os.symlink(outside, root / "link_out")
    os.symlink(outside / "c.dcm", root / "file_out.dcm")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the input folder
    os.symlink(tmp_path / "gone.dcm", root / "broken.dcm")

    found = find_dicom_files([root, tmp_path / "missing.dcm"])
    assert found.files == [a, b]
    assert sorted(found.skipped_links) == [root / "file_out.dcm", root / "link_out"]
    assert {(u.path, u.cause) for u in found.missing} == {
        (root / "broken.dcm", "broken symbolic link"),
        (tmp_path / "missing.dcm", "no such file or folder"),
    }

    followed = find_dicom_files([root], follow_symlinks=True)
    assert sorted(followed.files) == sorted([a, b, root / "file_out.dcm", root / "link_out" / "c.dcm"])
    assert followed.skipped_links == []


def test_find_dicom_files_takes_named_files_whatever_their_suffix(tmp_path):
    f = _touch(tmp_path / "image.dicom")
    assert find_dicom_files([f]).files == [f]


# ---------------------------------------------------------------- prediction end to end
SIZE = 128
THRESHOLD = 0.5


def write_dicom(path: Path, pixels: np.ndarray, *, patient_id: str | None = None, study_uid: str | None = None) -> Path:
    """An uncompressed 8-bit MONOCHROME2 DICOM carrying identifying tags that must never reach an output.

    Every file is a new image (its own SOP Instance UID), in a new series of study ``study_uid`` (default: new).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19450317"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _blob_image(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black image with one white rectangle ``box`` (x1, y1, x2, y2), in its own pixels."""
    pixels = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return pixels


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory holding a random 128-px resnet18 model whose scores spread around 0.5."""
    return write_spread_run(tmp_path_factory.mktemp("run"), SIZE, THRESHOLD)


@pytest.fixture
def controlled_model(monkeypatch):
    """The network's outputs replaced by a rule on the input image, so the expected boxes are known.

    ``forward`` passes the images through; ``detect`` returns, per image, the bounding box of its
    bright pixels (score ``0.5 + 0.4 * brightest pixel``: 0.9 for a white blob), a corner box of score 0.1
    (under the threshold) and class probabilities ``probs``. The rule is flip-equivariant, as a perfectly
    trained model would be.
    """
    from pneumodet.model import Detections, HeadOutputs, PneumoRetinaNet

    state = {"probs": torch.tensor([0.2, 0.7, 0.1]), "batches": []}

    def forward(self, images):
        state["batches"].append(images.shape[0])
        return HeadOutputs(images[:, 0].float(), images.new_zeros(images.shape[0], 1, 4),
                           images.new_zeros(images.shape[0], 3), images.new_zeros(1, 4))

    def detect(self, outputs, **kwargs):
        dets = []
        for image in outputs.cls_logits:
            ys, xs = torch.nonzero(image > 0.5, as_tuple=True)
            blob = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 1, 1]
            boxes = torch.tensor([[float(v) for v in blob], [0.0, 0.0, 4.0, 4.0]])
            score = 0.5 + 0.4 * float(image.max())
            dets.append(Detections(boxes, torch.tensor([score, 0.1]), state["probs"].clone()))
        return dets

    monkeypatch.setattr(PneumoRetinaNet, "forward", forward)
    monkeypatch.setattr(PneumoRetinaNet, "detect", detect)
    return state


def test_boxes_map_back_to_original_pixels_exactly(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict, write_prediction_submission
    from pneumodet.submission import read_submission

    # 256 wide, 200 high: x scales by 256/128 = 2, y by 200/128 = 1.5625. At 128 px the blob is
    # x 10..50, y 32..96 -> original x 20, y 50, w 80, h 100.
    write_dicom(tmp_path / "in" / "p1.dcm", _blob_image(200, 256, (20, 50, 100, 150)), patient_id="p1")
    result = predict(tiny_run, [tmp_path / "in"], precision="fp32", progress=False)
    np.testing.assert_allclose(by_patient(result)["p1"].boxes, [[0.9, 20, 50, 80, 100]], rtol=1e-6)
    assert by_patient(result)["p1"].original_size == (200, 256)
    np.testing.assert_allclose(by_patient(result)["p1"].class_probs, [0.2, 0.7, 0.1], rtol=1e-6)
    sub = read_submission(write_prediction_submission(result, tmp_path / "sub.csv"))
    np.testing.assert_allclose(sub["p1"], [[0.9, 20, 50, 80, 100]], rtol=1e-6)


def test_threshold_argument_overrides_the_runs_choice(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (20, 30, 60, 90)), patient_id="p1")
    low = predict(tiny_run, [tmp_path / "p1.dcm"], threshold=0.05, precision="fp32", progress=False)
    assert low.threshold == 0.05
    np.testing.assert_allclose(by_patient(low)["p1"].boxes, [[0.9, 20, 30, 40, 60], [0.1, 0, 0, 4, 4]],
                               rtol=1e-6)
    default = predict(tiny_run, [tmp_path / "p1.dcm"], precision="fp32", progress=False)
    assert default.threshold == THRESHOLD and len(by_patient(default)["p1"].boxes) == 1


def test_hflip_tta_with_a_flip_equivariant_model_gives_the_plain_boxes(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    # Off-centre blobs on the 8-pixel grid of the 1024 -> 128 resize: a flip moves them, the resize is exact.
    for i, box in enumerate([(96, 200, 400, 704), (600, 104, 1000, 304)]):
        write_dicom(tmp_path / f"p{i}.dcm", _blob_image(1024, 1024, box), patient_id=f"p{i}")
    plain = predict(tiny_run, [tmp_path], precision="fp32", progress=False, batch_size=2)
    assert controlled_model["batches"] == [2]
    for merge in ("wbf", "nms"):
        tta = predict(tiny_run, [tmp_path], tta="hflip", tta_merge=merge, precision="fp32", progress=False,
                      batch_size=2)
        assert controlled_model["batches"][-1] == 4  # each image and its mirror image
        for pid in ("p0", "p1"):
            np.testing.assert_allclose(by_patient(tta)[pid].boxes, by_patient(plain)[pid].boxes, atol=1e-4)
    np.testing.assert_allclose(by_patient(plain)["p1"].boxes, [[0.9, 600, 104, 400, 200]], rtol=1e-6)


def test_gate_scales_scores_by_the_lung_opacity_probability(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (20, 30, 60, 90)), patient_id="p1")
    controlled_model["probs"] = torch.tensor([0.45, 0.5, 0.05])
    gated = predict(tiny_run, [tmp_path], gate=True, threshold=0.4, precision="fp32", progress=False)
    np.testing.assert_allclose(by_patient(gated)["p1"].boxes, [[0.45, 20, 30, 40, 60]], rtol=1e-6)
    dropped = predict(tiny_run, [tmp_path], gate=True, precision="fp32", progress=False)  # 0.45 < 0.5
    assert len(by_patient(dropped)["p1"].boxes) == 0
    assert "chosen on ungated scores" in dropped.warnings[0] and not gated.warnings
    ungated = predict(tiny_run, [tmp_path], precision="fp32", progress=False)
    np.testing.assert_allclose(by_patient(ungated)["p1"].boxes[:, 0], [0.9])


def test_gate_uses_the_threshold_training_chose_for_gated_scores(tmp_path, controlled_model, capsys):
    """A run that records a threshold for gated scores (training chooses one on validation beside the plain
    one) is predicted with it under --gate (no warning, the JSON records it); without --gate the plain one applies."""
    from pneumodet.cli import main
    from pneumodet.inference import predict

    run = write_spread_run(tmp_path / "run", SIZE, THRESHOLD, gate_threshold=0.4)
    images = tmp_path / "images"
    write_dicom(images / "p1.dcm", _blob_image(128, 128, (20, 30, 60, 90)), patient_id="p1")
    controlled_model["probs"] = torch.tensor([0.45, 0.5, 0.05])  # gated score 0.9 * 0.5 = 0.45
    out = tmp_path / "gated.json"
    assert main(["predict", str(run), str(images), "--gate", "--precision", "fp32", "--out", str(tmp_path / "s.csv"),
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "chosen on ungated scores" not in err, err
    data = json.loads(out.read_text())
    assert data["threshold"] == 0.4 and data["gate"] is True
    np.testing.assert_allclose(data["images"][0]["scores"], [0.45], rtol=1e-4)
    plain = predict(run, [images], precision="fp32", progress=False)
    assert plain.threshold == THRESHOLD


def test_privacy_duplicates_mismatched_ids_overlays_and_json(tiny_run, tmp_path, controlled_model):
    import json
    import shutil

    from PIL import Image

    from pneumodet.inference import predict, write_prediction_json, write_prediction_submission

    folder = tmp_path / "in"
    a = write_dicom(folder / "a.dcm", _blob_image(256, 256, (40, 60, 120, 200)), patient_id="a")
    shutil.copy(a, folder / "a_copy.dcm")  # the same image again (same SOP Instance UID): a duplicate
    write_dicom(folder / "b.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="a")  # a's second image
    write_dicom(folder / "c.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="patient-c")
    write_dicom(folder / "d.dcm", _blob_image(256, 256, (10, 10, 50, 50)))  # no PatientID: the stem
    write_dicom(folder / "e.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="x,y")  # breaks the CSV
    result = predict(tiny_run, [folder], overlay_dir=tmp_path / "overlays", precision="fp32", progress=False,
                     workers=1, batch_size=2)  # decoded in a worker process, in file order

    images = list(result.predictions.values())
    assert [(p.patient_id, p.source.name) for p in images] == [
        ("a", "a.dcm"), ("a", "b.dcm"), ("patient-c", "c.dcm"), ("d", "d.dcm")]
    assert len({p.sop_instance_uid for p in images}) == 4 and all(p.study_instance_uid for p in images)
    assert [(d.patient_id, d.path.name, d.kept.name, d.same) for d in result.duplicates] == [
        ("a", "a_copy.dcm", "a.dcm", "SOP Instance UID")]
    assert [w.split(":")[0] for w in result.warnings] == [str(folder / "b.dcm"), str(folder / "c.dcm")]
    assert "PatientID 'patient-c' differs from the file name" in result.warnings[1]
    assert result.files_found == 6
    assert [(u.path.name, u.cause) for u in result.unreadable] == [
        ("e.dcm", "patient id 'x,y' from the DICOM PatientID cannot be a submission CSV field (comma, quote, "
                  "line break or unprintable character)")]

    overlays = tmp_path / "overlays"
    assert sorted(p.name for p in overlays.iterdir()) == sorted(overlay_filename(p) for p in images)
    overlay = Image.open(overlays / overlay_filename(images[0])).convert("RGB")
    assert overlay.size == (256, 256)
    assert overlay.getpixel((40, 130)) == (255, 40, 40)  # left edge of the box, in original pixels
    assert overlay.getpixel((80, 130)) == (255, 255, 255)  # inside the box: the image itself

    data = json.loads(write_prediction_json(result, tmp_path / "pred.json").read_text())
    first = data["images"][0]
    assert first["patientId"] == "a" and first["source"] == str(a) and first["overlay"] == overlay_filename(images[0])
    assert first["sopInstanceUID"] == images[0].sop_instance_uid and first["studyInstanceUID"]
    assert first["boxes"] == [[40, 60, 80, 140]] and first["scores"] == [0.9]
    assert first["class_probs"] == {"Normal": 0.2, "Lung Opacity": 0.7, "No Lung Opacity / Not Normal": 0.1}
    assert [i["in_submission"] for i in data["images"]] == [True, False, True, True]  # a tie: the first file
    assert data["duplicates"] == [{"patientId": "a", "path": str(folder / "a_copy.dcm"), "kept": str(a),
                                   "same": "SOP Instance UID"}]

    outputs = [write_prediction_submission(result, tmp_path / "sub.csv"), tmp_path / "pred.json",
               *overlays.iterdir()]
    for path in outputs:
        raw = path.read_bytes()
        for secret in (b"Doe", b"Jane", b"19450317", b"Elsewhere"):
            assert secret not in raw, f"{secret!r} leaked into {path}"


def test_predict_keeps_every_image_of_a_patient_and_merges_them_into_one_submission_row(
        tiny_run, tmp_path, controlled_model, capsys):
    """Two studies of one patient are two images (keyed by SOP Instance UID) in the JSON and the overlays;
    the submission has one row for the patient: the boxes of its image with the higher box score."""
    import json
    import shutil

    from pneumodet.cli import main
    from pneumodet.submission import read_submission

    folder = tmp_path / "in"
    first = write_dicom(folder / "p1_2019.dcm", _blob_image(128, 128, (8, 8, 40, 40)) // 255 * 200,
                        patient_id="p1")  # dimmer: box score 0.5 + 0.4 * 200 / 255 = 0.81
    write_dicom(folder / "p1_2021.dcm", _blob_image(128, 128, (64, 64, 120, 100)), patient_id="p1")  # 0.9
    shutil.copy(first, folder / "p1_2019_again.dcm")  # the same image twice: one image, a duplicate
    write_dicom(folder / "p2.dcm", _blob_image(128, 128, (16, 16, 48, 48)), patient_id="p2")
    sub, js, overlays = tmp_path / "sub.csv", tmp_path / "pred.json", tmp_path / "overlays"
    code = main(["predict", str(tiny_run), str(folder), "--out", str(sub), "--json", str(js), "--overlays",
                 str(overlays), "--threshold", "0.5", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "images predicted: 3 of 2 patient(s)" in out and "duplicate images: 1;" in out
    assert "patients with several images: 1 (submission: one row per patient: the boxes of its image with the " \
           "highest box score" in out
    assert f"duplicate p1: {folder / 'p1_2019_again.dcm'} (kept {first}; same SOP Instance UID)" in out
    assert "wrote submission" in out and "(2 patient row(s))" in out

    rows = read_submission(sub)
    assert sorted(rows) == ["p1", "p2"]
    np.testing.assert_allclose(rows["p1"], [[0.9, 64, 64, 56, 36]], atol=1e-3)  # the 2021 image's box

    images = json.loads(js.read_text())["images"]
    assert [(i["patientId"], Path(i["source"]).name, i["in_submission"]) for i in images] == [
        ("p1", "p1_2019.dcm", False), ("p1", "p1_2021.dcm", True), ("p2", "p2.dcm", True)]
    assert images[0]["scores"] == [pytest.approx(0.81373, abs=1e-4)]
    assert len({i["sopInstanceUID"] for i in images}) == 3 and len({i["studyInstanceUID"] for i in images}) == 3
    assert sorted(p.name for p in overlays.iterdir()) == sorted(i["overlay"] for i in images)


def test_submission_row_of_a_patient_is_its_image_with_the_best_box():
    def image(pid: str, sop: str, top: float | None, opacity: float) -> ImagePrediction:
        boxes = np.array([[top, 1, 2, 3, 4]], np.float32) if top is not None else np.zeros((0, 5), np.float32)
        return ImagePrediction(pid, boxes, np.array([0.1, opacity, 0.9 - opacity], np.float32), Path(f"{sop}.dcm"),
                               (8, 8), sop)

    images = [image("p", "1", 0.6, 0.2), image("p", "2", 0.8, 0.1), image("p", "3", None, 0.9),  # best box wins
              image("q", "4", None, 0.3), image("q", "5", None, 0.6),  # no boxes: the higher P(Lung Opacity)
              image("r", "6", 0.7, 0.5), image("r", "7", 0.7, 0.5)]  # a tie: the first file
    result = PredictionResult({p.key: p for p in images}, 0.5, len(images))
    assert {pid: p.sop_instance_uid for pid, p in result.submission_rows().items()} == {"p": "2", "q": "5", "r": "6"}
    np.testing.assert_allclose(result.submission_boxes()["p"], [[0.8, 1, 2, 3, 4]])


def test_unreadable_file_is_listed_and_the_others_are_predicted(tiny_run, tmp_path, real_sample):
    from pneumodet.inference import predict

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not a DICOM file" * 10)
    images = real_sample / "stage_2_train_images"
    result = predict(tiny_run, [images, garbage, tmp_path / "absent.dcm"], precision="fp32", progress=False,
                     batch_size=4)
    assert len(result.predictions) == 16
    assert {p.stem for p in images.glob("*.dcm")} == set(by_patient(result))
    assert [u.path for u in result.unreadable] == [tmp_path / "absent.dcm", garbage]
    assert str(garbage) in result.summary()
    for pred in by_patient(result).values():
        assert pred.original_size == (1024, 1024)
        assert (pred.boxes[:, 0] >= THRESHOLD).all()
        assert (pred.boxes[:, 1:3] >= 0).all() and (pred.boxes[:, 1] + pred.boxes[:, 3] <= 1024 + 1e-3).all()
        np.testing.assert_allclose(pred.class_probs.sum(), 1.0, rtol=1e-5)


def test_symlink_leaving_the_input_folder_is_not_followed_by_default(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    write_dicom(tmp_path / "in" / "inside.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="inside")
    outside = write_dicom(tmp_path / "elsewhere" / "out.dcm", _blob_image(128, 128, (8, 8, 40, 40)),
                          patient_id="outside")
    os.symlink(outside, tmp_path / "in" / "link.dcm")
    default = predict(tiny_run, [tmp_path / "in"], precision="fp32", progress=False)
    assert list(by_patient(default)) == ["inside"]
    assert default.skipped_links == [tmp_path / "in" / "link.dcm"]
    followed = predict(tiny_run, [tmp_path / "in"], follow_symlinks=True, precision="fp32", progress=False)
    assert sorted(by_patient(followed)) == ["inside", "outside"]


def test_predict_errors_are_clear(tiny_run, tmp_path):
    from pneumodet.errors import CheckpointError, ConfigError, PneumodetError
    from pneumodet.inference import predict
    from pneumodet.model import load_checkpoint, save_checkpoint

    (tmp_path / "empty").mkdir()
    with pytest.raises(PneumodetError, match="no DICOM files"):
        predict(tiny_run, [tmp_path / "empty"], progress=False)
    with pytest.raises(PneumodetError, match=r"absent.dcm: no such file or folder"):
        predict(tiny_run, [tmp_path / "absent.dcm"], progress=False)
    os.symlink(tiny_run, tmp_path / "empty" / "elsewhere")
    with pytest.raises(PneumodetError, match=r"1 symbolic link\(s\) leading out of the input folders"):
        predict(tiny_run, [tmp_path / "empty"], progress=False)
    with pytest.raises(CheckpointError, match="best_model.pt"):
        predict(tmp_path / "empty", [tmp_path], progress=False)
    with pytest.raises(ConfigError, match="unknown TTA"):
        predict(tiny_run, [tmp_path], tta="vflip", progress=False)
    model, _ = load_checkpoint(tiny_run / "best_model.pt")
    save_checkpoint(tmp_path / "no_threshold.pt", model, extra={"image_size": SIZE})
    with pytest.raises(CheckpointError, match="no validation threshold"):
        predict(tmp_path / "no_threshold.pt", [tmp_path], progress=False)


def test_predict_command_writes_a_submission_that_score_reads(tiny_run, tmp_path, real_sample, capsys):
    from pneumodet.cli import main
    from pneumodet.submission import read_ground_truth, read_submission

    garbage = tmp_path / "bad.dcm"
    garbage.write_bytes(b"\0" * 300)
    sub, js = tmp_path / "submission.csv", tmp_path / "pred.json"
    code = main(["predict", str(tiny_run), str(real_sample / "stage_2_train_images"), str(garbage),
                 "--out", str(sub), "--json", str(js), "--precision", "fp32", "--threshold", "0.3",
                 "--tta", "hflip", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "images predicted: 16 of 16 patient(s)" in out and "unreadable: 1" in out and str(garbage) in out
    rows = read_submission(sub)
    assert len(rows) == 16 and sum(len(b) for b in rows.values()) > 0
    assert all((b[:, 0] >= 0.3).all() for b in rows.values())
    assert main(["score", str(sub), "--labels", str(real_sample / "stage_2_train_labels.csv")]) == 0
    # the RSNA metric scores the images with a ground-truth or a predicted box and excludes the rest
    truth = read_ground_truth(real_sample / "stage_2_train_labels.csv")
    scored = sum(1 for pid, boxes in rows.items() if len(boxes) or len(truth[pid]))
    assert f"over {scored} image(s) ({16 - scored} excluded" in capsys.readouterr().out


def test_bf16_prediction_stays_close_to_fp32(tiny_run, tmp_path):
    from pneumodet.inference import predict

    rng = np.random.default_rng(0)
    for i in range(2):
        write_dicom(tmp_path / f"p{i}.dcm", rng.integers(0, 256, (256, 256), dtype=np.uint8), patient_id=f"p{i}")
    fp32 = predict(tiny_run, [tmp_path], threshold=0.0, precision="fp32", progress=False)
    bf16 = predict(tiny_run, [tmp_path], threshold=0.0, precision="bf16", progress=False)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    for pid in ("p0", "p1"):
        a, b = by_patient(fp32)[pid], by_patient(bf16)[pid]
        np.testing.assert_allclose(b.class_probs, a.class_probs, atol=0.02)
        assert len(a.boxes) > 0 and len(b.boxes) > 0
        np.testing.assert_allclose(b.boxes[0, 0], a.boxes[0, 0], atol=0.02)  # the best score


@pytest.mark.slow
def test_compiled_prediction_matches_eager(tiny_run, tmp_path):
    from pneumodet.inference import predict

    rng = np.random.default_rng(1)
    for i in range(3):
        write_dicom(tmp_path / f"c{i}.dcm", rng.integers(0, 256, (200, 240), dtype=np.uint8), patient_id=f"c{i}")
    eager = predict(tiny_run, [tmp_path], threshold=0.0, precision="fp32", batch_size=2, progress=False)
    compiled = predict(tiny_run, [tmp_path], threshold=0.0, precision="fp32", batch_size=2, compile=True,
                       progress=False)  # batches of 2 and 1: the last one padded to 2
    assert compiled.compiled and not eager.compiled
    for pid in ("c0", "c1", "c2"):
        a, b = by_patient(eager)[pid], by_patient(compiled)[pid]
        np.testing.assert_allclose(b.class_probs, a.class_probs, atol=1e-4)
        assert len(a.boxes) > 0
        # as sets: boxes whose scores agree to 6 digits may come out in either order
        assert_same_detections(*kaggle_to_xyxy(b.boxes), *kaggle_to_xyxy(a.boxes), box_atol=1e-2, score_atol=1e-4)


def test_predict_on_the_synthetic_dataset_gives_a_row_per_image_that_scores(tiny_run, tmp_path, synth_dataset):
    import pandas as pd

    from pneumodet.inference import predict, write_prediction_submission
    from pneumodet.submission import read_submission, score_submission

    labels = pd.read_csv(synth_dataset / "stage_2_train_labels.csv")
    result = predict(tiny_run, [synth_dataset / "stage_2_train_images"], threshold=0.3, precision="fp32",
                     progress=False, batch_size=16)
    assert set(by_patient(result)) == set(labels["patientId"]) and not result.unreadable
    assert all(p.original_size == (256, 256) for p in by_patient(result).values())
    sub = write_prediction_submission(result, tmp_path / "sub.csv")
    assert len(read_submission(sub)) == labels["patientId"].nunique() == 40
    scored = score_submission(sub, synth_dataset / "stage_2_train_labels.csv")
    assert scored.n_images + scored.n_excluded == 40 and 0.0 <= scored.score <= 1.0
    assert set(scored.per_image) == set(by_patient(result))


def test_default_precision_follows_the_hardware_as_training_does():
    from pneumodet.errors import ConfigError
    from pneumodet.inference import Predictor, resolve_precision
    from pneumodet.training import hardware_has_bf16

    expected = "bf16" if hardware_has_bf16("cpu") else "fp32"
    assert resolve_precision(None, torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            Predictor(torch.nn.Identity(), SIZE, device="cuda")


def test_predict_command_reports_errors_in_one_line(tiny_run, tmp_path, capsys):
    from pneumodet.cli import main

    assert main(["predict", str(tmp_path / "no_run"), str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_run: no such checkpoint file or run directory" in err
    assert main(["predict", str(tiny_run), str(tmp_path / "none.dcm"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "none.dcm: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


# ---------------------------------------------------------------- the command's failure modes
def test_predict_where_no_image_could_be_predicted_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    """Every file fails to decode: no empty submission and no exit 0, but one line naming the causes."""
    from badinputs import blob_image, broken_dicom_cases, make_dicom
    from pneumodet.cli import main

    good = make_dicom(tmp_path / "src" / "good.dcm", blob_image(64, 64, (8, 8, 40, 40)))
    broken = broken_dicom_cases(tmp_path / "in", good)
    sub, js, overlays = tmp_path / "sub.csv", tmp_path / "pred.json", tmp_path / "overlays"
    sub.write_text("the previous submission\n")
    code = main(["predict", str(tiny_run), str(tmp_path / "in"), "--out", str(sub), "--json", str(js),
                 "--overlays", str(overlays)])
    captured = capsys.readouterr()
    line = assert_one_line_error(code, captured.err, "predict",
                                 rf"no image could be predicted from the {len(broken)} DICOM file\(s\) found "
                                 rf"\({len(broken)} unreadable: .*empty\.dcm: empty file.*; and \d+ more\); "
                                 r"nothing written")
    assert len(line) < 1000
    assert sub.read_text() == "the previous submission\n" and not js.exists()
    assert list(overlays.iterdir()) == []


def test_predict_names_the_files_it_could_not_use_and_predicts_the_rest(tiny_run, tmp_path, controlled_model, capsys):
    from pneumodet.cli import main

    folder = tmp_path / "in"
    write_dicom(folder / "good.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="good")
    (folder / "bad.dcm").write_bytes(b"\0" * 200)
    write_dicom(folder / "tab.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="a\tb")
    code = main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "sub.csv")])
    out = capsys.readouterr().out
    assert code == 0
    assert "images predicted: 1 of 1 patient(s)" in out and "unreadable: 2;" in out
    assert f"unreadable {folder / 'bad.dcm'}: " in out
    assert f"unreadable {folder / 'tab.dcm'}: patient id 'a\\tb' from the DICOM PatientID cannot be" in out


def _no_cuda_device() -> str:
    """A CUDA device this machine lacks: plain ``cuda`` without a GPU, else a GPU number past the last."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("argv, pattern", [
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--device", "foo"],
     r"unknown device 'foo'; choose auto, cpu, cuda or cuda:N"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--device", "meta"], r"device 'meta' is not supported"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--device", _no_cuda_device()],
     r"but this machine has (no usable CUDA GPU|\d+ CUDA GPU)"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--workers", "-1"], r"workers must be 0 .*or more, got -1"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--batch-size", "0"], r"batch size must be at least 1, got 0"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--threshold", "2"],
     r"threshold must be a number from 0 to 1 \(box scores are probabilities\), got 2\.0"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--threshold", "nan"], r"threshold must be .*, got nan"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--threshold", "-0.1"], r"threshold must be .*, got -0\.1"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--nms-iou", "0"], r"NMS IoU must be above 0 and at most 1"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--nms-iou", "1.5"], r"NMS IoU must be .*, got 1\.5"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--nms-iou", "nan"], r"NMS IoU must be .*, got nan"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--max-det", "0"],
     r"max detections must be a whole number from 1 to 10000, got 0"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--max-det", "10001"], r"max detections .*, got 10001"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--min-score", "1"],
     r"min score must be a number from 0 up to \(not including\) 1, got 1\.0"),
    (["predict", "{run}", "{dcm}", "--out", "{out}", "--min-score", "-0.5"], r"min score must be .*, got -0\.5"),
    # checked before the run is read: an empty folder is no run, yet the option is what is named
    (["evaluate", "{tmp}/empty", "--device", "foo"], r"unknown device 'foo'"),
    (["evaluate", "{tmp}/empty", "--batch-size", "0"], r"batch size must be at least 1, got 0"),
    (["evaluate", "{tmp}/empty", "--nms-iou", "-1"], r"NMS IoU must be above 0 and at most 1"),
    (["evaluate", "{tmp}/empty", "--max-det", "0"], r"max detections must be a whole number"),
    (["evaluate", "{tmp}/empty", "--min-score", "inf"], r"min score must be .*, got inf"),
    # checked before the data is read: the data folder does not even exist
    (["augment-preview", "{tmp}/no_data", "--out", "{tmp}/x.xyz"],
     r"x\.xyz: unknown picture format '\.xyz'; name a \.png, \.jpg, \.jpeg, \.pdf, \.svg file"),
    (["augment-preview", "{tmp}/no_data", "--out", "{tmp}/preview"], r"unknown picture format '\(no suffix\)'"),
    (["augment-preview", "{tmp}/no_data", "--n", "0"], r"--n and --draws must be at least 1, got 0 and 3"),
])
def test_bad_option_values_are_one_line(tiny_run, tmp_path, capsys, argv, pattern):
    from pneumodet.cli import main

    (tmp_path / "empty").mkdir()
    dcm = write_dicom(tmp_path / "p1.dcm", _blob_image(64, 64, (8, 8, 40, 40)), patient_id="p1")
    args = [a.format(run=tiny_run, dcm=dcm, out=tmp_path / "sub.csv", tmp=tmp_path) for a in argv]
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, args[0], pattern)
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "x.xyz").exists()


def test_device_auto_is_the_gpu_when_there_is_one_else_the_cpu(tiny_run, tmp_path, capsys):
    from pneumodet.cli import main
    from pneumodet.inference import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")
    dcm = write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="p1")
    sub = tmp_path / "sub.csv"
    assert main(["predict", str(tiny_run), str(dcm), "--out", str(sub), "--device", "auto", "--precision",
                 "fp32", "--threshold", "0.3"]) == 0
    assert "images predicted: 1 of 1 patient(s)" in capsys.readouterr().out
    assert sub.read_text().startswith("patientId,PredictionString\np1,")


def test_predict_with_labels_draws_the_ground_truth_on_the_overlays(tiny_run, tmp_path, controlled_model, capsys):
    """``predict --labels`` draws each patient's ground-truth boxes (green) under the predicted (red) ones,
    with each score on a dark box; a patient the labels lack gets none; labels without overlays are refused."""
    from PIL import Image

    from pneumodet.cli import main

    folder = tmp_path / "in"
    pixels = np.maximum(_blob_image(512, 512, (200, 300, 320, 450)), 100)  # grey lung, white blob
    write_dicom(folder / "p1.dcm", pixels, patient_id="p1")
    write_dicom(folder / "p2.dcm", pixels, patient_id="p2")
    labels = tmp_path / "stage_2_train_labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\np1,350.0,250.0,100.0,150.0,1\n")
    argv = ["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "sub.csv"), "--precision", "fp32"]
    with_truth, without = tmp_path / "with", tmp_path / "without"
    assert main([*argv, "--overlays", str(with_truth), "--labels", str(labels)]) == 0, capsys.readouterr().err
    assert main([*argv, "--overlays", str(without)]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in with_truth.iterdir())
    p1, p2 = (Image.open(with_truth / n).convert("RGB") for n in names)
    plain = Image.open(without / names[0]).convert("RGB")
    green, red, grey = (40, 220, 40), (255, 40, 40), (100, 100, 100)
    for x, y in [(350, 320), (450, 320), (400, 250), (400, 400)]:  # the four edges of p1's labelled box
        assert p1.getpixel((x, y)) == green and plain.getpixel((x, y)) == grey
    assert p1.getpixel((200, 370)) == red  # the predicted box is still drawn
    assert p1.getpixel((400, 320 + 5)) == grey  # inside the labelled box: the image itself
    assert not (np.asarray(p2) == green).all(-1).any()  # p2 is not in the labels: no ground truth drawn
    # the score "0.90" above the predicted box: red text on a black box, where the image was grey
    score_area = np.asarray(p1.crop((200, 280, 240, 298))).astype(int)
    assert (score_area[..., 0] - score_area[..., 1] > 150).any()  # red text (anti-aliased)
    assert (score_area == 0).all(-1).sum() > 100  # the image holds no black pixel: it is the text's box
    code = main([*argv, "--labels", str(labels)])
    assert_one_line_error(code, capsys.readouterr().err, "predict", r"labels are drawn on the overlays only")


def test_nms_iou_max_det_and_min_score_reach_the_models_post_processing(tiny_run, tmp_path):
    """``--nms-iou``, ``--max-det``, ``--min-score`` replace the model's ``nms_thresh``, ``max_detections`` and
    ``score_thresh`` for every box predicted (the tiny run's scores spread around 0.5)."""
    from torchvision.ops import box_iou

    from pneumodet.inference import predict

    dcm = write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="p1")

    def boxes(**options) -> np.ndarray:
        result = predict(tiny_run, [dcm], threshold=0.0, precision="fp32", progress=False, **options)
        return next(iter(result.predictions.values())).boxes  # conf, x, y, w, h

    from pneumodet.model import ModelConfig

    assert len(boxes()) == ModelConfig().max_detections  # the model's own (the tiny run has the defaults)
    default = boxes(nms_iou=0.5, max_detections=100)
    assert len(default) == 100
    assert len(boxes(max_detections=3)) == 3
    assert (boxes(min_score=0.55, max_detections=100)[:, 0] > 0.55).all() and default[:, 0].min() <= 0.55
    sparse = boxes(nms_iou=0.1, max_detections=100)
    xyxy = torch.from_numpy(np.concatenate([sparse[:, 1:3], sparse[:, 1:3] + sparse[:, 3:5]], axis=1))
    iou = box_iou(xyxy, xyxy).fill_diagonal_(0)
    assert len(sparse) < len(default) and float(iou.max()) <= 0.1 + 1e-4


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom: PatientID is at most 64 long
def test_a_300_character_patient_id_gets_a_short_overlay_name(tiny_run, tmp_path, controlled_model, capsys):
    """A long or path-like PatientID used to abort predict ("File name too long"); overlay names are now a
    bounded, sanitised prefix and a hash, every one inside the overlay folder."""
    import json

    from pneumodet.cli import main
    from pneumodet.submission import read_submission

    long_id = "P" * 300
    folder = tmp_path / "in"
    write_dicom(folder / "long.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id=long_id)
    write_dicom(folder / "path.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="../../x/y")
    write_dicom(folder / "path2.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="..__x_y")
    overlays, js = tmp_path / "overlays", tmp_path / "pred.json"
    code = main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "sub.csv"), "--overlays",
                 str(overlays), "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    names = [p.name for p in overlays.iterdir()]
    assert len(names) == 3 and all(p.is_file() for p in overlays.iterdir())  # three distinct files, no folders
    assert all(len(n) <= 57 and n.endswith(".png") and "/" not in n and not n.startswith(".") for n in names)
    assert sorted(names) == sorted(i["overlay"] for i in json.loads(js.read_text())["images"])
    assert set(read_submission(tmp_path / "sub.csv")) == {long_id, "../../x/y", "..__x_y"}
    assert not list(tmp_path.glob("x*"))


def test_predict_prints_file_names_that_are_not_utf8(tiny_run, tmp_path, controlled_model, capsys):
    """Bytes that are not UTF-8 in a file or folder name are shown as \\xNN in the summary and the JSON,
    never a UnicodeEncodeError; a file name without a PatientID that cannot be an id is listed."""
    import json

    from pneumodet.cli import main

    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/in\xff"))
    write_dicom(folder / "p1.dcm", _blob_image(128, 128, (8, 8, 40, 40)), patient_id="p1")
    write_dicom(folder / os.fsdecode(b"\xe9t\xe9.dcm"), _blob_image(128, 128, (8, 8, 40, 40)))  # no PatientID
    (folder / os.fsdecode(b"bad\xfe.dcm")).write_bytes(b"not a DICOM file" * 20)
    js = tmp_path / "pred.json"
    code = main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "sub.csv"), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0
    shown = f"{tmp_path}/in\\xff"
    assert "images predicted: 1 of 1 patient(s)" in out and "unreadable: 2;" in out
    assert f"unreadable {shown}/bad\\xfe.dcm: not a DICOM file" in out
    assert f"unreadable {shown}/\\xe9t\\xe9.dcm: patient id '\\udce9t\\udce9' from the file name" in out
    data = json.loads(js.read_text(encoding="utf-8"))
    assert data["images"][0]["source"] == f"{shown}/p1.dcm"
    assert {u["path"] for u in data["unreadable"]} == {f"{shown}/bad\\xfe.dcm", f"{shown}/\\xe9t\\xe9.dcm"}


def test_detections_are_compared_as_sets_not_by_position():
    """The comparison the eager/compiled, ONNX and folding tests use: order among ties does not matter,
    a moved box or a changed score does."""
    boxes = np.array([[0, 0, 10, 10], [50, 50, 70, 80], [20, 0, 30, 12]], np.float32)
    scores = np.array([0.9, 0.7000001, 0.7])
    assert_same_detections(boxes[[0, 2, 1]], scores[[0, 2, 1]], boxes, scores, box_atol=1e-3, score_atol=1e-4)
    with pytest.raises(AssertionError):
        assert_same_detections(boxes + [0, 0, 0, 5], scores, boxes, scores, box_atol=1e-3, score_atol=1e-4)
    with pytest.raises(AssertionError):
        assert_same_detections(boxes, scores + [0, 0.1, 0], boxes, scores, box_atol=1e-3, score_atol=1e-4)
    # a top-2 cut between the tied scores: either tied box may be the one kept
    assert_same_detections(boxes[[0, 2]], scores[[0, 2]], boxes[:2], scores[:2], box_atol=1e-3, score_atol=1e-4)
    with pytest.raises(AssertionError):
        assert_same_detections(boxes[[0, 2]], scores[[0, 2]], boxes[:2], scores[:2], box_atol=1e-3,
                               score_atol=1e-4, cut=False)
    with pytest.raises(AssertionError):  # a missing box that is not at the cut
        assert_same_detections(boxes[[1, 2]], scores[[1, 2]], boxes[:2], scores[:2], box_atol=1e-3, score_atol=1e-4)


def test_predict_and_evaluate_share_one_set_of_options_and_its_defaults():
    """One :class:`PredictOptions` for the commands that predict: the same options, the dataclass's defaults."""
    from pneumodet.cli import _prediction_options, build_parser
    from pneumodet.inference import PredictOptions

    parser = build_parser()
    predict_args = ["predict", "run", "x.dcm", "--out", "s.csv"]
    assert _prediction_options(parser.parse_args(predict_args)) == PredictOptions()
    assert _prediction_options(parser.parse_args(["evaluate", "run"])) == PredictOptions()
    given = ["--tta", "hflip", "--tta-merge", "nms", "--gate", "--batch-size", "3", "--precision", "fp32",
             "--device", "auto", "--workers", "2", "--compile", "--nms-iou", "0.3", "--max-det", "7",
             "--min-score", "0.1"]
    expected = PredictOptions(tta="hflip", tta_merge="nms", gate=True, batch_size=3, precision="fp32",
                              device="auto", workers=2, compile=True, nms_iou=0.3, max_detections=7, min_score=0.1)
    assert _prediction_options(parser.parse_args([*predict_args, *given])) == expected
    assert _prediction_options(parser.parse_args(["evaluate", "run", *given])) == expected
    assert PredictOptions.of(expected, threshold=0.25) == PredictOptions(**{**vars(expected), "threshold": 0.25})
