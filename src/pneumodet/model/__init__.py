"""RetinaNet with timm encoders, anchors fitted to RSNA boxes, a global class head, checkpoints.

The public names are loaded on first use (PEP 562), so that reading a :class:`ModelConfig` — what the
command line does to show its defaults — does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pneumodet.lazy import lazy_exports

_HOMES = {
    "AnchorGenerator": "anchors", "anchor_coverage": "anchors",
    "BoxCoder": "boxes",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "ModelConfig": "config",
    "RetinaNetLoss": "loss", "match_anchors": "loss",
    "Detections": "retinanet", "HeadOutputs": "retinanet", "PneumoRetinaNet": "retinanet", "build_model": "retinanet",
}
__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "Detections",
    "HeadOutputs",
    "ModelConfig",
    "PneumoRetinaNet",
    "RetinaNetLoss",
    "anchor_coverage",
    "build_model",
    "load_checkpoint",
    "match_anchors",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from pneumodet.model.anchors import AnchorGenerator, anchor_coverage
    from pneumodet.model.boxes import BoxCoder
    from pneumodet.model.checkpoint import load_checkpoint, save_checkpoint
    from pneumodet.model.config import ModelConfig
    from pneumodet.model.loss import RetinaNetLoss, match_anchors
    from pneumodet.model.retinanet import Detections, HeadOutputs, PneumoRetinaNet, build_model


__getattr__ = lazy_exports(__name__, _HOMES)
