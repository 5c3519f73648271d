"""Model speed: pneumodet's RetinaNet vs torchvision's retinanet_resnet50_fpn, same input, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_model.py [--size 512] [--batch 8]
        [--infer-batch 1 16] [--repeats 5] [--precision fp32 bf16] [--encoder resnet50] [--compile]

Both models: ResNet-50 + FPN RetinaNet, random init, the same square input. Training = forward,
loss, backward and an SGD step; inference = forward + decoding + NMS, pneumodet's network as
``Predictor`` runs it (encoder batch norm folded into the convolutions). "bf16" = CPU/CUDA autocast
bf16 with channels_last weights and inputs. Times are medians after one warm-up step, the models'
steps alternating so all see the same background load; the ratio is torchvision's time /
pneumodet's time (higher = pneumodet faster).

``--compile`` adds inference rows where both networks go through ``compile_for_inference``
(torch.compile, frozen weights, static shapes; compilation in the warm-up), with torchvision eager
timed in the same alternation as a third column: what a user of each gets by default on large jobs;
and a training row with pneumodet's forward compiled (as ``TrainConfig.compile``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import retinanet_resnet50_fpn

from _common import cpu_model, load_average
from pneumodet.model import ModelConfig, build_model
from pneumodet.model.fusion import compile_for_inference, fold_batchnorm


class Peer:
    """One model under test, with a train step and an inference step on the same kind of data."""

    def __init__(self, name: str, model: torch.nn.Module, size: int, device: torch.device) -> None:
        self.name, self.model, self.size, self.device = name, model.to(device), size, device
        self.network = self.inference_network()  # what inference calls
        self.train_network = self.model  # what a training step calls: the model or its torch.compile'd form

    def inference_network(self) -> torch.nn.Module:
        return self.model

    def compiled(self) -> Peer:
        """The same peer whose inference runs through ``compile_for_inference``."""
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.name = f"{self.name} compiled"
        twin.network = compile_for_inference(self.inference_network().eval())
        return twin

    def images(self, batch: int, channels_last: bool) -> torch.Tensor:
        x = torch.rand(batch, 1, self.size, self.size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def boxes(self, batch: int) -> torch.Tensor:
        """One lung-sized box per image, in input pixels: Tensor[B, 1, 4]."""
        s = self.size
        return torch.tensor([[0.2 * s, 0.25 * s, 0.45 * s, 0.7 * s]], device=self.device).expand(batch, 1, 4)


class PneumodetPeer(Peer):
    def inference_network(self) -> torch.nn.Module:
        return fold_batchnorm(self.model)  # a copy, as Predictor does

    def train_step(self, images: torch.Tensor, boxes: torch.Tensor, optimizer) -> None:
        outputs = self.train_network(images)
        losses = self.model.loss(outputs, boxes, torch.ones(len(images), dtype=torch.long, device=self.device))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    def infer(self, images: torch.Tensor) -> None:
        self.model.detect(self.network(images))

    def forward_only(self, images: torch.Tensor) -> None:
        self.model(images)


class TorchvisionPeer(Peer):
    """torchvision takes a list of 3-channel images; the 1-channel batch is expanded (a view)."""

    def _list(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(images.expand(-1, 3, -1, -1))

    def train_step(self, images: torch.Tensor, boxes: torch.Tensor, optimizer) -> None:
        targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long, device=self.device)} for b in boxes]
        losses = self.model(self._list(images), targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def infer(self, images: torch.Tensor) -> None:
        self.network(self._list(images))

    def forward_only(self, images: torch.Tensor) -> None:
        self.infer(images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_group(steps: Sequence[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each step after one warm-up each. The steps take turns, so on a shared
    machine all see the same background load."""
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, out in zip(steps, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(peer: Peer, batch: int, precision: str) -> Callable[[], None]:
    cl = precision == "bf16"
    peer.model.train().to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    optimizer = torch.optim.SGD(peer.model.parameters(), lr=1e-4, momentum=0.9)
    images, boxes = peer.images(batch, cl), peer.boxes(batch)

    def step() -> None:
        with autocast(peer.device, precision):
            peer.train_step(images, boxes, optimizer)

    return step


def infer_step(peer: Peer, batch: int, precision: str) -> Callable[[], None]:
    cl = precision == "bf16"
    fmt = torch.channels_last if cl else torch.contiguous_format
    peer.model.eval().to(memory_format=fmt)
    peer.network.to(memory_format=fmt)
    images = peer.images(batch, cl)

    def step() -> None:
        with torch.inference_mode(), autocast(peer.device, precision):
            peer.infer(images)

    return step


def gflops_per_image(peer: Peer) -> float:
    peer.model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        peer.forward_only(peer.images(1, False))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--infer-batch", type=int, nargs="*", default=[1, 16],
                        help="inference batches (default 1 16; none: training only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up (default 5)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-train", action="store_true", help="inference only")
    parser.add_argument("--encoder", default="resnet50",
                        help="pneumodet's encoder (default resnet50; the peer is always torchvision's ResNet-50)")
    parser.add_argument("--compile", action="store_true",
                        help="also time inference with both networks compiled with frozen weights (compilation in the warm-up)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # fixed input size, as in training: both models get autotuned kernels

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device: {where}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {load_average()}")
    print(f"pneumodet encoder {args.encoder}; input {args.size}x{args.size}, train batch {args.batch}, inference batches {args.infer_batch}, "
          f"median of {args.repeats} alternating runs after 1 warm-up\n")

    ours = PneumodetPeer("pneumodet", build_model(ModelConfig(encoder=args.encoder, image_size=args.size)),
                         args.size, device)
    tv = TorchvisionPeer("torchvision", retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=args.size, max_size=args.size),
        args.size, device)

    f_ours, f_tv = gflops_per_image(ours), gflops_per_image(tv)
    print(f"forward GFLOP/image: pneumodet {f_ours:.1f}, torchvision {f_tv:.1f}, ratio {f_tv / f_ours:.2f}x")
    a_ours = ours.model.anchor_generator(args.size, args.size, device)[0].shape[0]
    print(f"anchors/image: pneumodet {a_ours:,}; torchvision "
          f"{sum(a.shape[0] for a in tv.model.anchor_generator(_image_list(args.size, device), _features(tv, args.size, device))):,}\n")

    print(f"{'measure':<34}{'pneumodet':>12}{'torchvision':>13}{'ratio':>8}")
    for precision in args.precision:
        jobs = [] if args.skip_train else [(f"train img/s  b{args.batch} {precision}", train_step, args.batch)]
        jobs += [(f"infer img/s  b{b} {precision}", infer_step, b) for b in args.infer_batch or ()]
        for label, make_step, batch in jobs:
            t_ours, t_tv = timed_group((make_step(ours, batch, precision), make_step(tv, batch, precision)),
                                       args.repeats, device)
            r_ours, r_tv = batch / t_ours, batch / t_tv
            print(f"{label:<34}{r_ours:>12.2f}{r_tv:>13.2f}{r_ours / r_tv:>7.2f}x", flush=True)
    if args.compile:
        compiled_rows(ours, tv, args, device)
    print(f"\nload average at the end: {load_average()}")


def compiled_rows(ours: Peer, tv: Peer, args: argparse.Namespace, device: torch.device) -> None:
    """Inference with both networks compiled (a fresh compilation per batch shape, in the warm-up),
    torchvision eager in the same alternation."""
    print(f"\n{'compiled (frozen weights)':<34}{'pneumodet':>12}{'torchvision':>13}{'ratio':>8}"
          f"{'tv eager':>10}{'ratio':>8}")
    for precision in args.precision:
        if not args.skip_train:
            compiled_train_row(ours, tv, args.batch, precision, args.repeats, device)
        for batch in args.infer_batch:
            start = time.perf_counter()
            label = f"infer img/s  b{batch} {precision}"
            try:
                times = timed_group([infer_step(p, batch, precision) for p in (ours.compiled(), tv.compiled(), tv)],
                                    args.repeats, device)
            except Exception as err:  # noqa: BLE001 - an Inductor failure on torchvision's graph
                print(f"{label}: torchvision failed to compile ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:160]}); timing pneumodet compiled vs torchvision eager", flush=True)
                t_ours, t_eager = timed_group([infer_step(p, batch, precision) for p in (ours.compiled(), tv)],
                                              args.repeats, device)
                times = [t_ours, float("nan"), t_eager]
            r_ours, r_tv, r_eager = (batch / t for t in times)
            print(f"{label:<34}{r_ours:>12.2f}{r_tv:>13.2f}{r_ours / r_tv:>7.2f}x"
                  f"{r_eager:>10.2f}{r_ours / r_eager:>7.2f}x   ({time.perf_counter() - start:.0f} s with "
                  "compilation)", flush=True)


def compiled_train_row(ours: Peer, tv: Peer, batch: int, precision: str, repeats: int,
                       device: torch.device) -> None:
    """pneumodet's training step with ``torch.compile(model)`` (as ``TrainConfig.compile``), its eager
    step and torchvision's eager step in one alternation. torchvision's training path (lists of
    images, Python loss loops) is not compiled: it would break the graph at every image."""
    twin = type(ours).__new__(type(ours))
    twin.__dict__.update(ours.__dict__)
    twin.train_network = torch.compile(ours.model)
    start = time.perf_counter()
    t_comp, t_eager, t_tv = timed_group([train_step(p, batch, precision) for p in (twin, ours, tv)], repeats, device)
    print(f"{f'train img/s  b{batch} {precision}':<34}{batch / t_comp:>12.2f}{'-':>13}{'':>8}"
          f"{batch / t_tv:>10.2f}{t_tv / t_comp:>7.2f}x   (pneumodet eager {batch / t_eager:.2f}: "
          f"{t_eager / t_comp:.2f}x; {time.perf_counter() - start:.0f} s with compilation)", flush=True)


def _image_list(size: int, device: torch.device):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(torch.zeros(1, 3, size, size, device=device), [(size, size)])


def _features(peer: Peer, size: int, device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(peer.model.backbone(torch.zeros(1, 3, size, size, device=device)).values())


if __name__ == "__main__":
    main()
