"""The RSNA labels: two CSVs and an image folder become one :class:`PatientRecord` per patient.

The Kaggle download holds ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``, one row
per box, one box-less row per negative patient), ``stage_2_detailed_class_info.csv`` (``patientId,class``,
one row per labels row) and ``stage_2_train_images/<patientId>.dcm``; ``stage_1_*`` names are accepted too.
Boxes are turned from ``x, y, width, height`` (top-left corner) into Pascal VOC ``(xmin, ymin, xmax, ymax)``.

Every problem is reported as a :class:`Problem` naming the file and its 1-based line (header = line 1):
the line of the file where the row starts, also when an earlier quoted field holds a line break.
What happens to the row and the patient depends on the kind; the rule is that a patient is kept only
when all of its label rows are usable, because a positive patient with a box missing would teach the
model (and score it) against a wrong truth. Nothing is clipped or repaired.

==========================  ========  ================================================================
kind                        severity  effect
==========================  ========  ================================================================
utf8_bom, crlf_line_endings note      read correctly (Excel re-save)
semicolon_delimiter         note      read correctly, decimal commas accepted (Excel re-save)
extra_columns               note      columns ignored
empty_row                   note      row without any value skipped, nothing lost
wrong_field_count           error     row skipped, its patient dropped
missing_patient_id          error     row skipped
non_numeric                 error     row skipped, patient dropped
absurd_value                error     coordinate beyond +-MAX_ABS_COORDINATE px: row skipped, patient dropped
bad_target                  error     Target empty or not 0/1: row skipped, patient dropped
missing_box                 error     Target 1 with an empty box: row skipped, patient dropped
unexpected_box              error     Target 0 with a box: row skipped, patient dropped
bad_box_size                error     width or height <= 0: row skipped, patient dropped
box_off_image               error     box entirely outside the 1024 x 1024 image: patient dropped
box_outside                 warning   box partly outside the image: kept unchanged, patient kept
duplicate_row               warning   exact repeat of an earlier labels row: repeat skipped
target_conflict             error     patient has Target 0 and Target 1 rows: patient dropped
too_many_boxes              error     over MAX_GROUND_TRUTH_BOXES boxes (RSNA: at most 4): patient dropped
unknown_class               error     class not one of CLASS_NAMES: patient dropped
class_conflict              error     patient has two different classes: patient dropped
missing_class               error     patient in the labels CSV only: dropped
missing_labels              error     patient in the class CSV only: dropped
class_target_mismatch       error     Lung Opacity without Target 1 or vice versa: patient dropped
image_missing               warning   images folder in use but no ``<patientId>.dcm``: patient kept
image_unlabelled            warning   ``.dcm`` file of no labelled patient: file ignored
==========================  ========  ================================================================

The class CSV repeats a patient's row once per labels row by design, so repeats there are not problems.
:func:`load_ground_truth` applies every labels-CSV rule above (all but the class and image ones) with
or without a class CSV, so a score never depends on whether one lies beside the labels.
``strict=True`` turns any error or warning into a :class:`~pneumodet.errors.LabelsError`; notes never are.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pneumodet.data.records import CLASS_NAMES, RSNA_IMAGE_SIZE, PatientRecord
from pneumodet.errors import LabelsError
from pneumodet.metrics import MAX_ABS_COORDINATE, MAX_GROUND_TRUTH_BOXES
from pneumodet.textsafe import display_path, display_text

Severity = Literal["error", "warning", "note"]

LABELS_COLUMNS: tuple[str, ...] = ("patientId", "x", "y", "width", "height", "Target")
CLASSES_COLUMNS: tuple[str, ...] = ("patientId", "class")
BOX_COLUMNS: tuple[str, ...] = ("x", "y", "width", "height")
POSITIVE_CLASS = "Lung Opacity"

#: Every problem kind, its severity and what happens to the row / patient.
PROBLEM_KINDS: dict[str, tuple[Severity, str]] = {
    "utf8_bom": ("note", "read correctly"),
    "crlf_line_endings": ("note", "read correctly"),
    "semicolon_delimiter": ("note", "read correctly"),
    "extra_columns": ("note", "ignored"),
    "empty_row": ("note", "row skipped"),
    "wrong_field_count": ("error", "row skipped, patient dropped"),
    "missing_patient_id": ("error", "row skipped"),
    "non_numeric": ("error", "row skipped, patient dropped"),
    "absurd_value": ("error", "row skipped, patient dropped"),
    "bad_target": ("error", "row skipped, patient dropped"),
    "missing_box": ("error", "row skipped, patient dropped"),
    "unexpected_box": ("error", "row skipped, patient dropped"),
    "bad_box_size": ("error", "row skipped, patient dropped"),
    "box_off_image": ("error", "row skipped, patient dropped"),
    "box_outside": ("warning", "box kept unchanged"),
    "duplicate_row": ("warning", "repeat skipped"),
    "target_conflict": ("error", "patient dropped"),
    "too_many_boxes": ("error", "patient dropped"),
    "unknown_class": ("error", "row skipped, patient dropped"),
    "class_conflict": ("error", "patient dropped"),
    "missing_class": ("error", "patient dropped"),
    "missing_labels": ("error", "patient dropped"),
    "class_target_mismatch": ("error", "patient dropped"),
    "image_missing": ("warning", "patient kept without image"),
    "image_unlabelled": ("warning", "file ignored"),
}

_STAGES = ("stage_2", "stage_1")
_BOM = b"\xef\xbb\xbf"
_CHUNK_ROWS = 200_000
_BAD_LINE = re.compile(r"Skipping line (\d+): ([^\n]*)")
_LONG_FIRST_ROW = "Length of header or names does not match length of data"


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth knowing) about an input file, at a 1-based line (``None``: whole file)."""

    file: str
    line: int | None
    kind: str
    message: str
    patient_id: str | None = None

    @property
    def severity(self) -> Severity:
        return PROBLEM_KINDS[self.kind][0]

    def __str__(self) -> str:
        """``file:line: kind: message`` on one printable line (a patient id may hold any character)."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {display_text(self.message)}"


@dataclass
class ValidationReport:
    """What :func:`load_rsna` read, kept, skipped and found wrong.

    ``label_rows`` counts the data rows of the labels CSV (empty rows excluded); ``skipped_rows`` those
    of them that did not become a box or a negative record, so ``label_rows - skipped_rows`` rows are used.
    File names are display text (:func:`~pneumodet.textsafe.display_path`: printable whatever bytes the
    real names hold); ``classes_file`` is ``""`` when no class CSV was read.
    """

    labels_file: str = ""
    classes_file: str = ""
    images_dir: str | None = None
    label_rows: int = 0
    class_rows: int = 0
    patients: int = 0
    boxes: int = 0
    images_found: int = 0
    images_missing: int = 0
    images_unlabelled: int = 0
    skipped_rows: int = 0
    patients_dropped: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, file: str, line: int | None, kind: str, message: str, patient_id: str | None = None) -> None:
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.problems.append(Problem(file, line, kind, message, patient_id))

    def counts_by_kind(self) -> dict[str, int]:
        """Problems per kind, in the order of :data:`PROBLEM_KINDS`."""
        counts = Counter(p.kind for p in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    @property
    def blocking(self) -> list[Problem]:
        """Errors and warnings: the problems ``strict=True`` refuses."""
        return [p for p in self.problems if p.severity != "note"]

    def summary(self, examples: int = 3) -> str:
        """A short human summary: counts, problems per kind and the first few of each with file:line."""
        images = (f"images: {self.images_found} found, {self.images_missing} missing, "
                  f"{self.images_unlabelled} unlabelled" if self.images_dir is not None
                  else f"images: no folder (labels only, {self.images_missing} patients without image)")
        classes = (f"classes: {self.class_rows} rows in {self.classes_file}" if self.classes_file
                   else "classes: no class CSV")
        lines = [
            f"labels: {self.label_rows} rows ({self.skipped_rows} skipped) in {self.labels_file}; {classes}",
            f"patients: {self.patients} kept ({self.patients_dropped} dropped), {self.boxes} boxes",
            images,
        ]
        by_kind: dict[str, list[Problem]] = {}
        for p in self.problems:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, count in self.counts_by_kind().items():
            severity, effect = PROBLEM_KINDS[kind]
            lines.append(f"{severity} {kind}: {count} ({effect})")
            lines.extend(f"    {p}" for p in by_kind[kind][:examples])
        if not self.problems:
            lines.append("no problems")
        return "\n".join(lines)


@dataclass
class RsnaData:
    """The loaded dataset: records in labels-file order and the report of how they were read."""

    records: list[PatientRecord]
    report: ValidationReport


# ------------------------------------------------------------------------------------------ reading
def _sniff(path: Path, required: Sequence[str], report: ValidationReport) -> str:
    """The delimiter, from the header; BOM, CR LF and extra columns noted; fatal if empty or columns lack."""
    name = display_path(path)
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise LabelsError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    bom = head.startswith(_BOM)
    body = head[len(_BOM):] if bom else head
    if not body.strip():
        raise LabelsError(f"{name}: file is empty (expected a header {','.join(required)} and data rows)")
    first = body.split(b"\n", 1)[0]
    header = first.decode("utf-8", errors="replace")
    sep = ";" if ";" in header and "," not in header else ","
    try:  # the header as the reader will see it (quotes removed, repeated names numbered)
        columns = pd.read_csv(path, sep=sep, nrows=0, skip_blank_lines=False, index_col=False,
                              encoding="utf-8-sig", encoding_errors="replace").columns.tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise LabelsError(f"{name}: unreadable header: {exc}".replace("\n", " ")) from exc
    missing = [c for c in required if c not in columns]
    if missing:
        shown = ", ".join(repr(c) if c != c.strip() else c for c in columns)
        raise LabelsError(f"{name}: missing column(s) {', '.join(missing)} (header has: {shown or 'nothing'})")
    if bom:
        report.add(name, 1, "utf8_bom", "file starts with a UTF-8 byte-order mark (Excel re-save)")
    if first.endswith(b"\r"):
        report.add(name, 1, "crlf_line_endings", "lines end with CR LF (Excel/Windows re-save)")
    if sep == ";":
        report.add(name, 1, "semicolon_delimiter",
                   "fields are separated by ';' (Excel re-save); decimal commas accepted")
    extra = [c for c in columns if c not in required]
    if extra:
        report.add(name, 1, "extra_columns", f"column(s) {', '.join(extra)} ignored")
    return sep


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file holds ``needle`` (one byte), read in blocks."""
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            if needle in block:
                return True
    return False


@dataclass(frozen=True)
class _LineMap:
    """Record number (header = 1, as the parser counts) -> the 1-based line of the file where it starts.

    A quoted field may hold line breaks, so a record can span several lines and every later record
    then starts below its record number. ``first[k]`` is the first record that starts ``added[k]``
    lines below its number (both increasing); a file whose records are all one line has none.
    """

    first: np.ndarray
    added: np.ndarray

    def lines(self, records: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self.first, records, side="right") - 1
        return records + np.where(k >= 0, self.added[np.maximum(k, 0)], 0) if len(self.first) else records


def _csv_records(path: Path, sep: str) -> Iterator[tuple[int, int, list[str]]]:
    """``(record number, first line, fields)`` of every record, by the csv module.

    Its record boundaries are the parser's: the same quote, doubled-quote and line-break rules
    (a line break is ``\\n``, ``\\r\\n`` or a lone ``\\r``; a blank line is a record).
    """
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        end = 0
        try:
            for number, fields in enumerate(reader, start=1):
                yield number, end + 1, fields
                end = reader.line_num
        except csv.Error as exc:  # a field past the csv module's size limit: an unclosed quote, or no CSV
            raise LabelsError(f"{display_path(path)}:{end + 1}: not a readable CSV: {exc}") from None


def _line_map(path: Path, sep: str) -> _LineMap:
    """Where each record starts; a file without a quote character cannot have multi-line records and is
    not read twice."""
    first: list[int] = []
    added: list[int] = []
    if _contains(path, b'"'):
        for number, line, _ in _csv_records(path, sep):
            if line - number != (added[-1] if added else 0):
                first.append(number)
                added.append(line - number)
    return _LineMap(np.asarray(first, dtype=np.int64), np.asarray(added, dtype=np.int64))


def _record_fields(path: Path, sep: str, records: set[int]) -> dict[int, list[str]]:
    """The fields of the given records (record numbers), read in one streaming pass."""
    found: dict[int, list[str]] = {}
    last = max(records, default=0)
    for number, _, fields in _csv_records(path, sep):
        if number in records:
            found[number] = fields
        if number >= last:
            break
    return found


def _collect_bad_lines(caught: list[warnings.WarningMessage], bad: dict[int, str]) -> bool:
    """Move the parser's "Skipping line N: ..." warnings into ``bad`` (record number -> reason).

    The parser's "line" is a record number (header = 1): a record with a quoted line break counts once.
    Returns whether the parser said the *first* data row has more fields than the header: that row is
    not skipped but cut to the header's length, with a warning of its own.
    """
    long_first_row = False
    for w in caught:
        for m in _BAD_LINE.finditer(str(w.message)):
            bad[int(m.group(1))] = m.group(2)
        long_first_row |= _LONG_FIRST_ROW in str(w.message)
    caught.clear()
    return long_first_row


def _read_rows(path: Path, sep: str, columns: Sequence[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The file in chunks of string columns ``columns`` plus ``line`` and ``field_error``.

    ``line`` is the 1-based line of the file where the row starts (see :class:`_LineMap`). The first
    column is the patient id; a whitespace-only id comes back as ``""``.

    Rows with more fields than the header are skipped by the parser; they come back, with the
    patient id of their first field, as rows whose ``field_error`` says what was wrong, so that
    their patient can be dropped rather than silently lose a box.
    """
    line_map = _line_map(path, sep)
    bad: dict[int, str] = {}
    start = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            reader = pd.read_csv(path, sep=sep, dtype=object, keep_default_na=False, skip_blank_lines=False,
                                 on_bad_lines="warn", index_col=False, encoding="utf-8-sig",
                                 encoding_errors="replace", chunksize=chunk_rows)
            for chunk in reader:
                long_first_row = _collect_bad_lines(caught, bad)
                records = np.arange(start, start + len(chunk), dtype=np.int64) + 2
                for b in sorted(bad):  # each skipped record shifts every later row down one record
                    records += records >= b
                start += len(chunk)
                frame = chunk.loc[:, list(columns)].fillna("").reset_index(drop=True)
                pid = frame[columns[0]]
                frame.loc[pid.str.strip() == "", columns[0]] = ""  # a blank id is a missing id
                frame["line"] = line_map.lines(records)
                frame["field_error"] = ""
                if long_first_row and start == len(chunk) and len(chunk):  # its extra fields were cut off
                    seen = len(_record_fields(path, sep, {2}).get(2, ()))
                    frame.loc[0, "field_error"] = f"expected {chunk.shape[1]} fields, saw {seen}"
                yield frame
            _collect_bad_lines(caught, bad)  # a bad last line is only seen by the read that ends the file
        except (pd.errors.ParserError, UnicodeError, ValueError) as exc:
            raise LabelsError(f"{display_path(path)}: not a readable CSV: {exc}".replace("\n", " ")) from exc
    if bad:
        numbers = sorted(bad)
        fields = _record_fields(path, sep, set(numbers))
        lines = line_map.lines(np.asarray(numbers, dtype=np.int64)).tolist()
        rows = [{**dict.fromkeys(columns, ""), columns[0]: (fields.get(number) or [""])[0].strip(),
                 "line": line, "field_error": bad[number]} for number, line in zip(numbers, lines, strict=True)]
        yield pd.DataFrame(rows, columns=[*columns, "line", "field_error"])


def _numbers(text: pd.Series, decimal_comma: bool) -> pd.Series:
    """Strings to floats; empty and unparsable become NaN (the caller tells the two apart)."""
    if decimal_comma:
        text = text.str.replace(",", ".", regex=False)
    values = pd.to_numeric(text.where(text != ""), errors="coerce").astype(np.float64)
    return values.where(np.isfinite(values))


# ------------------------------------------------------------------------------------------ checks
def _label_row_kinds(rows: pd.DataFrame, decimal_comma: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """Parsed values of a labels chunk and, per row, the first problem kind ("" when none)."""
    raw = rows[list(BOX_COLUMNS) + ["Target"]]
    values = pd.DataFrame({c: _numbers(raw[c], decimal_comma) for c in raw.columns})
    filled = raw != ""  # a blank-looking " " is filled and then fails to parse: reported, not ignored
    unparsable = (filled & values.isna()).any(axis=1)
    target = values["Target"]
    has_box = filled[list(BOX_COLUMNS)]
    # Refused before any arithmetic: x + w of 1e300-sized values overflows, and no image is that large.
    absurd = (values[list(BOX_COLUMNS)].abs() > MAX_ABS_COORDINATE).any(axis=1)
    x, y, w, h = (values[c].where(~absurd) for c in BOX_COLUMNS)
    xmax, ymax = x + w, y + h
    size = RSNA_IMAGE_SIZE
    off = (x >= size) | (y >= size) | (xmax <= 0) | (ymax <= 0)
    partly = (x < 0) | (y < 0) | (xmax > size) | (ymax > size)
    positive = target == 1
    no_pid = rows["patientId"] == ""
    conditions = [
        rows["field_error"] != "",
        no_pid,
        unparsable,
        absurd,
        ~target.isin([0, 1]),
        positive & ~has_box.all(axis=1),
        ~positive & has_box.any(axis=1),
        positive & ((w <= 0) | (h <= 0)),
        positive & off,
        positive & partly,
    ]
    kinds = ["wrong_field_count", "missing_patient_id", "non_numeric", "absurd_value", "bad_target",
             "missing_box", "unexpected_box", "bad_box_size", "box_off_image", "box_outside"]
    kind = np.select([c.to_numpy(dtype=bool) for c in conditions], kinds, default="")
    empty = ~filled.any(axis=1) & no_pid & (rows["field_error"] == "")
    kind[empty.to_numpy()] = "empty_row"
    parsed = pd.DataFrame({
        "patientId": rows["patientId"], "line": rows["line"],
        "target": target, "xmin": x, "ymin": y, "xmax": xmax, "ymax": ymax,
    })
    return parsed, kind


def _label_message(kind: str, row: pd.Series, parsed: pd.Series) -> str:
    pid = row["patientId"]
    box = ", ".join(f"{c}={row[c]!r}" for c in BOX_COLUMNS)
    if kind == "wrong_field_count":
        return f"{row['field_error']} (patient {pid or '?'})"
    if kind == "missing_patient_id":
        return "patientId is empty"
    if kind == "non_numeric":
        bad = [f"{c}={row[c]!r}" for c in (*BOX_COLUMNS, "Target")
               if row[c] and not np.isfinite(_numbers(pd.Series([row[c]]), False).iloc[0])]
        return f"patient {pid}: not a number: {', '.join(bad) or box}"
    if kind == "absurd_value":
        return f"patient {pid}: a coordinate beyond +-{MAX_ABS_COORDINATE:g} px cannot be real ({box})"
    if kind == "bad_target":
        return f"patient {pid}: Target={row['Target']!r} is not 0 or 1"
    if kind == "missing_box":
        return f"patient {pid}: Target 1 but the box is incomplete ({box})"
    if kind == "unexpected_box":
        return f"patient {pid}: Target 0 but a box is given ({box})"
    if kind == "bad_box_size":
        return f"patient {pid}: width and height must be > 0 ({box})"
    extent = (f"[{parsed['xmin']:g}, {parsed['ymin']:g}, {parsed['xmax']:g}, {parsed['ymax']:g}] "
              f"vs image 0..{RSNA_IMAGE_SIZE}")
    if kind == "box_off_image":
        return f"patient {pid}: box lies entirely outside the image: {extent}"
    if kind == "box_outside":
        return f"patient {pid}: box extends past the image edge (kept unchanged): {extent}"
    return "row has no values"


def _kind_column(kinds: np.ndarray) -> pd.Categorical:
    """Per-row problem kinds as a one-byte categorical instead of a fixed-width string array."""
    return pd.Categorical(kinds, categories=["", *PROBLEM_KINDS])


def _report_rows(report: ValidationReport, file: str, kinds: np.ndarray, rows: pd.DataFrame,
                 message: Callable[[str, int], str]) -> None:
    """One problem per flagged row; only flagged rows are visited, so clean files cost nothing here."""
    for i in np.flatnonzero(kinds != ""):
        kind = str(kinds[i])
        pid = rows["patientId"].iat[i].strip() or None
        report.add(file, int(rows["line"].iat[i]), kind, message(kind, i), pid)


def _read_labels(path: Path, report: ValidationReport, chunk_rows: int) -> pd.DataFrame:
    """All labels rows as parsed values plus ``kind``; problems of single rows go to the report."""
    name = display_path(path)
    sep = _sniff(path, LABELS_COLUMNS, report)
    parts = []
    for rows in _read_rows(path, sep, LABELS_COLUMNS, chunk_rows):
        parsed, kinds = _label_row_kinds(rows, decimal_comma=sep == ";")
        _report_rows(report, name, kinds, rows,
                     lambda kind, i, rows=rows, parsed=parsed: _label_message(kind, rows.iloc[i], parsed.iloc[i]))
        parsed["kind"] = _kind_column(kinds)
        parts.append(parsed[kinds != "empty_row"])
    labels = pd.concat(parts, ignore_index=True).sort_values("line", kind="stable", ignore_index=True)
    report.label_rows = len(labels)
    if not len(labels):
        raise LabelsError(f"{name}: has a header but no data rows")
    return labels


def _read_classes(path: Path, report: ValidationReport, chunk_rows: int) -> pd.DataFrame:
    """All class rows (``patientId, class, line, kind``); problems of single rows go to the report."""
    name = display_path(path)
    sep = _sniff(path, CLASSES_COLUMNS, report)
    parts = []
    for rows in _read_rows(path, sep, CLASSES_COLUMNS, chunk_rows):
        pid_empty = rows["patientId"] == ""
        cls_empty = rows["class"] == ""
        kinds = np.select(
            [(rows["field_error"] != "").to_numpy(), (pid_empty & cls_empty).to_numpy(), pid_empty.to_numpy(),
             (~rows["class"].isin(CLASS_NAMES)).to_numpy()],
            ["wrong_field_count", "empty_row", "missing_patient_id", "unknown_class"], default="")

        def message(kind: str, i: int, rows: pd.DataFrame = rows) -> str:
            pid, cls = rows["patientId"].iat[i], rows["class"].iat[i]
            if kind == "wrong_field_count":
                return f"{rows['field_error'].iat[i]} (patient {pid or '?'})"
            if kind == "unknown_class":
                return f"patient {pid}: class {cls!r} is not one of {', '.join(CLASS_NAMES)}"
            return "patientId is empty" if kind == "missing_patient_id" else "row has no values"

        _report_rows(report, name, kinds, rows, message)
        frame = rows[["patientId", "class", "line"]].copy()
        frame["kind"] = _kind_column(kinds)
        parts.append(frame[kinds != "empty_row"])
    classes = pd.concat(parts, ignore_index=True).sort_values("line", kind="stable", ignore_index=True)
    report.class_rows = len(classes)
    if not len(classes):
        raise LabelsError(f"{name}: has a header but no data rows")
    return classes


def _scan_images(images_dir: Path) -> dict[str, Path]:
    """``patientId -> path`` of every ``*.dcm`` file in the folder, from one directory listing."""
    try:
        with os.scandir(images_dir) as it:
            entries = [e for e in it if e.name.lower().endswith(".dcm")]
    except OSError as exc:
        raise LabelsError(f"{display_path(images_dir)}: cannot list the images folder: "
                          f"{exc.strerror or exc}") from exc
    return {e.name[:-4]: Path(e.path) for e in entries if _is_file(e)}


def _is_file(entry: os.DirEntry) -> bool:
    """A link that loops or cannot be followed is no image file (its patient is reported image_missing)."""
    try:
        return entry.is_file()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ public
def _resolve(data_dir: Path | None, override: Path | None, pattern: str) -> Path | None:
    """The override, else the first ``stage_2_*`` / ``stage_1_*`` candidate that exists in ``data_dir``."""
    if override is not None:
        return Path(override)
    if data_dir is None:
        return None
    for stage in _STAGES:
        candidate = Path(data_dir) / pattern.format(stage=stage)
        if candidate.exists():
            return candidate
    return None


def _resolve_inputs(data_dir: Path | None, labels: Path | None, classes: Path | None,
                    images: Path | None) -> tuple[Path, Path, Path | None]:
    if data_dir is not None and not Path(data_dir).is_dir():
        raise LabelsError(f"{display_path(data_dir)}: not a folder")
    found = []
    for what, override, pattern in (("labels", labels, "{stage}_train_labels.csv"),
                                    ("class", classes, "{stage}_detailed_class_info.csv")):
        path = _resolve(data_dir, override, pattern)
        if path is None:
            where = f"in {display_path(data_dir)}" if data_dir is not None else "(no data folder given)"
            raise LabelsError(f"no {what} CSV {where}: expected {pattern.format(stage='stage_2')} "
                              f"or {pattern.format(stage='stage_1')}")
        if not path.is_file():
            raise LabelsError(f"{display_path(path)}: {what} CSV not found")
        found.append(path)
    images_dir = _resolve(data_dir, images, "{stage}_train_images")
    if images is not None and not Path(images).is_dir():
        raise LabelsError(f"{display_path(images)}: images folder not found")
    return found[0], found[1], images_dir.resolve() if images_dir is not None else None


def load_rsna(data_dir: Path | None, *, labels: Path | None = None, classes: Path | None = None,
              images: Path | None = None, strict: bool = False, chunk_rows: int = _CHUNK_ROWS) -> RsnaData:
    """Read the RSNA labels and class CSVs (and list the image folder) into one record per patient.

    Args:
        data_dir: folder laid out as the Kaggle download; may be ``None`` when ``labels`` and
            ``classes`` are given.
        labels, classes, images: override the labels CSV, class CSV and DICOM folder of ``data_dir``.
            Without an images folder every record has ``image_path=None`` (labels only).
        strict: raise :class:`LabelsError` on any error or warning instead of skipping and reporting.
        chunk_rows: rows read at a time, which bounds the memory used by parsing.

    Returns:
        :class:`RsnaData`: records in order of first appearance in the labels CSV (image paths are
        absolute) and the :class:`ValidationReport`.

    Raises:
        LabelsError: a CSV is missing, empty, header-only or lacks a required column; or, under
            ``strict``, any problem was found.
    """
    labels_path, classes_path, images_dir = _resolve_inputs(data_dir, labels, classes, images)
    report = ValidationReport(labels_file=display_path(labels_path), classes_file=display_path(classes_path),
                              images_dir=display_path(images_dir) if images_dir is not None else None)
    label_rows = _read_labels(labels_path, report, chunk_rows)
    class_rows = _read_classes(classes_path, report, chunk_rows)
    files = _scan_images(images_dir) if images_dir is not None else None
    usable, patients, dropped = _label_patients(label_rows, report)
    patients = _class_patients(patients, class_rows, report, dropped)
    boxes = _kept_boxes(usable, patients, dropped, report)
    pids = patients.index.tolist()
    paths = [files.get(pid) for pid in pids] if files is not None else [None] * len(pids)
    records = [PatientRecord(pid, cls, int(target), boxes.get(pid, ()), path)
               for pid, cls, target, path in zip(pids, patients["class"].tolist(), patients["target"].tolist(),
                                                 paths, strict=True)]
    if files is not None:
        known = set(label_rows["patientId"].to_numpy()) | set(class_rows["patientId"].to_numpy())
        _report_images(records, files, patients["line"], known, report)
    else:
        report.images_missing = len(records)
    _conclude(report, strict)
    return RsnaData(records=records, report=report)


@dataclass
class GroundTruth:
    """The labels as a metric sees them: per kept patient (labels-file order) its boxes, Pascal VOC
    ``(xmin, ymin, xmax, ymax)`` (none for a negative patient), and the report of how they were read."""

    boxes: dict[str, tuple[tuple[float, float, float, float], ...]]
    report: ValidationReport


def load_ground_truth(labels: Path, classes: Path | None = None, *, strict: bool = False,
                      chunk_rows: int = _CHUNK_ROWS) -> GroundTruth:
    """The boxes of every usable patient of a labels CSV, by the same rules as :func:`load_rsna`.

    Every labels-CSV check of :func:`load_rsna` applies (row problems, duplicates, absurd and
    off-image boxes, Target conflicts, too many boxes), with or without a class CSV; with ``classes``
    the class checks apply too and the patients kept are exactly those :func:`load_rsna` keeps.
    No image folder is looked at.

    Raises:
        LabelsError: a CSV is missing, empty, header-only or lacks a required column; or, under
            ``strict``, any problem was found.
    """
    labels = Path(labels)
    report = ValidationReport(labels_file=display_path(labels),
                              classes_file=display_path(classes) if classes is not None else "")
    label_rows = _read_labels(labels, report, chunk_rows)
    usable, patients, dropped = _label_patients(label_rows, report)
    if classes is not None:
        class_rows = _read_classes(Path(classes), report, chunk_rows)
        patients = _class_patients(patients, class_rows, report, dropped)
    else:
        patients = patients[~patients.index.isin(list(dropped))]
    boxes = _kept_boxes(usable, patients, dropped, report)
    report.images_missing = report.patients  # no image folder is looked at
    _conclude(report, strict)
    return GroundTruth(boxes={pid: boxes.get(pid, ()) for pid in patients.index}, report=report)


def _conclude(report: ValidationReport, strict: bool) -> None:
    """Problems in file and line order; under ``strict`` any error or warning is fatal."""
    rank = {report.labels_file: 0, report.classes_file: 1}
    report.problems.sort(key=lambda p: (rank.get(p.file, 2), p.file, p.line or 0))
    if strict and report.blocking:
        blocking = report.blocking
        first = "; ".join(str(p) for p in blocking[:5])
        raise LabelsError(f"{len(blocking)} label problem(s) under --strict; first: {first}")


def _label_patients(label_rows: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                   set[str]]:
    """The cross-row checks of the labels CSV alone: duplicates, Target conflicts, too many boxes.

    Returns the usable rows (repeats removed), one row per patient (index ``patientId`` in labels
    order; ``line`` = its first line, ``target``) and the patients dropped so far.
    """
    lname = report.labels_file
    label_rows = label_rows[label_rows["patientId"] != ""]  # reported, belong to nobody
    first_line = label_rows.groupby("patientId", sort=False)["line"].first()
    dropped: set[str] = set(label_rows.loc[~label_rows["kind"].isin(["", "box_outside"]), "patientId"])

    usable = label_rows[label_rows["kind"].isin(["", "box_outside"])]
    keys = ["patientId", "target", "xmin", "ymin", "xmax", "ymax"]
    dup = usable.duplicated(subset=keys, keep="first").to_numpy()
    if dup.any():
        original = usable.groupby(keys, dropna=False, sort=False)["line"].transform("first")
        for i in np.flatnonzero(dup):
            pid = usable["patientId"].iat[i]
            report.add(lname, int(usable["line"].iat[i]), "duplicate_row",
                       f"patient {pid}: repeats line {int(original.iat[i])}", pid)
        usable = usable[~dup]

    targets = usable.groupby("patientId", sort=False)["target"].agg(["min", "max", "sum"])
    for pid in targets.index[targets["min"] != targets["max"]]:
        report.add(lname, int(first_line[pid]), "target_conflict",
                   f"patient {pid}: has both Target 0 and Target 1 rows", pid)
        dropped.add(pid)
    boxes = targets["sum"]  # Target is 0 or 1 here: the sum counts a patient's boxes
    for pid, count in boxes[boxes > MAX_GROUND_TRUTH_BOXES].items():
        report.add(lname, int(first_line[pid]), "too_many_boxes",
                   f"patient {pid}: {count:g} boxes; more than {MAX_GROUND_TRUTH_BOXES} cannot be real "
                   "(RSNA has at most 4 per image)", pid)
        dropped.add(pid)
    patients = pd.DataFrame({"line": first_line})
    patients["target"] = targets["max"]
    return usable, patients, dropped


def _class_patients(patients: pd.DataFrame, class_rows: pd.DataFrame, report: ValidationReport,
                    dropped: set[str]) -> pd.DataFrame:
    """The class-CSV checks; returns the kept patients with their ``class`` (``dropped`` grows)."""
    lname, cname = report.labels_file, report.classes_file
    class_rows = class_rows[class_rows["patientId"] != ""]
    first_line = patients["line"]
    class_first_line = class_rows.groupby("patientId", sort=False)["line"].first()
    dropped |= set(class_rows.loc[class_rows["kind"] != "", "patientId"])

    distinct = class_rows.loc[class_rows["kind"] == "", ["patientId", "class"]].drop_duplicates()
    conflicting = distinct["patientId"].duplicated(keep=False).to_numpy()
    for pid, group in distinct[conflicting].groupby("patientId", sort=False)["class"]:
        report.add(cname, int(class_first_line[pid]), "class_conflict",
                   f"patient {pid}: classes {', '.join(sorted(group))}", pid)
        dropped.add(pid)

    for pid in first_line.index.difference(class_first_line.index, sort=False):
        report.add(lname, int(first_line[pid]), "missing_class", f"patient {pid}: not in {cname}", pid)
        dropped.add(pid)
    for pid in class_first_line.index.difference(first_line.index, sort=False):
        report.add(cname, int(class_first_line[pid]), "missing_labels", f"patient {pid}: not in {lname}", pid)
        dropped.add(pid)

    patients = patients.copy()
    patients["class"] = distinct.drop_duplicates("patientId", keep=False).set_index("patientId")["class"]
    patients = patients[~patients.index.isin(list(dropped))]
    mismatch = (patients["class"] == POSITIVE_CLASS) != (patients["target"] == 1)
    for pid, line, target, cls in patients[mismatch].itertuples():
        report.add(lname, int(line), "class_target_mismatch",
                   f"patient {pid}: Target {target:g} but class {cls!r} ({cname}:{int(class_first_line[pid])})", pid)
        dropped.add(pid)
    return patients[~mismatch]


def _kept_boxes(usable: pd.DataFrame, patients: pd.DataFrame, dropped: set[str],
                report: ValidationReport) -> dict[str, tuple[tuple[float, float, float, float], ...]]:
    """The boxes of the kept ``patients``, in labels order; counts of rows, patients and boxes reported."""
    kept = usable[usable["patientId"].isin(patients.index)]
    report.skipped_rows = report.label_rows - len(kept)
    report.patients_dropped = len(dropped)
    report.patients = len(patients)
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    positive = kept[kept["target"] == 1]
    coords = positive[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=np.float64).tolist()
    for pid, box in zip(positive["patientId"].to_numpy(), coords, strict=True):
        boxes.setdefault(pid, []).append(tuple(box))
    report.boxes = len(positive)
    return {pid: tuple(b) for pid, b in boxes.items()}


def _report_images(records: list[PatientRecord], files: dict[str, Path], first_line: pd.Series,
                   known: set[str], report: ValidationReport) -> None:
    """Count images found and missing; report records without a file and files without a patient."""
    missing = [r.patient_id for r in records if r.image_path is None]
    report.images_found = len(records) - len(missing)
    report.images_missing = len(missing)
    lines = first_line.loc[missing].tolist() if missing else []
    report.problems.extend(
        Problem(report.labels_file, int(line), "image_missing",
                f"patient {pid}: no {pid}.dcm in {report.images_dir}", pid)
        for pid, line in zip(missing, lines, strict=True))
    unlabelled = sorted(files.keys() - known)
    for stem in unlabelled:
        shown = display_path(stem)
        report.add(display_path(files[stem]), None, "image_unlabelled", f"{shown}.dcm has no labels row",
                   shown)
    report.images_unlabelled = len(unlabelled)


# ------------------------------------------------------------------------------------------ frames
FRAME_COLUMNS: tuple[str, ...] = ("patientId", "class", "Target", "n_boxes", "boxes", "image_path")


def records_to_frame(records: Sequence[PatientRecord]) -> pd.DataFrame:
    """One row per patient: ``patientId, class, Target, n_boxes, boxes, image_path``.

    ``boxes`` is a JSON list of ``[xmin, ymin, xmax, ymax]`` (exact float round trip); ``image_path``
    is ``""`` for a patient without an image.
    """
    return pd.DataFrame({
        "patientId": [r.patient_id for r in records],
        "class": [r.label_class for r in records],
        "Target": np.array([r.target for r in records], dtype=np.int64),
        "n_boxes": np.array([len(r.boxes) for r in records], dtype=np.int64),
        "boxes": [json.dumps([list(b) for b in r.boxes]) for r in records],
        "image_path": ["" if r.image_path is None else str(r.image_path) for r in records],
    }, columns=list(FRAME_COLUMNS))


def frame_to_records(frame: pd.DataFrame, source: str = "<frame>") -> list[PatientRecord]:
    """The inverse of :func:`records_to_frame`; ``source`` names the file in error messages.

    A box must hold four finite numbers within +-``MAX_ABS_COORDINATE``, as the labels reader demands.

    Raises:
        LabelsError: a column is missing or a row is malformed (naming ``source`` and the 1-based line
            of the CSV the frame was read from, where the row starts).
    """
    missing = [c for c in FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise LabelsError(f"{source}: missing column(s) {', '.join(missing)}")
    records = []
    for i, (pid, cls, target, n_boxes, boxes, image) in enumerate(
            zip(*(frame[c] for c in FRAME_COLUMNS), strict=True)):
        try:
            parsed = tuple(tuple(float(v) for v in b) for b in json.loads(boxes))
            target, n_boxes = int(target), int(n_boxes)
        except (TypeError, ValueError) as exc:
            raise LabelsError(f"{source}:{_frame_line(frame, i)}: malformed row: {exc}") from exc
        if cls not in CLASS_NAMES or target not in (0, 1) or not pid:
            raise LabelsError(f"{source}:{_frame_line(frame, i)}: bad patientId/class/Target "
                              f"({pid!r}, {cls!r}, {target})")
        if len(parsed) != n_boxes or any(len(b) != 4 for b in parsed):
            raise LabelsError(f"{source}:{_frame_line(frame, i)}: n_boxes={n_boxes} but boxes holds {boxes!r}")
        if not all(np.isfinite(v) and abs(v) <= MAX_ABS_COORDINATE for b in parsed for v in b):
            raise LabelsError(f"{source}:{_frame_line(frame, i)}: boxes {boxes!r} hold a value that is not a "
                              f"finite number within +-{MAX_ABS_COORDINATE:g} px")
        image_path = Path(image) if isinstance(image, str) and image else None
        records.append(PatientRecord(str(pid), str(cls), target, parsed, image_path))
    return records


def _frame_line(frame: pd.DataFrame, row: int) -> int:
    """The 1-based line of the CSV (header = line 1) where ``row`` starts: quoted line breaks in the
    fields of earlier rows (an image folder named with one) push it down."""
    earlier = frame.iloc[:row].astype(str)
    breaks = sum(int(col.str.count("\r\n|\r|\n").sum()) for _, col in earlier.items())
    return row + 2 + breaks
