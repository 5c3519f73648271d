"""Box regression targets: anchors and boxes <-> (dx, dy, dw, dh) deltas."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest log-scale a decoded box may take (as torchvision), so exp() cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Faster R-CNN box parameterisation with unit weights (as torchvision's RetinaNet).

    Works on any leading shape; always computes in fp32, because bf16 rounds 500-pixel
    coordinates to 2 px.
    """

    def __init__(self, scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        self.scale_clamp = scale_clamp

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas that turn ``anchors`` into ``boxes``.

        Args:
            boxes: Tensor[..., 4] xyxy (positive width and height).
            anchors: Tensor[..., 4] xyxy, broadcastable to ``boxes``.
        Returns:
            Tensor[..., 4] fp32 (dx, dy, dw, dh).
        """
        bx, by, bw, bh = self._centre_size(boxes.float())
        ax, ay, aw, ah = self._centre_size(anchors.float())
        return torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw), torch.log(bh / ah)], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Inverse of :meth:`encode`.

        Args:
            deltas: Tensor[..., 4] (dx, dy, dw, dh), any float dtype.
            anchors: Tensor[..., 4] xyxy, broadcastable to ``deltas``.
        Returns:
            Tensor[..., 4] fp32 xyxy.
        """
        deltas = deltas.float()
        ax, ay, aw, ah = self._centre_size(anchors.float())
        cx = ax + deltas[..., 0] * aw
        cy = ay + deltas[..., 1] * ah
        w = aw * torch.exp(deltas[..., 2].clamp(max=self.scale_clamp))
        h = ah * torch.exp(deltas[..., 3].clamp(max=self.scale_clamp))
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
