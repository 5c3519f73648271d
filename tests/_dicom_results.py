"""Helpers for the tests of pneumodet's DICOM results (SR, presentation states) and of the PACS round trip.

The SR and PR are read back with pydicom alone (a walk over the content tree), not with highdicom that
wrote them, and validated with dicom3tools' ``dciodvfy``, an independent implementation of the IODs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: A tiny model's threshold at which the 16 real images get 0 to about 50 boxes each (scores of the random
#: resnet18 below spread from 0.55 to 0.58).
TINY_THRESHOLD = "0.57"


def tiny_checkpoint(path: Path, *, size: int = 64) -> Path:
    """A random resnet18 RetinaNet at ``size`` px (seed 0) whose box scores spread a little around 0.56."""
    import torch

    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=size))
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    return save_checkpoint(path, model, extra={"threshold": 0.5, "image_size": size})


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy`` (dicom3tools) that start with ``Error`` for the file ``path``."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: scripts/install-system-deps.sh")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _code(item: Any, sequence: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    codes = item.get(sequence)
    return (str(codes[0].CodeValue), str(codes[0].CodingSchemeDesignator)) if codes else None


def _walk(items: Any):
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def sr_content(ds: Any) -> dict[str, Any]:
    """What an SR says, read with pydicom: ``boxes`` float ``[M, 5]`` (certainty, x, y, w, h) from each ROI
    group's closed polyline, the SOP Instance UIDs its regions reference, the class probabilities by code
    meaning, the algorithm's name/version/parameters and the observer type."""
    boxes, referenced, probabilities, algorithm = [], set(), {}, {"parameters": []}
    observer = None
    for item in _walk(ds.ContentSequence):
        name = _code(item)
        if name == ("121005", "DCM"):  # Observer Type
            observer = _code(item, "ConceptCodeSequence")
        if name == ("111001", "DCM"):
            algorithm["name"] = str(item.TextValue)
        if name == ("111003", "DCM"):
            algorithm["version"] = str(item.TextValue)
        if name == ("111002", "DCM"):
            algorithm["parameters"].append(str(item.TextValue))
        if name != ("125007", "DCM"):  # Measurement Group
            continue
        group = list(item.ContentSequence)
        findings = [g for g in group if _code(g) == ("121071", "DCM")]  # Finding
        scoords = [g for g in group if g.ValueType == "SCOORD"]
        nums = {_code(g): float(g.MeasuredValueSequence[0].NumericValue)
                for g in group if g.ValueType == "NUM"}
        if scoords:
            (scoord,) = scoords
            assert scoord.GraphicType == "POLYLINE"
            points = np.asarray(scoord.GraphicData, np.float64).reshape(-1, 2)
            assert points.shape == (5, 2) and np.array_equal(points[0], points[-1]), points  # closed
            x1, y1 = points[:4].min(0)
            x2, y2 = points[:4].max(0)
            boxes.append([nums[("111012", "DCM")], x1, y1, x2 - x1, y2 - y1])
            referenced |= {str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                           for ref in scoord.ContentSequence}
            assert _code(findings[0], "ConceptCodeSequence") == ("233604007", "SCT")
        else:
            probabilities[str(findings[0].ConceptCodeSequence[0].CodeMeaning)] = nums[("122157", "DCM")]
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 5), "referenced": referenced,
            "probabilities": probabilities, "algorithm": algorithm, "observer": observer}


def pr_content(ds: Any) -> dict[str, Any]:
    """What a presentation state draws: the closed polylines as xywh ``[M, 4]``, its texts, and the images it
    applies to."""
    boxes, texts, referenced = [], [], set()
    for annotation in ds.GraphicAnnotationSequence:
        referenced |= {str(ref.ReferencedSOPInstanceUID) for ref in annotation.ReferencedImageSequence}
        for graphic in annotation.get("GraphicObjectSequence", []):
            points = np.asarray(graphic.GraphicData, np.float64).reshape(-1, 2)
            assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
            (x1, y1), (x2, y2) = points[:4].min(0), points[:4].max(0)
            boxes.append([x1, y1, x2 - x1, y2 - y1])
        texts += [str(text.UnformattedTextValue) for text in annotation.get("TextObjectSequence", [])]
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 4), "texts": texts, "referenced": referenced}


def referenced_image(ds: Any) -> str:
    """The SOP Instance UID of the one image an SR or a presentation state is about."""
    if ds.Modality == "PR":
        (sop,) = pr_content(ds)["referenced"]
    else:  # an SR without boxes references its image only in its evidence
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        (sop,) = sr_content(ds)["referenced"] or {evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}
    return str(sop)


def all_values(ds: Any) -> list[tuple[str, str]]:
    """Every element of ``ds`` (nested ones too) as ``(keyword or tag, value as text)``."""
    return [(elem.keyword or str(elem.tag), str(elem.value)) for elem in ds.iterall()]
