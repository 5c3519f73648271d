"""What a prediction found: one :class:`ImagePrediction` per image, and a :class:`PredictionResult` for a run.

Boxes here are in the original image's pixels as Kaggle rows (``confidence, x, y, width, height``);
:func:`xyxy_to_kaggle` makes them. The writers of these results are in :mod:`pneumodet.inference.outputs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumodet.boxes import kaggle_rows
from pneumodet.data.records import OPACITY_INDEX
from pneumodet.textsafe import display_path, display_text

#: How the per-patient submission is made from the images of a patient (printed, and in the JSON).
SUBMISSION_MERGE = ("one row per patient: the boxes of its image with the highest box score (ties: the "
                    "higher Lung Opacity probability, then the first file); every image is in --json and "
                    "--overlays")


@dataclass(frozen=True)
class UnreadableInput:
    """An input that yielded no prediction, and why."""

    path: Path
    cause: str


@dataclass(frozen=True)
class DuplicateInput:
    """A file holding an image already predicted from ``kept`` (the same SOP Instance UID, or the same file
    reached twice, e.g. through a link); it was not used again."""

    patient_id: str
    path: Path
    kept: Path
    same: str  # what makes it the same image: "SOP Instance UID" or "file"


@dataclass(frozen=True)
class ImagePrediction:
    """One image's prediction, in the original image's pixels.

    ``boxes`` is float32 ``[M, 5]``: ``confidence, x, y, width, height`` (top-left corner), sorted by
    confidence, only boxes at or above the threshold. ``class_probs`` is float32 ``[C]`` in
    :data:`~pneumodet.data.records.CLASS_NAMES` order. ``original_size`` is ``(height, width)``. The UIDs
    are the DICOM's (``None`` when the file has none); :attr:`key` tells images apart.
    """

    patient_id: str
    boxes: np.ndarray
    class_probs: np.ndarray
    source: Path
    original_size: tuple[int, int]
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    @property
    def key(self) -> str:
        """The image's identity: its SOP Instance UID, else its real file path."""
        return image_key(self.sop_instance_uid, self.source)

    @property
    def rank(self) -> tuple[float, float]:
        """The image-level score that picks a patient's submission row: its best box score (-1 without
        boxes), then P(Lung Opacity)."""
        top = float(self.boxes[0, 0]) if len(self.boxes) else -1.0
        return top, float(self.class_probs[OPACITY_INDEX])


def image_key(sop_instance_uid: str | None, path: Path) -> str:
    """``sop:<UID>``, or ``file:<real path>`` for a file without a SOP Instance UID (a link to it is the
    same image)."""
    return f"sop:{sop_instance_uid}" if sop_instance_uid else f"file:{os.path.realpath(path)}"


@dataclass
class PredictionResult:
    """Everything :func:`predict` found: one prediction per image, and every input that gave none.

    ``predictions`` is keyed by :attr:`ImagePrediction.key`, in file order; a patient may have several
    images (:meth:`patients`). The Kaggle submission has one row per patient (:meth:`submission_rows`).
    """

    predictions: dict[str, ImagePrediction]
    threshold: float
    files_found: int
    unreadable: list[UnreadableInput] = field(default_factory=list)
    duplicates: list[DuplicateInput] = field(default_factory=list)
    skipped_links: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tta: str | None = None
    tta_merge: str | None = None  # how the TTA views were merged; None without TTA
    gate: bool = False
    precision: str = "fp32"
    #: the resolved post-processing: ``nms_iou``, ``max_detections``, ``min_score`` (given, else the model's)
    postprocess: dict[str, float | int | None] = field(default_factory=dict)
    compiled: bool = False
    overlay_dir: Path | None = None  # where the overlays went, when drawn

    def patients(self) -> dict[str, list[ImagePrediction]]:
        """``{patientId: its images in file order}``."""
        out: dict[str, list[ImagePrediction]] = {}
        for pred in self.predictions.values():
            out.setdefault(pred.patient_id, []).append(pred)
        return out

    def submission_rows(self) -> dict[str, ImagePrediction]:
        """``{patientId: the image whose boxes make its submission row}`` (see :data:`SUBMISSION_MERGE`).

        The RSNA metric scores one image per patient, and boxes from two images of a patient are in
        different frames (another day, another position), so their boxes are never pooled: the image
        with the strongest finding speaks for the patient. Ties keep the first image in file order.
        """
        return {pid: max(images, key=lambda p: p.rank)  # max keeps the first of equal ranks
                for pid, images in self.patients().items()}

    def submission_boxes(self) -> dict[str, np.ndarray]:
        """``{patientId: float [M, 5] conf, x, y, w, h}``, the form ``write_submission`` takes."""
        return {pid: p.boxes for pid, p in self.submission_rows().items()}

    @property
    def boxes_total(self) -> int:
        return sum(len(p.boxes) for p in self.predictions.values())

    @property
    def images_with_boxes(self) -> int:
        return sum(1 for p in self.predictions.values() if len(p.boxes))

    def summary(self) -> str:
        several = {pid: images for pid, images in self.patients().items() if len(images) > 1}
        lines = [
            f"files found: {self.files_found}; images predicted: {len(self.predictions)} of "
            f"{len(self.patients())} patient(s) ({self.images_with_boxes} images with boxes, "
            f"{self.boxes_total} boxes; threshold {self.threshold:.3f}, tta {self.tta or 'none'}, "
            f"gate {'on' if self.gate else 'off'}, {self.precision}{', compiled' if self.compiled else ''})",
            f"unreadable: {len(self.unreadable)}; duplicate images: {len(self.duplicates)}; "
            f"symlinks not followed: {len(self.skipped_links)}; warnings: {len(self.warnings)}",
            f"patients with several images: {len(several)}"
            + (f" (submission: {SUBMISSION_MERGE})" if several else ""),
        ]
        lines += [f"  unreadable {display_path(u.path)}: {display_text(u.cause)}" for u in self.unreadable]
        lines += [f"  duplicate {display_text(d.patient_id)}: {display_path(d.path)} "
                  f"(kept {display_path(d.kept)}; same {d.same})" for d in self.duplicates]
        lines += [f"  several images of {display_text(pid)}: {len(images)}"
                  for pid, images in several.items()]
        lines += [f"  symlink not followed (leaves its input folder): {display_path(p)}"
                  for p in self.skipped_links]
        lines += [f"  warning: {display_text(w)}" for w in self.warnings]
        return "\n".join(lines)


def xyxy_to_kaggle(boxes: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """xyxy ``[N, 4]`` + scores ``[N]`` -> :attr:`ImagePrediction.boxes`: float32 ``[N, 5]`` ``conf, x, y, w, h``
    by confidence (:func:`pneumodet.boxes.kaggle_rows`, as float32)."""
    return kaggle_rows(boxes, scores).astype(np.float32)
