"""The model configuration: everything needed to rebuild a :class:`PneumoRetinaNet`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pneumodet.errors import ConfigError

#: The box regression losses :class:`ModelConfig` accepts.
BOX_LOSSES = ("smooth_l1", "giou")
_TUPLE_FIELDS = ("pyramid_levels", "anchor_sizes", "anchor_scales", "anchor_ratios")


def default_levels(image_size: int) -> tuple[int, int, int]:
    """P4-P6 at 512 px, shifted one level per doubling/halving of the input side (lowest level 1)."""
    first = max(1, 4 + round(math.log2(image_size / 512))) if image_size > 0 else 4
    return (first, first + 1, first + 2)


@dataclass
class ModelConfig:
    """RetinaNet with a timm encoder, fitted to RSNA lung-opacity boxes.

    Anchor sizes are fractions of the input side (the shorter side for non-square input), one per
    pyramid level; ``pyramid_levels=None`` picks the levels whose strides keep the same anchor/stride
    geometry at every input size (P4-P6 at 512, P3-P5 at 256, P5-P7 at 1024). ``anchor_ratios`` are
    height / width. The defaults come from the box statistics in ``docs/ANCHORS.md``.
    """

    encoder: str = "resnet50"
    image_size: int = 512
    pyramid_levels: tuple[int, ...] | None = None
    anchor_sizes: tuple[float, ...] = (0.125, 0.25, 0.5)
    anchor_scales: tuple[float, ...] = (2 ** (-1 / 3), 1.0, 2 ** (1 / 3))
    anchor_ratios: tuple[float, ...] = (0.8, 1.25, 2.0)
    fpn_channels: int = 256
    head_convs: int = 4
    num_global_classes: int = 3
    global_dropout: float = 0.5
    global_loss_weight: float = 0.1
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_per_level: int = 1000
    max_detections: int = 100
    pretrained: bool = False
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.pyramid_levels is None:
            self.pyramid_levels = default_levels(self.image_size)
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        levels = self.pyramid_levels
        if not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))) or levels[0] < 1:
            raise ConfigError(f"pyramid_levels must be consecutive integers >= 1, got {levels}")
        if len(self.anchor_sizes) != len(levels):
            raise ConfigError(
                f"anchor_sizes needs one size per pyramid level: {len(levels)} levels {levels}, "
                f"{len(self.anchor_sizes)} sizes {self.anchor_sizes}"
            )
        for name in ("anchor_sizes", "anchor_scales", "anchor_ratios"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise ConfigError(f"{name} must be non-empty and positive, got {values}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(f"box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ConfigError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou} fg_iou={self.fg_iou}")
        for name in ("image_size", "fpn_channels", "num_global_classes", "topk_per_level", "max_detections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_convs < 0:
            raise ConfigError(f"head_convs must be >= 0, got {self.head_convs}")
        if not 0.0 <= self.global_dropout < 1.0:
            raise ConfigError(f"global_dropout must be in [0, 1), got {self.global_dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"invalid model config: {err}") from err
