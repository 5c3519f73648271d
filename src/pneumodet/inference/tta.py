"""Test-time augmentation: merging the boxes of several views of one image (weighted box fusion or NMS)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou, nms

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
    all_boxes, all_scores = all_boxes[order], all_scores[order]

    fused = torch.zeros_like(all_boxes)  # fused box of each cluster, first `k` rows used
    weighted = torch.zeros_like(all_boxes)  # sum of score * box per cluster
    score_sum = torch.zeros_like(all_scores)
    count = torch.zeros_like(all_scores)
    k = 0
    for box, score in zip(all_boxes, all_scores, strict=True):
        best = -1
        if k:
            ious = box_iou(box[None], fused[:k])[0]
            j = int(torch.argmax(ious))
            if ious[j] > iou_thresh:
                best = j
        if best < 0:
            best, k = k, k + 1
        weighted[best] += score * box
        score_sum[best] += score
        count[best] += 1
        fused[best] = weighted[best] / score_sum[best].clamp_min(torch.finfo(torch.float32).tiny)
    fused_scores = score_sum[:k] / count[:k] * count[:k].clamp(max=views) / views
    order = torch.argsort(fused_scores, descending=True, stable=True)
    return fused[:k][order], fused_scores[order]


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
