"""Achieved FLOP/s: pneumodet's training and inference steps against the machine's measured peak.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_peak.py [--size 512] [--batch 8] [--infer-batch 16]
        [--repeats 3] [--matmul 4096] [--conv 8 256 64]

The peak is measured, not read from a datasheet: a square fp32 matmul (``--matmul`` side) and a 3x3
convolution with as many input as output channels on a channels_last ``[B, C, H, H]`` input
(``--conv B C H``), each in fp32 and under CPU/CUDA autocast bf16. Then pneumodet's RetinaNet
(resnet50, ``--size`` px, bf16 + channels_last): the training step (forward, loss, backward, SGD) at
``--batch`` and inference (forward, decoding, NMS) at ``--infer-batch``. FLOPs of one step, backward
included, come from ``torch.utils.flop_counter.FlopCounterMode``; achieved FLOP/s = FLOPs / median
step time, reported as a fraction of the bf16 convolution peak (the kernel the backbone mostly runs).
Finally one profiled step of each (``torch.profiler``, shapes not recorded): self CPU time (on a GPU,
the device time of the kernels each op launched) grouped as convolution / matmul / batch norm /
loss + matching / NMS / other, and the top ops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from _common import cpu_model, load_average
from bench_model import PneumodetPeer, autocast, infer_step, train_step
from pneumodet.model import ModelConfig, build_model

LOSS_RANGE = "pneumodet.loss"
GROUPS = ("conv", "matmul", "batchnorm", "loss+matching", "NMS", "other")


def median_seconds(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``step`` over ``repeats`` runs after one warm-up run."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one run of ``step`` (forward and, where the step has one, backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def matmul_peak(side: int, precision: str, repeats: int, device: torch.device) -> float:
    """FLOP/s of ``[side, side] @ [side, side]``."""
    a, b = torch.rand(side, side, device=device), torch.rand(side, side, device=device)

    def step() -> None:
        with torch.no_grad(), autocast(device, precision):
            a @ b

    return 2 * side**3 / median_seconds(step, repeats, device)


def conv_peak(batch: int, channels: int, side: int, precision: str, repeats: int, device: torch.device) -> float:
    """FLOP/s of a 3x3, stride 1, padding 1 convolution ``[B, C, H, H] -> [B, C, H, H]``, channels_last."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.rand(batch, channels, side, side, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.no_grad(), autocast(device, precision):
            conv(x)

    return 2 * batch * side * side * channels * channels * 9 / median_seconds(step, repeats, device)


def label_loss(peer: PneumodetPeer) -> None:
    """Wrap the model's loss in a profiler range so that its ops (anchor matching included) can be told apart."""
    loss = peer.model.loss

    def labelled(*args, **kwargs):
        with record_function(LOSS_RANGE):
            return loss(*args, **kwargs)

    peer.model.loss = labelled


def _in_loss(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == LOSS_RANGE:
            return True
        parent = parent.cpu_parent
    return False


def op_group(event) -> str:
    """The group of one profiler event, by where it ran (inside the loss) or by op name."""
    name = event.name.lower()
    if "nms" in name:
        return "NMS"
    if _in_loss(event):
        return "loss+matching"
    if "conv" in name:
        return "conv"
    if "batch_norm" in name:
        return "batchnorm"
    if any(op in name for op in ("::mm", "addmm", "bmm", "matmul", "linear")):
        return "matmul"
    return "other"


def profile_step(step: Callable[[], None], device: torch.device) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self seconds of one step per group, and per op name (largest first): CPU time on the CPU; on a GPU
    the device time of the kernels each op launched (ops, not kernels, so the groups still apply)."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=False) as prof:
        step()
        if on_gpu:
            torch.cuda.synchronize(device)
    groups: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name == LOSS_RANGE or (on_gpu and event.device_type != DeviceType.CPU):
            continue  # a kernel's time is counted in the op that launched it
        seconds = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6
        groups[op_group(event)] += seconds
        ops[event.name] += seconds
    return dict(groups), sorted(ops.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--infer-batch", type=int, default=16, help="inference batch (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after warm-up (default 3)")
    parser.add_argument("--matmul", type=int, default=4096, help="matmul side (default 4096)")
    parser.add_argument("--conv", type=int, nargs=3, default=[8, 256, 64], metavar=("B", "C", "H"),
                        help="conv input [B, C, H, H] (default 8 256 64)")
    parser.add_argument("--top", type=int, default=8, help="top ops listed per step (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # fixed shapes: the conv peak and the steps get autotuned kernels

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device: {where}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {load_average()}")
    print(f"median of {args.repeats} runs after 1 warm-up\n")

    b, c, h = args.conv
    conv_label = f"conv 3x3 [{b},{c},{h},{h}] channels_last"
    kernels = {f"matmul {args.matmul}x{args.matmul}": partial(matmul_peak, args.matmul),
               conv_label: partial(conv_peak, b, c, h)}
    peaks = {}
    print(f"{'peak kernel':<44}{'fp32 GFLOP/s':>14}{'bf16 GFLOP/s':>14}{'bf16/fp32':>11}")
    for label, measure in kernels.items():
        fp32, bf16 = (measure(precision, args.repeats, device) for precision in ("fp32", "bf16"))
        peaks[label] = bf16
        print(f"{label:<44}{fp32 / 1e9:>14.1f}{bf16 / 1e9:>14.1f}{bf16 / fp32:>10.2f}x", flush=True)
    peak = peaks[conv_label]

    peer = PneumodetPeer("pneumodet", build_model(ModelConfig(encoder="resnet50", image_size=args.size)),
                         args.size, device)
    label_loss(peer)
    jobs = ((f"train b{args.batch}", train_step, args.batch), (f"infer b{args.infer_batch}", infer_step, args.infer_batch))
    print(f"\npneumodet resnet50 {args.size} px, bf16 + channels_last")
    print(f"{'step':<14}{'GFLOP/step':>12}{'s/step':>9}{'img/s':>8}{'GFLOP/s':>10}{'of bf16 conv peak':>19}")
    profiles = {}
    for name, make_step, batch in jobs:
        step = make_step(peer, batch, "bf16")  # sets train/eval mode, so made just before its own runs
        seconds = median_seconds(step, args.repeats, device)
        flops = count_flops(step)
        print(f"{name:<14}{flops / 1e9:>12.1f}{seconds:>9.2f}{batch / seconds:>8.2f}{flops / seconds / 1e9:>10.1f}"
              f"{flops / seconds / peak:>18.0%}", flush=True)
        profiles[name] = profile_step(step, device)

    clock = "device" if device.type == "cuda" else "CPU"
    print(f"\nself {clock} time of one profiled step, by group")
    print(f"{'group':<16}" + "".join(f"{name:>19}" for name in profiles))
    for group in GROUPS:
        cells = []
        for groups, _ in profiles.values():
            total = sum(groups.values())
            cells.append(f"{groups.get(group, 0.0) * 1e3:>8.1f} ms {groups.get(group, 0.0) / total:>5.1%}")
        print(f"{group:<16}" + "".join(f"{cell:>19}" for cell in cells))
    for name, (_, ops) in profiles.items():
        total = sum(s for _, s in ops)
        print(f"\ntop ops, {name} (self {clock}, of {total:.2f} s)")
        for op, seconds in ops[:args.top]:
            print(f"  {op:<60}{seconds * 1e3:>8.1f} ms {seconds / total:>5.1%}")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
