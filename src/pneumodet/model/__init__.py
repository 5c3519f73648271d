"""RetinaNet with timm encoders, anchors fitted to RSNA boxes, a global class head, checkpoints."""

from pneumodet.model.anchors import AnchorGenerator, anchor_coverage
from pneumodet.model.boxes import BoxCoder
from pneumodet.model.checkpoint import load_checkpoint, save_checkpoint
from pneumodet.model.config import ModelConfig
from pneumodet.model.loss import RetinaNetLoss, match_anchors
from pneumodet.model.retinanet import Detections, HeadOutputs, PneumoRetinaNet, build_model

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
