"""``pneumodet cv``: patient-level folds of a split's train+val patients, the test set held out, K runs
trained as a grid's (resumable, skippable), the out-of-fold threshold, and the CV folder as an ensemble."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from _helpers import assert_one_line_error
from pneumodet.cli import main
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import fold_patients, read_split
from pneumodet.errors import SplitError
from pneumodet.rundir import CvDir

TINY = ["--encoder", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--aug", "light", "--precision", "32-true", "--checkpoint-every", "0", "--epochs", "1", "--max-steps", "1"]


@pytest.fixture(scope="module")
def cv_run(synth_dataset: Path, split_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``cv --folds 2`` through the command line: (cv folder, its args, stderr, stdout)."""
    root = tmp_path_factory.mktemp("cv")
    args = ["cv", "--data", str(synth_dataset), "--split", str(split_dir), "--folds", "2", "--out",
            str(root / "cv"), "--cache-dir", str(root / "cache"), *TINY]
    err, out = io.StringIO(), io.StringIO()  # capsys is function-scoped: captured by hand
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    assert code == 0, err.getvalue()[-3000:]
    return root / "cv", args, err.getvalue(), out.getvalue()


def test_folds_are_disjoint_stratified_and_a_function_of_patients_and_seed(synth_dataset: Path) -> None:
    records = load_rsna(synth_dataset).records
    folds = fold_patients(records, 3, seed=7)
    ids = [[r.patient_id for r in fold] for fold in folds]
    assert sorted(sum(ids, [])) == sorted(r.patient_id for r in records)  # every patient once
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for cls in {r.label_class for r in records}:  # each class spread evenly
        counts = [sum(r.label_class == cls for r in fold) for fold in folds]
        assert max(counts) - min(counts) <= 1, (cls, counts)
    again = fold_patients(list(reversed(records)), 3, seed=7)
    assert [sorted(r.patient_id for r in f) for f in again] == [sorted(f) for f in ids]
    assert [sorted(r.patient_id for r in f) for f in fold_patients(records, 3, seed=8)] != [sorted(f) for f in ids]
    with pytest.raises(SplitError, match="at least 2 folds"):
        fold_patients(records, 1)
    with pytest.raises(SplitError, match="41 folds need at least 41 patients"):
        fold_patients(records, 41)


def test_cv_trains_each_fold_on_disjoint_patients_test_held_out(cv_run, split_dir: Path) -> None:
    cv_dir, _, err, out = cv_run
    assert "cv: run 1 of 2: fold1" in err.splitlines()
    assert any(line.startswith("cv: run 2 of 2: fold2 (ETA ") for line in err.splitlines())
    cv = CvDir(cv_dir)
    base = read_split(split_dir)
    base_ids = {name: {r.patient_id for r in recs} for name, recs in base.items()}
    vals = []
    for k in (1, 2):
        sets = read_split(cv.fold_split(k))
        ids = {name: {r.patient_id for r in recs} for name, recs in sets.items()}
        assert ids["test"] == base_ids["test"]  # the test set is held out, untouched
        assert ids["train"] | ids["val"] == base_ids["train"] | base_ids["val"]
        assert cv.fold(k).is_finished() and cv.fold(k).has_model()
        vals.append(ids["val"])
    assert not vals[0] & vals[1]  # each train+val patient validates in exactly one fold
    summary = cv.read_summary()
    assert summary["complete"] and summary["folds"] == 2
    assert [r["status"] for r in summary["runs"]] == ["done", "done"]
    assert summary["oof"]["patients"] == len(base_ids["train"] | base_ids["val"])
    assert 0.0 <= summary["oof"]["threshold"] <= 1.0
    assert set(summary["mean"]) == set(summary["sd"]) >= {"best_val_map", "oof_map", "global_accuracy"}
    table = pd.read_csv(cv.table)
    assert list(table["name"]) == ["fold1", "fold2", "mean", "sd"]
    assert "mean ± sd:" in out and f"out-of-fold threshold {summary['oof']['threshold']:.3f}" in out


def test_cv_again_skips_finished_folds_and_refuses_other_folds(cv_run, capsys) -> None:
    cv_dir, args, _, _ = cv_run
    cv = CvDir(cv_dir)
    stamps = [cv.fold(k).done.stat().st_mtime_ns for k in (1, 2)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert [r["status"] for r in cv.read_summary()["runs"]] == ["skipped (already done)"] * 2
    assert [cv.fold(k).done.stat().st_mtime_ns for k in (1, 2)] == stamps  # nothing retrained
    assert "skipped (already done)" in captured.out
    three = [a if a != "2" else "3" for a in args]
    code = main(three)
    assert_one_line_error(code, capsys.readouterr().err, "cv", r"holds a cross-validation made otherwise "
                                                             r"\(folds 2 -> 3\); give a new --out")


def test_cv_again_from_its_folder_alone_and_a_missing_gated_threshold(cv_run, capsys) -> None:
    """``cv --out CV`` alone runs the cross-validation again with what the folder records (data, split, folds,
    training options). A ``cv.json`` written before gated thresholds were recorded makes ``evaluate --gate``
    say so in one line, naming that command; running it records the threshold again."""
    cv_dir, _, _, _ = cv_run
    cv = CvDir(cv_dir)
    summary = cv.read_summary()
    gated = summary["oof"].pop("gate_threshold")
    cv.write_summary(summary)
    code = main(["evaluate", str(cv_dir), "--gate"])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate",
                          r"cv\.json: records no out-of-fold threshold for gated scores .*run `pneumodet cv --out "
                          + re.escape(str(cv_dir)) + "` again")
    stamps = [cv.fold(k).done.stat().st_mtime_ns for k in (1, 2)]
    assert main(["cv", "--out", str(cv_dir)]) == 0, capsys.readouterr().err
    again = cv.read_summary()
    assert again["oof"]["gate_threshold"] == gated and again["folds"] == 2
    assert [cv.fold(k).done.stat().st_mtime_ns for k in (1, 2)] == stamps  # nothing retrained


def test_a_cv_folder_is_the_ensemble_of_its_folds(cv_run, synth_dataset: Path, tmp_path: Path, capsys) -> None:
    """``evaluate CV`` scores the fold models' ensemble on the held-out test set at the out-of-fold
    threshold; its validation score is the out-of-fold one (refused here); ``predict CV`` uses that
    threshold too; a command taking one model says what a CV folder is."""
    cv_dir = cv_run[0]
    cv = CvDir(cv_dir)
    oof = cv.read_summary()["oof"]["threshold"]
    assert main(["evaluate", str(cv_dir), "--batch-size", "8"]) == 0
    metrics = json.loads((cv.eval_dir("test") / "metrics.json").read_text())
    assert metrics["members"] == [str(cv.fold(1).root), str(cv.fold(2).root)]
    assert metrics["threshold"] == oof and "out-of-fold" in metrics["threshold_source"]
    capsys.readouterr()
    code = main(["evaluate", str(cv_dir), "--split", "val"])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", r"hold out different val patients.*out-of-fold")
    images = sorted((synth_dataset / "stage_2_train_images").glob("*.dcm"))[:3]
    assert main(["predict", str(cv_dir), *map(str, images), "--out", str(tmp_path / "s.csv"), "--json",
                 str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["threshold"] == oof
    # the gated scores have their own out-of-fold threshold, chosen on the same pooled predictions
    gated = cv.read_summary()["oof"]["gate_threshold"]
    assert main(["predict", str(cv_dir), *map(str, images), "--gate", "--out", str(tmp_path / "g.csv"), "--json",
                 str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["threshold"] == gated
    capsys.readouterr()
    code = main(["export", str(cv_dir), "--onnx", str(tmp_path / "m.onnx")])
    assert_one_line_error(code, capsys.readouterr().err, "export", r"a cross-validation folder is an ensemble "
                                                                   r"of its fold runs.*fold1")


def test_a_failing_fold_is_named_and_the_summary_kept(synth_dataset: Path, split_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    args = ["cv", "--data", str(synth_dataset), "--split", str(split_dir), "--folds", "2", "--out",
            str(tmp_path / "cv"), "--cache-dir", str(tmp_path / "cache"), *TINY, "--encoder", "no_such_encoder"]
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, "cv", r"fold1 failed .*no_such_encoder.*fold2 failed",
                          r"the out-of-fold threshold needs every fold")
    summary = CvDir(tmp_path / "cv").read_summary()
    assert not summary["complete"] and summary["oof"] is None
    assert Counter(r["status"] for r in summary["runs"]) == {"failed": 2}
    # an ensemble of an unfinished cross-validation is refused, saying how to finish it
    code = main(["evaluate", str(tmp_path / "cv")])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", r"the cross-validation is not complete")
