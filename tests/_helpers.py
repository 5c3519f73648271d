"""Helpers shared by the tests: comparing detections as sets, never by position.

Two runs of the same network (eager and compiled, PyTorch and ONNX, folded and unfolded batch norm)
give the same boxes up to rounding, but boxes whose scores are equal to six digits may come out in
either order, and a box whose score sits at a top-k or threshold cut may be in one list and not the
other. :func:`assert_same_detections` pairs the boxes by overlap (an optimal assignment) and checks each
pair within tolerances; only boxes at the lowest score of their list may be left unpaired.
"""

from __future__ import annotations

import re

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[N, M]`` of xyxy boxes ``a [N, 4]`` and ``b [M, 4]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def assert_same_detections(got_boxes, got_scores, want_boxes, want_scores, *, box_atol: float,
                           score_atol: float, min_iou: float = 0.5, cut: bool = True) -> None:
    """``got`` and ``want`` hold the same detections, in any order.

    Boxes are xyxy ``[N, 4]`` (tensors or arrays), scores ``[N]``. Each wanted box is paired with one got
    box (overlap at least ``min_iou``, every coordinate within ``box_atol``, score within ``score_atol``),
    maximising the total overlap. With ``cut``, boxes left unpaired are allowed when their score is within
    ``score_atol`` of the lowest score of their list (a top-k or threshold cut between near-equal scores),
    as many on each side; without it, every box must be paired.
    """
    gb, gs = _as_numpy(got_boxes).reshape(-1, 4), _as_numpy(got_scores).reshape(-1)
    wb, ws = _as_numpy(want_boxes).reshape(-1, 4), _as_numpy(want_scores).reshape(-1)
    assert len(gb) == len(gs) and len(wb) == len(ws)
    if len(gb) == 0 or len(wb) == 0:
        assert len(gb) == len(wb), f"{len(gb)} boxes, {len(wb)} expected"
        return
    iou = box_iou(wb, gb)
    feasible = ((iou >= min_iou)
                & (np.abs(wb[:, None, :] - gb[None, :, :]).max(-1) <= box_atol)
                & (np.abs(ws[:, None] - gs[None, :]) <= score_atol))
    cost = np.where(feasible, -iou, 1e6)
    rows, cols = linear_sum_assignment(cost)
    paired = [(r, c) for r, c in zip(rows, cols, strict=True) if feasible[r, c]]
    lone_want = sorted(set(range(len(wb))) - {r for r, _ in paired})
    lone_got = sorted(set(range(len(gb))) - {c for _, c in paired})
    detail = (f"unpaired expected {[(wb[i].round(2).tolist(), round(float(ws[i]), 6)) for i in lone_want]}, "
              f"unpaired got {[(gb[i].round(2).tolist(), round(float(gs[i]), 6)) for i in lone_got]}")
    if not cut:
        assert not lone_want and not lone_got, detail
        return
    assert len(lone_want) == len(lone_got), detail
    assert all(ws[i] <= ws.min() + score_atol for i in lone_want), detail
    assert all(gs[i] <= gs.min() + score_atol for i in lone_got), detail


def kaggle_to_xyxy(rows) -> tuple[np.ndarray, np.ndarray]:
    """Kaggle rows ``[M, 5]`` (confidence, x, y, width, height) -> xyxy boxes ``[M, 4]`` and scores ``[M]``."""
    rows = _as_numpy(rows).reshape(-1, 5)
    boxes = np.concatenate([rows[:, 1:3], rows[:, 1:3] + rows[:, 3:5]], axis=1)
    return boxes, rows[:, 0]


def make_run(root, patients, *, threshold: float, size: int = 64):
    """A run folder that ``evaluate`` accepts, without training: the Kaggle-layout data of ``patients``
    (see ``badinputs.write_dataset``), a split, a random resnet18 ``size``-px best model recording
    ``threshold``, and its config. Returns the run folder (``root / "run"``)."""
    from pathlib import Path

    import torch

    from badinputs import write_dataset
    from pneumodet.cli import main
    from pneumodet.config import TrainConfig
    from pneumodet.model import ModelConfig, build_model, save_checkpoint
    from pneumodet.rundir import RunDir

    root = Path(root)
    data = write_dataset(root / "data", patients, size=size)
    split = root / "split"
    assert main(["split", str(data), "--out", str(split), "--val", "0.25", "--test", "0.25"]) == 0
    run = RunDir(root / "run")
    torch.manual_seed(0)
    save_checkpoint(run.best_model, build_model(ModelConfig(encoder="resnet18", image_size=size)),
                    extra={"threshold": threshold, "image_size": size})
    TrainConfig.with_recipe("default", data_dir=str(data), split_dir=str(split), out_dir=str(run.root),
                            cache_dir=str(root / "cache"), encoder="resnet18", image_size=size).to_yaml(run.config)
    return run.root


def assert_one_line_error(code: int, err: str, command: str, *patterns: str) -> str:
    """Exit 2, a single ``pneumodet COMMAND: error: ...`` line, no traceback, every regex in it; the line."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"pneumodet {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def spread_model(size: int):
    """A random resnet18 for ``size``-px input whose box scores spread around 0.5 (instead of the focal-loss
    prior's 0.01), so that thresholds, NMS and top-k all have work to do. Seeded: the same model each call."""
    import torch

    from pneumodet.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=size))
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    return model


def write_spread_run(folder, size: int, threshold: float = 0.5, **extra):
    """A run folder holding only :func:`spread_model` as its best model, recording ``threshold`` (and
    ``extra``, e.g. ``gate_threshold``): what ``predict`` needs (``evaluate`` needs :func:`make_run`).
    Returns the folder."""
    from pneumodet.model import save_checkpoint
    from pneumodet.rundir import RunDir

    run = RunDir(folder)
    save_checkpoint(run.best_model, spread_model(size), extra={"threshold": threshold, "image_size": size,
                                                                "val_map": 0.0, "epoch": 0, "encoder": "resnet18",
                                                                **extra})
    return run.root
