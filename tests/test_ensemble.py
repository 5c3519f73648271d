"""Ensembles: several models' boxes fused by weighted box fusion (``predict``/``evaluate`` with ``--ensemble``).

The models are not trained (random resnet18s, ``_helpers.make_run``): what is tested is how their outputs
are fused, which threshold is used and what is refused, not how good they are. The fusion itself is
checked against the ``ensemble-boxes`` package (Solovyev's reference implementation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_one_line_error, make_run
from badinputs import small_patients
from pneumodet.cli import main

#: the normal patients' images are flat on purpose (badinputs.write_dataset)
pytestmark = pytest.mark.filterwarnings("ignore:.*the decoded image is constant:UserWarning")

SIZE = 64
#: every candidate box of a random model kept (it scores ~0.01), a few per image: something to fuse
LOOSE = {"min_score": 0.0, "max_detections": 12, "precision": "fp32", "device": "cpu", "compile": False}
LOOSE_ARGS = ["--min-score", "0", "--max-det", "12", "--precision", "fp32", "--no-compile"]


def _sibling_run(run: Path, name: str, *, seed: int, size: int = SIZE) -> Path:
    """Another random model beside ``run``, trained (as far as its config says) on the same data and split."""
    from pneumodet.config import TrainConfig
    from pneumodet.model import ModelConfig, build_model, save_checkpoint
    from pneumodet.rundir import RunDir

    other = RunDir(run.parent / name)
    torch.manual_seed(seed)
    save_checkpoint(other.best_model, build_model(ModelConfig(encoder="resnet18", image_size=size)),
                    extra={"threshold": 0.5, "image_size": size})
    config = TrainConfig.from_yaml(RunDir(run).config)
    config = TrainConfig.from_dict({**config.to_dict(), "out_dir": str(other.root),
                                    "model": {**config.to_dict()["model"], "image_size": size}})
    config.to_yaml(other.config)
    return other.root


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two random models on one dataset and split, and the dataset's images folder."""
    root = tmp_path_factory.mktemp("ensemble")
    run_a = make_run(root, small_patients(12), threshold=0.5, size=SIZE)
    return run_a, _sibling_run(run_a, "run_b", seed=1), root / "data" / "stage_2_train_images"


def _predictors(*runs: Path, **options):
    from pneumodet.inference.engine import Predictor, load_for_inference

    return [Predictor(load_for_inference(run)[0], SIZE, **{**LOOSE, **options}) for run in runs]


@pytest.mark.parametrize("tta", [None, "hflip"])
def test_ensemble_boxes_are_the_fusion_of_each_models_views(two_runs, tta) -> None:
    """Two models (with TTA: 2 x 2 views) fused in one weighted box fusion; probabilities averaged."""
    from pneumodet.inference.engine import EnsemblePredictor
    from pneumodet.inference.tta import weighted_boxes_fusion

    run_a, run_b, _ = two_runs
    members = _predictors(run_a, run_b, tta=tta)
    ensemble = EnsemblePredictor(members)
    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    got = ensemble(images)
    views = [m.views(images) for m in members]
    for i, fused in enumerate(got):
        boxes = [b for member in views for b in member[i].boxes]
        scores = [s for member in views for s in member[i].scores]
        assert len(boxes) == (4 if tta else 2) and all(len(b) for b in boxes)
        want_boxes, want_scores = weighted_boxes_fusion(boxes, scores, iou_thresh=0.55)
        torch.testing.assert_close(fused.boxes, want_boxes[:LOOSE["max_detections"]])
        torch.testing.assert_close(fused.scores, want_scores[:LOOSE["max_detections"]])
        probs = torch.stack([p for member in views for p in member[i].probs]).mean(0)
        torch.testing.assert_close(fused.class_probs, probs)


@pytest.mark.parametrize("options", [{}, {"tta": "hflip"}, {"tta": "hflip", "gate": True}, {"tta_merge": "nms",
                                                                                             "tta": "hflip"}])
def test_a_one_model_ensemble_is_the_model(two_runs, options) -> None:
    from pneumodet.inference.engine import EnsemblePredictor

    plain, = _predictors(two_runs[0], **options)
    alone = EnsemblePredictor([plain], merge=plain.tta_merge, gate=plain.gate)
    plain.gate = False  # inside an ensemble the member is ungated; the ensemble gates the fused scores
    reference, = _predictors(two_runs[0], **options)
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for got, want in zip(alone(images), reference(images), strict=True):
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)
        assert torch.equal(got.class_probs, want.class_probs)


def test_predict_ensemble_through_the_cli(two_runs, tmp_path, capsys) -> None:
    """``predict RUN --ensemble RUN2``: the library's ensemble prediction, written; without ``--threshold``
    the threshold is chosen for the ensemble on the runs' shared validation set, and said."""
    from pneumodet.inference import predict

    run_a, run_b, images = two_runs
    out = tmp_path / "sub.csv"
    code = main(["predict", str(run_a), str(images), "--ensemble", str(run_b), "--out", str(out), "--json",
                 str(tmp_path / "p.json"), "--threshold", "0", *LOOSE_ARGS])
    assert code == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "p.json").read_text())
    library = predict([run_a, run_b], [images], threshold=0.0, progress=False, **LOOSE)
    assert len(written["images"]) == len(library.predictions) == 12
    by_source = {Path(p.source).name: p for p in library.predictions.values()}
    for image in written["images"]:
        want = by_source[Path(image["source"]).name].boxes
        assert len(want) == len(image["boxes"]) > 0
        np.testing.assert_allclose(np.asarray(image["boxes"]), want[:, 1:], atol=0.006)
        np.testing.assert_allclose(image["scores"], want[:, 0], atol=1e-5)
    # no threshold given: chosen on the shared validation patients, and said where it came from
    capsys.readouterr()
    assert main(["predict", str(run_a), str(images), "--ensemble", str(run_b), "--out", str(out),
                 *LOOSE_ARGS]) == 0
    err = capsys.readouterr().err
    assert "ensemble of 2 sources: threshold " in err and "chosen for the ensemble on its runs' shared validation" in err


def test_evaluate_an_ensemble_records_its_members_and_threshold_source(two_runs, tmp_path, capsys) -> None:
    run_a, run_b, _ = two_runs
    code = main(["evaluate", str(run_a), "--ensemble", str(run_b), "--batch-size", "4", *LOOSE_ARGS])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", r"no folder of its own.*--out")
    code = main(["evaluate", str(run_a), "--ensemble", str(run_b), "--batch-size", "4", "--out",
                 str(tmp_path / "eval"), *LOOSE_ARGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["members"] == [str(run_a), str(run_b)]
    assert metrics["threshold_source"].startswith("chosen for the ensemble on its runs' shared validation set")
    assert "chosen for the ensemble" in captured.out


def test_mismatched_or_repeated_models_are_refused_in_one_line(two_runs, tmp_path, capsys) -> None:
    run_a, run_b, images = two_runs
    big = _sibling_run(run_a, "run_96", seed=2, size=96)
    args = ["predict", str(run_a), str(images), "--out", str(tmp_path / "s.csv"), "--threshold", "0.5"]
    try:
        code = main([*args, "--ensemble", str(big)])
        assert_one_line_error(code, capsys.readouterr().err, "predict",
                              r"different input sizes \(.*/run 64 px, .*/run_96 96 px\); fuse models trained at one "
                              r"image size")
        code = main([*args, "--ensemble", str(run_a)])
        assert_one_line_error(code, capsys.readouterr().err, "predict", r"the same model as .*/run; an ensemble "
                                                                        r"takes each model once")
        code = main([*args, "--ensemble", str(run_b), "--dicom-out", str(tmp_path / "sr")])
        assert_one_line_error(code, capsys.readouterr().err, "predict", r"--dicom-out .* not available for an "
                                                                        r"ensemble")
    finally:
        shutil.rmtree(big)
    assert not (tmp_path / "s.csv").exists()


def test_an_ensemble_of_runs_holding_out_other_patients_is_refused(two_runs, tmp_path, capsys) -> None:
    """Scoring on patients one member trained on would flatter the ensemble: refused, in one line."""
    others = [("q" + pid[1:], boxes) for pid, boxes in small_patients(12, seed=5)]  # other patients
    other = make_run(tmp_path, others, threshold=0.5, size=SIZE)
    code = main(["evaluate", str(two_runs[0]), "--ensemble", str(other), "--out", str(tmp_path / "e")])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", r"hold out different test patients")


# ------------------------------------------------------------------ the fusion against ensemble-boxes
def _ensemble_boxes_wbf(boxes, scores, *, iou_thr: float, size: float):
    """ensemble_boxes' WBF on the same inputs: coordinates normalised to [0, 1], one label, equal weights,
    ``conf_type="avg"`` (the mean score of a cluster times min(views, n) / views: pneumodet's rule)."""
    from ensemble_boxes import weighted_boxes_fusion as peer

    fused, fused_scores, _ = peer([(np.asarray(b, np.float64) / size).tolist() for b in boxes],
                                  [np.asarray(s, np.float64).tolist() for s in scores],
                                  [[0] * len(s) for s in scores], iou_thr=iou_thr, skip_box_thr=0.0,
                                  conf_type="avg")
    return fused * size, fused_scores


def test_weighted_boxes_fusion_equals_ensemble_boxes_on_fixed_inputs() -> None:
    """Three views of one image (two overlapping objects, a lone box, a view that misses one object):
    same boxes and scores as the reference implementation, up to float32 rounding."""
    from pneumodet.inference.tta import weighted_boxes_fusion

    size = 1024.0
    views = [
        ([[100, 100, 300, 300], [600, 600, 800, 900], [10, 900, 60, 990]], [0.9, 0.6, 0.3]),
        ([[110, 95, 310, 290], [590, 610, 790, 880]], [0.8, 0.7]),
        ([[90, 105, 295, 310]], [0.4]),
    ]
    boxes = [torch.tensor(b, dtype=torch.float32) for b, _ in views]
    scores = [torch.tensor(s, dtype=torch.float32) for _, s in views]
    got_boxes, got_scores = weighted_boxes_fusion(boxes, scores, iou_thresh=0.55)
    want_boxes, want_scores = _ensemble_boxes_wbf([b for b, _ in views], [s for _, s in views], iou_thr=0.55,
                                                  size=size)
    assert len(got_boxes) == len(want_boxes) == 3
    np.testing.assert_allclose(got_boxes.numpy(), want_boxes, atol=1e-3)
    np.testing.assert_allclose(got_scores.numpy(), want_scores, atol=1e-6)
    # hand-checked: the first object is seen by all 3 views, mean score (0.9 + 0.8 + 0.4) / 3
    assert got_scores[0].item() == pytest.approx(0.7, abs=1e-6)
    x1 = (0.9 * 100 + 0.8 * 110 + 0.4 * 90) / 2.1
    assert got_boxes[0, 0].item() == pytest.approx(x1, abs=1e-3)
    # the lone box of one view in three keeps a third of its score
    assert got_scores[-1].item() == pytest.approx(0.3 / 3, abs=1e-6)


def test_weighted_boxes_fusion_equals_ensemble_boxes_on_random_views() -> None:
    """Random clustered views (distinct scores: the order of equal scores is either library's choice)."""
    from pneumodet.inference.tta import weighted_boxes_fusion

    rng = np.random.default_rng(0)
    size = 512.0
    centres = rng.uniform(60, 450, size=(6, 2))
    boxes, scores = [], []
    for _ in range(4):
        jitter = centres + rng.normal(0, 4, size=centres.shape)
        half = rng.uniform(30, 50, size=centres.shape)
        boxes.append(np.concatenate([jitter - half, jitter + half], axis=1).clip(0, size))
        scores.append(rng.uniform(0.05, 1.0, size=len(centres)))
    got_boxes, got_scores = weighted_boxes_fusion([torch.tensor(b, dtype=torch.float32) for b in boxes],
                                                  [torch.tensor(s, dtype=torch.float32) for s in scores])
    want_boxes, want_scores = _ensemble_boxes_wbf(boxes, scores, iou_thr=0.55, size=size)
    assert len(got_boxes) == len(want_boxes)
    np.testing.assert_allclose(got_boxes.numpy(), want_boxes, atol=2e-3)
    np.testing.assert_allclose(got_scores.numpy(), want_scores, atol=1e-6)
