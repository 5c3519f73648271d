"""The model configuration: everything needed to rebuild a :class:`PneumoRetinaNet`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pneumodet.errors import ConfigError
from pneumodet.fieldtypes import check_field_types, check_range, show_key

#: The box regression losses :class:`ModelConfig` accepts.
BOX_LOSSES = ("smooth_l1", "giou")
#: How the summed focal and box losses are divided: ``ema`` by a running mean of the positive anchors per
#: batch, ``batch`` by this batch's count (the earlier behaviour, training recipe ``baseline-v1``). A training
#: setting (``TrainConfig.loss_normalizer``), not part of the network: see ``pneumodet.model.loss``.
LOSS_NORMALIZERS = ("ema", "batch")
_TUPLE_FIELDS = ("pyramid_levels", "anchor_sizes", "anchor_scales", "anchor_ratios")
#: Largest input side: RSNA images are 1024 px; beyond 2048 a config is a mistake (or an attack on memory).
MAX_IMAGE_SIZE = 2048
#: Sane upper bounds of the size fields: a checkpoint's metadata must not be able to ask for a network (or
#: an anchor grid) that costs gigabytes before its tensors are even compared with it.
_INT_BOUNDS = {"image_size": (32, MAX_IMAGE_SIZE), "fpn_channels": (1, 4096), "head_convs": (0, 16),
               "num_global_classes": (1, 1000), "topk_per_level": (1, 100_000), "max_detections": (1, 10_000)}
#: Most pyramid levels (and anchors per level) a model may have; level 10 is a stride of 1024 px.
_MAX_LEVEL = 10
_MAX_ANCHOR_VALUES = 16


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
    # 1.0 / 0.2 (not the reference's 0.1 / 0.5, under which the head predicted the majority class): measured
    # over 3 seeds by benchmarks/bench_quality.py --section global (docs/BENCHMARKS.md)
    global_dropout: float = 0.2
    global_loss_weight: float = 1.0
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    # Post-processing, chosen on validation (benchmarks/bench_postprocess.py, docs/BENCHMARKS.md): at NMS
    # IoU 0.5 with 100 boxes, shifted copies of one lesion box (IoU 0.35-0.5 with each other) survived in
    # clusters; two RSNA lesions of one image never overlap by IoU > 0.06 and an image has at most 4.
    score_thresh: float = 0.05
    nms_thresh: float = 0.25
    topk_per_level: int = 1000
    max_detections: int = 5
    pretrained: bool = False
    weights: str | None = None

    def __post_init__(self) -> None:
        check_field_types(type(self), vars(self), what="model config")  # before any arithmetic on them
        if self.pyramid_levels is None:
            self.pyramid_levels = default_levels(self.image_size)
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field of a wrong type, out of its range or inconsistent.

        Every size is bounded (:data:`MAX_IMAGE_SIZE`, ...), so a valid config never asks for more than a
        few hundred megabytes of network.
        """
        check_field_types(type(self), vars(self), what="model config")
        for name, (low, high) in _INT_BOUNDS.items():
            check_range(name, getattr(self, name), low, high)
        levels = self.pyramid_levels
        if (not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))) or levels[0] < 1
                or levels[-1] > _MAX_LEVEL):
            raise ConfigError(f"pyramid_levels must be consecutive integers in [1, {_MAX_LEVEL}], got {levels}")
        if len(self.anchor_sizes) != len(levels):
            raise ConfigError(
                f"anchor_sizes needs one size per pyramid level: {len(levels)} levels {levels}, "
                f"{len(self.anchor_sizes)} sizes {self.anchor_sizes}"
            )
        for name in ("anchor_sizes", "anchor_scales", "anchor_ratios"):
            values = getattr(self, name)
            if not values or len(values) > _MAX_ANCHOR_VALUES or any(not 0 < v <= 100 for v in values):
                raise ConfigError(f"{name} must hold 1 to {_MAX_ANCHOR_VALUES} numbers in (0, 100], got {values}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(f"box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ConfigError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou} fg_iou={self.fg_iou}")
        check_range("global_dropout", self.global_dropout, 0.0, 1.0, high_open=True)
        for name in ("focal_alpha", "score_thresh", "nms_thresh"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("smooth_l1_beta", self.smooth_l1_beta, 0.0, None, low_open=True)
        check_range("global_loss_weight", self.global_loss_weight, 0.0)
        check_range("focal_gamma", self.focal_gamma, 0.0, 100.0)
        if not self.encoder.strip() or len(self.encoder) > 200:
            raise ConfigError(f"encoder must be a model name (1 to 200 characters), got {self.encoder[:60]!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; anything but a mapping of known keys to values of the right types and
        ranges raises :class:`ConfigError` naming the first problem."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping of names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(show_key(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown[:5])} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"invalid model config: {err}") from err
