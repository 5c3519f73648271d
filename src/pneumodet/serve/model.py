"""The served model: loaded once, its identity and model card, and what turns uploads into answers.

:class:`ServedModel` holds the network (a :class:`~pneumodet.inference.Predictor`), the run's validation
threshold and what is known about the run. Its three steps run in worker threads, never on the event loop:

1. :meth:`ServedModel.decode`: one uploaded file -> :class:`DecodedImage` (the DICOM read by
   :func:`~pneumodet.data.dicom.read_dicom`, the model input, a preview PNG when asked), or
   :class:`UnreadableUpload` naming the file;
2. :meth:`ServedModel.run_batch`: model inputs of any number of requests -> raw predictions (the
   batcher's one worker thread);
3. :meth:`ServedModel.answer`: one image's raw prediction -> its JSON entry, boxes in the original
   image's pixels at the request's threshold.

Privacy: the answer carries the linkage identifiers only (PatientID and the study, series and SOP
Instance UIDs, which link a result to its image), and the model card only aggregate counts of what the
model was trained on (patients per set from ``split.json``), never a patient's data.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumodet import __version__
from pneumodet.clinical.identity import AlgorithmIdentity
from pneumodet.clinical.sr import image_objects
from pneumodet.config import TrainConfig
from pneumodet.data.dicom import read_dicom
from pneumodet.data.records import CLASS_NAMES
from pneumodet.data.split import SPLIT_JSON
from pneumodet.errors import CheckpointError, DicomReadError, PneumodetError
from pneumodet.evaluation import METRICS_FILE
from pneumodet.inference import (
    ImagePrediction,
    Predictor,
    RawPrediction,
    boxes_to_original,
    load_for_inference,
    model_image_size,
    prepare_image,
    resolve_checkpoint,
    xyxy_to_kaggle,
)
from pneumodet.rundir import RunDir
from pneumodet.safeio import file_sha256
from pneumodet.textsafe import display_path, display_text

#: The longest side of a preview PNG (the review page draws on it; boxes stay in original pixels).
PREVIEW_MAX_SIDE = 768
BOX_FORMAT = "x, y, width, height in original image pixels (top-left corner)"
#: Test-set figures copied from ``evaluate``'s metrics.json into the model card (an allow-list).
_EVAL_KEYS = ("rsna_map", "images", "images_scored", "threshold")
_EVAL_CLASS_KEYS = ("accuracy", "pneumonia_auc")


class UnreadableUpload(Exception):
    """An uploaded file that is not a usable DICOM image: ``name`` as the client sent it, and why."""

    def __init__(self, name: str, cause: str) -> None:
        self.name, self.cause = name, cause
        super().__init__(f"{name}: {cause}")


@dataclass
class DecodedImage:
    """One uploaded image, ready for the model (``image``: float ``[1, S, S]``)."""

    name: str
    source: Path  # the temporary copy of the upload (the SR reads its header again)
    image: torch.Tensor
    original_size: tuple[int, int]  # (height, width)
    patient_id: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    notes: list[str] = field(default_factory=list)
    preview: dict[str, Any] | None = None


def preview_png(pixels: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> dict[str, Any]:
    """The decoded image (uint8 ``[H, W]``, already windowed by ``read_dicom`` as the EDA report shows it)
    as a PNG data URL at most ``max_side`` pixels on its longest side (never enlarged), with its size."""
    from PIL import Image

    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = Image.fromarray(pixels, mode="L")
    if size != (w, h):
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return {"png": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
            "width": size[0], "height": size[1]}


class ServedModel:
    """A run (folder or checkpoint file) loaded once for serving.

    Raises (at construction, before anything listens): :class:`~pneumodet.errors.CheckpointError` for a
    missing or unusable checkpoint or one without a validation threshold, :class:`ConfigError` for an
    unusable device or precision.
    """

    def __init__(self, model_source: Path | str, *, device: str | torch.device | None = "auto",
                 precision: str | None = None) -> None:
        self.source = Path(model_source)
        self.checkpoint = resolve_checkpoint(model_source)
        self.sha256 = file_sha256(self.checkpoint)  # before loading: the identity of the bytes that are served
        model, extra = load_for_inference(self.checkpoint)
        threshold = extra.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise CheckpointError(f"{display_path(self.checkpoint)}: records no usable validation threshold "
                                  f"({display_text(repr(threshold))[:80]}); serve answers at the threshold chosen "
                                  "on validation")
        self.threshold = float(threshold)
        self.image_size = model_image_size(model)
        self.encoder = str(getattr(getattr(model, "config", None), "encoder", extra.get("encoder", "unknown")))
        self.extra = extra
        self.predictor = Predictor(model, self.image_size, device=device, precision=precision)

    # ------------------------------------------------------------------ identity
    @property
    def identity(self) -> dict[str, Any]:
        """Which model answered: in every prediction response."""
        val_map = self.extra.get("val_map")
        return {"name": "pneumodet", "version": __version__, "encoder": self.encoder,
                "image_size": self.image_size, "checkpoint": self.checkpoint.name,
                "checkpoint_sha256": self.sha256,
                "validation_map": float(val_map) if isinstance(val_map, int | float) else None,
                "validation_threshold": self.threshold, "precision": self.predictor.precision,
                "device": str(self.predictor.device)}

    def model_card(self) -> dict[str, Any]:
        """``GET /v1/model``: the identity, the classes, the run's metrics and what it was trained on.

        Read from the run folder when serving one (config, ``done.json``, the split's ``split.json``,
        ``evaluate``'s test metrics); what cannot be read is listed under ``notes``, never fatal.
        """
        card: dict[str, Any] = {**self.identity, "classes": list(CLASS_NAMES), "box_format": BOX_FORMAT,
                                "threshold_source": "chosen on the validation set during training"}
        epoch = self.extra.get("epoch")
        metrics: dict[str, Any] = {"validation": {"rsna_map": card["validation_map"],
                                                  "threshold": self.threshold,
                                                  # the checkpoint counts from 0 (Lightning); people from 1
                                                  "epoch": epoch + 1 if isinstance(epoch, int) else None}}
        notes: list[str] = []
        training: dict[str, Any] = {}
        if self.source.is_dir():
            _read_run(RunDir(self.source), training, metrics, notes)
        else:
            notes.append("served from a checkpoint file: no run folder to describe the training")
        card.update(metrics=metrics, training=training, notes=notes)
        return card

    # ------------------------------------------------------------------ the three steps
    def decode(self, name: str, path: Path, *, preview: bool = False) -> DecodedImage:
        """Read one uploaded file (saved at ``path``) for the model.

        Raises:
            UnreadableUpload: not a DICOM, broken, or not an image pneumodet can read; names ``name``.
        """

        try:
            pixels, meta = read_dicom(path)
            image = prepare_image(pixels, self.image_size)
        except DicomReadError as exc:
            raise UnreadableUpload(name, exc.cause) from None
        except Exception as exc:  # noqa: BLE001 - an upload must never become a 500; its cause is answered
            raise UnreadableUpload(name, f"{type(exc).__name__}: {display_text(str(exc))[:300]}") from None
        pid = meta.get("patient_id")
        return DecodedImage(
            name=name, source=path, image=image, original_size=(int(pixels.shape[0]), int(pixels.shape[1])),
            patient_id=(str(pid).strip() or None) if pid is not None else None,
            sop_instance_uid=meta.get("sop_instance_uid"), study_instance_uid=meta.get("study_instance_uid"),
            series_instance_uid=meta.get("series_instance_uid"), notes=list(meta.get("image_notes") or []),
            preview=preview_png(pixels) if preview else None)

    def run_batch(self, images: list[torch.Tensor]) -> list[RawPrediction]:
        """Model inputs ``[1, S, S]`` of one batch -> raw predictions (boxes in model-input pixels)."""
        return self.predictor(torch.stack(images))

    def warm_up(self) -> None:
        """One forward pass, so that the first request does not pay for lazy initialisation."""
        self.run_batch([torch.zeros(1, self.image_size, self.image_size)])

    def prediction(self, decoded: DecodedImage, raw: RawPrediction, threshold: float) -> ImagePrediction:
        """One image's boxes at ``threshold``, in the original image's pixels, sorted by score."""
        keep = raw.scores >= threshold
        boxes = boxes_to_original(raw.boxes[keep], decoded.original_size, self.image_size)
        return ImagePrediction(decoded.patient_id or "", xyxy_to_kaggle(boxes, raw.scores[keep]),
                               raw.class_probs.numpy().astype(np.float32), decoded.source, decoded.original_size,
                               decoded.sop_instance_uid, decoded.study_instance_uid, decoded.series_instance_uid)

    def answer(self, decoded: DecodedImage, prediction: ImagePrediction) -> dict[str, Any]:
        """One image's JSON entry (keys as in ``predict --json``, plus the file name the client sent)."""
        rows = prediction.boxes.tolist()

        def text(value: str | None) -> str | None:  # one printable line, whatever bytes a header held
            return None if value is None else display_text(value)

        entry = {
            "file": decoded.name,
            "patientId": text(decoded.patient_id),
            "studyInstanceUID": text(decoded.study_instance_uid),
            "seriesInstanceUID": text(decoded.series_instance_uid),
            "sopInstanceUID": text(decoded.sop_instance_uid),
            "original_size": list(decoded.original_size),
            "boxes": [[round(v, 2) for v in row[1:]] for row in rows],
            "scores": [round(row[0], 5) for row in rows],
            "class_probs": {name: round(v, 5) for name, v in
                            zip(CLASS_NAMES, prediction.class_probs.tolist(), strict=True)},
            "notes": decoded.notes,
        }
        if decoded.preview is not None:
            entry["preview"] = decoded.preview
        return entry

    # ------------------------------------------------------------------ DICOM SR
    def structured_report(self, prediction: ImagePrediction, threshold: float) -> bytes:
        """The DICOM SR (TID 1500, see :mod:`pneumodet.clinical.sr`) of one prediction, as file bytes.

        Raises:
            PneumodetError: the image cannot be referenced by an SR (no UIDs, for one).
        """

        identity = AlgorithmIdentity.for_prediction(self.sha256, threshold=threshold, tta=None, gate=False,
                                                    precision=self.predictor.precision)
        report = image_objects(prediction, identity).report
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


# ---------------------------------------------------------------- the run, for the model card
def _read_json(path: Path) -> dict[str, Any]:
    payload = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(payload, dict):
        raise ValueError("a JSON object was expected")
    return payload


def _read_run(run: RunDir, training: dict[str, Any], metrics: dict[str, Any], notes: list[str]) -> None:
    """Fill the card's ``training`` and ``metrics`` from the run folder (allow-listed fields only)."""

    try:
        config = TrainConfig.from_yaml(run.config, stored_run=True)
    except (PneumodetError, OSError) as exc:
        notes.append(f"run config unreadable: {display_text(str(exc))[:200]}")
    else:
        training.update(data=Path(config.data_dir).name or None, augmentation=config.aug, epochs=config.epochs,
                        recipe=config.recipe, batch_size=config.batch_size)
        split = Path(config.split_dir) / SPLIT_JSON if config.split_dir else None
        try:
            if split is None:
                raise FileNotFoundError("no split folder recorded")
            meta = _read_json(split)
            training["split"] = {key: meta[key] for key in ("patients", "boxes", "classes") if key in meta}
        except (OSError, ValueError) as exc:
            notes.append(f"split description unreadable (patient counts unknown): {type(exc).__name__}")
    try:
        done = run.read_done()
    except PneumodetError:
        notes.append(f"the run has no readable {run.done.name} (not finished, or damaged)")
    else:
        training.update({key: done[key] for key in ("epochs", "steps", "precision", "encoder_weights")
                         if key in done})
        if isinstance(done.get("best_val_map"), int | float):
            metrics["validation"]["best_rsna_map"] = done["best_val_map"]
    evaluation = run.eval_dir("test") / METRICS_FILE
    if evaluation.is_file():
        try:
            found = _read_json(evaluation)
        except (OSError, ValueError):
            notes.append("the test evaluation's metrics are unreadable")
        else:
            test = {key: found[key] for key in _EVAL_KEYS if key in found}
            classes = found.get("global_class") if isinstance(found.get("global_class"), dict) else {}
            test.update({key: classes[key] for key in _EVAL_CLASS_KEYS if key in classes})
            metrics["test"] = test
