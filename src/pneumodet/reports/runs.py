"""Training-run reports and experiment comparisons.

* :func:`write_run_report` — one run's ``report.html``: loss curves, mAP per epoch and per IoU
  threshold, sample validation predictions against ground truth.
* :func:`compare_runs` — the study's plots across runs: for each augmentation the encoders' validation
  curves, for each encoder the augmentations', sample sizes for one encoder, and a table of the best
  validation mAP per run (PNGs + ``report.html``).
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

from pneumodet.boxes import kaggle_rows, xyxy_to_xywh  # noqa: E402
from pneumodet.config import TrainConfig  # noqa: E402
from pneumodet.data.records import CLASS_INDEX  # noqa: E402
from pneumodet.errors import ConfigError, PneumodetError, RunError  # noqa: E402
from pneumodet.evaluation import load_run, run_batches, split_loader
from pneumodet.inference import Predictor
from pneumodet.reports.html import HtmlReport  # noqa: E402
from pneumodet.rundir import RunDir  # noqa: E402
from pneumodet.safeio import atomic_open, atomic_path  # noqa: E402

#: The validation curves compared across runs: metrics.csv column -> panel title.
CURVES: dict[str, str] = {
    "val_total": "running (total) loss",
    "val_classification": "classification loss",
    "val_regression": "regression loss",
    "val_global": "global class loss",
    "val_map": "RSNA mAP (best threshold)",
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
    config = TrainConfig.from_yaml(run.config)
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
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, name in zip(axes, names, strict=True):
        for stage, style in (("train", "-"), ("val", "--")):
            column = f"{stage}_{name}"
            if column in metrics:
                ax.plot(metrics["epoch"], metrics[column], style, marker="o", label=stage)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _map_figure(metrics: pd.DataFrame) -> plt.Figure:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    ax1.plot(metrics["epoch"], metrics["val_map"], marker="o", color="tab:green")
    ax1.set_title("validation RSNA mAP at the swept threshold")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("RSNA mAP")
    per_t = [c for c in metrics.columns if c.startswith("val_map@")]
    if per_t:
        grid = metrics[per_t].to_numpy(dtype=float)
        image = ax2.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, np.nanmax(grid)),
                           origin="lower")
        ax2.set_yticks(range(len(per_t)), [c.split("@")[1] for c in per_t])
        ax2.set_xticks(range(len(metrics)), metrics["epoch"].astype(int))
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("IoU threshold")
        ax2.set_title("validation precision per IoU threshold")
        fig.colorbar(image, ax=ax2, label="TP / (TP + FP + FN)")
    fig.tight_layout()
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
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, gt, pred, caption) in zip(axes.ravel(), samples, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        for x, y, w, h in gt:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="lime", lw=1.6))
        for score, x, y, w, h in pred:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="red", lw=1.2, ls="--"))
            ax.text(x, y - 2, f"{score:.2f}", color="red", fontsize=7)
        ax.set_title(caption, fontsize=8)
    fig.suptitle("validation images: ground truth (green) and predictions above the threshold (red)")
    fig.tight_layout()
    return fig


def write_run_report(run_dir: Path, *, samples: int = 8) -> Path:
    """Write ``RUN_DIR/report.html``; returns its path."""
    info = read_run(run_dir)
    cfg = info.config
    report = HtmlReport(f"Training run {info.name}",
                        f"{cfg.model.encoder} · aug {cfg.aug} · {cfg.image_size} px · {cfg.epochs} epochs · "
                        f"recipe {cfg.recipe}")
    overview = report.section("Overview", "overview")
    overview.text(f"Best validation RSNA mAP: **{info.best_map:.4f}**.")
    settings = pd.DataFrame([(k, "–" if v is None else str(v)) for k, v in cfg.to_dict().items()],
                            columns=["setting", "value"])
    overview.table(settings, f"Run configuration ({RunDir(info.run_dir).config.name})")
    losses = report.section("Loss curves", "losses")
    losses.figure(_loss_figure(info.metrics, "train (solid) and validation (dashed) losses per epoch"))
    maps = report.section("Validation mAP", "map")
    maps.figure(_map_figure(info.metrics))
    maps.table(info.metrics, RunDir(info.run_dir).metrics.name)
    preds = report.section("Sample validation predictions", "predictions")
    run = RunDir(Path(run_dir))
    if run.has_model() and samples > 0:
        preds.figure(_prediction_grid(_sample_predictions(run.root, samples)))
    else:
        preds.note("No best model saved yet: no predictions to show.")
    return report.write(run.report)


# ------------------------------------------------------------------------------------------ comparisons
def _setting(run: RunInfo, name: str) -> str:
    """The run's encoder or augmentation level (the factors a comparison groups by)."""
    return run.config.model.encoder if name == "encoder" else getattr(run.config, name)


def _label(run: RunInfo, by: str) -> str:
    return {"encoder": run.config.model.encoder, "aug": run.config.aug,
            "samples": f"{run.samples} patients" if run.samples else run.name}[by]


def _curves_figure(runs: Sequence[RunInfo], by: str, title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.6))
    for ax, (column, panel) in zip(axes, CURVES.items(), strict=True):
        for run in runs:
            if column in run.metrics:
                ax.plot(run.metrics["epoch"], run.metrics[column], marker="o", label=_label(run, by))
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.set_ylabel("RSNA mAP" if column == "val_map" else "loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_table(runs: Sequence[RunInfo]) -> pd.DataFrame:
    rows = []
    for run in runs:
        best_epoch = (int(run.metrics.loc[run.metrics["val_map"].idxmax(), "epoch"])
                      if "val_map" in run.metrics and run.metrics["val_map"].notna().any() else None)
        rows.append({"run": run.name, "encoder": run.config.model.encoder, "aug": run.config.aug,
                     "samples": run.samples, "epochs": len(run.metrics), "best_val_map": run.best_map,
                     "best_epoch": best_epoch})
    return pd.DataFrame(rows).sort_values("best_val_map", ascending=False, na_position="last")


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
    summary.table(table)
    if skipped:
        summary.note("Runs skipped (unreadable or damaged): " + "; ".join(skipped))

    groups = [
        ("aug", "encoder", "Encoders for each augmentation", "by_aug"),
        ("encoder", "aug", "Augmentations for each encoder", "by_encoder"),
    ]
    for fixed, varied, title, anchor in groups:
        section = report.section(title, anchor)
        for value in sorted({_setting(r, fixed) for r in runs}):
            chosen = [r for r in runs if _setting(r, fixed) == value]
            fig = _curves_figure(chosen, varied, f"{fixed} = {value}: validation curves by {varied}")
            _save_png(fig, out_dir / f"{anchor}_{value}.png")
            section.figure(fig, f"{fixed} = {value}")
    section = report.section("Sample sizes for one encoder", "by_samples")
    shown = 0
    for encoder in sorted({r.config.model.encoder for r in runs}):
        chosen = [r for r in runs if r.config.model.encoder == encoder]
        sizes = {r.samples for r in chosen}
        if len(sizes) < 2:
            continue
        for aug in sorted({r.config.aug for r in chosen}):
            same = [r for r in chosen if r.config.aug == aug]
            if len({r.samples for r in same}) < 2:
                continue
            fig = _curves_figure(same, "samples", f"{encoder}, aug {aug}: validation curves by sample size")
            _save_png(fig, out_dir / f"by_samples_{encoder}_{aug}.png")
            section.figure(fig, f"{encoder}, {aug}")
            shown += 1
    if not shown:
        section.note("The runs compared do not differ in sample size for any encoder.")
    return Comparison(report.write(out_dir / "report.html"), len(runs), skipped)


def _save_png(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
