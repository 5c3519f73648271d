"""Prediction speed: ``pneumodet.inference.predict`` against a plain per-image loop, on real DICOMs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_predict.py [--encoder resnet18] [--size 512] [--repeats 3]

Images/s over the 16 real RSNA DICOMs (``../shared/data/rsna-sample``), same random-init model, for
  * pneumodet ``predict`` at its default precision (bf16 autocast + channels_last where the hardware has
    native bf16, else fp32), batch 8, and the same at ``precision="fp32"``;
  * the peer, measured in the same run: the usual loop of the earlier research code, one image at a time
    (``pydicom.dcmread(...).pixel_array``, ``F.interpolate(mode="area")``, fp32 NCHW forward,
    ``model.detect``, boxes scaled back).
Every figure is the median of ``--repeats`` timed passes after a warm-up pass; the three are timed in
turn within each repeat so that they see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from _common import cpu_model
from pneumodet.inference import predict, resolve_precision
from pneumodet.model import ModelConfig, build_model, save_checkpoint

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample" / "stage_2_train_images"


def peer_loop(model: torch.nn.Module, files: list[Path], size: int) -> int:
    """One image at a time, fp32, contiguous NCHW: decode, resize, forward, detect, scale back."""
    boxes_total = 0
    with torch.inference_mode():
        for path in files:
            pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
            h, w = pixels.shape
            x = F.interpolate(torch.from_numpy(pixels)[None, None], size=(size, size), mode="area") / 255.0
            det = model.detect(model(x))[0]
            scale = torch.tensor([w / size, h / size, w / size, h / size])
            boxes_total += len(det.boxes * scale)
    return boxes_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    files = sorted(SAMPLE.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOMs under {SAMPLE}")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, image_size=args.size)).eval()
    default_precision = resolve_precision(None, torch.device("cpu"))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
          f"torch {torch.__version__}; {len(files)} real DICOMs 1024 px -> {args.size} px; {args.encoder}; "
          f"default precision here: {default_precision}")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "best_model.pt", model, extra={"threshold": 0.5, "image_size": args.size})
        runs = {
            f"predict ({default_precision}, batch 8)": lambda: predict(
                ckpt, [SAMPLE], batch_size=8, progress=False),
            "predict (fp32, batch 8)": lambda: predict(ckpt, [SAMPLE], batch_size=8, precision="fp32",
                                                       progress=False),
            "peer loop (fp32, 1 image)": lambda: peer_loop(model, files, args.size),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if repeat:  # the first pass warms caches and oneDNN kernels
                    times[name].append(time.perf_counter() - start)

    peer = statistics.median(times["peer loop (fp32, 1 image)"])
    print(f"{'':32s} {'images/s':>9s} {'vs peer':>8s}")
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"{name:32s} {len(files) / t:9.2f} {peer / t:7.2f}x")


if __name__ == "__main__":
    main()
