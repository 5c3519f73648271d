"""Scaling with the training set: cache build time, one training epoch's time and peak memory at N images.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scaling.py [--sizes 1000 2000 4000 8000] [--size 64]
        [--encoder resnet18] [--batch 8] [--workers 2] [--aug heavy] [--val 64] [--work DIR]
        [--sample-ms 200] [--epochs 1] [--source-size PX]

Data: ``make_synthetic_dataset`` writes max(N) + 2 x ``--val`` patients (timed), once, into a temporary
folder or ``--work DIR`` (kept there and reused while patients, size and seed match), at
``--source-size`` px (default ``--size``; a smaller source only makes the data quicker to write: the
cache resizes every image to ``--size``, so what is read, augmented and trained on is the same).
One patient-level ``split_patients`` split (seed 0) sets ``--val`` validation and ``--val`` test
patients aside and leaves exactly max(N) training patients; the training set of size N is the first N
of them in labels-file order (a random order: the synthetic patients are shuffled), so the sets are
nested and every N shares the same validation and test patients.

For each N, two subprocesses, so each has its own peak memory:

1. cache: ``build_cache`` of the N training images into a fresh folder at ``--size`` px with its default
   worker processes (timed end to end: planning, decoding, CRCs, index writes, the worker pool's start),
   then, untimed, the fixed validation and test images into the same cache.
2. train: ``pneumodet.training.train`` for ``--epochs`` epochs (default 1), the ``default`` recipe
   (AdamW, warm-up + cosine LR, gradient clipping), precision ``auto`` (bf16 where the CPU has it
   natively), channels_last, random-init ``--encoder`` at ``--size`` px, augmentation ``--aug``, batch
   ``--batch``, ``--workers`` persistent loader worker processes, the default periodic checkpoint every
   200 steps, then validation on the fixed ``--val`` patients. A Lightning callback added to the trainer
   that ``train`` builds records the times: "epoch s" runs from the epoch's start (loader workers
   started) to the end of its last optimiser step, so validation, the epoch-end checkpoints and the
   process start are not in it; validation is shown on its own ("val s"). With more than one epoch the
   times are the last epoch's: workers already running, a GPU's kernels already tuned. "2nd half" is the
   rate over the epoch's second half of steps (a slowdown within the epoch shows there). "CPU s" is the
   CPU time of the process and its loader workers over the same span: on a shared machine it is the
   steadier figure.

Memory of the training subprocess: ``resource.getrusage`` ``ru_maxrss`` of the process itself
(RUSAGE_SELF: imports, model, optimiser, the cached pages it read) plus that of its largest loader
worker (RUSAGE_CHILDREN: the workers have exited when ``train`` returns); the peer is the smallest N's
figure (ideal ratio 1.00: flat). RSS counts pages of the memory-mapped cache that a process has read,
which grow with N up to the cache's size without being memory held; so a thread also samples, every
``--sample-ms`` ms, the proportional set size (PSS, ``/proc/PID/smaps_rollup``) of the process and its
workers, split into anonymous memory (what the program holds) and file pages (the cache, libraries);
the table shows its maximum up to the start of validation, i.e. over the imports, setup and the epoch.

Time: the peer of each row is perfect linear scaling from the smallest N: ratio = (t_N / t_first) /
(N / N_first), ideal 1.00; above 1 means each image costs more as N grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from _common import cpu_model, load_average

SEED = 0


# ---------------------------------------------------------------------------------------------- memory
def status_mib(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak so far), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} line in /proc/self/status")


def child_pids() -> list[int]:
    """Direct children of this process (the loader workers), from every thread's ``children`` list."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:  # the thread ended while we looked
            continue
    return pids


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the living children so far (``/proc/PID/stat`` fields 14 and 15)."""
    total = 0
    for pid in child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) plus its living children (the loader workers)."""
    return time.process_time() + children_cpu_seconds()


def pss_mib(pid: int | str) -> tuple[float, float]:
    """``(anonymous, file)`` proportional set size of one process in MiB; zeros once it has gone."""
    anon = file = 0.0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return anon, file
    for line in text.splitlines():
        if line.startswith("Pss_Anon:"):
            anon = int(line.split()[1]) / 1024
        elif line.startswith("Pss_File:"):
            file = int(line.split()[1]) / 1024
    return anon, file


class PssSampler(threading.Thread):
    """Samples the PSS of this process plus its children every ``interval`` s; keeps the maxima.

    PSS shares each page among the processes that map it, so the sum over a parent and its forked
    workers counts every page once (RSS would count shared pages in each of them).
    """

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.max_total = self.max_anon = self.max_file = 0.0
        self.samples = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()  # sample() is also called from the training thread

    def sample(self) -> None:
        parts = [pss_mib("self"), *(pss_mib(pid) for pid in child_pids())]
        anon, file = sum(a for a, _ in parts), sum(f for _, f in parts)
        with self._lock:
            self._keep(anon, file)

    def _keep(self, anon: float, file: float) -> None:
        self.max_anon, self.max_file = max(self.max_anon, anon), max(self.max_file, file)
        self.max_total = max(self.max_total, anon + file)
        self.samples += 1

    def maxima(self) -> dict[str, float]:
        with self._lock:
            return {"pss_max": self.max_total, "pss_anon_max": self.max_anon, "pss_file_max": self.max_file}

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------------------------------------- children
def cache_child(work: Path, n: int, size: int) -> dict[str, Any]:
    """Build the cache of run ``n``: its training images timed, then the fixed val/test images."""
    from pneumodet.data.cache import build_cache
    from pneumodet.data.split import read_split

    sets = read_split(split_dir(work, n))
    start = time.perf_counter()
    report = build_cache(sets["train"], cache_dir(work, n), size=size, progress=False)
    seconds = time.perf_counter() - start
    rest = build_cache(sets["val"] + sets["test"], cache_dir(work, n), size=size, progress=False)
    return {"seconds": seconds, "decoded": report.decoded, "failed": len(report.failed) + len(rest.failed),
            "missing": report.missing + rest.missing, "rest_decoded": rest.decoded,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def train_child(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train run ``n`` for ``args.epochs`` epochs through :func:`pneumodet.training.train`; times and memory."""
    import lightning as L

    import pneumodet.training as training
    from pneumodet.config import TrainConfig

    sampler = PssSampler(args.sample_ms / 1000)

    class EpochClock(L.Callback):
        """Marks of the epoch: wall time at its start, at each optimiser step's end and around validation;
        CPU time (process + loader workers) at its start and last step; memory when validation starts."""

        def __init__(self) -> None:
            self.epoch_start = self.val_start = self.val_end = float("nan")
            self.cpu_start = self.cpu_end = float("nan")
            self.rss_at_start = float("nan")
            self.step_ends: list[float] = []
            self.epoch_memory: dict[str, float] = {}

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.step_ends = []  # the last epoch's marks are the ones reported
            self.rss_at_start = status_mib("VmRSS")
            self.cpu_start = cpu_seconds()
            self.epoch_start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *rest: Any) -> None:
            self.step_ends.append(time.perf_counter())
            self.cpu_end = cpu_seconds()

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.val_start = time.perf_counter()
            sampler.sample()
            self.epoch_memory = {**sampler.maxima(), "hwm": status_mib("VmHWM")}

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.val_end = time.perf_counter()

    clock = EpochClock()
    config = TrainConfig.with_recipe(
        "default", data_dir=str(work / "data"), split_dir=str(split_dir(work, n)), out_dir=str(run_dir(work, n)),
        cache_dir=str(cache_dir(work, n)), encoder=args.encoder, image_size=args.size, aug=args.aug, epochs=args.epochs,
        batch_size=args.batch, num_workers=args.workers, seed=SEED)
    rss_before = status_mib("VmRSS")
    sampler.start()
    result = training.train(config, progress=False, callbacks=[clock])
    sampler.stop()
    steps = clock.step_ends
    half = len(steps) // 2
    return {
        "n": n, "steps": result.steps, "excluded": len(result.excluded.get("train", [])), "fit_s": result.seconds,
        "epoch_s": steps[-1] - clock.epoch_start, "epoch_cpu_s": clock.cpu_end - clock.cpu_start,
        "second_half_s": steps[-1] - steps[half - 1] if half >= 1 else float("nan"),
        "second_half_images": n - half * args.batch,  # every batch but the last is full
        "val_s": clock.val_end - clock.val_start, "val_map": result.best_map,
        "precision": training.resolve_precision(config),
        "rss_before": rss_before, "rss_epoch_start": clock.rss_at_start,
        "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ru_maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "epoch_memory": clock.epoch_memory, **sampler.maxima(), "pss_samples": sampler.samples,
    }


# ---------------------------------------------------------------------------------------------- layout
def split_dir(work: Path, n: int) -> Path:
    return work / "splits" / str(n)


def cache_dir(work: Path, n: int) -> Path:
    return work / "caches" / str(n)


def run_dir(work: Path, n: int) -> Path:
    return work / "runs" / str(n)


def prepare_data(work: Path, patients: int, size: int) -> str:
    """The synthetic dataset in ``work/data`` (reused when it was written with the same settings)."""
    from pneumodet.data.synth import make_synthetic_dataset

    stamp = work / "synth.json"
    wanted = {"patients": patients, "size": size, "seed": SEED}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return f"synthetic dataset reused from {work / 'data'} ({patients} patients at {size} px)"
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    make_synthetic_dataset(work / "data", patients=patients, size=size, seed=SEED, overwrite=True)
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps(wanted))
    return (f"synthetic dataset: {patients} patients at {size} px in {seconds:.1f} s "
            f"({patients / seconds:.0f} images/s), {work / 'data'}")


def write_splits(work: Path, sizes: list[int], val: int) -> str:
    """One patient-level split; for each N a split folder with its first N training patients."""
    from pneumodet.data.rsna import load_rsna
    from pneumodet.data.split import Split, split_patients, write_split

    records = load_rsna(work / "data").records
    fraction = val / len(records)
    split = split_patients(records, val=fraction, test=fraction, seed=SEED)
    if len(split.train) < max(sizes) or len(split.val) != val:
        raise SystemExit(f"split gave {len(split.train)} train / {len(split.val)} val patients; "
                         f"wanted {max(sizes)} / {val}")
    for n in sizes:
        part = Split(train=split.train[:n], val=split.val, test=split.test, seed=SEED,
                     val_fraction=val / (n + 2 * val), test_fraction=len(split.test) / (n + 2 * val))
        write_split(part, split_dir(work, n), source=str(work / "data"))
    boxes = ", ".join(f"N={n}: {sum(len(r.boxes) for r in split.train[:n])}" for n in sizes)
    return (f"split (seed {SEED}): training sets = the first N of {len(split.train)} training patients, "
            f"validation {len(split.val)} and test {len(split.test)} patients fixed; boxes {boxes}")


# ---------------------------------------------------------------------------------------------- driver
def run_child(kind: str, work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, str(work), str(n), "--size", str(args.size),
               "--encoder", args.encoder, "--batch", str(args.batch), "--workers", str(args.workers),
               "--aug", args.aug, "--sample-ms", str(args.sample_ms), "--epochs", str(args.epochs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child for N={n} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Cache and train run ``n`` in fresh folders; both children's results, folders removed after."""
    for folder in (cache_dir(work, n), run_dir(work, n)):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        return {"cache": run_child("cache", work, n, args), "train": run_child("train", work, n, args)}
    finally:
        for folder in (cache_dir(work, n), run_dir(work, n)):
            shutil.rmtree(folder, ignore_errors=True)


HEADER = (f"{'N':>6}{'cache s':>9}{'img/s':>7}{'epoch s':>9}{'img/s':>7}{'2nd half':>9}{'x':>6}{'CPU s':>8}{'x':>6}"
          f"{'val s':>7}{'RSS self':>10}{'+worker':>8}{'peak':>7}{'x':>6}{'PSS anon':>10}{'x':>6}{'file':>6}")


def format_row(n: int, row: dict[str, Any], first: dict[str, Any], n_first: int) -> str:
    """One table row; ratios are against the first (smallest) N's row ``first``."""
    cache, tr, tr1 = row["cache"], row["train"], first["train"]
    scale = n / n_first
    peak = tr["ru_maxrss_self"] + tr["ru_maxrss_children"]
    first_peak = tr1["ru_maxrss_self"] + tr1["ru_maxrss_children"]
    anon, anon1 = tr["epoch_memory"]["pss_anon_max"], tr1["epoch_memory"]["pss_anon_max"]
    return (f"{n:>6}{cache['seconds']:>9.1f}{cache['decoded'] / cache['seconds']:>7.0f}{tr['epoch_s']:>9.1f}"
            f"{n / tr['epoch_s']:>7.1f}{tr['second_half_images'] / tr['second_half_s']:>9.1f}"
            f"{tr['epoch_s'] / tr1['epoch_s'] / scale:>6.2f}{tr['epoch_cpu_s']:>8.1f}"
            f"{tr['epoch_cpu_s'] / tr1['epoch_cpu_s'] / scale:>6.2f}{tr['val_s']:>7.1f}"
            f"{tr['ru_maxrss_self']:>10.0f}{tr['ru_maxrss_children']:>8.0f}{peak:>7.0f}{peak / first_peak:>6.2f}"
            f"{anon:>10.0f}{anon / anon1:>6.2f}{tr['epoch_memory']['pss_file_max']:>6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000],
                        help="training-set sizes N (default 1000 2000 4000 8000)")
    parser.add_argument("--size", type=int, default=64, help="image, cache and model side in px (default 64)")
    parser.add_argument("--encoder", default="resnet18", help="timm encoder, random init (default resnet18)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--aug", default="heavy", help="training augmentation level (default heavy)")
    parser.add_argument("--val", type=int, default=64, help="validation (and test) patients (default 64)")
    parser.add_argument("--work", type=Path, help="keep the synthetic data here and reuse it (default: temp)")
    parser.add_argument("--sample-ms", type=float, default=200.0, help="PSS sampling interval (default 200)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run; times are the last one's (default 1)")
    parser.add_argument("--source-size", type=int, help="side of the synthetic DICOMs in px (default --size)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "WORK", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, work, n = args.child
        if kind == "cache":
            result = cache_child(Path(work), int(n), args.size)
        else:
            result = train_child(Path(work), int(n), args)
        print(json.dumps(result))
        return

    sizes = sorted(set(args.sizes))
    print(f"device: {cpu_model()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(prepare_data(work, max(sizes) + 2 * args.val, args.source_size or args.size))
        print(write_splits(work, sizes, args.val))
        epochs = "one epoch" if args.epochs == 1 else f"{args.epochs} epochs, the last one timed,"
        print(f"{epochs} each: {args.encoder} (random init) at {args.size} px, default recipe, batch "
              f"{args.batch}, aug {args.aug}, {args.workers} loader workers; each N in its own subprocesses\n")
        print(HEADER + "  (MiB)", flush=True)
        rows: dict[int, dict[str, Any]] = {}
        for n in sizes:
            rows[n] = measure(work, n, args)
            print(format_row(n, rows[n], rows[sizes[0]], sizes[0]), flush=True)
    for n, row in rows.items():
        cache, tr = row["cache"], row["train"]
        if cache["failed"] or cache["missing"] or tr["excluded"] or cache["decoded"] != n:
            print(f"  N={n}: cache decoded {cache['decoded']}, failed {cache['failed']}, missing "
                  f"{cache['missing']}; {tr['excluded']} training patients left out")
    last, first = rows[sizes[-1]]["train"], rows[sizes[0]]["train"]
    print(f"\nprecision {last['precision']}; optimiser steps "
          f"{', '.join(str(r['train']['steps']) for r in rows.values())}; main process RSS when the epoch "
          f"started {first['rss_epoch_start']:.0f} / {last['rss_epoch_start']:.0f} MiB and its peak (VmHWM) "
          f"when it ended {first['epoch_memory']['hwm']:.0f} / {last['epoch_memory']['hwm']:.0f} MiB at "
          f"N={sizes[0]} / {sizes[-1]}; PSS sampled {last['pss_samples']} times at N={sizes[-1]}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
