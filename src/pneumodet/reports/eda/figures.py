"""The charts of the data exploration report: one function per figure, each a pure function of its tables.

Each returns a new matplotlib :class:`~matplotlib.figure.Figure` (no pyplot, no global state), white,
with a constrained layout; the page embeds it as a PNG. Below ``_HEXBIN_MIN_BOXES`` boxes, 2-D plots
show the boxes as points instead of a hexagon density (a density of a handful of points is noise).
Box plots never clip: their axes reach past the image frame when labels do.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from pneumodet.data.records import CLASS_NAMES, CLASS_SHORT_NAMES
from pneumodet.reports.eda.tables import IMPOSSIBLE_AGE

__all__ = [
    "age_figure",
    "boxes_per_patient_figure",
    "categorical_figure",
    "centre_density_figure",
    "class_share_figure",
    "geometry_figure",
    "shape_figure",
    "targets_within_class_figure",
]

_HEXBIN_MIN_BOXES = 300
_CLASS_COLORS = {"Normal": "#4c9f70", "Lung Opacity": "#d1495b", "No Lung Opacity / Not Normal": "#edae49"}
_VIEW_COLORS = {"AP": "#3066be", "PA": "#e07a5f"}


def _new_figure(width: float, height: float) -> Figure:
    # at most 10 inches (1100 px at the report's 110 dpi), and no text under 9 pt: the page shows a figure
    # at most ~1010 px wide, where a 9 pt label is still 12 px tall (pneumodet.plotting)
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_facecolor("white")
    return fig


def class_share_figure(classes: pd.DataFrame) -> Figure:
    """Class shares in patients (left) and in label rows (right), from the per-class table."""
    fig = _new_figure(10, 2.9)
    axes = fig.subplots(1, 2, sharey=True)
    labels = list(classes["class"].astype(str))
    colors = [_CLASS_COLORS.get(c, "grey") for c in labels]
    for ax, col, counts, title in ((axes[0], "patients_%", "patients", "Share of patients (images)"),
                                   (axes[1], "label_rows_%", "label_rows", "Share of label rows (CSV lines)")):
        bars = ax.barh(labels, classes[col], color=colors)
        ax.bar_label(bars, labels=[f"{p:.1f} %  (n={n:,})" for p, n in zip(classes[col], classes[counts],
                                                                             strict=True)],
                     padding=3, fontsize=9)
        ax.set_xlim(0, max(100.0, float(classes[col].max()) * 1.45))
        ax.xaxis.set_major_formatter(PercentFormatter())
        ax.set_xlabel("share (%)")
        ax.set_title(title)
    axes[0].invert_yaxis()  # shared y: inverting once flips both
    fig.suptitle("Class shares")
    return fig


def targets_within_class_figure(class_by_target: pd.DataFrame) -> Figure:
    """Target 0 and Target 1 patients stacked within each class (margins row ignored)."""
    fig = _new_figure(10, 2.6)
    ax = fig.subplots()
    rows = class_by_target[class_by_target["class"] != "all"]
    labels = list(rows["class"].astype(str))
    left = np.zeros(len(rows))
    for col, color in (("Target 0", "#8d99ae"), ("Target 1", "#d1495b")):
        if col not in rows:
            continue
        values = rows[col].to_numpy(dtype=float)
        bars = ax.barh(labels, values, left=left, color=color, label=col)
        ax.bar_label(bars, labels=[f"{int(v):,}" if v else "" for v in values], label_type="center",
                     fontsize=9, color="white")
        left += values
    ax.invert_yaxis()
    ax.set_xlabel("patients")
    ax.set_title("Target within each class (patients)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def boxes_per_patient_figure(patients: pd.DataFrame) -> Figure:
    """Target 1 patients per number of boxes."""
    fig = _new_figure(6.5, 3)
    ax = fig.subplots()
    counts = patients.loc[patients["target"] == 1, "boxes"].value_counts().sort_index()
    bars = ax.bar(counts.index.astype(str), counts.to_numpy(), color=_CLASS_COLORS["Lung Opacity"])
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts.to_numpy()], padding=2, fontsize=9)
    ax.set_xlabel("boxes per patient")
    ax.set_ylabel("patients (Target 1)")
    ax.set_title("Boxes per Lung Opacity patient")
    ax.margins(y=0.15)
    return fig


def age_figure(meta: pd.DataFrame) -> Figure:
    """Age histograms and box plots per class, ages above ``IMPOSSIBLE_AGE`` left out."""
    fig = _new_figure(10, 3.4)
    axes = fig.subplots(1, 2)
    valid = meta[meta["age"] <= IMPOSSIBLE_AGE]
    bins = np.arange(0, IMPOSSIBLE_AGE + 5, 5)
    for name in CLASS_NAMES:
        ages = valid.loc[valid["class"] == name, "age"]
        if len(ages):
            axes[0].hist(ages, bins=bins, histtype="step", linewidth=2, color=_CLASS_COLORS[name],
                         label=f"{name} (n={len(ages)})")
    axes[0].set_xlabel("age (years)")
    axes[0].set_ylabel("patients")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.35)  # headroom for the legend
    axes[0].set_title(f"Age by class (ages ≤ {IMPOSSIBLE_AGE:g})")
    if len(valid):
        axes[0].legend(frameon=False, fontsize=9, loc="upper right")
    groups = [valid.loc[valid["class"] == n, "age"].to_numpy() for n in CLASS_NAMES]
    present = [i for i, g in enumerate(groups) if len(g)]
    if present:
        box = axes[1].boxplot([groups[i] for i in present], orientation="horizontal", patch_artist=True,
                              tick_labels=[CLASS_NAMES[i] for i in present], widths=0.6)
        for patch, i in zip(box["boxes"], present, strict=True):
            patch.set_facecolor(_CLASS_COLORS[CLASS_NAMES[i]])
        axes[1].invert_yaxis()
    axes[1].set_xlabel("age (years)")
    axes[1].set_title("Age distribution per class")
    return fig


def categorical_figure(meta: pd.DataFrame) -> Figure:
    """Patients per sex and per view position, against class (headers read only)."""
    fig = _new_figure(10, 3.2)
    axes = fig.subplots(1, 2)
    for ax, field, title in ((axes[0], "sex", "Sex by class"), (axes[1], "view_position", "View position by class")):
        table = pd.crosstab(meta["class"], meta[field].fillna("(missing)").astype(str), dropna=False)
        table = table.reindex(list(CLASS_NAMES), fill_value=0)
        n = len(table.columns)
        width = 0.8 / max(n, 1)
        x = np.arange(len(table.index))
        for j, value in enumerate(table.columns):
            bars = ax.bar(x + (j - (n - 1) / 2) * width, table[value], width, label=value,
                          color=_VIEW_COLORS.get(value))
            ax.bar_label(bars, fontsize=9, padding=1)
        ax.set_xticks(x, [CLASS_SHORT_NAMES[name] for name in table.index])
        ax.set_ylabel("patients (images read)")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=9)
        ax.margins(y=0.15)
    return fig


def _axis_end(size: int, values: pd.DataFrame) -> float:
    """The frame side, or further when labels reach beyond it (boxes are never clipped in the plots)."""
    return max(float(size), float(np.nanmax(values.to_numpy(dtype=float), initial=0.0)))


def centre_density_figure(boxes: pd.DataFrame, size: int) -> Figure:
    """Box centres over the ``size`` x ``size`` frame, with marginal histograms."""
    fig = _new_figure(7.6, 7)  # proportions that keep the frame close to square (an equal aspect would
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))  # misalign the marginals)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    side = fig.add_subplot(grid[1, 1], sharey=ax)
    hi = _axis_end(size, boxes[["cx", "cy"]])
    if len(boxes) >= _HEXBIN_MIN_BOXES:
        hb = ax.hexbin(boxes["cx"], boxes["cy"], gridsize=40, extent=(0, hi, 0, hi), cmap="magma_r",
                       mincnt=1)
        fig.colorbar(hb, ax=side, label="boxes per hexagon", location="right")
    else:  # a density of a handful of points is noise: show the points
        ax.scatter(boxes["cx"], boxes["cy"], s=28, color="#d1495b", alpha=0.8, edgecolors="white")
    ax.set_xlim(0, hi)
    ax.set_ylim(hi, 0)  # image coordinates: y grows downwards
    ax.set_xlabel("box centre x (px)")
    ax.set_ylabel("box centre y (px)")
    bins = np.linspace(0, hi, 65)
    top.hist(boxes["cx"], bins=bins, color="#555")
    top.set_ylabel("boxes")
    top.tick_params(labelbottom=False)
    side.hist(boxes["cy"], bins=bins, orientation="horizontal", color="#555")
    side.set_xlabel("boxes")
    side.tick_params(labelleft=False)
    for marginal in (top.yaxis, side.xaxis):
        marginal.set_major_locator(MaxNLocator(nbins=3, integer=True))
    fig.suptitle(f"Box centres over the {size}×{size} frame ({len(boxes):,} boxes)")
    return fig


def shape_figure(boxes: pd.DataFrame) -> Figure:
    """Aspect ratio against area, and each on its own."""
    fig = _new_figure(10, 3.6)
    fig.get_layout_engine().set(wspace=0.06)  # room between the colour bar and the next panel
    axes = fig.subplots(1, 3)
    area_k = boxes["area"] / 1000
    if len(boxes) >= _HEXBIN_MIN_BOXES:
        hb = axes[0].hexbin(area_k, boxes["aspect"], gridsize=35, cmap="viridis", mincnt=1, bins="log")
        fig.colorbar(hb, ax=axes[0], label="boxes (log scale)")
    else:
        axes[0].scatter(area_k, boxes["aspect"], s=24, color="#3066be", alpha=0.8)
    axes[0].set_xlabel("area (1000 px²)")
    axes[0].set_ylabel("aspect ratio w/h")
    axes[0].set_title("Aspect ratio vs area")
    axes[1].hist(boxes["aspect"].dropna(), bins=50, color="#3066be")
    axes[1].axvline(1.0, color="k", linestyle="--", linewidth=1)
    axes[1].set_xlabel("aspect ratio w/h (1 = square)")
    axes[1].set_ylabel("boxes")
    axes[1].set_title("Aspect ratio")
    axes[2].hist(area_k, bins=50, color="#d1495b")
    axes[2].set_xlabel("area (1000 px²)")
    axes[2].set_ylabel("boxes")
    axes[2].set_title("Area")
    for ax in axes[1:]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def geometry_figure(boxes: pd.DataFrame, size: int, by: str | None = None) -> Figure:
    """Densities of x, y, width and height; one curve per value of ``by`` (normalised) if given."""
    fig = _new_figure(10, 5.6)
    axes = fig.subplots(2, 2).ravel()
    quantities = (("x", "box left edge x (px)"), ("y", "box top edge y (px)"),
                  ("width", "box width (px)"), ("height", "box height (px)"))
    hi = _axis_end(size, boxes[[col for col, _ in quantities]])
    bins = np.linspace(0, hi, 52)
    for ax, (col, label) in zip(axes, quantities, strict=True):
        if by is None:
            ax.hist(boxes[col], bins=bins, color="#3066be")
            ax.set_ylabel("boxes")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            for value, group in boxes.groupby(by):
                ax.hist(group[col], bins=bins, density=True, histtype="step", linewidth=2,
                        color=_VIEW_COLORS.get(str(value)), label=f"{value} (n={len(group)})")
            ax.set_ylabel("density (1/px)")
            ax.legend(frameon=False, fontsize=9)
        ax.set_xlabel(label)
        ax.set_xlim(0, hi)
    fig.suptitle("Box position and size" + (f" by {by.replace('_', ' ')}" if by else ""))
    return fig
