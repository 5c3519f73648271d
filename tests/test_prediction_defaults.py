"""Post-processing defaults (NMS IoU, boxes per image, candidate score) and how a prediction records them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SIZE = 128


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A run folder with a random 128-px resnet18 whose scores spread widely (many overlapping candidates)."""
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best_model.pt", model, extra={"threshold": 0.5, "image_size": SIZE, "val_map": 0.0,
                                                         "epoch": 0, "encoder": "resnet18"})
    return run


def test_predict_json_records_the_postprocessing_it_used(random_run, real_sample, tmp_path, capsys):
    from pneumodet.cli import main
    from pneumodet.model import ModelConfig

    images = str(real_sample / "stage_2_train_images")
    given = tmp_path / "given.json"
    code = main(["predict", str(random_run), images, "--out", str(tmp_path / "a.csv"), "--json", str(given),
                 "--threshold", "0.2", "--nms-iou", "0.3", "--max-det", "3", "--min-score", "0.1",
                 "--tta", "hflip", "--gate", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(given.read_text())
    assert {k: data[k] for k in ("threshold", "tta", "tta_merge", "gate", "precision")} == {
        "threshold": 0.2, "tta": "hflip", "tta_merge": "wbf", "gate": True, "precision": "fp32"}
    assert data["postprocess"] == {"nms_iou": 0.3, "max_detections": 3, "min_score": 0.1}
    assert len(data["images"]) == 16
    # --max-det caps the image, not each view of the hflip TTA (whose merge could otherwise double it)
    assert all(len(image["boxes"]) <= 3 for image in data["images"])

    # without options: the run's threshold and the model configuration's defaults, recorded as used
    default = tmp_path / "default.json"
    assert main(["predict", str(random_run), images, "--out", str(tmp_path / "b.csv"), "--json", str(default),
                 "--precision", "fp32"]) == 0
    data = json.loads(default.read_text())
    config = ModelConfig()
    assert {k: data[k] for k in ("threshold", "tta", "tta_merge", "gate", "precision")} == {
        "threshold": 0.5, "tta": None, "tta_merge": None, "gate": False, "precision": "fp32"}
    assert data["postprocess"] == {"nms_iou": config.nms_thresh, "max_detections": config.max_detections,
                                   "min_score": config.score_thresh}
    assert all(len(image["boxes"]) <= config.max_detections for image in data["images"])
