"""Model quality, side by side in one run, on a fixed synthetic set with fixed seeds.

    .venv/bin/python benchmarks/bench_quality.py [--section global|stability|ensemble|all] [--patients 400]
                                                 [--size 256] [--epochs 8] [--batch-size 8] [--encoder resnet50]
                                                 [--fpn-channels 256] [--precision auto] [--seed 0]
                                                 [--global-seeds 0,1,2] [--work DIR]

The defaults are the demo's: its data (400 synthetic patients at 256 px, seed 0; split val 15 %, test 15 %),
network (resnet50 at 256 px, 256 FPN channels, random initialisation) and schedule (8 epochs of 35 steps,
AdamW 3e-4, light augmentation, bf16 where the CPU has it); every run of every section the same but for
what the section compares. At these settings one training takes about 5 minutes on two cores with bf16.

Sections (each a function of :data:`SECTIONS`; ``all`` runs them in order, on the same data):

* ``global``: the global image-class head at its former settings (loss weight 0.1, dropout 0.5) against
  loss weight 1.0 and dropout 0.2, each trained with every seed of ``--global-seeds``: per setting, the mean
  over the seeds (and each seed's value) of the test three-class accuracy, per-class recall, macro and
  pneumonia AUC, and the test RSNA mAP with and without ``--gate`` (each at the threshold training chose on
  validation for plain or gated scores).
* ``stability``: the ``baseline-v1`` recipe (warm-up over 10 % of the steps only, each batch's focal loss
  divided by its own positive-anchor count) against ``default`` (warm-up at least 200 steps, at most half
  the run; divided by a running mean of the counts), both trained from random
  initialisation with the same data, split and seed. Prints, per recipe, the classification loss of the
  first optimiser steps (max and mean over epoch 0 and over the first 200 steps, from the run's
  ``first_steps.csv``), the test RSNA mAP (threshold from validation) with and without ``--gate``, and the
  global head's three-class accuracy, per-class recall (from the test confusion matrix) and pneumonia AUC.
* ``ensemble``: one model of the fixed recipe trained on the split's train set against the ensemble of a
  3-fold cross-validation (``pneumodet cv --folds 3``: the split's train+val patients in 3 folds, the same
  test patients held out), both scored by ``pneumodet evaluate`` on the test split: RSNA mAP at each one's
  validation threshold (the single run's own; the ensemble's chosen on the out-of-fold predictions), the
  FROC mean sensitivity where ``evaluate`` reports it, the out-of-fold and per-fold validation mAP.

Everything goes through the ``pneumodet`` command line (``synth``, ``split``, ``train``, ``cv``, ``evaluate``), as
a user runs it. The work folder (default: a temporary one) keeps the runs for their reports. The numbers
are quality figures, not timings; the wall time printed is for planning only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from _common import cpu_model, load_average
from pneumodet.cli import main as pneumodet
from pneumodet.data.records import CLASS_SHORT_NAMES
from pneumodet.rundir import RunDir
from pneumodet.safeio import write_text

#: The first optimiser steps whose classification loss is summarised (as recorded in first_steps.csv).
FIRST_STEPS = 200


@dataclass(frozen=True)
class Bench:
    """What every section shares: the options, the data and split made once, the work folder."""

    args: argparse.Namespace
    work: Path
    data: Path
    split: Path


def _call(argv: Sequence[str]) -> None:
    """One ``pneumodet`` command; a failure ends the benchmark with the command line."""
    code = pneumodet(list(argv))
    if code != 0:
        raise SystemExit(f"bench_quality: `pneumodet {' '.join(argv)}` exited {code}")


def prepare(args: argparse.Namespace, work: Path) -> Bench:
    """The synthetic set and its patient-level split (val 15 %, test 15 %), both from ``--seed``."""
    data, split = work / "data", work / "split"
    if not (data / "stage_2_train_labels.csv").exists():
        _call(["synth", str(data), "--patients", str(args.patients), "--size", str(args.size),
               "--seed", str(args.seed)])
    if not (split / "split.json").exists():
        _call(["split", str(data), "--out", str(split), "--val", "0.15", "--test", "0.15",
               "--seed", str(args.seed)])
    return Bench(args=args, work=work, data=data, split=split)


def train_options(bench: Bench, *, name: str = "model", model: Mapping[str, float] | None = None) -> list[str]:
    """The options of every training in the benchmark (``train`` and ``cv``): data, split, cache, network,
    schedule, seed; the FPN width and any other ``model`` setting without an option of its own through a
    ``--config`` file (``WORK/NAME.yaml``)."""
    a = bench.args
    config = bench.work / f"{name}.yaml"
    write_text(config, yaml.safe_dump({"model": {"fpn_channels": a.fpn_channels, **(model or {})}}))
    return ["--config", str(config), "--data", str(bench.data), "--split", str(bench.split),
            "--cache-dir", str(bench.work / "cache"), "--encoder", a.encoder, "--image-size", str(a.size),
            "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--num-workers", "1",
            "--checkpoint-every", "0", "--aug", "light", "--precision", a.precision, "--seed", str(a.seed)]


def train(bench: Bench, name: str, *extra: str, model: Mapping[str, float] | None = None) -> RunDir:
    """A run ``WORK/runs/NAME`` (skipped when it has finished before), from random initialisation; options
    in ``extra`` come after (and override) the benchmark's own."""
    run = RunDir(bench.work / "runs" / name)
    if not run.is_finished():
        _call(["train", *train_options(bench, name=name, model=model), "--out", str(run.root), *extra])
    return run


def evaluate(run: RunDir, *, gate: bool = False) -> dict:
    """``pneumodet evaluate RUN --split test`` (``--gate`` optional); its metrics.json."""
    out = run.root / f"eval_test{'_gate' if gate else ''}"
    if not (out / "metrics.json").exists():
        _call(["evaluate", str(run.root), "--split", "test", "--out", str(out), *(["--gate"] if gate else [])])
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def first_steps_summary(run: RunDir) -> dict[str, float]:
    """Max and mean classification loss over epoch 0 and over the first :data:`FIRST_STEPS` steps."""
    rows = run.read_first_steps()
    epoch0 = [r["classification"] for r in rows if r["epoch"] == 0]
    first = [r["classification"] for r in rows if r["step"] < FIRST_STEPS]
    return {"epoch-0 cls loss, max": max(epoch0, default=math.nan),
            "epoch-0 cls loss, mean": sum(epoch0) / len(epoch0) if epoch0 else math.nan,
            f"first {len(first)} steps cls loss, max": max(first, default=math.nan),
            f"first {len(first)} steps cls loss, mean": sum(first) / len(first) if first else math.nan}


def global_head_summary(metrics: Mapping) -> dict[str, float]:
    """Three-class accuracy, per-class recall, macro (one-vs-rest) and pneumonia AUC, as ``evaluate`` reports."""
    g = metrics["global_class"]
    return {"global accuracy": g["accuracy"], **{f"recall {CLASS_SHORT_NAMES[name]}": value
                                                 for name, value in g["recall"].items()},
            "macro AUC": g["macro_auc"], "pneumonia AUC": g["pneumonia_auc"]}


#: The global head's settings compared by :func:`section_global`: (loss weight, dropout).
GLOBAL_SETTINGS = {"weight 0.1, dropout 0.5": (0.1, 0.5), "weight 1.0, dropout 0.2": (1.0, 0.2)}


def section_global(bench: Bench) -> dict[str, dict[str, float]]:
    """Global head, former settings vs weight 1.0 / dropout 0.2: test accuracy, recall, AUC, plain and gated mAP."""
    columns: dict[str, dict[str, float]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for label, (weight, dropout) in GLOBAL_SETTINGS.items():
        values: dict[str, list[float]] = {}
        for seed in bench.args.global_seeds:
            run = train(bench, f"global_w{weight}_d{dropout}_s{seed}", "--seed", str(seed),
                        model={"global_loss_weight": weight, "global_dropout": dropout})
            plain, gated = evaluate(run), evaluate(run, gate=True)
            figures = {**global_head_summary(plain), "test RSNA mAP": plain["rsna_map"],
                       "test RSNA mAP, --gate": gated["rsna_map"]}
            for row, value in figures.items():
                values.setdefault(row, []).append(math.nan if value is None else float(value))
        columns[f"{label} (mean)"] = {row: _mean(v) for row, v in values.items()}
        per_seed[label] = values
    seeds = ", ".join(map(str, bench.args.global_seeds))
    for label, values in per_seed.items():
        print(f"\n[global] {label}, per seed ({seeds}):")
        for row, v in values.items():
            print(f"  {row:<36}" + "".join(f"{_fmt(x):>10}" for x in v))
    return columns


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def section_stability(bench: Bench) -> dict[str, dict[str, float]]:
    """Baseline recipe vs fixed recipe: first-steps loss, test mAP (plain and gated), global head."""
    columns: dict[str, dict[str, float]] = {}
    for label, recipe in (("baseline-v1", "baseline-v1"), ("fixed (default)", "default")):
        run = train(bench, recipe, "--recipe", recipe)
        plain, gated = evaluate(run), evaluate(run, gate=True)
        columns[label] = {**first_steps_summary(run), "test RSNA mAP": plain["rsna_map"],
                          "test RSNA mAP, --gate": gated["rsna_map"], **global_head_summary(plain)}
    return columns


def cross_validate(bench: Bench, folds: int) -> Path:
    """``pneumodet cv --folds K`` of the fixed recipe on the same split (its test patients held out), trained as
    :func:`train` trains; finished folds are skipped. The CV folder."""
    out = bench.work / f"cv{folds}"
    _call(["cv", *train_options(bench), "--folds", str(folds), "--out", str(out), "--recipe", "default"])
    return out


def evaluate_models(source: Path, out: Path) -> dict:
    """``pneumodet evaluate SOURCE --split test --out OUT`` (a run, or a CV folder: its folds' ensemble)."""
    if not (out / "metrics.json").exists():
        _call(["evaluate", str(source), "--split", "test", "--out", str(out)])
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _test_figures(metrics: Mapping) -> dict[str, float]:
    """Test mAP, and the FROC mean sensitivity where ``evaluate`` reports it."""
    out = {"test RSNA mAP": metrics["rsna_map"], "threshold": metrics["threshold"]}
    froc = metrics.get("froc") or {}
    if froc.get("mean_sensitivity") is not None:
        out["test FROC mean sensitivity"] = froc["mean_sensitivity"]
    return out


def section_ensemble(bench: Bench) -> dict[str, dict[str, float]]:
    """Single model vs 3-fold ensemble on the same test patients: test mAP, FROC mean, threshold."""
    from pneumodet.rundir import CvDir

    single = train(bench, "default", "--recipe", "default")  # the stability section's fixed run, if it ran
    cv_dir = cross_validate(bench, 3)
    summary = CvDir(cv_dir).read_summary()
    ensemble = {**_test_figures(evaluate_models(cv_dir, cv_dir / "eval_test_bench")),
                "out-of-fold val mAP": summary["oof"]["rsna_map"],
                "fold val mAP, mean": summary["mean"]["best_val_map"],
                "fold val mAP, sd": summary["sd"]["best_val_map"]}
    return {"single model": _test_figures(evaluate_models(single.root, single.root / "eval_test_bench")),
            "3-fold ensemble": ensemble}


#: The sections in the order ``all`` runs them; each returns {column: {row: value}}.
SECTIONS: dict[str, Callable[[Bench], dict[str, dict[str, float]]]] = {
    "global": section_global,
    "stability": section_stability,
    "ensemble": section_ensemble,
}


def print_side_by_side(title: str, columns: Mapping[str, Mapping[str, float]]) -> None:
    """One table: a row per figure, a column per contender (the rows of the first column first)."""
    rows = list(dict.fromkeys(r for col in columns.values() for r in col))
    width = max(len(r) for r in rows) + 2
    print(f"\n{title}")
    print(" " * width + "".join(f"{name:>20}" for name in columns))
    for r in rows:
        cells = "".join(f"{_fmt(col.get(r, math.nan)):>20}" for col in columns.values())
        print(f"{r:<{width}}{cells}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (synthetic set and training)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--fpn-channels", type=int, default=256)
    parser.add_argument("--precision", default="auto", help="training precision (train --precision)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--global-seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="seeds of the global section's runs, comma-separated (default 0,1,2)")
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    print(f"bench_quality: {args.patients} synthetic patients, {args.size} px, {args.encoder} (FPN "
          f"{args.fpn_channels} channels), {args.epochs} epochs, batch {args.batch_size}, precision "
          f"{args.precision}, seed {args.seed}; CPU {cpu_model()}, load {load_average()}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        bench = prepare(args, args.work or Path(tmp))
        for name, section in SECTIONS.items():
            if args.section in (name, "all"):
                print_side_by_side(f"[{name}] {(section.__doc__ or '').strip().splitlines()[0]}", section(bench))
    print(f"\nwall time {time.perf_counter() - started:.0f} s (load {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
