"""The run folder: the one owner of its layout. Every reader and writer of a run goes through :class:`RunDir`.

A training run folder holds::

    config.yaml            the TrainConfig (enough to reproduce the run; absolute data paths)
    metrics.csv            one row per epoch: train/val losses, val mAP at the swept threshold, per IoU
    first_steps.csv        one row per optimiser step of the first 200: losses, learning rate, positives
    tensorboard/           TensorBoard event files (per step and per epoch)
    checkpoints/last.ckpt  full Lightning state (model, optimiser, scheduler, loops, RNG), written atomically;
                           ``--resume`` continues from it (the only full-state file: the best epoch's
                           weights are in ``best_model.pt``)
    best_model.pt          safetensors: tensors + model config + chosen threshold (what predict/evaluate load)
    last_model.pt          the same for the last epoch
    done.json              written when the run finished: best mAP, threshold, epochs, steps, what ran
    best_model_int8.onnx   ``pneumodet quantize``: the best model's network as an int8 ONNX graph (CPU prediction)
    best_model_int8.onnx.json  its side file: the SHA-256 of the best_model.pt it was made from, calibration
    report.html            the run report
    eval_<split>/          ``pneumodet evaluate`` output

A folder *is a run* when it holds ``config.yaml``; a run is *finished* when ``done.json`` is a readable
JSON object. A damaged ``done.json`` or ``metrics.csv`` raises :class:`~pneumodet.errors.RunError` naming
the file, so that commands over many runs can report it and go on.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumodet.errors import RunError
from pneumodet.safeio import atomic_open, write_json

CONFIG = "config.yaml"
METRICS = "metrics.csv"
FIRST_STEPS = "first_steps.csv"
DONE = "done.json"
BEST_MODEL = "best_model.pt"
LAST_MODEL = "last_model.pt"
INT8_MODEL = "best_model_int8.onnx"
REPORT = "report.html"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
#: csv's default field limit is 128 KB; a metrics row is far smaller, but a damaged file must not crash.
_MAX_METRICS_BYTES = 64 << 20


@dataclass(frozen=True)
class RunDir:
    """Paths and readers/writers of one run folder (``root``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def first_steps(self) -> Path:
        return self.root / FIRST_STEPS

    @property
    def done(self) -> Path:
        return self.root / DONE

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL

    @property
    def last_model(self) -> Path:
        return self.root / LAST_MODEL

    @property
    def int8_model(self) -> Path:
        """The best model's int8 ONNX graph (``pneumodet quantize``, :mod:`pneumodet.inference.quantize`)."""
        return self.root / INT8_MODEL

    @property
    def int8_side(self) -> Path:
        """:attr:`int8_model`'s side file, named as every ONNX side file is (``<graph>.json``)."""
        return self.root / f"{INT8_MODEL}.json"

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    def eval_dir(self, split: str) -> Path:
        return self.root / f"eval_{split}"

    def rank_file(self, rank: int) -> Path:
        return self.root / f"rank{rank}.json"

    # ------------------------------------------------------------------ state
    def is_run(self) -> bool:
        """The folder holds a run (its ``config.yaml``)."""
        return self.config.is_file()

    def has_model(self) -> bool:
        return self.best_model.is_file()

    def is_unfinished(self) -> bool:
        """Training started (a resumable checkpoint exists) but did not finish."""
        return self.last_ckpt.is_file() and not self.done.exists()

    def is_finished(self) -> bool:
        """``done.json`` exists (readable or not: use :meth:`read_done` to check it)."""
        return self.done.exists()

    # ------------------------------------------------------------------ done.json
    def read_done(self) -> dict[str, Any]:
        """The finished run's record, or :class:`RunError` if it is missing or damaged."""
        try:
            payload = json.loads(self.done.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{self.done}: not found (the run has not finished)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{self.done}: damaged ({type(err).__name__}: {err})") from None
        if not isinstance(payload, dict):
            raise RunError(f"{self.done}: damaged (a JSON object was expected)")
        return payload

    def write_done(self, payload: Mapping[str, Any]) -> Path:
        return write_json(self.done, dict(payload))

    # ------------------------------------------------------------------ metrics.csv
    def read_metrics(self) -> list[dict[str, Any]]:
        """Rows of ``metrics.csv`` with numbers parsed (empty values are NaN); every row has ``epoch``.

        Raises :class:`RunError` naming the file and line if it is damaged (not CSV, no ``epoch`` column,
        an epoch that is not a whole number, or larger than any real metrics file).
        """
        return _read_numbered_csv(self.metrics, "epoch")

    def write_metrics_row(self, row: Mapping[str, Any]) -> Path:
        """Rewrite ``metrics.csv`` atomically with ``row`` replacing any row of the same or a later epoch
        (a resumed run repeats the epoch it was stopped in). A damaged file is not a reason to lose the
        epoch: its readable rows are kept and the rest is replaced."""
        try:
            rows = self.read_metrics() if self.metrics.exists() else []
        except RunError:
            rows = _salvage_metrics(self.metrics)
        rows = [r for r in rows if r["epoch"] < int(row["epoch"])] + [dict(row)]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_open(self.metrics, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return self.metrics

    # ------------------------------------------------------------------ first_steps.csv
    def read_first_steps(self) -> list[dict[str, Any]]:
        """Rows of ``first_steps.csv`` (one per optimiser step from 0, numbers parsed; every row has
        ``step``); :class:`RunError` naming the file and line if it is missing or damaged."""
        return _read_numbered_csv(self.first_steps, "step")

    def write_first_steps(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write ``first_steps.csv`` atomically: ``rows`` in step order, their keys as columns."""
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["step"]
        with atomic_open(self.first_steps, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["step"]))
        return self.first_steps

    def write_rank_file(self, rank: int, payload: Mapping[str, Any]) -> Path:
        return write_json(self.rank_file(rank), dict(payload))


#: The cross-validation folder's record (``pneumodet cv``) and its table.
CV_SUMMARY = "cv.json"
CV_TABLE = "summary.csv"
#: More folds than any cross-validation has: a ``cv.json`` saying more is damaged.
MAX_FOLDS = 1000


@dataclass(frozen=True)
class CvDir:
    """A cross-validation folder (``pneumodet cv``)::

        cv.json            folds, their patients, per-fold and mean/sd validation metrics, the threshold
                           chosen on the pooled out-of-fold predictions (``oof``)
        summary.csv        the same per fold, and its mean and sd rows
        splits/fold<k>/    fold k's split: train = the other folds, val = fold k, test = the base split's test
        fold<k>/           fold k's training run (a :class:`RunDir`)
        eval_<split>/      ``pneumodet evaluate CV_DIR`` output (the ensemble of the fold models)

    A folder *is a CV folder* when it holds ``cv.json`` (written before the first fold trains).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def summary(self) -> Path:
        return self.root / CV_SUMMARY

    @property
    def table(self) -> Path:
        return self.root / CV_TABLE

    def fold(self, k: int) -> RunDir:
        """Fold ``k``'s run (1-based)."""
        return RunDir(self.root / f"fold{k}")

    def fold_split(self, k: int) -> Path:
        return self.root / "splits" / f"fold{k}"

    def eval_dir(self, split: str) -> Path:
        return self.root / f"eval_{split}"

    def is_cv(self) -> bool:
        return self.summary.is_file()

    def read_summary(self) -> dict[str, Any]:
        """``cv.json``, or :class:`RunError` if it is missing or damaged."""
        try:
            payload = json.loads(self.summary.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{self.summary}: not found (not a cross-validation folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{self.summary}: damaged ({type(err).__name__}: {err})") from None
        folds = payload.get("folds") if isinstance(payload, dict) else None
        if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
            raise RunError(f"{self.summary}: damaged (a JSON object with the number of folds, 2 to {MAX_FOLDS}, "
                           "was expected)")
        return payload

    def write_summary(self, payload: Mapping[str, Any]) -> Path:
        return write_json(self.summary, dict(payload), indent=1)


def find_runs(paths: Iterable[Path]) -> list[RunDir]:
    """Each path that is a run, or the runs one level inside a folder of runs (a grid), in name order."""
    runs: list[RunDir] = []
    for path in paths:
        run = RunDir(Path(path))
        if run.is_run():
            runs.append(run)
        elif run.root.is_dir():
            runs.extend(RunDir(p) for p in sorted(run.root.iterdir()) if RunDir(p).is_run())
    return runs


def _read_numbered_csv(path: Path, key: str) -> list[dict[str, Any]]:
    """Rows of a run's CSV with numbers parsed (empty values are NaN), each numbered by the whole number in
    column ``key`` (``epoch`` of metrics.csv, ``step`` of first_steps.csv).

    Raises :class:`RunError` naming the file and line if it is missing or damaged (not CSV, no ``key``
    column, a ``key`` that is not a whole number >= 0, or larger than any real file of its kind).
    """
    try:
        if path.stat().st_size > _MAX_METRICS_BYTES:
            raise RunError(f"{path}: damaged (larger than any {path.name} file: {path.stat().st_size} bytes)")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise RunError(f"{path}: line {reader.line_num}: damaged (wrong number of fields)")
                rows.append({k: _number(v) for k, v in row.items()})
            fields = reader.fieldnames
    except FileNotFoundError:
        raise RunError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunError(f"{path}: damaged ({type(err).__name__}: {err})") from None
    if rows and (not fields or key not in fields):
        raise RunError(f"{path}: damaged (no {key!r} column)")
    for i, row in enumerate(rows, start=2):
        if not isinstance(row[key], int) or row[key] < 0:
            raise RunError(f"{path}: line {i}: damaged ({key} {row[key]!r} is not a whole number)")
    return rows


def _number(value: str | None) -> Any:
    if value is None or value == "":
        return math.nan
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _salvage_metrics(path: Path) -> list[dict[str, Any]]:
    """The leading rows of a damaged ``metrics.csv`` that parse, or none."""
    rows: list[dict[str, Any]] = []
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                if None in row or any(v is None for v in row.values()):
                    break
                parsed = {k: _number(v) for k, v in row.items()}
                if not isinstance(parsed.get("epoch"), int):
                    break
                rows.append(parsed)
    except (OSError, csv.Error):
        pass
    return rows
