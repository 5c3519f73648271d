"""Cross-validation: ``pneumodet cv --folds K``, K runs on patient-level folds, the test split held out.

The base split's test patients stay the test set, untouched. Its train and validation patients are divided
into K folds (:func:`~pneumodet.data.split.fold_patients`: stratified as ``split`` stratifies); fold k's
run validates on fold k and trains on the others. The CV folder (:class:`~pneumodet.rundir.CvDir`) holds
the K fold splits and runs, and ``cv.json`` / ``summary.csv``: per fold and mean ± sd validation metrics,
and the confidence threshold chosen on the pooled out-of-fold predictions (every train+val patient
predicted once, by the one model that did not train on it), which is the threshold of the ensemble of the
fold models (``predict CV_DIR``, ``evaluate CV_DIR``).

Runs are trained as a grid's are (:func:`~pneumodet.experiments.train_runs`): finished folds are skipped,
unfinished ones resumed, a failing fold recorded while the others go on; Ctrl-C stops resumably.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumodet.clinical_metrics import image_class_metrics
from pneumodet.config import TrainConfig
from pneumodet.data.records import CLASS_NAMES, OPACITY_INDEX, PatientRecord
from pneumodet.data.split import SPLIT_JSON, Split, fold_patients, read_split, split_fingerprint, write_split
from pneumodet.errors import ConfigError, PneumodetError, RunError
from pneumodet.evaluation import load_runs, predict_split
from pneumodet.experiments import train_runs
from pneumodet.inference.options import PredictOptions
from pneumodet.metrics import rsna_map, sweep_thresholds
from pneumodet.rundir import CvDir
from pneumodet.safeio import atomic_open, json_safe
from pneumodet.textsafe import display_path

#: The per-fold validation metrics summarised as mean ± sd.
FOLD_METRICS: tuple[str, ...] = ("best_val_map", "threshold", "oof_map", "global_accuracy", "pneumonia_auc")
#: Statuses of a fold whose model exists.
_TRAINED = ("done", "skipped (already done)")


@dataclass
class FoldRun:
    """One fold's run and its validation metrics.

    ``best_val_map`` and ``threshold`` are the run's own (chosen on its fold during training); ``oof_map``
    is its fold's RSNA mAP at the pooled out-of-fold threshold; ``global_accuracy`` and
    ``pneumonia_auc`` are the global head's on its fold.
    """

    name: str
    fold: int
    val_patients: int = 0
    train_patients: int = 0
    status: str = "pending"  # done | skipped (already done) | failed | damaged
    best_val_map: float = math.nan
    threshold: float = math.nan
    oof_map: float = math.nan
    global_accuracy: float = math.nan
    pneumonia_auc: float = math.nan
    steps: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class CvResult:
    """The folds, their mean and sd, and the out-of-fold threshold (``oof``: ``None`` until every fold ran)."""

    cv_dir: Path
    folds: list[FoldRun] = field(default_factory=list)
    oof: dict[str, Any] | None = None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(f) for f in self.folds])

    def stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """Mean and sample sd (ddof 1) of :data:`FOLD_METRICS` over the trained folds (NaN where undefined)."""
        frame = self.frame()
        trained = frame[frame["status"].isin(_TRAINED)] if len(frame) else frame
        mean = {m: float(trained[m].mean()) if len(trained) else math.nan for m in FOLD_METRICS}
        sd = {m: float(trained[m].std(ddof=1)) if len(trained) > 1 else math.nan for m in FOLD_METRICS}
        return mean, sd

    @property
    def complete(self) -> bool:
        return self.oof is not None

    def summary(self) -> str:
        """The table printed by ``pneumodet cv``: one line per fold, mean ± sd, the out-of-fold threshold."""
        mean, sd = self.stats()
        lines = [f"cross-validation {display_path(self.cv_dir)}: {len(self.folds)} folds",
                 f"{'fold':<6} {'status':<22} {'val pts':>7} {'val mAP':>8} {'thr':>5} {'OOF-thr mAP':>11} "
                 f"{'glob acc':>8} {'AUC':>6}"]
        for f in self.folds:
            lines.append(f"{f.name:<6} {f.status:<22} {f.val_patients:>7} {_num(f.best_val_map):>8} "
                         f"{_num(f.threshold, 2):>5} {_num(f.oof_map):>11} {_num(f.global_accuracy):>8} "
                         f"{_num(f.pneumonia_auc):>6}" + (f"  {f.error}" if f.error else ""))
        lines.append("mean ± sd: " + ", ".join(f"{m} {_num(mean[m])} ± {_num(sd[m])}" for m in FOLD_METRICS))
        if self.oof is not None:
            lines.append(f"out-of-fold threshold {self.oof['threshold']:.3f}: RSNA mAP {self.oof['rsna_map']:.4f} "
                         f"over the {self.oof['patients']} pooled validation patients (the ensemble's threshold)")
        return "\n".join(lines)


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def run_cv(base: TrainConfig, cv_dir: Path, *, folds: int, progress: bool | str = True, verbose: bool = False,
           options: PredictOptions | None = None, train_fn: Callable[..., Any] | None = None) -> CvResult:
    """Train the ``folds`` runs of ``base`` (its ``split_dir`` the base split) into ``cv_dir``, predict each
    fold with its own model, choose the threshold on the pooled out-of-fold predictions, write the summary.

    Says ``cv: run i of K: foldk`` (with an ETA) before each fold; ``options`` are how the folds are
    predicted (default: the GPU when there is one, the training batch size, no compilation).

    Raises:
        ConfigError: no base split, fewer than 2 folds, or a CV folder made with other folds, seed or split.
        SplitError: the base split is unreadable or has fewer train+val patients than folds.
        PneumodetError: a fold did not train (it is named; the others are kept, and the summary written):
            the out-of-fold threshold needs every fold. Run again to retry it.
    """
    if not base.split_dir:
        raise ConfigError("cross-validation divides an existing split's train+val patients: give --split "
                          "(the split's test set stays held out)")
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    cv = CvDir(Path(cv_dir).absolute())
    base_split = Path(base.split_dir).absolute()
    record = {"folds": folds, "seed": base.seed, "base_split": str(base_split),
              "base_split_fingerprint": split_fingerprint(base_split)}
    _check_same_cv(cv, record)
    sets = read_split(base_split)
    pool, test = sets["train"] + sets["val"], tuple(sets["test"])
    fold_sets = fold_patients(pool, folds, seed=base.seed)  # too few patients: refused before anything is written
    result = CvResult(cv.root)
    _write(result, record)  # from now on the folder is a CV folder, resumable
    fold_sizes = _write_fold_splits(cv, pool, fold_sets, test, seed=base.seed, source=base.data_dir or str(base_split))
    result.folds = [FoldRun(cv.fold(k).root.name, k, val_patients=n, train_patients=sum(fold_sizes) - n)
                    for k, n in enumerate(fold_sizes, 1)]
    _write(result, record)
    planned = [(run, TrainConfig.from_dict({**base.to_dict(), "split_dir": str(cv.fold_split(run.fold)),
                                            "out_dir": str(cv.fold(run.fold).root), "split_fingerprint": None}))
               for run in result.folds]
    train_runs("cv", planned, on_update=lambda _: _write(result, record), progress=progress, verbose=verbose,
               train_fn=train_fn)
    missing = [f for f in result.folds if f.status not in _TRAINED]
    if missing:
        _write(result, record)
        raise PneumodetError(", ".join(f"{f.name} {f.status}" + (f" ({f.error})" if f.error else "") for f in missing)
                             + f": the out-of-fold threshold needs every fold; summary in "
                             f"{display_path(cv.summary)}; run `pneumodet cv` again to retry (finished folds "
                             "are skipped)")
    options = options or PredictOptions(device="auto", batch_size=base.batch_size, compile=False)
    result.oof = _out_of_fold(result, cv, options)
    _write(result, record)
    return result


def stored_cv_config(cv_dir: Path) -> tuple[TrainConfig, int]:
    """The base config and fold count a cross-validation folder was started with, to run it again from its
    folder alone (``pneumodet cv --out CV``): the folds' shared training config (read from the first fold
    that has one) with the base split recorded in ``cv.json``.

    Raises:
        RunError: ``cv_dir`` is not a CV folder, or its ``cv.json`` is damaged.
        ConfigError: no fold has started yet, so nothing records the training options.
    """
    cv = CvDir(Path(cv_dir))
    summary = cv.read_summary()
    folds, base_split = summary.get("folds"), summary.get("base_split")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2 or not isinstance(base_split, str):
        raise RunError(f"{display_path(cv.summary)}: records no usable folds and base split; give --data and --split")
    for k in range(1, folds + 1):
        if cv.fold(k).is_run():
            stored = TrainConfig.from_yaml(cv.fold(k).config, stored_run=True).to_dict()
            return TrainConfig.from_dict({**stored, "split_dir": base_split, "out_dir": str(cv.root),
                                          "split_fingerprint": None}), folds
    raise ConfigError(f"{display_path(cv.root)}: no fold has started, so nothing records how to train them; give "
                      "--data, --split and the training options again")


def _check_same_cv(cv: CvDir, record: dict[str, Any]) -> None:
    """:class:`ConfigError` when ``cv`` already holds a cross-validation of other folds, seed or split."""
    if not cv.is_cv():
        if cv.root.is_dir() and any(cv.root.iterdir()):
            raise ConfigError(f"{display_path(cv.root)}: exists and is not a cross-validation folder; give a new "
                              "or empty --out")
        return
    old = cv.read_summary()
    changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in record.items() if old.get(key) != value]
    if changed:
        raise ConfigError(f"{display_path(cv.root)}: holds a cross-validation made otherwise ({'; '.join(changed)});"
                          " give a new --out")


def _write_fold_splits(cv: CvDir, pool: list[PatientRecord], fold_sets: list[tuple[PatientRecord, ...]],
                       test: tuple[PatientRecord, ...], *, seed: int, source: str) -> list[int]:
    """Write each fold's split (train: the other folds; val: the fold; test: the base test set) unless it is
    there (a resumed cross-validation: the folds are a function of the patients and the seed); their sizes.
    Each set keeps the order of ``pool`` (the base split's train then val records)."""
    total = len(pool) + len(test)
    for k, val in enumerate(fold_sets, 1):
        if (cv.fold_split(k) / SPLIT_JSON).exists():
            continue
        held = {r.patient_id for r in val}
        train = tuple(r for r in pool if r.patient_id not in held)
        write_split(Split(train=train, val=val, test=test, seed=seed, val_fraction=len(val) / total,
                          test_fraction=len(test) / total), cv.fold_split(k), source=source)
    return [len(v) for v in fold_sets]


def _out_of_fold(result: CvResult, cv: CvDir, options: PredictOptions) -> dict[str, Any]:
    """Predict each fold with its own model; per-fold metrics at the pooled threshold, filled into the folds."""
    gt: dict[str, np.ndarray] = {}
    preds: dict[str, np.ndarray] = {}
    per_fold = []
    gated: dict[str, np.ndarray] = {}
    options = dataclasses.replace(options, gate=False)  # the gated scores are derived: both thresholds recorded
    for fold in result.folds:
        predicted = predict_split(load_runs(cv.fold(fold.fold).root, split="val"), "val", options)
        gt.update(predicted.gt)
        preds.update(predicted.preds)
        gated.update(predicted.gated())
        per_fold.append(predicted)
        if predicted.true_class:
            classes = image_class_metrics(predicted.true_class, predicted.class_probs(), CLASS_NAMES, OPACITY_INDEX)
            fold.global_accuracy, fold.pneumonia_auc = classes["accuracy"], classes["pneumonia_auc"]
    try:
        sweep = sweep_thresholds(gt, preds)
    except ValueError as err:
        raise PneumodetError(f"no out-of-fold threshold can be chosen: {err}") from None
    for fold, predicted in zip(result.folds, per_fold, strict=True):
        kept = {pid: p[p[:, 0] >= sweep.best_threshold] for pid, p in predicted.preds.items()}
        fold.oof_map = rsna_map(predicted.gt, kept).score
    try:
        gated_sweep = sweep_thresholds(gt, gated)
        gate = {"gate_threshold": gated_sweep.best_threshold, "gate_rsna_map": gated_sweep.best_score}
    except ValueError:  # gating left nothing to score at any cut-off: --gate on this folder says so then
        gate = {}
    return {"threshold": sweep.best_threshold, "rsna_map": sweep.best_score, "patients": len(gt), **gate,
            "source": "RSNA mAP sweep over the pooled out-of-fold validation predictions (each patient predicted "
                      "by the one fold model that did not train on it); gate_threshold: the same for gated "
                      "scores",
            "options": {"tta": options.tta, "precision": per_fold[0].predictor.precision}}


def _write(result: CvResult, record: dict[str, Any]) -> None:
    """``cv.json`` and ``summary.csv`` as they stand (atomically)."""
    cv = CvDir(result.cv_dir)
    mean, sd = result.stats()
    cv.write_summary(json_safe({**record, "complete": result.complete, "runs": [vars(f) for f in result.folds],
                                "mean": mean, "sd": sd, "oof": result.oof}))
    frame = result.frame()
    extra = pd.DataFrame([{"name": "mean", **mean}, {"name": "sd", **sd}])
    table = pd.concat([frame, extra], ignore_index=True)
    for column in ("fold", "val_patients", "train_patients", "steps"):  # whole numbers, blank on mean/sd rows
        if column in table:
            table[column] = table[column].astype("Int64")
    with atomic_open(cv.table, "w", newline="") as f:
        table.to_csv(f, index=False)
