"""Box formats and frames: the one home of box geometry outside the network (numpy and torch only).

Formats:

* **xyxy** ``(xmin, ymin, xmax, ymax)``: what the dataset, the model and the augmentations use;
* **xywh** ``(x, y, width, height)``, top-left corner: what the labels CSV, the Kaggle submission and the
  RSNA metric use;
* **Kaggle rows** ``[N, 5]`` ``(confidence, x, y, width, height)``: one image's predictions as the metric
  and the submission take them, by confidence.

Frames: the **original** frame is the DICOM's ``(H, W)`` pixels; the **input** frame is the ``S x S``
square the model sees (:func:`pneumodet.data.preprocess.resize_area`). :func:`boxes_to_input` and
:func:`boxes_to_original` map xyxy boxes between them (each the inverse of the other). The network's own
anchor deltas are :class:`pneumodet.model.boxes.BoxCoder`'s.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

#: A box array: numpy or torch; each function returns the kind it was given.
Boxes = TypeVar("Boxes", np.ndarray, torch.Tensor)


def xyxy_to_xywh(boxes: Boxes) -> Boxes:
    """``[..., 4]`` ``(xmin, ymin, xmax, ymax)`` -> ``(x, y, w, h)``; numpy as float64, torch in its dtype."""
    if isinstance(boxes, torch.Tensor):
        return torch.cat((boxes[..., :2], boxes[..., 2:4] - boxes[..., :2]), dim=-1)
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., 2:4] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: Boxes) -> Boxes:
    """``[..., 4]`` ``(x, y, w, h)`` -> ``(xmin, ymin, xmax, ymax)``; numpy as float64, torch in its dtype."""
    if isinstance(boxes, torch.Tensor):
        return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:4]), dim=-1)
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def _scale(boxes: Boxes, sx: float, sy: float) -> Boxes:
    if isinstance(boxes, torch.Tensor):
        return boxes * boxes.new_tensor([sx, sy, sx, sy])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32([sx, sy, sx, sy])


def boxes_to_input(boxes: Boxes, original_size: tuple[int, int], image_size: int) -> Boxes:
    """xyxy boxes ``[N, 4]`` from the original frame (``original_size = (H, W)``) to the ``S x S`` input.

    numpy comes back as float32 ``[N, 4]``; a tensor keeps its dtype and device.
    """
    height, width = original_size
    return _scale(boxes, image_size / width, image_size / height)


def boxes_to_original(boxes: Boxes, original_size: tuple[int, int], image_size: int) -> Boxes:
    """xyxy boxes ``[N, 4]`` from the ``S x S`` input back to the original frame (``(H, W)``): the inverse
    of :func:`boxes_to_input`, with the same types."""
    height, width = original_size
    return _scale(boxes, width / image_size, height / image_size)


def hflip(boxes: Boxes, width: float) -> Boxes:
    """Mirror xyxy boxes ``[N, 4]`` left-right in an image ``width`` pixels wide (its own inverse)."""
    if isinstance(boxes, torch.Tensor):
        x1, y1, x2, y2 = boxes.unbind(-1)
        return torch.stack((width - x2, y1, width - x1, y2), dim=-1)
    b = np.asarray(boxes)
    return np.stack((width - b[..., 2], b[..., 1], width - b[..., 0], b[..., 3]), axis=-1)


def kaggle_rows(boxes: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """xyxy ``[N, 4]`` and scores ``[N]`` -> float64 ``[N, 5]`` ``(confidence, x, y, w, h)``.

    Rows are sorted by confidence, highest first; equal scores keep their input order (a stable sort, so
    the metric, which also takes predictions by confidence with ties in input order, sees the same order
    sorted or not). Widths are computed in float64, exact for float32 pixel coordinates, so a row cast to
    float32 equals one computed in float32 throughout.
    """
    b = _numpy(boxes).astype(np.float64).reshape(-1, 4)
    s = _numpy(scores).astype(np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    return np.concatenate([s[order, None], xyxy_to_xywh(b[order])], axis=1)


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values if values.dtype == torch.float64 else values.float()).numpy()  # bf16 has no numpy
    return np.asarray(values)
