"""RSNA metric speed: ``rsna_map`` and ``sweep_thresholds`` against plain loops, on a validation-sized set.

    .venv/bin/python benchmarks/bench_metrics.py [--labels ../shared/data/rsna-sample/stage_2_train_labels.csv]
                                                 [--images 3000] [--extra 5] [--repeats 5]

The ground truth is the first ``--images`` patients of the real labels CSV (about 23 % positive).
Predictions are made up with a fixed seed: every true box jittered by a few pixels, plus up to
``--extra`` false positives per image with random confidences, the load after NMS at a low score
threshold.

Prints images/s for
  * pneumodet's ``rsna_map`` and, as the peer, the public ``map_iou`` algorithm (ground-truth-centric
    loops over boxes with a scalar IoU, run per image and averaged), measured in the same run;
  * ``sweep_thresholds`` (one matching pass, every cut-off from cumulative sums) and, as the peer,
    ``rsna_map`` re-run on the predictions filtered at each of the same cut-offs;
and the ratios. The peer's scores are printed too, so the figures compare equal work. Then the cost of
``evaluate``'s other metrics on the same set (``clinical_metrics``): the FROC alone, and all of them
(FROC, COCO AP, ROC, calibration, and every subgroup with its 500-resample bootstrap; made-up view, sex
and age, uniform class probabilities). Every figure is the median over ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import cpu_model
from pneumodet.clinical_metrics import BOOTSTRAP_RESAMPLES, SUBGROUPS, froc, reader_metrics
from pneumodet.metrics import RSNA_IOU_THRESHOLDS, rsna_map, sweep_thresholds
from pneumodet.submission import read_ground_truth

DEFAULT_LABELS = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample"
                  / "stage_2_train_labels.csv")


def seconds(work: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``work`` over ``repeats`` after one warm-up, and its last result."""
    result = work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def make_predictions(truth: dict[str, np.ndarray], extra: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for pid, boxes in truth.items():
        hits = np.column_stack([rng.uniform(0.3, 1.0, len(boxes)), boxes + rng.normal(0, 12, boxes.shape)])
        k = int(rng.integers(0, extra + 1))
        fps = np.column_stack([rng.uniform(0.0, 0.7, k), rng.uniform(0, 800, (k, 2)), rng.uniform(60, 300, (k, 2))])
        rows = np.concatenate([hits, fps])
        rows[:, 3:] = rows[:, 3:].clip(1, None)
        out[pid] = rows
    return out


# ------------------------------------------------------------------ the peer: the public map_iou, plainly
def _iou(a, b) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _map_iou(boxes_true, boxes_pred, scores):
    if len(boxes_true) == 0 and len(boxes_pred) == 0:
        return None
    if len(boxes_true) == 0:
        return 0.0
    boxes_pred = [boxes_pred[i] for i in np.argsort(scores)[::-1]]
    total = 0.0
    for t in RSNA_IOU_THRESHOLDS:
        matched, tp = set(), 0
        for g in boxes_true:
            for j, p in enumerate(boxes_pred):
                if j not in matched and _iou(g, p) >= t:
                    matched.add(j)
                    tp += 1
                    break
        total += tp / (len(boxes_true) + len(boxes_pred) - tp)
    return total / len(RSNA_IOU_THRESHOLDS)


def peer_score(truth, preds) -> float:
    scores = []
    for pid, boxes in truth.items():
        p = preds.get(pid, np.zeros((0, 5)))
        s = _map_iou(boxes.tolist(), p[:, 1:].tolist(), p[:, 0])
        if s is not None:
            scores.append(s)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--extra", type=int, default=5, help="false positives per image, at most")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    all_truth = read_ground_truth(args.labels)
    truth = {pid: all_truth[pid] for pid in list(all_truth)[: args.images]}
    preds = make_predictions(truth, args.extra, seed=0)
    n_pos = sum(1 for b in truth.values() if len(b))
    n_pred = sum(len(p) for p in preds.values())
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores), numpy {np.__version__}")
    print(f"{len(truth)} images ({n_pos} with boxes), {n_pred} predictions, {args.repeats} repeats")

    t_ours, ours = seconds(lambda: rsna_map(truth, preds), args.repeats)
    t_peer, peer = seconds(lambda: peer_score(truth, preds), args.repeats)
    print(f"rsna_map          {len(truth) / t_ours:10.0f} images/s  score {ours.score:.6f}")
    print(f"peer map_iou loop {len(truth) / t_peer:10.0f} images/s  score {peer:.6f}")
    print(f"ratio             {t_peer / t_ours:10.1f} x")

    t_sweep, sweep = seconds(lambda: sweep_thresholds(truth, preds), args.repeats)
    cutoffs = [c for c, _ in sweep.table]

    def rerun() -> float:
        return max(rsna_map(truth, {pid: p[p[:, 0] >= c] for pid, p in preds.items()}).score for c in cutoffs)

    t_rerun, best = seconds(rerun, max(1, args.repeats // 2))
    print(f"sweep_thresholds  {t_sweep * 1e3:10.1f} ms  ({len(cutoffs)} cut-offs, best {sweep.best_score:.6f} "
          f"at {sweep.best_threshold:.3f})")
    print(f"peer rsna_map x{len(cutoffs):<3d}{t_rerun * 1e3:10.1f} ms  (best {best:.6f})")
    print(f"ratio             {t_rerun / t_sweep:10.1f} x")

    rng = np.random.default_rng(1)
    fields = [{"view_position": str(rng.choice(["AP", "PA"])), "sex": str(rng.choice(["F", "M"])),
               "age_years": int(rng.integers(1, 90))} for _ in truth]
    positive = np.array([len(b) > 0 for b in truth.values()], dtype=np.int64)

    def everything() -> dict:
        return reader_metrics(truth, preds, threshold=0.5, true_class=positive, positive=1,
                              class_probs=np.full((len(truth), 3), 1 / 3), fields=fields)

    t_froc, found = seconds(lambda: froc(truth, preds), args.repeats)
    t_all, _ = seconds(everything, max(1, args.repeats // 2))
    print(f"froc              {t_froc * 1e3:10.1f} ms  (mean sensitivity {found.mean:.4f})")
    groups = 1 + sum(len(names) for names in SUBGROUPS.values())  # "all" and every group
    print(f"reader_metrics    {t_all * 1e3:10.1f} ms  (FROC, COCO AP, ROC, calibration, {groups} groups x "
          f"{BOOTSTRAP_RESAMPLES} bootstrap resamples)")


if __name__ == "__main__":
    main()
