"""The model trains: every supported encoder runs forward/backward, it overfits a few images, it compiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumodet.model import ModelConfig, build_model


def _forward_backward(encoder: str, size: int, batch: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, image_size=size))
    images = torch.rand(batch, 1, size, size)
    boxes = torch.zeros(batch, 2, 4)
    boxes[0, 0] = torch.tensor([0.2, 0.25, 0.45, 0.7]) * size  # image 0 has a box, the others none
    classes = torch.tensor([1] + [0] * (batch - 1))
    outputs = model(images)
    a = outputs.anchors.shape[0]
    assert outputs.cls_logits.shape == (batch, a) and outputs.box_deltas.shape == (batch, a, 4)
    assert outputs.global_logits.shape == (batch, 3)
    losses = model.loss(outputs, boxes, classes)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["regression"] > 0 and losses["classification"] > 0
    losses["total"].backward()
    stem = next(p for p in model.encoder.parameters() if p.ndim == 4)
    assert stem.shape[1] == 1, "single-channel input, no 3x copy"
    assert stem.grad is not None and torch.isfinite(stem.grad).all() and stem.grad.abs().sum() > 0


@pytest.mark.parametrize("encoder", ["resnet50", "se_resnext50"])
def test_forward_backward_with_boxes_and_empty_images(encoder):
    _forward_backward(encoder, 256, 2)


@pytest.mark.slow
def test_pnasnet5_forward_backward():
    _forward_backward("pnasnet5", 256, 1)


def _ellipse_images(n: int, size: int, seed: int = 0):
    """Noisy images with 0-2 bright ellipses each; returns images, padded xyxy boxes, classes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = torch.rand(n, 1, size, size, generator=g) * 0.2
    boxes = torch.zeros(n, 2, 4)
    classes = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        count = 0 if i % 3 == 2 else 1 + i % 2
        for j in range(count):
            w = 20 + 30 * float(torch.rand(1, generator=g))
            h = min(w * (1 + float(torch.rand(1, generator=g))), 0.6 * size)
            cx = size * (0.25 + 0.5 * j) + (float(torch.rand(1, generator=g)) - 0.5) * 10
            cy = size * (0.3 + 0.4 * float(torch.rand(1, generator=g)))
            images[i, 0][((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1] += 0.6
            boxes[i, j] = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        classes[i] = 1 if count else 0
    return images.clamp(0, 1), boxes, classes


def _as_metric_inputs(boxes, detections):
    from pneumodet.boxes import xyxy_to_xywh

    truth = {str(i): xyxy_to_xywh(b[b[:, 2] > b[:, 0]].numpy()) for i, b in enumerate(boxes)}
    preds = {
        str(i): np.concatenate([d.scores[:, None].numpy(), xyxy_to_xywh(d.boxes.numpy())], axis=1)
        for i, d in enumerate(detections)
    }
    return truth, preds


@pytest.mark.slow
def test_model_overfits_a_few_images_and_finds_their_boxes():
    from pneumodet.metrics import rsna_map

    torch.manual_seed(0)
    images, boxes, classes = _ellipse_images(6, 128)
    model = build_model(ModelConfig(encoder="resnet18", image_size=128, fpn_channels=64, head_convs=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    # A fixed number of steps: BatchNorm running statistics need them to catch up with the weights.
    for _ in range(60):
        model.train()
        losses = model.loss(model(images), boxes, classes)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(float(losses["total"]))
    assert history[-1] < 0.1 * history[0]
    model.eval()
    with torch.no_grad():
        detections = model.detect(model(images), score_thresh=0.3, nms_thresh=0.3)
    result = rsna_map(*_as_metric_inputs(boxes, detections))
    assert result.score >= 0.5, (result.score, history[-5:])
    # images without boxes get no confident box, and the global head learned the image classes
    assert all(len(detections[i].boxes) == 0 for i in range(6) if classes[i] == 0)
    predicted = torch.stack([d.class_probs for d in detections]).argmax(dim=1)
    assert predicted.tolist() == classes.tolist()


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=64, fpn_channels=16, head_convs=1)).eval()
    images = torch.rand(2, 1, 64, 64)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager, fast = model(images), compiled(images)
    torch.testing.assert_close(fast.cls_logits, eager.cls_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.box_deltas, eager.box_deltas, atol=1e-4, rtol=1e-4)
    assert fast.anchors_per_level == eager.anchors_per_level
    dets = model.detect(fast, score_thresh=0.0, max_detections=3)
    assert [len(d.boxes) for d in dets] == [3, 3]
