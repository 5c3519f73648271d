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
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "confusion_matrix.png", "metric_vs_threshold.png", "metrics.json"]


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
