"""Prediction: file search, box mapping, TTA merge (WBF), gating, outputs, the ``predict`` command."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumodet.inference import (
    find_dicom_files,
    hflip_boxes,
    merge_views,
    prepare_image,
    safe_filename,
    weighted_boxes_fusion,
    xyxy_to_kaggle,
)


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


def test_safe_filename_cannot_escape_the_overlay_folder():
    assert safe_filename("../../etc/passwd") == "_.._etc_passwd"
    assert safe_filename("abc-1.2_x") == "abc-1.2_x"
    assert "/" not in safe_filename("a/b") and safe_filename("") == "_"


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


def write_dicom(path: Path, pixels: np.ndarray, *, patient_id: str | None = None) -> Path:
    """An uncompressed 8-bit MONOCHROME2 DICOM carrying identifying tags that must never reach an output."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
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
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best_model.pt", model, extra={"threshold": THRESHOLD, "image_size": SIZE,
                                                         "val_map": 0.0, "epoch": 0, "encoder": "resnet18"})
    return run


@pytest.fixture
def controlled_model(monkeypatch):
    """The network's outputs replaced by a rule on the input image, so the expected boxes are known.

    ``forward`` passes the images through; ``detect`` returns, per image, the bounding box of its
    bright pixels (score 0.9), a corner box of score 0.1 (under the threshold) and class
    probabilities ``probs``. The rule is flip-equivariant, as a perfectly trained model would be.
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
            dets.append(Detections(boxes, torch.tensor([0.9, 0.1]), state["probs"].clone()))
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
    np.testing.assert_allclose(result.predictions["p1"].boxes, [[0.9, 20, 50, 80, 100]], rtol=1e-6)
    assert result.predictions["p1"].original_size == (200, 256)
    np.testing.assert_allclose(result.predictions["p1"].class_probs, [0.2, 0.7, 0.1], rtol=1e-6)
    sub = read_submission(write_prediction_submission(result, tmp_path / "sub.csv"))
    np.testing.assert_allclose(sub["p1"], [[0.9, 20, 50, 80, 100]], rtol=1e-6)


def test_threshold_argument_overrides_the_runs_choice(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (20, 30, 60, 90)), patient_id="p1")
    low = predict(tiny_run, [tmp_path / "p1.dcm"], threshold=0.05, precision="fp32", progress=False)
    assert low.threshold == 0.05
    np.testing.assert_allclose(low.predictions["p1"].boxes, [[0.9, 20, 30, 40, 60], [0.1, 0, 0, 4, 4]],
                               rtol=1e-6)
    default = predict(tiny_run, [tmp_path / "p1.dcm"], precision="fp32", progress=False)
    assert default.threshold == THRESHOLD and len(default.predictions["p1"].boxes) == 1


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
            np.testing.assert_allclose(tta.predictions[pid].boxes, plain.predictions[pid].boxes, atol=1e-4)
    np.testing.assert_allclose(plain.predictions["p1"].boxes, [[0.9, 600, 104, 400, 200]], rtol=1e-6)


def test_gate_scales_scores_by_the_lung_opacity_probability(tiny_run, tmp_path, controlled_model):
    from pneumodet.inference import predict

    write_dicom(tmp_path / "p1.dcm", _blob_image(128, 128, (20, 30, 60, 90)), patient_id="p1")
    controlled_model["probs"] = torch.tensor([0.45, 0.5, 0.05])
    gated = predict(tiny_run, [tmp_path], gate=True, threshold=0.4, precision="fp32", progress=False)
    np.testing.assert_allclose(gated.predictions["p1"].boxes, [[0.45, 20, 30, 40, 60]], rtol=1e-6)
    dropped = predict(tiny_run, [tmp_path], gate=True, precision="fp32", progress=False)  # 0.45 < 0.5
    assert len(dropped.predictions["p1"].boxes) == 0
    assert "chosen on ungated scores" in dropped.warnings[0] and not gated.warnings
    ungated = predict(tiny_run, [tmp_path], precision="fp32", progress=False)
    np.testing.assert_allclose(ungated.predictions["p1"].boxes[:, 0], [0.9])


def test_privacy_duplicates_mismatched_ids_overlays_and_json(tiny_run, tmp_path, controlled_model):
    import json

    from PIL import Image

    from pneumodet.inference import predict, write_prediction_json, write_prediction_submission

    folder = tmp_path / "in"
    write_dicom(folder / "a.dcm", _blob_image(256, 256, (40, 60, 120, 200)), patient_id="a")
    write_dicom(folder / "b.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="a")  # same patient
    write_dicom(folder / "c.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="patient-c")
    write_dicom(folder / "d.dcm", _blob_image(256, 256, (10, 10, 50, 50)))  # no PatientID: the stem
    write_dicom(folder / "e.dcm", _blob_image(256, 256, (10, 10, 50, 50)), patient_id="x,y")  # breaks the CSV
    result = predict(tiny_run, [folder], overlay_dir=tmp_path / "overlays", precision="fp32", progress=False,
                     workers=1, batch_size=2)  # decoded in a worker process, in file order

    assert list(result.predictions) == ["a", "patient-c", "d"]
    assert [(d.patient_id, d.path.name, d.kept.name) for d in result.duplicates] == [("a", "b.dcm", "a.dcm")]
    assert [w.split(":")[0] for w in result.warnings] == [str(folder / "b.dcm"), str(folder / "c.dcm")]
    assert "PatientID 'patient-c' differs from the file name" in result.warnings[1]
    assert result.files_found == 5
    assert [(u.path.name, u.cause) for u in result.unreadable] == [
        ("e.dcm", "patient id 'x,y' cannot be a submission CSV field (comma, quote or line break)")]

    overlay = Image.open(tmp_path / "overlays" / "a.png").convert("RGB")
    assert overlay.size == (256, 256)
    assert overlay.getpixel((40, 130)) == (255, 40, 40)  # left edge of the box, in original pixels
    assert overlay.getpixel((80, 130)) == (255, 255, 255)  # inside the box: the image itself
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.png", "d.png", "patient-c.png"]

    data = json.loads(write_prediction_json(result, tmp_path / "pred.json").read_text())
    a = data["patients"][0]
    assert a["patientId"] == "a" and a["source"] == str(folder / "a.dcm")
    assert a["boxes"] == [[40, 60, 80, 140]] and a["scores"] == [0.9]
    assert a["class_probs"] == {"Normal": 0.2, "Lung Opacity": 0.7, "No Lung Opacity / Not Normal": 0.1}
    assert data["duplicates"] == [{"patientId": "a", "path": str(folder / "b.dcm"), "kept": str(folder / "a.dcm")}]

    outputs = [write_prediction_submission(result, tmp_path / "sub.csv"), tmp_path / "pred.json",
               *(tmp_path / "overlays").iterdir()]
    for path in outputs:
        raw = path.read_bytes()
        for secret in (b"Doe", b"Jane", b"19450317", b"Elsewhere"):
            assert secret not in raw, f"{secret!r} leaked into {path}"


def test_unreadable_file_is_listed_and_the_others_are_predicted(tiny_run, tmp_path, real_sample):
    from pneumodet.inference import predict

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not a DICOM file" * 10)
    images = real_sample / "stage_2_train_images"
    result = predict(tiny_run, [images, garbage, tmp_path / "absent.dcm"], precision="fp32", progress=False,
                     batch_size=4)
    assert len(result.predictions) == 16
    assert {p.stem for p in images.glob("*.dcm")} == set(result.predictions)
    assert [u.path for u in result.unreadable] == [tmp_path / "absent.dcm", garbage]
    assert str(garbage) in result.summary()
    for pred in result.predictions.values():
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
    assert list(default.predictions) == ["inside"]
    assert default.skipped_links == [tmp_path / "in" / "link.dcm"]
    followed = predict(tiny_run, [tmp_path / "in"], follow_symlinks=True, precision="fp32", progress=False)
    assert sorted(followed.predictions) == ["inside", "outside"]


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
    from pneumodet.submission import read_submission

    garbage = tmp_path / "bad.dcm"
    garbage.write_bytes(b"\0" * 300)
    sub, js = tmp_path / "submission.csv", tmp_path / "pred.json"
    code = main(["predict", str(tiny_run), str(real_sample / "stage_2_train_images"), str(garbage),
                 "--out", str(sub), "--json", str(js), "--precision", "fp32", "--threshold", "0.3",
                 "--tta", "hflip", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "patients predicted: 16" in out and "unreadable: 1" in out and str(garbage) in out
    rows = read_submission(sub)
    assert len(rows) == 16 and sum(len(b) for b in rows.values()) > 0
    assert all((b[:, 0] >= 0.3).all() for b in rows.values())
    assert main(["score", str(sub), "--labels", str(real_sample / "stage_2_train_labels.csv")]) == 0
    assert "over 16 image(s)" in capsys.readouterr().out


def test_bf16_prediction_stays_close_to_fp32(tiny_run, tmp_path):
    from pneumodet.inference import predict

    rng = np.random.default_rng(0)
    for i in range(2):
        write_dicom(tmp_path / f"p{i}.dcm", rng.integers(0, 256, (256, 256), dtype=np.uint8), patient_id=f"p{i}")
    fp32 = predict(tiny_run, [tmp_path], threshold=0.0, precision="fp32", progress=False)
    bf16 = predict(tiny_run, [tmp_path], threshold=0.0, precision="bf16", progress=False)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    for pid in ("p0", "p1"):
        a, b = fp32.predictions[pid], bf16.predictions[pid]
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
        a, b = eager.predictions[pid], compiled.predictions[pid]
        np.testing.assert_allclose(b.class_probs, a.class_probs, atol=1e-4)
        assert len(a.boxes) == len(b.boxes) > 0
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-2)


def test_predict_on_the_synthetic_dataset_gives_a_row_per_image_that_scores(tiny_run, tmp_path, synth_dataset):
    import pandas as pd

    from pneumodet.inference import predict, write_prediction_submission
    from pneumodet.submission import read_submission, score_submission

    labels = pd.read_csv(synth_dataset / "stage_2_train_labels.csv")
    result = predict(tiny_run, [synth_dataset / "stage_2_train_images"], threshold=0.3, precision="fp32",
                     progress=False, batch_size=16)
    assert set(result.predictions) == set(labels["patientId"]) and not result.unreadable
    assert all(p.original_size == (256, 256) for p in result.predictions.values())
    sub = write_prediction_submission(result, tmp_path / "sub.csv")
    assert len(read_submission(sub)) == labels["patientId"].nunique() == 40
    scored = score_submission(sub, synth_dataset / "stage_2_train_labels.csv")
    assert scored.n_images + scored.n_excluded == 40 and 0.0 <= scored.score <= 1.0
    assert set(scored.per_image) == set(result.predictions)


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
