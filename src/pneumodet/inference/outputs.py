"""What ``predict`` writes: the Kaggle submission, the per-image JSON and the overlay pictures.

Every file is written atomically (:mod:`pneumodet.safeio`); paths and ids in the JSON are display text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumodet.data.records import CLASS_NAMES
from pneumodet.inference.results import SUBMISSION_MERGE, ImagePrediction, PredictionResult
from pneumodet.safeio import atomic_path, write_json
from pneumodet.submission import write_submission
from pneumodet.textsafe import display_path, display_text

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


#: Colours of an overlay: predicted boxes and their scores, ground-truth boxes, text backgrounds.
PREDICTED_COLOUR = (255, 40, 40)
TRUTH_COLOUR = (40, 220, 40)
_TEXT_BACKGROUND = (0, 0, 0)


def draw_overlay(pixels: np.ndarray, prediction: ImagePrediction, truth: np.ndarray | None = None) -> Image.Image:
    """The grey image (uint8 ``[H, W]``) as RGB with the boxes, their scores and the class probabilities.

    ``truth``: the patient's ground-truth boxes (float ``[M, 4]`` x, y, w, h in the image's pixels, as
    :func:`pneumodet.submission.read_ground_truth` gives them), drawn in green under the predicted (red)
    ones; ``None``: no labels were given. Text is sized to the image (1/48 of its longer side) on a dark
    box, so it stays readable over bright lungs. Only the patient id is written; nothing else from the
    DICOM header reaches the picture.
    """
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    font = ImageFont.load_default(size=max(10, side // 48))
    line = max(1, side // 256)
    for x, y, w, h in ([] if truth is None else np.asarray(truth, dtype=np.float64).reshape(-1, 4).tolist()):
        draw.rectangle((x, y, x + w, y + h), outline=TRUTH_COLOUR, width=line)
    for conf, x, y, w, h in prediction.boxes.tolist():
        draw.rectangle((x, y, x + w, y + h), outline=PREDICTED_COLOUR, width=line)
        origin = (x + line, max(0.0, y - font.size - 3 * line))
        label = f"{conf:.2f}"
        left, top, right, bottom = draw.textbbox(origin, label, font=font)
        draw.rectangle((left - line, top - line, right + line, bottom + line), fill=_TEXT_BACKGROUND)
        draw.text(origin, label, fill=PREDICTED_COLOUR, font=font)
    legend = [prediction.patient_id] + [f"{name}: {p:.2f}" for name, p in
                                        zip(CLASS_NAMES, prediction.class_probs.tolist(), strict=True)]
    if truth is not None:
        legend.append(f"ground truth (green): {len(np.asarray(truth).reshape(-1, 4))} box(es)")
    origin = (line * 4, line * 4)
    text = "\n".join(legend)
    draw.rectangle(draw.multiline_textbbox(origin, text, font=font), fill=(0, 0, 0))  # legible over boxes
    draw.multiline_text(origin, text, fill=(255, 220, 0), font=font)
    return image


def write_overlay(folder: Path, pixels: np.ndarray, prediction: ImagePrediction,
                  truth: np.ndarray | None = None) -> Path:
    """:func:`draw_overlay` written atomically as ``folder/``:func:`overlay_filename`; returns its path."""
    path = folder / overlay_filename(prediction)
    with atomic_path(path) as tmp:  # the temporary name has no .png: say the format
        draw_overlay(pixels, prediction, truth).save(tmp, format="PNG")
    return path


@dataclass(frozen=True)
class OverlayWriter:
    """Where ``predict`` writes its overlays, and the ground truth drawn on them.

    ``truth``: patient id -> boxes (:func:`pneumodet.submission.read_ground_truth`), or ``None`` when no
    labels were given; a patient the labels do not hold gets no ground truth drawn.
    """

    folder: Path
    truth: Mapping[str, np.ndarray] | None = None

    def write(self, pixels: np.ndarray, prediction: ImagePrediction) -> Path:
        """:func:`write_overlay` of ``prediction`` with its patient's ground truth, if known."""
        truth = None if self.truth is None else self.truth.get(prediction.patient_id)
        return write_overlay(self.folder, pixels, prediction, truth)


def prediction_json(result: PredictionResult) -> dict[str, Any]:
    """The result as plain JSON data: how it was predicted (threshold, TTA and its merge, gate, precision,
    the resolved ``postprocess``: NMS IoU, max detections, min score), one entry per image (patient id,
    DICOM UIDs, source file, boxes, scores, class probabilities, whether it makes its patient's submission
    row, its overlay's file name), then every input that gave no prediction. Paths are display text
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
        "tta_merge": result.tta_merge,
        "gate": result.gate,
        "precision": result.precision,
        # as evaluate's metrics.json: the NMS IoU, boxes per image and candidate score this prediction used
        "postprocess": dict(result.postprocess),
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.submission_boxes()
    write_submission(path, rows, patient_ids=list(rows))
    return path
