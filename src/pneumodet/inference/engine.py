"""The prediction engine: a loaded model and the options it runs with, from input images to raw boxes.

:func:`load_for_inference` loads a run's best model (or a checkpoint file); :class:`Predictor` runs
batches of model inputs (``[B, 1, S, S]`` in ``[0, 1]``, :func:`pneumodet.data.preprocess.prepare_image`)
through it with the precision, TTA and gating of :class:`~pneumodet.inference.options.PredictOptions`,
and returns :class:`RawPrediction` per image: boxes in input pixels, before the threshold. ``predict``
(DICOM files) and ``evaluate`` (a run's split) are both built on it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumodet.boxes import boxes_to_original, hflip
from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.hardware import resolve_precision
from pneumodet.inference.options import (
    DEVICE_CHOICES,
    PredictOptions,
    TtaMerge,
    check_postprocess_options,
    check_tta,
)
from pneumodet.inference.results import OPACITY_INDEX, xyxy_to_kaggle
from pneumodet.inference.tta import merge_views
from pneumodet.model import Detections, HeadOutputs, fusion
from pneumodet.model.checkpoint import load_checkpoint
from pneumodet.rundir import RunDir
from pneumodet.textsafe import display_path


# ---------------------------------------------------------------- model loading
def resolve_checkpoint(model_source: Path | str) -> Path:
    """A run directory means its best model (:attr:`RunDir.best_model`); a file is taken as the checkpoint."""
    path = Path(model_source)
    if path.is_dir():
        path = RunDir(path).best_model
        if not path.is_file():
            raise CheckpointError(f"{display_path(model_source)}: a run directory needs {path.name}, "
                                  "which is missing")
    elif not path.is_file():
        raise CheckpointError(f"{display_path(model_source)}: no such checkpoint file or run directory")
    return path


def load_for_inference(model_source: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint (``weights_only``) and put the model in eval mode; returns ``(model, extra)``."""
    model, extra = load_checkpoint(resolve_checkpoint(model_source))
    return model.eval(), dict(extra or {})


def model_image_size(model: nn.Module) -> int:
    """The square input side the model was trained at: its config's ``image_size``, where it is stored once."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    if not size:
        raise CheckpointError("the checkpoint's model configuration records no image_size; cannot prepare "
                              "inputs for it")
    return int(size)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to predict on: ``"auto"`` (or ``None``) is the first CUDA GPU when this machine has a
    usable one, else the CPU; ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are checked against the machine.

    Raises:
        ConfigError: an unknown device, or a GPU this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {device!r}; choose {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return dev


def check_options(options: PredictOptions) -> torch.device:
    """Every check of ``options`` (:meth:`PredictOptions.check`, then the device against this machine), made
    before anything is loaded; returns the device."""
    options.check()
    return resolve_device(options.device)


# ---------------------------------------------------------------- the engine
@dataclass(frozen=True)
class RawPrediction:
    """Boxes in model-input pixels before the threshold: xyxy ``[N, 4]``, scores ``[N]``, probs ``[C]``."""

    boxes: torch.Tensor
    scores: torch.Tensor
    class_probs: torch.Tensor

    def kaggle_rows(self, threshold: float, original_size: tuple[int, int], image_size: int) -> np.ndarray:
        """The boxes scoring at least ``threshold`` in the ``(H, W)`` original image's pixels, as
        :attr:`~pneumodet.inference.results.ImagePrediction.boxes` (float32 ``conf, x, y, w, h``, by score)."""
        keep = self.scores >= threshold
        return xyxy_to_kaggle(boxes_to_original(self.boxes[keep], original_size, image_size), self.scores[keep])


class Predictor:
    """A loaded model plus the prediction options; turns a batch of input images into raw predictions."""

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        tta: str | None = None,
        tta_merge: TtaMerge = "wbf",
        tta_iou: float = 0.55,
        gate: bool = False,
        device: str | torch.device | None = "cpu",
        precision: str | None = None,
        compile: bool = False,
        fold_batchnorm: bool = True,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        min_score: float | None = None,
    ) -> None:
        """Takes over ``model``: it is put in eval mode on ``device``, channels_last, and (unless
        ``fold_batchnorm`` is false) its encoder's batch norms are folded into the convolutions.
        ``nms_iou``, ``max_detections``, ``min_score`` replace the model configuration's post-processing
        values (``nms_thresh``, ``max_detections``, ``score_thresh``); ``None`` keeps the model's."""
        check_tta(tta, tta_merge)
        check_postprocess_options(nms_iou=nms_iou, max_detections=max_detections, min_score=min_score)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if fold_batchnorm:
            model = fusion.fold_batchnorm(model, inplace=True)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        # Compiling costs about 8 s per batch shape for ResNet50 on a 2-core CPU, then each batch runs
        # about 1.4x faster (docs/BENCHMARKS.md): worth it for large jobs only.
        self.network = fusion.compile_for_inference(self.model) if compile else self.model
        self._compiled_batch: int | None = None  # the batch shape compiled first; smaller ones are padded
        self.image_size = image_size
        self.tta, self.tta_merge, self.tta_iou, self.gate = tta, tta_merge, tta_iou, gate
        config = getattr(model, "config", None)
        # Resolved once, so what is recorded (evaluate's metrics.json) is what every batch used; a model
        # without a configuration leaves ``None``: its detect() then uses its own values.
        self.postprocess: dict[str, float | int | None] = {
            "nms_iou": nms_iou if nms_iou is not None else getattr(config, "nms_thresh", None),
            "max_detections": max_detections if max_detections is not None else getattr(config, "max_detections",
                                                                                         None),
            "min_score": min_score if min_score is not None else getattr(config, "score_thresh", None),
        }

    @classmethod
    def from_options(cls, model: nn.Module, image_size: int, options: PredictOptions, *,
                     num_images: int) -> Predictor:
        """A predictor with ``options``' TTA, gating, device and precision; ``compile=None`` compiles when
        :func:`pneumodet.model.fusion.compile_pays_off` for ``num_images`` images on that device."""
        device = resolve_device(options.device)
        compile = options.compile if options.compile is not None else fusion.compile_pays_off(num_images, device)
        return cls(model, image_size, tta=options.tta, tta_merge=options.tta_merge, gate=options.gate,
                   device=device, precision=options.precision, compile=compile, nms_iou=options.nms_iou,
                   max_detections=options.max_detections, min_score=options.min_score)

    @property
    def compiled(self) -> bool:
        """Whether batches run through the compiled network (false again after a failed compilation)."""
        return self.network is not self.model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _detect(self, images: torch.Tensor) -> list[Detections]:
        images = images.to(self.device, memory_format=torch.channels_last)
        with self._autocast():
            outputs = self._forward(images)
        post = self.postprocess  # decodes in fp32 whatever the head's dtype
        return self.model.detect(outputs, score_thresh=post["min_score"], nms_thresh=post["nms_iou"],
                                 max_detections=post["max_detections"])

    def _forward(self, images: torch.Tensor) -> HeadOutputs:
        if self.network is self.model:
            return self.model(images)
        batch = images.shape[0]
        if self._compiled_batch is None:
            self._compiled_batch = batch
        missing = self._compiled_batch - batch
        if missing > 0:  # a zero-padded batch costs less than compiling for a new shape
            images = torch.cat((images, images.new_zeros((missing, *images.shape[1:]))))
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            outputs = self.network(images)
        except Exception as err:  # noqa: BLE001 - Inductor raises many kinds (no compiler, lowering bugs)
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                          "predicting without compilation", stacklevel=4)
            self.network = self.model
            return self.model(images[:batch])
        if missing > 0:
            outputs = outputs._replace(cls_logits=outputs.cls_logits[:batch], box_deltas=outputs.box_deltas[:batch],
                                       global_logits=outputs.global_logits[:batch])
        return outputs

    def __call__(self, images: torch.Tensor) -> list[RawPrediction]:
        """images: float ``[B, 1, S, S]`` in ``[0, 1]`` -> ``B`` raw predictions in input pixels."""
        batch = images.shape[0]
        if self.tta == "hflip":
            dets = self._detect(torch.cat((images, images.flip(-1))))
            plain, flipped = dets[:batch], dets[batch:]
        else:
            plain, flipped = self._detect(images), [None] * batch
        out = []
        for det, det_flip in zip(plain, flipped, strict=True):
            boxes, scores = det.boxes.float().cpu(), det.scores.float().cpu()
            probs = det.class_probs.float().cpu()
            if det_flip is not None:
                unflipped = hflip(det_flip.boxes.float().cpu(), float(self.image_size))
                boxes, scores = merge_views([boxes, unflipped], [scores, det_flip.scores.float().cpu()],
                                            method=self.tta_merge, iou_thresh=self.tta_iou)
                probs = (probs + det_flip.class_probs.float().cpu()) / 2
            if self.gate:
                scores = scores * probs[OPACITY_INDEX]
            out.append(RawPrediction(boxes.reshape(-1, 4), scores.reshape(-1), probs))
        return out
