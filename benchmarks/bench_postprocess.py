"""Post-processing defaults: NMS IoU and boxes per image, chosen on validation, checked on test.

    .venv/bin/python benchmarks/bench_postprocess.py RUN --data DATA --split SPLIT
                     [--nms 0.3,0.4,0.5] [--max-det 5,10,100] [--precision fp32] [--batch-size 8]

RUN is a trained run (``pneumodet train`` or the demo's ``runs/demo/run``), DATA and SPLIT its data and split
(the demo's ``runs/demo/data`` and ``runs/demo/split``). The network runs once per image (the DICOMs of
the validation and test patients, decoded and resized as ``predict`` does); each post-processing setting
then decodes the same head outputs (:func:`pneumodet.model.retinanet.postprocess`). Per setting:

  * on validation, the confidence threshold that maximises the RSNA mAP (``sweep_thresholds``, as training
    chooses the run's threshold), that mAP and the mean boxes per image kept at it;
  * on test, the RSNA mAP and boxes per image at that validation threshold (nothing is chosen on test).

Then, for the old defaults (NMS IoU 0.5, 100 boxes) and :class:`~pneumodet.model.ModelConfig`'s defaults
(what a new run records) side by side on test, and a diagnosis of the clusters of boxes the old defaults keep: the IoU and the containment
(intersection over the smaller box) of every pair of kept boxes of an image that overlap at all, and the
largest IoU between two kept boxes (NMS guarantees it is at most the NMS IoU, across pyramid levels).
Quality numbers only: nothing here is timed.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from pneumodet.boxes import boxes_to_original, kaggle_rows
from pneumodet.data.split import read_split
from pneumodet.inference.engine import load_for_inference, model_image_size
from pneumodet.inference.inputs import DicomImageStream, collate_items
from pneumodet.metrics import rsna_map, sweep_thresholds
from pneumodet.model import HeadOutputs, ModelConfig
from pneumodet.model.retinanet import postprocess
from pneumodet.submission import read_ground_truth

#: The defaults before this benchmark chose new ones.
OLD_DEFAULTS = (0.5, 100)


@dataclass
class SplitOutputs:
    """The head outputs of every image of a set, by batch, and what maps its boxes back to the DICOM."""

    batches: list[tuple[HeadOutputs, list[tuple[str, tuple[int, int]]]]]
    truth: dict[str, np.ndarray]
    image_size: int


def head_outputs(model: torch.nn.Module, files: Sequence[Path], truth: dict[str, np.ndarray], *,
                 precision: str, batch_size: int) -> SplitOutputs:
    """Run the network once over ``files`` (the patients' DICOMs) and keep its raw outputs."""
    image_size = model_image_size(model)
    loader = DataLoader(DicomImageStream(files, image_size), batch_size=batch_size, collate_fn=collate_items)
    batches = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for items in loader:
            items = [i for i in items if i.error is None]
            outputs = model(torch.stack([i.image for i in items]))
            outputs = outputs._replace(cls_logits=outputs.cls_logits.float(), box_deltas=outputs.box_deltas.float())
            batches.append((outputs, [(i.path.stem, i.original_size) for i in items]))
    return SplitOutputs(batches, {pid: truth[pid] for _, meta in batches for pid, _ in meta}, image_size)


def predictions(model: torch.nn.Module, outputs: SplitOutputs, nms_iou: float, max_det: int) -> dict[str, np.ndarray]:
    """``{patient: [N, 5] conf, x, y, w, h}`` in the DICOM's pixels for one post-processing setting."""
    config: ModelConfig = model.config
    out = {}
    for head, meta in outputs.batches:
        dets = postprocess(head, model.box_coder, score_thresh=config.score_thresh, nms_thresh=nms_iou,
                           topk_per_level=config.topk_per_level, max_detections=max_det)
        for (pid, size), det in zip(meta, dets, strict=True):
            out[pid] = kaggle_rows(boxes_to_original(det.boxes, size, outputs.image_size), det.scores)
    return out


def kept(preds: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    return {pid: p[p[:, 0] >= threshold] for pid, p in preds.items()}


def boxes_per_image(preds: dict[str, np.ndarray]) -> float:
    return float(np.mean([len(p) for p in preds.values()])) if preds else 0.0


def cluster_diagnosis(preds: dict[str, np.ndarray]) -> str:
    """IoU and containment of the overlapping pairs of kept boxes, and the biggest clusters."""
    ious, contained, sizes = [], [], []
    for rows in preds.values():
        if len(rows) < 2:
            sizes.append(len(rows))
            continue
        xyxy = torch.tensor(rows[:, 1:5], dtype=torch.float64)  # a copy: rows stay x, y, w, h
        xyxy[:, 2:] += xyxy[:, :2]
        iou = box_iou(xyxy, xyxy)
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        inter = iou * (area[:, None] + area[None, :]) / (1 + iou)
        upper = torch.triu(torch.ones_like(iou, dtype=torch.bool), 1) & (iou > 0)
        ious += iou[upper].tolist()
        contained += (inter / torch.minimum(area[:, None], area[None, :]))[upper].tolist()
        # a cluster: boxes linked by IoU > 0.2 (single linkage)
        link = (iou > 0.2).numpy()
        seen: set[int] = set()
        for start in range(len(rows)):
            if start in seen:
                continue
            stack, members = [start], 0
            while stack:
                i = stack.pop()
                if i in seen:
                    continue
                seen.add(i)
                members += 1
                stack += [j for j in np.flatnonzero(link[i]) if j not in seen]
            sizes.append(members)
    if not ious:
        return "  no two kept boxes of an image overlap"
    ious_a, cont_a = np.asarray(ious), np.asarray(contained)
    big = [s for s in sizes if s >= 5]
    return "\n".join([
        f"  overlapping pairs of kept boxes: {len(ious_a)}; IoU median {np.median(ious_a):.2f}, 90th percentile "
        f"{np.percentile(ious_a, 90):.2f}, largest {ious_a.max():.3f}",
        f"  containment (intersection / smaller box) median {np.median(cont_a):.2f}; pairs with IoU < 0.5 but "
        f"containment > 0.8 (one box nested in the other): {int(((ious_a < 0.5) & (cont_a > 0.8)).sum())}",
        f"  clusters (boxes linked by IoU > 0.2): {len(sizes)}, of 5 boxes or more: {len(big)}"
        + (f" (sizes {sorted(big, reverse=True)[:10]})" if big else ""),
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--nms", default="0.3,0.4,0.5")
    parser.add_argument("--max-det", default="5,10,100")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    model, extra = load_for_inference(args.run)
    truth = read_ground_truth(args.data / "stage_2_train_labels.csv")
    sets = read_split(args.split)
    outputs = {name: head_outputs(model, [r.image_path for r in sets[name] if r.image_path], truth,
                                  precision=args.precision, batch_size=args.batch_size)
               for name in ("val", "test")}
    nms_values = [float(v) for v in args.nms.split(",")]
    max_values = [int(v) for v in args.max_det.split(",")]
    config: ModelConfig = model.config  # the run's own (recorded when it was trained)
    defaults = ModelConfig()
    current = (defaults.nms_thresh, defaults.max_detections)
    settings = sorted(set(itertools.product(nms_values, max_values)) | {OLD_DEFAULTS, current})
    print(f"run {args.run} ({config.encoder}, {config.image_size} px; run threshold {extra.get('threshold')}); "
          f"val {len(outputs['val'].truth)} images, test {len(outputs['test'].truth)}; min score "
          f"{config.score_thresh}; {args.precision}")
    print(f"{'nms_iou':>7} {'max_det':>7} | {'val thr':>7} {'val mAP':>7} {'val box/img':>11} | "
          f"{'test mAP':>8} {'test box/img':>12}")
    rows = {}
    for nms_iou, max_det in settings:
        val = predictions(model, outputs["val"], nms_iou, max_det)
        sweep = sweep_thresholds(outputs["val"].truth, val)
        test = kept(predictions(model, outputs["test"], nms_iou, max_det), sweep.best_threshold)
        score = rsna_map(outputs["test"].truth, test).score
        rows[(nms_iou, max_det)] = (sweep.best_threshold, sweep.best_score, score, test)
        marks = " <- old defaults" if (nms_iou, max_det) == OLD_DEFAULTS else ""
        marks += " <- new defaults" if (nms_iou, max_det) == current else ""
        print(f"{nms_iou:7.2f} {max_det:7d} | {sweep.best_threshold:7.3f} {sweep.best_score:7.4f} "
              f"{boxes_per_image(kept(val, sweep.best_threshold)):11.2f} | {score:8.4f} "
              f"{boxes_per_image(test):12.2f}{marks}")
    best = max(rows, key=lambda k: (round(rows[k][1], 6), -k[1], -k[0]))  # val mAP; ties: fewer boxes, lower IoU
    print(f"best on validation: nms_iou {best[0]}, max_det {best[1]} (val mAP {rows[best][1]:.4f})")
    print("\ntest, old vs new defaults (each at its own validation threshold):")
    for name, key in (("old", OLD_DEFAULTS), ("new", current)):
        threshold, _, score, test = rows[key]
        print(f"  {name:<8} nms_iou {key[0]}, max_det {key[1]}: test mAP {score:.4f}, {boxes_per_image(test):.2f} "
              f"boxes/image at threshold {threshold:.3f}")
    print("\nclusters the old defaults keep on test (boxes at the validation threshold):")
    print(cluster_diagnosis(rows[OLD_DEFAULTS][3]))
    low = kept(predictions(model, outputs["test"], *OLD_DEFAULTS), config.score_thresh)
    print(f"clusters of every candidate the old defaults keep (score >= {config.score_thresh}, before the "
          f"threshold): {boxes_per_image(low):.1f} boxes/image")
    print(cluster_diagnosis(low))


if __name__ == "__main__":
    main()
