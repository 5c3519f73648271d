"""Run folders made without training, for the report tests: a config and a plausible ``metrics.csv``.

A comparison report only reads each run's ``config.yaml``, ``metrics.csv`` and its split's ``split.json``;
writing them directly gives runs that differ in encoder, augmentation and sample size in milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pneumodet.config import TrainConfig
from pneumodet.rundir import RunDir
from pneumodet.safeio import write_json

IOU_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def fake_run(root: Path, encoder: str, aug: str, *, samples: int = 200, epochs: int = 3, seed: int = 0,
             template: Path | None = None) -> Path:
    """``root/<encoder>_<aug>_n<samples>``: a run folder whose losses fall and mAP rises over ``epochs``.

    ``template``: a real run's folder whose config (data, split, image size) is kept, with the encoder and
    augmentation replaced; otherwise a default config pointing at a split folder holding only ``split.json``.
    """
    run = RunDir(root / f"{encoder}_{aug}_n{samples}")
    run.root.mkdir(parents=True, exist_ok=True)
    if template is not None:
        base = TrainConfig.from_yaml(RunDir(template).config).to_dict()
    else:
        split = root / "splits" / f"n{samples}"
        split.mkdir(parents=True, exist_ok=True)
        write_json(split / "split.json", {"samples": samples, "patients": {"train": samples}})
        base = {**TrainConfig().to_dict(), "data_dir": str(root), "split_dir": str(split)}
    config = TrainConfig.from_dict({**base, "encoder": encoder, "aug": aug, "epochs": epochs,
                                    "out_dir": str(run.root)})
    config.to_yaml(run.config)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        decay = math.exp(-epoch / 3)
        row: dict[str, float | int] = {"epoch": epoch, "step": (epoch + 1) * 50}
        for stage in ("train", "val"):
            for name, start in (("total", 1.5), ("classification", 0.8), ("regression", 0.5), ("global", 0.2)):
                row[f"{stage}_{name}"] = start * (0.4 + 0.6 * decay) * rng.uniform(0.9, 1.1)
        row["val_map"] = 0.5 * (1.0 - decay) * rng.uniform(0.8, 1.2) + 0.01
        for t in IOU_THRESHOLDS:
            row[f"val_map@{t:.2f}"] = row["val_map"] * (1.2 - t)
        row["val_threshold"] = 0.5
        run.write_metrics_row(row)
    return run.root
