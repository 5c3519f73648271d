"""Kaggle submission files: read, write, and score against the labels.

A submission is a CSV with header ``patientId,PredictionString`` and one row per patient;
``PredictionString`` is space-separated groups ``confidence x y width height`` (top-left corner,
original 1024-px image pixels), empty when the patient has no box. In memory a submission is a
``dict`` patient id -> float64 ``[M, 5]`` array of those groups, the format :mod:`pneumodet.metrics`
takes.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TextIO

import numpy as np

from pneumodet.errors import LabelsError, SubmissionError
from pneumodet.metrics import MapResult, _check_boxes, rsna_map, xyxy_to_xywh

SUBMISSION_COLUMNS: tuple[str, str] = ("patientId", "PredictionString")
_LABELS_COLUMNS: tuple[str, ...] = ("patientId", "x", "y", "width", "height", "Target")


# ------------------------------------------------------------------ reading
def _parse_prediction_string(text: str) -> np.ndarray:
    """``"c x y w h c x y w h"`` -> ``[M, 5]`` float64; ``ValueError`` says what is wrong."""
    tokens = text.split()
    if len(tokens) % 5:
        raise ValueError(
            f"PredictionString has {len(tokens)} numbers, not groups of 5 (confidence x y width height)"
        )
    try:
        values = np.asarray(tokens, dtype=np.float64)
    except ValueError:
        bad = next(tok for tok in tokens if not _is_number(tok))
        raise ValueError(f"PredictionString value {bad!r} is not a number") from None
    boxes = values.reshape(-1, 5)
    if not np.isfinite(boxes).all():
        raise ValueError("PredictionString contains NaN or infinity")
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
            an empty or duplicate patient id, an unknown patient id, or a malformed
            ``PredictionString`` (group length, non-number, NaN/inf, negative width/height).
            The message names the file and the line.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return _read_rows(path, fh, known_ids)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SubmissionError(f"{path}: cannot read submission: {exc}") from exc


def _read_rows(path: Path, fh: TextIO, known_ids: Collection[str] | None) -> dict[str, np.ndarray]:
    reader = csv.reader(fh)
    rows = ((reader.line_num, row) for row in reader if row)  # line_num: where the row ends
    header_line, header = next(rows, (0, None))
    if header is None:
        raise SubmissionError(f"{path}: empty file, expected header {','.join(SUBMISSION_COLUMNS)}")
    if tuple(field.strip() for field in header) != SUBMISSION_COLUMNS:
        raise SubmissionError(
            f"{path}: line {header_line}: header is {','.join(header)!r}, expected {','.join(SUBMISSION_COLUMNS)}"
        )
    predictions: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    unknown: list[tuple[int, str]] = []  # reported after the whole file is checked, with a count
    for line, row in rows:
        where = f"{path}: line {line}"
        if len(row) != 2:
            raise SubmissionError(f"{where}: expected 2 fields (patientId,PredictionString), got {len(row)}")
        patient_id = row[0].strip()
        if not patient_id:
            raise SubmissionError(f"{where}: empty patientId")
        if patient_id in first_line:
            raise SubmissionError(f"{where}: patient {patient_id} already listed on line {first_line[patient_id]}")
        if known_ids is not None and patient_id not in known_ids:
            unknown.append((line, patient_id))
        try:
            predictions[patient_id] = _parse_prediction_string(row[1])
        except ValueError as exc:
            raise SubmissionError(f"{where}: patient {patient_id}: {exc}") from None
        first_line[patient_id] = line
    if unknown:
        line, patient_id = unknown[0]
        raise SubmissionError(
            f"{path}: line {line}: patient {patient_id} is not in the labels "
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
    """Write a submission CSV atomically (a temporary file renamed over ``path``).

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
    ids = list(predictions) if patient_ids is None else list(patient_ids)
    id_set = set(ids)
    if len(id_set) != len(ids):
        raise SubmissionError(f"{path}: patient_ids lists a patient more than once")
    unwritable = next((pid for pid in ids if not pid.strip() or any(c in pid for c in ',"\r\n')), None)
    if unwritable is not None:
        raise SubmissionError(f"{path}: patient id {unwritable!r} cannot be a CSV field as is")
    missing = [pid for pid in predictions if pid not in id_set]
    if missing:
        raise SubmissionError(
            f"{path}: predictions for {len(missing)} patient(s) not in patient_ids, e.g. {missing[0]!r}"
        )
    lines = [",".join(SUBMISSION_COLUMNS)]
    for pid in ids:
        try:
            boxes = _check_boxes(pid, predictions.get(pid, ()), 5, "predictions")
        except ValueError as exc:
            raise SubmissionError(f"{path}: {exc}") from None
        lines.append(f"{pid},{_format_row(boxes)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only folder: the previous file stays as it was
        Path(tmp).unlink(missing_ok=True)
        raise SubmissionError(f"{path}: cannot write the submission ({exc.strerror or exc}); "
                              "a previous file there is kept unchanged") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------ ground truth and scoring
_CLASS_CSV_NAMES = ("stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv")


def read_ground_truth(
    labels_csv: str | os.PathLike, classes_csv: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The labels as patient id -> ``[N, 4]`` float64 ``(x, y, w, h)`` boxes (``[0, 4]`` if none).

    With a class CSV (``classes_csv``, or the Kaggle one beside ``labels_csv``) the labels go through
    :func:`pneumodet.data.rsna.load_rsna`, checked by the same rules as for training. Without one,
    the labels CSV is read alone with the same strictness on boxes. Either way a problem that would
    drop a patient or a box is an error here: scoring against a partial truth would change the
    score without a word.

    Raises:
        LabelsError: unreadable labels, or a row problem (the message names file and line).
    """
    labels_csv = Path(labels_csv)
    if classes_csv is None:
        classes_csv = next((p for p in (labels_csv.parent / n for n in _CLASS_CSV_NAMES) if p.is_file()), None)
    if classes_csv is None:
        return _read_labels_only(labels_csv)
    from pneumodet.data.rsna import load_rsna

    data = load_rsna(None, labels=labels_csv, classes=Path(classes_csv))
    errors = [p for p in data.report.problems if p.severity == "error"]
    if errors:
        raise LabelsError(
            f"{len(errors)} label problem(s) would drop patients from the ground truth; first: "
            + "; ".join(str(p) for p in errors[:3])
        )
    return {r.patient_id: xyxy_to_xywh(r.boxes_array()).reshape(-1, 4) for r in data.records}


def _read_labels_only(path: Path) -> dict[str, np.ndarray]:
    """``patientId,x,y,width,height,Target`` rows -> ground truth; any unusable row is an error."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError) as exc:
        raise LabelsError(f"{path}: cannot read labels: {exc}") from exc
    absent = [c for c in _LABELS_COLUMNS if c not in df.columns]
    if absent:
        raise LabelsError(f"{path}: missing column(s) {', '.join(absent)}")
    text = df[list(_LABELS_COLUMNS[1:])].apply(lambda col: col.str.strip())
    values = text.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    boxes, target = values[:, :4], values[:, 4]
    has_box = np.isfinite(boxes).all(axis=1)
    problems = {
        "a value is not a number": ((text != "").to_numpy() & ~np.isfinite(values)).any(axis=1),
        "Target is not 0 or 1": ~np.isin(target, (0.0, 1.0)),
        "Target 1 needs a box, Target 0 none": (target == 1) != has_box,
        "width or height <= 0": has_box & (boxes[:, 2:] <= 0).any(axis=1),
        "empty patientId": (df["patientId"].str.strip() == "").to_numpy(),
    }
    for what, bad in problems.items():
        if bad.any():
            raise LabelsError(f"{path}: line {int(np.flatnonzero(bad)[0]) + 2}: {what}")
    ids = df["patientId"].str.strip().to_numpy()
    truth: dict[str, list[np.ndarray]] = {pid: [] for pid in ids}
    for pid, box in zip(ids[has_box], boxes[has_box], strict=True):
        truth[pid].append(box)
    return {pid: np.asarray(b, dtype=np.float64).reshape(-1, 4) for pid, b in truth.items()}


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
