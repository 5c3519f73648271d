"""Streaming prediction: wall time, images/s and memory of ``predict`` over N DICOMs, at N/4, N/2 and N.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_stream.py [--n 2000] [--size 256] [--encoder resnet18]
        [--batch 8] [--sample-ms 50]

``--n`` synthetic DICOMs (``make_synthetic_dataset`` at ``--size`` px) and a random-init ``--encoder``
checkpoint at ``--size`` px are written to a temporary folder. Each of N/4, N/2 and N (the first files
in name order) is predicted in its own subprocess, so each has its own peak: ``predict(checkpoint,
files, batch_size=--batch, progress=False)`` at its default precision. Memory: the resident set size
(VmRSS from ``/proc/self/status``) just before ``predict`` starts, sampled every ``--sample-ms`` ms by a
thread during the run (shown at 25/50/75/100 % of the run's time, and its maximum), and the process's
``resource.getrusage`` ``ru_maxrss`` at the end (imports and model included). Predicting streams
batches, so the peak should not grow with N: the peer of the N row is the N/4 row of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _common import cpu_model, load_average

FRACTIONS = (0.25, 0.5, 1.0)
QUARTERS = (0.25, 0.5, 0.75, 1.0)


def rss_mib() -> float:
    """This process's resident set size now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


class RssSampler(threading.Thread):
    """Records ``(seconds since start, VmRSS MiB)`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._start = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self._start, rss_mib()))
            self._halt.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter() - self._start, rss_mib()))
        return self.samples


def at_fraction(samples: list[tuple[float, float]], fraction: float) -> float:
    """The last RSS sample taken at or before ``fraction`` of the sampled time."""
    end = samples[-1][0] * fraction
    return [rss for t, rss in samples if t <= end][-1]


def child(checkpoint: Path, images: Path, n: int, batch: int, interval: float) -> dict:
    """Predict the first ``n`` DICOMs of ``images``; what was measured, as a JSON-able dict."""
    from pneumodet.inference import predict

    files = sorted(images.glob("*.dcm"))[:n]
    before = rss_mib()
    sampler = RssSampler(interval)
    sampler.start()
    start = time.perf_counter()
    result = predict(checkpoint, files, batch_size=batch, progress=False)
    wall = time.perf_counter() - start
    samples = sampler.stop()
    return {
        "n": n, "wall_s": wall, "predicted": len(result.predictions), "boxes": result.boxes_total, "unreadable": len(result.unreadable),
        "precision": result.precision, "rss_before": before,
        "rss_quarters": [at_fraction(samples, q) for q in QUARTERS],
        "rss_max": max(rss for _, rss in samples), "samples": len(samples),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }


def prepare(root: Path, n: int, size: int, encoder: str) -> tuple[Path, Path]:
    """The synthetic DICOMs and a random-init checkpoint under ``root``: (checkpoint, images folder)."""
    from pneumodet.data.synth import make_synthetic_dataset
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    make_synthetic_dataset(root / "data", patients=n, size=size, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, image_size=size))
    checkpoint = save_checkpoint(root / "model.pt", model, extra={"threshold": 0.5, "image_size": size})
    return checkpoint, root / "data" / "stage_2_train_images"


def run_child(checkpoint: Path, images: Path, n: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(checkpoint), str(images), str(n),
               "--batch", str(args.batch), "--sample-ms", str(args.sample_ms)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child for n={n} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="DICOMs in the largest run (default 2000)")
    parser.add_argument("--size", type=int, default=256, help="image and model side in pixels (default 256)")
    parser.add_argument("--encoder", default="resnet18", help="timm encoder of the random model (resnet18)")
    parser.add_argument("--batch", type=int, default=8, help="predict batch size (default 8)")
    parser.add_argument("--sample-ms", type=float, default=50.0, help="RSS sampling interval (default 50)")
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "IMAGES", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, images, n = args.child
        print(json.dumps(child(Path(checkpoint), Path(images), int(n), args.batch, args.sample_ms / 1000)))
        return

    print(f"device: {cpu_model()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        start = time.perf_counter()
        checkpoint, images = prepare(Path(tmp), args.n, args.size, args.encoder)
        print(f"{args.n} synthetic DICOMs at {args.size} px and a random {args.encoder} checkpoint: "
              f"{time.perf_counter() - start:.1f} s; predict batch {args.batch}, one subprocess per N, "
              f"RSS sampled every {args.sample_ms:g} ms\n")
        print(f"{'N':>6}{'wall s':>8}{'img/s':>7}{'RSS before':>11}"
              + "".join(f"{f'@{q:.0%}':>7}" for q in QUARTERS) + f"{'max':>7}{'ru_maxrss':>10}  (MiB)")
        rows = []
        for fraction in FRACTIONS:
            row = run_child(checkpoint, images, max(1, round(args.n * fraction)), args)
            rows.append(row)
            if row["predicted"] != row["n"] or row["unreadable"]:
                print(f"  n={row['n']}: {row['predicted']} predicted, {row['unreadable']} unreadable")
            print(f"{row['n']:>6}{row['wall_s']:>8.1f}{row['n'] / row['wall_s']:>7.1f}{row['rss_before']:>11.0f}"
                  + "".join(f"{rss:>7.0f}" for rss in row["rss_quarters"])
                  + f"{row['rss_max']:>7.0f}{row['ru_maxrss']:>10.0f}", flush=True)
    growth = rows[-1]["ru_maxrss"] - rows[0]["ru_maxrss"]
    print(f"\nprecision {rows[-1]['precision']}; boxes kept at N: {rows[-1]['boxes']}; peak RSS (ru_maxrss) N vs N/4: {rows[-1]['ru_maxrss']:.0f} vs "
          f"{rows[0]['ru_maxrss']:.0f} MiB ({growth:+.0f} MiB, {rows[-1]['ru_maxrss'] / rows[0]['ru_maxrss']:.2f}x) "
          f"for {rows[-1]['n'] / rows[0]['n']:.0f}x the images")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
