"""Post-processing defaults (NMS IoU, boxes per image, candidate score) and how a prediction records them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import write_spread_run

SIZE = 128


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    """A run folder with a random 128-px resnet18 whose scores spread widely (many overlapping candidates)."""
    return write_spread_run(tmp_path_factory.mktemp("run"), SIZE, 0.5)


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


def _cluster(cx: float, cy: float, w: float, h: float) -> list[list[float]]:
    """A lesion box and 5 near copies as RetinaNet's neighbouring anchors leave them: shifted by 0.4 of its
    side along x or y (IoU 0.43 with it) and shrunk to 0.7 about its centre (IoU 0.49); the copies overlap
    each other by IoU 0.11 to 0.27."""
    def box(dx: float, dy: float, scale: float = 1.0) -> list[float]:
        x, y = cx + dx * w, cy + dy * h
        return [x - scale * w / 2, y - scale * h / 2, x + scale * w / 2, y + scale * h / 2]

    return [box(0, 0), box(0.4, 0), box(-0.4, 0), box(0, 0.4), box(0, -0.4), box(0, 0, 0.7)]


def test_the_defaults_keep_one_box_per_lesion_where_the_old_ones_kept_a_cluster():
    """Near copies of a lesion box with IoU just under 0.5 survived NMS at 0.5 (the clusters of 5-12 boxes);
    at the defaults one box per lesion is left, and a second lesion of the image is kept (RSNA lesions of
    one image never overlap by more than IoU 0.06). Scores are all different: no order of ties matters."""
    from torchvision.ops import box_iou

    from pneumodet.model import HeadOutputs, ModelConfig
    from pneumodet.model.boxes import BoxCoder
    from pneumodet.model.retinanet import postprocess

    first, second = _cluster(120, 200, 80, 120), _cluster(360, 220, 70, 110)
    anchors = torch.tensor([first[0], second[0], *first[1:], *second[1:]])  # each lesion's box scores best
    iou = box_iou(anchors, anchors).fill_diagonal_(0)
    assert float(iou.max()) < 0.5 and float(iou[0, 1]) == 0
    scores = torch.linspace(0.9, 0.4, len(anchors))  # strictly decreasing
    outputs = HeadOutputs(torch.logit(scores)[None], torch.zeros(1, len(anchors), 4), torch.zeros(1, 3), anchors,
                          (len(anchors),), (512, 512))

    def kept(nms_iou: float, max_det: int) -> torch.Tensor:
        return postprocess(outputs, BoxCoder(), score_thresh=0.05, nms_thresh=nms_iou, topk_per_level=1000,
                           max_detections=max_det)[0].boxes

    assert len(kept(0.5, 100)) == 12  # every copy survives: two clusters of 6
    config = ModelConfig()
    torch.testing.assert_close(kept(config.nms_thresh, config.max_detections), anchors[:2])
