"""Sample images for the data exploration report: a seeded choice of patients, decoded into captioned thumbnails.

Pixels are decoded with :func:`pneumodet.data.dicom.read_dicom`; a file that cannot be decoded is
returned as ``(path, reason)``, never raised. Captions carry only the patient ID and the allow-listed
header fields (modality, age, sex, view position) besides the labels. What the decoder noted about an
image (a constant image, an unusable VOI LUT or window, extra frames) is kept for :func:`image_notes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pneumodet.data.dicom import read_dicom
from pneumodet.data.records import PatientRecord
from pneumodet.errors import DicomReadError
from pneumodet.textsafe import display_path

__all__ = ["Picture", "choose", "image_notes", "pictures"]

_THUMB_SIZE = 360


@dataclass(frozen=True)
class Picture:
    """One decoded sample image: its record, an RGB thumbnail (boxes drawn or not) and its caption."""

    record: PatientRecord
    thumb: np.ndarray
    caption: str
    constant: bool = False  # every pixel of the decoded image has one value
    notes: tuple[str, ...] = ()  # what read_dicom worked around or found worth a look


def choose(records: Sequence[PatientRecord], n: int, rng: np.random.Generator) -> list[PatientRecord]:
    """``n`` of ``records`` drawn with ``rng``, in their original order (all of them when there are fewer)."""
    if len(records) <= n:
        return list(records)
    return [records[i] for i in sorted(rng.choice(len(records), size=n, replace=False))]


def _thumbnail(image: np.ndarray, boxes: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """A ``[S, S, 3]`` uint8 RGB thumbnail of a ``[H, W]`` uint8 image, ``boxes`` (original px) drawn."""
    h, w = image.shape[:2]
    scale = min(1.0, _THUMB_SIZE / max(h, w))  # never enlarge a small image
    pic = Image.fromarray(image).convert("RGB").resize((round(w * scale), round(h * scale)),
                                                       Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(pic)
    for xmin, ymin, xmax, ymax in boxes:
        draw.rectangle([xmin * scale, ymin * scale, xmax * scale, ymax * scale], outline=(255, 40, 40), width=3)
    return np.asarray(pic)


def _caption(record: PatientRecord, meta: dict[str, Any]) -> str:
    age = meta.get("age")
    age_text = "?" if age is None or pd.isna(age) else f"{age:g}"
    return (f"`{record.patient_id}`\n{meta.get('modality') or '?'} · age {age_text} · "
            f"sex {meta.get('sex') or '?'} · {meta.get('view_position') or '?'}\n"
            f"Target {record.target} · {record.label_class}")


def pictures(records: Sequence[PatientRecord], *,
             draw_boxes: bool) -> tuple[list[Picture], list[tuple[str, str]]]:
    """Decode each record's image into a :class:`Picture`; returns them and ``(path, reason)`` per failure."""
    decoded, failed = [], []
    for rec in records:
        try:
            image, meta = read_dicom(rec.image_path)
        except DicomReadError as exc:
            failed.append((str(rec.image_path), exc.cause))
            continue
        thumb = _thumbnail(image, rec.boxes if draw_boxes else ())
        caption = _caption(rec, meta) + ("\n**constant image**" if meta["constant_image"] else "")
        decoded.append(Picture(rec, thumb, caption, constant=bool(meta["constant_image"]),
                               notes=tuple(meta["image_notes"])))
    return decoded, failed


def image_notes(decoded: Sequence[Picture]) -> pd.DataFrame:
    """One row per note of each image decoded (once per file): ``path, patient_id, constant, note``."""
    seen: dict[str, Picture] = {str(pic.record.image_path): pic for pic in decoded}
    rows = [(display_path(path), pic.record.patient_id, pic.constant, note)
            for path, pic in sorted(seen.items()) for note in pic.notes]
    return pd.DataFrame(rows, columns=["path", "patient_id", "constant", "note"])
