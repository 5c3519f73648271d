"""Submission files: round trip, every malformed-row case, ground truth, and the ``score`` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pneumodet.cli import main
from pneumodet.errors import LabelsError, SubmissionError
from pneumodet.submission import read_ground_truth, read_submission, score_submission, write_submission


def write_text(tmp_path: Path, text: str, name: str = "sub.csv") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ round trip
def test_write_read_round_trip_rounds_scores_to_4_and_coordinates_to_1_decimal(tmp_path):
    predictions = {
        "b": np.array([[0.123456, 10.04, 20.06, 30.0, 40.55], [0.9, 500.0, 600.0, 12.3, 45.6]]),
        "a": np.zeros((0, 5)),
        "c": np.array([[0.5, 1.0, 2.0, 3.0, 4.0]]),
    }
    path = write_submission(tmp_path / "out" / "sub.csv", predictions, patient_ids=["a", "b", "c", "d"])
    lines = path.read_text().splitlines()
    assert lines == [
        "patientId,PredictionString",
        "a,",
        "b,0.1235 10.0 20.1 30.0 40.5 0.9000 500.0 600.0 12.3 45.6",
        "c,0.5000 1.0 2.0 3.0 4.0",
        "d,",
    ]
    back = read_submission(path)
    assert list(back) == ["a", "b", "c", "d"]  # file order kept
    assert back["a"].shape == (0, 5) and back["d"].shape == (0, 5)
    np.testing.assert_allclose(back["b"], [[0.1235, 10.0, 20.1, 30.0, 40.5], [0.9, 500, 600, 12.3, 45.6]])
    np.testing.assert_array_equal(back["c"], predictions["c"])


def test_write_defaults_to_prediction_keys_and_overwrites_atomically(tmp_path):
    path = tmp_path / "sub.csv"
    write_submission(path, {"x": np.array([[0.5, 1, 2, 3, 4]])})
    write_submission(path, {"y": np.zeros((0, 5)), "x": np.array([[0.25, 1, 2, 3, 4]])})
    assert path.read_text() == "patientId,PredictionString\ny,\nx,0.2500 1.0 2.0 3.0 4.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]  # no temporary file left


def test_write_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    path = write_submission(tmp_path / "sub.csv", {"x": np.array([[0.5, 1, 2, 3, 4]])})
    before = path.read_text()
    with pytest.raises(SubmissionError, match="patient 'bad'.*negative width or height"):
        write_submission(path, {"x": np.zeros((0, 5)), "bad": np.array([[0.5, 1, 2, -3, 4]])})
    with pytest.raises(SubmissionError, match="not in patient_ids, e.g. 'x'"):
        write_submission(path, {"x": np.zeros((0, 5))}, patient_ids=["y"])
    with pytest.raises(SubmissionError, match="more than once"):
        write_submission(path, {}, patient_ids=["y", "y"])
    for bad_id in ("a,b", "a\nb", " ", 'a"b'):
        with pytest.raises(SubmissionError, match="cannot be a CSV field"):
            write_submission(path, {bad_id: np.zeros((0, 5))})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_reads_crlf_bom_and_blank_lines(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_bytes(b"\xef\xbb\xbfpatientId,PredictionString\r\np1,0.5 0 0 100 100\r\n\r\np2,\r\n")
    back = read_submission(path)
    assert list(back) == ["p1", "p2"]
    np.testing.assert_array_equal(back["p1"], [[0.5, 0, 0, 100, 100]])


# ------------------------------------------------------------------ malformed files
GOOD = "patientId,PredictionString\np1,0.5 0 0 100 100\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "p2,0.5 1 2 3\n", r"line 3: patient p2: PredictionString has 4 numbers, not groups of 5"),
        (GOOD + "p2,0.5 1 2 3 4 0.7\n", r"line 3: patient p2: PredictionString has 6 numbers"),
        (GOOD + "p2,0.5 1 abc 3 4\n", r"line 3: patient p2: PredictionString value 'abc' is not a number"),
        (GOOD + "p2,0.5 1 2 nan 4\n", r"line 3: patient p2: PredictionString contains NaN or infinity"),
        (GOOD + "p2,0.5 1 2 3 inf\n", r"line 3: patient p2: PredictionString contains NaN or infinity"),
        (GOOD + "p2,0.5 1 2 3 -4\n", r"line 3: patient p2: .*negative width or height"),
        (GOOD + "p2,\np1,0.9 0 0 5 5\n", r"line 4: patient p1 already listed on line 2"),
        (GOOD + "p2,0.5 1 2 3 4,extra\n", r"line 3: expected 2 fields .* got 3"),
        (GOOD + "p2\n", r"line 3: expected 2 fields .* got 1"),
        (GOOD + ",0.5 1 2 3 4\n", r"line 3: empty patientId"),
        (GOOD + "\n\np2,0.5 1 2 3 x\n", r"line 5: patient p2: PredictionString value 'x'"),  # blank lines counted
        (GOOD + '"p\n2",0.5 1 2 3\n', r"line 3: patient p\\n2: PredictionString has 4"),  # where it starts
        (GOOD + '"p\r\n2",\n"p3",0.5 1\n', r"line 5: patient p3: PredictionString has 2"),  # after 2 lines
        (GOOD + "p2,0.5 1 2 1e7 4\n", r"line 3: patient p2: .*has a coordinate beyond \+-1e\+06 px"),
        ("p1,0.5 0 0 100 100\n", r"line 1: header is 'p1,0.5 0 0 100 100', expected patientId,PredictionString"),
        ("patientId\np1\n", r"line 1: header is 'patientId', expected"),
        ("patientId,PredictionString,extra\n", r"line 1: header is 'patientId,PredictionString,extra'"),
        ("", r"empty file"),
        ("\n\n", r"empty file"),
    ],
)
def test_malformed_submission_names_file_and_line(tmp_path, text, message):
    path = write_text(tmp_path, text)
    with pytest.raises(SubmissionError, match=message) as err:
        read_submission(path)
    assert str(err.value).startswith(str(path))


def test_a_field_past_the_csv_default_limit_is_read_and_the_limit_restored(tmp_path):
    """6,000 boxes (about 190,000 characters) pass; the csv module's process-wide limit is raised only
    while reading, also when the file is refused."""
    before = csv.field_size_limit()
    path = write_text(tmp_path, "patientId,PredictionString\np1," + " ".join(["0.5 1 2 3 4"] * 6000) + "\n")
    assert read_submission(path)["p1"].shape == (6000, 5)
    assert csv.field_size_limit() == before
    write_text(tmp_path, "patientId,PredictionString\np1,0.5 1 2 3\n")
    with pytest.raises(SubmissionError):
        read_submission(path)
    assert csv.field_size_limit() == before


def test_unknown_patient_is_an_error_with_its_line(tmp_path):
    path = write_text(tmp_path, GOOD + "ghost,\n")
    assert set(read_submission(path, known_ids={"p1", "ghost"})) == {"p1", "ghost"}
    with pytest.raises(SubmissionError, match=r"line 3: patient ghost is not in the labels \(1 of the file's 2"):
        read_submission(path, known_ids={"p1"})


def test_missing_or_binary_file_is_a_submission_error(tmp_path):
    with pytest.raises(SubmissionError, match="cannot read submission"):
        read_submission(tmp_path / "absent.csv")
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"patientId,PredictionString\n\xff\xfe\x00p1,\n")
    with pytest.raises(SubmissionError, match="cannot read submission"):
        read_submission(bad)


# ------------------------------------------------------------------ ground truth
def first_rows_by_patient(labels: Path) -> dict[str, list[list[float]]]:
    """The labels CSV read plainly with the csv module, as an independent reference."""
    boxes: dict[str, list[list[float]]] = {}
    with labels.open(newline="") as fh:
        for row in csv.DictReader(fh):
            got = boxes.setdefault(row["patientId"], [])
            if row["Target"] == "1":
                got.append([float(row[k]) for k in ("x", "y", "width", "height")])
    return boxes


def test_read_ground_truth_matches_plain_reading_of_real_labels(real_sample):
    labels = real_sample / "stage_2_train_labels.csv"
    reference = first_rows_by_patient(labels)
    truth = read_ground_truth(labels)  # the class CSV beside it: through load_rsna
    assert list(truth) == list(reference)
    assert len(truth) == 26684 and sum(len(b) for b in truth.values()) == 9555
    for pid, boxes in reference.items():
        np.testing.assert_array_equal(truth[pid], np.array(boxes).reshape(-1, 4))


def test_read_ground_truth_without_class_csv(tmp_path, real_sample):
    rows = (real_sample / "stage_2_train_labels.csv").read_text().splitlines()[:400]
    labels = write_text(tmp_path, "\n".join(rows) + "\n", "labels.csv")  # no class CSV beside it
    reference = first_rows_by_patient(labels)
    truth = read_ground_truth(labels)
    assert list(truth) == list(reference)
    assert any(len(b) for b in truth.values())
    for pid, boxes in reference.items():
        np.testing.assert_array_equal(truth[pid], np.array(boxes).reshape(-1, 4))


#: a labels row after ``p1,,,,,0`` -> (class of p2 for the class CSV, the problem reported at labels.csv:3)
BAD_ROWS = {
    "box_on_target_0": ("p2,1,2,3,4,0", "Normal", "unexpected_box"),
    "no_box_on_target_1": ("p2,,,,,1", "Lung Opacity", "missing_box"),
    "not_a_number": ("p2,1,2,abc,4,1", "Lung Opacity", "non_numeric"),
    "zero_width": ("p2,1,2,0,4,1", "Lung Opacity", "bad_box_size"),
    "target_7": ("p2,,,,,7", "Normal", "bad_target"),
    "off_image": ("p2,2000,2000,30,40,1", "Lung Opacity", "box_off_image"),
    "absurd_width": ("p2,1,2,1e300,4,1", "Lung Opacity", "absurd_value"),
    "absurd_x": ("p2,-1e300,2,3,4,1", "Lung Opacity", "absurd_value"),
    "both_targets": ("p2,,,,,0\np2,1,2,3,4,1", "Normal", "target_conflict"),
    "too_many_fields": ("p2,1,2,3,4,1,9", "Lung Opacity", "wrong_field_count"),
    "no_patient_id": (",1,2,3,4,1", None, "missing_patient_id"),
    "101_boxes": ("\n".join(f"p2,{i},{i},5,5,1" for i in range(101)), "Lung Opacity", "too_many_boxes"),
}


@pytest.mark.parametrize("with_classes", [False, True], ids=["labels_only", "with_class_csv"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_labels_row_is_the_same_error_with_or_without_a_class_csv(tmp_path, case, with_classes):
    """One reader turns label rows into ground truth: the class CSV adds class checks, never removes one."""
    row, cls, kind = BAD_ROWS[case]
    labels = write_text(tmp_path, f"patientId,x,y,width,height,Target\np1,,,,,0\n{row}\n",
                        "stage_2_train_labels.csv")
    if with_classes:
        classes = ["p1,Normal"] + [f"p2,{cls}"] * (row.count("\n") + 1 if cls else 0)
        write_text(tmp_path, "\n".join(["patientId,class", *classes]) + "\n",
                   "stage_2_detailed_class_info.csv")
    with pytest.raises(LabelsError, match=rf"would drop patients .*labels\.csv:3: {kind}: "):
        read_ground_truth(labels)


@pytest.mark.parametrize("with_classes", [False, True], ids=["labels_only", "with_class_csv"])
def test_warnings_do_not_stop_scoring_and_count_the_same_either_way(tmp_path, with_classes):
    """A repeated row is one box and a box partly outside the image is kept, with or without a class CSV."""
    labels = write_text(tmp_path, "patientId,x,y,width,height,Target\np1,100,100,200,200,1\n"
                        "p1,100,100,200,200,1\np2,1000,10,100,50,1\n", "stage_2_train_labels.csv")
    if with_classes:
        write_text(tmp_path, "patientId,class\np1,Lung Opacity\np1,Lung Opacity\np2,Lung Opacity\n",
                   "stage_2_detailed_class_info.csv")
    truth = read_ground_truth(labels)
    np.testing.assert_array_equal(truth["p1"], [[100, 100, 200, 200]])
    np.testing.assert_array_equal(truth["p2"], [[1000, 10, 100, 50]])


def test_labels_problem_found_by_load_rsna_is_an_error(tmp_path):
    labels = write_text(tmp_path, "patientId,x,y,width,height,Target\np1,,,,,0\np2,1,2,-3,4,1\n",
                        "stage_2_train_labels.csv")
    write_text(tmp_path, "patientId,class\np1,Normal\np2,Lung Opacity\n", "stage_2_detailed_class_info.csv")
    with pytest.raises(LabelsError, match="would drop patients"):
        read_ground_truth(labels)


def test_class_problems_count_only_with_a_class_csv(tmp_path):
    labels = write_text(tmp_path, "patientId,x,y,width,height,Target\np1,,,,,0\n", "labels.csv")
    classes = write_text(tmp_path, "patientId,class\np1,Lung Opacity\n", "classes.csv")
    assert list(read_ground_truth(labels)) == ["p1"]
    with pytest.raises(LabelsError, match=r"labels\.csv:2: class_target_mismatch"):
        read_ground_truth(labels, classes)


def test_score_command_counts_a_duplicated_labels_row_once_with_or_without_a_class_csv(tmp_path, capsys):
    """The same perfect submission scores 1.0 against labels with a repeated row, whether or not the
    Kaggle class CSV lies beside them (it scored 0.5 without: the repeat counted as a second box)."""
    sub = write_text(tmp_path, "patientId,PredictionString\np1,0.9 100 100 200 200\np2,\n")
    rows = "patientId,x,y,width,height,Target\np1,100,100,200,200,1\np1,100,100,200,200,1\np2,,,,,0\n"
    alone = write_text(tmp_path / "alone", rows, "stage_2_train_labels.csv")
    kaggle = write_text(tmp_path / "kaggle", rows, "stage_2_train_labels.csv")
    write_text(tmp_path / "kaggle", "patientId,class\np1,Lung Opacity\np1,Lung Opacity\np2,Normal\n",
               "stage_2_detailed_class_info.csv")
    for labels in (alone, kaggle):
        report = labels.parent / "r.json"
        assert main(["score", str(sub), "--labels", str(labels), "--json", str(report)]) == 0
        assert "RSNA mAP 1.0000 over 1 image(s)" in capsys.readouterr().out
        assert json.loads(report.read_text())["per_image"] == {"p1": 1.0, "p2": None}


# ------------------------------------------------------------------ scoring real labels
@pytest.fixture(scope="module")
def real_truth(real_sample):
    return read_ground_truth(real_sample / "stage_2_train_labels.csv")


def hundred_patients(truth: dict[str, np.ndarray]) -> list[str]:
    """40 positive and 60 negative patients, spread over the file."""
    ids = list(truth)
    pos = [p for p in ids if len(truth[p])][::97][:40]
    neg = [p for p in ids if not len(truth[p])][::211][:60]
    return pos + neg


def test_score_perfect_submission_on_real_labels(tmp_path, real_sample, real_truth):
    ids = hundred_patients(real_truth)
    preds = {pid: np.column_stack([np.full(len(real_truth[pid]), 0.9), real_truth[pid]]) for pid in ids}
    sub = write_submission(tmp_path / "sub.csv", preds)
    result = score_submission(sub, real_sample / "stage_2_train_labels.csv")
    assert result.score == 1.0
    assert (result.n_images, result.n_excluded) == (40, 60)  # negatives without boxes are left out


def test_score_command_default_all_and_json(tmp_path, real_sample, real_truth, capsys):
    labels = real_sample / "stage_2_train_labels.csv"
    ids = hundred_patients(real_truth)
    preds = {pid: np.column_stack([np.full(len(real_truth[pid]), 0.9), real_truth[pid]]) for pid in ids}
    # Spoil one positive patient (no box) and one negative (a false positive): 39 of 41 images score 1.
    preds[ids[0]] = np.zeros((0, 5))
    preds[ids[-1]] = np.array([[0.3, 100.0, 100.0, 50.0, 50.0]])
    sub = write_submission(tmp_path / "sub.csv", preds)

    assert main(["score", str(sub), "--labels", str(labels), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "RSNA mAP 0.9512 over 41 image(s) (59 excluded" in out  # 39 / 41
    assert "0.75  0.9512" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["score"] == pytest.approx(39 / 41)
    assert saved["per_image"][ids[0]] == 0.0 and saved["per_image"][ids[-1]] == 0.0
    assert saved["per_image"][ids[-2]] is None and saved["per_image"][ids[1]] == 1.0

    # --all: every labelled patient; positives missing from the submission score 0.
    n_pos = sum(1 for b in real_truth.values() if len(b))
    assert main(["score", str(sub), "--labels", str(labels), "--all", "--json", str(tmp_path / "a.json")]) == 0
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["n_images"] == n_pos + 1  # 6012 positives + the negative with a false positive
    assert saved["score"] == pytest.approx(39 / (n_pos + 1))
    assert saved["n_images"] + saved["n_excluded"] == len(real_truth)


def test_score_command_rejects_test_patients_of_the_sample_submission(real_sample, capsys):
    code = main(["score", str(real_sample / "stage_2_sample_submission.csv"),
                 "--labels", str(real_sample / "stage_2_train_labels.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pneumodet score: error:" in err
    assert ("stage_2_sample_submission.csv: line 2: patient 0000a175-0e68-4ca4-b1af-167204a7e0bc is not in the "
            "labels (3000 of the file's 3000 patients are not)") in err


def test_score_command_reports_malformed_submission(tmp_path, real_sample, capsys):
    sub = write_text(tmp_path, "patientId,PredictionString\n0004cfab-14fd-4e49-80ba-63a80b6bddd6,0.5 1 2\n")
    assert main(["score", str(sub), "--labels", str(real_sample / "stage_2_train_labels.csv")]) == 2
    assert "line 2: patient 0004cfab-14fd-4e49-80ba-63a80b6bddd6: PredictionString has 3 numbers" in (
        capsys.readouterr().err)
