"""Augmentation speed per core: pneumodet's one-warp levels against a chain of torchvision v2 transforms.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_augment.py [--size 512] [--input 512] [--n 300]

For each level, images per CPU-second on ONE core (OpenCV and torch limited to one thread) of
  * pneumodet: ``build_augmentation(level, size)`` on a uint8 image with two boxes;
  * the peer, measured in the same run: the same level written as the usual chain of separate
    torchvision v2 transforms on ``tv_tensors`` (Resize, RandomAffine, RandomHorizontalFlip, gamma,
    GaussianBlur, GaussianNoise, SanitizeBoundingBoxes; torchvision has no salt-and-pepper, so the
    peer does a little less work at the heavy levels),
and the ratio. The input is a synthetic chest-like image of ``--input`` pixels (the cache normally
holds images at the training size); every figure is the median of 5 repeats after a warm-up pass, the two sides
timed alternately so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from _common import cpu_model
from pneumodet.data.augment import LEVEL_SPECS, LEVELS, build_augmentation


def test_image(side: int, seed: int = 0) -> np.ndarray:
    """A smooth bright body with two darker lung fields and film grain, uint8 ``[side, side]``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    body = 200 - 120 * ((x - 0.5) ** 2 + (y - 0.55) ** 2)
    lungs = 70 * (np.exp(-((x - 0.32) ** 2 + (y - 0.45) ** 2) / 0.02) + np.exp(-((x - 0.68) ** 2 + (y - 0.45) ** 2) / 0.02))
    return np.clip(body - lungs + rng.normal(0, 6, (side, side)), 0, 255).astype(np.uint8)


def torchvision_chain(level: str, size: int) -> v2.Compose:
    """The level as separate torchvision v2 steps (uniform ranges stand in for the Gaussians)."""
    s = LEVEL_SPECS[level]
    steps: list[torch.nn.Module] = [v2.Resize((size, size), antialias=True)]
    if level != "resize_only":
        steps.append(v2.RandomAffine(
            degrees=2 * s.rotation_std, translate=(s.max_shift, s.max_shift),
            scale=(2 ** (-2 * s.log2_scale_std), 2 ** (2 * s.log2_scale_std)), shear=2 * s.shear_std))
        if s.flip_p:
            steps.append(v2.RandomHorizontalFlip(s.flip_p))
        steps.append(v2.Lambda(lambda img: v2.functional.adjust_gamma(img, float(2 ** np.random.normal(0, s.log2_gamma_std))),
                               tv_tensors.Image))
    if s.blur_p:
        steps.append(v2.RandomApply([v2.GaussianBlur(13, sigma=(0.01, s.max_blur_sigma))], p=s.blur_p))
    if s.noise_p:
        steps += [v2.ToDtype(torch.float32, scale=True),
                  v2.RandomApply([v2.GaussianNoise(sigma=s.max_noise_sigma / 255 / 2)], p=s.noise_p),
                  v2.ToDtype(torch.uint8, scale=True)]
    steps.append(v2.SanitizeBoundingBoxes(labels_getter=None))
    return v2.Compose(steps)


def rates(ours: Callable[[], None], peer: Callable[[], None], n: int, n_peer: int,
          repeats: int = 5) -> tuple[float, float]:
    """Median images per CPU-second of both over ``repeats``, interleaved.

    CPU time of this process (all its threads) rather than wall time: on a shared machine, time spent
    waiting for a core is not work, and one thread per library makes CPU-seconds core-seconds.
    """
    for work, count in ((ours, max(1, n // 10)), (peer, max(1, n_peer // 10))):
        for _ in range(count):  # warm-up
            work()
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for work, count, out in ((ours, n, timings[0]), (peer, n_peer, timings[1])):
            start = time.process_time()
            for _ in range(count):
                work()
            out.append(count / (time.process_time() - start))
    return statistics.median(timings[0]), statistics.median(timings[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="training size (output side)")
    parser.add_argument("--input", type=int, default=512, help="input image side (default: the training size)")
    parser.add_argument("--n", type=int, default=300, help="images per repeat (the slower peer does n/5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is printed")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    image = test_image(args.input)
    scale = args.input / 1024
    boxes = np.array([[264, 152, 477, 531], [562, 152, 818, 605]], np.float32) * scale

    print(f"CPU: {cpu_model()}; 1 thread; input {args.input} px -> {args.size} px, 2 boxes; "
          f"opencv {cv2.__version__}, torch {torch.__version__}")
    print(f"{'level':<22}{'pneumodet img/CPU-s':>21}{'torchvision v2 chain img/CPU-s':>32}{'ratio':>8}")
    for level in LEVELS:
        aug, rng = build_augmentation(level, args.size), np.random.default_rng(0)
        chain = torchvision_chain(level, args.size)
        tv_image = tv_tensors.Image(torch.from_numpy(image)[None])
        tv_boxes = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                            canvas_size=(args.input, args.input))
        ours, peer = rates(lambda aug=aug, rng=rng: aug(image, boxes, rng),
                           lambda chain=chain, a=tv_image, b=tv_boxes: chain(a, b),
                           args.n, max(20, args.n // 5), args.repeats)
        print(f"{level:<22}{ours:>21.0f}{peer:>32.0f}{ours / peer:>7.1f}x")


if __name__ == "__main__":
    main()
