"""The prediction options: one :class:`PredictOptions` for ``predict``, ``evaluate`` and their commands.

Light to import (no torch): the command line builds its options, and shows their defaults, from this
dataclass. The checks that need the machine (which device exists) are :func:`pneumodet.inference.engine`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from pneumodet.errors import ConfigError
from pneumodet.hardware import PREDICTION_PRECISIONS, parse_precision

TtaMerge = Literal["wbf", "nms"]
#: Test-time augmentations: the mirrored image.
TTA_CHOICES: tuple[str, ...] = ("hflip",)
#: How the views of a test-time augmentation are merged: weighted box fusion, or non-maximum suppression.
TTA_MERGES: tuple[TtaMerge, ...] = ("wbf", "nms")
#: Shown with a device that is not one of these (torch knows more, e.g. "meta", which computes nothing).
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class PredictOptions:
    """How images are predicted; the same for ``predict`` (DICOM files), ``evaluate`` (a run's split) and
    the commands built on them.

    Attributes:
        threshold: keep boxes whose (gated, merged) score is at least this, from 0 to 1; ``None``: the
            threshold the run chose on validation, recorded in the checkpoint (``evaluate`` always uses it).
        tta: ``"hflip"`` also predicts on the mirrored image and merges both views (``tta_merge``).
        tta_merge: ``"wbf"`` (weighted box fusion) or ``"nms"``.
        gate: multiply box scores by the global head's Lung-Opacity probability before thresholding.
        batch_size: images per forward pass (at least 1).
        precision: ``"int8"`` (the run's int8 graph in ONNX Runtime, made by ``pneumodet quantize``; CPU
            only), ``"bf16"`` (autocast) or ``"fp32"``; ``"auto"`` (or ``None``): on the CPU int8 where every
            run holds a current int8 graph that passed its validation check and ONNX Runtime is installed,
            otherwise bf16 where the device
            computes it natively, else fp32 (:func:`pneumodet.inference.engine.make_predictor`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the GPU when there is one).
        workers: data-loading processes (DICOM decoding for ``predict``, cache reading for ``evaluate``);
            0 loads in this process.
        compile: run the network through ``torch.compile`` with frozen weights (seconds of compilation,
            then faster batches); ``None`` compiles for CPU jobs of ``COMPILE_MIN_IMAGES`` images or more
            where a C++ compiler is available (never automatically on a GPU).
        nms_iou: non-maximum suppression drops a box overlapping a higher-scoring one of its image (any
            pyramid level) by more than this IoU, ``0 < nms_iou <= 1``; ``None``: the model's ``nms_thresh``
            (recorded in the checkpoint).
        max_detections: boxes kept per image after NMS, 1 to 10000; ``None``: the model's ``max_detections``.
        min_score: candidate boxes must score above this before NMS, ``0 <= min_score < 1`` (the final
            cut is ``threshold``); ``None``: the model's ``score_thresh``.
    """

    threshold: float | None = None
    tta: str | None = None
    tta_merge: TtaMerge = "wbf"
    gate: bool = False
    batch_size: int = 8
    precision: str | None = "auto"
    device: str = "cpu"
    workers: int = 0
    compile: bool | None = None
    nms_iou: float | None = None
    max_detections: int | None = None
    min_score: float | None = None

    @classmethod
    def of(cls, options: PredictOptions | None = None, **overrides: Any) -> PredictOptions:
        """``options`` (default: the defaults) with single fields replaced: ``of(None, threshold=0.3)``.

        Raises:
            TypeError: an override that is not a field.
        """
        return dataclasses.replace(options or cls(), **overrides)

    def check(self) -> None:
        """:class:`ConfigError` for a value no prediction can use, checked before anything is loaded (the
        device against the machine: :func:`pneumodet.inference.engine.resolve_device`)."""
        check_predict_options(batch_size=self.batch_size, workers=self.workers, threshold=self.threshold)
        check_postprocess_options(nms_iou=self.nms_iou, max_detections=self.max_detections,
                                  min_score=self.min_score)
        check_tta(self.tta, self.tta_merge)
        check_precision_device(self.precision, self.device)


def check_precision_device(precision: str | None, device: str | None, *, chosen: bool = False) -> None:
    """:class:`ConfigError` for a precision no prediction can use, and for int8 on anything but the CPU (the
    int8 graph runs in ONNX Runtime on the CPU); ``device`` ``"auto"`` passes (checked again once resolved:
    ``chosen`` says that ``device`` is what ``auto`` chose)."""
    if parse_precision(precision, PREDICTION_PRECISIONS) != "int8" or device in (None, "auto"):
        return
    if str(device).split(":")[0] != "cpu":
        how = " (--device auto chose it: this machine has a GPU)" if chosen else ""
        raise ConfigError(f"--precision int8 runs the run's int8 graph on the CPU (ONNX Runtime), not on {device}"
                          f"{how}; pass --device cpu, or choose bf16 or fp32 for the GPU")


def check_predict_options(*, batch_size: int = 1, workers: int = 0, threshold: float | None = None) -> None:
    """:class:`ConfigError` for a value no prediction can use; checked before anything is loaded."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be 0 (decode in this process) or more, got {workers}")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold must be a number from 0 to 1 (box scores are probabilities), "
                          f"got {threshold}")


#: The most boxes one image may keep (as the model configuration's ``max_detections``).
MAX_DETECTIONS_LIMIT = 10_000


def check_postprocess_options(*, nms_iou: float | None = None, max_detections: int | None = None,
                              min_score: float | None = None) -> None:
    """:class:`ConfigError` for a post-processing value no prediction can use (``None``: the model's own)."""
    if nms_iou is not None and not (math.isfinite(nms_iou) and 0.0 < nms_iou <= 1.0):
        raise ConfigError(f"NMS IoU must be above 0 and at most 1 (1 keeps every box), got {nms_iou}")
    if max_detections is not None and not (isinstance(max_detections, int)
                                           and 1 <= max_detections <= MAX_DETECTIONS_LIMIT):
        raise ConfigError(f"max detections must be a whole number from 1 to {MAX_DETECTIONS_LIMIT}, "
                          f"got {max_detections}")
    if min_score is not None and not (math.isfinite(min_score) and 0.0 <= min_score < 1.0):
        raise ConfigError(f"min score must be a number from 0 up to (not including) 1, got {min_score}")


def check_tta(tta: str | None, tta_merge: str) -> None:
    """:class:`ConfigError` unless ``tta`` is ``None`` or one of :data:`TTA_CHOICES` and ``tta_merge`` one of
    :data:`TTA_MERGES`."""
    if tta is not None and tta not in TTA_CHOICES:
        raise ConfigError(f"unknown TTA {tta!r}; the only one is 'hflip'")
    if tta_merge not in TTA_MERGES:
        raise ConfigError(f"unknown TTA merge {tta_merge!r}; choose 'wbf' or 'nms'")
