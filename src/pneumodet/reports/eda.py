"""The data exploration report (``pneumodet eda``): what is in an RSNA-format dataset, in one HTML file.

:func:`build_eda_report` loads the labels with :func:`pneumodet.data.rsna.load_rsna`, reads the
DICOM headers of the images present (headers only, capped by ``max_images``) and writes to ``out_dir``:

- ``report.html``: overview, boxes per patient, classes and targets, DICOM metadata, sample images,
  box analysis, each with tables and charts;
- ``summary.json``: the headline numbers (see :func:`build_eda_report`);
- one CSV per table shown in the report (``<name>.csv``).

Two counts are easy to confuse and are kept apart everywhere: *patients* (one per image) and
*label rows* (one per box for Lung Opacity patients, one per patient otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from tqdm.auto import tqdm

from pneumodet.data.records import CLASS_NAMES, RSNA_IMAGE_SIZE, PatientRecord
from pneumodet.data.rsna import PROBLEM_KINDS, Problem, ValidationReport, load_rsna
from pneumodet.errors import ConfigError, DicomReadError
from pneumodet.reports.html import HtmlReport, Section
from pneumodet.safeio import atomic_path, write_json
from pneumodet.textsafe import display_path

__all__ = [
    "IMPOSSIBLE_AGE",
    "MetadataScan",
    "box_frame",
    "build_eda_report",
    "patient_frame",
    "scan_metadata",
]

#: Ages above this (in years) are flagged as impossible (the full RSNA training set has a few above 140).
IMPOSSIBLE_AGE = 100.0
#: Below this many headers a worker pool costs more than it saves.
_POOL_MIN_FILES = 512
_THUMB_SIZE = 360
_FEW_BOXES = 50
#: Below this many boxes, 2-D plots show the boxes as points instead of a hexagon density.
_HEXBIN_MIN_BOXES = 300
_CLASS_COLORS = {"Normal": "#4c9f70", "Lung Opacity": "#d1495b", "No Lung Opacity / Not Normal": "#edae49"}
_VIEW_COLORS = {"AP": "#3066be", "PA": "#e07a5f"}
_IMAGE_KINDS = ("image_missing", "image_unlabelled")
_BOX_QUANTITIES = ["x", "y", "width", "height", "area", "aspect"]
_META_COLUMNS = ("patient_id", "age", "sex", "view_position", "modality", "body_part", "rows", "columns",
                 "photometric_interpretation", "transfer_syntax")


# ---------------------------------------------------------------- frames
def _has_image(record: PatientRecord) -> bool:
    return record.image_path is not None and Path(record.image_path).is_file()


def patient_frame(records: Sequence[PatientRecord]) -> pd.DataFrame:
    """One row per patient: ``patient_id, class, target, boxes, label_rows, has_image``.

    ``label_rows`` is how many rows the patient has in the labels CSV: one per box, or one row
    (with empty coordinates) when the patient has no box.
    """
    boxes = np.fromiter((len(r.boxes) for r in records), dtype=np.int64, count=len(records))
    return pd.DataFrame({
        "patient_id": [r.patient_id for r in records],
        "class": pd.Categorical([r.label_class for r in records], categories=CLASS_NAMES),
        "target": np.fromiter((r.target for r in records), dtype=np.int64, count=len(records)),
        "boxes": boxes,
        "label_rows": np.maximum(boxes, 1),
        "has_image": [_has_image(r) for r in records],
    })


def box_frame(records: Sequence[PatientRecord]) -> pd.DataFrame:
    """One row per labelled box in original pixels: ``patient_id, class, x, y, width, height, cx, cy,
    area, aspect`` (``x, y`` top-left as in the CSV; ``aspect`` = width / height)."""
    rows = [(r.patient_id, r.label_class, *b) for r in records for b in r.boxes]
    frame = pd.DataFrame(rows, columns=["patient_id", "class", "xmin", "ymin", "xmax", "ymax"])
    frame["x"], frame["y"] = frame["xmin"], frame["ymin"]
    frame["width"] = frame["xmax"] - frame["xmin"]
    frame["height"] = frame["ymax"] - frame["ymin"]
    frame["cx"] = (frame["xmin"] + frame["xmax"]) / 2
    frame["cy"] = (frame["ymin"] + frame["ymax"]) / 2
    frame["area"] = frame["width"] * frame["height"]
    frame["aspect"] = frame["width"] / frame["height"].where(frame["height"] > 0)
    return frame.drop(columns=["xmin", "ymin", "xmax", "ymax"])


# ---------------------------------------------------------------- DICOM headers
@dataclass(frozen=True)
class MetadataScan:
    """DICOM header fields of the images present.

    ``frame`` has one row per header read (columns ``patient_id, age, sex, view_position, modality,
    body_part, rows, columns, photometric_interpretation, transfer_syntax``); ``failed`` lists
    ``(path, reason)`` of the files that could not be read; ``present`` is how many images exist,
    of which ``len(frame) + len(failed)`` were scanned.
    """

    frame: pd.DataFrame
    failed: tuple[tuple[str, str], ...]
    present: int

    @property
    def scanned(self) -> int:
        return len(self.frame) + len(self.failed)


def _header_or_error(item: tuple[str, str]) -> tuple[str, dict[str, Any] | None, str | None]:
    """Read one header; errors come back as text so one bad file never stops a pool."""
    from pneumodet.data.dicom import read_dicom

    patient_id, path = item
    try:
        _, meta = read_dicom(path, metadata_only=True)
    except DicomReadError as exc:
        return path, None, exc.cause
    row = {key: meta.get(key) for key in _META_COLUMNS}
    row["patient_id"] = patient_id
    return path, row, None


def scan_metadata(records: Sequence[PatientRecord], *, max_images: int | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool = False) -> MetadataScan:
    """Read the DICOM headers (no pixels) of the records whose image exists.

    At most ``max_images`` headers are read, a seeded random subset when there are more images.
    ``workers`` processes share the work when there are many files (``None``: all cores).
    """
    present = [(r.patient_id, str(r.image_path)) for r in records if _has_image(r)]
    todo = present
    if max_images is not None and len(present) > max_images:
        pick = np.random.default_rng(seed).choice(len(present), size=max_images, replace=False)
        todo = [present[i] for i in sorted(pick)]
    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(todo), desc="DICOM headers", unit="file", disable=not progress)
    if workers > 1 and len(todo) >= _POOL_MIN_FILES:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_header_or_error, todo, chunksize=64), **bar))
    else:
        results = [_header_or_error(item) for item in tqdm(todo, **bar)]
    rows = [row for _, row, _ in results if row is not None]
    failed = tuple((path, reason) for path, row, reason in results if row is None)
    frame = pd.DataFrame(rows, columns=list(_META_COLUMNS))
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    for side in ("rows", "columns"):
        frame[side] = pd.to_numeric(frame[side], errors="coerce").astype("Int64")
    return MetadataScan(frame=frame, failed=failed, present=len(present))


# ---------------------------------------------------------------- tables
def _class_table(patients: pd.DataFrame) -> pd.DataFrame:
    table = patients.groupby("class", observed=False).agg(patients=("patient_id", "size"),
                                                          label_rows=("label_rows", "sum"))
    table.insert(1, "patients_%", 100 * table["patients"] / max(len(patients), 1))
    table["label_rows_%"] = 100 * table["label_rows"] / max(int(table["label_rows"].sum()), 1)
    return table.reset_index()


def _target_table(patients: pd.DataFrame) -> pd.DataFrame:
    table = patients.groupby("target").agg(patients=("patient_id", "size"), label_rows=("label_rows", "sum"))
    table.insert(1, "patients_%", 100 * table["patients"] / max(len(patients), 1))
    return table.reset_index()


def _class_by_target(patients: pd.DataFrame) -> pd.DataFrame:
    table = pd.crosstab(patients["class"], patients["target"].map(lambda t: f"Target {t}"),
                        margins=True, margins_name="all", dropna=False)
    return table.rename_axis(columns=None).reset_index()


def _boxes_per_patient(patients: pd.DataFrame) -> pd.DataFrame:
    """Patients per number of boxes (rows) and per Target/class combination (columns)."""
    combo = patients["class"].astype(str) + " (Target " + patients["target"].astype(str) + ")"
    table = pd.crosstab(patients["boxes"], combo, margins=True, margins_name="all patients")
    table.index = table.index.map(str)
    return table.rename_axis(index="boxes", columns=None).reset_index()


def _age_by_class(meta: pd.DataFrame) -> pd.DataFrame:
    valid = meta[meta["age"] <= IMPOSSIBLE_AGE]
    table = valid.groupby("class", observed=False)["age"].describe()[["count", "mean", "min", "50%", "max"]]
    table = table.rename(columns={"count": "patients", "50%": "median"})
    by_class = meta.groupby("class", observed=False)["age"]
    table["impossible_ages"] = by_class.apply(lambda a: int((a > IMPOSSIBLE_AGE).sum()))
    table["missing_ages"] = by_class.apply(lambda a: int(a.isna().sum()))
    table["patients"] = table["patients"].astype(int)
    return table.reset_index()


def _field_by_class(meta: pd.DataFrame, field: str) -> pd.DataFrame:
    values = meta[field].fillna("(missing)").astype(str)
    table = pd.crosstab(meta["class"], values, margins=True, margins_name="all", dropna=False)
    return table.rename_axis(columns=None).reset_index()



def _image_format(meta: pd.DataFrame) -> pd.DataFrame:
    keys = ["rows", "columns", "photometric_interpretation", "transfer_syntax", "modality", "body_part"]
    table = meta[keys].astype("string").fillna("(missing)").value_counts().rename("images")
    return table.reset_index()


def _box_stats(boxes: pd.DataFrame) -> pd.DataFrame:
    """count, mean, std, min, quartiles and max of each box quantity (one row per quantity)."""
    stats = boxes[_BOX_QUANTITIES].describe().T
    stats["count"] = stats["count"].astype(int)
    return stats.rename_axis("quantity").reset_index()


def _box_medians(boxes: pd.DataFrame, by: str) -> pd.DataFrame:
    """Boxes, patients and the median of each box quantity, per value of ``by``."""
    groups = boxes.groupby(by)
    table = groups[_BOX_QUANTITIES].median().add_prefix("median_")
    table.insert(0, "patients", groups["patient_id"].nunique())
    table.insert(0, "boxes", groups.size())
    return table.reset_index()


# ---------------------------------------------------------------- figures
def _fig(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_facecolor("white")
    return fig


def _class_share_figure(classes: pd.DataFrame) -> Figure:
    fig = _fig(10, 2.9)
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


def _targets_within_class_figure(class_by_target: pd.DataFrame) -> Figure:
    fig = _fig(10, 2.6)
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


def _boxes_per_patient_figure(patients: pd.DataFrame) -> Figure:
    fig = _fig(6.5, 3)
    ax = fig.subplots()
    counts = patients.loc[patients["target"] == 1, "boxes"].value_counts().sort_index()
    bars = ax.bar(counts.index.astype(str), counts.to_numpy(), color=_CLASS_COLORS["Lung Opacity"])
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts.to_numpy()], padding=2, fontsize=9)
    ax.set_xlabel("boxes per patient")
    ax.set_ylabel("patients (Target 1)")
    ax.set_title("Boxes per Lung Opacity patient")
    ax.margins(y=0.15)
    return fig


def _age_figure(meta: pd.DataFrame) -> Figure:
    fig = _fig(10, 3.4)
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
        axes[0].legend(frameon=False, fontsize=8, loc="upper right")
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


def _categorical_figure(meta: pd.DataFrame) -> Figure:
    fig = _fig(10, 3.2)
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
            ax.bar_label(bars, fontsize=8, padding=1)
        ax.set_xticks(x, ["Normal", "Lung Opacity", "No LO / Not Normal"])
        ax.set_ylabel("patients (images read)")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=9)
        ax.margins(y=0.15)
    return fig


def _axis_end(size: int, values: pd.DataFrame) -> float:
    """The frame side, or further when labels reach beyond it (boxes are never clipped in the plots)."""
    return max(float(size), float(np.nanmax(values.to_numpy(dtype=float), initial=0.0)))


def _centre_density_figure(boxes: pd.DataFrame, size: int) -> Figure:
    fig = _fig(7.6, 7)  # proportions that keep the frame close to square (an equal aspect would
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


def _shape_figure(boxes: pd.DataFrame) -> Figure:
    fig = _fig(12, 3.6)
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


def _geometry_figure(boxes: pd.DataFrame, size: int, by: str | None = None) -> Figure:
    """Densities of x, y, width and height; one curve per value of ``by`` (normalised) if given."""
    fig = _fig(10, 5.6)
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
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, hi)
    fig.suptitle("Box position and size" + (f" by {by.replace('_', ' ')}" if by else ""))
    return fig


# ---------------------------------------------------------------- images
def _thumbnail(image: np.ndarray, boxes: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """A ``[S, S, 3]`` uint8 RGB thumbnail of a ``[H, W]`` uint8 image, ``boxes`` (original px) drawn."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    scale = min(1.0, _THUMB_SIZE / max(h, w))  # never enlarge a small image
    pic = Image.fromarray(image).convert("RGB").resize((round(w * scale), round(h * scale)),
                                                       Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(pic)
    for xmin, ymin, xmax, ymax in boxes:
        draw.rectangle([xmin * scale, ymin * scale, xmax * scale, ymax * scale], outline=(255, 40, 40), width=3)
    return np.asarray(pic)


def _caption(record: PatientRecord, meta: dict[str, Any]) -> str:
    age = meta.get("age")
    age_text = "?" if age is None or pd.isna(age) else f"{age:g}"
    return (f"`{record.patient_id}`\n{meta.get('modality') or '?'} · age {age_text} · "
            f"sex {meta.get('sex') or '?'} · {meta.get('view_position') or '?'}\n"
            f"Target {record.target} · {record.label_class}")


@dataclass(frozen=True)
class _Picture:
    record: PatientRecord
    thumb: np.ndarray
    caption: str
    constant: bool = False  # every pixel of the decoded image has one value
    notes: tuple[str, ...] = ()  # what read_dicom worked around or found worth a look


def _pictures(records: Sequence[PatientRecord], *, draw_boxes: bool) -> tuple[list[_Picture], list[tuple[str, str]]]:
    from pneumodet.data.dicom import read_dicom

    pictures, failed = [], []
    for rec in records:
        try:
            image, meta = read_dicom(rec.image_path)
        except DicomReadError as exc:
            failed.append((str(rec.image_path), exc.cause))
            continue
        thumb = _thumbnail(image, rec.boxes if draw_boxes else ())
        caption = _caption(rec, meta) + ("\n**constant image**" if meta["constant_image"] else "")
        pictures.append(_Picture(rec, thumb, caption, constant=bool(meta["constant_image"]),
                                 notes=tuple(meta["image_notes"])))
    return pictures, failed


def _image_notes(pictures: Sequence[_Picture]) -> pd.DataFrame:
    """One row per note of each image decoded (once per file): ``path, patient_id, constant, note``."""
    seen: dict[str, _Picture] = {str(pic.record.image_path): pic for pic in pictures}
    rows = [(display_path(path), pic.record.patient_id, pic.constant, note)
            for path, pic in sorted(seen.items()) for note in pic.notes]
    return pd.DataFrame(rows, columns=["path", "patient_id", "constant", "note"])


def _sample(records: Sequence[PatientRecord], n: int, rng: np.random.Generator) -> list[PatientRecord]:
    if len(records) <= n:
        return list(records)
    return [records[i] for i in sorted(rng.choice(len(records), size=n, replace=False))]


# ---------------------------------------------------------------- the report
def _label_problems(report: ValidationReport) -> list[Problem]:
    """Problems of the labels themselves: everything but the per-image kinds (counted on their own)."""
    return [p for p in report.problems if p.kind not in _IMAGE_KINDS]


def _overview(report: ValidationReport, patients: pd.DataFrame, scan: MetadataScan) -> pd.DataFrame:
    rows = [
        ("label rows (CSV lines)", report.label_rows),
        ("label rows skipped", report.skipped_rows),
        ("unique patients (images)", report.patients),
        ("patients dropped (unusable rows)", report.patients_dropped),
        ("patients with several rows (multi-box)", int((patients["label_rows"] > 1).sum())),
        ("boxes in total", report.boxes),
        ("images found", report.images_found),
        ("images missing", report.images_missing),
        ("image files without labels", report.images_unlabelled),
        ("label problems found", len(_label_problems(report))),
        ("DICOM headers read", len(scan.frame)),
        ("DICOM files unreadable", len(scan.failed)),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"])


def _problem_kinds(report: ValidationReport) -> pd.DataFrame:
    rows = [(kind, PROBLEM_KINDS[kind][0], PROBLEM_KINDS[kind][1], n) for kind, n in report.counts_by_kind().items()]
    return pd.DataFrame(rows, columns=["kind", "severity", "effect", "count"])


def _problem_list(problems: Sequence[Problem]) -> pd.DataFrame:
    rows = [(p.file, p.line, p.kind, p.severity, p.patient_id, p.message) for p in problems]
    frame = pd.DataFrame(rows, columns=["file", "line", "kind", "severity", "patient_id", "message"])
    frame["line"] = frame["line"].astype("Int64")
    return frame


def _with_class(meta: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    return meta.merge(patients[["patient_id", "class", "target"]], on="patient_id", how="left")


class _Writer:
    """Adds tables to a report section and writes each one as ``<name>.csv`` next to the report."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written: list[str] = []

    def save(self, name: str, frame: pd.DataFrame) -> None:
        with atomic_path(self.out_dir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        self.written.append(f"{name}.csv")

    def table(self, section: Section, name: str, frame: pd.DataFrame, caption: str, **kwargs: Any) -> None:
        self.save(name, frame)
        section.table(frame, f"{caption} — `{name}.csv`", **kwargs)

    def remove_stale(self, previous_summary: Path) -> None:
        """Delete the tables an earlier report in this folder wrote and this one did not."""
        try:
            previous = json.loads(previous_summary.read_text(encoding="utf-8")).get("tables", [])
        except (OSError, ValueError, AttributeError):
            return
        for name in set(previous) - set(self.written):
            if isinstance(name, str) and name.endswith(".csv") and Path(name).name == name:
                (self.out_dir / name).unlink(missing_ok=True)


def build_eda_report(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     labels: str | os.PathLike[str] | None = None,
                     classes: str | os.PathLike[str] | None = None,
                     images: str | os.PathLike[str] | None = None, strict: bool = False, seed: int = 0,
                     max_images: int | None = 5000, samples_per_class: int = 4, opacity_grid: int = 8,
                     workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Explore an RSNA-format dataset and write ``report.html``, ``summary.json`` and the table CSVs.

    Args:
        data_dir: folder laid out as the Kaggle download; ``labels``/``classes``/``images`` override parts.
        out_dir: created if needed; files of the same names are replaced, and tables an earlier report
            there wrote but this one does not (e.g. ``impossible_ages.csv``) are removed.
        strict: make any label problem fatal (:class:`~pneumodet.errors.LabelsError`) instead of reporting it.
        seed: picks the sample images (and the header subset when capped).
        max_images: read at most this many DICOM headers (``None``: all).
        samples_per_class: sample images shown per class; ``opacity_grid``: Lung Opacity images with boxes.
        workers: processes reading headers (``None``: all cores; a pool is used for large folders only).

    Returns:
        The summary written to ``summary.json``: ``label_rows, patients, multi_box_patients, boxes,
        images_found, images_missing, label_problems, patients_per_class, rows_per_class,
        patients_per_target, boxes_per_patient`` (``{"0": n, ...}``), ``age`` (``min, median, max`` of
        the possible ages, ``impossible`` and ``missing`` counts), ``sex``, ``view_position``
        (``{"AP": n, "PA": n}``), ``headers_read``, ``headers_failed``, ``images_unreadable``,
        ``images_decoded`` (the sample images decoded) and ``images_constant`` (those of them that came
        out constant; named, with every other decoding note, in ``image_notes.csv``), ``tables``.

    Raises:
        LabelsError: the labels cannot be read (or, under ``strict``, have any problem).
        ConfigError: a count argument is negative, or ``out_dir`` cannot be created.
    """
    for name, value in (("max_images", max_images), ("samples_per_class", samples_per_class),
                        ("opacity_grid", opacity_grid), ("workers", workers)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    data = load_rsna(data_dir, labels=labels, classes=classes, images=images, strict=strict)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the report folder: {exc.strerror or exc}") from exc
    records, vreport = data.records, data.report
    patients = patient_frame(records)
    boxes = box_frame(records)
    scan = scan_metadata(records, max_images=max_images, seed=seed, workers=workers, progress=progress)
    meta = _with_class(scan.frame, patients)
    rng = np.random.default_rng(seed)
    writer = _Writer(out)

    html = HtmlReport("pneumodet — data exploration", subtitle=display_path(data_dir))
    _overview_section(html, writer, _overview(vreport, patients, scan), vreport, _key_facts(patients, boxes))
    _boxes_section(html, writer, patients, _boxes_per_patient(patients))
    class_table, target_table, class_by_target = (_class_table(patients), _target_table(patients),
                                                  _class_by_target(patients))
    _classes_section(html, writer, vreport, class_table, target_table, class_by_target)
    impossible = _metadata_section(html, writer, records, meta, scan)
    image_failures, decoded = _images_section(html, records, rng, samples_per_class, opacity_grid)
    _box_section(html, writer, boxes, meta)
    failures = pd.DataFrame(list(scan.failed) + image_failures, columns=["path", "reason"])
    failures = failures.drop_duplicates("path").reset_index(drop=True)
    failures["path"] = failures["path"].map(display_path)  # shown and written as text: never fails to encode
    if len(failures):
        sec = html.section("Unreadable files", "unreadable")
        sec.text(f"{len(failures)} DICOM file(s) could not be read; they were skipped.")
        writer.table(sec, "unreadable_files", failures, "Files skipped and why")
    constant = _decoded_images_section(html, writer, decoded)

    summary = _summary(vreport, patients, class_table, target_table, meta, impossible, scan, len(failures))
    summary["images_decoded"] = len({str(pic.record.image_path) for pic in decoded})
    summary["images_constant"] = len(constant)
    summary["tables"] = sorted(writer.written)
    writer.remove_stale(out / "summary.json")
    html.write(out / "report.html")
    write_json(out / "summary.json", summary)
    return summary


def _decoded_images_section(html: HtmlReport, writer: _Writer, decoded: Sequence[_Picture]) -> list[str]:
    """What decoding the sample images found (constant images, an unusable VOI LUT or window, extra
    frames), when it found anything; returns the paths of the constant images."""
    notes = _image_notes(decoded)
    constant = sorted(set(notes.loc[notes["constant"], "path"]))
    if len(notes):
        total = len({str(pic.record.image_path) for pic in decoded})
        sec = html.section("Images to look at", "image-notes")
        sec.text(f"Of the {total} image(s) decoded for the samples above, **{len(constant)}** came out "
                 "constant (one value everywhere: nothing to learn from or to predict on). What the decoder "
                 "noted, per file:")
        writer.table(sec, "image_notes", notes, "Decoded images with a note, and the note")
    return constant


def _key_facts(patients: pd.DataFrame, boxes: pd.DataFrame) -> list[str]:
    """A few sentences computed from the labels, for the reader who stops after the first screen."""
    if patients.empty:
        return []
    shares = patients["class"].value_counts(normalize=True)
    positive = patients[patients["target"] == 1]
    facts = [f"Largest class: **{shares.idxmax()}** ({100 * shares.max():.1f} % of patients); "
             f"smallest: **{shares.idxmin()}** ({100 * shares.min():.1f} %)."]
    if len(positive):
        several = (positive["boxes"] > 1).mean()
        facts.append(f"**{100 * len(positive) / len(patients):.1f} %** of patients have Target 1, with "
                     f"{positive['boxes'].mean():.2f} boxes each on average; {100 * several:.1f} % of them "
                     "have two or more boxes.")
    if len(boxes):
        facts.append(f"Median box: {boxes['width'].median():.0f} × {boxes['height'].median():.0f} px "
                     f"(width × height), aspect ratio w/h {boxes['aspect'].median():.2f}.")
    return facts


def _overview_section(html: HtmlReport, writer: _Writer, overview: pd.DataFrame,
                      vreport: ValidationReport, facts: list[str]) -> None:
    sec = html.section("Overview", "overview")
    if facts:
        sec.text("\n".join(f"- {fact}" for fact in facts))
    sec.text("A **label row** is one line of the labels CSV: a Lung Opacity patient has one row per box, "
             "every other patient one row without coordinates. A **patient** is one image.")
    writer.table(sec, "overview", overview, "Dataset at a glance")
    if vreport.images_dir is None:
        sec.note("No images folder: a labels-only run. The image sections below say so.")
    kinds = _problem_kinds(vreport)
    if len(kinds):
        sec.heading("What the label check found")
        writer.table(sec, "problem_kinds", kinds, "Problems per kind, with their effect on rows and patients")
    problems = _label_problems(vreport)
    if problems:
        writer.table(sec, "label_problems", _problem_list(problems),
                     f"The {len(problems):,} label problem(s), each with its file and line", max_rows=25)
    else:
        sec.note("No label problems found: every row parsed, classes and targets agree.")


def _boxes_section(html: HtmlReport, writer: _Writer, patients: pd.DataFrame, bpp: pd.DataFrame) -> None:
    sec = html.section("Boxes per patient", "boxes-per-patient")
    sec.text("Patients (not rows) per number of boxes, for each Target/class combination. "
             "Patients without a box have Target 0; every Lung Opacity patient has at least one box.")
    writer.table(sec, "boxes_per_patient", bpp, "Patients by number of boxes × Target × class")
    if (patients["target"] == 1).any():
        sec.figure(_boxes_per_patient_figure(patients), "Boxes per Lung Opacity patient.")


def _classes_section(html: HtmlReport, writer: _Writer, vreport: ValidationReport, class_table: pd.DataFrame,
                     target_table: pd.DataFrame, class_by_target: pd.DataFrame) -> None:
    sec = html.section("Classes and targets", "classes")
    sec.text("`patients` counts images; `label_rows` counts CSV lines. The two differ only for "
             "Lung Opacity, whose patients have one row per box.")
    used = int(class_table["label_rows"].sum())
    if used != vreport.label_rows:
        sec.note(f"Row counts cover the {used:,} rows of the patients kept; the labels CSV has "
                 f"{vreport.label_rows:,} rows, {vreport.skipped_rows:,} of them skipped (see the overview).")
    writer.table(sec, "patients_per_class", class_table, "Patients and label rows per class")
    writer.table(sec, "patients_per_target", target_table, "Patients and label rows per Target")
    writer.table(sec, "class_by_target", class_by_target, "Patients per class × Target")
    sec.figure(_class_share_figure(class_table), "Class shares counted in patients (left) and in label "
               "rows (right).")
    sec.figure(_targets_within_class_figure(class_by_target), "Target within each class, in patients.")


def _metadata_section(html: HtmlReport, writer: _Writer, records: Sequence[PatientRecord],
                      meta: pd.DataFrame, scan: MetadataScan) -> pd.DataFrame:
    sec = html.section("DICOM metadata", "dicom")
    impossible = meta.loc[meta["age"] > IMPOSSIBLE_AGE, ["patient_id", "age", "sex", "class"]]
    if scan.present == 0:
        sec.note("No images present: the DICOM metadata needs the image files (labels-only run).")
        return impossible
    from pneumodet.data.dicom import dicom_header_text

    capped = f", a seeded random subset of {scan.scanned:,}" if scan.scanned < scan.present else ""
    sec.text(f"Header fields of the **{scan.present:,}** images present{capped} (headers only, no pixels); "
             f"{len(meta):,} read, {len(scan.failed)} unreadable.")
    read_ids = set(meta["patient_id"])
    first = next((r for r in records if r.patient_id in read_ids), None)
    if first is not None:
        sec.heading(f"Technical header of one image ({first.patient_id})")
        sec.text("Only an allow-list of technical elements and the patient ID is shown; every other "
                 "element (names, addresses, dates, institutions, free text, private elements) is withheld "
                 "and counted.")
        sec.pre(dicom_header_text(first.image_path))
    if meta.empty:
        sec.note("No header could be read.")
        return impossible
    sec.heading("Image format")
    writer.table(sec, "image_format", _image_format(meta), "Images per size, pixel format and encoding")
    sec.heading("Age")
    if len(impossible):
        sec.note(f"**{len(impossible)}** impossible age(s) (> {IMPOSSIBLE_AGE:g} years) — excluded from "
                 "the age statistics and charts, listed below.")
        writer.table(sec, "impossible_ages", impossible.reset_index(drop=True),
                     f"Patients with age > {IMPOSSIBLE_AGE:g}")
    else:
        sec.text(f"No impossible ages (> {IMPOSSIBLE_AGE:g} years).")
    missing = int(meta["age"].isna().sum())
    if missing:
        sec.note(f"**{missing}** image(s) without a readable age (tag absent or malformed).")
    writer.table(sec, "age_by_class", _age_by_class(meta), "Age (years) per class, impossible ages excluded")
    sec.figure(_age_figure(meta), "Age against class.")
    sec.heading("Sex and view position")
    writer.table(sec, "sex_by_class", _field_by_class(meta, "sex"), "Patients per sex × class")
    writer.table(sec, "view_by_class", _field_by_class(meta, "view_position"),
                 "Patients per view position × class (AP: front-to-back, bedside; PA: back-to-front, standing)")
    sec.figure(_categorical_figure(meta), "Sex and view position against class (images whose header was read).")
    writer.save("dicom_metadata", meta.sort_values("patient_id").reset_index(drop=True))
    sec.text("Every header read: `dicom_metadata.csv`.")
    return impossible


def _images_section(html: HtmlReport, records: Sequence[PatientRecord], rng: np.random.Generator,
                    per_class: int, opacity_grid: int) -> tuple[list[tuple[str, str]], list[_Picture]]:
    """Sample grids; returns the files that failed and every picture decoded."""
    sec = html.section("Sample images", "samples")
    present = [r for r in records if _has_image(r)]
    if not present:
        sec.note("No images present: this is a labels-only run, there are no images to show.")
        return [], []
    failed: list[tuple[str, str]] = []
    decoded: list[_Picture] = []
    sec.text(f"Random images of each class (seed-fixed), from the {len(present):,} images present.")
    for name in CLASS_NAMES:
        chosen = _sample([r for r in present if r.label_class == name], per_class, rng)
        sec.heading(name)
        if not chosen:
            sec.note(f"No image of class {name} present.")
            continue
        pictures, bad = _pictures(chosen, draw_boxes=False)
        failed += bad
        decoded += pictures
        grid = sec.grid(240)
        for pic in pictures:
            grid.image(pic.thumb, pic.caption)
    sec.heading("Lung Opacity with boxes")
    opacity = _sample([r for r in present if r.target == 1], opacity_grid, rng)
    if not opacity:
        sec.note("No Lung Opacity image present.")
        return failed, decoded
    pictures, bad = _pictures(opacity, draw_boxes=True)
    failed += bad
    decoded += pictures
    grid = sec.grid(240)
    for pic in pictures:
        grid.image(pic.thumb, f"{pic.caption} · {len(pic.record.boxes)} box(es)")
    return failed, decoded


def _frame_size(meta: pd.DataFrame) -> int:
    """The side of the image frame boxes live in: the commonest image side read, else RSNA's 1024."""
    sides = pd.concat([meta["rows"], meta["columns"]]).dropna()
    return int(sides.mode().max()) if len(sides) else RSNA_IMAGE_SIZE


def _box_section(html: HtmlReport, writer: _Writer, boxes: pd.DataFrame, meta: pd.DataFrame) -> None:
    sec = html.section("Box analysis", "box-analysis")
    if boxes.empty:
        sec.note("No labelled boxes in this dataset.")
        return
    size = _frame_size(meta)
    sec.text(f"All **{len(boxes):,}** labelled boxes, in original {size}-px image coordinates "
             "(x, y = top-left corner as in the labels CSV; the centre plot uses box centres).")
    writer.table(sec, "box_stats", _box_stats(boxes), "Box geometry (px; area px²; aspect = width/height)")
    sec.figure(_centre_density_figure(boxes, size), "Where the boxes are: box centres over the frame, with marginal histograms.")
    sec.figure(_shape_figure(boxes), "Box shape: aspect ratio against area, and each on its own.")
    sec.figure(_geometry_figure(boxes, size), "Densities of the box position and size.")
    sec.heading("By view position")
    views = meta[["patient_id", "view_position"]].dropna()
    by_view = boxes.merge(views, on="patient_id", how="inner")
    sec.text(f"Only patients whose image is present (and header read) have a known view position: "
             f"{len(by_view):,} of {len(boxes):,} boxes, from {by_view['patient_id'].nunique():,} patients.")
    if 0 < len(by_view) < _FEW_BOXES:
        sec.note(f"Only {len(by_view)} boxes: read the curves below as individual boxes, not as densities.")
    if by_view.empty:
        sec.note("No box belongs to an image whose header was read: no split by view position.")
        return
    writer.table(sec, "box_medians_by_view", _box_medians(by_view, "view_position"),
                 "Box counts and median geometry by view position (images present only; px, px²)")
    sec.figure(_geometry_figure(by_view, size, by="view_position"),
               "Box position and size by view position (each curve normalised to unit area).")


def _count_dict(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.items()}


def _summary(vreport: ValidationReport, patients: pd.DataFrame, class_table: pd.DataFrame, target_table: pd.DataFrame,
             meta: pd.DataFrame, impossible: pd.DataFrame, scan: MetadataScan,
             unreadable: int) -> dict[str, Any]:
    valid_age = meta.loc[meta["age"] <= IMPOSSIBLE_AGE, "age"]
    age = {"min": None, "median": None, "max": None, "impossible": int(len(impossible)),
           "impossible_threshold": IMPOSSIBLE_AGE, "missing": int(meta["age"].isna().sum())}
    if len(valid_age):
        age.update(min=float(valid_age.min()), median=float(valid_age.median()), max=float(valid_age.max()))
    return {
        "label_rows": int(vreport.label_rows),
        "patients": int(vreport.patients),
        "multi_box_patients": int((patients["label_rows"] > 1).sum()),
        "boxes": int(vreport.boxes),
        "images_found": int(vreport.images_found),
        "images_missing": int(vreport.images_missing),
        "label_problems": len(_label_problems(vreport)),
        "patients_per_class": _count_dict(class_table.set_index("class")["patients"]),
        "rows_per_class": _count_dict(class_table.set_index("class")["label_rows"]),
        "patients_per_target": _count_dict(target_table.set_index("target")["patients"]),
        "boxes_per_patient": _count_dict(patients["boxes"].value_counts().sort_index()),
        "age": age,
        "sex": _count_dict(meta["sex"].value_counts().sort_index()),
        "view_position": _count_dict(meta["view_position"].value_counts().sort_index()),
        "headers_read": int(len(scan.frame)),
        "headers_failed": len(scan.failed),
        "images_unreadable": unreadable,
    }
