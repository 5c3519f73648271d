"""Data path speed: DICOM decode + resize, cache build, cached reads, on the real RSNA sample.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_data.py [--data ../shared/data/rsna-sample]

Prints images/s for
  * pneumodet's decode (``read_dicom`` + ``resize_area``) in one process,
  * the peer, measured in the same run: pydicom's default ``ds.pixel_array`` (whatever plugin it picks)
    + Pillow box resize, in one process,
  * ``build_cache`` of N images with all cores (the 16 files listed repeatedly under distinct ids),
  * random-row reads from the built cache (copied out of the memory map, as the dataset does),
and the ratios. Every figure is the median over repeats after one warm-up run; one-process figures are
per CPU-second of this process (steady on a shared machine), builds are wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image

from _common import cpu_model
from pneumodet.data.cache import ImageCache, build_cache
from pneumodet.data.dicom import read_dicom
from pneumodet.data.preprocess import resize_area
from pneumodet.data.records import PatientRecord

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample"


def rates(work: dict[str, Callable[[], int]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median items per ``clock`` second of each ``work`` (returning how many items it did) over ``repeats``.

    One warm-up run each, then the works take turns, so a change in the machine's load hits all alike.
    """
    for run in work.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(repeats):
        for name, run in work.items():
            start = clock()
            count = run()
            samples[name].append(count / (clock() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def pneumodet_decode(files: Sequence[Path], size: int) -> int:
    for path in files:
        pixels, _ = read_dicom(path)
        resize_area(pixels, size)
    return len(files)


def pydicom_decode(files: Sequence[Path], size: int) -> int:
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array
        np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BOX))
    return len(files)


def cached_reads(cache: ImageCache, rows: np.ndarray) -> int:
    for row in rows:
        np.array(cache.image(int(row)))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kaggle-layout folder with DICOMs")
    parser.add_argument("--size", type=int, default=512, help="cache side in pixels (default 512)")
    parser.add_argument("--passes", type=int, default=4, help="passes over the files per decode repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--build-images", type=int, default=256, help="images in the cache build")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cache build processes")
    args = parser.parse_args(argv)
    import torch  # here, not at the top: the forkserver of the cache build imports this module


    files = sorted((args.data / "stage_2_train_images").glob("*.dcm"))
    if not files:
        sys.exit(f"no DICOMs under {args.data / 'stage_2_train_images'}")
    looped = files * args.passes
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; python {platform.python_version()}")
    print(f"threads: torch {torch.get_num_threads()}, opencv {cv2.getNumThreads()}")
    print(f"versions: numpy {np.__version__}, pydicom {pydicom.__version__}, opencv {cv2.__version__}, "
          f"pillow {Image.__version__}, torch {torch.__version__}")
    print(f"data: {len(files)} real DICOMs from {args.data}, {args.passes} passes per repeat, "
          f"{args.repeats} repeats, cache side {args.size}")

    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        records = [PatientRecord(f"p{i:06d}", "Normal", 0, (), files[i % len(files)])
                   for i in range(args.build_images)]

        def build(workers: int) -> int:
            out = Path(tempfile.mkdtemp(prefix="build_", dir=tmp))
            report = build_cache(records, out, size=args.size, workers=workers, progress=False)
            if report.cached != args.build_images:
                sys.exit(f"cache build went wrong:\n{report.summary()}")
            shutil.rmtree(out)
            return args.build_images

        # One process: images per CPU-second of this process, steady on a shared machine.
        cpu = rates({
            "ours": lambda: pneumodet_decode(looped, args.size),
            "peer": lambda: pydicom_decode(looped, args.size),
            "build1": lambda: build(1),
        }, args.repeats, time.process_time)
        # Builds use worker processes: wall time, pool start included.
        speed = rates({"build1": lambda: build(1), "buildN": lambda: build(args.workers)},
                      args.repeats, time.perf_counter)
        ours, peer = cpu["ours"], cpu["peer"]
        print(f"decode+resize, 1 process, per CPU-second: pneumodet {ours:8.1f} img/s | pydicom pixel_array "
              f"+ PIL {peer:8.1f} img/s | ratio {ours / peer:.2f}x")
        print(f"cache build of {args.build_images} images, 1 process, per CPU-second: {cpu['build1']:8.1f} img/s "
              f"| ratio to decode+resize alone {cpu['build1'] / ours:.2f}x")
        for key, workers in (("build1", 1), ("buildN", args.workers)):
            print(f"cache build of {args.build_images} images, {workers} process(es), wall: {speed[key]:8.1f} img/s "
                  f"({args.build_images / speed[key]:.2f} s, pool start included)")
        print(f"ratio cache build {args.workers} processes / 1 process: {speed['buildN'] / speed['build1']:.2f}x")

        build_cache(records, Path(tmp) / "cache", size=args.size, workers=args.workers, progress=False)
        again = build_cache(records, Path(tmp) / "cache", size=args.size, workers=args.workers,
                            progress=False)
        print(f"cache re-run (all reused, CRC checked): {again.seconds:.3f} s, {again.decoded} decoded")

        cache = ImageCache.open(Path(tmp) / "cache")
        rows = np.random.default_rng(0).integers(0, len(cache), size=2000)
        read = rates({"read": lambda: cached_reads(cache, rows)}, args.repeats, time.process_time)["read"]
        print(f"cached read (random rows, copied out of the memory map), per CPU-second: {read:10.1f} img/s")
        print(f"ratio cached read / pneumodet decode: {read / ours:.1f}x; "
              f"cached read / pydicom decode: {read / peer:.1f}x")


if __name__ == "__main__":
    main()
