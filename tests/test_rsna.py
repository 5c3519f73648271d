"""The RSNA labels layer: real counts, exact box conversion and every validation case with file:line."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumodet.data.records import PatientRecord
from pneumodet.data.rsna import (
    PROBLEM_KINDS,
    frame_to_records,
    load_rsna,
    records_to_frame,
)
from pneumodet.errors import LabelsError

LABELS = "stage_2_train_labels.csv"
CLASSES = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
HEAD_L = "patientId,x,y,width,height,Target"
HEAD_C = "patientId,class"
# Lines 2-5 of each file; a case appends its rows from line 6 on.
BASE_L = ["a,,,,,0", "b,100,200,50,60,1", "b,300,200,50,60,1", "c,,,,,0"]
BASE_C = ["a,Normal", "b,Lung Opacity", "b,Lung Opacity", "c,No Lung Opacity / Not Normal"]


def write_dataset(root: Path, labels: list[str], classes: list[str], *, head_l: str = HEAD_L,
                  head_c: str = HEAD_C, images: tuple[str, ...] | None = None, newline: str = "\n",
                  encoding: str = "utf-8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / LABELS).write_bytes((newline.join([head_l, *labels]) + newline).encode(encoding))
    (root / CLASSES).write_bytes((newline.join([head_c, *classes]) + newline).encode(encoding))
    if images is not None:
        (root / IMAGES).mkdir()
        for pid in images:
            (root / IMAGES / f"{pid}.dcm").write_bytes(b"not opened by load_rsna")
    return root


def used_rows(records: list[PatientRecord]) -> int:
    """Labels rows that a record stands for: one per box, one for a negative patient."""
    return sum(max(1, len(r.boxes)) for r in records)


def check_counts(data) -> None:
    rep = data.report
    assert rep.patients == len(data.records)
    assert rep.boxes == sum(len(r.boxes) for r in data.records)
    assert rep.label_rows - rep.skipped_rows == used_rows(data.records)


# ------------------------------------------------------------------------------------------ clean input
def test_clean_input_gives_one_record_per_patient_with_voc_boxes(tmp_path):
    data = load_rsna(write_dataset(tmp_path, BASE_L, BASE_C))
    assert data.records == [
        PatientRecord("a", "Normal", 0, ()),
        PatientRecord("b", "Lung Opacity", 1, ((100.0, 200.0, 150.0, 260.0), (300.0, 200.0, 350.0, 260.0))),
        PatientRecord("c", "No Lung Opacity / Not Normal", 0, ()),
    ]
    rep = data.report
    assert (rep.label_rows, rep.class_rows, rep.patients, rep.boxes, rep.skipped_rows) == (4, 4, 3, 2, 0)
    assert rep.problems == [] and "no problems" in rep.summary()
    assert rep.images_dir is None and rep.images_missing == 3
    assert load_rsna(tmp_path, strict=True).records == data.records


def test_stage_1_names_and_overrides(tmp_path):
    src = write_dataset(tmp_path / "s2", BASE_L, BASE_C)
    stage1 = tmp_path / "s1"
    stage1.mkdir()
    (stage1 / "stage_1_train_labels.csv").write_bytes((src / LABELS).read_bytes())
    (stage1 / "stage_1_detailed_class_info.csv").write_bytes((src / CLASSES).read_bytes())
    (stage1 / "stage_1_train_images").mkdir()
    (stage1 / "stage_1_train_images" / "a.dcm").write_bytes(b"x")
    one = load_rsna(stage1)
    assert [r.patient_id for r in one.records] == ["a", "b", "c"]
    assert one.records[0].image_path == (stage1 / "stage_1_train_images" / "a.dcm").resolve()
    by_override = load_rsna(None, labels=src / LABELS, classes=src / CLASSES)
    assert [r.boxes for r in by_override.records] == [r.boxes for r in one.records]
    with pytest.raises(LabelsError, match="no labels CSV"):
        load_rsna(tmp_path)
    with pytest.raises(LabelsError, match="images folder not found"):
        load_rsna(src, images=tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ row cases
# (case id, extra labels rows, extra classes rows, kind, file, line, patients kept)
CASES = [
    ("nan_box", ["d,10,20,,,1"], ["d,Lung Opacity"], "missing_box", LABELS, 6, "abc"),
    ("box_on_negative", ["d,10,20,30,40,0"], ["d,Normal"], "unexpected_box", LABELS, 6, "abc"),
    ("zero_width", ["d,10,20,0,40,1"], ["d,Lung Opacity"], "bad_box_size", LABELS, 6, "abc"),
    ("negative_height", ["d,10,20,30,-4,1"], ["d,Lung Opacity"], "bad_box_size", LABELS, 6, "abc"),
    ("box_off_image", ["d,1100,20,30,40,1"], ["d,Lung Opacity"], "box_off_image", LABELS, 6, "abc"),
    ("box_partly_outside", ["d,1000,20,100,40,1"], ["d,Lung Opacity"], "box_outside", LABELS, 6, "abcd"),
    ("non_numeric", ["d,10,abc,30,40,1"], ["d,Lung Opacity"], "non_numeric", LABELS, 6, "abc"),
    ("x_1e300", ["d,1e300,20,30,40,1"], ["d,Lung Opacity"], "absurd_value", LABELS, 6, "abc"),
    ("width_1e300", ["d,10,20,1e300,40,1"], ["d,Lung Opacity"], "absurd_value", LABELS, 6, "abc"),
    ("x_minus_1e300", ["d,-1e300,20,30,40,1"], ["d,Lung Opacity"], "absurd_value", LABELS, 6, "abc"),
    ("height_2e6", ["d,10,20,30,2000000,1"], ["d,Lung Opacity"], "absurd_value", LABELS, 6, "abc"),
    ("max_float_width", ["d,10,20,1.7976931348623157e308,40,1"], ["d,Lung Opacity"], "absurd_value", LABELS,
     6, "abc"),
    ("101_boxes", [f"d,{i},{i},5,5,1" for i in range(101)], ["d,Lung Opacity"] * 101, "too_many_boxes", LABELS,
     6, "abc"),
    ("target_two", ["d,,,,,2"], ["d,Normal"], "bad_target", LABELS, 6, "abc"),
    ("target_empty", ["d,,,,,"], ["d,Normal"], "bad_target", LABELS, 6, "abc"),
    ("unknown_class", ["d,,,,,0"], ["d,Pneumonia"], "unknown_class", CLASSES, 6, "abc"),
    ("labels_only_patient", ["d,,,,,0"], [], "missing_class", LABELS, 6, "abc"),
    ("classes_only_patient", [], ["d,Normal"], "missing_labels", CLASSES, 6, "abc"),
    ("opacity_without_target", ["d,,,,,0"], ["d,Lung Opacity"], "class_target_mismatch", LABELS, 6, "abc"),
    ("target_without_opacity", ["d,1,2,3,4,1"], ["d,Normal"], "class_target_mismatch", LABELS, 6, "abc"),
    ("duplicate_row", ["b,100,200,50,60,1"], ["b,Lung Opacity"], "duplicate_row", LABELS, 6, "abc"),
    ("target_conflict", ["c,10,20,30,40,1"], ["c,No Lung Opacity / Not Normal"], "target_conflict", LABELS, 5,
     "ab"),
    ("class_conflict", [], ["a,No Lung Opacity / Not Normal"], "class_conflict", CLASSES, 2, "bc"),
    ("too_many_fields", ["d,1,2,3,4,1,9"], ["d,Lung Opacity"], "wrong_field_count", LABELS, 6, "abc"),
    ("too_many_fields_in_classes", [], ["a,Normal,x"], "wrong_field_count", CLASSES, 6, "bc"),
    ("no_patient_id", [",,,,,0"], [], "missing_patient_id", LABELS, 6, "abc"),
    ("no_patient_id_in_classes", [], [",Normal"], "missing_patient_id", CLASSES, 6, "abc"),
]


@pytest.mark.parametrize(("extra_l", "extra_c", "kind", "file", "line", "kept"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_problem_is_reported_with_kind_file_and_line(tmp_path, extra_l, extra_c, kind, file, line, kept):
    root = write_dataset(tmp_path, BASE_L + extra_l, BASE_C + extra_c)
    data = load_rsna(root)
    found = data.report.of_kind(kind)
    assert len(found) == 1, data.report.summary()
    assert Path(found[0].file).name == file
    assert found[0].line == line
    assert [r.patient_id for r in data.records] == list(kept)
    named = {"a", "b", "c"} | {row.split(",")[0] for row in extra_l + extra_c} - {""}
    assert data.report.patients_dropped == len(named) - len(kept)
    check_counts(data)
    assert f"{file}:{line}" in data.report.summary()
    with pytest.raises(LabelsError, match=kind):
        load_rsna(root, strict=True)


def test_partly_outside_box_is_kept_unchanged_not_clipped(tmp_path):
    data = load_rsna(write_dataset(tmp_path, BASE_L + ["d,1000,-20,100,40,1"], BASE_C + ["d,Lung Opacity"]))
    assert data.records[-1].boxes == ((1000.0, -20.0, 1100.0, 20.0),)
    assert "1100" in data.report.of_kind("box_outside")[0].message


def test_duplicate_row_keeps_the_patient_with_one_copy_of_the_box(tmp_path):
    data = load_rsna(write_dataset(tmp_path, BASE_L + ["b,100,200,50,60,1", "a,,,,,0"],
                                   BASE_C + ["b,Lung Opacity", "a,Normal"]))
    assert data.records[1].boxes == ((100.0, 200.0, 150.0, 260.0), (300.0, 200.0, 350.0, 260.0))
    dups = data.report.of_kind("duplicate_row")
    assert [(p.line, p.patient_id) for p in dups] == [(6, "b"), (7, "a")]
    assert "repeats line 3" in dups[0].message
    assert data.report.skipped_rows == 2


def test_a_bad_box_drops_the_whole_patient_not_just_the_box(tmp_path):
    """Keeping b with one box of two would train and score against a wrong truth."""
    data = load_rsna(write_dataset(tmp_path, BASE_L + ["b,1,2,abc,4,1"], BASE_C + ["b,Lung Opacity"]))
    assert [r.patient_id for r in data.records] == ["a", "c"]
    assert data.report.skipped_rows == 3  # the bad row and b's two good ones
    check_counts(data)


def test_line_numbers_stay_right_after_skipped_and_blank_lines(tmp_path):
    labels = BASE_L + ["d,1,2,3,4,1,9,9", "", "e,,,,,7", "f,1,2,3,4,1,5", "g,,x,,,0"]
    classes = BASE_C + ["d,Lung Opacity", "e,Normal", "f,Lung Opacity", "g,Normal"]
    root = write_dataset(tmp_path, labels, classes)
    for chunk_rows in (2, 200_000):  # lines are counted across chunks too
        rep = load_rsna(root, chunk_rows=chunk_rows).report
        got = [(p.kind, p.line) for p in rep.problems]
        assert got == [("wrong_field_count", 6), ("empty_row", 7), ("bad_target", 8), ("wrong_field_count", 9),
                       ("non_numeric", 10)], got
        assert rep.of_kind("wrong_field_count")[0].patient_id == "d"
        assert "expected 6 fields, saw 8" in rep.of_kind("wrong_field_count")[0].message
        assert rep.label_rows == 8  # the blank line is not a row


def line_breaks(text: str) -> int:
    """Line breaks in ``text`` as the reader counts them: LF, CR LF and a lone CR."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def row_starts(head: str, rows: list[str]) -> list[int]:
    """Each row's 1-based starting line in the file ``head`` + ``rows`` (joined with LF)."""
    starts, line = [], line_breaks(head) + 2
    for row in rows:
        starts.append(line)
        line += line_breaks(row) + 1
    return starts


def test_line_numbers_count_the_lines_of_quoted_line_breaks(tmp_path):
    """A quoted field holding line breaks (in the header, an id, an extra column, a row with too many
    fields, the class CSV) moves every later row down; each problem names the line where its row
    starts, whatever the chunking (the parser counts such a row once, so counting rows was off)."""
    head_l = HEAD_L + ',"com\nment"'
    rows = ['a,,,,,0,"one\ntwo"', "b,100,200,50,60,1,plain", '"c\r\nc",,,,,2,x', 'd,1,2,3,4,1,"x\ny",extra',
            "", 'e,,x,,,0,"\n\r\n\r"', "f,1,2,3,4,1,", "g,1,2,3,4,0,", 'h,1,2,3,4,1,"z\n"', "h,1,2,3,4,1,"]
    head_c = '"patientId",class'
    classes = ["a,Normal", '"b",Lung Opacity', '"c\r\nc",Normal', "d,Lung Opacity", '"e",Normal',
               '"f\n\n",Lung Opacity', "f,Lung Opacity", "g,Normal", "h,Lung Opacity", "zz,Normal"]
    root = write_dataset(tmp_path, rows, classes, head_l=head_l, head_c=head_c)
    at, at_c = row_starts(head_l, rows), row_starts(head_c, classes)
    expected = [("extra_columns", 1), ("bad_target", at[2]), ("wrong_field_count", at[3]),
                ("empty_row", at[4]), ("non_numeric", at[5]), ("unexpected_box", at[7]), ("duplicate_row", at[9]),
                ("missing_labels", at_c[5]), ("missing_labels", at_c[9])]
    assert [line for _, line in expected[1:]] == [6, 8, 10, 11, 16, 19, 8, 14]  # the files, counted by eye
    for chunk_rows in (1, 2, 3, 200_000):
        rep = load_rsna(root, chunk_rows=chunk_rows).report
        assert [(p.kind, p.line) for p in rep.problems] == expected, (chunk_rows, rep.summary())
    assert rep.of_kind("wrong_field_count")[0].patient_id == "d"
    assert "repeats line 17" in rep.of_kind("duplicate_row")[0].message
    assert "patient c\\r\\nc" in str(rep.of_kind("bad_target")[0])  # one printable line


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["good", "bad_target", "too_many_fields", "blank"]),
                          st.lists(st.sampled_from(["\n", "\r\n", "\r", "x", ",", '""']),
                                   max_size=6).map("".join)),
                min_size=1, max_size=12),
       st.integers(1, 5))
def test_quoted_line_breaks_anywhere_give_the_real_line(tmp_path_factory, rows, chunk_rows):
    """Any mix of rows with quoted line breaks, blank lines and rows with too many fields, read in any
    chunk size: every problem is reported at the line where its row starts."""
    text = {"good": "p{i},,,,,0,{q}", "bad_target": "p{i},,,,,9,{q}",
            "too_many_fields": "p{i},,,,,0,{q},extra", "blank": ""}
    kinds = {"bad_target": "bad_target", "too_many_fields": "wrong_field_count", "blank": "empty_row"}
    lines = ["z,,,,,0,plain"] + [text[kind].format(i=i, q=f'"{note}"') for i, (kind, note) in enumerate(rows)]
    head = HEAD_L + ",note"
    root = write_dataset(tmp_path_factory.mktemp("quoted"), lines,
                         ["z,Normal"] + [f"p{i},Normal" for i in range(len(rows))], head_l=head)
    at = row_starts(head, lines)[1:]
    want = [("extra_columns", 1)]
    want += [(kinds[kind], at[i]) for i, (kind, _) in enumerate(rows) if kind != "good"]
    rep = load_rsna(root, chunk_rows=chunk_rows).report
    assert [(p.kind, p.line) for p in rep.problems if p.file.endswith(LABELS)] == want


@pytest.mark.parametrize(("first", "fields"), [("d,1,2,3,4,1,9", 7), ('d,1,2,3,4,1,"9\n9",9', 8)])
def test_a_first_data_row_with_too_many_fields_is_reported_not_cut(tmp_path, first, fields):
    """The parser cuts an over-long *first* data row to the header's length (later ones it skips):
    reported as wrong_field_count all the same, its patient dropped."""
    root = write_dataset(tmp_path, [first, *BASE_L], ["d,Lung Opacity", *BASE_C])
    for chunk_rows in (1, 1000):
        data = load_rsna(root, chunk_rows=chunk_rows)
        got = [(p.kind, p.line, p.patient_id) for p in data.report.problems]
        assert got == [("wrong_field_count", 2, "d")], got
        assert f"expected 6 fields, saw {fields}" in data.report.problems[0].message
        assert [r.patient_id for r in data.records] == ["a", "b", "c"]
        check_counts(data)


@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 1000])
def test_a_bad_last_line_is_reported_whatever_the_chunking(tmp_path, chunk_rows):
    root = write_dataset(tmp_path, BASE_L + ["d,1,2,3,4,1,9"], BASE_C + ["d,Lung Opacity"])
    rep = load_rsna(root, chunk_rows=chunk_rows).report
    assert [(p.kind, p.line, p.patient_id) for p in rep.problems] == [("wrong_field_count", 6, "d")]
    assert rep.label_rows == 5 and rep.patients_dropped == 1


def test_chunked_reading_gives_identical_records(tmp_path, real_sample):
    labels = real_sample / LABELS
    rows = labels.read_text().splitlines()[:3001]
    (tmp_path / LABELS).write_text("\n".join(rows) + "\n")
    classes = (real_sample / CLASSES).read_text().splitlines()[:3001]
    (tmp_path / CLASSES).write_text("\n".join(classes) + "\n")
    whole = load_rsna(tmp_path)
    chunked = load_rsna(tmp_path, chunk_rows=257)
    assert chunked.records == whole.records and len(whole.records) == 2445
    assert chunked.report.boxes == whole.report.boxes


# ------------------------------------------------------------------------------------------ file-level
def test_missing_columns_are_fatal_and_named(tmp_path):
    root = write_dataset(tmp_path, ["a,1,2,3,1"], BASE_C[:1], head_l="patientId,x,y,height,Target")
    with pytest.raises(LabelsError, match=rf"{LABELS}: missing column\(s\) width") as info:
        load_rsna(root)
    assert "\n" not in str(info.value)
    root_spaced = write_dataset(tmp_path / "1", BASE_L, BASE_C, head_l="patientId, x, y, width, height, Target")
    with pytest.raises(LabelsError, match=r"missing column\(s\) x, y, width, height, Target \(header has: patientId, ' x'"):
        load_rsna(root_spaced)
    root2 = write_dataset(tmp_path / "2", BASE_L, ["a"], head_c="patientId")
    with pytest.raises(LabelsError, match=rf"{CLASSES}: missing column\(s\) class"):
        load_rsna(root2)


def test_empty_file_and_header_only_are_clear_errors(tmp_path):
    root = write_dataset(tmp_path, BASE_L, BASE_C)
    (root / LABELS).write_text("")
    with pytest.raises(LabelsError, match=f"{LABELS}: file is empty"):
        load_rsna(root)
    (root / LABELS).write_text(HEAD_L + "\n")
    with pytest.raises(LabelsError, match=f"{LABELS}: has a header but no data rows"):
        load_rsna(root)
    (root / LABELS).write_text("\n".join([HEAD_L, *BASE_L]) + "\n")
    (root / CLASSES).write_text(HEAD_C + "\n\n")
    with pytest.raises(LabelsError, match=f"{CLASSES}: has a header but no data rows"):
        load_rsna(root)


def test_extra_columns_are_ignored_and_noted(tmp_path):
    labels = [row + ",note" for row in BASE_L]
    classes = [row + ",7" for row in BASE_C]
    data = load_rsna(write_dataset(tmp_path, labels, classes, head_l=HEAD_L + ",comment",
                                   head_c=HEAD_C + ",reader"))
    clean = load_rsna(write_dataset(tmp_path / "clean", BASE_L, BASE_C))
    assert data.records == clean.records
    notes = data.report.of_kind("extra_columns")
    assert [(Path(p.file).name, p.line) for p in notes] == [(LABELS, 1), (CLASSES, 1)]
    assert "comment" in notes[0].message and "reader" in notes[1].message
    load_rsna(tmp_path, strict=True)  # notes are not problems: strict accepts them


@pytest.mark.parametrize(("kind", "options"), [
    ("utf8_bom", {"encoding": "utf-8-sig"}),
    ("crlf_line_endings", {"newline": "\r\n"}),
])
def test_excel_resaves_are_read_correctly_and_noted(tmp_path, kind, options):
    data = load_rsna(write_dataset(tmp_path, BASE_L, BASE_C, **options))
    clean = load_rsna(write_dataset(tmp_path / "clean", BASE_L, BASE_C))
    assert data.records == clean.records
    notes = data.report.of_kind(kind)
    assert [(Path(p.file).name, p.line) for p in notes] == [(LABELS, 1), (CLASSES, 1)]
    assert load_rsna(tmp_path, strict=True).records == clean.records


def test_semicolon_resave_with_decimal_commas_bom_and_crlf(tmp_path):
    labels = ["a;;;;;0", "b;100,5;200;50;60;1", "b;300;200;50;60;1", "c;;;;;0"]
    classes = [row.replace(",", ";") for row in BASE_C]
    data = load_rsna(write_dataset(tmp_path, labels, classes, head_l=HEAD_L.replace(",", ";"),
                                   head_c=HEAD_C.replace(",", ";"), newline="\r\n", encoding="utf-8-sig"))
    assert data.records[1].boxes == ((100.5, 200.0, 150.5, 260.0), (300.0, 200.0, 350.0, 260.0))
    assert data.records[2].label_class == "No Lung Opacity / Not Normal"
    kinds = data.report.counts_by_kind()
    assert kinds == {"utf8_bom": 2, "crlf_line_endings": 2, "semicolon_delimiter": 2}
    assert all(p.line == 1 for p in data.report.problems)


def test_unreadable_quoting_is_a_labels_error_not_a_crash(tmp_path):
    root = write_dataset(tmp_path, BASE_L + ['"d,1,2,3,4,1'], BASE_C)
    with pytest.raises(LabelsError, match=f"{LABELS}: not a readable CSV"):
        load_rsna(root)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.sampled_from(list('ab1-,;." \t\r\n0x')), max_size=30), max_size=6))
def test_garbage_rows_never_crash(tmp_path_factory, rows):
    root = write_dataset(tmp_path_factory.mktemp("fuzz"), BASE_L + rows, BASE_C)
    try:
        data = load_rsna(root)
    except LabelsError:
        return
    check_counts(data)
    assert all(p.kind in PROBLEM_KINDS for p in data.report.problems)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["patientId", "x", "y", "width", "height", "Target", "", " ", '"x"', "x;y", "\r"]),
                max_size=8))
def test_garbage_headers_never_crash(tmp_path_factory, names):
    root = write_dataset(tmp_path_factory.mktemp("fuzz"), BASE_L, BASE_C, head_l=",".join(names))
    try:
        data = load_rsna(root)
    except LabelsError as exc:
        assert LABELS in str(exc)
        return
    assert len(data.records) <= 3


# ------------------------------------------------------------------------------------------ images
def test_images_found_missing_and_unlabelled(tmp_path):
    root = write_dataset(tmp_path, BASE_L, BASE_C, images=("a", "c", "zz"))
    (root / IMAGES / "readme.txt").write_text("not an image")
    data = load_rsna(root)
    paths = {r.patient_id: r.image_path for r in data.records}
    assert paths["a"] == (root / IMAGES / "a.dcm").resolve() and paths["b"] is None
    rep = data.report
    assert (rep.images_found, rep.images_missing, rep.images_unlabelled) == (2, 1, 1)
    missing = rep.of_kind("image_missing")
    assert [(Path(p.file).name, p.line, p.patient_id) for p in missing] == [(LABELS, 3, "b")]
    unlabelled = rep.of_kind("image_unlabelled")
    assert [(Path(p.file).name, p.line) for p in unlabelled] == [("zz.dcm", None)]
    assert "images: 2 found, 1 missing, 1 unlabelled" in rep.summary()
    with pytest.raises(LabelsError, match="image_missing"):
        load_rsna(root, strict=True)


def test_images_of_dropped_patients_are_not_called_unlabelled(tmp_path):
    root = write_dataset(tmp_path, BASE_L + ["d,,,,,0"], BASE_C + ["d,Pneumonia"], images=("a", "b", "c", "d"))
    rep = load_rsna(root).report
    assert rep.images_found == 3 and rep.images_unlabelled == 0 and rep.patients_dropped == 1


# ------------------------------------------------------------------------------------------ real data
def test_real_sample_counts(real_sample):
    data = load_rsna(real_sample)
    rep = data.report
    assert (rep.patients, rep.label_rows, rep.boxes, rep.images_found) == (26684, 30227, 9555, 16)
    assert rep.skipped_rows == 0 and rep.patients_dropped == 0
    assert rep.counts_by_kind() == {"image_missing": 26684 - 16}
    with_image = [r for r in data.records if r.image_path is not None]
    classes = sorted(r.label_class for r in with_image)
    assert classes.count("Lung Opacity") == 5 and classes.count("Normal") == 4
    assert sum(len(r.boxes) for r in with_image) == 10  # as SOURCES.md states


def test_real_sample_matches_an_independent_reading(real_sample):
    """Every patient's class, target and VOC boxes against a plain csv-module reading."""
    boxes: dict[str, list[tuple[float, ...]]] = {}
    target: dict[str, int] = {}
    with (real_sample / LABELS).open(newline="") as f:
        for row in csv.DictReader(f):
            pid = row["patientId"]
            target[pid] = int(row["Target"])
            boxes.setdefault(pid, [])
            if row["Target"] == "1":
                x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
                boxes[pid].append((x, y, x + w, y + h))
    with (real_sample / CLASSES).open(newline="") as f:
        cls = {row["patientId"]: row["class"] for row in csv.DictReader(f)}
    records = load_rsna(None, labels=real_sample / LABELS, classes=real_sample / CLASSES).records
    assert [r.patient_id for r in records] == list(boxes)
    for r in records:
        assert (r.label_class, r.target, list(r.boxes)) == (cls[r.patient_id], target[r.patient_id],
                                                             boxes[r.patient_id])
    multi = next(r for r in records if r.patient_id == "00436515-870c-4b36-a041-de91049b9ab4")
    assert multi.boxes == ((264.0, 152.0, 477.0, 531.0), (562.0, 152.0, 818.0, 605.0))


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_ground_truth_keeps_what_load_rsna_keeps_and_labels_alone_drop_no_less(tmp_path, case):
    """One reader: with the class CSV, load_ground_truth keeps exactly load_rsna's patients and boxes;
    without it, every labels-CSV problem is found the same (same kind, same line), only class ones go."""
    from pneumodet.data.rsna import load_ground_truth

    extra_l, extra_c = next(c[1:3] for c in CASES if c[0] == case)
    root = write_dataset(tmp_path, BASE_L + extra_l, BASE_C + extra_c)
    data = load_rsna(root)
    with_classes = load_ground_truth(root / LABELS, root / CLASSES)
    assert with_classes.boxes == {r.patient_id: r.boxes for r in data.records}
    assert with_classes.report.problems == data.report.problems
    alone = load_ground_truth(root / LABELS)
    class_kinds = ("missing_class", "class_target_mismatch")  # reported in the labels CSV, found by classes
    assert alone.report.problems == [p for p in data.report.problems
                                     if p.file.endswith(LABELS) and p.kind not in class_kinds]
    assert "classes: no class CSV" in alone.report.summary()


# ------------------------------------------------------------------------------------------ frames
def test_records_frame_round_trip_through_csv(tmp_path):
    records = [
        PatientRecord("a", "Normal", 0, (), None),
        PatientRecord("b", "Lung Opacity", 1, ((0.1, 2.5, 3.75, 1023.999),), Path("/x/b.dcm")),
        PatientRecord("c", "No Lung Opacity / Not Normal", 0, ()),
    ]
    frame = records_to_frame(records)
    assert list(frame["n_boxes"]) == [0, 1, 0]
    assert list(frame["image_path"]) == ["", "/x/b.dcm", ""]
    frame.to_csv(tmp_path / "s.csv", index=False)
    back = frame_to_records(pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False), "s.csv")
    assert back == records


def test_frame_to_records_names_the_bad_line():
    frame = records_to_frame([PatientRecord("a", "Normal", 0, ()), PatientRecord("b", "Lung Opacity", 1,
                                                                                 ((1.0, 2.0, 3.0, 4.0),))])
    frame.loc[1, "n_boxes"] = 2
    with pytest.raises(LabelsError, match=r"s.csv:3: n_boxes=2"):
        frame_to_records(frame, "s.csv")
    with pytest.raises(LabelsError, match="missing column"):
        frame_to_records(frame.drop(columns=["boxes"]), "s.csv")
