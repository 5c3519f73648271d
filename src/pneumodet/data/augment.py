"""Box-aware training augmentation: the four levels of Gabruseva et al. (2020).

Every random parameter is drawn per image from the level's distributions (:class:`LevelSpec`).
The geometry (resize, scale, rotation, shear, shift, horizontal flip) is composed into ONE affine
matrix, applied to the image in a single ``cv2.warpAffine`` and to the boxes through 8 points on
their edges (at 1/3 and 2/3 of each edge, as the reference code did), so that a rotated or sheared
box does not inflate the way a rotated-corners box does. Photometric steps (gamma, coarse
salt-and-pepper, Gaussian blur, additive Gaussian noise) follow on the warped image.

Coordinates are continuous pixels: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, so a box
``(0, 0, W, H)`` is the whole image and resizing maps boxes by plain multiplication.

Example::

    aug = build_augmentation("heavy", 512)
    image, boxes = aug(image_u8, boxes_xyxy, np.random.default_rng(0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pneumodet.data.levels import LEVEL_SPECS, LEVELS, LevelSpec
from pneumodet.errors import ConfigError

__all__ = [
    "LEVELS",
    "LEVEL_SPECS",
    "AffineParams",
    "Augmentation",
    "LevelSpec",
    "PhotometricParams",
    "adjust_gamma",
    "affine_matrix",
    "build_augmentation",
    "edge_points",
    "transform_boxes",
    "warp_image",
]


@dataclass(frozen=True)
class AffineParams:
    """One draw of the geometric parameters (identity by default).

    Scale, rotation and shear act about the image centre; the shift (output pixels) moves the
    result; the flip mirrors it left-right about the centre line.
    """

    scale_x: float = 1.0
    scale_y: float = 1.0
    rotation: float = 0.0  # degrees, counter-clockwise as displayed (y axis points down)
    shear: float = 0.0  # degrees, x-shear: x += tan(shear) * y
    shift_x: float = 0.0
    shift_y: float = 0.0
    flip: bool = False


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of the intensity parameters (identity by default; 0 switches a step off)."""

    gamma: float = 1.0
    salt_pepper_grid: int = 0  # coarse grid cells per side; 0 = no salt-and-pepper
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0


def affine_matrix(params: AffineParams, in_hw: tuple[int, int], size: int) -> np.ndarray:
    """The forward map from input to output continuous pixel coordinates.

    ``out = T(c_out + shift) · Flip · Rotation · Shear · Scale · Resize · T(-c_in) · in``

    Returns:
        float64 ``[2, 3]`` matrix ``[A | b]`` with ``out = A @ in + b``.
    """
    in_h, in_w = in_hw
    rad, shear = math.radians(params.rotation), math.radians(params.shear)
    cos, sin = math.cos(rad), math.sin(rad)
    rotation = np.array([[cos, sin], [-sin, cos]])
    shear_m = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    scale = np.diag([params.scale_x * size / in_w, params.scale_y * size / in_h])
    flip = np.diag([-1.0 if params.flip else 1.0, 1.0])
    a = flip @ rotation @ shear_m @ scale
    c_in = np.array([in_w / 2.0, in_h / 2.0])
    c_out = np.array([size / 2.0 + params.shift_x, size / 2.0 + params.shift_y])
    return np.hstack([a, (c_out - a @ c_in)[:, None]])


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Resample ``image`` (uint8 ``[H, W]``) once through ``matrix`` into uint8 ``[size, size]``.

    OpenCV samples at integer pixel centres, so the continuous-coordinate matrix is shifted by
    half a pixel on both sides; outside the source the output is black, as in the reference.
    """
    a, b = matrix[:, :2], matrix[:, 2]
    half = np.array([0.5, 0.5])
    pixel_matrix = np.hstack([a, (b + a @ half - half)[:, None]])
    return cv2.warpAffine(image, pixel_matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def edge_points(boxes: np.ndarray) -> np.ndarray:
    """8 points per box at 1/3 and 2/3 of each edge.

    Args:
        boxes: ``[N, 4]`` xyxy.

    Returns:
        ``[N, 8, 2]`` (x, y) points; their min/max is the box itself.
    """
    x0, y0, x1, y1 = (boxes[:, i:i + 1] for i in range(4))
    w, h = x1 - x0, y1 - y0
    xs = np.hstack([x0, x0, x1, x1, x0 + w / 3, x0 + 2 * w / 3, x0 + w / 3, x0 + 2 * w / 3])
    ys = np.hstack([y0 + h / 3, y0 + 2 * h / 3, y0 + h / 3, y0 + 2 * h / 3, y0, y0, y1, y1])
    return np.stack([xs, ys], axis=-1)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, size: int,
                    min_visibility: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Map boxes through ``matrix``, clip them to the ``size`` x ``size`` image and drop the lost ones.

    A box is kept when at least ``min_visibility`` of its transformed area lies inside the image
    (and what is inside has positive width and height).

    Args:
        boxes: ``[N, 4]`` xyxy in input pixels.
        matrix: ``[2, 3]`` from :func:`affine_matrix`.

    Returns:
        ``(boxes, keep)``: float32 ``[K, 4]`` xyxy in output pixels, and the bool ``[N]`` mask of
        the input boxes that were kept.
    """
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, bool)
    points = edge_points(boxes.astype(np.float64)) @ matrix[:, :2].T + matrix[:, 2]
    mapped = np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)
    clipped = np.clip(mapped, 0.0, float(size))
    area = np.prod(mapped[:, 2:] - mapped[:, :2], axis=1)
    sides = clipped[:, 2:] - clipped[:, :2]
    inside = np.prod(sides, axis=1)
    keep = (sides > 0).all(axis=1) & (inside >= min_visibility * area) & (area > 0)
    return clipped[keep].astype(np.float32), keep


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """``255 * (image / 255) ** gamma`` through a 256-entry lookup table (uint8 in, uint8 out)."""
    lut = np.rint(255.0 * np.linspace(0.0, 1.0, 256) ** gamma).astype(np.uint8)
    return cv2.LUT(image, lut)


def _salt_and_pepper(image: np.ndarray, grid: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Coarse salt-and-pepper: ``fraction`` of the cells of a ``grid`` x ``grid`` partition are
    replaced, each pixel in them by black or white at random."""
    cells = rng.random((grid, grid)) < fraction
    if not cells.any():
        return image
    h, w = image.shape
    mask = cv2.resize(cells.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = image.copy()
    out[mask] = rng.integers(0, 2, int(mask.sum()), dtype=np.uint8) * 255
    return out


def _add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, sigma) noise per pixel, rounded and clipped to uint8.

    The normal samples come from torch, seeded from ``rng``: its vectorised sampler is about three
    times faster than NumPy's, and this is the costliest step of the heavy levels.
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    noisy = torch.randn(image.shape, generator=generator)
    noisy.mul_(sigma).add_(torch.from_numpy(image)).add_(0.5)  # + 0.5: the truncating cast then rounds
    return noisy.clamp_(0.0, 255.0).to(torch.uint8).numpy()


def _check_inputs(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) == 0:
        raise ValueError(f"augmentation expects a non-empty uint8 [H, W] image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4), np.float32)
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"box {row} is not a finite xyxy box with positive size: {boxes[row].tolist()}")
    return boxes


class Augmentation:
    """One augmentation level at one output size, a callable ``(image, boxes, rng) -> (image, boxes)``.

    Args:
        level: one of :data:`LEVELS`.
        size: output side in pixels (the training size).
        min_visibility: boxes keeping less than this fraction of their transformed area inside the
            image are dropped.
    """

    def __init__(self, level: str, size: int, *, min_visibility: float = 0.3) -> None:
        if level not in LEVEL_SPECS:
            raise ConfigError(f"unknown augmentation level {level!r}; valid levels: {', '.join(LEVELS)}")
        if size <= 0:
            raise ConfigError(f"augmentation size must be positive, got {size}")
        if not 0.0 <= min_visibility <= 1.0:
            raise ConfigError(f"min_visibility must be within [0, 1], got {min_visibility}")
        self.level = level
        self.spec = LEVEL_SPECS[level]
        self.size = size
        self.min_visibility = min_visibility

    def __repr__(self) -> str:
        return f"Augmentation({self.level!r}, size={self.size}, min_visibility={self.min_visibility})"

    def sample(self, rng: np.random.Generator) -> tuple[AffineParams, PhotometricParams]:
        """Draw one image's parameters from the level's distributions."""
        s = self.spec
        log2_scale = rng.normal(0.0, s.log2_scale_std, 2) if s.log2_scale_std else np.zeros(2)
        shift = rng.uniform(-s.max_shift, s.max_shift, 2) * self.size if s.max_shift else np.zeros(2)
        affine = AffineParams(
            scale_x=float(2.0 ** log2_scale[0]),
            scale_y=float(2.0 ** log2_scale[1]),
            rotation=float(rng.normal(0.0, s.rotation_std)) if s.rotation_std else 0.0,
            shear=float(rng.normal(0.0, s.shear_std)) if s.shear_std else 0.0,
            shift_x=float(shift[0]),
            shift_y=float(shift[1]),
            flip=bool(rng.random() < s.flip_p) if s.flip_p else False,
        )
        grid = 0
        if s.salt_pepper_p and rng.random() < s.salt_pepper_p:
            grid = max(1, round(self.size * rng.uniform(*s.salt_pepper_cells)))
        photometric = PhotometricParams(
            gamma=float(2.0 ** rng.normal(0.0, s.log2_gamma_std)) if s.log2_gamma_std else 1.0,
            salt_pepper_grid=grid,
            blur_sigma=float(rng.uniform(0.0, s.max_blur_sigma)) if s.blur_p and rng.random() < s.blur_p else 0.0,
            noise_sigma=float(rng.uniform(0.0, s.max_noise_sigma)) if s.noise_p and rng.random() < s.noise_p else 0.0,
        )
        return affine, photometric

    def apply(self, image: np.ndarray, boxes: np.ndarray, affine: AffineParams,
              photometric: PhotometricParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Apply given parameters (``rng`` draws the per-pixel noise only).

        Args:
            image: uint8 ``[H, W]``.
            boxes: float ``[N, 4]`` xyxy in input pixels.

        Returns:
            uint8 ``[size, size]`` image and float32 ``[K, 4]`` boxes (K <= N) in output pixels.
        """
        boxes = _check_inputs(image, boxes)
        matrix = affine_matrix(affine, image.shape, self.size)
        out = self._warp(image, affine, matrix)
        out_boxes, _ = transform_boxes(boxes, matrix, self.size, self.min_visibility)
        if photometric.gamma != 1.0:
            out = adjust_gamma(out, photometric.gamma)
        if photometric.salt_pepper_grid:
            out = _salt_and_pepper(out, photometric.salt_pepper_grid, self.spec.salt_pepper_fraction, rng)
        if photometric.blur_sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), photometric.blur_sigma)
        if photometric.noise_sigma > 0:
            out = _add_noise(out, photometric.noise_sigma, rng)
        return out, out_boxes

    def __call__(self, image: np.ndarray, boxes: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw this image's parameters and apply them (see :meth:`apply`)."""
        affine, photometric = self.sample(rng)
        return self.apply(image, boxes, affine, photometric, rng)

    def _warp(self, image: np.ndarray, affine: AffineParams, matrix: np.ndarray) -> np.ndarray:
        if affine != AffineParams():
            return warp_image(image, matrix, self.size)
        # A plain resize: area averaging when shrinking is sharper and alias-free, and an image
        # already at the training size is passed through untouched.
        if image.shape == (self.size, self.size):
            return image.copy()
        shrink = image.shape[0] > self.size or image.shape[1] > self.size
        return cv2.resize(image, (self.size, self.size),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def build_augmentation(level: str, size: int, *, min_visibility: float = 0.3) -> Augmentation:
    """The augmentation ``level`` (one of :data:`LEVELS`) producing ``size`` x ``size`` images.

    Raises:
        ConfigError: unknown level (the message lists the valid ones) or a bad size/visibility.
    """
    return Augmentation(level, size, min_visibility=min_visibility)

