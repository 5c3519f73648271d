"""The patient record: the unit every later stage (split, cache, dataset, metric) works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The three RSNA classes, in the index order used by the global classification head.
CLASS_NAMES: tuple[str, ...] = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
#: Each class's name on a plot axis (the third in full is too long for a tick label).
CLASS_SHORT_NAMES: dict[str, str] = {**{name: name for name in CLASS_NAMES},
                                     "No Lung Opacity / Not Normal": "No LO / Not Normal"}
#: Index of "Lung Opacity" in the global head's probabilities (the gate's class; images are ranked by it).
OPACITY_INDEX = CLASS_INDEX["Lung Opacity"]
#: RSNA images are 1024 x 1024; the labels CSV carries no size, so boxes are checked against this.
RSNA_IMAGE_SIZE = 1024


def gate_scores(scores: Any, class_probs: Any) -> Any:
    """The gate (``--gate``): each box score of an image times the image's Lung-Opacity probability.

    ``scores`` ``[N]`` and ``class_probs`` ``[C]`` (:data:`CLASS_NAMES` order), numpy or torch alike. Training
    chooses a threshold for these gated scores on validation as well as for the plain ones, since gating
    lowers every score."""
    return scores * class_probs[OPACITY_INDEX]


@dataclass(frozen=True)
class PatientRecord:
    """One patient: class, target and all of its boxes.

    ``boxes`` are Pascal VOC pixels in the original image, ``(xmin, ymin, xmax, ymax)``,
    one tuple per labelled box (0 to 4 in RSNA).
    """

    patient_id: str
    label_class: str
    target: int
    boxes: tuple[tuple[float, float, float, float], ...] = field(default_factory=tuple)
    image_path: Path | None = None

    @property
    def class_index(self) -> int:
        return CLASS_INDEX[self.label_class]

    def boxes_array(self) -> np.ndarray:
        """Boxes as a float32 array of shape ``[N, 4]`` (xyxy), ``[0, 4]`` when there are none."""
        return np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
