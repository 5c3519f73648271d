"""Experiment grids: every encoder × augmentation × sample size, run one after another.

``GRID_DIR`` holds ``splits/n<N>/`` (one patient-level split per sample size, drawn once), one run
directory per combination (``<encoder>_<aug>_n<N>``) and ``summary.csv`` / ``summary.md``. Finished
runs are skipped, unfinished ones resumed, a run with a damaged record is reported as ``damaged``, and a
failing run is recorded in the summary while the others go on. Ctrl-C stops the grid (resumable).
"""

from __future__ import annotations

import itertools
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd

from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import split_patients, write_split
from pneumodet.errors import ConfigError, RunError
from pneumodet.progress import format_duration
from pneumodet.reports.runs import write_run_report
from pneumodet.rundir import RunDir
from pneumodet.safeio import atomic_open, write_text
from pneumodet.training import train


@dataclass
class GridRun:
    name: str
    encoder: str
    aug: str
    samples: int | None
    status: str = "pending"  # done | skipped (already done) | failed
    best_val_map: float = float("nan")
    threshold: float = float("nan")
    steps: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class GridResult:
    grid_dir: Path
    runs: list[GridRun] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(r) for r in self.runs])

    def summary(self) -> str:
        frame = self.frame()
        counts = frame["status"].value_counts().to_dict()
        return (f"grid {self.grid_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n"
                + frame[["name", "status", "best_val_map", "error"]].to_string(index=False))


def run_name(encoder: str, aug: str, samples: int | None) -> str:
    return f"{encoder}_{aug}_n{samples if samples else 'all'}"


def make_sample_split(data_dir: Path, split_dir: Path, samples: int | None, *, val: float, test: float,
                      seed: int, labels_only: bool = False) -> Path:
    """One split per sample size, drawn once and reused by every run of that size."""

    if (split_dir / "split.json").exists():
        return split_dir
    records = load_rsna(data_dir).records
    split = split_patients(records, val=val, test=test, samples=samples, seed=seed, labels_only=labels_only)
    write_split(split, split_dir, source=str(data_dir))
    return split_dir


def run_grid(base: TrainConfig, grid_dir: Path, *, encoders: Sequence[str], augs: Sequence[str],
             samples: Sequence[int | None], val: float = 0.1, test: float = 0.1,
             progress: bool | str = True, verbose: bool = False,
             train_fn: Callable[..., Any] | None = None) -> GridResult:
    """Train every combination into ``grid_dir`` and write the summary table.

    Says ``grid: run i of N: NAME`` on stderr before each run, with an ETA once a run has trained (the mean
    time of the runs trained so far, times those left); ``progress`` and ``verbose`` go to each training
    (:func:`train_runs`: finished runs skipped, unfinished ones resumed, failures recorded).
    """

    if not encoders or not augs or not samples:
        raise ConfigError("a grid needs at least one encoder, one augmentation and one sample size")
    grid_dir = Path(grid_dir)
    result = GridResult(grid_dir)
    planned: list[tuple[GridRun, TrainConfig]] = []
    for n in samples:
        split_dir = make_sample_split(Path(base.data_dir), grid_dir / "splits" / f"n{n or 'all'}", n,
                                      val=val, test=test, seed=base.seed)
        for encoder, aug in itertools.product(encoders, augs):
            run = GridRun(run_name(encoder, aug, n), encoder, aug, n)
            planned.append((run, TrainConfig.from_dict({**base.to_dict(), "encoder": encoder, "aug": aug,
                                                        "split_dir": str(split_dir),
                                                        "out_dir": str(grid_dir / run.name)})))
    train_runs("grid", planned, on_update=lambda runs: _write_summary(GridResult(grid_dir, list(runs))),
               progress=progress, verbose=verbose, train_fn=train_fn)
    result.runs = [run for run, _ in planned]
    _write_summary(result)
    return result


class RunRecord(Protocol):
    """What :func:`train_runs` fills in for each run (:class:`GridRun`, the cross-validation's folds)."""

    name: str
    status: str
    best_val_map: float
    threshold: float
    steps: int
    seconds: float
    error: str


R = TypeVar("R", bound=RunRecord)


def train_runs(what: str, planned: Sequence[tuple[R, TrainConfig]], *,
               on_update: Callable[[list[R]], None], progress: bool | str = True, verbose: bool = False,
               train_fn: Callable[..., Any] | None = None) -> None:
    """Train each ``(record, config)`` into ``config.out_dir``, one after another, filling in the records.

    Says ``WHAT: run i of N: NAME`` on stderr before each run, with an ETA once a run has trained (the mean
    time of the runs trained so far, times those left). A finished run is skipped (``skipped (already
    done)``, its record read from ``done.json``; ``damaged`` when that cannot be read), an unfinished one
    resumed from its last checkpoint; a failing run is recorded (``failed``, its traceback in
    ``error.txt``) while the others go on. ``on_update(records so far)`` runs after each trained run, and
    before Ctrl-C / SIGTERM (exit 130 / 143) is raised on, so the summary is always current.
    """

    train_fn = train_fn or train
    done: list[R] = []
    total, trained_seconds, trained = len(planned), 0.0, 0
    for run, config in planned:
        done.append(run)
        run_dir = RunDir(Path(config.out_dir))
        left = total - len(done) + 1  # this run and those after it
        eta = f" (ETA {format_duration(trained_seconds / trained * left)})" if trained else ""
        print(f"{what}: run {len(done)} of {total}: {run.name}{eta}", file=sys.stderr, flush=True)
        if run_dir.is_finished():
            try:
                _read_done(run, run_dir.read_done())
                run.status = "skipped (already done)"
            except (RunError, TypeError, ValueError) as exc:  # damaged: say so, go on with the others
                run.status, run.error = "damaged", str(exc).splitlines()[0][:300]
            continue
        started = time.monotonic()
        try:
            outcome = train_fn(config, resume=run_dir.last_ckpt.exists(), progress=progress, verbose=verbose)
            run.status, run.best_val_map, run.threshold = "done", outcome.best_map, outcome.threshold
            run.steps, run.seconds = outcome.steps, outcome.seconds
            if run_dir.has_model():
                write_run_report(run_dir.root)
        except Exception as exc:  # one failing run must not stop the others
            if getattr(exc, "exit_code", 2) in (130, 143):  # Ctrl-C / SIGTERM stop them all, resumably
                on_update(done)
                raise
            run.status = "failed"
            run.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            write_text(run_dir.root / "error.txt", traceback.format_exc())
        trained, trained_seconds = trained + 1, trained_seconds + time.monotonic() - started
        on_update(done)


def _read_done(run: RunRecord, done: dict[str, Any]) -> None:
    run.best_val_map = float(done.get("best_val_map") if done.get("best_val_map") is not None else float("nan"))
    run.threshold = float(done.get("threshold") if done.get("threshold") is not None else float("nan"))
    run.steps, run.seconds = int(done.get("steps") or 0), float(done.get("seconds") or 0.0)


def _write_summary(result: GridResult) -> None:
    frame = result.frame()
    with atomic_open(result.grid_dir / "summary.csv", "w", newline="") as f:
        frame.to_csv(f, index=False)
    lines = ["| run | encoder | aug | samples | status | best val mAP | steps | error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.encoder} | {r.aug} | {r.samples or 'all'} | {r.status} | "
              f"{r.best_val_map:.4f} | {r.steps} | {r.error} |" for r in result.runs]
    write_text(result.grid_dir / "summary.md", "\n".join(lines) + "\n")
