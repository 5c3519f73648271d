"""Patient-level split: disjoint sets, stratified shares, reproducibility, files and the CLI."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from pneumodet.cli import main
from pneumodet.data.records import CLASS_NAMES, PatientRecord
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import SET_NAMES, _strata, read_split, split_patients, write_split
from pneumodet.errors import SplitError

FILES = ("train.csv", "val.csv", "test.csv", "split.json")


def synthetic(n: int, *, images: bool = True, seed: int = 0) -> list[PatientRecord]:
    """``n`` patients over the three classes; Lung Opacity ones get 1 to 4 boxes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cls = CLASS_NAMES[i % 3]
        boxes = tuple((10.0 * k, 20.0, 10.0 * k + 50, 90.0) for k in range(rng.choice([1, 1, 2, 3, 4])))
        out.append(PatientRecord(f"p{i:05d}", cls, int(cls == "Lung Opacity"),
                                 boxes if cls == "Lung Opacity" else (),
                                 Path(f"/img/p{i:05d}.dcm") if images else None))
    return out


def shares(records) -> dict[str, float]:
    counts = Counter(r.label_class for r in records)
    return {c: 100.0 * counts[c] / len(records) for c in CLASS_NAMES}


@pytest.fixture(scope="module")
def real_records(real_sample) -> list[PatientRecord]:
    return load_rsna(real_sample).records


# ------------------------------------------------------------------------------------------ real labels
def test_real_labels_split_is_disjoint_complete_and_stratified(real_records):
    split = split_patients(real_records, labels_only=True)
    ids = {name: {r.patient_id for r in recs} for name, recs in split.sets.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {r.patient_id for r in real_records}
    assert [len(split.val), len(split.test)] == [round(0.1 * 26684)] * 2
    summary = split.summary().splitlines()
    assert summary[0].startswith("split of 26684 patients (seed 42") and summary[2].split()[:2] == ["val", "2668"]
    overall = shares(real_records)
    for recs in split.sets.values():
        for cls, share in shares(recs).items():
            assert abs(share - overall[cls]) < 1.0, (cls, share, overall[cls])
    # the rare multi-box patients are spread too, not left to chance
    n_boxes = {name: Counter(len(r.boxes) for r in recs) for name, recs in split.sets.items()}
    total = Counter(len(r.boxes) for r in real_records)
    for k in (2, 3, 4):
        for name in ("val", "test"):
            assert abs(n_boxes[name][k] - 0.1 * total[k]) <= 1, (k, name, n_boxes[name][k], total[k])


def test_same_seed_same_files_other_seed_other_files(real_records, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_split(split_patients(real_records, labels_only=True, seed=seed), tmp_path / name, source="real")
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    for f in ("train.csv", "val.csv", "test.csv"):
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()


def test_split_does_not_depend_on_input_order(real_records):
    shuffled = list(real_records)
    random.Random(3).shuffle(shuffled)
    a = split_patients(real_records, labels_only=True)
    b = split_patients(shuffled, labels_only=True)
    for name in SET_NAMES:
        assert {r.patient_id for r in a.sets[name]} == {r.patient_id for r in b.sets[name]}


def test_only_patients_with_images_unless_labels_only(real_records):
    split = split_patients(real_records)
    assert sum(len(s) for s in split.sets.values()) == 16
    assert all(r.image_path is not None for s in split.sets.values() for r in s)
    assert (len(split.train), len(split.val), len(split.test)) == (12, 2, 2)


def test_samples_draws_a_stratified_subset(real_records):
    split = split_patients(real_records, labels_only=True, samples=2000, seed=1)
    drawn = [r for s in split.sets.values() for r in s]
    assert len(drawn) == 2000 and split.samples == 2000
    overall = shares(real_records)
    assert all(abs(share - overall[c]) < 0.1 for c, share in shares(drawn).items())
    again = split_patients(real_records, labels_only=True, samples=2000, seed=1)
    assert again == split
    with pytest.raises(SplitError, match="samples=17: only 16 patients with an image"):
        split_patients(real_records, samples=17)
    with pytest.raises(SplitError, match="samples=0: must be at least 1"):
        split_patients(real_records, samples=0)


# ------------------------------------------------------------------------------------------ errors
def test_no_images_is_a_clear_error():
    with pytest.raises(SplitError, match="none of the 30 patients has an image.*labels-only"):
        split_patients(synthetic(30, images=False))
    assert len(split_patients(synthetic(30, images=False), labels_only=True).val) == 3


def test_a_set_that_would_be_empty_is_named():
    with pytest.raises(SplitError, match=r"the val set would be empty: 5 patients x val 0.1 = 0.5.*at least 6"):
        split_patients(synthetic(5))
    with pytest.raises(SplitError, match="the test set would be empty: 20 patients x test 0.01"):
        split_patients(synthetic(20), val=0.2, test=0.01)
    split = split_patients(synthetic(6))
    assert (len(split.train), len(split.val), len(split.test)) == (4, 1, 1)


@pytest.mark.parametrize(("val", "test", "message"), [
    (0.0, 0.1, "val fraction must be between 0 and 1"),
    (0.1, 1.2, "test fraction must be between 0 and 1"),
    (0.5, 0.5, "leaves no patients for train"),
])
def test_bad_fractions(val, test, message):
    with pytest.raises(SplitError, match=message):
        split_patients(synthetic(50), val=val, test=test)


def test_a_patient_listed_twice_is_refused():
    records = synthetic(40)
    with pytest.raises(SplitError, match="listed more than once, e.g. p00003"):
        split_patients([*records, records[3]])


def test_tiny_strata_merge_within_their_class():
    def rec(i, cls, n):
        return PatientRecord(f"{cls[0]}{n}-{i}", cls, int(cls == "Lung Opacity"),
                             tuple((0.0, 0.0, 1.0, 1.0) for _ in range(n)))
    records = ([rec(i, "Lung Opacity", 1) for i in range(50)] + [rec(i, "Lung Opacity", 2) for i in range(30)]
               + [rec(i, "Lung Opacity", 3) for i in range(5)] + [rec(i, "Lung Opacity", 4) for i in range(2)]
               + [rec(i, "Normal", 0) for i in range(3)])
    strata = _strata(records, min_size=10)
    by_key = {(r.label_class, len(r.boxes)): s for r, s in zip(records, strata, strict=True)}
    assert by_key[("Lung Opacity", 4)] == by_key[("Lung Opacity", 3)] == by_key[("Lung Opacity", 2)]
    assert by_key[("Lung Opacity", 1)] != by_key[("Lung Opacity", 2)]
    assert by_key[("Normal", 0)] not in {by_key[("Lung Opacity", k)] for k in (1, 2)}


# ------------------------------------------------------------------------------------------ files
def test_write_and_read_back(tmp_path):
    split = split_patients(synthetic(200), val=0.15, test=0.1, seed=5)
    write_split(split, tmp_path / "s", source="/data/rsna")
    back = read_split(tmp_path / "s")
    assert {name: tuple(recs) for name, recs in back.items()} == split.sets
    meta = json.loads((tmp_path / "s" / "split.json").read_text())
    assert meta["patients"] == {"train": 150, "val": 30, "test": 20}
    assert meta["source"] == "/data/rsna" and meta["seed"] == 5 and meta["samples"] is None
    assert (meta["val_fraction"], meta["test_fraction"]) == (0.15, 0.1)
    assert meta["classes"]["val"] == dict(Counter(r.label_class for r in split.val))
    assert meta["boxes"]["test"] == sum(len(r.boxes) for r in split.test)


def test_read_split_refuses_missing_truncated_and_overlapping_files(tmp_path):
    write_split(split_patients(synthetic(60)), tmp_path, source="x")
    val = (tmp_path / "val.csv").read_text().splitlines()
    (tmp_path / "val.csv").write_text("\n".join(val[:-1]) + "\n")
    with pytest.raises(SplitError, match=r"val.csv: 5 patients, but .*split.json says 6"):
        read_split(tmp_path)
    (tmp_path / "val.csv").write_text("\n".join([*val[:-1], (tmp_path / "train.csv").read_text().splitlines()[1]]))
    with pytest.raises(SplitError, match="is in both train.csv and val.csv"):
        read_split(tmp_path)
    (tmp_path / "val.csv").write_text("\n".join(val) + "\n")
    assert len(read_split(tmp_path)["val"]) == 6
    (tmp_path / "test.csv").unlink()
    with pytest.raises(SplitError, match="test.csv: not found"):
        read_split(tmp_path)
    with pytest.raises(SplitError, match="split.json: not found"):
        read_split(tmp_path / "nothing")


def test_image_paths_round_trip_byte_for_byte_and_text_stays_utf8(tmp_path):
    """An image folder named with a non-UTF-8 byte or a line break: the set CSVs give back the exact
    paths; ``split.json`` (strict UTF-8 JSON) shows the source escaped; a bad row later in the file is
    still named by its real line."""
    odd = Path(os.fsdecode(b"/img/data\xff/new\nline"))
    records = [PatientRecord(f"p{i}", "Normal", 0, (), odd / f"p{i}.dcm") for i in range(20)]
    split = split_patients(records, val=0.2, test=0.2)
    write_split(split, tmp_path, source=odd)
    back = read_split(tmp_path)
    assert {name: tuple(recs) for name, recs in back.items()} == split.sets
    meta = json.loads((tmp_path / "split.json").read_bytes().decode("utf-8"))  # strict UTF-8
    assert meta["source"] == "/img/data\\xff/new\\nline"
    raw = (tmp_path / "train.csv").read_bytes()
    assert b'"/img/data\xff/new\nline/p' in raw  # each row spans two lines
    third = [m.start() for m in re.finditer(rb",0,0,\[\],", raw)][2]  # the third patient: lines 6-7
    (tmp_path / "train.csv").write_bytes(raw[:third] + b',0,1,"[[1e300, 0, 2, 2]]",' + raw[third + 9:])
    with pytest.raises(SplitError, match=r"train\.csv:6: boxes '\[\[1e300, 0, 2, 2\]\]' hold a value that is "
                                         r"not a finite number within \+-1e\+06 px"):
        read_split(tmp_path)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_split_of_the_real_labels(real_sample, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", str(real_sample), "--labels-only", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "26684 patients" in captured.out and "wrote" in captured.out
    assert "patients: 26684 kept" in captured.err  # the load report
    assert all((out / f).is_file() for f in FILES)
    assert json.loads((out / "split.json").read_text())["patients"] == {"train": 21348, "val": 2668, "test": 2668}


def test_cli_split_missing_column_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,Target\na,,,,0\n")
    (tmp_path / "stage_2_detailed_class_info.csv").write_text("patientId,class\na,Normal\n")
    assert main(["split", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("pneumodet split: error:") and "stage_2_train_labels.csv: missing column(s) height" in err
    assert not (tmp_path / "s").exists()


def _labels(folder: Path, positives: int, patients: int = 20) -> Path:
    """A labels-only Kaggle folder: ``positives`` Lung Opacity patients (one box each), the others Normal."""
    rows, classes = ["patientId,x,y,width,height,Target"], ["patientId,class"]
    for i in range(patients):
        pid, positive = f"p{i:03d}", i < positives
        rows.append(f"{pid},100,100,50,80,1" if positive else f"{pid},,,,,0")
        classes.append(f"{pid},{'Lung Opacity' if positive else 'Normal'}")
    (folder / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    return folder


def test_cli_split_warns_in_one_line_when_a_set_has_no_positive(tmp_path, capsys):
    data = _labels(tmp_path, positives=1)
    assert main(["split", str(data), "--labels-only", "--out", str(tmp_path / "s")]) == 0  # written all the same
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["pneumodet split: warning: the val and test sets have no patient with boxes (val 2, test 2 "
                        "patients): validation mAP cannot reward a right box, so the threshold it chooses means "
                        "little; the test score can only count false positives; split more patients, or use "
                        "--val/--test fractions that leave positives in every set"]
    assert json.loads((tmp_path / "s" / "split.json").read_text())["boxes"] == {"train": 1, "val": 0, "test": 0}


def test_cli_split_with_positives_in_every_set_says_nothing_more(tmp_path, capsys):
    data = _labels(tmp_path, positives=10)
    assert main(["split", str(data), "--labels-only", "--out", str(tmp_path / "s")]) == 0
    assert "warning" not in capsys.readouterr().err
    split = split_patients(load_rsna(data).records, labels_only=True)
    assert split.sets_without_positives() == [] and split.positives_warning() is None
