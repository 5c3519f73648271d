"""Held-out evaluation of a training run: ``pneumodet evaluate RUN_DIR [--split test]``.

The confidence threshold is the one chosen on validation during training (stored in
``best_model.pt``); the test set is never used to choose anything. The metric-vs-threshold curve on
the evaluated split is drawn for information only, with the chosen threshold marked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumodet.boxes import kaggle_rows, xyxy_to_xywh
from pneumodet.config import TrainConfig
from pneumodet.data.preprocess import to_unit_range
from pneumodet.data.records import CLASS_INDEX, CLASS_NAMES, CLASS_SHORT_NAMES
from pneumodet.data.split import split_fingerprint
from pneumodet.errors import CheckpointError, ConfigError, PneumodetError, RunError
from pneumodet.inference.engine import Predictor, RawPrediction, check_options
from pneumodet.inference.options import PredictOptions
from pneumodet.metrics import rsna_map, sweep_thresholds
from pneumodet.model.checkpoint import load_checkpoint
from pneumodet.rundir import RunDir
from pneumodet.safeio import atomic_path, json_safe, write_json
from pneumodet.training import build_datamodule

#: Sets that can be evaluated (the training set is augmented, so it is not one of them).
SPLITS = ("val", "test")
#: The metrics file in the evaluation folder.
METRICS_FILE = "metrics.json"


@dataclass
class BatchOutput:
    """One batch through the predictor: boxes (xyxy, input frame) and scores per image, class probabilities."""

    batch: dict[str, Any]
    predictions: list[RawPrediction]
    class_probs: np.ndarray  # [B, C]


def run_batches(predictor: Predictor, loader: Iterable[dict[str, Any]]) -> Iterator[BatchOutput]:
    """Run a :class:`~pneumodet.inference.engine.Predictor` over collated batches (``images`` uint8
    ``[B,1,S,S]``, :func:`~pneumodet.data.dataset.collate_detection`): the same precision, TTA and gating
    as ``predict``."""
    for batch in loader:
        predictions = predictor(to_unit_range(batch["images"]))
        probs = np.stack([p.class_probs.numpy() for p in predictions])
        yield BatchOutput(batch=batch, predictions=predictions, class_probs=probs)


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN with a single class."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n, n]`` counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(true) * n_classes + np.asarray(pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def evaluate(run_dir: Path, *, split: str = "test", out_dir: Path | None = None,
             options: PredictOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Score a run's best model on ``split`` and write ``metrics.json`` and plots to
    ``RUN_DIR/eval_<split>/`` (or ``out_dir``).

    Args:
        options: how the images are predicted, as by ``predict`` (:class:`PredictOptions`: TTA and its
            merge, gating, batch size, precision, device, data-loading workers, compilation); ``overrides``
            replace single fields, e.g. ``evaluate(run, batch_size=4)``. No threshold: the run's own,
            chosen on validation, is the one scored.

    Returns:
        The metrics as written to ``metrics.json`` (strict JSON: an undefined value, e.g. the AUC of a
        set with one class, is ``None``); ``out_dir`` says where they went.

    Raises:
        ConfigError: an unusable option (checked before the run is loaded).
        PneumodetError: nothing could be scored (no image, or no image with a ground-truth or a
            predicted box: the RSNA metric is undefined); nothing is written then.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    options = PredictOptions.of(options, **overrides)
    if options.threshold is not None:
        raise ConfigError(f"evaluate scores at the threshold the run chose on validation, not at a given one "
                          f"({options.threshold})")
    check_options(options)
    run_dir = Path(run_dir)
    model, extra, config = load_run(run_dir)
    threshold = float(extra.get("threshold", math.nan))
    if not 0.0 <= threshold <= 1.0:  # also NaN, as when the checkpoint records none
        raise CheckpointError(f"{RunDir(run_dir).best_model}: records no usable validation threshold "
                              f"({extra.get('threshold')!r})")
    loader = split_loader(config, split, batch_size=options.batch_size, num_workers=options.workers)
    # config.image_size: the frame of the loader's images, in which the predictor mirrors for TTA
    predictor = Predictor.from_options(model, config.image_size, options, num_images=len(loader.dataset))

    gt: dict[str, np.ndarray] = {}
    preds: dict[str, np.ndarray] = {}
    true_class: list[int] = []
    probs: list[np.ndarray] = []
    for out in run_batches(predictor, loader):
        batch = out.batch
        boxes = batch["boxes"].float().numpy()
        for i, pid in enumerate(batch["patient_ids"]):
            gt[pid] = xyxy_to_xywh(boxes[i, : int(batch["num_boxes"][i])])
            preds[pid] = kaggle_rows(out.predictions[i].boxes, out.predictions[i].scores)
        true_class.extend(batch["classes"].tolist())
        probs.append(out.class_probs)

    kept = {pid: p[p[:, 0] >= threshold] for pid, p in preds.items()}
    result = rsna_map(gt, kept)
    if result.n_images == 0:
        raise PneumodetError(_nothing_scored(split, len(gt), threshold))
    class_probs = np.concatenate(probs) if probs else np.zeros((0, len(CLASS_NAMES)))
    true = np.asarray(true_class, dtype=np.int64)
    predicted = class_probs.argmax(axis=1) if len(class_probs) else np.zeros(0, np.int64)
    opacity = CLASS_INDEX["Lung Opacity"]
    curve = _threshold_curve(gt, preds)
    metrics = {
        "run": str(run_dir), "split": split, "images": len(gt), "precision": predictor.precision,
        "compiled": predictor.compiled,
        "tta": options.tta, "tta_merge": options.tta_merge if options.tta else None, "gate": options.gate,
        # the resolved NMS IoU, boxes per image and candidate score (given, else the model's own)
        "postprocess": dict(predictor.postprocess),
        "threshold": threshold, "threshold_source": "chosen on the validation set during training",
        "rsna_map": result.score, "rsna_map_per_iou_threshold": result.to_dict()["per_threshold"],
        "images_scored": result.n_images, "images_excluded": result.n_excluded,
        "global_class": {
            "classes": list(CLASS_NAMES),
            "accuracy": float((predicted == true).mean()) if len(true) else float("nan"),
            "confusion_matrix": confusion_matrix(true, predicted, len(CLASS_NAMES)).tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class",
            "pneumonia_auc": binary_auc(true == opacity, class_probs[:, opacity]) if len(true) else float("nan"),
        },
        "metric_vs_threshold_for_information": curve,
    }
    out = Path(out_dir) if out_dir else RunDir(run_dir).eval_dir(split)
    metrics = json_safe({**metrics, "out_dir": str(out)})  # NaN -> None: what is returned is what is written
    write_json(out / METRICS_FILE, metrics)
    _plot_evaluation(metrics, out)
    return metrics


def _nothing_scored(split: str, images: int, threshold: float) -> str:
    if not images:
        return f"nothing could be scored: the {split} set holds no image; nothing written"
    return (f"nothing could be scored: none of the {images} {split} image(s) has a ground-truth box or a box "
            f"predicted at threshold {threshold:.2f}, and the RSNA metric skips such images; nothing written")


def format_metric(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when it is undefined (``None`` or NaN)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _threshold_curve(gt: dict[str, np.ndarray], preds: dict[str, np.ndarray]) -> list[list[float]]:
    try:
        return [[t, s] for t, s in sweep_thresholds(gt, preds).table]
    except ValueError:
        return []


def load_run(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], TrainConfig]:
    """The best model of a run, its stored extras (validation threshold) and its training config.

    The config's data paths are checked first: they must be absolute (a relative path would mean another
    folder from another working directory), exist, and the split must be the one trained on (its
    fingerprint, recorded by ``train``). The config is checked before the model is built.
    """
    run = RunDir(Path(run_dir))
    for needed in (run.config, run.best_model):
        if not needed.exists():
            raise RunError(f"{run.root} is not a finished training run: {needed.name} is missing")
    config = TrainConfig.from_yaml(run.config)
    check_run_sources(config, run)
    model, extra = load_checkpoint(run.best_model)
    return model, extra, config


def check_run_sources(config: TrainConfig, run: RunDir) -> None:
    """:class:`RunError` unless the run's data and split folders are where, and what, training used."""
    for key in ("data_dir", "split_dir"):
        value = getattr(config, key)
        if not value or not Path(value).is_absolute():
            raise RunError(f"{run.config}: {key} {value!r} is not an absolute path, so it would be read from "
                           "the current directory; set it to the folder the run was trained on")
        if not Path(value).is_dir():
            raise RunError(f"{run.config}: {key} {value} does not exist (moved or deleted?); "
                           f"set {key} in {run.config.name} to where it is now")
    if config.split_fingerprint and split_fingerprint(Path(config.split_dir)) != config.split_fingerprint:
        raise RunError(f"{config.split_dir}: the split has changed since {run.root} was trained on it "
                       f"(fingerprint recorded in {run.config.name}); its scores would not be comparable")


def split_loader(config: TrainConfig, split: str, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An unshuffled, resize-only loader over one set of the run's split (images from its cache)."""
    cfg = TrainConfig.from_dict({**config.to_dict(), "batch_size": batch_size, "num_workers": num_workers})
    datamodule = build_datamodule(cfg, progress=False)
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()


def _plot_evaluation(metrics: dict[str, Any], out: Path) -> None:
    import matplotlib  # here: plotting is the last step, and only evaluate's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = np.asarray(metrics["metric_vs_threshold_for_information"], dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(curve):
        ax.plot(curve[:, 0], curve[:, 1], marker=".", label=f"{metrics['split']} set")
    ax.axvline(metrics["threshold"], color="tab:red", linestyle="--",
               label=f"threshold chosen on validation ({metrics['threshold']:.2f})")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("RSNA mAP")
    ax.set_title(f"RSNA mAP vs confidence threshold ({metrics['split']}, for information)")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, out / "metric_vs_threshold.png")

    cm = np.asarray(metrics["global_class"]["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(cm, cmap="Blues")
    names = [CLASS_SHORT_NAMES[name] for name in metrics["global_class"]["classes"]]
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xlabel("predicted class (global head)")
    ax.set_ylabel("true class")
    ax.set_title(f"Global class confusion ({metrics['split']}), accuracy "
                 f"{format_metric(metrics['global_class']['accuracy'])}")
    fig.tight_layout()
    _save_figure(fig, out / "confusion_matrix.png")


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:  # the temporary name has no .png: say the format
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
