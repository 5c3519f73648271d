"""Training-run reports and experiment comparisons.

* :func:`write_run_report` — one run's ``report.html``: the headline numbers, loss curves, mAP per epoch
  and per IoU threshold, sample validation predictions against ground truth, and the configuration last.
* :func:`compare_runs` — the study's plots across runs: every run's validation curves on one set of axes,
  then per factor (for each augmentation the encoders', for each encoder the augmentations', sample sizes
  for one encoder) and a table of the best validation mAP per run (PNGs + ``report.html``).

Epochs are stored from 0 (``metrics.csv``) and shown from 1 in every figure and table, as ``train`` prints
them (:func:`pneumodet.plotting.display_epochs`); ``best_map.csv``'s ``best_epoch`` counts from 1 too.
Figures are drawn at the width the HTML page shows them (:mod:`pneumodet.plotting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from pneumodet.boxes import kaggle_rows, xyxy_to_xywh  # noqa: E402
from pneumodet.config import TrainConfig  # noqa: E402
from pneumodet.data.records import CLASS_INDEX  # noqa: E402
from pneumodet.errors import ConfigError, PneumodetError, RunError  # noqa: E402
from pneumodet.evaluation import load_run, run_batches, split_loader
from pneumodet.inference import Predictor
from pneumodet.plotting import FIGURE_WIDTH_IN, display_epochs, epoch_axis  # noqa: E402
from pneumodet.reports.html import HtmlReport, Section  # noqa: E402
from pneumodet.rundir import RunDir  # noqa: E402
from pneumodet.safeio import atomic_open, atomic_path  # noqa: E402

#: The validation curves compared across runs: metrics.csv column -> panel title.
CURVES: dict[str, str] = {
    "val_map": "RSNA mAP (best threshold)",
    "val_total": "total loss",
    "val_classification": "classification loss",
    "val_regression": "regression loss",
    "val_global": "global class loss",
}


@dataclass
class RunInfo:
    """What a comparison needs of one run."""

    run_dir: Path
    name: str
    config: TrainConfig
    metrics: pd.DataFrame
    samples: int | None

    @property
    def best_map(self) -> float:
        values = self.metrics["val_map"].dropna() if "val_map" in self.metrics else pd.Series(dtype=float)
        return float(values.max()) if len(values) else float("nan")


def read_run(run_dir: Path) -> RunInfo:
    """Config and per-epoch metrics of a run directory (:class:`RunError` if either is missing or damaged)."""
    run = RunDir(Path(run_dir))
    if not run.is_run():
        raise RunError(f"{run.root} is not a training run: {run.config.name} is missing")
    config = TrainConfig.from_yaml(run.config, stored_run=True)
    rows = run.read_metrics()
    if not rows:
        raise RunError(f"{run.metrics}: no epoch recorded yet")
    return RunInfo(run_dir=run.root, name=run.root.name, config=config, metrics=pd.DataFrame(rows),
                   samples=_split_samples(Path(config.split_dir)))


def _split_samples(split_dir: Path) -> int | None:
    import json

    try:
        info = json.loads((split_dir / "split.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("samples") or sum(info.get("patients", {}).values()) or None


# ------------------------------------------------------------------------------------------ one run
def _loss_figure(metrics: pd.DataFrame, title: str) -> plt.Figure:
    names = ["total", "classification", "regression", "global"]
    epochs = display_epochs(metrics["epoch"])
    fig, axes = plt.subplots(2, 2, figsize=(FIGURE_WIDTH_IN, 6.4), layout="constrained")
    for ax, name in zip(axes.ravel(), names, strict=True):
        for stage, style in (("train", "-"), ("val", "--")):
            column = f"{stage}_{name}"
            if column in metrics:
                ax.plot(epochs, metrics[column], style, marker="o", label=stage)
        ax.set_title(f"{name} loss")
        epoch_axis(ax, epochs)
        ax.set_ylabel("loss")
        ax.legend()
    fig.suptitle(title)
    return fig


def _first_steps_section(section: Section, run: RunDir) -> None:
    """The training losses of each of the first optimiser steps (``first_steps.csv``): an epoch's mean hides
    a spike; this shows whether training was stable from the first step."""
    if not run.first_steps.exists():
        section.note(f"No {run.first_steps.name} in this run (a run trained before pneumodet recorded its first steps).")
        return
    try:
        steps = pd.DataFrame(run.read_first_steps())
    except RunError as err:
        section.note(f"The per-step record cannot be read: {err}")
        return
    if steps.empty or "classification" not in steps:
        section.note(f"{run.first_steps.name} holds no step yet.")
        return
    cls = steps["classification"]
    section.text(f"Classification loss over the first {len(steps)} optimiser steps: mean **{cls.mean():.3f}**, "
                 f"max **{cls.max():.3f}** (step {int(steps.loc[cls.idxmax(), 'step'])}, counted from 0). "
                 "Each step's summed anchor losses are divided by the positive anchors (the recipe's "
                 "`loss_normalizer`; the `normalizer` column of the file).")
    section.figure(_first_steps_figure(steps))


def _first_steps_figure(steps: pd.DataFrame) -> plt.Figure:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH_IN, 3.8), layout="constrained",
                                   width_ratios=(2, 1))
    ax1.plot(steps["step"], steps["classification"], color="tab:blue", linewidth=1, label="classification")
    if "images_with_boxes" in steps:
        empty = steps[steps["images_with_boxes"] == 0]
        ax1.plot(empty["step"], empty["classification"], "x", color="tab:red", label="batch without boxes")
    ax1.set_yscale("log")
    ax1.set_xlabel("optimiser step")
    ax1.set_ylabel("training loss (log scale)")
    ax1.set_title("classification loss per step")
    ax1.legend()
    if "lr" in steps:
        ax2.plot(steps["step"], steps["lr"], color="tab:gray")
    ax2.set_xlabel("optimiser step")
    ax2.set_title("learning rate")
    fig.suptitle("first optimiser steps")
    return fig


def _map_figure(metrics: pd.DataFrame) -> plt.Figure:
    epochs = display_epochs(metrics["epoch"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH_IN, 3.8), layout="constrained")
    ax1.plot(epochs, metrics["val_map"], marker="o", color="tab:green")
    ax1.set_title("validation RSNA mAP\n(at the swept threshold)")
    epoch_axis(ax1, epochs)
    ax1.set_ylabel("RSNA mAP")
    per_t = [c for c in metrics.columns if c.startswith("val_map@")]
    if per_t:
        grid = metrics[per_t].to_numpy(dtype=float)
        image = ax2.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, np.nanmax(grid)),
                           origin="lower")
        ax2.set_yticks(range(len(per_t)), [c.split("@")[1] for c in per_t])
        epoch_axis(ax2, epochs, image=True)
        ax2.set_ylabel("IoU threshold")
        ax2.set_title("validation precision\nper IoU threshold")
        fig.colorbar(image, ax=ax2, label="TP / (TP + FP + FN)")
    else:
        ax2.axis("off")
    return fig


def _sample_predictions(run_dir: Path, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """``(image, gt boxes xywh, kept predictions as Kaggle rows, caption)`` for the first validation images,
    in the model's input frame."""

    model, extra, config = load_run(run_dir)
    loader = split_loader(config, "val", batch_size=min(n, 8))
    threshold = float(extra["threshold"])
    samples = []
    for out in run_batches(Predictor(model, config.image_size), loader):
        batch = out.batch
        for i, pid in enumerate(batch["patient_ids"]):
            rows = kaggle_rows(out.predictions[i].boxes, out.predictions[i].scores)
            gt = xyxy_to_xywh(batch["boxes"][i, : int(batch["num_boxes"][i])].numpy())
            opacity = out.class_probs[i, CLASS_INDEX["Lung Opacity"]]
            samples.append((batch["images"][i, 0].numpy(), gt, rows[rows[:, 0] >= threshold],
                            f"{pid[:8]}… P(opacity) {opacity:.2f}"))
            if len(samples) >= n:
                return samples
    return samples


def _prediction_grid(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> plt.Figure:
    cols = min(4, max(1, len(samples)))
    rows = int(np.ceil(len(samples) / cols))
    side = FIGURE_WIDTH_IN / 4  # four images across the page's width, whatever their number
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, (side + 0.35) * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, gt, pred, caption) in zip(axes.ravel(), samples, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        for x, y, w, h in gt:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="lime", lw=1.6))
        for score, x, y, w, h in pred:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="red", lw=1.2, ls="--"))
            # white on red inside the box's corner: readable on dark and bright film, never off the image
            ax.text(x + 2, y + 2, f"{score:.2f}", color="white", fontsize=9, va="top", ha="left",
                    bbox={"facecolor": "red", "alpha": 0.75, "pad": 1, "linewidth": 0})
        ax.set_title(caption, fontsize=9)
    fig.suptitle("validation images: ground truth (green),\npredictions above the threshold (red)")
    return fig


def write_run_report(run_dir: Path, *, samples: int = 8) -> Path:
    """Write ``RUN_DIR/report.html``; returns its path.

    The report leads with what the run achieved (best validation mAP and its epoch, how it ran), then the
    curves, the per-epoch metrics and sample predictions; the configuration comes last.
    """
    info = read_run(run_dir)
    cfg = info.config
    run = RunDir(Path(run_dir))
    report = HtmlReport(f"Training run {info.name}",
                        f"{cfg.model.encoder} · aug {cfg.aug} · {cfg.image_size} px · {cfg.epochs} epochs · "
                        f"recipe {cfg.recipe}")
    overview = report.section("Overview", "overview")
    overview.text(_overview_text(info, run))
    losses = report.section("Loss curves", "losses")
    losses.figure(_loss_figure(info.metrics, "train (solid) and validation (dashed) losses per epoch"))
    _first_steps_section(report.section("First steps", "first-steps"), run)
    maps = report.section("Validation mAP", "map")
    maps.figure(_map_figure(info.metrics))
    shown = info.metrics.assign(epoch=display_epochs(info.metrics["epoch"]))
    maps.table(shown, f"{run.metrics.name} (epochs counted from 1)", float_format="{:,.4f}")
    preds = report.section("Sample validation predictions", "predictions")
    if run.has_model() and samples > 0:
        preds.figure(_prediction_grid(_sample_predictions(run.root, samples)))
    else:
        preds.note("No best model saved yet: no predictions to show.")
    configuration = report.section("Configuration", "configuration")
    settings = pd.DataFrame([(k, "–" if v is None else str(v)) for k, v in cfg.to_dict().items()],
                            columns=["setting", "value"])
    configuration.table(settings, f"Run configuration ({run.config.name})", max_rows=len(settings))
    return report.write(run.report)


def _overview_text(info: RunInfo, run: RunDir) -> str:
    """The headline: best validation mAP and its epoch (from 1), and, once finished, how the run ran."""
    epochs = len(info.metrics)
    best = _best_epoch(info.metrics)
    where = f" at epoch {best} of {epochs}" if best is not None else f" ({epochs} epoch(s) recorded)"
    lines = [f"Best validation RSNA mAP: **{info.best_map:.4f}**{where}."]
    if not run.is_finished():
        lines.append(f"Training has not finished ({run.done.name} not written yet).")
        return "\n\n".join(lines)
    try:
        done = run.read_done()
    except RunError as err:
        lines.append(f"The run's record cannot be read: {err}")
    else:
        threshold, gated, gated_map = done.get("threshold"), done.get("gate_threshold"), done.get("gate_val_map")
        lines.append("- " + "\n- ".join([
            f"precision: `{done.get('precision', 'not recorded')}`",
            f"encoder started from: {done.get('encoder_weights', 'not recorded')}",
            f"optimiser steps: {done.get('steps', 'not recorded')}",
            "confidence threshold chosen on validation: "
            + (f"{threshold:.2f}" if isinstance(threshold, int | float) else "not recorded"),
            "for gated scores (`--gate`): "
            + (f"{gated:.2f} (validation RSNA mAP {gated_map:.4f})"
               if isinstance(gated, int | float) and isinstance(gated_map, int | float) else "not recorded")]))
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------ comparisons
def _setting(run: RunInfo, name: str) -> str:
    """The run's encoder or augmentation level (the factors a comparison groups by)."""
    return run.config.model.encoder if name == "encoder" else getattr(run.config, name)


def _label(run: RunInfo, by: str) -> str:
    return {"encoder": run.config.model.encoder, "aug": run.config.aug,
            "samples": f"{run.samples} patients" if run.samples else run.name}[by]


def _best_epoch(metrics: pd.DataFrame) -> int | None:
    """The epoch, counted from 1, of the best validation mAP (``None`` when no epoch has one)."""
    if "val_map" not in metrics or not metrics["val_map"].notna().any():
        return None
    return int(display_epochs([metrics.loc[metrics["val_map"].idxmax(), "epoch"]])[0])


def _styles(n: int) -> list[dict[str, str | tuple[float, ...]]]:
    """``n`` distinguishable line styles: the tab10 (tab20 beyond 10) colours, then other dash patterns."""
    colours = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    return [{"color": colours[i % len(colours)], "linestyle": ("-", "--", ":", "-.")[i // len(colours) % 4]}
            for i in range(n)]


def _epochs(runs: Sequence[RunInfo]) -> list[int]:
    return sorted({int(e) for run in runs for e in display_epochs(run.metrics["epoch"])})


def _curve(ax: plt.Axes, run: RunInfo, column: str, style: dict) -> None:
    if column in run.metrics and run.metrics[column].notna().any():
        ax.plot(display_epochs(run.metrics["epoch"]), run.metrics[column], marker="o", markersize=4, **style)


def _legend_handles(labels: Sequence[str], styles: Sequence[dict]) -> list[Line2D]:
    return [Line2D([], [], marker="o", markersize=4, label=label, **style)
            for label, style in zip(labels, styles, strict=True)]


def _all_runs_figure(runs: Sequence[RunInfo]) -> plt.Figure:
    """Every run's validation curves on one set of axes per curve: one line (and legend entry) per run."""
    styles = _styles(len(runs))
    epochs = _epochs(runs)
    fig, axes = plt.subplots(2, 3, figsize=(FIGURE_WIDTH_IN, 6.6), layout="constrained")
    for ax, (column, title) in zip(axes.ravel(), CURVES.items(), strict=False):
        for run, style in zip(runs, styles, strict=True):
            _curve(ax, run, column, style)
        ax.set_title(title)
        epoch_axis(ax, epochs)
        ax.set_ylabel("RSNA mAP" if column == "val_map" else "loss")
    spare = axes.ravel()[len(CURVES):]
    for ax in spare:
        ax.axis("off")
    handles = _legend_handles([run.name for run in runs], styles)
    if len(runs) <= 10 and len(spare):  # the free panel holds the legend
        spare[0].legend(handles=handles, loc="center", frameon=False, title="run", fontsize=10)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=10)
    fig.suptitle("validation curves of every run (epochs from 1)")
    return fig


def _line_labels(chosen: Sequence[RunInfo], varied: str) -> list[str]:
    """A run's value of the varied factor; where two runs of one panel share it, their sample size, then their
    name, tells them apart."""
    labels = [_label(r, varied) for r in chosen]
    for extra in ("samples", "name"):
        twice = {label for label in labels if labels.count(label) > 1}
        if not twice:
            break
        labels = [f"{label} · {r.name if extra == 'name' else _label(r, 'samples')}" if label in twice else label
                  for label, r in zip(labels, chosen, strict=True)]
    return labels


def _factor_figure(groups: Sequence[tuple[str, Sequence[RunInfo]]], varied: str, title: str) -> plt.Figure:
    """One row per group of runs that share the fixed factors (row title ``name``): validation mAP and total
    loss per epoch, one line per run labelled by the ``varied`` factor, each label one colour in every row."""
    labelled = [(name, list(zip(_line_labels(chosen, varied), chosen, strict=True))) for name, chosen in groups]
    labels = sorted({label for _, lines in labelled for label, _ in lines})
    style = dict(zip(labels, _styles(len(labels)), strict=True))
    epochs = _epochs([run for _, chosen in groups for run in chosen])
    fig, axes = plt.subplots(len(groups), 2, figsize=(FIGURE_WIDTH_IN, 2.9 * len(groups) + 1.0), squeeze=False,
                             layout="constrained")
    for row, (name, lines) in zip(axes, labelled, strict=True):
        for ax, column in zip(row, ("val_map", "val_total"), strict=True):
            for label, run in lines:
                _curve(ax, run, column, style[label])
            ax.set_title(f"{name}: {CURVES[column]}")
            epoch_axis(ax, epochs)
            ax.set_ylabel("RSNA mAP" if column == "val_map" else "loss")
    fig.legend(handles=_legend_handles(labels, [style[label] for label in labels]), loc="outside lower center",
               ncols=min(3, len(labels)), frameon=False, fontsize=10, title=varied)
    fig.suptitle(title)
    return fig


def comparison_table(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """One row per run: its factors, epochs trained, best validation mAP and its epoch (counted from 1)."""
    rows = [{"run": run.name, "encoder": run.config.model.encoder, "aug": run.config.aug, "samples": run.samples,
             "epochs": len(run.metrics), "best_val_map": run.best_map, "best_epoch": _best_epoch(run.metrics)}
            for run in runs]
    table = pd.DataFrame(rows).astype({"samples": "Int64", "best_epoch": "Int64"})
    return table.sort_values("best_val_map", ascending=False, na_position="last")


@dataclass
class Comparison:
    """What :func:`compare_runs` wrote, and the runs it could not read (``"<run>: <cause>"``)."""

    report: Path
    compared: int
    skipped: list[str]


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Comparison:
    """Write the comparison PNGs, ``best_map.csv`` and ``report.html`` into ``out_dir``.

    A run whose config or metrics are missing or damaged is skipped and named; the others are compared.
    """
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    runs, skipped = [], []
    for d in run_dirs:
        try:
            runs.append(read_run(Path(d)))
        except PneumodetError as err:
            skipped.append(str(err))
    if not runs:
        raise RunError(f"no run could be compared: {skipped[0]}" + (f" (and {len(skipped) - 1} more)"
                                                                     if len(skipped) > 1 else ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = HtmlReport("Experiment comparison", f"{len(runs)} runs")
    table = comparison_table(runs)
    with atomic_open(out_dir / "best_map.csv", "w", newline="") as f:
        table.to_csv(f, index=False)
    summary = report.section("Best validation mAP per run", "table")
    summary.table(table, "best_epoch: the epoch of the best validation mAP, counted from 1 as train counts",
                  float_format="{:.4f}")
    if skipped:
        summary.note("Runs skipped (unreadable or damaged): " + "; ".join(skipped))

    section = report.section("All runs", "all_runs")
    fig = _all_runs_figure(runs)
    _save_png(fig, out_dir / "all_runs.png")
    section.figure(fig, "Every run on the same axes: validation mAP and losses per epoch, one line per run.")

    factors = [
        (("aug",), "encoder", "Encoders for each augmentation", "by_aug"),
        (("encoder",), "aug", "Augmentations for each encoder", "by_encoder"),
        (("encoder", "aug"), "samples", "Sample sizes for one encoder", "by_samples"),
    ]
    for fixed, varied, title, anchor in factors:
        section = report.section(title, anchor)
        groups = _factor_groups(runs, fixed, varied)
        if not groups:
            section.note(f"No two runs compared differ only in {varied} (with the same "
                         f"{' and '.join(fixed)}): see all runs above.")
            continue
        fig = _factor_figure(groups, varied, f"{title.lower()}: validation curves by {varied}")
        _save_png(fig, out_dir / f"{anchor}.png")
        section.figure(fig, f"One row per {' and '.join(fixed)}; one line per {varied}.")
    return Comparison(report.write(out_dir / "report.html"), len(runs), skipped)


def _factor_groups(runs: Sequence[RunInfo], fixed: Sequence[str], varied: str) -> list[tuple[str, list[RunInfo]]]:
    """``(title, runs)`` for each combination of the ``fixed`` factors whose runs take at least two values of
    ``varied``: a panel of one run compares nothing (those runs are in the all-runs figure)."""
    def value(run: RunInfo, name: str) -> str:
        return str(run.samples) if name == "samples" else _setting(run, name)

    keys = sorted({tuple(value(r, name) for name in fixed) for r in runs})
    groups = []
    for key in keys:
        chosen = [r for r in runs if tuple(value(r, name) for name in fixed) == key]
        if len({value(r, varied) for r in chosen}) >= 2:
            groups.append((", ".join(f"{name} {v}" for name, v in zip(fixed, key, strict=True)), chosen))
    return groups


def _save_png(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
