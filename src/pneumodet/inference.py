"""Prediction on DICOM files (submission, hflip TTA, global gating, overlays, JSON) and ONNX export.

Prediction streams: files are found (:func:`find_dicom_files`), decoded and resized one by one in a
:class:`~torch.utils.data.DataLoader`, batched, run through the network, decoded by the model's own
``detect``, and the boxes are mapped back to each image's original pixels. Only one batch of images
is ever in memory; per image only its few boxes and class probabilities are kept.

ONNX
----
:func:`export_onnx` writes the network alone (no decoding, no NMS), with a dynamic batch axis:

* input ``images``: float32 ``[B, 1, S, S]`` in ``[0, 1]`` (the DICOM's pixels resized with area
  interpolation to ``S x S`` and divided by 255, exactly as :func:`predict` prepares them);
* outputs ``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits [B, C]`` and
  ``anchors [A, 4]`` (a constant: the anchors depend on ``S`` only).

Next to ``model.onnx`` a side file ``model.onnx.json`` records ``S``, the anchors per pyramid level,
the class names, the model configuration (score/NMS thresholds, top-k) and the run's validation
threshold. :func:`decode_onnx_outputs` turns the four outputs into boxes with the model's own
post-processing (:func:`pneumodet.model.retinanet.postprocess`); :func:`run_onnx` does both steps
with onnxruntime. Written out, for an implementation in another language, per image:

1. ``score = sigmoid(cls_logits)``; within each pyramid level (``anchors_per_level`` consecutive
   anchors) keep the ``topk_per_level`` best anchors.
2. Decode each kept anchor ``(x1, y1, x2, y2)`` with its deltas ``(dx, dy, dw, dh)``:
   ``aw = x2 - x1``, ``ah = y2 - y1``, ``cx = x1 + aw/2 + dx*aw``, ``cy = y1 + ah/2 + dy*ah``,
   ``w = aw * exp(min(dw, log(1000/16)))``, ``h = ah * exp(min(dh, log(1000/16)))``,
   box ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``, clipped to ``[0, S]``.
3. Keep boxes with ``score > score_thresh`` and positive width and height; non-maximum suppression
   at IoU ``nms_thresh``; keep the ``max_detections`` best.
4. Class probabilities: ``softmax(global_logits)`` in ``class_names`` order.
5. Boxes are in ``S x S`` input pixels: multiply x by ``W / S`` and y by ``H / S`` for an ``H x W``
   original image; keep those with score at least the run's ``threshold``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pneumodet.data.records import CLASS_INDEX, CLASS_NAMES
from pneumodet.errors import CheckpointError, ConfigError, DicomReadError, PneumodetError
from pneumodet.hardware import bf16_is_native, release_free_heap
from pneumodet.rundir import RunDir
from pneumodet.safeio import atomic_path, write_json
from pneumodet.textsafe import display_path, display_text

if TYPE_CHECKING:
    import PIL.Image

    from pneumodet.model import Detections, HeadOutputs

#: How often a streaming prediction returns freed heap pages to the system (see release_free_heap).
_TRIM_EVERY_BATCHES = 16
#: Index of "Lung Opacity" in the global head's probabilities (used by ``gate``).
OPACITY_INDEX = CLASS_INDEX["Lung Opacity"]

Precision = Literal["bf16", "fp32"]
TtaMerge = Literal["wbf", "nms"]


# ---------------------------------------------------------------- results
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
    gate: bool = False
    precision: str = "fp32"
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


# ---------------------------------------------------------------- finding files
@dataclass
class FileSearch:
    """The DICOM files found under the inputs, in a stable order, and what was left out."""

    files: list[Path] = field(default_factory=list)
    missing: list[UnreadableInput] = field(default_factory=list)
    skipped_links: list[Path] = field(default_factory=list)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def find_dicom_files(inputs: Sequence[Path | str], *, follow_symlinks: bool = False) -> FileSearch:
    """Files named on the command line, and ``*.dcm`` files found recursively under folders.

    A symbolic link under a folder is followed only when its target stays inside that folder, unless
    ``follow_symlinks`` is set; links that are not followed are listed in ``skipped_links``. A folder
    is entered once per input however many links lead to it, so link loops end. Broken links and
    inputs that do not exist are listed in ``missing`` (never fatal).
    """
    search = FileSearch()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            root = path.resolve()
            _walk(path, root, set(), search, follow_symlinks)
        elif path.is_file():
            search.files.append(path)
        elif path.is_symlink():
            search.missing.append(UnreadableInput(path, "broken symbolic link"))
        else:
            search.missing.append(UnreadableInput(path, "no such file or folder"))
    return search


def _walk(folder: Path, root: Path, seen: set[Path], search: FileSearch, follow_symlinks: bool) -> None:
    real = folder.resolve()
    if real in seen:  # a link back to a folder already walked: a loop or a second route in
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        search.missing.append(UnreadableInput(folder, f"cannot list folder: {exc.strerror or exc}"))
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            try:
                target = path.resolve()
            except (OSError, RuntimeError):  # a cycle of links (a -> b -> a) has no target
                search.missing.append(UnreadableInput(path, "symbolic link loop"))
                continue
            if not target.exists():
                search.missing.append(UnreadableInput(path, "broken symbolic link"))
                continue
            if not follow_symlinks and not _is_within(target, root):
                search.skipped_links.append(path)
                continue
        if entry.is_dir():
            _walk(path, root, seen, search, follow_symlinks)
        elif entry.is_file() and path.suffix.lower() == ".dcm":
            search.files.append(path)


# ---------------------------------------------------------------- boxes
def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror xyxy boxes ``[N, 4]`` left-right in an image ``width`` pixels wide (its own inverse)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)


def boxes_to_original(boxes: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Map xyxy boxes ``[N, 4]`` from the ``image_size`` square model input to an ``(H, W)`` original."""
    from pneumodet.data.dataset import scale_boxes_to_original

    return torch.as_tensor(scale_boxes_to_original(boxes, original_size, image_size), dtype=torch.float32)


def xyxy_to_kaggle(boxes: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """xyxy ``[N, 4]`` + scores ``[N]`` -> float32 ``[N, 5]`` ``conf, x, y, w, h``, by confidence."""
    order = torch.argsort(scores, descending=True, stable=True)
    b, s = boxes[order], scores[order]
    out = torch.stack((s, b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), dim=1)
    return out.to(torch.float32).numpy().reshape(-1, 5)


def weighted_boxes_fusion(
    boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], *, iou_thresh: float = 0.55
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted box fusion (Solovyev et al., 2021) of the predictions of ``T`` views of one image.

    Args:
        boxes: ``T`` tensors ``[N_t, 4]`` xyxy, all in the same pixel space.
        scores: ``T`` tensors ``[N_t]``.
        iou_thresh: a box joins the cluster whose fused box it overlaps most, if that IoU is above this.

    Returns:
        fused boxes ``[K, 4]`` (score-weighted mean of each cluster's boxes) and scores ``[K]``
        (mean score of the cluster times ``min(n, T) / T``, so a box seen in one view of two
        keeps half of its score), sorted by score.
    """
    views = len(boxes)
    all_boxes = torch.cat([b.reshape(-1, 4).float() for b in boxes]) if views else torch.zeros(0, 4)
    all_scores = torch.cat([s.reshape(-1).float() for s in scores]) if views else torch.zeros(0)
    if all_boxes.numel() == 0:
        return torch.zeros(0, 4), torch.zeros(0)
    order = torch.argsort(all_scores, descending=True, stable=True)
    all_boxes, all_scores = all_boxes[order], all_scores[order]

    from torchvision.ops import box_iou

    fused = torch.zeros_like(all_boxes)  # fused box of each cluster, first `k` rows used
    weighted = torch.zeros_like(all_boxes)  # sum of score * box per cluster
    score_sum = torch.zeros_like(all_scores)
    count = torch.zeros_like(all_scores)
    k = 0
    for box, score in zip(all_boxes, all_scores, strict=True):
        best = -1
        if k:
            ious = box_iou(box[None], fused[:k])[0]
            j = int(torch.argmax(ious))
            if ious[j] > iou_thresh:
                best = j
        if best < 0:
            best, k = k, k + 1
        weighted[best] += score * box
        score_sum[best] += score
        count[best] += 1
        fused[best] = weighted[best] / score_sum[best].clamp_min(torch.finfo(torch.float32).tiny)
    fused_scores = score_sum[:k] / count[:k] * count[:k].clamp(max=views) / views
    order = torch.argsort(fused_scores, descending=True, stable=True)
    return fused[:k][order], fused_scores[order]


def merge_views(
    boxes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], *, method: TtaMerge, iou_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the boxes of several views of one image: ``"wbf"`` or plain ``"nms"``."""
    if method == "wbf":
        return weighted_boxes_fusion(boxes, scores, iou_thresh=iou_thresh)
    if method == "nms":
        from torchvision.ops import nms

        b = torch.cat([x.reshape(-1, 4).float() for x in boxes])
        s = torch.cat([x.reshape(-1).float() for x in scores])
        keep = nms(b, s, iou_thresh)
        return b[keep], s[keep]
    raise ConfigError(f"unknown TTA merge {method!r}; choose 'wbf' or 'nms'")


# ---------------------------------------------------------------- model loading
def resolve_checkpoint(model_source: Path | str) -> Path:
    """A run directory means its ``best_model.pt``; a file is taken as the checkpoint itself."""
    path = Path(model_source)
    if path.is_dir():
        path = RunDir(path).best_model
        if not path.is_file():
            raise CheckpointError(f"{display_path(model_source)}: a run directory needs {path.name}, "
                                  "which is missing")
    elif not path.is_file():
        raise CheckpointError(f"{display_path(model_source)}: no such checkpoint file or run directory")
    return path


def load_for_inference(model_source: Path | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint (``weights_only``) and put the model in eval mode; returns ``(model, extra)``."""
    from pneumodet.model import load_checkpoint

    model, extra = load_checkpoint(resolve_checkpoint(model_source))
    return model.eval(), dict(extra or {})


def model_image_size(model: torch.nn.Module, extra: dict[str, Any]) -> int:
    """The square input side the model was trained at (checkpoint extra first, then the config)."""
    size = extra.get("image_size") or getattr(getattr(model, "config", None), "image_size", None)
    if not size:
        raise CheckpointError("the checkpoint records no image_size; cannot prepare inputs for it")
    return int(size)


def resolve_precision(precision: str | None, device: torch.device) -> Precision:
    """``None`` -> ``"bf16"`` where the device computes it natively, else ``"fp32"``."""
    if precision is None:
        return "bf16" if bf16_is_native(device.type) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r}; choose 'bf16' or 'fp32'")
    return precision  # type: ignore[return-value]


# ---------------------------------------------------------------- image stream
def prepare_image(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``[H, W]`` -> float32 ``[1, S, S]`` in ``[0, 1]``: the cache's area resize, then / 255.

    The same resize as the training cache, so the model sees at prediction what it saw in training.
    """
    from pneumodet.data.cache import resize_area

    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grey image, got {pixels.dtype} of shape {tuple(pixels.shape)}")
    resized = resize_area(pixels, image_size)
    return torch.from_numpy(resized).to(torch.float32).div_(255.0)[None]


@dataclass
class _Item:
    index: int
    path: Path
    image: torch.Tensor | None = None  # [1, S, S]
    original_size: tuple[int, int] = (0, 0)
    dicom_patient_id: str | None = None
    pixels: np.ndarray | None = None  # the original uint8 [H, W], only when overlays are drawn
    error: str | None = None
    uids: tuple[str | None, str | None, str | None] = (None, None, None)  # SOP instance, study, series


class DicomImageStream(Dataset):
    """Decodes and resizes the files one at a time; a file that fails becomes an item with ``error``."""

    def __init__(self, files: Sequence[Path], image_size: int, *, keep_pixels: bool = False) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.keep_pixels = keep_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> _Item:
        from pneumodet.data.dicom import read_dicom

        path = self.files[index]
        try:
            pixels, meta = read_dicom(path)
            image = prepare_image(pixels, self.image_size)
        except DicomReadError as exc:
            return _Item(index, path, error=exc.cause)
        except Exception as exc:  # one bad file must never end the run: its cause is listed instead
            return _Item(index, path, error=f"{type(exc).__name__}: {exc}")
        pid = meta.get("patient_id")
        uids = (meta.get("sop_instance_uid"), meta.get("study_instance_uid"), meta.get("series_instance_uid"))
        return _Item(index, path, image, (int(pixels.shape[0]), int(pixels.shape[1])),
                     str(pid).strip() if pid else None, pixels if self.keep_pixels else None, uids=uids)


def _collate(items: list[_Item]) -> list[_Item]:
    return items


# ---------------------------------------------------------------- prediction
@dataclass(frozen=True)
class RawPrediction:
    """Boxes in model-input pixels before the threshold: xyxy ``[N, 4]``, scores ``[N]``, probs ``[C]``."""

    boxes: torch.Tensor
    scores: torch.Tensor
    class_probs: torch.Tensor


def check_tta(tta: str | None, tta_merge: str) -> None:
    if tta not in (None, "hflip"):
        raise ConfigError(f"unknown TTA {tta!r}; the only one is 'hflip'")
    if tta_merge not in ("wbf", "nms"):
        raise ConfigError(f"unknown TTA merge {tta_merge!r}; choose 'wbf' or 'nms'")


class Predictor:
    """A loaded model plus the prediction options; turns a batch of input images into raw predictions."""

    def __init__(
        self,
        model: torch.nn.Module,
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
    ) -> None:
        """Takes over ``model``: it is put in eval mode on ``device``, channels_last, and (unless
        ``fold_batchnorm`` is false) its encoder's batch norms are folded into the convolutions."""
        check_tta(tta, tta_merge)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        from pneumodet.model import fusion

        if fold_batchnorm:
            model = fusion.fold_batchnorm(model, inplace=True)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        # Compiling costs about 8 s per batch shape for ResNet50 on a 2-core CPU, then each batch runs
        # about 1.4x faster (docs/BENCHMARKS.md): worth it for large jobs only.
        self.network = fusion.compile_for_inference(self.model) if compile else self.model
        self._compiled_batch: int | None = None  # the batch shape compiled first; smaller ones are padded
        self.image_size = image_size
        self.tta, self.tta_merge, self.tta_iou, self.gate = tta, tta_merge, tta_iou, gate

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
        return self.model.detect(outputs)  # decodes in fp32 whatever the head's dtype

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
                unflipped = hflip_boxes(det_flip.boxes.float().cpu(), float(self.image_size))
                boxes, scores = merge_views([boxes, unflipped], [scores, det_flip.scores.float().cpu()],
                                            method=self.tta_merge, iou_thresh=self.tta_iou)
                probs = (probs + det_flip.class_probs.float().cpu()) / 2
            if self.gate:
                scores = scores * probs[OPACITY_INDEX]
            out.append(RawPrediction(boxes.reshape(-1, 4), scores.reshape(-1), probs))
        return out


def predict(
    model_source: Path | str,
    inputs: Sequence[Path | str],
    *,
    threshold: float | None = None,
    tta: str | None = None,
    tta_merge: TtaMerge = "wbf",
    gate: bool = False,
    batch_size: int = 8,
    device: str | torch.device | None = "cpu",
    precision: str | None = None,
    follow_symlinks: bool = False,
    overlay_dir: Path | str | None = None,
    workers: int = 0,
    compile: bool | None = None,
    progress: bool = True,
) -> PredictionResult:
    """Predict boxes and class probabilities for every DICOM under ``inputs``.

    Args:
        model_source: a training run directory (its ``best_model.pt`` is used) or a checkpoint file.
        inputs: DICOM files and folders (searched recursively for ``*.dcm``, see :func:`find_dicom_files`).
        threshold: keep boxes whose (gated, merged) score is at least this; default: the threshold the
            run chose on validation, recorded in the checkpoint.
        tta: ``"hflip"`` also predicts on the mirrored image and merges both views (``tta_merge``).
        gate: multiply box scores by the global head's Lung-Opacity probability before thresholding.
        batch_size: images per forward pass (at least 1).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the GPU when there is one, see
            :func:`resolve_device`).
        precision: ``"bf16"`` (autocast) or ``"fp32"``; default bf16 where the device computes it natively.
        overlay_dir: when given, one PNG per predicted image with boxes, scores and class probabilities,
            named by :func:`overlay_filename`.
        workers: DataLoader processes decoding DICOMs (0: in this process).
        compile: run the network through ``torch.compile`` with frozen weights (seconds of compilation,
            then faster batches); ``None`` compiles for CPU jobs of ``COMPILE_MIN_IMAGES`` images or
            more where a C++ compiler is available (never automatically on a GPU).

    Returns:
        A :class:`PredictionResult` with one prediction per image (keyed by SOP Instance UID, see
        :class:`ImagePrediction`); unreadable files, duplicate images (a second file with the same SOP
        Instance UID, or the same file twice) and links not followed are listed there, never raised.

    Raises:
        ConfigError: an option no prediction can use (checked before the model is loaded).
        PneumodetError: no DICOM file was found, or none could be predicted (nothing to report).
    """
    check_predict_options(batch_size=batch_size, workers=workers, threshold=threshold)
    check_tta(tta, tta_merge)
    dev = resolve_device(device)
    model, extra = load_for_inference(model_source)
    threshold_from_run = threshold is None
    if threshold is None:
        if "threshold" not in extra:
            raise CheckpointError(f"{display_path(model_source)}: the checkpoint records no validation "
                                  "threshold; pass one explicitly (--threshold)")
        threshold = float(extra["threshold"])
        check_predict_options(threshold=threshold)
    image_size = model_image_size(model, extra)
    search = find_dicom_files(inputs, follow_symlinks=follow_symlinks)
    if not search.files:
        raise PneumodetError(_nothing_found(inputs, search))
    if compile is None:
        from pneumodet.model.fusion import compile_pays_off

        compile = compile_pays_off(len(search.files), dev)
    predictor = Predictor(model, image_size, tta=tta, tta_merge=tta_merge, gate=gate,
                          device=dev, precision=precision, compile=compile)

    result = PredictionResult({}, threshold, len(search.files), unreadable=list(search.missing),
                              skipped_links=list(search.skipped_links), tta=tta, gate=gate,
                              precision=predictor.precision)
    if gate and threshold_from_run:
        result.warnings.append(f"the run's threshold {threshold:.3f} was chosen on ungated scores; gating "
                               "lowers every score, so a threshold chosen with --gate may suit better")
    overlays = Path(overlay_dir) if overlay_dir is not None else None
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
        result.overlay_dir = overlays

    stream = DicomImageStream(search.files, image_size, keep_pixels=overlays is not None)
    loader = DataLoader(stream, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate)
    for number, items in enumerate(_progress(loader, progress, total=len(loader)), 1):
        _predict_batch(items, predictor, result, overlays)
        if number % _TRIM_EVERY_BATCHES == 0:
            release_free_heap()
    result.compiled = predictor.compiled  # false if the compilation failed and eager took over
    if not result.predictions:  # a run that predicted nothing must not look like a success
        raise PneumodetError(_nothing_predicted(result))
    return result


def check_predict_options(*, batch_size: int = 1, workers: int = 0, threshold: float | None = None) -> None:
    """:class:`ConfigError` for a value no prediction can use; checked before anything is loaded."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be 0 (decode in this process) or more, got {workers}")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold must be a number from 0 to 1 (box scores are probabilities), "
                          f"got {threshold}")


#: Shown with a device that is not one of these (torch knows more, e.g. "meta", which computes nothing).
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


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


def _listing(items: Sequence[str], shown: int = 3) -> str:
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _nothing_found(inputs: Sequence[Path | str], search: FileSearch) -> str:
    parts = [f"no DICOM files (*.dcm) found in {', '.join(display_path(p) for p in inputs)}"]
    parts += [f"{display_path(u.path)}: {display_text(u.cause)}" for u in search.missing]
    if search.skipped_links:
        parts.append(f"{len(search.skipped_links)} symbolic link(s) leading out of the input folders were "
                     "not followed (follow_symlinks / --follow-symlinks)")
    return "; ".join(parts)


def _nothing_predicted(result: PredictionResult) -> str:
    causes = [f"{display_path(u.path)}: {display_text(u.cause)}" for u in result.unreadable]
    return (f"no image could be predicted from the {result.files_found} DICOM file(s) found ({len(causes)} "
            f"unreadable: {_listing(causes)}); nothing written")


def _progress(iterable: Any, enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc="predict", unit="batch"))


#: Characters a printable patient id still cannot hold: it must stay one field of the submission CSV.
_CSV_BREAKING = frozenset(',"')


def _patient_id(item: _Item, result: PredictionResult) -> str | None:
    """The DICOM PatientID, else the file stem; ``None`` (and the file listed) when unusable.

    Allowed: printable characters (no line breaks, no control characters, no undecodable bytes from a
    file name) except comma and double quote.
    """
    stem = item.path.stem
    pid = item.dicom_patient_id or stem
    if not pid.strip() or not pid.isprintable() or _CSV_BREAKING & set(pid):
        source = "DICOM PatientID" if item.dicom_patient_id else "file name (no PatientID in the file)"
        result.unreadable.append(UnreadableInput(
            item.path, f"patient id {pid!r} from the {source} cannot be a submission CSV field (comma, "
                       "quote, line break or unprintable character)"))
        return None
    if item.dicom_patient_id and item.dicom_patient_id != stem:
        result.warnings.append(f"{display_path(item.path)}: DICOM PatientID {item.dicom_patient_id!r} "
                               f"differs from the file name; using the PatientID")
    return pid


def _predict_batch(items: list[_Item], predictor: Predictor, result: PredictionResult,
                   overlays: Path | None) -> None:
    good: dict[str, tuple[str, _Item]] = {}  # image key -> (patient id, item), in file order
    for item in items:
        if item.error is not None:
            result.unreadable.append(UnreadableInput(item.path, item.error))
            continue
        key = image_key(item.uids[0], item.path)
        first = result.predictions[key].source if key in result.predictions else (
            good[key][1].path if key in good else None)
        if first is not None:  # checked first: a second copy adds no warning of its own
            same = "SOP Instance UID" if item.uids[0] else "file"
            pid = result.predictions[key].patient_id if key in result.predictions else good[key][0]
            result.duplicates.append(DuplicateInput(pid, item.path, first, same))
            continue
        pid = _patient_id(item, result)
        if pid is None:
            continue
        good[key] = (pid, item)
    if not good:
        return
    raws = predictor(torch.stack([item.image for _, item in good.values()]))
    for (key, (pid, item)), raw in zip(good.items(), raws, strict=True):
        keep = raw.scores >= result.threshold
        boxes = boxes_to_original(raw.boxes[keep], item.original_size, predictor.image_size)
        pred = ImagePrediction(pid, xyxy_to_kaggle(boxes, raw.scores[keep]),
                               raw.class_probs.numpy().astype(np.float32), item.path, item.original_size,
                               *item.uids)
        result.predictions[key] = pred
        if overlays is not None and item.pixels is not None:
            with atomic_path(overlays / overlay_filename(pred)) as tmp:
                draw_overlay(item.pixels, pred).save(tmp, format="PNG")


# ---------------------------------------------------------------- outputs
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: Characters of the patient id kept in an overlay's file name (the hash makes it unique).
_OVERLAY_PREFIX = 40


def overlay_filename(prediction: ImagePrediction) -> str:
    """The overlay's file name: ``<patient id, sanitised, at most 40 characters>_<12 hex digits>.png``.

    Anything but ASCII letters, digits, ``.``, ``_`` and ``-`` becomes ``_`` and leading dots go, so the
    name stays in the overlay folder and is short enough for any file system; the hex digits are a hash
    of the image's key (its SOP Instance UID), so two images never share a name, even when their patient
    ids look alike once sanitised.
    """
    prefix = _UNSAFE.sub("_", prediction.patient_id)[:_OVERLAY_PREFIX].lstrip(".") or "_"
    digest = hashlib.sha256(prediction.key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{prefix}_{digest}.png"


def draw_overlay(pixels: np.ndarray, prediction: ImagePrediction) -> PIL.Image.Image:
    """The grey image (uint8 ``[H, W]``) as RGB with the boxes, their scores and the class probabilities.

    Only the patient id is written; nothing else from the DICOM header reaches the picture.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    font = ImageFont.load_default(size=max(10, side // 48))
    line = max(1, side // 256)
    for conf, x, y, w, h in prediction.boxes.tolist():
        draw.rectangle((x, y, x + w, y + h), outline=(255, 40, 40), width=line)
        draw.text((x + line, max(0.0, y - font.size - 2 * line)), f"{conf:.2f}", fill=(255, 40, 40), font=font)
    legend = [prediction.patient_id] + [f"{name}: {p:.2f}" for name, p in
                                        zip(CLASS_NAMES, prediction.class_probs.tolist(), strict=True)]
    origin = (line * 4, line * 4)
    text = "\n".join(legend)
    draw.rectangle(draw.multiline_textbbox(origin, text, font=font), fill=(0, 0, 0))  # legible over boxes
    draw.multiline_text(origin, text, fill=(255, 220, 0), font=font)
    return image


def prediction_json(result: PredictionResult) -> dict[str, Any]:
    """The result as plain JSON data: one entry per image (patient id, DICOM UIDs, source file, boxes,
    scores, class probabilities, whether it makes its patient's submission row, its overlay's file name),
    then every input that gave no prediction. Paths are display text
    (:func:`~pneumodet.textsafe.display_path`)."""
    chosen = {p.key for p in result.submission_rows().values()}
    images = [
        {
            "patientId": p.patient_id,
            "studyInstanceUID": p.study_instance_uid,
            "seriesInstanceUID": p.series_instance_uid,
            "sopInstanceUID": p.sop_instance_uid,
            "source": display_path(p.source),
            "overlay": overlay_filename(p) if result.overlay_dir is not None else None,
            "in_submission": p.key in chosen,
            "original_size": list(p.original_size),
            "boxes": [[round(v, 2) for v in row[1:]] for row in p.boxes.tolist()],
            "scores": [round(row[0], 5) for row in p.boxes.tolist()],
            "class_probs": {name: round(v, 5) for name, v in
                            zip(CLASS_NAMES, p.class_probs.tolist(), strict=True)},
        }
        for p in result.predictions.values()
    ]
    return {
        "box_format": "x, y, width, height in original image pixels (top-left corner)",
        "threshold": result.threshold,
        "tta": result.tta,
        "gate": result.gate,
        "precision": result.precision,
        "files_found": result.files_found,
        "submission_merge": SUBMISSION_MERGE,
        "images": images,
        "unreadable": [{"path": display_path(u.path), "cause": display_text(u.cause)}
                       for u in result.unreadable],
        "duplicates": [{"patientId": d.patient_id, "path": display_path(d.path), "kept": display_path(d.kept),
                        "same": d.same} for d in result.duplicates],
        "symlinks_not_followed": [display_path(p) for p in result.skipped_links],
        "warnings": [display_text(w) for w in result.warnings],
    }


def write_prediction_json(result: PredictionResult, path: Path | str) -> Path:
    """Write :func:`prediction_json` atomically (a full disk leaves the previous file as it was)."""
    return write_json(path, prediction_json(result), indent=1)


def write_prediction_submission(result: PredictionResult, path: Path | str) -> Path:
    """The Kaggle CSV (``patientId,PredictionString``): one row per patient, see :data:`SUBMISSION_MERGE`."""
    from pneumodet.submission import write_submission

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.submission_boxes()
    write_submission(path, rows, patient_ids=list(rows))
    return path


# ---------------------------------------------------------------- ONNX
#: Output names of the exported graph, in order.
ONNX_OUTPUTS: tuple[str, ...] = ("cls_logits", "box_deltas", "global_logits", "anchors")
ONNX_FORMAT = "pneumodet-onnx-1"


class OnnxNetwork(nn.Module):
    """The network with plain tensor outputs, for export; the anchors (fixed by ``S``) are a constant."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        anchors, per_level = model.anchor_generator(image_size, image_size, torch.device("cpu"))
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.anchors_per_level = tuple(int(n) for n in per_level)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images ``[B, 1, S, S]`` -> cls_logits ``[B, A]``, box_deltas ``[B, A, 4]``, global_logits ``[B, C]``,
        anchors ``[A, 4]``."""
        out = self.model(images)
        return out.cls_logits, out.box_deltas, out.global_logits, self.anchors.clone()  # an op: the tracer needs one


@dataclass(frozen=True)
class OnnxExport:
    """Where :func:`export_onnx` wrote the graph and its side file, and the input side it fixed."""

    path: Path
    side_file: Path
    image_size: int
    num_anchors: int

    def summary(self) -> str:
        side = self.image_size
        return (f"wrote {display_path(self.path)} (input images [B, 1, {side}, {side}] in [0, 1], "
                f"{self.num_anchors} anchors) and {display_path(self.side_file)}")


def onnx_side_file(onnx_path: Path | str) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def export_onnx(model_source: Path | str, out_path: Path | str, *, image_size: int | None = None,
                opset: int = 17) -> OnnxExport:
    """Export the network (no decoding) to ONNX with a dynamic batch axis; see the module docstring.

    Args:
        model_source: a training run directory (its ``best_model.pt``) or a checkpoint file.
        out_path: the ``.onnx`` file; the side file :func:`onnx_side_file` goes next to it.
        image_size: input side ``S`` (default: the size the model was trained at).
        opset: ONNX opset, one of :func:`onnx_opsets`.

    Both files are written to temporary files and renamed into place only when both are complete: a
    full disk or an interruption leaves the previous pair as it was.
    """
    if opset not in onnx_opsets():
        newest = onnx_opsets()[-1]
        raise ConfigError(f"ONNX opset {opset} is not supported: choose {MIN_ONNX_OPSET} to {newest} "
                          "(default 17)")
    model, extra = load_for_inference(model_source)
    size = int(image_size) if image_size is not None else model_image_size(model, extra)
    if size < 2 ** max(model.config.pyramid_levels):
        raise ConfigError(f"image_size {size} is smaller than the coarsest pyramid stride "
                          f"{2 ** max(model.config.pyramid_levels)}")
    network = OnnxNetwork(model.float().eval(), size).eval()
    out_path = Path(out_path)
    side = {
        "format": ONNX_FORMAT,
        "image_size": size,
        "input": f"images: float32 [B, 1, {size}, {size}], grey pixels / 255 after area resize",
        "outputs": list(ONNX_OUTPUTS),
        "anchors_per_level": list(network.anchors_per_level),
        "class_names": list(CLASS_NAMES),
        "threshold": extra.get("threshold"),
        "model_config": model.config.to_dict(),
    }
    side_file = onnx_side_file(out_path)
    # the side file is renamed first, the graph last: both are complete before either replaces its old file
    with atomic_path(out_path) as graph_tmp:
        _export_graph(network, size, graph_tmp, opset)
        write_json(side_file, side, indent=1)
    return OnnxExport(out_path, side_file, size, int(network.anchors.shape[0]))


#: The oldest opset whose Resize matches PyTorch's nearest-neighbour upsampling (the FPN's); opsets 9 and
#: 10 export, but their Upsample may not give PyTorch's results.
MIN_ONNX_OPSET = 11


def onnx_opsets() -> range:
    """The opsets :func:`export_onnx` accepts: :data:`MIN_ONNX_OPSET` to the newest the TorchScript exporter
    supports (20 in torch 2.x; it writes newer numbers with a warning, unsupported)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest
    except ImportError:  # a private module: fall back to torch 2.x's value
        newest = 20
    return range(MIN_ONNX_OPSET, int(newest) + 1)


def _export_graph(network: OnnxNetwork, size: int, path: Path, opset: int) -> None:
    batch_axes = {name: {0: "batch"} for name in ("images", *ONNX_OUTPUTS[:3])}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which needs onnxscript.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        # The anchors are meant to be constants of the graph: S is fixed at export.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(network, (torch.rand(2, 1, size, size),), str(path), dynamo=False,
                              input_names=["images"], output_names=list(ONNX_OUTPUTS),
                              dynamic_axes=batch_axes, opset_version=opset, do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as err:  # an operator this opset cannot express
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"ONNX opset {opset} cannot express this network: {first[:300]}") from None


def _read_side_file(side: Path | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(side, dict):
        return side
    try:
        meta = json.loads(Path(side).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{side}: cannot read the ONNX side file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ConfigError(f"{side}: not a pneumodet ONNX side file (format {ONNX_FORMAT!r} expected)")
    return meta


def decode_onnx_outputs(
    outputs: Sequence[np.ndarray | torch.Tensor],
    side: Path | str | dict[str, Any],
    *,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_detections: int | None = None,
) -> list[Detections]:
    """Boxes from the four ONNX outputs, by the same decoding as :meth:`PneumoRetinaNet.detect`.

    Args:
        outputs: ``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits [B, C]``,
            ``anchors [A, 4]`` (numpy or torch), in :data:`ONNX_OUTPUTS` order.
        side: the side file written by :func:`export_onnx` (path or its parsed dict).
        score_thresh, nms_thresh, max_detections: override the model configuration's values.

    Returns:
        One :class:`~pneumodet.model.Detections` per image: boxes ``[N, 4]`` xyxy in ``S x S`` input
        pixels, scores ``[N]``, class probabilities ``[C]``.
    """
    from pneumodet.model import BoxCoder, HeadOutputs, ModelConfig
    from pneumodet.model.retinanet import postprocess

    meta = _read_side_file(side)
    config = ModelConfig.from_dict(meta["model_config"])
    if len(outputs) != len(ONNX_OUTPUTS):
        raise ConfigError(f"expected the {len(ONNX_OUTPUTS)} ONNX outputs {ONNX_OUTPUTS}, got {len(outputs)}")
    cls_logits, box_deltas, global_logits, anchors = (torch.as_tensor(np.asarray(o)) for o in outputs)
    size = int(meta["image_size"])
    head = HeadOutputs(cls_logits, box_deltas, global_logits, anchors.float(),
                       tuple(meta["anchors_per_level"]), (size, size))
    return postprocess(
        head, BoxCoder(),
        score_thresh=config.score_thresh if score_thresh is None else score_thresh,
        nms_thresh=config.nms_thresh if nms_thresh is None else nms_thresh,
        topk_per_level=config.topk_per_level,
        max_detections=config.max_detections if max_detections is None else max_detections,
    )


def run_onnx(onnx_path: Path | str, images: np.ndarray, **decode_options: Any) -> list[Detections]:
    """End to end with onnxruntime: ``images`` float32 ``[B, 1, S, S]`` in ``[0, 1]`` -> detections
    (see :func:`decode_onnx_outputs`)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("running an ONNX model needs onnxruntime (pip install onnxruntime)") from exc
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(ONNX_OUTPUTS), {"images": np.ascontiguousarray(images, dtype=np.float32)})
    return decode_onnx_outputs(outputs, onnx_side_file(onnx_path), **decode_options)
