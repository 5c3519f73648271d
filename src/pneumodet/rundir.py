"""The run folder: the one owner of its layout. Every reader and writer of a run goes through :class:`RunDir`.

A training run folder holds::

    config.yaml            the TrainConfig (enough to reproduce the run; absolute data paths)
    metrics.csv            one row per epoch: train/val losses, val mAP at the swept threshold, per IoU
    tensorboard/           TensorBoard event files (per step and per epoch)
    checkpoints/last.ckpt  full Lightning state (model, optimiser, scheduler, loops, RNG), written atomically;
                           ``--resume`` continues from it
    checkpoints/best.ckpt  the same at the best validation mAP
    best_model.pt          safetensors: tensors + model config + chosen threshold (what predict/evaluate load)
    last_model.pt          the same for the last epoch
    done.json              written when the run finished: best mAP, threshold, epochs, steps, what ran
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumodet.errors import RunError
from pneumodet.safeio import atomic_open, write_json

CONFIG = "config.yaml"
METRICS = "metrics.csv"
DONE = "done.json"
BEST_MODEL = "best_model.pt"
LAST_MODEL = "last_model.pt"
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
    def done(self) -> Path:
        return self.root / DONE

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL

    @property
    def last_model(self) -> Path:
        return self.root / LAST_MODEL

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
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

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
        path = self.metrics
        try:
            if path.stat().st_size > _MAX_METRICS_BYTES:
                raise RunError(f"{path}: damaged (larger than any metrics file: {path.stat().st_size} bytes)")
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
        if rows and (not fields or "epoch" not in fields):
            raise RunError(f"{path}: damaged (no 'epoch' column)")
        for i, row in enumerate(rows, start=2):
            if not isinstance(row["epoch"], int) or row["epoch"] < 0:
                raise RunError(f"{path}: line {i}: damaged (epoch {row['epoch']!r} is not a whole number)")
        return rows

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

    def write_rank_file(self, rank: int, payload: Mapping[str, Any]) -> Path:
        return write_json(self.rank_file(rank), dict(payload))


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
