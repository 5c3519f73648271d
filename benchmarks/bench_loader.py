"""Training loader throughput per augmentation level against the training step it has to feed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_loader.py [--patients 200] [--size 512]
        [--workers 0 2] [--levels ...] [--repeats 5] [--gpu-rate 180]

A synthetic dataset (``make_synthetic_dataset``, ``--patients`` at ``--size`` px) is split and cached
in a temporary folder; ``RsnaDataModule.train_dataloader()`` (batch ``--batch``, shuffled, augmented at
each level, with each ``--workers`` count) is read for whole epochs of the training set: images/s is
the median over ``--repeats`` epochs after one warm-up epoch (which starts the persistent workers).
Peer, measured in the same run: the training step of pneumodet's RetinaNet (resnet50, ``--size`` px,
bf16 + channels_last, batch ``--batch``) on this machine, median of ``--step-repeats`` steps after a
warm-up. The ratio loader / step says how many times over the loader could feed that step (target
>= 20x on CPU); loader / ``--gpu-rate`` says the same for a GPU that trains at that many images/s.
The loader and the step are timed apart: in a real run on this machine they share its cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _common import cpu_model, load_average
from bench_model import PneumodetPeer, train_step
from bench_peak import median_seconds
from pneumodet.data.augment import LEVELS
from pneumodet.data.dataset import RsnaDataModule
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import split_patients, write_split
from pneumodet.data.synth import make_synthetic_dataset
from pneumodet.model import ModelConfig, build_model


def prepare(root: Path, patients: int, size: int) -> tuple[Path, Path]:
    """A synthetic dataset and its split under ``root``: (data folder, split folder)."""
    data_dir, split_dir = root / "data", root / "split"
    make_synthetic_dataset(data_dir, patients=patients, size=size, seed=0)
    records = load_rsna(data_dir).records
    write_split(split_patients(records, val=0.1, test=0.1, seed=0), split_dir, source=str(data_dir))
    return data_dir, split_dir


def epoch_seconds(loader: DataLoader, epoch: int) -> tuple[float, int]:
    """Seconds to read one whole epoch from ``loader``, and the images read."""
    loader.sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch["images"])
    return time.perf_counter() - start, images


def loader_rate(loader: DataLoader, repeats: int) -> float:
    """Images/s: median over ``repeats`` epochs after a warm-up epoch."""
    epoch_seconds(loader, 0)
    rates = []
    for epoch in range(1, repeats + 1):
        seconds, images = epoch_seconds(loader, epoch)
        rates.append(images / seconds)
    return statistics.median(rates)


def step_rate(size: int, batch: int, repeats: int) -> float:
    """Training images/s of pneumodet's resnet50 RetinaNet, bf16 + channels_last."""
    peer = PneumodetPeer("pneumodet", build_model(ModelConfig(encoder="resnet50", image_size=size)),
                         size, torch.device("cpu"))
    return batch / median_seconds(train_step(peer, batch, "bf16"), repeats, peer.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200, help="synthetic patients (default 200)")
    parser.add_argument("--size", type=int, default=512, help="image and cache side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes (0 2)")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs after a warm-up (default 5)")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps (default 3)")
    parser.add_argument("--gpu-rate", type=float, default=180.0, help="GPU training img/s to compare (180)")
    args = parser.parse_args()
    torch.manual_seed(0)

    print(f"device: {cpu_model()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {load_average()}")
    step = step_rate(args.size, args.batch, args.step_repeats)
    print(f"peer: training step resnet50 {args.size} px bf16 + channels_last, batch {args.batch}: "
          f"{step:.2f} img/s (median of {args.step_repeats} after 1 warm-up)\n")

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        start = time.perf_counter()
        data_dir, split_dir = prepare(Path(tmp), args.patients, args.size)
        header = True
        for level in args.levels:
            for workers in args.workers:
                module = RsnaDataModule(data_dir, split_dir, cache_dir=Path(tmp) / "cache", image_size=args.size,
                                        aug=level, batch_size=args.batch, num_workers=workers, progress=False)
                module.setup("fit")  # builds the cache on first use
                rate = loader_rate(module.train_dataloader(), args.repeats)
                if header:
                    print(f"synthetic data, split and cache: {time.perf_counter() - start:.1f} s; "
                          f"{module.summary()}; median of {args.repeats} epochs after 1 warm-up\n")
                    print(f"{'level':<24}{'workers':>8}{'loader img/s':>14}{'x step':>9}"
                          f"{f'x GPU {args.gpu_rate:g}':>13}")
                    header = False
                print(f"{level:<24}{workers:>8}{rate:>14.1f}{rate / step:>8.1f}x{rate / args.gpu_rate:>12.2f}x",
                      flush=True)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
