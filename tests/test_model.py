"""The RetinaNet model: config, anchors, matching, loss, decoding, encoders and weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torchvision.ops import box_iou

from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.model import (
    AnchorGenerator,
    BoxCoder,
    HeadOutputs,
    ModelConfig,
    anchor_coverage,
    build_model,
    match_anchors,
)
from pneumodet.model.anchors import best_anchor_iou, cell_anchors
from pneumodet.model.encoders import Encoder
from pneumodet.model.loss import BACKGROUND, IGNORED

TORCHVISION_ANCHORS = dict(
    pyramid_levels=(3, 4, 5, 6, 7), anchor_sizes=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1),
    anchor_scales=(1, 2 ** (1 / 3), 2 ** (2 / 3)), anchor_ratios=(0.5, 1, 2),
)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="resnet18", image_size=128, fpn_channels=64, head_convs=2))


# ---------------------------------------------------------------- config
def test_config_round_trips_through_json():
    config = ModelConfig(encoder="resnet18", anchor_ratios=(1.0, 2.0), box_loss="giou")
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    assert isinstance(ModelConfig.from_dict(data).anchor_ratios, tuple)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"encodr": "resnet50"}, "unknown model config key.*encodr"),
        ({"pyramid_levels": [4, 6]}, "consecutive"),
        ({"anchor_sizes": [0.1, 0.2]}, "one size per pyramid level"),
        ({"box_loss": "l2"}, "box_loss"),
        ({"fg_iou": 0.3, "bg_iou": 0.4}, "bg_iou"),
    ],
)
def test_config_rejects_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown encoder 'resnet_does_not_exist'"):
        Encoder("resnet_does_not_exist")


# ---------------------------------------------------------------- anchors
def test_cell_anchors_have_requested_area_and_ratio():
    base = cell_anchors(64.0, (1.0, 2.0), (0.5, 2.0))
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([64.0**2, 128.0**2] * 2))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 2.0, 2.0]))
    torch.testing.assert_close(base[:, :2] + base[:, 2:], torch.zeros(4, 2))  # centred on the origin


def test_anchor_grid_positions_and_order():
    gen = AnchorGenerator(levels=(4, 5), sizes=(0.25, 0.5), scales=(1.0,), ratios=(1.0, 2.0))
    anchors, per_level = gen(128, 64, torch.device("cpu"))
    assert per_level == (8 * 4 * 2, 4 * 2 * 2)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # level 4, row 1, column 2, second shape: centre ((2 + .5) * 16, (1 + .5) * 16), size 0.25 * 64
    i = (1 * 4 + 2) * 2 + 1
    torch.testing.assert_close(centres[i], torch.tensor([40.0, 24.0]))
    w, h = anchors[i, 2] - anchors[i, 0], anchors[i, 3] - anchors[i, 1]
    assert math.isclose(float(w * h), 16.0**2, rel_tol=1e-5) and math.isclose(float(h / w), 2.0, rel_tol=1e-5)
    assert gen(128, 64, torch.device("cpu"))[0] is anchors  # cached


def test_best_anchor_iou_shortcut_equals_brute_force():
    config = ModelConfig(image_size=256)
    gen = AnchorGenerator.from_config(config)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    wh = 8 + torch.rand(300, 2, generator=g) * 150
    boxes = torch.cat([xy, (xy + wh).clamp(max=256)], dim=1)
    anchors, _ = gen(256, 256, torch.device("cpu"))
    brute = box_iou(boxes, anchors).max(dim=1).values
    torch.testing.assert_close(best_anchor_iou(boxes, gen, 256, 256), brute, atol=1e-5, rtol=0)


def test_anchor_coverage_counts_boxes_that_match_an_anchor():
    config = ModelConfig(image_size=512, pyramid_levels=(5,), anchor_sizes=(0.25,), anchor_scales=(1.0,),
                         anchor_ratios=(1.0,))
    # one box equal to the anchor at cell (2, 3), one a quarter of its area (IoU 0.25), one tiny
    exact = [3 * 32 + 16 - 64, 2 * 32 + 16 - 64, 3 * 32 + 16 + 64, 2 * 32 + 16 + 64]
    quarter = [exact[0], exact[1], exact[0] + 64, exact[1] + 64]
    report = anchor_coverage([exact, quarter, [0, 0, 4, 4]], config)
    assert report["num_anchors"] == 16 * 16
    assert report["coverage_iou50"] == pytest.approx(1 / 3)
    assert report["coverage_iou40"] == pytest.approx(1 / 3)
    # the same boxes given at 1024 px are scaled to the 512 px input first
    scaled = anchor_coverage(np.array([exact, quarter]) * 2, config, source_size=1024)
    assert scaled["coverage_iou50"] == pytest.approx(1 / 2)


def test_default_anchors_cover_real_rsna_boxes_with_fewer_anchors(real_sample):
    import pandas as pd

    labels = pd.read_csv(real_sample / "stage_2_train_labels.csv").dropna(subset=["x"])
    boxes = np.stack([labels.x, labels.y, labels.x + labels.width, labels.y + labels.height], axis=1)
    ours = anchor_coverage(boxes, ModelConfig(image_size=512), source_size=1024)
    tv = anchor_coverage(boxes, ModelConfig(image_size=512, **TORCHVISION_ANCHORS), source_size=1024)
    assert ours["num_boxes"] == 9555
    assert ours["coverage_iou50"] >= 0.99 and ours["coverage_iou40"] >= 0.995
    assert ours["num_anchors"] * 4 <= tv["num_anchors"]
    # the default levels follow the input size, so the geometry (and coverage) is the same at 256 and 1024
    for size, levels in ((256, (3, 4, 5)), (1024, (5, 6, 7))):
        config = ModelConfig(image_size=size)
        assert config.pyramid_levels == levels
        other = anchor_coverage(boxes, config, source_size=1024)
        assert other["coverage_iou50"] == pytest.approx(ours["coverage_iou50"], abs=0.002)


# ---------------------------------------------------------------- boxes and matching
def test_box_coder_round_trip_is_exact_in_fp32():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(500, 2, generator=g) * 900
    boxes = torch.cat([xy, xy + 5 + torch.rand(500, 2, generator=g) * 500], dim=1)
    anchors = torch.cat([xy + 7, xy + 7 + 30 + torch.rand(500, 2, generator=g) * 300], dim=1)
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(coder.encode(anchors, anchors), torch.zeros(500, 4))
    # bf16 deltas are decoded in fp32 and come back fp32
    assert coder.decode(deltas.bfloat16(), anchors).dtype == torch.float32


def test_match_anchors_thresholds_ignored_band_best_anchor_and_padding():
    box = [0.0, 0.0, 10.0, 10.0]
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 6.0],   # IoU 0.60 -> positive
        [0.0, 0.0, 10.0, 4.5],   # IoU 0.45 -> ignored
        [0.0, 0.0, 10.0, 3.0],   # IoU 0.30 -> background
        [50.0, 50.0, 60.0, 60.0],  # IoU 0 with box 0; exact copy of box 1
        [100.0, 100.0, 110.0, 103.0],  # only anchor touching box 2: IoU 0.3, still positive (best anchor)
    ])
    boxes = torch.tensor([
        [box, [50.0, 50.0, 60.0, 60.0], [100.0, 100.0, 110.0, 110.0], [0.0, 0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0, 0.0]] * 4,  # an image without boxes: all padding
    ])
    matched = match_anchors(anchors, boxes, fg_iou=0.5, bg_iou=0.4)
    assert matched[0].tolist() == [0, IGNORED, BACKGROUND, 1, 2]
    assert matched[1].tolist() == [BACKGROUND] * 5


def test_match_anchors_gives_each_box_its_best_anchor_even_when_shared():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0]])
    # box 1 is best matched by anchor 1 (IoU 0.5 w.r.t. box 1 is higher than anything else for it)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0]]])
    matched = match_anchors(anchors, boxes, fg_iou=0.5, bg_iou=0.4)
    assert matched[0].tolist() == [0, 1]


# ---------------------------------------------------------------- loss
def test_loss_with_boxes_and_with_empty_batch(small_model):
    images = torch.rand(2, 1, 128, 128)
    outputs = small_model(images)
    boxes = torch.tensor([[[20.0, 30.0, 60.0, 90.0], [0.0, 0.0, 0.0, 0.0]], [[70.0, 10.0, 110.0, 70.0]] * 2])
    losses = small_model.loss(outputs, boxes, torch.tensor([1, 1]))
    assert set(losses) == {"total", "classification", "regression", "global"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["regression"] > 0
    weight = small_model.config.global_loss_weight
    expected = losses["classification"] + losses["regression"] + weight * losses["global"]
    torch.testing.assert_close(losses["total"], expected)

    small_model.criterion.eval()  # the running positive count is read, not updated: both see one divisor
    empty = small_model.loss(outputs, torch.zeros(2, 3, 4), torch.tensor([0, 2]))
    no_rows = small_model.loss(outputs, torch.zeros(2, 0, 4), torch.tensor([0, 2]))
    small_model.criterion.train()
    torch.testing.assert_close(no_rows["total"], empty["total"])
    assert empty["regression"] == 0 and empty["classification"] > 0
    empty["total"].backward()
    grads = [p.grad for p in small_model.cls_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    small_model.zero_grad()


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_box_loss_is_zero_for_perfect_deltas(box_loss):
    config = ModelConfig(encoder="resnet18", image_size=128, fpn_channels=32, head_convs=1, box_loss=box_loss)
    model = build_model(config)
    outputs = model(torch.rand(1, 1, 128, 128))
    box = torch.tensor([30.0, 20.0, 70.0, 90.0])
    # deltas that decode every anchor exactly onto the box
    perfect = model.box_coder.encode(box.expand_as(outputs.anchors), outputs.anchors)[None]
    losses = model.loss(outputs._replace(box_deltas=perfect), box.reshape(1, 1, 4), torch.tensor([1]))
    assert losses["regression"].abs() < 1e-5
    off = model.loss(outputs._replace(box_deltas=perfect + 0.3), box.reshape(1, 1, 4), torch.tensor([1]))
    assert off["regression"] > 0.05


def test_forward_refuses_three_channel_input(small_model):
    with pytest.raises(ValueError, match=r"one-channel images of shape \[B, 1, H, W\], got \(1, 3, 64, 64\)"):
        small_model(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------- detection
def _outputs_with_hits(anchors, hits, batch, image_size=128):
    """Head outputs whose only confident anchors are ``hits`` = {(image, anchor): (logit, deltas)}."""
    a = anchors.shape[0]
    logits = torch.full((batch, a), -10.0)
    deltas = torch.zeros(batch, a, 4)
    for (i, j), (logit, d) in hits.items():
        logits[i, j] = logit
        deltas[i, j] = torch.tensor(d)
    return HeadOutputs(logits, deltas, torch.tensor([[0.0, 2.0, 0.0]] * batch), anchors, (a,),
                       (image_size, image_size))


def test_detect_decodes_to_input_pixels_and_applies_nms_per_image(small_model):
    anchors = torch.tensor([[10.0, 10.0, 50.0, 70.0], [12.0, 10.0, 52.0, 70.0], [80.0, 20.0, 120.0, 60.0]])
    hits = {
        (0, 0): (3.0, [0.0, 0.0, 0.0, 0.0]),
        (0, 1): (2.0, [0.0, 0.0, 0.0, 0.0]),  # overlaps anchor 0 (IoU 0.9): suppressed
        (0, 2): (1.0, [0.25, 0.0, math.log(0.5), 0.0]),  # moved right by 10 px, half as wide
        (1, 1): (2.0, [0.0, 0.0, 0.0, 0.0]),  # same box in another image: not suppressed
    }
    dets = small_model.detect(_outputs_with_hits(anchors, hits, batch=2), score_thresh=0.5, nms_thresh=0.5)
    assert len(dets) == 2
    torch.testing.assert_close(dets[0].boxes, torch.tensor([[10.0, 10.0, 50.0, 70.0], [100.0, 20.0, 120.0, 60.0]]))
    torch.testing.assert_close(dets[0].scores, torch.sigmoid(torch.tensor([3.0, 1.0])))
    torch.testing.assert_close(dets[1].boxes, anchors[1:2])
    assert dets[0].boxes.dtype == torch.float32
    torch.testing.assert_close(dets[0].class_probs, torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0))


def test_detect_respects_max_detections_threshold_and_clips():
    model_anchors = torch.tensor([[float(20 * i), 0.0, float(20 * i + 15), 15.0] for i in range(6)] +
                                 [[100.0, 100.0, 160.0, 160.0]])
    hits = {(0, i): (float(i), [0.0, 0.0, 0.0, 0.0]) for i in range(7)}
    outputs = _outputs_with_hits(model_anchors, hits, batch=1)
    model = build_model(ModelConfig(encoder="resnet18", image_size=128, fpn_channels=32, head_convs=1))
    top3 = model.detect(outputs, score_thresh=0.0, max_detections=3)[0]
    torch.testing.assert_close(top3.scores, torch.sigmoid(torch.tensor([6.0, 5.0, 4.0])))
    torch.testing.assert_close(top3.boxes[0], torch.tensor([100.0, 100.0, 128.0, 128.0]))  # clipped
    above = model.detect(outputs, score_thresh=float(torch.sigmoid(torch.tensor(3.5))))[0]
    assert len(above.scores) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_detect_suppresses_near_identical_boxes_across_pyramid_levels(small_model, dtype):
    """NMS runs per image over all levels together (not per level), on fp32 boxes whatever the head's
    dtype, and drops a box whose IoU with a better one is above ``nms_thresh`` (not below)."""
    # level 0: two anchors; level 1: two more; 0, 2 and 3 are near-identical (IoU >= 0.92), 1 is apart
    anchors = torch.tensor([[20.0, 20.0, 80.0, 90.0], [90.0, 10.0, 120.0, 40.0],
                            [21.0, 20.0, 81.0, 91.0], [20.0, 21.0, 79.0, 90.0]])
    logits = torch.tensor([[3.0, 1.0, 2.5, 2.0], [-10.0, -10.0, 2.0, 3.0]])
    outputs = HeadOutputs(logits.to(dtype), torch.zeros(2, 4, 4, dtype=dtype), torch.zeros(2, 3), anchors,
                          (2, 2), (128, 128))
    dets = small_model.detect(outputs, score_thresh=0.05, nms_thresh=0.5)
    torch.testing.assert_close(dets[0].boxes, anchors[[0, 1]])
    torch.testing.assert_close(dets[1].boxes, anchors[[3]])  # the best of the cluster, from level 1
    # at 0.96 the member overlapping the best by 0.954 survives, the one by 0.969 not; at 1.0 every box does
    torch.testing.assert_close(small_model.detect(outputs, score_thresh=0.05, nms_thresh=0.96)[0].boxes,
                               anchors[[0, 2, 1]])
    assert len(small_model.detect(outputs, score_thresh=0.05, nms_thresh=1.0)[0].boxes) == 4


def test_bf16_channels_last_matches_fp32_boxes(small_model):
    small_model.eval()
    images = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        ref = small_model(images)
        cl_model = small_model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cl_model(images.to(memory_format=torch.channels_last))
    assert low.cls_logits.dtype == torch.bfloat16
    coder = small_model.box_coder
    diff = (coder.decode(low.box_deltas, low.anchors) - coder.decode(ref.box_deltas, ref.anchors)).abs().max()
    assert diff < 1.0
    dets = small_model.detect(low, score_thresh=0.0, max_detections=5)
    assert all(d.boxes.dtype == torch.float32 and len(d.boxes) == 5 for d in dets)
    small_model.to(memory_format=torch.contiguous_format).train()


# ---------------------------------------------------------------- encoders and weight files
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_file_loads_into_one_channel_encoder(tmp_path, fmt):
    torch.manual_seed(3)
    source = timm.create_model("resnet50", pretrained=False)  # 3-channel, with classifier
    state = source.state_dict()
    path = tmp_path / f"resnet50.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    encoder = Encoder("resnet50", weights=path)
    own = encoder.body.state_dict()
    torch.testing.assert_close(own["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    for key in ("layer4.2.conv3.weight", "layer1.0.bn1.running_var", "bn1.bias"):
        torch.testing.assert_close(own[key], state[key])
    assert "fc.weight" not in own


def test_one_channel_weights_without_classifier_load_unchanged(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    encoder = Encoder("resnet18", weights=tmp_path / "r18.pth")
    torch.testing.assert_close(encoder.body.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth: weights do not fit the encoder"):
        Encoder("resnet50", weights=tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="not found"):
        Encoder("resnet18", weights=tmp_path / "missing.pth")


def test_pretrained_without_network_is_refused_not_random(monkeypatch, tmp_path):
    """No silent fall-back to random weights (more cases in test_untrusted_files.py)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="pretrained .* weights for encoder 'resnet18' unavailable"):
        Encoder("resnet18", pretrained=True)


def test_encoder_normalises_with_its_pretrained_mean_and_std():
    encoder = Encoder("resnet18")
    assert float(encoder.mean) == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    assert float(encoder.std) == pytest.approx((0.229 + 0.224 + 0.225) / 3)
    assert encoder.levels == (1, 2, 3, 4, 5)
