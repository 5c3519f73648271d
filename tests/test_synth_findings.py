"""The synthetic "No Lung Opacity / Not Normal" class is visible at the sizes a network trains on: its
findings (a tube or line, nodules, cardiomegaly) change enough pixels for the global image-class head to
tell it from "Normal" (they were 1-2 pixels wide at 128 px, and the head's 3-class accuracy stayed near 0.5)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumodet.data import synth
from pneumodet.data.synth import sample_patients


def _finding_pixels(finding: str, size: int, count: int = 12) -> list[int]:
    """Pixels where each of ``count`` patients' drawn ``finding`` adds more than 13 grey levels (of 255)."""
    specs = [s for s in sample_patients(400, seed=1) if s.finding == finding][:count]
    pixels = []
    for spec in specs:
        rng = np.random.default_rng(spec.seed)
        canvas = synth._Canvas(size)
        anatomy = synth._sample_anatomy(spec, rng)
        _, lung_field, _ = synth._lungs(canvas, anatomy)
        signal = synth._finding(canvas, anatomy, lung_field, finding, rng)
        pixels.append(int((signal * 255 > 13).sum()))
    return pixels


@pytest.mark.parametrize(("finding", "least"), [("nodule", 40), ("line", 90)])
def test_not_normal_findings_are_visible_at_128_px(finding: str, least: int) -> None:
    pixels = _finding_pixels(finding, 128)
    assert min(pixels) >= 0.5 * least and np.mean(pixels) >= least, pixels


def test_nodules_stay_far_below_a_labelled_opacity() -> None:
    """A nodule (radius <= 3.2 % of the side) is no lung opacity: the smallest real box is ~4x wider."""
    pixels = _finding_pixels("nodule", 128)
    biggest_nodule = 3 * np.pi * (0.032 * 128) ** 2  # three nodules of the largest radius
    assert max(pixels) <= biggest_nodule
    assert np.exp(synth.BOX_LOG_W[0] - 2 * synth.BOX_LOG_W[1]) > 2 * 0.032  # box width 2 sd below the mean
