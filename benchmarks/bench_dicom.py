"""DICOM decode and synthetic-data speed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dicom.py [--data ../shared/data/rsna-sample]

Prints, in one process on one core:
  * ``read_dicom`` on the 16 real RSNA files (1024², JPEG Baseline) against its peers measured in the
    same run: pydicom's ``pixel_array`` with the ``pillow`` plugin, and with the ``pylibjpeg`` plugin;
  * ``make_synthetic_dataset`` at 256 and 1024 px (drawing, JPEG encoding and writing), against the
    drawing alone (``render_chest``), so the share of the file writing shows.
Every figure is the median over repeats after one warm-up pass, in CPU seconds of this process
(``time.process_time``): the figure per core, which stays meaningful on a shared, loaded machine
(``--wall`` for wall-clock time instead).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.pixels import pixel_array

from pneumodet.data.dicom import read_dicom
from pneumodet.data.synth import make_synthetic_dataset, render_chest, sample_patients

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample"


def rate(fn: Callable[[], int], repeats: int, clock: Callable[[], float]) -> float:
    """Items per second of ``fn`` (which returns how many items it did): median of ``repeats`` runs."""
    fn()
    rates = []
    for _ in range(repeats):
        start = clock()
        n = fn()
        rates.append(n / (clock() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--passes", type=int, default=4, help="passes over the 16 files per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patients", type=int, default=60, help="synthetic patients per repeat at 256 px")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    print(f"clock: {'wall' if args.wall else 'CPU time of this process'}")

    files = sorted((args.data / "stage_2_train_images").glob("*.dcm")) * args.passes

    def ours() -> int:
        for f in files:
            read_dicom(f)
        return len(files)

    def peer(plugin: str) -> Callable[[], int]:
        def run() -> int:
            for f in files:
                pixel_array(pydicom.dcmread(f), decoding_plugin=plugin)
            return len(files)
        return run

    print(f"decode, {len(files)} real 1024² JPEG-Baseline files per repeat, median of {args.repeats}")
    r_ours = rate(ours, args.repeats, clock)
    r_pillow = rate(peer("pillow"), args.repeats, clock)
    r_libjpeg = rate(peer("pylibjpeg"), args.repeats, clock)
    print(f"  read_dicom                       {r_ours:7.1f} images/s")
    print(f"  pydicom pixel_array, pillow      {r_pillow:7.1f} images/s   ratio {r_ours / r_pillow:.2f}x")
    print(f"  pydicom pixel_array, pylibjpeg   {r_libjpeg:7.1f} images/s   ratio {r_ours / r_libjpeg:.2f}x")

    tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        for size, patients in ((256, args.patients), (1024, max(4, args.patients // 10))):
            specs = sample_patients(patients, seed=0)

            def write(size: int = size, patients: int = patients) -> int:
                shutil.rmtree(tmp / "ds", ignore_errors=True)
                make_synthetic_dataset(tmp / "ds", patients=patients, size=size, seed=0)
                return patients

            def draw(size: int = size, specs: list = specs) -> int:
                for spec in specs:
                    render_chest(spec, size)
                return len(specs)

            r_write, r_draw = rate(write, args.repeats, clock), rate(draw, args.repeats, clock)
            print(f"synthetic dataset, {size} px, {patients} patients per repeat")
            print(f"  make_synthetic_dataset           {r_write:7.1f} images/s")
            print(f"  render_chest only                {r_draw:7.1f} images/s   ratio {r_write / r_draw:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
