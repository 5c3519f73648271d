"""Target assignment and the RetinaNet loss, vectorised over the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from pneumodet.model.boxes import BoxCoder
from pneumodet.model.config import ModelConfig

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


class RetinaNetLoss(nn.Module):
    """Focal classification + box regression + global image-class cross-entropy.

    Classification and regression are summed over the batch and divided by the number of positive
    anchors in the batch (at least 1), as in Lin et al. 2017.
    """

    def __init__(self, config: ModelConfig, box_coder: BoxCoder | None = None) -> None:
        super().__init__()
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
        num_pos = positive.sum().clamp(min=1).float()

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
