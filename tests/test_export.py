"""ONNX export: onnxruntime agrees with PyTorch on the raw outputs and, after decoding, on the boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _helpers import assert_one_line_error, assert_same_detections
from pneumodet.cli import main
from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.inference import ONNX_OUTPUTS, decode_onnx_outputs, export_onnx, onnx_side_file, run_onnx
from pneumodet.model import ModelConfig, build_model, save_checkpoint

onnxruntime = pytest.importorskip("onnxruntime")

SIZE = 128


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a small random model whose scores spread (so NMS and top-k matter)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE)).eval()
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()  # scores around 0.5 rather than the 0.01 prior
        model.box_head.deltas.weight.normal_(std=0.05)
    out = tmp_path_factory.mktemp("export_run")
    save_checkpoint(out / "best_model.pt", model, extra={"threshold": 0.4, "image_size": SIZE})
    return out, model


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out, _ = run_dir
    return export_onnx(out, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_onnxruntime_matches_pytorch_on_every_output_with_a_dynamic_batch(run_dir, exported):
    _, model = run_dir
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(ONNX_OUTPUTS)
    for batch in (1, 3):  # exported with batch 2: other sizes must work too
        images = _images(batch)
        with torch.no_grad():
            ref = model(images)
        got = dict(zip(ONNX_OUTPUTS, session.run(None, {"images": images.numpy()}), strict=True))
        for name in ("cls_logits", "global_logits", "box_deltas"):
            expected = getattr(ref, name).numpy()
            assert got[name].shape == expected.shape
            np.testing.assert_allclose(got[name], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_array_equal(got["anchors"], ref.anchors.numpy())


def test_decoded_onnx_boxes_match_model_detect(run_dir, exported):
    _, model = run_dir
    images = _images(2, seed=2)
    with torch.no_grad():
        expected = model.detect(model(images), score_thresh=0.3)
    got = run_onnx(exported.path, images.numpy(), score_thresh=0.3)
    assert len(got) == 2
    assert sum(len(d.boxes) for d in expected) > 4, "the test model must produce boxes to compare"
    for e, g in zip(expected, got, strict=True):
        # as sets: two boxes with scores equal to 6 digits may come out in either order
        assert_same_detections(g.boxes, g.scores, e.boxes, e.scores, box_atol=1e-3, score_atol=1e-4)
        torch.testing.assert_close(g.class_probs, e.class_probs, rtol=1e-4, atol=1e-6)


def test_side_file_records_what_decoding_needs(run_dir, exported):
    side = json.loads(onnx_side_file(exported.path).read_text())
    assert side["image_size"] == SIZE and side["threshold"] == 0.4
    assert sum(side["anchors_per_level"]) == exported.num_anchors
    assert side["class_names"][1] == "Lung Opacity"
    with pytest.raises(ConfigError, match="expected the 4 ONNX outputs"):
        decode_onnx_outputs([np.zeros((1, 3))], side)
    bad = exported.path.with_name("bad.json")
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a pneumodet ONNX side file"):
        decode_onnx_outputs([np.zeros(1)] * 4, bad)


def test_export_command_and_its_errors(run_dir, tmp_path, capsys):
    out, model = run_dir
    target = tmp_path / "sub" / "m.onnx"
    assert main(["export", str(out / "best_model.pt"), "--onnx", str(target), "--image-size", "64"]) == 0
    assert "[B, 1, 64, 64]" in capsys.readouterr().out
    assert target.is_file() and json.loads(onnx_side_file(target).read_text())["image_size"] == 64
    assert main(["export", str(tmp_path / "nothing"), "--onnx", str(target)]) == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="best_model.pt"):
        export_onnx(tmp_path, tmp_path / "x.onnx")
    stride = 2 ** max(model.config.pyramid_levels)
    with pytest.raises(ConfigError, match=f"smaller than the coarsest pyramid stride {stride}"):
        export_onnx(out, tmp_path / "x.onnx", image_size=stride // 2)


def _numpy_decode(cls_logits, box_deltas, global_logits, anchors, side, score_thresh):
    """The module docstring's recipe, written independently in numpy, for one image."""
    cfg, size = side["model_config"], side["image_size"]
    score = 1 / (1 + np.exp(-cls_logits.astype(np.float64)))
    kept, start = [], 0
    for count in side["anchors_per_level"]:
        order = np.argsort(-score[start:start + count], kind="stable")[: cfg["topk_per_level"]]
        kept.extend(order + start)
        start += count
    kept = np.asarray(kept)
    a, d = anchors[kept].astype(np.float64), box_deltas[kept].astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + aw / 2 + d[:, 0] * aw, a[:, 1] + ah / 2 + d[:, 1] * ah
    w = aw * np.exp(np.minimum(d[:, 2], np.log(1000 / 16)))
    h = ah * np.exp(np.minimum(d[:, 3], np.log(1000 / 16)))
    boxes = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0, size)
    s = score[kept]
    ok = (s > score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, s = boxes[ok], s[ok]
    out = []
    for i in np.argsort(-s, kind="stable"):
        if all(_iou(boxes[i], boxes[j]) <= cfg["nms_thresh"] for j in out):
            out.append(i)
    out = out[: cfg["max_detections"]]
    probs = np.exp(global_logits - global_logits.max())
    return boxes[out], s[out], probs / probs.sum()


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_documented_decoding_recipe_gives_the_same_boxes(exported):
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": _images(2, seed=3).numpy()})
    side = json.loads(exported.side_file.read_text())
    decoded = decode_onnx_outputs(outputs, side, score_thresh=0.3)
    for i, det in enumerate(decoded):
        boxes, scores, probs = _numpy_decode(outputs[0][i], outputs[1][i], outputs[2][i], outputs[3], side, 0.3)
        assert len(boxes) > 2
        assert_same_detections(det.boxes, det.scores, boxes, scores, box_atol=1e-3, score_atol=1e-5)
        np.testing.assert_allclose(det.class_probs.numpy(), probs, rtol=1e-5)


@pytest.mark.parametrize("opset", ["5", "8", "1000", "-1"])
def test_an_unsupported_opset_is_one_line_before_any_work(run_dir, tmp_path, capsys, opset):
    from pneumodet.inference import MIN_ONNX_OPSET, onnx_opsets

    out, _ = run_dir
    target = tmp_path / "m.onnx"
    code = main(["export", str(out), "--onnx", str(target), "--opset", opset])
    assert_one_line_error(code, capsys.readouterr().err, "export",
                          rf"ONNX opset {opset} is not supported: choose {MIN_ONNX_OPSET} to {onnx_opsets()[-1]} "
                          r"\(default 17\)")
    assert list(tmp_path.iterdir()) == []


def test_the_oldest_and_newest_accepted_opsets_give_pytorchs_boxes(run_dir, tmp_path):
    from pneumodet.inference import MIN_ONNX_OPSET, onnx_opsets

    out, model = run_dir
    images = _images(2, seed=4)
    with torch.no_grad():
        expected = model.detect(model(images), score_thresh=0.3)
    for opset in (MIN_ONNX_OPSET, onnx_opsets()[-1]):
        exported = export_onnx(out, tmp_path / f"m{opset}.onnx", opset=opset)
        for e, g in zip(expected, run_onnx(exported.path, images.numpy(), score_thresh=0.3), strict=True):
            assert_same_detections(g.boxes, g.scores, e.boxes, e.scores, box_atol=1e-3, score_atol=1e-4)
