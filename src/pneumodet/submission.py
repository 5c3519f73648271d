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

import numpy as np

from pneumodet.errors import SubmissionError
from pneumodet.metrics import MapResult, _check_boxes, rsna_map

SUBMISSION_COLUMNS: tuple[str, str] = ("patientId", "PredictionString")


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
            return _read_rows(path, csv.reader(fh), known_ids)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SubmissionError(f"{path}: cannot read submission: {exc}") from exc


def _read_rows(path: Path, reader: Iterable[list[str]], known_ids: Collection[str] | None) -> dict[str, np.ndarray]:
    rows = ((reader.line_num, row) for row in reader if row)  # type: ignore[attr-defined]
    header_line, header = next(rows, (0, None))
    if header is None:
        raise SubmissionError(f"{path}: empty file, expected header {','.join(SUBMISSION_COLUMNS)}")
    if tuple(field.strip() for field in header) != SUBMISSION_COLUMNS:
        raise SubmissionError(
            f"{path}: line {header_line}: header is {','.join(header)!r}, expected {','.join(SUBMISSION_COLUMNS)}"
        )
    predictions: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
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
            raise SubmissionError(f"{where}: patient {patient_id} is not in the labels")
        try:
            predictions[patient_id] = _parse_prediction_string(row[1])
        except ValueError as exc:
            raise SubmissionError(f"{where}: patient {patient_id}: {exc}") from None
        first_line[patient_id] = line
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
        SubmissionError: a malformed box array, a duplicate in ``patient_ids``, or predictions
            for a patient that ``patient_ids`` does not list (they would be lost).
    """
    path = Path(path)
    ids = list(predictions) if patient_ids is None else list(patient_ids)
    if len(set(ids)) != len(ids):
        raise SubmissionError(f"{path}: patient_ids lists a patient more than once")
    missing = [pid for pid in predictions if pid not in set(ids)]
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------ ground truth and scoring
def read_ground_truth(labels_csv: str | os.PathLike) -> dict[str, np.ndarray]:
    """The labels CSV as patient id -> ``[N, 4]`` float64 ``(x, y, w, h)`` boxes (``[0, 4]`` if none)."""
    import pandas as pd

    from pneumodet.errors import LabelsError

    path = Path(labels_csv)
    try:
        df = pd.read_csv(path, dtype={"patientId": str})
    except (OSError, ValueError) as exc:
        raise LabelsError(f"{path}: cannot read labels: {exc}") from exc
    cols = ["patientId", "x", "y", "width", "height", "Target"]
    absent = [c for c in cols if c not in df.columns]
    if absent:
        raise LabelsError(f"{path}: missing column(s) {', '.join(absent)}")
    boxes = df[["x", "y", "width", "height"]].to_numpy(np.float64)
    has_box = np.isfinite(boxes).all(axis=1)
    bad = (df["Target"].to_numpy() == 1) != has_box
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2
        raise LabelsError(f"{path}: line {line}: Target and box disagree")
    truth: dict[str, list[np.ndarray]] = {pid: [] for pid in df["patientId"]}
    for pid, box in zip(df["patientId"].to_numpy()[has_box], boxes[has_box], strict=True):
        truth[pid].append(box)
    return {pid: np.asarray(b, dtype=np.float64).reshape(-1, 4) for pid, b in truth.items()}


def score_submission(
    submission_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    *,
    all_patients: bool = False,
) -> MapResult:
    """Score a submission against the labels with :func:`~pneumodet.metrics.rsna_map`.

    Args:
        submission_csv: the submission.
        labels_csv: ``stage_2_train_labels.csv`` or a file like it.
        all_patients: also score the labelled patients missing from the submission (as patients
            without predictions). Default: only the submission's patients.

    Raises:
        SubmissionError: a malformed submission, or a patient that the labels do not have.
        LabelsError: unusable labels.
    """
    truth = read_ground_truth(labels_csv)
    predictions = read_submission(submission_csv, known_ids=truth)
    if not all_patients:
        truth = {pid: truth[pid] for pid in predictions}
    return rsna_map(truth, predictions)
