"""The augmentation preview (``pneumodet augment-preview``): what each level does to real images, by eye.

:func:`preview_samples` reads a few patients' images (patients with boxes first, in a seeded order;
an unreadable image is skipped and reported, never fatal); :func:`preview_figure` draws one row per
image: the original, then augmented versions drawn by :mod:`pneumodet.data.augment`, each captioned
with its drawn parameters, boxes in green. The same seed gives the same figure. Nothing is written
here: the caller saves the figure (the CLI through :func:`pneumodet.safeio.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pneumodet.data.augment import AffineParams, PhotometricParams, build_augmentation
from pneumodet.data.dicom import read_dicom
from pneumodet.data.records import PatientRecord
from pneumodet.errors import ConfigError, DicomReadError

__all__ = ["PreviewSample", "preview_figure", "preview_samples"]


@dataclass(frozen=True)
class PreviewSample:
    """One image to preview: its name, uint8 ``[H, W]`` pixels and float ``[N, 4]`` xyxy boxes."""

    name: str
    image: np.ndarray
    boxes: np.ndarray


def preview_samples(records: Sequence[PatientRecord], n: int, *, seed: int = 0,
                    read: Callable[[Path], tuple[np.ndarray, object]] | None = None,
                    ) -> tuple[list[PreviewSample], list[str]]:
    """Read up to ``n`` patients' images for a preview, patients with boxes first.

    Patients are drawn in a seeded random order within each group (with boxes, then without);
    an unreadable image is skipped and reported, never fatal.

    Args:
        records: patients; those without an ``image_path`` are ignored.
        read: ``path -> (uint8 image, meta)``; default :func:`pneumodet.data.dicom.read_dicom`.

    Returns:
        ``(samples, skipped)``: at most ``n`` samples and one ``"path: cause"`` line per skipped image.

    Raises:
        ConfigError: ``n < 1``.
        DicomReadError: no patient has an image file, or none of them could be read.
    """
    if n < 1:
        raise ConfigError(f"the preview needs at least one image, got n={n}")
    read = read_dicom if read is None else read
    with_images = [r for r in records if r.image_path is not None]
    if not with_images:
        raise DicomReadError("<images>", f"none of the {len(records)} patients has an image file")
    order = np.random.default_rng(seed).permutation(len(with_images))
    ranked = sorted((with_images[i] for i in order), key=lambda r: len(r.boxes) == 0)
    samples: list[PreviewSample] = []
    skipped: list[str] = []
    for record in ranked:
        if len(samples) == n:
            break
        try:
            image, _ = read(record.image_path)
        except DicomReadError as exc:
            skipped.append(str(exc))
            continue
        samples.append(PreviewSample(record.patient_id, image, record.boxes_array()))
    if not samples:
        raise DicomReadError(ranked[0].image_path, f"none of the {len(skipped)} images could be read")
    return samples, skipped


def _describe(affine: AffineParams, photometric: PhotometricParams) -> str:
    """A short caption of one draw, for checking by eye."""
    parts = [f"scale {affine.scale_x:.2f}x{affine.scale_y:.2f}", f"rot {affine.rotation:+.1f}°",
             f"shear {affine.shear:+.1f}°", f"shift {affine.shift_x:+.0f},{affine.shift_y:+.0f}"]
    if affine.flip:
        parts.append("flip")
    parts.append(f"γ {photometric.gamma:.2f}")
    if photometric.salt_pepper_grid:
        parts.append("s&p")
    if photometric.blur_sigma:
        parts.append(f"blur {photometric.blur_sigma:.1f}")
    if photometric.noise_sigma:
        parts.append(f"noise {photometric.noise_sigma:.1f}")
    return " ".join(parts[:3]) + "\n" + " ".join(parts[3:])


def _show(ax: Axes, image: np.ndarray, boxes: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def preview_figure(samples: Sequence[PreviewSample], levels: Sequence[str], size: int, *,
                   seed: int = 0, draws: int = 1, min_visibility: float = 0.3) -> Figure:
    """A grid: one row per sample, its original, then ``draws`` augmented versions per random level
    (one for ``resize_only``).

    Boxes are drawn in green; each augmented panel is captioned with its drawn parameters.
    The same ``seed`` gives the same figure.

    Returns:
        The matplotlib ``Figure`` (the caller saves or shows it).

    Raises:
        ConfigError: no sample, ``draws < 1``, or an unknown level or bad size (see
            :func:`pneumodet.data.augment.build_augmentation`).
    """
    if draws < 1 or not samples:
        raise ConfigError(f"the preview needs at least one sample and one draw, got {len(samples)} and {draws}")
    augmentations = [build_augmentation(level, size, min_visibility=min_visibility) for level in levels]
    # a deterministic level looks the same on every draw: one panel is enough
    panels = [(aug, k, 1 if aug.spec.is_identity else draws) for aug in augmentations
              for k in range(1 if aug.spec.is_identity else draws)]
    columns = 1 + len(panels)
    fig = Figure(figsize=(2.3 * columns, 2.6 * len(samples) + 0.5), layout="constrained")
    axes = fig.subplots(len(samples), columns, squeeze=False)
    for row, sample in enumerate(samples):
        rng = np.random.default_rng([seed, row])
        _show(axes[row, 0], sample.image, sample.boxes,
              f"{sample.name[:18]}\noriginal {sample.image.shape[1]}x{sample.image.shape[0]}, "
              f"{len(sample.boxes)} box(es)")
        for column, (aug, k, of) in enumerate(panels, start=1):
            affine, photometric = aug.sample(rng)
            image, boxes = aug.apply(sample.image, sample.boxes, affine, photometric, rng)
            name = aug.level if of == 1 else f"{aug.level} #{k + 1}"
            _show(axes[row, column], image, boxes,
                  f"{name}, {len(boxes)} box(es)\n{_describe(affine, photometric)}")
    what = "all levels" if len(levels) > 1 else f"level {levels[0]}"
    fig.suptitle(f"pneumodet augmentation preview: {what} at {size} px, seed {seed}", fontsize=10)
    return fig
