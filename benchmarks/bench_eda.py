"""Exploration report speed: DICOM header scan (one process vs a worker pool) and the whole report.

    .venv/bin/python benchmarks/bench_eda.py [--data ../shared/data/rsna-sample] [--files 2048]

Prints
  * headers/s of ``scan_metadata`` in one process (the peer) and with a worker pool of all cores,
    over N header reads (the real sample's 16 files listed repeatedly under distinct ids), and the ratio;
    the smallest N at which the pool wins tells where ``_POOL_MIN_FILES`` should sit;
  * the wall time of ``build_eda_report`` on the real sample (all labels, 16 images).
Every figure is the median over repeats after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import seconds
from pneumodet.data.records import PatientRecord
from pneumodet.reports.eda import build_eda_report, scan_metadata

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample"


def repeated_records(files: list[Path], n: int) -> list[PatientRecord]:
    return [PatientRecord(f"p{i:06d}", "Normal", 0, (), files[i % len(files)]) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--files", type=int, nargs="+", default=[256, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted((args.data / "stage_2_train_images").glob("*.dcm"))
    if not files:
        print(f"no DICOM files under {args.data}", file=sys.stderr)
        return 1
    workers = os.cpu_count() or 1
    print(f"python {sys.version.split()[0]}, {workers} cores")
    print(f"{'headers':>8} {'1 process':>14} {f'pool of {workers}':>14} {'ratio':>7}")
    for n in args.files:
        records = repeated_records(files, n)
        one = seconds(lambda r=records: scan_metadata(r, workers=1), args.repeats)
        pool = seconds(lambda r=records: _pooled(r, workers), args.repeats)
        print(f"{n:>8} {n / one:>10,.0f} h/s {n / pool:>10,.0f} h/s {one / pool:>6.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        total = seconds(lambda: build_eda_report(args.data, tmp), args.repeats)
    print(f"build_eda_report on {args.data.name}: {total:.1f} s (median of {args.repeats})")
    return 0


def _pooled(records: list[PatientRecord], workers: int) -> None:
    from pneumodet.reports.eda import headers

    saved, headers._POOL_MIN_FILES = headers._POOL_MIN_FILES, 1  # force the pool whatever the size
    try:
        scan_metadata(records, workers=workers)
    finally:
        headers._POOL_MIN_FILES = saved


if __name__ == "__main__":
    sys.exit(main())
