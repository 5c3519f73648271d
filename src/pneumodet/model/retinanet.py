"""RetinaNet for lung opacities: timm encoder, FPN, shared heads, global image-class head."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, batched_nms
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from pneumodet.errors import ConfigError
from pneumodet.model.anchors import AnchorGenerator
from pneumodet.model.boxes import BoxCoder
from pneumodet.model.config import ModelConfig
from pneumodet.model.encoders import Encoder
from pneumodet.model.loss import RetinaNetLoss


class HeadOutputs(NamedTuple):
    """Raw outputs of :class:`PneumoRetinaNet` for a batch.

    ``cls_logits`` Tensor[B, A]; ``box_deltas`` Tensor[B, A, 4]; ``global_logits`` Tensor[B, C];
    ``anchors`` Tensor[A, 4] fp32 xyxy in input pixels; ``anchors_per_level`` the A of each level
    (sums to A); ``image_size`` the input (height, width).
    """

    cls_logits: Tensor
    box_deltas: Tensor
    global_logits: Tensor
    anchors: Tensor
    anchors_per_level: tuple[int, ...] = ()
    image_size: tuple[int, int] = (0, 0)


class Detections(NamedTuple):
    """Detections of one image: ``boxes`` Tensor[N, 4] fp32 xyxy in input pixels, sorted by
    decreasing ``scores`` Tensor[N]; ``class_probs`` Tensor[C] image-class probabilities
    (:data:`~pneumodet.data.records.CLASS_NAMES` order)."""

    boxes: Tensor
    scores: Tensor
    class_probs: Tensor


class ExtraLevels(ExtraFPNBlock):
    """Pyramid levels above the encoder's deepest one: stride-2 3x3 convs on the last FPN output
    (P6 from P5, P7 from ReLU(P6)), as RetinaNet."""

    def __init__(self, channels: int, num_levels: int, first_level: int) -> None:
        super().__init__()
        self.first_level = first_level
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_levels))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        for i, conv in enumerate(self.convs):
            prev = results[-1] if i == 0 else F.relu(results[-1])
            results.append(conv(prev))
            names.append(f"p{self.first_level + i}")
        return results, names


class Neck(nn.Module):
    """FPN over the encoder levels that the pyramid needs, plus extra levels above the encoder.

    The FPN always starts from the deepest encoder map (the top-down path needs it); levels below
    the lowest requested one are never computed.
    """

    def __init__(self, encoder_levels: tuple[int, ...], encoder_channels: tuple[int, ...],
                 pyramid_levels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        deepest = max(encoder_levels)
        wanted = [lvl for lvl in pyramid_levels if lvl <= deepest]
        inputs = sorted(set(wanted) | {deepest})
        missing = [lvl for lvl in inputs if lvl not in encoder_levels]
        if missing:
            raise ConfigError(f"encoder has no feature map at level(s) {missing} (it has {encoder_levels})")
        self.input_index = [encoder_levels.index(lvl) for lvl in inputs]
        extra = [lvl for lvl in pyramid_levels if lvl > deepest]
        # Output positions of the requested levels among FPN inputs + extra levels.
        all_levels = inputs + extra
        self.output_index = [all_levels.index(lvl) for lvl in pyramid_levels]
        self.fpn = FeaturePyramidNetwork(
            [encoder_channels[i] for i in self.input_index],
            channels,
            extra_blocks=ExtraLevels(channels, len(extra), deepest + 1) if extra else None,
        )
        if deepest not in pyramid_levels and not extra:
            # the deepest map then only feeds the top-down path: its output convolution would be dead
            # weight (and DDP refuses parameters that never get a gradient)
            self.fpn.layer_blocks[-1] = nn.Identity()

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: encoder maps (shallow to deep) -> one Tensor[B, channels, H_l, W_l] per pyramid level."""
        x = OrderedDict((f"c{i}", features[i]) for i in self.input_index)
        out = list(self.fpn(x).values())
        return [out[i] for i in self.output_index]


def _conv_tower(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _flatten(x: Tensor, values_per_anchor: int) -> Tensor:
    """Tensor[B, K * V, H, W] -> Tensor[B, H * W * K, V] (row, column, anchor order)."""
    b, _, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w * (x.shape[1] // values_per_anchor), values_per_anchor)


class ClassificationHead(nn.Module):
    """Lung-opacity logit per anchor, shared across levels; bias set so the prior is ``prior``."""

    def __init__(self, channels: int, num_anchors: int, depth: int = 4, prior: float = 0.01) -> None:
        super().__init__()
        self.tower = _conv_tower(channels, depth)
        self.logits = nn.Conv2d(channels, num_anchors, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features: list[Tensor]) -> Tensor:
        """One Tensor[B, C, H_l, W_l] per level -> Tensor[B, A]."""
        return torch.cat([_flatten(self.logits(self.tower(f)), 1)[..., 0] for f in features], dim=1)


class RegressionHead(nn.Module):
    """(dx, dy, dw, dh) per anchor, shared across levels."""

    def __init__(self, channels: int, num_anchors: int, depth: int = 4) -> None:
        super().__init__()
        self.tower = _conv_tower(channels, depth)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list[Tensor]) -> Tensor:
        """One Tensor[B, C, H_l, W_l] per level -> Tensor[B, A, 4]."""
        return torch.cat([_flatten(self.deltas(self.tower(f)), 4) for f in features], dim=1)


class GlobalHead(nn.Module):
    """Image class (Normal / Lung Opacity / No Lung Opacity - Not Normal) from the deepest encoder map."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[B, C_in, H, W] -> logits Tensor[B, num_classes]."""
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class PneumoRetinaNet(nn.Module):
    """RetinaNet (Lin et al. 2017) with one object class and a global image-class head.

    ``forward`` takes Tensor[B, 1, H, W] float images in [0, 1] and returns :class:`HeadOutputs`;
    :meth:`loss` and :meth:`detect` turn those into losses and per-image detections. ``loss_normalizer``
    (a training setting, not part of the network: :data:`~pneumodet.model.config.LOSS_NORMALIZERS`) is how
    :meth:`loss` divides the summed anchor losses.
    """

    def __init__(self, config: ModelConfig, *, loss_normalizer: str = "ema") -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config.encoder, pretrained=config.pretrained, weights=config.weights)
        self.neck = Neck(self.encoder.levels, self.encoder.channels, config.pyramid_levels, config.fpn_channels)
        k = config.num_anchors_per_location
        self.cls_head = ClassificationHead(config.fpn_channels, k, config.head_convs)
        self.box_head = RegressionHead(config.fpn_channels, k, config.head_convs)
        self.global_head = GlobalHead(self.encoder.channels[-1], config.num_global_classes, config.global_dropout)
        self.anchor_generator = AnchorGenerator.from_config(config)
        self.box_coder = BoxCoder()
        self.criterion = RetinaNetLoss(config, self.box_coder, normalizer=loss_normalizer)

    def forward(self, images: Tensor) -> HeadOutputs:
        """images: Tensor[B, 1, H, W] in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected one-channel images of shape [B, 1, H, W], got {tuple(images.shape)}")
        features = self.encoder(images)
        pyramid = self.neck(features)
        anchors, per_level = self.anchor_generator(images.shape[-2], images.shape[-1], images.device)
        return HeadOutputs(
            cls_logits=self.cls_head(pyramid),
            box_deltas=self.box_head(pyramid),
            global_logits=self.global_head(features[-1]),
            anchors=anchors,
            anchors_per_level=per_level,
            image_size=(images.shape[-2], images.shape[-1]),
        )

    def loss(self, outputs: HeadOutputs, boxes: Tensor, classes: Tensor) -> dict[str, Tensor]:
        """Losses for a batch.

        Args:
            boxes: Tensor[B, M, 4] xyxy in input pixels; a padding row is all zeros.
            classes: LongTensor[B] image classes.
        Returns:
            ``total``, ``classification``, ``regression``, ``global``: scalar tensors.
        """
        return self.criterion(
            outputs.cls_logits, outputs.box_deltas, outputs.global_logits, outputs.anchors, boxes, classes
        )

    @torch.no_grad()
    def detect(
        self,
        outputs: HeadOutputs,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detections]:
        """Boxes for every image of the batch, decoded in fp32.

        Per level the ``topk_per_level`` best anchors above ``score_thresh`` are decoded, clipped
        to the image, then NMS runs over the whole batch at once (image index as the group) and
        each image keeps its ``max_detections`` best boxes.
        """
        cfg = self.config
        score_thresh = cfg.score_thresh if score_thresh is None else score_thresh
        nms_thresh = cfg.nms_thresh if nms_thresh is None else nms_thresh
        max_detections = cfg.max_detections if max_detections is None else max_detections
        return postprocess(
            outputs, self.box_coder, score_thresh=score_thresh, nms_thresh=nms_thresh,
            topk_per_level=cfg.topk_per_level, max_detections=max_detections,
        )


def postprocess(
    outputs: HeadOutputs,
    box_coder: BoxCoder,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk_per_level: int,
    max_detections: int,
) -> list[Detections]:
    """Batched decoding: top-k per level, score threshold, clip, batched NMS, max detections."""
    scores_all = torch.sigmoid(outputs.cls_logits.float())  # [B, A]
    batch = scores_all.shape[0]
    per_level = outputs.anchors_per_level or (scores_all.shape[1],)
    top_scores, top_index = [], []
    for start, count in zip(_offsets(per_level), per_level, strict=True):
        s, i = scores_all[:, start:start + count].topk(min(topk_per_level, count), dim=1)
        top_scores.append(s)
        top_index.append(i + start)
    scores = torch.cat(top_scores, dim=1)  # [B, K]
    index = torch.cat(top_index, dim=1)
    deltas = torch.gather(outputs.box_deltas.float(), 1, index[..., None].expand(-1, -1, 4))
    boxes = box_coder.decode(deltas, outputs.anchors[index])  # [B, K, 4]
    height, width = outputs.image_size
    if height and width:
        limits = boxes.new_tensor([width, height, width, height])
        boxes = torch.minimum(boxes.clamp(min=0), limits)

    image = torch.arange(batch, device=scores.device)[:, None].expand_as(scores)
    keep = (scores > score_thresh) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    boxes, scores, image = boxes[keep], scores[keep], image[keep]
    kept = batched_nms(boxes, scores, image, nms_thresh)  # by decreasing score
    # Stable sort by image keeps each image's boxes in decreasing score; then cap per image.
    kept = kept[torch.sort(image[kept], stable=True).indices]
    counts = torch.bincount(image[kept], minlength=batch)
    rank = torch.arange(kept.numel(), device=kept.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    kept = kept[rank < max_detections]
    counts = counts.clamp(max=max_detections)

    probs = torch.softmax(outputs.global_logits.float(), dim=1)
    return [
        Detections(b, s, p)
        for b, s, p in zip(boxes[kept].split(counts.tolist()), scores[kept].split(counts.tolist()), probs, strict=True)
    ]


def _offsets(counts: tuple[int, ...]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


def build_model(config: ModelConfig | None = None, *, loss_normalizer: str = "ema") -> PneumoRetinaNet:
    """A :class:`PneumoRetinaNet` for ``config`` (default: :class:`ModelConfig` defaults)."""
    return PneumoRetinaNet(config or ModelConfig(), loss_normalizer=loss_normalizer)
