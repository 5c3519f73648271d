"""Training precision: bf16 + channels_last against fp32, same data, same configuration, same seeds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_precision.py [--patients 300] [--size 192]
        [--encoder resnet50] [--epochs 8] [--batch 8] [--seeds 0 1] [--precision fp32 bf16]
        [--eval-precision same] [--out DIR]

One synthetic dataset (``make_synthetic_dataset``, ``--patients`` at ``--size`` px, seed 0), one
patient-level split (70/15/15 %) and one image cache are made first and shared by every run. Then, for
each seed, the same ``TrainConfig`` (``default`` recipe, ``--encoder`` from random init, ``light``
augmentation, ``--epochs``, batch ``--batch``) is trained once per precision: "fp32" = Lightning
``32-true`` with contiguous tensors, "bf16" = ``bf16-mixed`` autocast with channels_last weights and
inputs. Precisions take turns within a seed so both see the same background load.

Per run: train wall time (``train``'s fit: every epoch's training and validation); CPU seconds of this
process over the ``train`` call (all its threads, loader workers not included), which stays honest
when other jobs pause or crowd the run; images/s (training images x epochs / wall time); validation
RSNA mAP (best epoch, threshold swept on validation); and, from ``pneumodet.evaluation.evaluate`` on
the held-out test split, the test RSNA mAP at the validation-chosen threshold and the pneumonia AUC
of the global head. Evaluation runs at the
precision the model trained in (``--eval-precision same``) unless told otherwise. Then per precision
the mean and the seed-to-seed spread (max - min), the bf16 - fp32 difference of the means set against
that spread (the noise of this measurement), and the train-time ratio fp32 / bf16 (higher = bf16
faster).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import cpu_model, load_average
from pneumodet.config import TrainConfig
from pneumodet.data.cache import build_cache, default_cache_dir
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import read_split, split_patients, write_split
from pneumodet.data.synth import make_synthetic_dataset
from pneumodet.evaluation import evaluate
from pneumodet.training import hardware_has_bf16, train

#: What each precision name sets in the TrainConfig.
PRECISIONS: dict[str, dict[str, object]] = {
    "fp32": dict(precision="32-true", channels_last=False),
    "bf16": dict(precision="bf16-mixed", channels_last=True),
}
METRICS = ("seconds", "cpu_seconds", "images_per_s", "val_map", "test_map", "auc")


@dataclass
class RunResult:
    """One trained and evaluated run."""

    precision: str
    seed: int
    seconds: float
    cpu_seconds: float
    images_per_s: float
    val_map: float
    test_map: float
    auc: float


def prepare(root: Path, patients: int, size: int) -> tuple[Path, Path, dict[str, int]]:
    """The shared synthetic dataset, split and image cache under ``root``: (data folder, split folder,
    patients per set)."""
    data_dir, split_dir = root / "data", root / "split"
    make_synthetic_dataset(data_dir, patients=patients, size=size, seed=0)
    records = load_rsna(data_dir).records
    write_split(split_patients(records, val=0.15, test=0.15, seed=0), split_dir, source=str(data_dir))
    sets = read_split(split_dir)
    build_cache([r for part in sets.values() for r in part], default_cache_dir(data_dir, size), size=size,
                progress=False)
    return data_dir, split_dir, {name: len(part) for name, part in sets.items()}


def run_config(args: argparse.Namespace, data_dir: Path, split_dir: Path, run_dir: Path, precision: str,
               seed: int) -> TrainConfig:
    return TrainConfig.with_recipe(
        "default", data_dir=str(data_dir), split_dir=str(split_dir), out_dir=str(run_dir),
        encoder=args.encoder, aug="light", image_size=args.size, epochs=args.epochs, batch_size=args.batch,
        num_workers=args.workers, seed=seed, accelerator="cpu", checkpoint_every_n_steps=0,
        **PRECISIONS[precision])


def train_and_evaluate(config: TrainConfig, precision: str, eval_precision: str) -> RunResult:
    """Train ``config`` and score its best model on the test split."""
    cpu_start = time.process_time()
    result = train(config, progress=False)
    cpu_seconds = time.process_time() - cpu_start
    metrics = evaluate(Path(config.out_dir), split="test", device="cpu",
                       precision=precision if eval_precision == "same" else eval_precision)
    trained = len(read_split(Path(config.split_dir))["train"]) - len(result.excluded.get("train", []))
    return RunResult(precision=precision, seed=config.seed, seconds=result.seconds,
                     cpu_seconds=cpu_seconds,
                     images_per_s=trained * result.epochs / result.seconds, val_map=result.best_map,
                     test_map=float(metrics["rsna_map"]), auc=float(metrics["global_class"]["pneumonia_auc"]))


def header(label: str, seed: str) -> str:
    return f"{label:<10}{seed:>6}{'train s':>10}{'cpu s':>8}{'img/s':>9}{'val mAP':>10}{'test mAP':>10}{'AUC':>10}"


def row(label: str, seed: str, values: Sequence[float]) -> str:
    seconds, cpu_seconds, rate, *scores = values
    return f"{label:<10}{seed:>6}{seconds:>10.1f}{cpu_seconds:>8.1f}{rate:>9.2f}" + "".join(f"{v:>10.4f}" for v in scores)


def summarize(results: list[RunResult], precisions: Sequence[str]) -> list[str]:
    """Mean and spread per precision, bf16 - fp32 of the means against the spread, time ratio."""
    lines = ["", header("mean", "seeds")]
    means: dict[str, dict[str, float]] = {}
    spreads: dict[str, dict[str, float]] = {}
    for precision in precisions:
        runs = [r for r in results if r.precision == precision]
        means[precision] = {m: statistics.fmean(getattr(r, m) for r in runs) for m in METRICS}
        spreads[precision] = {m: max(getattr(r, m) for r in runs) - min(getattr(r, m) for r in runs)
                              for m in METRICS}
        lines.append(row(precision, str(len(runs)), [means[precision][m] for m in METRICS]))
    for precision in precisions:
        lines.append(row(f"spread {precision}", "", [spreads[precision][m] for m in METRICS]))
    if not {"fp32", "bf16"} <= set(precisions):
        return lines
    diff = [means["bf16"][m] - means["fp32"][m] for m in METRICS]
    lines.append(row("bf16-fp32", "", diff))
    lines.append("")
    if min(sum(r.precision == p for r in results) for p in ("fp32", "bf16")) < 2:
        lines.append("one seed per precision: no seed-to-seed spread to set the difference against")
    else:
        lines += [noise_verdict(means, spreads, metric, name)
                  for metric, name in (("val_map", "val mAP"), ("test_map", "test mAP"), ("auc", "AUC"))]
    lines.append(f"train time ratio fp32 / bf16: {means['fp32']['seconds'] / means['bf16']['seconds']:.2f}x wall, "
                 f"{means['fp32']['cpu_seconds'] / means['bf16']['cpu_seconds']:.2f}x CPU")
    return lines


def noise_verdict(means: dict[str, dict[str, float]], spreads: dict[str, dict[str, float]], metric: str,
                  name: str) -> str:
    """Whether bf16 - fp32 of the means is within the larger seed-to-seed spread of the two."""
    d = means["bf16"][metric] - means["fp32"][metric]
    noise = max(spreads["fp32"][metric], spreads["bf16"][metric])
    verdict = "within" if abs(d) <= noise else "outside"
    return f"{name:<9} bf16 - fp32 = {d:+.4f}; seed-to-seed spread up to {noise:.4f}: {verdict} the noise"


def quiet_lightning() -> None:
    """Lightning's per-run banners and hints would bury the table; its errors still show."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300, help="synthetic patients (default 300)")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    parser.add_argument("--encoder", default="resnet50", help="timm encoder, random init (default resnet50)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--eval-precision", default="same", choices=["same", "fp32", "bf16"],
                        help="inference precision of the test evaluation (default: the run's own)")
    parser.add_argument("--out", type=Path, help="keep the data and runs here (default: a temporary folder)")
    args = parser.parse_args()
    quiet_lightning()

    print(f"device: {cpu_model()} (bf16 native: {hardware_has_bf16('cpu')}); torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cores {os.cpu_count()}, load average {load_average()}")
    print(f"{args.encoder} random init, {args.size} px, {args.epochs} epochs, batch {args.batch}, aug light, "
          f"recipe default, {args.workers} loader worker(s); seeds {args.seeds}; precisions {args.precision}; "
          f"evaluation precision: {args.eval_precision}")

    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        root = args.out or Path(tmp)
        start = time.perf_counter()
        data_dir, split_dir, sets = prepare(root, args.patients, args.size)
        print(f"data: {args.patients} synthetic patients ({', '.join(f'{k} {v}' for k, v in sets.items())}), "
              f"split and cache made in {time.perf_counter() - start:.0f} s\n", flush=True)
        print(header("precision", "seed"))
        results = []
        for seed in args.seeds:
            for precision in args.precision:
                config = run_config(args, data_dir, split_dir, root / "runs" / f"{precision}_seed{seed}",
                                    precision, seed)
                result = train_and_evaluate(config, precision, args.eval_precision)
                results.append(result)
                print(row(precision, str(seed), [getattr(result, m) for m in METRICS]), flush=True)
        print("\n".join(summarize(results, args.precision)))
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
