"""Training step memory and images/s vs batch: the largest batch that fits, per encoder and precision.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batch.py [--size 512]
        [--encoders resnet50 se_resnext50 pnasnet5] [--precision fp32 bf16] [--probe-batches 2 4]
        [--repeats 2] [--max-batch N] [--margin 0.1] [--time-budget 1200] [--device cpu|cuda]

The step is ``bench_model``'s pneumodet training step (forward, ``model.loss``, backward, SGD with
momentum; "bf16" = autocast bf16 with channels_last weights and inputs), random init, ``--size`` px,
each run in its own subprocess. Memory of a step: on CPU the peak resident set size
(``ru_maxrss``, its high-water mark reset through ``/proc/self/clear_refs`` just before the first
step) minus the RSS at that moment, so imports and weights are left out; on
CUDA ``max_memory_allocated`` minus ``memory_allocated`` before it. The two ``--probe-batches``
(one warm-up + one timed step each) fit ``step memory = fixed + per_image * batch`` and
``step time = a + b * batch``. The largest batch is the one whose step memory fits in
``(1 - --margin)`` of the memory available to the step (``MemAvailable`` from ``/proc/meminfo``, or
the GPU's free memory, read in the probe with its model loaded; ``--memory-limit`` for a smaller
machine), rounded down to a multiple of 2 (not a power of two: on CPU nothing favours one).

Verification runs that batch (one warm-up + ``--repeats`` timed steps; median img/s, peak memory). A
run that fails for memory (allocation error, or killed by a signal) is retried at 85 % of its batch,
up to three times, and the table says so. On CPU each child's data segment is capped
(``RLIMIT_DATA``) at what is available, so an over-large batch fails inside its own process rather
than waking the kernel's OOM killer on a shared machine. The verified batch is also capped by
``--max-batch`` and by ``--time-budget`` (seconds for the whole run, probes included): the
remaining time is shared out over the encoder/precision pairs, cheapest first, using the probes'
step-time fits. The peer of the largest-batch img/s is batch 8 of the same encoder and precision,
measured in the same run (ratio = largest / batch 8).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import cpu_model, load_average
from bench_model import PneumodetPeer, timed_group, train_step

MIB = 2**20
#: What a failed allocation says: torch on CPU and CUDA, Python, oneDNN.
_OOM_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "memoryerror", "cannot allocate")
_OOM_EXIT = 3
_STEP_DOWN, _MAX_STEP_DOWNS = 0.85, 3


# ---------------------------------------------------------------- child: one batch, one process


def _proc_kib(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} line in {path}")


def mem_available_mib() -> float:
    """``MemAvailable`` of ``/proc/meminfo``: what the kernel can give without swapping, in MiB."""
    return _proc_kib("/proc/meminfo", "MemAvailable") / 1024


def cap_data_segment(extra_mib: float) -> None:
    """Let this process's data segment grow by at most ``extra_mib``: past it allocations fail here
    (``RLIMIT_DATA``) instead of the OOM killer picking a victim machine-wide."""
    data = _proc_kib("/proc/self/status", "VmData") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data + int(extra_mib * MIB)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


class StepMemory:
    """The memory one training step adds, and the process's absolute peak, in MiB.

    CPU: resident set size (``ru_maxrss`` for the peak, its high-water mark reset just before the
    step); CUDA: allocated tensor memory.
    """

    def __init__(self, device: torch.device, limit_mib: float | None = None) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.before = torch.cuda.memory_allocated(device) / MIB
            self.available = torch.cuda.mem_get_info(device)[0] / MIB
        else:
            # A transient of the model build must not pass for the step's peak: start the
            # high-water mark (ru_maxrss) again from the current RSS.
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _proc_kib("/proc/self/status", "VmRSS") / 1024
            self.available = mem_available_mib()
        if limit_mib is not None:
            self.available = min(self.available, limit_mib)

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(encoder: str, precision: str, batch: int, repeats: int, size: int, device: torch.device,
          cap_memory: bool, limit_mib: float | None) -> dict:
    """Build the model, run one warm-up + ``repeats`` timed steps at ``batch``; what was measured."""
    from pneumodet.model import ModelConfig, build_model

    torch.manual_seed(0)
    peer = PneumodetPeer(encoder, build_model(ModelConfig(encoder=encoder, image_size=size)), size, device)
    step = train_step(peer, batch, precision)
    memory = StepMemory(device, limit_mib)
    if cap_memory and device.type == "cpu":
        cap_data_segment(memory.available)
    seconds = timed_group([step], repeats, device)[0]
    peak = memory.peak()
    return {"batch": batch, "step_s": seconds, "images_s": batch / seconds, "before_mib": memory.before,
            "peak_mib": peak, "step_mib": peak - memory.before, "available_mib": memory.available}


def run_child(args: argparse.Namespace, encoder: str, precision: str, batch: int, repeats: int) -> dict:
    """One child process; ``{"failed": why}`` when it ran out of memory or was killed by a signal."""
    command = [sys.executable, __file__, "--child", encoder, precision, str(batch), str(repeats),
               "--size", str(args.size), "--device", args.device]
    if not args.cap_memory:
        command.append("--no-cap-memory")
    if args.memory_limit is not None:
        command += ["--memory-limit", str(args.memory_limit)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode < 0:
        return {"failed": f"killed by {signal.Signals(-done.returncode).name}", "wall_s": wall}
    if done.returncode == _OOM_EXIT or (done.returncode and any(w in done.stderr.lower() for w in _OOM_WORDS)):
        return {"failed": "out of memory", "wall_s": wall}
    if done.returncode:
        raise SystemExit(f"{encoder} {precision} batch {batch} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def child_main(args: argparse.Namespace) -> None:
    encoder, precision, batch, repeats = args.child
    try:
        result = child(encoder, precision, int(batch), int(repeats), args.size, torch.device(args.device),
                       args.cap_memory, args.memory_limit)
    except (MemoryError, torch.OutOfMemoryError) as err:
        print(f"out of memory: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(_OOM_EXIT) from None
    except RuntimeError as err:
        if any(w in str(err).lower() for w in _OOM_WORDS):
            print(f"out of memory: {err}", file=sys.stderr)
            raise SystemExit(_OOM_EXIT) from None
        raise
    print(json.dumps(result))


# ---------------------------------------------------------------- parent: fit, plan, verify


@dataclass(frozen=True)
class Line:
    """``y = intercept + slope * batch`` through two measured points."""

    intercept: float
    slope: float

    @classmethod
    def through(cls, b1: float, y1: float, b2: float, y2: float) -> Line:
        slope = (y2 - y1) / (b2 - b1)
        return cls(y1 - slope * b1, slope)

    def __call__(self, batch: float) -> float:
        return self.intercept + self.slope * batch


def floor_even(x: float) -> int:
    return int(x // 2) * 2


@dataclass
class Pair:
    """One encoder/precision: its probes, fits, plan and verification."""

    encoder: str
    precision: str
    probes: list[dict]
    margin: float
    headline: int  # the batch every pair is also timed at (bench_model's training batch)

    def __post_init__(self) -> None:
        lo, hi = self.probes
        self.memory = Line.through(lo["batch"], lo["step_mib"], hi["batch"], hi["step_mib"])
        self.time = Line.through(lo["batch"], lo["step_s"], hi["batch"], hi["step_s"])
        self.available = min(p["available_mib"] for p in self.probes)
        self.before = max(p["before_mib"] for p in self.probes)
        # Process start, imports, model build and the warm-up's one-off costs: the probe's wall time
        # beyond its two steps.
        self.overhead = max(p["wall_s"] - 2 * p["step_s"] for p in self.probes)
        self.largest = self.predict_largest()
        self.runs: dict[int, dict] = {}
        self.notes: list[str] = []
        self.run_batch = 0
        self.plan_seconds = 0.0

    def predict_largest(self) -> int:
        """The largest even batch whose step memory fits in ``(1 - margin)`` of the available memory."""
        if self.memory.slope <= 0:
            return 0
        return max(0, floor_even(((1 - self.margin) * self.available - self.memory.intercept) / self.memory.slope))

    def step_seconds(self, batch: int) -> float:
        if self.time.slope <= 0:  # timing noise on a loaded machine: scale the larger probe instead
            hi = self.probes[1]
            return hi["step_s"] * batch / hi["batch"]
        return max(self.time(batch), 0.0)

    def run_seconds(self, batch: int, repeats: int) -> float:
        """Expected wall time of a verification child at ``batch``."""
        return self.overhead + (1 + repeats) * self.step_seconds(batch)

    def plan(self, cap: int, share: float, repeats: int) -> float:
        """Pick the verified batch: the prediction, capped by ``cap`` and by ``share`` seconds for both
        runs (batch 8 and the largest). Returns the expected seconds."""
        headline = self.run_seconds(self.headline, repeats) if self.largest >= self.headline else 0.0
        batch = min(self.largest, cap)
        if batch < self.largest:
            self.notes.append(f"batch capped at {batch} by --max-batch")
        while batch > self.headline and headline + self.run_seconds(batch, repeats) > share:
            batch -= 2
        if batch < min(self.largest, cap):
            self.notes.append(f"batch capped at {batch} by --time-budget (est. "
                              f"{self.run_seconds(min(self.largest, cap), repeats):.0f} s at {min(self.largest, cap)})")
        self.run_batch = batch
        extra = self.run_seconds(batch, repeats) if batch not in (0, self.headline) else 0.0
        self.plan_seconds = headline + extra
        return self.plan_seconds

    def predicted_peak(self, batch: int) -> float:
        return self.before + self.memory(batch)


def share_out(pairs: list[Pair], seconds: float, cap: int, repeats: int) -> None:
    """Water-filling: cheapest pair first, each gets at most an equal share of what is left."""
    full = {id(p): p.run_seconds(min(p.largest, cap), repeats) for p in pairs}
    left = sorted(pairs, key=lambda p: full[id(p)])
    while left:
        pair = left.pop(0)
        seconds -= pair.plan(cap, seconds / (len(left) + 1), repeats)


def verify(pair: Pair, args: argparse.Namespace) -> None:
    """The headline batch (if it fits) and the planned batch, stepping down after a memory failure."""
    if pair.largest >= pair.headline:
        result = run_child(args, pair.encoder, pair.precision, pair.headline, args.repeats)
        if "failed" in result:
            pair.notes.append(f"batch {pair.headline}: {result['failed']}")
            pair.run_batch = min(pair.run_batch, floor_even(pair.headline * _STEP_DOWN))
        else:
            pair.runs[pair.headline] = result
    else:
        pair.notes.append(f"batch {pair.headline} predicted not to fit")
    batch = pair.run_batch
    for attempt in range(_MAX_STEP_DOWNS + 1):
        if batch < 1 or batch in pair.runs:
            break
        result = run_child(args, pair.encoder, pair.precision, batch, args.repeats)
        if "failed" not in result:
            pair.runs[batch] = result
            break
        lower = min(batch - 2, floor_even(batch * _STEP_DOWN))
        last = attempt == _MAX_STEP_DOWNS or lower < 1
        pair.notes.append(f"batch {batch}: {result['failed']}; " + ("giving up" if last else f"stepping down to {lower}"))
        batch = lower
    pair.run_batch = batch if batch in pair.runs else 0


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def print_table(pairs: list[Pair], headline: int) -> None:
    b8 = f"b{headline}"
    print(f"\n{'encoder':<14}{'prec':<6}{'MiB/img':>8}{'fixed':>7}{'pred B':>7}{'run B':>6}"
          f"{'peak GiB pred/meas':>20}{f'img/s {b8}':>10}{'img/s B':>9}{f'B/{b8}':>7}")
    for p in pairs:
        run = p.runs.get(p.run_batch)
        b8 = p.runs.get(p.headline)
        peak = f"{_gib(p.predicted_peak(p.run_batch))}/{_gib(run['peak_mib'])}" if run else "-"
        rate_b8 = f"{b8['images_s']:.2f}" if b8 else "-"
        rate = f"{run['images_s']:.2f}" if run else "-"
        ratio = f"{run['images_s'] / b8['images_s']:.2f}x" if run and b8 else "-"
        print(f"{p.encoder:<14}{p.precision:<6}{p.memory.slope:>8.0f}{p.memory.intercept:>7.0f}{p.largest:>7}"
              f"{p.run_batch or '-':>6}{peak:>20}{rate_b8:>10}{rate:>9}{ratio:>7}")
    for p in pairs:
        run = p.runs.get(p.headline)
        if run and p.headline not in (pr["batch"] for pr in p.probes):
            print(f"  {p.encoder} {p.precision}: fit check at batch {p.headline}: step memory predicted "
                  f"{p.memory(p.headline):.0f} MiB, measured {run['step_mib']:.0f} MiB")
        for note in p.notes:
            print(f"  {p.encoder} {p.precision}: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    parser.add_argument("--encoders", nargs="+", default=["resnet50", "se_resnext50", "pnasnet5"])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8, help="headline training batch, as bench_model (8)")
    parser.add_argument("--probe-batches", type=int, nargs=2, default=[2, 4], metavar=("B1", "B2"),
                        help="the two batches the memory and time fits go through (default 2 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--max-batch", type=int, default=1024, help="cap on the verified batch (default 1024)")
    parser.add_argument("--margin", type=float, default=0.1, help="share of available memory kept free (0.1)")
    parser.add_argument("--time-budget", type=float, default=1200.0,
                        help="seconds for the whole run; caps the verified batches (default 1200)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory-limit", type=float, metavar="MIB",
                        help="memory available to a step, if less than the machine has (what fits on a smaller one)")
    parser.add_argument("--no-cap-memory", dest="cap_memory", action="store_false",
                        help="do not cap each CPU child's data segment at the available memory")
    parser.add_argument("--child", nargs=4, metavar=("ENCODER", "PRECISION", "BATCH", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    b1, b2 = sorted(args.probe_batches)
    if b1 < 1 or b1 == b2:
        parser.error("--probe-batches needs two different batches >= 1")

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    memory = "GPU free memory" if device.type == "cuda" else f"MemAvailable {mem_available_mib() / 1024:.1f} GiB"
    print(f"device: {where}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, {memory}, load average {load_average()}")
    print(f"input {args.size}x{args.size}; fits through batches {b1} and {b2}; largest batch = even batch "
          f"within {1 - args.margin:.0%} of available memory; 1 warm-up + {args.repeats} timed steps, "
          f"median; time budget {args.time_budget:.0f} s\n", flush=True)

    start = time.perf_counter()
    pairs = []
    for encoder in args.encoders:
        for precision in args.precision:
            probes = [run_child(args, encoder, precision, b, 1) for b in (b1, b2)]
            failed = [f"batch {b}: {p['failed']}"
                      for p, b in zip(probes, (b1, b2), strict=True) if "failed" in p]
            if failed:
                print(f"probe {encoder} {precision}: {'; '.join(failed)}: skipped")
                continue
            pair = Pair(encoder, precision, probes, args.margin, args.batch)
            pairs.append(pair)
            print(f"probe {encoder:<13}{precision:<5} step MiB {probes[0]['step_mib']:.0f} / {probes[1]['step_mib']:.0f}"
                  f", s {probes[0]['step_s']:.2f} / {probes[1]['step_s']:.2f} at batch {b1} / {b2}; "
                  f"available {pair.available / 1024:.1f} GiB -> largest batch {pair.largest}, "
                  f"est. {pair.run_seconds(pair.largest, args.repeats):.0f} s to verify", flush=True)
    probing = time.perf_counter() - start
    share_out(pairs, args.time_budget - probing, args.max_batch, args.repeats)
    print(f"probes: {probing:.0f} s; verifying (expected {sum(p.plan_seconds for p in pairs):.0f} s)", flush=True)
    for pair in pairs:
        verify(pair, args)
        print(f"  {pair.encoder} {pair.precision}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print_table(pairs, args.batch)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
