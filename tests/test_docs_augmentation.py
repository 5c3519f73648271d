"""The augmentation tables of README.md and docs/AUGMENTATION.md say what the code draws (``LEVEL_SPECS``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pneumodet.data.levels import LEVEL_SPECS, LevelSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": "## Augmentation levels", "docs/AUGMENTATION.md": "## The levels"}


def _rows(doc: str) -> dict[str, str]:
    """``{level: row text}`` of the first table after the document's heading; a row "as `heavy` + ..." is
    given the rows it refers to as well."""
    text = (ROOT / doc).read_text(encoding="utf-8").split(DOCS[doc], 1)[1]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|(.*)\|\s*$", text, re.M)
            if m.group(1) in LEVEL_SPECS}
    for level, row in rows.items():
        for other in re.findall(r"as `(\w+)`", row):
            rows[level] = rows[level] + " " + rows[other]
    return rows


def _claims(spec: LevelSpec) -> list[str]:
    """What a row must say for ``spec``: each distribution with its parameters, in the tables' notation."""
    claims = []
    if spec.log2_scale_std:
        claims += [f"scale 2^N(0, {spec.log2_scale_std:g})", "per axis"]
    claims.append(f"rotation N(0, {spec.rotation_std:g}°)" if spec.rotation_std else "")
    if spec.shear_std:
        claims.append(f"x-shear N(0, {spec.shear_std:g}°)")
    if spec.max_shift:
        claims.append(f"shift U(±{100 * spec.max_shift:g} %)")
    if spec.flip_p:
        claims.append(f"flip p {spec.flip_p:g}")
    if spec.log2_gamma_std:
        claims.append(f"gamma 2^N(0, {spec.log2_gamma_std:g})")
    if spec.salt_pepper_p:
        claims.append(f"p {spec.salt_pepper_p:g} coarse salt-and-pepper ({100 * spec.salt_pepper_fraction:g} %")
    if spec.blur_p:
        claims.append(f"p {spec.blur_p:g} Gaussian blur σ ~ U(0, {spec.max_blur_sigma:g}) px")
    if spec.noise_p:
        claims.append(f"p {spec.noise_p:g} additive Gaussian noise σ ~ U(0, {spec.max_noise_sigma / 255:g}·255)")
    return [c for c in claims if c]


@pytest.mark.parametrize("doc", sorted(DOCS))
@pytest.mark.parametrize("level", sorted(LEVEL_SPECS))
def test_the_table_states_each_drawn_distribution(doc: str, level: str) -> None:
    row = _rows(doc)[level]
    missing = [claim for claim in _claims(LEVEL_SPECS[level]) if claim not in row]
    assert not missing, f"{doc}, {level}: the table does not say {missing} (row: {row})"
    spec = LEVEL_SPECS[level]
    if spec == LevelSpec():
        assert "nothing random" in row
    elif not spec.rotation_std:
        assert "no rotation" in row
