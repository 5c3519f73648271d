"""Kaggle submission files: read, write, and score against the labels.

A submission is a CSV with header ``patientId,PredictionString`` and one row per patient;
``PredictionString`` is space-separated groups ``confidence x y width height`` (top-left corner,
original 1024-px image pixels), empty when the patient has no box. In memory a submission is a
``dict`` patient id -> float64 ``[M, 5]`` array of those groups, the format :mod:`pneumodet.metrics`
takes.

Reading is bounded: a patient may have at most :data:`~pneumodet.metrics.MAX_PREDICTED_BOXES` boxes
and a field at most :data:`MAX_FIELD_CHARS` characters (room for that many boxes written with full
float precision), so the cost of reading and scoring grows with the file's size and never with the
square of one patient's boxes.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

import numpy as np

from pneumodet import safeio
from pneumodet.boxes import xyxy_to_xywh
from pneumodet.data.rsna import load_ground_truth
from pneumodet.errors import LabelsError, SubmissionError
from pneumodet.metrics import MAX_ABS_COORDINATE, MAX_PREDICTED_BOXES, MapResult, check_boxes, rsna_map
from pneumodet.textsafe import display_path, display_text

SUBMISSION_COLUMNS: tuple[str, str] = ("patientId", "PredictionString")
#: Longest field read: MAX_PREDICTED_BOXES groups of five numbers of up to 24 characters each
#: (``-1.2345678901234567e+300``), with their spaces. The csv module's default (131 072) would refuse
#: a valid file of about 3 000 boxes for one patient.
MAX_FIELD_CHARS = MAX_PREDICTED_BOXES * 5 * 25


# ------------------------------------------------------------------ reading
def _parse_prediction_string(text: str) -> np.ndarray:
    """``"c x y w h c x y w h"`` -> ``[M, 5]`` float64; ``ValueError`` says what is wrong."""
    tokens = text.split()
    if len(tokens) % 5:
        raise ValueError(
            f"PredictionString has {len(tokens)} numbers, not groups of 5 (confidence x y width height)"
        )
    if len(tokens) > 5 * MAX_PREDICTED_BOXES:  # checked before parsing: the cost of scoring grows with it
        raise ValueError(f"PredictionString has {len(tokens) // 5} boxes, more than the "
                         f"{MAX_PREDICTED_BOXES} one patient may have")
    try:
        values = np.asarray(tokens, dtype=np.float64)
    except ValueError:
        bad = next(tok for tok in tokens if not _is_number(tok))
        raise ValueError(f"PredictionString value {bad!r} is not a number") from None
    boxes = values.reshape(-1, 5)
    if not np.isfinite(boxes).all():
        raise ValueError("PredictionString contains NaN or infinity")
    if (np.abs(boxes[:, 1:]) > MAX_ABS_COORDINATE).any():
        raise ValueError(f"PredictionString has a coordinate beyond +-{MAX_ABS_COORDINATE:g} px, "
                         "which no image has")
    if (boxes[:, 3:] < 0).any():
        raise ValueError("PredictionString has a box with negative width or height")
    return boxes


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_submission(path: str | os.PathLike, *, known_ids: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Read a submission CSV into patient id -> ``[M, 5]`` ``(confidence, x, y, w, h)``.

    Patients keep their file order. Blank lines are skipped.

    Args:
        path: the CSV.
        known_ids: if given, a patient id outside it is an error (e.g. the labelled patients).

    Raises:
        SubmissionError: unreadable or empty file, wrong header, a row without exactly two fields,
            an empty or duplicate patient id, an unknown patient id, a field over
            :data:`MAX_FIELD_CHARS` characters, or a malformed ``PredictionString`` (group length,
            non-number, NaN/inf, a coordinate beyond +-``MAX_ABS_COORDINATE``, negative width/height,
            more than ``MAX_PREDICTED_BOXES`` boxes). The message names the file and the line where
            the row starts.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh, _csv_field_limit(MAX_FIELD_CHARS):
            return _read_rows(display_path(path), fh, known_ids)
    except (OSError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{display_path(path)}: cannot read submission: {exc}") from exc


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's field size limit (process-wide) set to ``limit`` for the block, then restored."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _records(name: str, fh: TextIO) -> Iterator[tuple[int, list[str]]]:
    """``(line where the row starts, fields)`` of every non-blank row (a quoted field may span lines)."""
    reader = csv.reader(fh)
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if row:
                yield start, row
    except csv.Error as exc:
        raise SubmissionError(f"{name}: line {end + 1}: not a readable CSV row ({exc}; a field may hold "
                              f"at most {MAX_FIELD_CHARS} characters, {MAX_PREDICTED_BOXES} boxes)") from None


def _read_rows(name: str, fh: TextIO, known_ids: Collection[str] | None) -> dict[str, np.ndarray]:
    rows = _records(name, fh)
    header_line, header = next(rows, (0, None))
    if header is None:
        raise SubmissionError(f"{name}: empty file, expected header {','.join(SUBMISSION_COLUMNS)}")
    if tuple(field.strip() for field in header) != SUBMISSION_COLUMNS:
        raise SubmissionError(f"{name}: line {header_line}: header is {','.join(header)!r}, "
                              f"expected {','.join(SUBMISSION_COLUMNS)}")
    predictions: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    unknown: list[tuple[int, str]] = []  # reported after the whole file is checked, with a count
    for line, row in rows:
        where = f"{name}: line {line}"
        if len(row) != 2:
            raise SubmissionError(f"{where}: expected 2 fields (patientId,PredictionString), got {len(row)}")
        patient_id = row[0].strip()
        shown = display_text(patient_id)
        if not patient_id:
            raise SubmissionError(f"{where}: empty patientId")
        if patient_id in first_line:
            raise SubmissionError(f"{where}: patient {shown} already listed on line {first_line[patient_id]}")
        if known_ids is not None and patient_id not in known_ids:
            unknown.append((line, shown))
        try:
            predictions[patient_id] = _parse_prediction_string(row[1])
        except ValueError as exc:
            raise SubmissionError(f"{where}: patient {shown}: {exc}") from None
        first_line[patient_id] = line
    if unknown:
        line, shown = unknown[0]
        raise SubmissionError(
            f"{name}: line {line}: patient {shown} is not in the labels "
            f"({len(unknown)} of the file's {len(predictions)} patients are not)"
        )
    return predictions


# ------------------------------------------------------------------ writing
def _format_row(boxes: np.ndarray) -> str:
    return " ".join(f"{c:.4f} {x:.1f} {y:.1f} {w:.1f} {h:.1f}" for c, x, y, w, h in boxes)


def write_submission(
    path: str | os.PathLike,
    predictions: Mapping[str, np.ndarray],
    patient_ids: Iterable[str] | None = None,
) -> Path:
    """Write a submission CSV atomically (:func:`pneumodet.safeio.atomic_open`).

    Scores get 4 decimals, coordinates 1 decimal; boxes keep their order.

    Args:
        path: where to write.
        predictions: patient id -> ``[M, 5]`` ``(confidence, x, y, w, h)`` in original pixels.
        patient_ids: the rows, in order (e.g. every test patient); a patient without predictions
            gets an empty ``PredictionString``. Default: the keys of ``predictions``.

    Raises:
        SubmissionError: a malformed box array, a duplicate or empty patient id, one holding a
            comma, quote or line break, or predictions for a patient that ``patient_ids`` does not
            list (they would be lost).
    """
    path = Path(path)
    name = display_path(path)
    ids = list(predictions) if patient_ids is None else list(patient_ids)
    id_set = set(ids)
    if len(id_set) != len(ids):
        raise SubmissionError(f"{name}: patient_ids lists a patient more than once")
    unwritable = next((pid for pid in ids if not pid.strip() or any(c in pid for c in ',"\r\n')), None)
    if unwritable is not None:
        raise SubmissionError(f"{name}: patient id {unwritable!r} cannot be a CSV field as is")
    missing = [pid for pid in predictions if pid not in id_set]
    if missing:
        raise SubmissionError(
            f"{name}: predictions for {len(missing)} patient(s) not in patient_ids, e.g. {missing[0]!r}"
        )
    lines = [",".join(SUBMISSION_COLUMNS)]
    for pid in ids:
        try:
            boxes = check_boxes(pid, predictions.get(pid, ()), 5, "predictions")
        except ValueError as exc:
            raise SubmissionError(f"{name}: {exc}") from None
        lines.append(f"{pid},{_format_row(boxes)}")
    try:
        with safeio.atomic_open(path, "w", newline="", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    except OSError as exc:  # disk full, read-only folder: the previous file stays as it was
        raise SubmissionError(f"{name}: cannot write the submission ({exc.strerror or exc}); "
                              "a previous file there is kept unchanged") from exc
    return path


# ------------------------------------------------------------------ ground truth and scoring
_CLASS_CSV_NAMES = ("stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv")


def read_ground_truth(
    labels_csv: str | os.PathLike, classes_csv: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The labels as patient id -> ``[N, 4]`` float64 ``(x, y, w, h)`` boxes (``[0, 4]`` if none).

    The labels go through :func:`pneumodet.data.rsna.load_ground_truth`, checked by the same rules
    as for training whether or not a class CSV is used (``classes_csv``, else the Kaggle one beside
    ``labels_csv`` if there is one; it adds the class checks). A problem that would drop a patient or
    a box is an error here: scoring against a partial truth would change the score without a word.
    Warnings are not: a repeated row counts once, a box partly outside the image is kept.

    Raises:
        LabelsError: unreadable labels, or a row problem (the message names file and line).
    """

    labels_csv = Path(labels_csv)
    if classes_csv is None:
        classes_csv = next((p for p in (labels_csv.parent / n for n in _CLASS_CSV_NAMES) if p.is_file()), None)
    truth = load_ground_truth(labels_csv, Path(classes_csv) if classes_csv is not None else None)
    errors = [p for p in truth.report.problems if p.severity == "error"]
    if errors:
        raise LabelsError(
            f"{len(errors)} label problem(s) would drop patients from the ground truth; first: "
            + "; ".join(str(p) for p in errors[:3])
        )
    return {pid: xyxy_to_xywh(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            for pid, boxes in truth.boxes.items()}


def score_submission(
    submission_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    *,
    classes_csv: str | os.PathLike | None = None,
    all_patients: bool = False,
) -> MapResult:
    """Score a submission against the labels with :func:`~pneumodet.metrics.rsna_map`.

    Args:
        submission_csv: the submission.
        labels_csv: ``stage_2_train_labels.csv`` or a file like it.
        classes_csv: see :func:`read_ground_truth`.
        all_patients: also score the labelled patients missing from the submission (as patients
            without predictions). Default: only the submission's patients.

    Raises:
        SubmissionError: a malformed submission, or a patient that the labels do not have.
        LabelsError: unusable labels.
    """
    truth = read_ground_truth(labels_csv, classes_csv)
    predictions = read_submission(submission_csv, known_ids=truth)
    if not all_patients:
        truth = {pid: truth[pid] for pid in predictions}
    return rsna_map(truth, predictions)
