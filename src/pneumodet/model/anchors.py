"""Anchors: one grid of boxes per pyramid level, and how well a set of anchors covers real boxes."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pneumodet.model.config import ModelConfig


def cell_anchors(size: float, scales: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
    """Anchor shapes of one level centred on the origin.

    ``ratios`` are height / width; each anchor has area ``(size * scale) ** 2``.

    Returns:
        Tensor[K, 4] xyxy, K = len(ratios) * len(scales), ratio-major.
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    scales_t = torch.tensor(scales, dtype=torch.float64)
    side = (size * scales_t)[None, :]  # [1, S]
    h = (side * ratios_t.sqrt()[:, None]).reshape(-1)
    w = (side / ratios_t.sqrt()[:, None]).reshape(-1)
    return torch.stack([-w / 2, -h / 2, w / 2, h / 2], dim=1).float()


class AnchorGenerator(nn.Module):
    """Anchors for every level of the pyramid, cached per (height, width, device).

    An anchor of level ``l`` at cell ``(i, j)`` is centred on ``((j + 0.5) * 2**l, (i + 0.5) * 2**l)``.
    The order is level, then row, then column, then anchor shape — the order in which
    :class:`~pneumodet.model.retinanet.PneumoRetinaNet` flattens its head outputs.
    """

    def __init__(
        self,
        levels: tuple[int, ...],
        sizes: tuple[float, ...],
        scales: tuple[float, ...],
        ratios: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.sizes = tuple(sizes)
        self.scales = tuple(scales)
        self.ratios = tuple(ratios)
        self._cache: dict[tuple[int, int, str], tuple[Tensor, tuple[int, ...]]] = {}

    @classmethod
    def from_config(cls, config: ModelConfig) -> AnchorGenerator:
        return cls(config.pyramid_levels, config.anchor_sizes, config.anchor_scales, config.anchor_ratios)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.scales) * len(self.ratios)

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Feature-map size of each level for an input of ``height x width`` (conv stride-2 rounding)."""
        sizes = []
        for level in self.levels:
            h, w = height, width
            for _ in range(level):
                h, w = (h + 1) // 2, (w + 1) // 2
            sizes.append((h, w))
        return sizes

    def forward(self, height: int, width: int, device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
        """Returns (anchors Tensor[A, 4] fp32 xyxy in input pixels, anchors per level)."""
        key = (height, width, str(device))
        if torch.compiler.is_compiling():
            # computed in the graph (constants there): a cache filled while tracing is a guard that fails on
            # the next call, which would compile the whole network a second time
            return self._make(height, width, device)
        if key not in self._cache:
            self._cache[key] = self._make(height, width, device)
        return self._cache[key]

    def _make(self, height: int, width: int, device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
        side = min(height, width)
        per_level = []
        for level, size, (gh, gw) in zip(self.levels, self.sizes, self.grid_sizes(height, width), strict=True):
            stride = 2.0**level
            base = cell_anchors(size * side, self.scales, self.ratios).to(device)  # [K, 4]
            ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
            per_level.append((centres + base[None]).reshape(-1, 4))
        counts = tuple(a.shape[0] for a in per_level)
        return torch.cat(per_level), counts


def _nearest_centre(c: Tensor, stride: float, cells: int) -> Tensor:
    """Centre of the grid cell nearest to each coordinate in ``c`` (clamped to the grid)."""
    index = torch.clamp(torch.floor(c / stride), 0, cells - 1)
    return (index + 0.5) * stride


def best_anchor_iou(boxes: Tensor, generator: AnchorGenerator, height: int, width: int) -> Tensor:
    """Highest IoU of each box with any anchor, without materialising all anchors.

    IoU between two boxes of fixed shapes only falls as their centres move apart along either axis,
    so for each level and anchor shape the best anchor is the one whose cell centre is nearest the
    box centre. Exact, and O(N x shapes) instead of O(N x A).

    Args:
        boxes: Tensor[N, 4] xyxy in input pixels.
    Returns:
        Tensor[N] best IoU.
    """
    boxes = boxes.double()
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = torch.zeros(boxes.shape[0], dtype=torch.float64)
    side = min(height, width)
    grids = generator.grid_sizes(height, width)
    for level, size, (gh, gw) in zip(generator.levels, generator.sizes, grids, strict=True):
        stride = 2.0**level
        ax = _nearest_centre(cx, stride, gw)[:, None]
        ay = _nearest_centre(cy, stride, gh)[:, None]
        base = cell_anchors(size * side, generator.scales, generator.ratios).double()  # [K, 4]
        x1, y1 = torch.maximum(boxes[:, None, 0], ax + base[:, 0]), torch.maximum(boxes[:, None, 1], ay + base[:, 1])
        x2, y2 = torch.minimum(boxes[:, None, 2], ax + base[:, 2]), torch.minimum(boxes[:, None, 3], ay + base[:, 3])
        inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
        anchor_area = (base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])
        iou = inter / (area[:, None] + anchor_area[None] - inter)
        best = torch.maximum(best, iou.max(dim=1).values)
    return best.float()


def anchor_coverage(boxes_xyxy: Tensor, config: ModelConfig, *, source_size: int | None = None) -> dict:
    """How well the anchors of ``config`` cover real boxes, at ``config.image_size``.

    Args:
        boxes_xyxy: Tensor[N, 4] (or array-like) xyxy boxes, in pixels of a square image of side
            ``source_size`` (default: ``config.image_size``, i.e. already in input pixels).
    Returns:
        ``num_boxes``, ``num_anchors`` (per image), ``coverage_iou50`` and ``coverage_iou40``
        (fraction of boxes whose best anchor IoU reaches 0.5 / 0.4), ``median_best_iou``.
    """
    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float64).reshape(-1, 4)
    if source_size is not None:
        boxes = boxes * (config.image_size / source_size)
    generator = AnchorGenerator.from_config(config)
    size = config.image_size
    grids = generator.grid_sizes(size, size)
    num_anchors = sum(h * w for h, w in grids) * generator.num_anchors_per_location
    best = best_anchor_iou(boxes, generator, size, size) if len(boxes) else torch.zeros(0)
    return {
        "num_boxes": int(len(boxes)),
        "num_anchors": int(num_anchors),
        "coverage_iou50": float((best >= 0.5).float().mean()) if len(best) else math.nan,
        "coverage_iou40": float((best >= 0.4).float().mean()) if len(best) else math.nan,
        "median_best_iou": float(best.median()) if len(best) else math.nan,
    }
