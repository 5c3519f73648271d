"""Target assignment and the RetinaNet loss, vectorised over the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from pneumodet.model.boxes import BoxCoder
from pneumodet.model.config import LOSS_NORMALIZERS, ModelConfig

#: Matched-index values of anchors that are not matched to a box.
BACKGROUND = -1
IGNORED = -2


def valid_boxes(boxes: Tensor) -> Tensor:
    """Which rows of padded boxes are real.

    Args:
        boxes: Tensor[B, M, 4] xyxy; a padding row is all zeros.
    Returns:
        BoolTensor[B, M], true where x2 > x1 and y2 > y1.
    """
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def match_anchors(anchors: Tensor, boxes: Tensor, fg_iou: float, bg_iou: float) -> Tensor:
    """Assign every anchor of every image to a box, to background, or to neither.

    IoU >= ``fg_iou`` matches the anchor to its highest-IoU box; IoU < ``bg_iou`` makes it
    background; the band in between is ignored. The anchor(s) with the highest IoU for a box are
    always matched to that box, so no box is left without a positive anchor (ties all count).

    Args:
        anchors: Tensor[A, 4] xyxy.
        boxes: Tensor[B, M, 4] xyxy, padding rows all zeros.
    Returns:
        LongTensor[B, A]: the matched box index in ``[0, M)``, :data:`BACKGROUND` or :data:`IGNORED`.
    """
    b, m, _ = boxes.shape
    a = anchors.shape[0]
    if m == 0:
        return torch.full((b, a), BACKGROUND, dtype=torch.long, device=anchors.device)
    valid = valid_boxes(boxes)  # [B, M]
    iou = box_iou(boxes.reshape(-1, 4).float(), anchors.float()).reshape(b, m, a)
    iou = torch.where(valid[..., None], iou, torch.full_like(iou, -1.0))
    best_for_box = iou.max(dim=2, keepdim=True).values  # [B, M, 1]
    forced = (iou == best_for_box) & valid[..., None] & (best_for_box > 0)
    # A forced anchor takes the box it is best for, with an IoU above any real one.
    score = torch.where(forced, iou + 2.0, iou)
    best, matched = score.max(dim=1)  # [B, A]
    matched = torch.where(best >= fg_iou, matched, torch.full_like(matched, IGNORED))
    return torch.where(best < bg_iou, torch.full_like(matched, BACKGROUND), matched)


class PositiveNormalizer(nn.Module):
    """The divisor of the summed classification and box losses: the number of positive anchors per batch.

    ``batch`` divides by this batch's count clamped to >= 1 (Lin et al. 2017). On RSNA data most images
    have no box, so that count swings from 0 to a few hundred between batches of 8 and the same sum of
    background losses is weighted up to 200x more in a batch without boxes: at random initialisation,
    when the background logits drift up, such a batch reports (and back-propagates) the whole sum.

    ``ema`` divides by an exponential moving average of the counts (``momentum`` 0.9, as detectron2's
    RetinaNet), bias-corrected like Adam's moments so that it is the first batch's count at the first step
    and no start value is assumed: after training batches with counts ``n_1 .. n_t``, the divisor is
    ``max(1, ema_t / (1 - momentum**t))`` with ``ema_t = momentum * ema_{t-1} + (1 - momentum) * n_t``.
    Only training batches (module in training mode) update it; in evaluation it is used as it stands, and
    before any training batch the batch's own count is used. Its state is a non-persistent buffer: not in
    checkpoints or model files (a resumed run re-estimates it within a few steps).
    """

    def __init__(self, mode: str = "ema", momentum: float = 0.9) -> None:
        super().__init__()
        if mode not in LOSS_NORMALIZERS:
            raise ValueError(f"loss normalizer must be one of {LOSS_NORMALIZERS}, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"loss normalizer momentum must be in [0, 1), got {momentum}")
        self.mode = mode
        self.momentum = momentum
        self.register_buffer("ema", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.float32), persistent=False)
        #: the last batch's positive count and divisor (detached), for the per-step record of training
        self.last_count: Tensor | None = None
        self.last_divisor: Tensor | None = None

    def forward(self, num_pos: Tensor) -> Tensor:
        """The divisor (fp32 scalar, >= 1) for a batch with ``num_pos`` positive anchors (a scalar tensor);
        updates the average when training. Tensor arithmetic only: no host-device synchronisation."""
        num_pos = num_pos.detach().float()
        if self.mode == "batch":
            divisor = num_pos.clamp(min=1.0)
        else:
            if self.training:
                self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * num_pos)
                self.steps.add_(1.0)
            corrected = self.ema / (1.0 - torch.pow(self.momentum, self.steps)).clamp(min=1e-12)
            divisor = torch.where(self.steps > 0, corrected, num_pos).clamp(min=1.0)
        self.last_count, self.last_divisor = num_pos, divisor
        return divisor


class RetinaNetLoss(nn.Module):
    """Focal classification + box regression + global image-class cross-entropy.

    Classification and regression are summed over the batch and divided by the number of positive
    anchors (:class:`PositiveNormalizer`: by default a running mean per batch, ``normalizer="batch"`` this
    batch's count, at least 1, as in Lin et al. 2017).
    """

    def __init__(self, config: ModelConfig, box_coder: BoxCoder | None = None, *, normalizer: str = "ema",
                 momentum: float = 0.9) -> None:
        super().__init__()
        self.normalizer = PositiveNormalizer(normalizer, momentum)
        self.fg_iou = config.fg_iou
        self.bg_iou = config.bg_iou
        self.alpha = config.focal_alpha
        self.gamma = config.focal_gamma
        self.box_loss = config.box_loss
        self.beta = config.smooth_l1_beta
        self.global_weight = config.global_loss_weight
        self.box_coder = box_coder or BoxCoder()

    def forward(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        global_logits: Tensor,
        anchors: Tensor,
        boxes: Tensor,
        classes: Tensor,
    ) -> dict[str, Tensor]:
        """
        Args:
            cls_logits: Tensor[B, A]; box_deltas: Tensor[B, A, 4]; global_logits: Tensor[B, C];
            anchors: Tensor[A, 4] xyxy; boxes: Tensor[B, M, 4] xyxy in input pixels (padding rows
            all zeros); classes: LongTensor[B] image class indices.
        Returns:
            ``total``, ``classification``, ``regression``, ``global``: scalar fp32 tensors.
        """
        boxes = boxes.to(device=anchors.device, dtype=torch.float32)
        if boxes.shape[1] == 0:  # a batch padded to zero boxes: one padding row keeps gather valid
            boxes = boxes.new_zeros(boxes.shape[0], 1, 4)
        matched = match_anchors(anchors, boxes, self.fg_iou, self.bg_iou)  # [B, A]
        positive = matched >= 0
        num_pos = self.normalizer(positive.sum())

        target = positive.float()
        cls_loss = sigmoid_focal_loss(cls_logits.float(), target, alpha=self.alpha, gamma=self.gamma, reduction="none")
        cls_loss = torch.where(matched != IGNORED, cls_loss, torch.zeros_like(cls_loss)).sum() / num_pos

        # Matched boxes for every anchor; only positive anchors are read below.
        gt = torch.gather(boxes, 1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))  # [B, A, 4]
        reg_loss = self._regression(box_deltas[positive].float(), gt[positive], anchors.expand_as(gt)[positive])
        reg_loss = reg_loss / num_pos

        global_loss = F.cross_entropy(global_logits.float(), classes.to(global_logits.device))
        total = cls_loss + reg_loss + self.global_weight * global_loss
        return {"total": total, "classification": cls_loss, "regression": reg_loss, "global": global_loss}

    def _regression(self, deltas: Tensor, gt: Tensor, anchors: Tensor) -> Tensor:
        """Summed box loss over positive anchors. deltas, gt, anchors: Tensor[P, 4]."""
        if self.box_loss == "giou":
            return generalized_box_iou_loss(self.box_coder.decode(deltas, anchors), gt, reduction="sum")
        targets = self.box_coder.encode(gt, anchors)
        return F.smooth_l1_loss(deltas, targets, beta=self.beta, reduction="sum")
