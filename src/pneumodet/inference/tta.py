"""Test-time augmentation: merging the boxes of several views of one image (weighted box fusion or NMS)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import nms

from pneumodet.inference.options import TtaMerge, check_tta


def weighted_boxes_fusion(
    boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], *, iou_thresh: float = 0.55
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted box fusion (Solovyev et al., 2021) of the predictions of ``T`` views of one image.

    Args:
        boxes: ``T`` tensors ``[N_t, 4]`` xyxy, all in the same pixel space.
        scores: ``T`` tensors ``[N_t]``.
        iou_thresh: a box joins the cluster whose fused box it overlaps most, if that IoU is above this.

    Returns:
        fused boxes ``[K, 4]`` (score-weighted mean of each cluster's boxes) and scores ``[K]``
        (mean score of the cluster times ``min(n, T) / T``, so a box seen in one view of two
        keeps half of its score), sorted by score.
    """
    views = len(boxes)
    all_boxes = torch.cat([b.reshape(-1, 4).float() for b in boxes]) if views else torch.zeros(0, 4)
    all_scores = torch.cat([s.reshape(-1).float() for s in scores]) if views else torch.zeros(0)
    if all_boxes.numel() == 0:
        return torch.zeros(0, 4), torch.zeros(0)
    order = torch.argsort(all_scores, descending=True, stable=True)
    # The loop runs in numpy: a few dozen boxes per image, where a torch call's dispatch costs more than its
    # arithmetic (benchmarks/bench_fusion.py). float32 throughout, as the tensors.
    box_arr = all_boxes[order].cpu().numpy()
    score_arr = all_scores[order].cpu().numpy()
    n = len(score_arr)
    fused = np.zeros((n, 4), np.float32)  # fused box of each cluster, first `k` rows used
    area = np.zeros(n, np.float32)
    weighted = np.zeros((n, 4), np.float32)  # sum of score * box per cluster
    score_sum = np.zeros(n, np.float32)
    count = np.zeros(n, np.float32)
    tiny = np.finfo(np.float32).tiny
    k = 0
    for box, score in zip(box_arr, score_arr, strict=True):
        best = -1
        if k:
            lt = np.maximum(fused[:k, :2], box[:2])
            rb = np.minimum(fused[:k, 2:], box[2:])
            wh = np.clip(rb - lt, 0, None)
            inter = wh[:, 0] * wh[:, 1]
            union = (box[2] - box[0]) * (box[3] - box[1]) + area[:k] - inter
            ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # empty boxes: 0, not NaN
            j = int(np.argmax(ious))
            if ious[j] > iou_thresh:
                best = j
        if best < 0:
            best, k = k, k + 1
        weighted[best] += score * box
        score_sum[best] += score
        count[best] += 1
        fused[best] = weighted[best] / max(score_sum[best], tiny)
        area[best] = (fused[best, 2] - fused[best, 0]) * (fused[best, 3] - fused[best, 1])
    fused_scores = score_sum[:k] / count[:k] * np.minimum(count[:k], views) / views
    result_boxes, result_scores = torch.from_numpy(fused[:k]), torch.from_numpy(fused_scores.astype(np.float32))
    order = torch.argsort(result_scores, descending=True, stable=True)
    return result_boxes[order], result_scores[order]


def merge_views(
    boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], *, method: TtaMerge, iou_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the boxes of several views of one image: ``"wbf"`` or plain ``"nms"`` (:class:`ConfigError`
    for another method)."""
    check_tta(None, method)
    if method == "wbf":
        return weighted_boxes_fusion(boxes, scores, iou_thresh=iou_thresh)
    b = torch.cat([x.reshape(-1, 4).float() for x in boxes])
    s = torch.cat([x.reshape(-1).float() for x in scores])
    keep = nms(b, s, iou_thresh)
    return b[keep], s[keep]
