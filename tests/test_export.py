"""ONNX export: onnxruntime agrees with PyTorch on the raw outputs and, after decoding, on the boxes; the graph
with its post-processing and the standalone reference decoder (pneumodet.deploy.onnx_reference) give
``predict``'s boxes on the real sample DICOMs."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_one_line_error, assert_same_detections, kaggle_to_xyxy
from badinputs import dicom_cases
from pneumodet.cli import main
from pneumodet.data.dicom import read_dicom
from pneumodet.deploy import onnx_reference
from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.inference import (
    ONNX_DETECTION_OUTPUTS,
    ONNX_OUTPUTS,
    OnnxDetector,
    decode_onnx_outputs,
    export_onnx,
    onnx_side_file,
    run_onnx,
)
from pneumodet.model import ModelConfig, build_model, save_checkpoint

onnxruntime = pytest.importorskip("onnxruntime")

SIZE = 128


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a small random model whose scores spread (so NMS and top-k matter): on the real
    images the 100 boxes kept per image score from about 0.57 to 0.69."""
    torch.manual_seed(0)
    # NMS IoU 0.5 and 100 boxes per image (not the defaults, 0.25 and 5): many boxes to compare decoders on
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE, nms_thresh=0.5, max_detections=100)).eval()
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=3.0)
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
    assert (side["format"], side["graph"], side["exporter"], side["opset"]) == ("pneumodet-onnx-2", "network",
                                                                                "dynamo", 18)
    config = run_dir[1].config
    assert side["postprocess"] == {"score_thresh": config.score_thresh, "nms_iou": config.nms_thresh,
                                   "topk_per_level": config.topk_per_level, "max_detections": config.max_detections,
                                   "box_scale_clamp": pytest.approx(np.log(1000 / 16)), "in_graph": False}
    assert "INTER_AREA" in side["preprocessing"]["resize"] and "Pillow" in side["preprocessing"]["decode"]
    assert (Path(__file__).parents[1] / side["docs"]).is_file()
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
    assert main(["export", str(out / "best_model.pt"), "--onnx", str(target), "--image-size", "64",
                 "--opset", "17"]) == 0
    printed = capsys.readouterr()
    assert "[B, 1, 64, 64]" in printed.out and "torchscript exporter" in printed.out and printed.err == ""
    assert target.is_file() and json.loads(onnx_side_file(target).read_text())["image_size"] == 64
    assert main(["export", str(tmp_path / "nothing"), "--onnx", str(target)]) == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="best_model.pt"):
        export_onnx(tmp_path, tmp_path / "x.onnx")
    stride = 2 ** max(model.config.pyramid_levels)
    with pytest.raises(ConfigError, match=f"smaller than the coarsest pyramid stride {stride}"):
        export_onnx(out, tmp_path / "x.onnx", image_size=stride // 2)


def test_the_reference_decoders_numpy_decoding_gives_pneumodets_boxes(exported):
    """The documented recipe as the reference decoder writes it in numpy (pneumodet.deploy.onnx_reference) and
    pneumodet's own post-processing agree on the same onnxruntime outputs."""
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": _images(2, seed=3).numpy()})
    side = json.loads(exported.side_file.read_text())
    decoded = decode_onnx_outputs(outputs, side, score_thresh=0.3)
    reference = onnx_reference.decode(dict(zip(ONNX_OUTPUTS, outputs, strict=True)), side, score_thresh=0.3)
    # a side file of format 1 (no graph kind, outputs or post-processing values) still decodes the same
    old = {k: v for k, v in side.items() if k not in ("graph", "outputs", "postprocess")} | {"format": "pneumodet-onnx-1"}
    for det, before in zip(decoded, decode_onnx_outputs(outputs, old, score_thresh=0.3), strict=True):
        torch.testing.assert_close(before.boxes, det.boxes)
    for det, ref in zip(decoded, reference, strict=True):
        assert len(ref.boxes) > 2
        assert_same_detections(det.boxes, det.scores, ref.boxes, ref.scores, box_atol=1e-3, score_atol=1e-5)
        np.testing.assert_allclose(det.class_probs.numpy(), ref.class_probs, rtol=1e-5)


@pytest.mark.parametrize("opset", ["5", "8", "1000", "-1"])
def test_an_unsupported_opset_is_one_line_before_any_work(run_dir, tmp_path, capsys, opset):
    from pneumodet.inference import MIN_ONNX_OPSET, onnx_opsets

    out, _ = run_dir
    target = tmp_path / "m.onnx"
    code = main(["export", str(out), "--onnx", str(target), "--opset", opset])
    assert_one_line_error(code, capsys.readouterr().err, "export",
                          rf"ONNX opset {opset} is not supported: choose {MIN_ONNX_OPSET} to {onnx_opsets()[-1]} "
                          r"\(default 18\)")
    assert list(tmp_path.iterdir()) == []


def test_the_oldest_and_newest_accepted_opsets_give_pytorchs_boxes(run_dir, tmp_path):
    """The oldest (TorchScript exporter, the network) and the newest (dynamo, with post-processing)."""
    from pneumodet.inference import MIN_ONNX_OPSET, onnx_opsets

    out, model = run_dir
    images = _images(2, seed=4)
    with torch.no_grad():
        expected = model.detect(model(images), score_thresh=0.3)
    oldest = export_onnx(out, tmp_path / "oldest.onnx", opset=MIN_ONNX_OPSET)
    newest = export_onnx(out, tmp_path / "newest.onnx", opset=onnx_opsets()[-1], postprocess=True, min_score=0.3)
    assert (oldest.exporter, newest.exporter) == ("torchscript", "dynamo")
    for exported in (oldest, newest):
        options = {} if exported.postprocess else {"score_thresh": 0.3}
        for e, g in zip(expected, run_onnx(exported.path, images.numpy(), **options), strict=True):
            assert_same_detections(g.boxes, g.scores, e.boxes, e.scores, box_atol=1e-3, score_atol=1e-4)


# ---------------------------------------------------------------- the graph with its post-processing
@pytest.fixture(scope="module")
def detector_graph(run_dir, tmp_path_factory):
    """``export --with-postprocess`` of the run (dynamo exporter, opset 18): (graph path, its side file). The
    exporter's progress lines, warnings and advice stay out of the output: one line says what was written."""
    out, _ = run_dir
    target = tmp_path_factory.mktemp("onnx_post") / "detector.onnx"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        assert main(["export", str(out), "--onnx", str(target), "--with-postprocess"]) == 0
    assert errors.getvalue() == "" and len(printed.getvalue().splitlines()) == 1, (printed.getvalue(), errors.getvalue())
    assert "dynamo exporter" in printed.getvalue() and "docs/ONNX.md" in printed.getvalue()
    return target, json.loads(onnx_side_file(target).read_text())


def test_the_graph_with_postprocessing_gives_detects_boxes_for_any_batch(run_dir, detector_graph):
    """Top-k per level, decoding, clipping, thresholds, NMS per image and the cap, in the graph: the boxes of
    ``model.detect`` (PyTorch), both for the module in PyTorch and for onnxruntime, batch 1 and 3."""
    _, model = run_dir
    path, side = detector_graph
    assert side["graph"] == "detections" and side["outputs"] == list(ONNX_DETECTION_OUTPUTS)
    assert side["postprocess"]["in_graph"] is True
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(ONNX_DETECTION_OUTPUTS)
    cfg = model.config
    module = OnnxDetector(model, SIZE, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                          topk_per_level=cfg.topk_per_level, max_detections=cfg.max_detections).eval()
    for batch in (1, 3):
        images = _images(batch, seed=5)
        with torch.no_grad():
            expected = model.detect(model(images))
            eager = decode_onnx_outputs([t.numpy() for t in module(images)], side)
        got = decode_onnx_outputs(session.run(None, {"images": images.numpy()}), side)
        assert sum(len(d.boxes) for d in expected) >= 50 * batch, "the test model must produce boxes to compare"
        for e, m, g in zip(expected, eager, got, strict=True):
            for d in (m, g):
                assert_same_detections(d.boxes, d.scores, e.boxes, e.scores, box_atol=1e-3, score_atol=1e-4)
                torch.testing.assert_close(d.class_probs, e.class_probs, rtol=1e-4, atol=1e-6)


def test_a_postprocessed_graph_refuses_decoding_overrides_and_old_opsets(run_dir, detector_graph, tmp_path,
                                                                         capsys):
    path, side = detector_graph
    with pytest.raises(ConfigError, match="this graph decodes itself"):
        run_onnx(path, _images(1).numpy(), score_thresh=0.3)
    out, _ = run_dir
    code = main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--with-postprocess", "--opset", "17"])
    assert_one_line_error(code, capsys.readouterr().err, "export",
                          r"post-processing in the graph needs opset 18 or newer")
    code = main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--nms-iou", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "export", r"NMS IoU must be above 0")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the reference decoder vs predict
REFERENCE = Path(onnx_reference.__file__)
#: What the reference decoder may import: numpy, onnxruntime, pydicom and OpenCV (DICOM pixels), the stdlib.
REFERENCE_IMPORTS = {"__future__", "json", "math", "sys", "dataclasses", "pathlib", "typing", "numpy",
                     "onnxruntime", "pydicom", "cv2"}


def test_the_reference_decoder_imports_neither_torch_nor_pneumodet():
    tree = ast.parse(REFERENCE.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= REFERENCE_IMPORTS, imported - REFERENCE_IMPORTS


def test_the_reference_reader_gives_pneumodets_pixels_for_every_dicom_variant(real_sample, tmp_path):
    """Decoder (Pillow first for JPEG), VOI LUT, window, min-max, MONOCHROME1, colour: the same uint8 image."""
    files = sorted((real_sample / "stage_2_train_images").glob("*.dcm"))
    assert len(files) == 16
    for path in [*files, *dicom_cases(tmp_path).values()]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pneumodet's notes (first frame of many, ...): not compared here
            expected, _ = read_dicom(path)
        got = onnx_reference.read_grey(path)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), path.name


@pytest.fixture(scope="module")
def real_predictions(run_dir, real_sample, tmp_path_factory):
    """``pneumodet predict --precision fp32 --json`` of the 16 real DICOMs with the run's model: its JSON."""
    out, _ = run_dir
    folder = tmp_path_factory.mktemp("predict_real")
    code = main(["predict", str(out), str(real_sample / "stage_2_train_images"), "--out", str(folder / "sub.csv"),
                 "--json", str(folder / "pred.json"), "--precision", "fp32", "--threshold", str(REAL_THRESHOLD)])
    assert code == 0
    return json.loads((folder / "pred.json").read_text())


#: A threshold inside the test model's score range on the real images, so that it cuts.
REAL_THRESHOLD = 0.64


def _expected(image: dict) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array([[s, *b] for s, b in zip(image["scores"], image["boxes"], strict=True)]).reshape(-1, 5)
    return kaggle_to_xyxy(rows)


def test_the_reference_decoder_and_the_postprocessed_graph_give_predicts_boxes_on_real_dicoms(
        run_dir, exported, detector_graph, real_predictions):
    """DICOM -> reference reader -> area resize -> onnxruntime -> decoding (numpy, or in the graph) -> original
    pixels -> threshold: predict's boxes within 0.5 px and scores within 1e-4, its class probabilities."""
    images = real_predictions["images"]
    assert len(images) == 16
    total, cut = 0, 0
    for graph in (exported.path, detector_graph[0]):
        detector = onnx_reference.Detector(graph)
        for image in images:
            got = detector.predict_dicom(image["source"], threshold=REAL_THRESHOLD)
            want_boxes, want_scores = _expected(image)
            assert list(got.original_size) == image["original_size"]
            assert_same_detections(got.boxes, got.scores, want_boxes, want_scores, box_atol=0.5, score_atol=1e-4)
            if len(got.scores) == len(want_scores):  # the JSON rounds scores to 5 decimals
                np.testing.assert_allclose(np.sort(got.scores), np.sort(want_scores), atol=1e-5)
            np.testing.assert_allclose(got.class_probs, list(image["class_probs"].values()), atol=2e-5)
            total += len(want_scores)
            cut += len(detector.detect(onnx_reference.prepare(onnx_reference.read_grey(image["source"]),
                                                               SIZE)[None])[0].scores) - len(want_scores)
    assert total > 16 and cut > 16, "the threshold must keep some boxes and cut others"


def test_the_reference_decoder_runs_alone_without_torch_or_pneumodet(exported, real_predictions, tmp_path):
    """Copied elsewhere and run as a script where importing torch or pneumodet fails: predict's boxes."""
    copy = tmp_path / "onnx_reference.py"
    copy.write_text(REFERENCE.read_text(encoding="utf-8"), encoding="utf-8")
    image = max(real_predictions["images"], key=lambda i: len(i["scores"]))
    code = ("import runpy, sys\n"
            "for name in ('torch', 'torchvision', 'pneumodet'): sys.modules[name] = None\n"
            f"sys.argv = ['onnx_reference.py', {str(exported.path)!r}, {image['source']!r}]\n"
            "runpy.run_path('onnx_reference.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    printed = json.loads(line)
    # the script applies the run's threshold (0.4): every box predict kept at REAL_THRESHOLD is among them
    want_boxes, want_scores = _expected(image)
    got_boxes, got_scores = np.array(printed["boxes"]).reshape(-1, 4), np.array(printed["scores"])
    kept = got_scores >= REAL_THRESHOLD
    assert_same_detections(got_boxes[kept], got_scores[kept], want_boxes, want_scores, box_atol=0.5,
                           score_atol=1e-4)


def test_without_onnxscript_the_dynamo_export_is_one_line_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    """onnxscript is not a runtime dependency of pneumodet: opsets 18+ say what to install, or to use 11 to 17."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxscript" else real(name, *args))
    out, _ = run_dir
    code = main(["export", str(out), "--onnx", str(tmp_path / "m.onnx")])
    assert_one_line_error(code, capsys.readouterr().err, "export",
                          r"ONNX opset 18 is written by the dynamo exporter, which needs onnxscript "
                          r"\(pip install onnxscript\); opsets 11 to 17 need only torch")
    assert list(tmp_path.iterdir()) == []
