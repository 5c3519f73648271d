"""Held-out evaluation of a training run: ``pneumodet evaluate RUN_DIR [--split test]``.

The confidence threshold is the one chosen on validation during training (stored in
``best_model.pt``); the test set is never used to choose anything. The metric-vs-threshold curve on
the evaluated split is drawn for information only, with the chosen threshold marked. Beside the RSNA
score, ``metrics.json`` and the figures hold what a radiologist reads (FROC, COCO AP, image-level ROC,
calibration, subgroups with bootstrap intervals: :mod:`pneumodet.clinical_metrics`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumodet.boxes import kaggle_rows, xyxy_to_xywh
from pneumodet.clinical_metrics import image_class_metrics, reader_metrics
from pneumodet.config import TrainConfig
from pneumodet.data.cache import ImageCache
from pneumodet.data.preprocess import to_unit_range
from pneumodet.data.records import CLASS_NAMES, CLASS_SHORT_NAMES, OPACITY_INDEX, gate_scores
from pneumodet.data.split import read_split, split_fingerprint
from pneumodet.errors import CheckpointError, ConfigError, PneumodetError, RunError
from pneumodet.inference.engine import (
    EnsemblePredictor,
    LoadedModels,
    Predictor,
    RawPrediction,
    check_options,
    expand_cv_folders,
    load_models,
    make_predictor,
)
from pneumodet.inference.options import PredictOptions
from pneumodet.metrics import rsna_map, sweep_thresholds
from pneumodet.model.checkpoint import load_checkpoint
from pneumodet.rundir import CvDir, RunDir
from pneumodet.safeio import atomic_path, json_safe, write_json
from pneumodet.textsafe import display_path
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
    runs = load_runs(run_dir, split=split)  # one run, or an ensemble (several runs, or a CV folder's folds)
    if runs.is_ensemble and out_dir is None and runs.cv_dir is None:
        raise ConfigError("an ensemble of separate runs has no folder of its own: say where its evaluation "
                          "goes (--out)")
    # recorded (the run's, the CV folder's out-of-fold), else chosen now on the shared validation set: an
    # ensemble of separate runs, or --gate on a run trained before a gated threshold was recorded
    threshold, threshold_source = validation_threshold(runs, options)
    run_dir = runs.label
    predicted = predict_split(runs, split, options)
    gt, preds, predictor = predicted.gt, predicted.preds, predicted.predictor

    kept = {pid: p[p[:, 0] >= threshold] for pid, p in preds.items()}
    result = rsna_map(gt, kept)
    if result.n_images == 0:
        raise PneumodetError(_nothing_scored(split, len(gt), threshold))
    class_probs = predicted.class_probs()
    true = np.asarray(predicted.true_class, dtype=np.int64)
    curve = _threshold_curve(gt, preds)
    metrics = {
        "run": str(run_dir), **({"members": [str(p) for p in runs.sources]} if runs.is_ensemble else {}),
        "split": split, "images": len(gt), "precision": predictor.precision,
        "compiled": predictor.compiled, **({"precision_notes": predictor.notes} if predictor.notes else {}),
        "tta": options.tta, "tta_merge": options.tta_merge if options.tta else None, "gate": options.gate,
        # the resolved NMS IoU, boxes per image and candidate score (given, else the model's own)
        "postprocess": dict(predictor.postprocess),
        "threshold": threshold, "threshold_source": threshold_source,
        "rsna_map": result.score, "rsna_map_per_iou_threshold": result.to_dict()["per_threshold"],
        "images_scored": result.n_images, "images_excluded": result.n_excluded,
        "global_class": image_class_metrics(true, class_probs, CLASS_NAMES, OPACITY_INDEX),
        "metric_vs_threshold_for_information": curve,
    }
    # FROC, image-level ROC, COCO AP, calibration, subgroups: every box proposed, not only the kept ones
    metrics.update(reader_metrics(gt, preds, threshold=threshold, true_class=true, class_probs=class_probs,
                                  positive=OPACITY_INDEX, fields=split_subgroup_fields(runs.configs[0], gt)))
    out = Path(out_dir) if out_dir else runs.eval_dir(split)
    metrics = json_safe({**metrics, "out_dir": str(out)})  # NaN -> None: what is returned is what is written
    write_json(out / METRICS_FILE, metrics)
    _plot_evaluation(metrics, out)
    return metrics


def split_subgroup_fields(config: TrainConfig, patient_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Per patient, the header fields of the subgroups (view position, sex, age in years) as the run's
    image cache keeps them (:meth:`~pneumodet.data.cache.ImageCache.subgroup_fields`). They go to
    :func:`~pneumodet.clinical_metrics.reader_metrics`, which writes only group counts and metrics."""
    cache = ImageCache.open(build_datamodule(config, progress=False).cache_dir)
    return [cache.subgroup_fields(pid) for pid in patient_ids]


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
    config = load_run_config(run)
    model, extra = load_checkpoint(run.best_model)
    return model, extra, config


def load_run_config(run: RunDir) -> TrainConfig:
    """A finished run's training config, its data and split checked (:func:`check_run_sources`)."""
    for needed in (run.config, run.best_model):
        if not needed.exists():
            raise RunError(f"{run.root} is not a finished training run: {needed.name} is missing")
    config = TrainConfig.from_yaml(run.config, stored_run=True)
    check_run_sources(config, run)
    return config


@dataclass(frozen=True)
class EvaluatedRuns:
    """The run(s) ``evaluate`` scores: one, or an ensemble (several runs, or a CV folder's fold runs).

    ``threshold`` is ``None`` for an ensemble of separate runs (:func:`validation_threshold` chooses it).
    """

    loaded: LoadedModels
    configs: list[TrainConfig]
    cv_dir: Path | None
    label: str

    @property
    def is_ensemble(self) -> bool:
        return self.loaded.is_ensemble

    @property
    def sources(self) -> list[Path]:
        return self.loaded.sources

    @property
    def threshold(self) -> float | None:
        return self.loaded.threshold

    @property
    def threshold_source(self) -> str:
        return self.loaded.threshold_source

    def eval_dir(self, split: str) -> Path:
        """Where an evaluation goes by default: the run's, the CV folder's ``eval_<split>``."""
        if self.cv_dir is not None:
            return CvDir(self.cv_dir).eval_dir(split)
        return RunDir(self.sources[0]).eval_dir(split)


def load_runs(sources: Path | str | Sequence[Path | str], *, split: str | None) -> EvaluatedRuns:
    """Load the run(s) to score on ``split``, every config checked before any model is built.

    An ensemble's members must hold out the same ``split`` patients (each member's split folder says which):
    then none of its models trained on the patients scored. A CV folder's folds share the test set but
    each validates on its own fold, so its validation result is the out-of-fold one in ``cv.json``.

    Raises:
        RunError: a source that is not a finished run (or CV folder), its data or split moved or changed.
        ConfigError: as :func:`~pneumodet.inference.engine.load_models`; members holding out different
            ``split`` patients.
        CheckpointError: a single run records no usable validation threshold.
    """
    given = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    paths, cv_summary = expand_cv_folders(given)
    configs = [load_run_config(RunDir(p)) for p in paths]
    cv_dir = Path(given[0]) if cv_summary is not None else None
    if len(paths) > 1 and split is not None:
        _check_shared_patients(paths, configs, split, cv_dir)
    loaded = load_models(paths if cv_dir is None else given)
    if not loaded.is_ensemble and not 0.0 <= (loaded.threshold if loaded.threshold is not None else -1) <= 1.0:
        raise CheckpointError(f"{RunDir(paths[0]).best_model}: records no usable validation threshold "
                              f"({loaded.extras[0].get('threshold')!r})")
    label = str(paths[0]) if len(paths) == 1 else str(cv_dir) if cv_dir is not None else " + ".join(map(str, paths))
    return EvaluatedRuns(loaded, configs, cv_dir, label)


def _check_shared_patients(paths: Sequence[Path], configs: Sequence[TrainConfig], split: str,
                           cv_dir: Path | None) -> None:
    """:class:`ConfigError` unless every member holds out the same ``split`` patients."""
    first = None
    for path, config in zip(paths, configs, strict=True):
        patients = frozenset(r.patient_id for r in read_split(Path(config.split_dir))[split])
        if first is None:
            first = (path, patients)
        elif patients != first[1]:
            hint = (" (a CV folder's folds each validate on their own fold: its validation result is the "
                    f"out-of-fold one in {CvDir(cv_dir).summary})" if cv_dir is not None and split == "val" else
                    "; an ensemble is scored only on patients none of its models trained on")
            raise ConfigError(f"the ensemble's runs hold out different {split} patients: {path} "
                              f"({len(patients)}) and {first[0]} ({len(first[1])}){hint}")


@dataclass
class SplitPredictions:
    """A split predicted: ground truth (xywh) and every predicted box (Kaggle rows, before the threshold)
    per patient, true classes, class probabilities per batch, and the predictor that ran."""

    gt: dict[str, np.ndarray]
    preds: dict[str, np.ndarray]
    true_class: list[int]
    probs: list[np.ndarray]
    predictor: Predictor | EnsemblePredictor

    def class_probs(self) -> np.ndarray:
        """The class probabilities of every patient, ``[N, C]`` in the order of ``preds``."""
        return np.concatenate(self.probs) if self.probs else np.zeros((0, len(CLASS_NAMES)))

    def gated(self) -> dict[str, np.ndarray]:
        """``preds`` with each patient's box scores gated (:func:`~pneumodet.data.records.gate_scores`) by its
        Lung-Opacity probability: what ``--gate`` would have kept, without predicting again. Only for
        predictions made without the gate (the probabilities follow the patients' order)."""
        out = {}
        for (pid, rows), p in zip(self.preds.items(), self.class_probs(), strict=True):
            rows = rows.copy()
            rows[:, 0] = gate_scores(rows[:, 0], p)
            out[pid] = rows
        return out


def predict_split(runs: EvaluatedRuns, split: str, options: PredictOptions) -> SplitPredictions:
    """Every image of ``split`` (of the first member's split folder: the members share its patients)
    through the run's predictor, or the ensemble's."""
    config = runs.configs[0]
    loader = split_loader(config, split, batch_size=options.batch_size, num_workers=options.workers)
    # config.image_size: the frame of the loader's images, in which the predictor mirrors for TTA
    predictor = make_predictor(runs.loaded.models, config.image_size, options, num_images=len(loader.dataset),
                               sources=runs.sources)  # where each run's int8 graph is
    out = SplitPredictions({}, {}, [], [], predictor)
    for batch_out in run_batches(predictor, loader):
        batch = batch_out.batch
        boxes = batch["boxes"].float().numpy()
        for i, pid in enumerate(batch["patient_ids"]):
            out.gt[pid] = xyxy_to_xywh(boxes[i, : int(batch["num_boxes"][i])])
            out.preds[pid] = kaggle_rows(batch_out.predictions[i].boxes, batch_out.predictions[i].scores)
        out.true_class.extend(batch["classes"].tolist())
        out.probs.append(batch_out.class_probs)
    return out


def validation_threshold(runs: EvaluatedRuns | Path | str | Sequence[Path | str],
                         options: PredictOptions | None = None) -> tuple[float, str]:
    """The confidence threshold for ``options`` and where it comes from: the one a run or CV folder recorded
    for plain or gated scores (``options.gate``); where none is recorded (an ensemble of separate runs, or
    the gate on a run trained before gated thresholds were recorded), the cut-off maximising the RSNA mAP
    (:func:`~pneumodet.metrics.sweep_thresholds`) of the model(s), with ``options`` (TTA, gating), on the
    validation patients the members share (never on test patients).

    Raises:
        ConfigError: the members validate on different patients (as :func:`load_runs`).
        PneumodetError: no validation image can be scored at any cut-off.
    """
    options = PredictOptions.of(options, threshold=None)
    if not isinstance(runs, EvaluatedRuns):
        runs = load_runs(runs, split=None)
    recorded, source = runs.loaded.threshold_for(options.gate)
    if recorded is not None:
        return recorded, source
    if runs.cv_dir is not None:  # its folds validate on different patients: only the out-of-fold pass can
        cv = display_path(runs.cv_dir)
        raise RunError(f"{display_path(CvDir(runs.cv_dir).summary)}: records no out-of-fold threshold for gated "
                       f"scores (written before they were recorded); run `pneumodet cv --out {cv}` again: it "
                       "skips the trained folds and records it")
    _check_shared_patients(runs.sources, runs.configs, "val", runs.cv_dir)
    val = predict_split(runs, "val", options)
    what = ("the ensemble" if runs.is_ensemble else "the run") + ("'s gated scores" if options.gate else "")
    try:
        sweep = sweep_thresholds(val.gt, val.preds)
    except ValueError as err:
        raise PneumodetError(f"cannot choose a threshold for {what} on validation: {err}") from None
    where = "its runs' shared validation set" if runs.is_ensemble else "its validation set"
    return sweep.best_threshold, (f"chosen for {what} on {where} now ({len(val.gt)} patients, RSNA mAP "
                                  f"{sweep.best_score:.4f})")


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

    from pneumodet.plotting import annotate_cells

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
    image = ax.imshow(cm, cmap="Blues")
    names = [CLASS_SHORT_NAMES[name] for name in metrics["global_class"]["classes"]]
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yticks(range(len(names)), names)
    annotate_cells(ax, image, cm)  # white on the dark cells, black on the light ones
    ax.set_xlabel("predicted class (global head)")
    ax.set_ylabel("true class")
    ax.set_title(f"Global class confusion ({metrics['split']}), accuracy "
                 f"{format_metric(metrics['global_class']['accuracy'])}")
    fig.tight_layout()
    _save_figure(fig, out / "confusion_matrix.png")
    _plot_reader_metrics(metrics, out, plt)


def _plot_reader_metrics(metrics: dict[str, Any], out: Path, plt: Any) -> None:
    """``froc.png``, ``roc.png``, ``reliability.png`` and ``subgroups.png``, from ``metrics.json``'s sections
    alone (what the figures show is what the file holds)."""
    split = metrics["split"]
    froc = metrics["froc"]
    curve = np.asarray(froc["curve_fp_per_image_sensitivity"], dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    if np.isfinite(curve[:, 1]).any():
        ax.step(curve[:, 0], curve[:, 1], where="post", label=f"{split} set, {froc['lesions']} lesions")
        rates = [_rate_value(key) for key in froc["sensitivity_at_fp_per_image"]]
        values = [np.nan if v is None else v for v in froc["sensitivity_at_fp_per_image"].values()]
        ax.plot(rates, values, "o", color="tab:red", label=f"mean {format_metric(froc['mean_sensitivity'])}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no lesion in this set: undefined", ha="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity (IoU >= 0.5)")
    ax.set_title(f"FROC ({split})")
    fig.tight_layout()
    _save_figure(fig, out / "froc.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    for key, name in (("best_box_score", "best box score"), ("global_head", "global head")):
        entry = metrics["image_roc"][key]
        roc = np.asarray(entry["curve_fpr_tpr"], dtype=np.float64).reshape(-1, 2)
        if len(roc):
            line, = ax.step(roc[:, 0], roc[:, 1], where="post",
                            label=f"{name}: AUC {format_metric(entry['auc'])}")
            point = entry["operating_point"]
            if point["sensitivity"] is not None and point["specificity"] is not None:
                ax.plot(1 - point["specificity"], point["sensitivity"], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"Image-level pneumonia ROC ({split}); dots: operating points")
    fig.tight_layout()
    _save_figure(fig, out / "roc.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, name in zip(axes, ("top_label", "pneumonia"), ("top-label confidence", "pneumonia probability"),
                             strict=True):
        entry = metrics["calibration"][key]
        bins = entry["reliability"]
        centres = [(b["range"][0] + b["range"][1]) / 2 for b in bins]
        observed = [np.nan if b["observed"] is None else b["observed"] for b in bins]
        ax.bar(centres, observed, width=1 / len(bins), edgecolor="black", alpha=0.7, label="observed")
        ax.plot([0, 1], [0, 1], "--", color="tab:red", label="perfect calibration")
        for c, b in zip(centres, bins, strict=True):
            ax.text(c, 0.02, str(b["count"]), ha="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{name} (bins; numbers: images)")
        ax.set_ylabel(entry["observed"])
        ax.set_title(f"{name}: ECE {format_metric(entry['ece'])}")
        ax.legend(loc="upper left")
    fig.suptitle(f"Reliability of the global head's probabilities ({split})")
    fig.tight_layout()
    _save_figure(fig, out / "reliability.png")

    _plot_subgroups(metrics, out, plt)


def _rate_value(key: str) -> float:
    """FROC rate keys (``'1/8'``, ``'2'``) back to numbers."""
    return 1.0 / float(key[2:]) if key.startswith("1/") else float(key)


def _plot_subgroups(metrics: dict[str, Any], out: Path, plt: Any) -> None:
    """``subgroups.png``: each group's metrics with their 95 % intervals (groups with metrics only)."""
    groups = metrics["subgroups"]
    rows = [("all", groups["all"])] + [(f"{attribute}: {name}", entry)
                                       for attribute in ("view_position", "sex", "age_band")
                                       for name, entry in groups[attribute].items()
                                       if entry["rsna_map"]["value"] is not None]
    names = list(groups["metrics"])
    fig, axes = plt.subplots(1, len(names), figsize=(10, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key in zip(axes, names, strict=True):
        for y, (_, entry) in enumerate(rows):
            value, ci = entry[key]["value"], entry[key]["ci95"]
            if value is None:
                continue
            if ci is not None:
                ax.plot(ci, [y, y], color="tab:blue")
            ax.plot(value, y, "o", color="tab:blue")
        ax.set_title(groups["metrics"][key], fontsize=9)
        ax.set_xlim(0, 1)
    axes[0].set_yticks(range(len(rows)), [f"{label} (n={entry['patients']})" for label, entry in rows])
    axes[0].invert_yaxis()
    fig.suptitle(f"Subgroups ({metrics['split']}): value and 95% bootstrap interval over patients")
    fig.tight_layout()
    _save_figure(fig, out / "subgroups.png")


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:  # the temporary name has no .png: say the format
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
