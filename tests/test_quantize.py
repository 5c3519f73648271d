"""int8 on the CPU as a user meets it: ``pneumodet quantize RUN``, then ``predict``/``evaluate`` with
``--precision int8`` or by default (``auto``); stale, missing and altered graphs; what is refused.

The run is not trained (``_helpers.make_run`` with a random resnet18 whose scores spread around 0.5): what is
tested is that the int8 graph is made from the run's model, checked against it and runs in its place, not how
good it is. The int8 route is measured by ``benchmarks/bench_int8.py`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_one_line_error, make_run, spread_model
from badinputs import small_patients
from pneumodet.cli import main
from pneumodet.hardware import resolve_precision
from pneumodet.inference.export import onnx_side_file
from pneumodet.rundir import RunDir
from pneumodet.safeio import file_sha256

#: the normal patients' images are flat on purpose (badinputs.write_dataset)
pytestmark = pytest.mark.filterwarnings("ignore:.*the decoded image is constant:UserWarning")

SIZE = 64
THRESHOLD = 0.3
#: what ``auto`` is on this machine without an int8 graph
NATIVE = resolve_precision(None, "cpu")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run quantised once by ``pneumodet quantize`` on 4 training images; and what the command printed."""
    pytest.importorskip("onnxruntime")
    from pneumodet.model import save_checkpoint

    root = tmp_path_factory.mktemp("int8")
    run = make_run(root, small_patients(12), threshold=THRESHOLD, size=SIZE)
    save_checkpoint(RunDir(run).best_model, spread_model(SIZE), extra={"threshold": THRESHOLD, "image_size": SIZE})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["quantize", str(run), "--calibration", "4"])
    assert code == 0, err.getvalue()
    return run, out.getvalue() + err.getvalue()


def _images(run: Path) -> Path:
    """The images of the run's data (a copy of the run folder points at the same)."""
    from pneumodet.config import TrainConfig

    return Path(TrainConfig.from_yaml(RunDir(run).config, stored_run=True).data_dir) / "stage_2_train_images"


def _copy(run: Path, folder: Path, *, int8: bool = True) -> Path:
    """A copy of the run folder (its config still points at the run's data and split), with or without its
    int8 graph."""
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("eval_*"))
    if not int8:
        RunDir(folder).int8_model.unlink()
        RunDir(folder).int8_side.unlink()
    return folder


def _predict(run: Path, out: Path, *options: str, models: tuple[Path, ...] = ()) -> int:
    extra = [arg for model in models for arg in ("--ensemble", str(model))]
    return main(["predict", str(run), str(_images(run)), "--out", str(out / "submission.csv"), "--json",
                 str(out / "predictions.json"), "--threshold", str(THRESHOLD), *extra, *options])


def _json(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


def test_quantize_writes_the_int8_graph_into_the_run_and_says_what_it_did(quantized) -> None:
    run, printed = quantized
    folder = RunDir(run)
    assert folder.int8_side == onnx_side_file(folder.int8_model)  # the run folder's name is the side file's
    assert folder.int8_model.is_file() and folder.int8_side.is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # written atomically: no temporary file left
    made = json.loads(folder.int8_side.read_text())["quantization"]
    assert made["calibration_images"] == 4 and made["weights"] == "int8 per channel"
    assert made["model_sha256"] == file_sha256(folder.best_model)
    assert made["graph_sha256"] == file_sha256(folder.int8_model)
    assert "calibrating on 4 of the 6 training images" in printed
    assert f"calibrated on 4 of the 6 training images of {run}" in printed and " s; wrote " in printed
    assert str(folder.int8_model) in printed
    # the graph is checked against the float network on the validation set, and the check recorded
    check = json.loads(folder.int8_side.read_text())["validation"]
    assert check["split"] == "val" and check["images"] == 3 and check["threshold"] == THRESHOLD
    assert check["reference_precision"] == NATIVE and check["tolerance"] == 0.01
    both = (check["int8_rsna_map"], check["reference_rsna_map"])
    agree = both == (None, None) or abs(both[0] - both[1]) <= 0.01
    assert check["within_tolerance"] is agree
    assert "validation RSNA mAP " in printed and f"in {NATIVE} (3 images, threshold {THRESHOLD:.2f})" in printed


def test_auto_passes_over_a_graph_that_moved_the_validation_map(quantized, tmp_path, capsys) -> None:
    """A weak model's boxes cluster at its threshold, where int8's small changes move them across it: when
    the graph's validation mAP is off the float network's by more than 0.01, ``--precision auto`` runs the
    float network and says why; ``--precision int8`` still runs the graph."""
    run = _copy(quantized[0], tmp_path / "run")
    side_file = RunDir(run).int8_side
    side = json.loads(side_file.read_text())
    side["validation"].update(reference_rsna_map=0.3886, int8_rsna_map=0.5088, within_tolerance=False)
    side_file.write_text(json.dumps(side))
    assert _predict(run, tmp_path) == 0
    captured = capsys.readouterr()
    assert f", {NATIVE})" in captured.out and _json(tmp_path)["precision"] == NATIVE
    assert (f"int8 graph not used by default: {RunDir(run).int8_model} moved the validation RSNA mAP from 0.3886 "
            f"({NATIVE}) to 0.5088, more than 0.01; --precision int8 runs it anyway") in captured.out
    assert _predict(run, tmp_path, "--precision", "int8") == 0
    assert _json(tmp_path)["precision"] == "int8"


def test_predict_int8_finds_the_boxes_fp32_finds(quantized, tmp_path, capsys) -> None:
    """Same images, same decoding: every int8 box is one of fp32's candidate boxes (within a pixel), its
    score within 0.02, and the class probabilities within 0.01. A random network's top boxes are near-ties,
    so which of them NMS and the top-k cut keep may differ: fp32 keeps every candidate (no NMS, no cut)."""
    run, _ = quantized
    (tmp_path / "int8").mkdir()
    (tmp_path / "fp32").mkdir()
    assert _predict(run, tmp_path / "int8", "--precision", "int8") == 0
    assert ", int8)" in capsys.readouterr().out
    assert _predict(run, tmp_path / "fp32", "--precision", "fp32", "--nms-iou", "1", "--max-det", "10000") == 0
    int8, fp32 = _json(tmp_path / "int8"), _json(tmp_path / "fp32")
    assert int8["precision"] == "int8" and fp32["precision"] == "fp32"
    reference = {image["sopInstanceUID"]: image for image in fp32["images"]}
    assert len(int8["images"]) == len(reference) == 12
    boxes = 0
    for image in int8["images"]:
        want = reference[image["sopInstanceUID"]]
        for name, p in image["class_probs"].items():
            assert abs(p - want["class_probs"][name]) <= 0.01
        candidates, scores = np.asarray(want["boxes"]).reshape(-1, 4), np.asarray(want["scores"])
        for box, score in zip(image["boxes"], image["scores"], strict=True):
            near = (np.abs(candidates - np.asarray(box)).max(axis=1) <= 1.0) & (np.abs(scores - score) <= 0.02)
            assert near.any(), (box, score)
            boxes += 1
    assert boxes >= 12  # the model finds something in every image: the comparison is not empty


def test_auto_precision_runs_a_current_int8_graph_and_says_so(quantized, tmp_path, capsys) -> None:
    run, _ = quantized
    assert _predict(run, tmp_path) == 0
    captured = capsys.readouterr()
    assert ", int8)" in captured.out and "warnings: 0" in captured.out
    assert _json(tmp_path)["precision"] == "int8"
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    assert "predicted in int8" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["precision"] == "int8" and metrics["compiled"] is False and "precision_notes" not in metrics


def test_a_replaced_best_model_makes_the_int8_graph_stale(quantized, tmp_path, capsys) -> None:
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    run = _copy(quantized[0], tmp_path / "run")
    torch.manual_seed(5)  # retrained, or another model copied over it
    save_checkpoint(RunDir(run).best_model, build_model(ModelConfig(encoder="resnet18", image_size=SIZE)),
                    extra={"threshold": THRESHOLD, "image_size": SIZE})
    code = _predict(run, tmp_path, "--precision", "int8")
    assert_one_line_error(code, capsys.readouterr().err, "predict", "best_model_int8.onnx is stale",
                          "made from another best_model.pt", f"run `pneumodet quantize {run}` again")
    assert not (tmp_path / "submission.csv").exists()
    code = main(["evaluate", str(run), "--precision", "int8", "--out", str(tmp_path / "eval")])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", "is stale", "pneumodet quantize")
    assert _predict(run, tmp_path) == 0  # auto: the stale graph is passed over, and the user told why
    captured = capsys.readouterr()
    assert f", {NATIVE})" in captured.out and "warning: int8 graph not used:" in captured.out
    assert "is stale" in captured.out
    assert _json(tmp_path)["precision"] == NATIVE
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert f"predicted in {NATIVE}" in captured.out and "note: int8 graph not used:" in captured.err


def test_a_run_without_int8_graph_says_how_to_make_one(quantized, tmp_path, capsys) -> None:
    run = _copy(quantized[0], tmp_path / "run", int8=False)
    code = _predict(run, tmp_path, "--precision", "int8")
    assert_one_line_error(code, capsys.readouterr().err, "predict", f"{run} holds no int8 graph",
                          "best_model_int8.onnx", f"make it with `pneumodet quantize {run}`")
    assert _predict(run, tmp_path) == 0  # auto without an int8 graph: as before int8 existed, nothing to say
    captured = capsys.readouterr()
    assert f", {NATIVE})" in captured.out and "warnings: 0" in captured.out


@pytest.mark.parametrize("damage", ["side file missing", "side file damaged", "graph replaced"])
def test_an_unfinished_or_altered_int8_graph_is_refused(quantized, tmp_path, capsys, damage: str) -> None:
    run = _copy(quantized[0], tmp_path / "run")
    folder = RunDir(run)
    if damage == "side file missing":  # what an interrupted quantize leaves: the side file goes first
        folder.int8_side.unlink()
        expected = "its side file best_model_int8.onnx.json is missing"
    elif damage == "side file damaged":
        folder.int8_side.write_text('{"quantization": ')
        expected = "best_model_int8.onnx.json: damaged"
    else:
        data = bytearray(folder.int8_model.read_bytes())
        data[-1] ^= 0xFF
        folder.int8_model.write_bytes(bytes(data))
        expected = "is not the graph its side file describes"
    code = _predict(run, tmp_path, "--precision", "int8")
    assert_one_line_error(code, capsys.readouterr().err, "predict", expected, "pneumodet quantize")


def test_int8_is_refused_on_a_gpu_and_for_a_checkpoint_file(quantized, tmp_path, capsys) -> None:
    """Checked before the model is read (``--device cuda`` on a machine without a GPU too: the precision
    and the device named disagree whatever the machine)."""
    run, _ = quantized
    code = _predict(run, tmp_path, "--precision", "int8", "--device", "cuda")
    assert_one_line_error(code, capsys.readouterr().err, "predict", "--precision int8 runs the run's int8 graph "
                          "on the CPU", "not on cuda", "pass --device cpu")
    code = main(["evaluate", str(run), "--precision", "int8", "--device", "cuda:0"])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", "on the CPU", "not on cuda:0")
    code = main(["predict", str(RunDir(run).best_model), str(_images(run)), "--out", str(tmp_path / "s.csv"),
                 "--precision", "int8"])
    assert_one_line_error(code, capsys.readouterr().err, "predict", "a checkpoint file has none",
                          "give its run folder")
    assert not (tmp_path / "s.csv").exists()


def test_an_ensemble_runs_int8_when_every_member_has_its_graph(quantized, tmp_path, capsys) -> None:
    run = quantized[0]
    with_graph = _copy(run, tmp_path / "with")
    without = _copy(run, tmp_path / "without", int8=False)
    assert _predict(run, tmp_path, "--precision", "int8", models=(with_graph,)) == 0
    assert ", int8)" in capsys.readouterr().out and _json(tmp_path)["precision"] == "int8"
    code = _predict(run, tmp_path, "--precision", "int8", models=(without,))
    assert_one_line_error(code, capsys.readouterr().err, "predict", f"{without} holds no int8 graph")
    assert _predict(run, tmp_path, models=(without,)) == 0  # auto: one precision for all, and why not int8
    captured = capsys.readouterr()
    assert f", {NATIVE})" in captured.out
    assert f"every member has its int8 graph, and {without} has none" in captured.out


def test_quantize_mistakes_are_one_line_and_write_nothing(quantized, tmp_path, capsys) -> None:
    from pneumodet.config import TrainConfig

    run = quantized[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["quantize", str(empty)])
    assert_one_line_error(code, capsys.readouterr().err, "quantize", "is not a finished training run",
                          "config.yaml is missing")
    code = main(["quantize", str(run), "--calibration", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "quantize", "calibration images must be a whole number "
                          "of at least 1, got 0")
    moved = _copy(run, tmp_path / "moved", int8=False)
    config = TrainConfig.from_yaml(RunDir(moved).config, stored_run=True).to_dict()
    TrainConfig.from_dict({**config, "data_dir": str(tmp_path / "gone")}).to_yaml(RunDir(moved).config)
    code = main(["quantize", str(moved)])
    assert_one_line_error(code, capsys.readouterr().err, "quantize", "data_dir", "does not exist",
                          "moved or deleted")
    assert not RunDir(moved).int8_model.exists()
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv.json").write_text('{"folds": 2}')
    code = main(["quantize", str(tmp_path / "cv")])
    assert_one_line_error(code, capsys.readouterr().err, "quantize", "a cross-validation folder",
                          f"pneumodet quantize {tmp_path / 'cv' / 'fold1'}")


def test_without_onnxruntime_int8_says_what_to_install_and_auto_goes_on(quantized, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    run = _copy(quantized[0], tmp_path / "run")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else find_spec(name, *args))
    code = main(["quantize", str(run)])
    assert_one_line_error(code, capsys.readouterr().err, "quantize", "needs onnxruntime, not installed",
                          r"pip install 'pneumodet\[deploy\]'")
    code = _predict(run, tmp_path, "--precision", "int8")
    assert_one_line_error(code, capsys.readouterr().err, "predict", "needs onnxruntime",
                          r"pip install 'pneumodet\[deploy\]'")
    assert _predict(run, tmp_path) == 0
    captured = capsys.readouterr()
    assert f", {NATIVE})" in captured.out and "not used: running the int8 graph needs onnxruntime" in captured.out
