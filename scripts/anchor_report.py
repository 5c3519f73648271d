"""Anchor statistics of the real RSNA boxes: the numbers and the figure of docs/ANCHORS.md.

    .venv/bin/python scripts/anchor_report.py [LABELS_CSV] [--figure docs/images/anchors_rsna.png]

Prints the box statistics and a Markdown table of anchor coverage for pneumodet's default anchors,
torchvision's RetinaNet defaults and the reference code's P2-P7 anchors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pneumodet.data.records import RSNA_IMAGE_SIZE
from pneumodet.model import AnchorGenerator, ModelConfig, anchor_coverage
from pneumodet.model.anchors import best_anchor_iou, cell_anchors

DEFAULT_LABELS = Path(__file__).resolve().parents[1].parent / "shared/data/rsna-sample/stage_2_train_labels.csv"
THIRDS = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
CANDIDATES = {
    "pneumodet default": {},
    "pneumodet sizes, fixed P4-P6": dict(pyramid_levels=(4, 5, 6)),
    "torchvision RetinaNet (P3-P7)": dict(
        pyramid_levels=(3, 4, 5, 6, 7), anchor_sizes=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1), anchor_scales=THIRDS,
        anchor_ratios=(0.5, 1.0, 2.0)),
    "reference code (P2-P7)": dict(
        pyramid_levels=(2, 3, 4, 5, 6, 7), anchor_sizes=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1),
        anchor_scales=THIRDS, anchor_ratios=(0.5, 1.0, 2.0)),
}


def read_boxes(labels: Path) -> np.ndarray:
    df = pd.read_csv(labels).dropna(subset=["x"])
    return np.stack([df.x, df.y, df.x + df.width, df.y + df.height], axis=1).astype(np.float64)


def box_statistics(boxes: np.ndarray) -> str:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    pct = (1, 5, 25, 50, 75, 95, 99)
    rows = [("sqrt(area) px @1024", np.sqrt(w * h)), ("height / width", h / w)]
    lines = ["| quantity | " + " | ".join(f"p{p}" for p in pct) + " |", "|---" * (len(pct) + 1) + "|"]
    for name, v in rows:
        lines.append(f"| {name} | " + " | ".join(f"{np.percentile(v, p):.2f}" for p in pct) + " |")
    return "\n".join(lines)


def coverage_table(boxes: np.ndarray, size: int) -> str:
    lines = ["| anchors | levels | anchors/image | IoU>=0.5 | IoU>=0.4 | median best IoU |", "|---|---|---|---|---|---|"]
    for name, overrides in CANDIDATES.items():
        config = ModelConfig(image_size=size, **overrides)
        r = anchor_coverage(boxes, config, source_size=RSNA_IMAGE_SIZE)
        levels = f"P{config.pyramid_levels[0]}-P{config.pyramid_levels[-1]}"
        name = f"**{name}**" if not overrides else name
        lines.append(f"| {name} | {levels} | {r['num_anchors']:,} | {100 * r['coverage_iou50']:.2f} % | "
                     f"{100 * r['coverage_iou40']:.2f} % | {r['median_best_iou']:.3f} |")
    return "\n".join(lines)


def draw_figure(boxes: np.ndarray, path: Path, size: int = 512) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = boxes * size / RSNA_IMAGE_SIZE
    w, h = scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    left.scatter(w, h, s=2, alpha=0.25, color="0.4", label=f"RSNA boxes ({len(boxes):,})")
    config = ModelConfig(image_size=size)
    for level, rel in zip(config.pyramid_levels, config.anchor_sizes, strict=True):
        base = cell_anchors(rel * size, config.anchor_scales, config.anchor_ratios)
        left.scatter(base[:, 2] - base[:, 0], base[:, 3] - base[:, 1], s=40, marker="s", label=f"P{level} anchors")
    left.set(xlabel=f"width (px at {size})", ylabel=f"height (px at {size})", xscale="log", yscale="log",
             title="Box shapes and the default anchor shapes")
    for axis in (left.xaxis, left.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_ticks([25, 50, 100, 200, 400])
    left.legend(loc="upper left", fontsize=8)
    bins = np.linspace(0, 1, 41)
    for name, overrides in CANDIDATES.items():
        if "fixed" in name:  # the same as the default at 512
            continue
        cfg = ModelConfig(image_size=size, **overrides)
        best = best_anchor_iou(torch.as_tensor(scaled), AnchorGenerator.from_config(cfg), size, size).numpy()
        right.hist(best, bins=bins, histtype="step", linewidth=1.5, label=name)
    right.axvline(0.5, color="k", linestyle=":", linewidth=1)
    right.axvline(0.4, color="k", linestyle=":", linewidth=1)
    right.set(xlabel="best-anchor IoU", ylabel="boxes", title=f"Best-anchor IoU of every box at {size} px")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="?", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--figure", type=Path, help="write the figure here")
    args = parser.parse_args()
    boxes = read_boxes(args.labels)
    print(f"{len(boxes)} boxes from {args.labels.name}\n")
    print(box_statistics(boxes), "\n")
    for size in (256, 512, 1024):
        print(f"### {size} px input\n")
        print(coverage_table(boxes, size), "\n")
    config = ModelConfig()
    sizes = ", ".join(f"{s:g}" for s in config.anchor_sizes)
    print(f"default at 512: levels {config.pyramid_levels}, sizes {sizes} x side, "
          f"scales {[round(s, 3) for s in config.anchor_scales]}, ratios (h/w) {config.anchor_ratios}")
    if args.figure:
        draw_figure(boxes, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
