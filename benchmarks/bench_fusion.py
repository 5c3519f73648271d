"""Weighted box fusion: pneumodet's (``inference/tta.py``) against the ``ensemble-boxes`` package, same inputs.

    .venv/bin/python benchmarks/bench_fusion.py [--images 500] [--views 6] [--boxes 20] [--repeats 5] [--seed 0]

Each image gets ``--views`` views (an ensemble of M models with TTA fuses M x 2 views: 6 = 3 models with
hflip) of ``--boxes`` boxes each, what a model keeps after NMS: ``--boxes // 4`` objects seen by every view
with a few pixels of jitter, the rest scattered false positives; scores are distinct, as a detector's are.

The peer, ``ensemble_boxes.weighted_boxes_fusion``, takes coordinates normalised to [0, 1] (pneumodet's are
pixels: the inputs are divided by the image side, its outputs multiplied back), one label per box (all 0
here: one class), equal weights, ``skip_box_thr=0`` and ``conf_type="avg"``: the mean score of a cluster
times ``min(views, n) / views``, which is pneumodet's rule. Both cluster in descending score order and
join a box to the fused box it overlaps most when that IoU is above ``iou_thr``. So the outputs must agree
up to float rounding; the script asserts it (same number of boxes per image, max abs difference of
coordinates in pixels and of scores printed) before timing anything.

Prints images/s for pneumodet, the peer, and the ratio (pneumodet / peer), median of ``--repeats`` after a
warm-up, with the machine's CPU and load average (a shared machine shows in the numbers).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import cpu_model, load_average, seconds
from pneumodet.inference.tta import weighted_boxes_fusion

SIZE = 1024.0
IOU = 0.55


def make_views(images: int, views: int, boxes: int, seed: int) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Per image: ``views`` arrays of xyxy pixel boxes and their scores."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        objects = max(1, boxes // 4)
        centres = rng.uniform(150, SIZE - 150, size=(objects, 2))
        half = rng.uniform(40, 120, size=(objects, 2))
        image_boxes, image_scores = [], []
        for _ in range(views):
            true = np.concatenate([centres - half, centres + half], axis=1) + rng.normal(0, 6, size=(objects, 4))
            k = boxes - objects
            corner = rng.uniform(0, SIZE - 200, size=(k, 2))
            noise = np.concatenate([corner, corner + rng.uniform(30, 200, size=(k, 2))], axis=1)
            image_boxes.append(np.concatenate([true, noise]).clip(0, SIZE))
            image_scores.append(np.concatenate([rng.uniform(0.5, 1.0, objects), rng.uniform(0.01, 0.5, k)]))
        out.append((image_boxes, image_scores))
    return out


def ours(data, tensors):
    return [weighted_boxes_fusion(b, s, iou_thresh=IOU) for b, s in tensors]


def peer(data):
    from ensemble_boxes import weighted_boxes_fusion as wbf

    results = []
    for boxes, scores in data:
        fused, fused_scores, _ = wbf([b / SIZE for b in boxes], scores, [np.zeros(len(s)) for s in scores],
                                     iou_thr=IOU, skip_box_thr=0.0, conf_type="avg")
        results.append((fused * SIZE, fused_scores))
    return results


def compare(got, want) -> tuple[float, float]:
    """Max abs difference of coordinates (pixels) and of scores; asserts the same boxes per image."""
    box_diff = score_diff = 0.0
    for (gb, gs), (wb, ws) in zip(got, want, strict=True):
        assert len(gb) == len(wb), f"{len(gb)} fused boxes, ensemble-boxes {len(wb)}"
        if len(gb):
            box_diff = max(box_diff, float(np.abs(gb.numpy() - wb).max()))
            score_diff = max(score_diff, float(np.abs(gs.numpy() - ws).max()))
    return box_diff, score_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-image fusion of a few dozen boxes: threads only add overhead
    data = make_views(args.images, args.views, args.boxes, args.seed)
    tensors = [([torch.tensor(b, dtype=torch.float32) for b in boxes], [torch.tensor(s, dtype=torch.float32)
                                                                      for s in scores]) for boxes, scores in data]
    box_diff, score_diff = compare(ours(data, tensors), peer(data))
    print(f"cpu: {cpu_model()}; load average {load_average()}; torch threads 1")
    print(f"{args.images} images x {args.views} views x {args.boxes} boxes, IoU {IOU}, conf_type avg")
    print(f"equal output: same boxes per image; max abs difference {box_diff:.2e} px, scores {score_diff:.2e}")
    ours_s = seconds(lambda: ours(data, tensors), args.repeats)
    peer_s = seconds(lambda: peer(data), args.repeats)
    print(f"pneumodet  {args.images / ours_s:10.1f} images/s")
    print(f"peer       {args.images / peer_s:10.1f} images/s  (ensemble_boxes.weighted_boxes_fusion)")
    print(f"ratio      {peer_s / ours_s:10.2f} x  (pneumodet / peer throughput)")


if __name__ == "__main__":
    main()
