"""``pneumodet evaluate`` at its edges: nothing to score, undefined metrics, strict JSON.

The runs here are not trained (``_helpers.make_run``: a random model and its config): what is tested is
what the command does with the scores, not how good they are.
"""

from __future__ import annotations

import json
import math

import pytest

from _helpers import assert_one_line_error, make_run
from pneumodet.cli import main

#: the normal patients' images are flat on purpose (badinputs.write_dataset)
pytestmark = pytest.mark.filterwarnings("ignore:.*the decoded image is constant:UserWarning")


def test_evaluate_with_nothing_to_score_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Only normal patients and a threshold no box reaches: every test image has neither a ground-truth nor
    a predicted box, so the RSNA metric (which skips such images) is undefined. It used to crash on the
    NaN after writing ``"rsna_map": NaN``; now it says so in one line, exit 2, and writes nothing."""
    run = make_run(tmp_path, [(f"n{i:02d}", []) for i in range(8)], threshold=1.0)
    previous = run / "eval_test" / "metrics.json"
    previous.parent.mkdir()
    previous.write_text('{"previous": true}\n')
    code = main(["evaluate", str(run), "--batch-size", "4"])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, "evaluate",
                          r"nothing could be scored: none of the 2 test image\(s\) has a ground-truth box or a box "
                          r"predicted at threshold 1\.00, and the RSNA metric skips such images; nothing written")
    assert "nan" not in (captured.out + captured.err).lower()
    assert previous.read_text() == '{"previous": true}\n'
    assert sorted(p.name for p in previous.parent.iterdir()) == ["metrics.json"]


def test_undefined_metrics_are_null_in_the_json_and_n_a_when_printed(tmp_path, capsys):
    """Every test patient has pneumonia: the pneumonia-vs-not AUC has one class and is undefined. The
    metrics file is strict JSON (``null``, never ``NaN``) and the printed summary says ``n/a``."""
    patients = [(f"p{i:02d}", [(100 + 40 * i, 200, 300, 300)]) for i in range(8)]
    run = make_run(tmp_path, patients, threshold=0.5)
    code = main(["evaluate", str(run), "--batch-size", "4", "--out", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = (tmp_path / "eval" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert metrics["global_class"]["pneumonia_auc"] is None and metrics["images_scored"] == 2
    assert math.isfinite(metrics["rsna_map"]) and metrics["out_dir"] == str(tmp_path / "eval")
    assert "pneumonia-vs-not AUC n/a" in captured.out
    assert "nan" not in captured.out.lower() and "none" not in captured.out.lower()
    assert f"wrote {tmp_path / 'eval' / 'metrics.json'}" in captured.out
    assert metrics["image_roc"]["best_box_score"]["auc"] is None and metrics["image_roc"]["global_head"]["auc"] is None
    assert metrics["image_roc"]["best_box_score"]["operating_point"]["specificity"] is None  # no negative
    assert "AUC n/a" in captured.out.split("pneumonia per image")[1]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "confusion_matrix.png", "froc.png", "metric_vs_threshold.png", "metrics.json", "reliability.png", "roc.png",
        "subgroups.png"]


def test_evaluate_takes_every_prediction_option_that_applies(tmp_path, capsys):
    """``evaluate`` shares ``predict``'s options (:class:`PredictOptions`): the TTA merge, the device and the
    data-loading workers too, and records the TTA in metrics.json; a threshold it does not take, as the
    run's own (chosen on validation) is the one scored."""
    from pneumodet.errors import ConfigError
    from pneumodet.evaluation import evaluate

    patients = [(f"p{i:02d}", [(100 + 40 * i, 200, 300, 300)]) for i in range(8)]
    run = make_run(tmp_path, patients, threshold=0.0)
    code = main(["evaluate", str(run), "--batch-size", "2", "--tta", "hflip", "--tta-merge", "nms", "--device", "cpu",
                 "--workers", "1", "--precision", "fp32", "--no-compile", "--nms-iou", "0.3", "--max-det", "5",
                 "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["tta"], metrics["tta_merge"], metrics["precision"]) == ("hflip", "nms", "fp32")
    # the post-processing used is recorded: given values, else the model's own (min score: score_thresh)
    assert metrics["postprocess"] == {"nms_iou": 0.3, "max_detections": 5, "min_score": 0.05}
    with pytest.raises(SystemExit):  # not an option of the command
        main(["evaluate", str(run), "--threshold", "0.5"])
    with pytest.raises(ConfigError, match="threshold the run chose on validation"):
        evaluate(run, threshold=0.5)
    capsys.readouterr()
    code = main(["evaluate", str(run), "--workers", "-1"])
    assert_one_line_error(code, capsys.readouterr().err, "evaluate", r"workers must be 0 .*or more, got -1")


#: Header values written into the images, cycling over the patients: (PatientAge, PatientSex, ViewPosition),
#: None leaving the tag out; and the groups (age band, sex, view) each must land in.
_HEADERS = [(("058Y", "F", "PA"), ("40-59", "F", "PA")), (("12", "M", "AP"), ("<18", "M", "AP")),
            (("300", "F", "AP"), ("unknown", "F", "AP")), ((None, None, None), ("unknown", "unknown", "unknown")),
            (("071Y", "X", "LL"), ("60+", "unknown", "other")), (("25", "M", "PA"), ("18-39", "M", "PA"))]


def _write_headers(data, patient_ids) -> dict[str, tuple[str, str, str]]:
    """Give the patients' DICOMs the :data:`_HEADERS` in turn; returns each patient's expected groups."""
    import warnings

    import pydicom

    groups = {}
    for i, pid in enumerate(patient_ids):
        (age, sex, view), expected = _HEADERS[i % len(_HEADERS)]
        path = data / "stage_2_train_images" / f"{pid}.dcm"
        ds = pydicom.dcmread(path)
        for keyword, value in (("PatientAge", age), ("PatientSex", sex), ("ViewPosition", view)):
            if value is None:
                delattr(ds, keyword)
            else:
                with warnings.catch_warnings():  # '12' and '300' are not valid AS values: as some files have them
                    warnings.simplefilter("ignore")
                    setattr(ds, keyword, value)
        ds.save_as(path)
        groups[pid] = expected
    return groups


def _strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


def test_evaluate_reports_froc_coco_roc_calibration_and_subgroups(tmp_path, capsys):
    """The metrics a radiologist reads are in metrics.json with sane values, their figures beside it, two
    lines of them on the terminal; subgroups count each test patient in the group its DICOM header says
    (malformed, absurd or missing values: unknown) and carry no patient's attributes or id. An image cache
    written before the header fields were kept still evaluates, every patient then in 'unknown'."""
    from pneumodet.clinical_metrics import SUBGROUPS
    from pneumodet.data.split import read_split

    patients = [(f"zq{i:02d}", [(100 + 40 * (i % 8), 200, 300, 300)] if i % 2 else []) for i in range(24)]
    run = make_run(tmp_path, patients, threshold=0.0)
    groups = _write_headers(tmp_path / "data", [pid for pid, _ in patients])
    test = read_split(tmp_path / "split")["test"]
    out = tmp_path / "eval"
    code = main(["evaluate", str(run), "--batch-size", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = _strict_json(out / "metrics.json")
    images = metrics["images"]
    assert images == len(test) == 6

    froc = metrics["froc"]
    assert froc["lesions"] == sum(len(r.boxes) for r in test) and froc["images"] == images
    sens = list(froc["sensitivity_at_fp_per_image"].values())
    assert list(froc["sensitivity_at_fp_per_image"]) == ["1/8", "1/4", "1/2", "1", "2", "4", "8"]
    assert all(0 <= s <= 1 for s in sens) and sens == sorted(sens)
    assert froc["mean_sensitivity"] == pytest.approx(sum(sens) / len(sens))
    coco = metrics["coco"]
    assert 0 <= coco["ap"] <= coco["ap50"] <= 1 and len(coco["per_iou_threshold"]) == 10
    for entry in metrics["image_roc"]["best_box_score"], metrics["image_roc"]["global_head"]:
        assert entry["auc"] is None or 0 <= entry["auc"] <= 1
        point = entry["operating_point"]
        assert sum(point[k] for k in ("true_positives", "false_positives", "true_negatives",
                                      "false_negatives")) == images
    for key in ("top_label", "pneumonia"):
        calibration = metrics["calibration"][key]
        assert 0 <= calibration["ece"] <= 1 and len(calibration["reliability"]) == 10
        assert sum(b["count"] for b in calibration["reliability"]) == images

    subgroups = metrics["subgroups"]
    assert subgroups["all"]["patients"] == images
    assert subgroups["all"]["rsna_map"]["value"] == pytest.approx(metrics["rsna_map"])  # the same score, re-derived
    for position, attribute in enumerate(("age_band", "sex", "view_position")):
        assert set(subgroups[attribute]) == set(SUBGROUPS[attribute])
        counts = {name: entry["patients"] for name, entry in subgroups[attribute].items()}
        expected = {name: sum(groups[r.patient_id][position] == name for r in test) for name in counts}
        assert counts == expected, attribute
        for entry in subgroups[attribute].values():  # groups under 5 patients: metrics withheld
            assert (entry["rsna_map"]["value"] is None) == (entry["patients"] < 5)
    text = (out / "metrics.json").read_text()
    assert not [pid for pid, _ in patients if pid in text]  # no patient id, so nothing links a group to one
    assert {"froc.png", "roc.png", "reliability.png", "subgroups.png"} <= {p.name for p in out.iterdir()}
    assert "FROC mean sensitivity" in captured.out and "COCO AP@[.5:.95]" in captured.out
    assert "nan" not in captured.out.lower() and "none" not in captured.out.lower()
    blank = sum(groups[r.patient_id] == ("unknown",) * 3 for r in test)  # a patient without any of the tags
    assert metrics["subgroups"].get("note", "").startswith(f"{blank} of {images} patients") == bool(blank)

    index = tmp_path / "cache" / "index.json"  # as a cache built before the fields were kept
    data = json.loads(index.read_text())
    for entry in data["entries"]:
        for key in ("view_position", "sex", "age_years"):
            del entry[key]
    index.write_text(json.dumps(data))
    assert main(["evaluate", str(run), "--batch-size", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    subgroups = _strict_json(out / "metrics.json")["subgroups"]
    for attribute in SUBGROUPS:
        assert subgroups[attribute]["unknown"]["patients"] == images
    assert f"note: subgroups: {images} of {images} patients have no view position, sex or age" in err
    assert "rebuild" in subgroups["note"]


def test_evaluate_with_the_gate_scores_at_a_threshold_for_gated_scores(tmp_path, capsys):
    """Gating lowers every score, so the plain threshold means nothing for gated ones. A run that records a
    threshold for gated scores (training chooses it beside the plain one) is scored with it; one trained
    before that was recorded gets one chosen now on its validation set, which is the best cut-off of the
    gated validation curve, and says so."""
    from pneumodet.model import load_checkpoint, save_checkpoint
    from pneumodet.rundir import RunDir

    patients = [(f"p{i:02d}", [(100 + 40 * i, 200, 300, 300)] if i % 2 else []) for i in range(12)]
    run = make_run(tmp_path, patients, threshold=0.5)
    code = main(["evaluate", str(run), "--gate", "--split", "val", "--precision", "fp32", "--out", str(tmp_path / "val")])
    assert code == 0, capsys.readouterr().err
    val = json.loads((tmp_path / "val" / "metrics.json").read_text())
    curve = [(t, s) for t, s in val["metric_vs_threshold_for_information"] if s is not None]
    best = max(s for _, s in curve)
    chosen_on_val = min(t for t, s in curve if s == best)  # the lowest cut-off on a tie, as the sweep picks

    code = main(["evaluate", str(run), "--gate", "--precision", "fp32", "--out", str(tmp_path / "now")])
    out = capsys.readouterr().out
    assert code == 0
    now = json.loads((tmp_path / "now" / "metrics.json").read_text())
    assert now["gate"] is True and now["threshold"] == pytest.approx(chosen_on_val)
    assert now["threshold_source"].startswith("chosen for the run's gated scores on its validation set now (")
    assert "(chosen for the run's gated scores on its validation set now" in out

    best_model = RunDir(run).best_model
    model, extra = load_checkpoint(best_model)
    save_checkpoint(best_model, model, extra={**extra, "gate_threshold": 0.125})
    assert main(["evaluate", str(run), "--gate", "--precision", "fp32", "--out", str(tmp_path / "recorded")]) == 0
    recorded = json.loads((tmp_path / "recorded" / "metrics.json").read_text())
    assert recorded["threshold"] == 0.125
    assert recorded["threshold_source"] == "chosen on the validation set during training, for gated scores"
    assert main(["evaluate", str(run), "--precision", "fp32", "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["threshold"] == 0.5
