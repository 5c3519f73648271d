"""The page of the data exploration report: its sections, assembled into one :class:`HtmlReport`.

:func:`eda_page` lays out, in this order: overview (with the label check), boxes per patient, classes
and targets, DICOM metadata, sample images, box analysis, then, only when there is something to say,
unreadable files and images to look at. Every table shown goes through the :class:`TableWriter` (so it
is also written as ``<name>.csv``); nothing else is written here. Prose is computed from the tables,
never from patient data beyond the IDs and the allow-listed header fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pneumodet.data.dicom import dicom_header_text
from pneumodet.data.records import CLASS_NAMES, PatientRecord
from pneumodet.data.rsna import RsnaData, ValidationReport
from pneumodet.reports.eda.figures import (
    age_figure,
    boxes_per_patient_figure,
    categorical_figure,
    centre_density_figure,
    class_share_figure,
    geometry_figure,
    shape_figure,
    targets_within_class_figure,
)
from pneumodet.reports.eda.headers import MetadataScan, has_image
from pneumodet.reports.eda.samples import Picture, choose, image_notes, pictures
from pneumodet.reports.eda.tables import (
    IMPOSSIBLE_AGE,
    LabelTables,
    TableWriter,
    age_by_class,
    box_medians,
    box_stats,
    field_by_class,
    frame_size,
    image_format,
    impossible_ages,
    label_problems,
    overview,
    problem_kinds,
    problem_list,
)
from pneumodet.reports.html import HtmlReport, Section
from pneumodet.textsafe import display_path

__all__ = ["EdaPage", "eda_page"]

_FEW_BOXES = 50
_TITLE = "pneumodet — data exploration"


@dataclass(frozen=True)
class EdaPage:
    """The assembled report, and the counts that only assembling it finds out."""

    html: HtmlReport
    unreadable: int  #: files whose header or pixels could not be read, once per path
    decoded: int  #: image files decoded for the sample grids
    constant: int  #: of those, the images that came out constant


def eda_page(data: RsnaData, labels: LabelTables, scan: MetadataScan, meta: pd.DataFrame, writer: TableWriter,
             *, subtitle: str, seed: int, samples_per_class: int, opacity_grid: int) -> EdaPage:
    """Assemble the report of ``data``; ``meta`` is ``scan.frame`` with each patient's class and target.

    ``seed`` picks the sample images; ``samples_per_class`` images are shown per class and
    ``opacity_grid`` Lung Opacity images with their boxes.
    """
    records, vreport = data.records, data.report
    patients, boxes = labels.patients, labels.boxes
    html = HtmlReport(_TITLE, subtitle=subtitle)
    _overview_section(html, writer, overview(vreport, patients, scan), vreport, _key_facts(patients, boxes))
    _boxes_section(html, writer, patients, labels.boxes_per_patient)
    _classes_section(html, writer, vreport, labels)
    _metadata_section(html, writer, records, meta, scan)
    image_failures, decoded = _images_section(html, records, np.random.default_rng(seed), samples_per_class,
                                              opacity_grid)
    _box_section(html, writer, boxes, meta)
    unreadable = _unreadable_section(html, writer, list(scan.failed) + image_failures)
    constant = _decoded_images_section(html, writer, decoded)
    return EdaPage(html=html, unreadable=unreadable, constant=len(constant),
                   decoded=len({str(pic.record.image_path) for pic in decoded}))


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


def _overview_section(html: HtmlReport, writer: TableWriter, table: pd.DataFrame,
                      vreport: ValidationReport, facts: list[str]) -> None:
    sec = html.section("Overview", "overview")
    if facts:
        sec.text("\n".join(f"- {fact}" for fact in facts))
    sec.text("A **label row** is one line of the labels CSV: a Lung Opacity patient has one row per box, "
             "every other patient one row without coordinates. A **patient** is one image.")
    writer.table(sec, "overview", table, "Dataset at a glance")
    if vreport.images_dir is None:
        sec.note("No images folder: a labels-only run. The image sections below say so.")
    kinds = problem_kinds(vreport)
    if len(kinds):
        sec.heading("What the label check found")
        writer.table(sec, "problem_kinds", kinds, "Problems per kind, with their effect on rows and patients")
    problems = label_problems(vreport)
    if problems:
        writer.table(sec, "label_problems", problem_list(problems),
                     f"The {len(problems):,} label problem(s), each with its file and line", max_rows=25)
    else:
        sec.note("No label problems found: every row parsed, classes and targets agree.")


def _boxes_section(html: HtmlReport, writer: TableWriter, patients: pd.DataFrame, bpp: pd.DataFrame) -> None:
    sec = html.section("Boxes per patient", "boxes-per-patient")
    sec.text("Patients (not rows) per number of boxes, for each Target/class combination. "
             "Patients without a box have Target 0; every Lung Opacity patient has at least one box.")
    writer.table(sec, "boxes_per_patient", bpp, "Patients by number of boxes × Target × class")
    if (patients["target"] == 1).any():
        sec.figure(boxes_per_patient_figure(patients), "Boxes per Lung Opacity patient.")


def _classes_section(html: HtmlReport, writer: TableWriter, vreport: ValidationReport,
                     labels: LabelTables) -> None:
    sec = html.section("Classes and targets", "classes")
    sec.text("`patients` counts images; `label_rows` counts CSV lines. The two differ only for "
             "Lung Opacity, whose patients have one row per box.")
    class_table, class_by_target = labels.classes, labels.class_by_target
    used = int(class_table["label_rows"].sum())
    if used != vreport.label_rows:
        sec.note(f"Row counts cover the {used:,} rows of the patients kept; the labels CSV has "
                 f"{vreport.label_rows:,} rows, {vreport.skipped_rows:,} of them skipped (see the overview).")
    writer.table(sec, "patients_per_class", class_table, "Patients and label rows per class")
    writer.table(sec, "patients_per_target", labels.targets, "Patients and label rows per Target")
    writer.table(sec, "class_by_target", class_by_target, "Patients per class × Target")
    sec.figure(class_share_figure(class_table), "Class shares counted in patients (left) and in label "
               "rows (right).")
    sec.figure(targets_within_class_figure(class_by_target), "Target within each class, in patients.")


def _metadata_section(html: HtmlReport, writer: TableWriter, records: Sequence[PatientRecord],
                      meta: pd.DataFrame, scan: MetadataScan) -> None:
    sec = html.section("DICOM metadata", "dicom")
    if scan.present == 0:
        sec.note("No images present: the DICOM metadata needs the image files (labels-only run).")
        return
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
        return
    sec.heading("Image format")
    writer.table(sec, "image_format", image_format(meta), "Images per size, pixel format and encoding")
    sec.heading("Age")
    impossible = impossible_ages(meta)
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
    writer.table(sec, "age_by_class", age_by_class(meta), "Age (years) per class, impossible ages excluded")
    sec.figure(age_figure(meta), "Age against class.")
    sec.heading("Sex and view position")
    writer.table(sec, "sex_by_class", field_by_class(meta, "sex"), "Patients per sex × class")
    writer.table(sec, "view_by_class", field_by_class(meta, "view_position"),
                 "Patients per view position × class (AP: front-to-back, bedside; PA: back-to-front, standing)")
    sec.figure(categorical_figure(meta), "Sex and view position against class (images whose header was read).")
    writer.save("dicom_metadata", meta.sort_values("patient_id").reset_index(drop=True))
    sec.text("Every header read: `dicom_metadata.csv`.")


def _images_section(html: HtmlReport, records: Sequence[PatientRecord], rng: np.random.Generator,
                    per_class: int, opacity_grid: int) -> tuple[list[tuple[str, str]], list[Picture]]:
    """Sample grids; returns the files that failed and every picture decoded."""
    sec = html.section("Sample images", "samples")
    present = [r for r in records if has_image(r)]
    if not present:
        sec.note("No images present: this is a labels-only run, there are no images to show.")
        return [], []
    failed: list[tuple[str, str]] = []
    decoded: list[Picture] = []
    sec.text(f"Random images of each class (seed-fixed), from the {len(present):,} images present.")
    for name in CLASS_NAMES:
        chosen = choose([r for r in present if r.label_class == name], per_class, rng)
        sec.heading(name)
        if not chosen:
            sec.note(f"No image of class {name} present.")
            continue
        shown, bad = _grid(sec, chosen, draw_boxes=False)
        decoded += shown
        failed += bad
    sec.heading("Lung Opacity with boxes")
    opacity = choose([r for r in present if r.target == 1], opacity_grid, rng)
    if not opacity:
        sec.note("No Lung Opacity image present.")
        return failed, decoded
    shown, bad = _grid(sec, opacity, draw_boxes=True)
    return failed + bad, decoded + shown


def _grid(sec: Section, records: Sequence[PatientRecord], *,
          draw_boxes: bool) -> tuple[list[Picture], list[tuple[str, str]]]:
    """One grid of the records' thumbnails (with their boxes and box count when ``draw_boxes``);
    returns the pictures shown and the files that failed (see :func:`pictures`)."""
    shown, bad = pictures(records, draw_boxes=draw_boxes)
    grid = sec.grid(240)
    for pic in shown:
        grid.image(pic.thumb, f"{pic.caption} · {len(pic.record.boxes)} box(es)" if draw_boxes else pic.caption)
    return shown, bad


def _box_section(html: HtmlReport, writer: TableWriter, boxes: pd.DataFrame, meta: pd.DataFrame) -> None:
    sec = html.section("Box analysis", "box-analysis")
    if boxes.empty:
        sec.note("No labelled boxes in this dataset.")
        return
    size = frame_size(meta)
    sec.text(f"All **{len(boxes):,}** labelled boxes, in original {size}-px image coordinates "
             "(x, y = top-left corner as in the labels CSV; the centre plot uses box centres).")
    writer.table(sec, "box_stats", box_stats(boxes), "Box geometry (px; area px²; aspect = width/height)")
    sec.figure(centre_density_figure(boxes, size),
               "Where the boxes are: box centres over the frame, with marginal histograms.")
    sec.figure(shape_figure(boxes), "Box shape: aspect ratio against area, and each on its own.")
    sec.figure(geometry_figure(boxes, size), "Densities of the box position and size.")
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
    writer.table(sec, "box_medians_by_view", box_medians(by_view, "view_position"),
                 "Box counts and median geometry by view position (images present only; px, px²)")
    sec.figure(geometry_figure(by_view, size, by="view_position"),
               "Box position and size by view position (each curve normalised to unit area).")


def _unreadable_section(html: HtmlReport, writer: TableWriter, failed: Sequence[tuple[str, str]]) -> int:
    """List the files that could not be read (once per path), when there are any; returns how many."""
    failures = pd.DataFrame(list(failed), columns=["path", "reason"])
    failures = failures.drop_duplicates("path").reset_index(drop=True)
    failures["path"] = failures["path"].map(display_path)  # shown and written as text: never fails to encode
    if len(failures):
        sec = html.section("Unreadable files", "unreadable")
        sec.text(f"{len(failures)} DICOM file(s) could not be read; they were skipped.")
        writer.table(sec, "unreadable_files", failures, "Files skipped and why")
    return len(failures)


def _decoded_images_section(html: HtmlReport, writer: TableWriter, decoded: Sequence[Picture]) -> list[str]:
    """What decoding the sample images found (constant images, an unusable VOI LUT or window, extra
    frames), when it found anything; returns the paths of the constant images."""
    notes = image_notes(decoded)
    constant = sorted(set(notes.loc[notes["constant"], "path"]))
    if len(notes):
        total = len({str(pic.record.image_path) for pic in decoded})
        sec = html.section("Images to look at", "image-notes")
        sec.text(f"Of the {total} image(s) decoded for the samples above, **{len(constant)}** came out "
                 "constant (one value everywhere: nothing to learn from or to predict on). What the decoder "
                 "noted, per file:")
        writer.table(sec, "image_notes", notes, "Decoded images with a note, and the note")
    return constant
