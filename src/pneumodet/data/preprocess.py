"""What the model sees: the one definition of how a decoded grey image becomes the network's input.

A DICOM decodes to uint8 ``[H, W]`` (:func:`pneumodet.data.dicom.read_dicom`). :func:`resize_area` turns
it into the ``S x S`` square the network takes; the training cache stores exactly that, and prediction
(:func:`prepare_image`) computes exactly that, so the model sees at prediction what it saw in training.
:func:`to_unit_range` is the last step of both: uint8 grey levels to float32 in ``[0, 1]``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 ``[H, W]`` image to ``[size, size]`` with area interpolation (box average)."""
    if image.shape == (size, size):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels (any shape) -> float32 in ``[0, 1]`` (divided by 255), a new tensor."""
    return images.to(torch.float32, copy=True).div_(255.0)


def prepare_image(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``[H, W]`` -> float32 ``[1, S, S]`` in ``[0, 1]``: :func:`resize_area`, then :func:`to_unit_range`.

    Raises:
        ValueError: ``pixels`` is not a 2-D uint8 grey image.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grey image, got {pixels.dtype} of shape {tuple(pixels.shape)}")
    return to_unit_range(torch.from_numpy(resize_area(pixels, image_size)))[None]
