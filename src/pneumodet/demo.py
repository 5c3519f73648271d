"""``pneumodet demo``: the whole job on synthetic data, end to end, in minutes on any CPU.

measure the machine → size the demo → synth → eda → split → cache → train (bf16 where the hardware has it)
→ evaluate on the held-out test set → predict the test DICOMs into a submission → score it → reports.

The size (encoder, input side, epochs, patients) is chosen from the machine's measured training speed so
that the whole demo fits a time budget (10 minutes by default): :func:`measure_training_step` times a few
training steps, :func:`plan_demo` (pure) turns that speed into a :class:`DemoPlan`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import read_split, split_patients, write_split
from pneumodet.data.synth import make_synthetic_dataset
from pneumodet.errors import ConfigError
from pneumodet.evaluation import METRICS_FILE, evaluate
from pneumodet.hardware import (
    PREDICTION_PRECISIONS,
    TRAINING_PRECISIONS,
    Precision,
    lightning_precision,
    parse_precision,
    resolve_precision,
)
from pneumodet.inference import predict, write_prediction_submission
from pneumodet.metrics import rsna_map
from pneumodet.reports.eda import build_eda_report
from pneumodet.reports.runs import write_run_report
from pneumodet.rundir import RunDir
from pneumodet.safeio import write_json
from pneumodet.submission import read_ground_truth
from pneumodet.training import train

#: The demo's fixed training settings; the size (encoder, image size, epochs) comes from its :class:`DemoPlan`.
DEMO_TRAINING: dict[str, Any] = dict(aug="light", batch_size=8, num_workers=1, checkpoint_every_n_steps=50)
#: The synthetic images' side, whatever the training size (the cache resizes them): the same data for every plan.
DEMO_DATA_SIZE = 256
#: Fractions of the patients in the validation and test sets.
DEMO_VAL, DEMO_TEST = 0.15, 0.15
#: The default time budget of the whole demo, in minutes.
DEFAULT_BUDGET_MINUTES = 10.0
#: The share of the budget a plan may use by its estimate: the estimate is rough (data loading, a busy
#: machine, a slower disk), so a plan that fits 75 % of the budget still fits the budget when 30 % off.
BUDGET_SHARE = 0.75


#: A network the demo trains: (timm encoder, training image side, FPN and head channels).
Network = tuple[str, int, int]


@dataclass(frozen=True)
class DemoSize:
    """One size of the demo: the encoder (a timm name, random initialisation), the training image side, the
    FPN/head channels, epochs, and synthetic patients (70 % of them train)."""

    encoder: str
    image_size: int
    fpn_channels: int
    epochs: int
    patients: int

    @property
    def network(self) -> Network:
        """What a training step's cost depends on."""
        return self.encoder, self.image_size, self.fpn_channels

    def describe(self) -> str:
        return (f"{self.encoder}, {self.image_size} px, {self.fpn_channels} FPN channels, {self.epochs} epochs, "
                f"{self.patients} patients")


#: The demo's sizes, from the largest (what a 2-core CPU with AVX512-BF16 trains in about 5 minutes) down;
#: the first whose estimate fits the budget is trained. The RetinaNet heads (4 convolutions of 256
#: channels on every pyramid level, twice) cost more than a resnet50 encoder at 256 px, so a shallower
#: encoder saves a quarter of a step only; the input side (the pyramid levels follow it: P3-P5 at 192 and
#: 256 px, but P2-P4 at 128 px, which costs more than 192) and the head width save the rest.
DEMO_SIZES: tuple[DemoSize, ...] = (
    DemoSize("resnet50", 256, 256, 8, 400),
    DemoSize("resnet18", 256, 256, 8, 400),
    DemoSize("resnet18", 192, 256, 8, 400),
    DemoSize("resnet18", 192, 128, 8, 400),
    DemoSize("resnet18", 192, 128, 8, 300),
    DemoSize("resnet18", 192, 128, 6, 240),
)
#: Cost of one training step (forward, backward, AdamW; batch 8) of each network relative to resnet50 at
#: 256 px with 256 channels, per precision: :func:`measure_training_step` on a 2-core AMD EPYC (one thread,
#: the faster of two rounds; the networks' floating-point operations, 611, 460, 259 and 112 GFLOP per step,
#: give 1, 0.75, 0.42, 0.18: resnet50's convolutions run faster per operation in fp32). The measured step of
#: the chosen network corrects what a ratio misses (:func:`size_demo`). fp16 is costed as bf16; a network
#: missing here by its pixels and channels.
STEP_COST: dict[Network, dict[str, float]] = {
    ("resnet50", 256, 256): {"bf16": 1.0, "fp32": 1.0},
    ("resnet18", 256, 256): {"bf16": 0.59, "fp32": 0.45},
    ("resnet18", 192, 256): {"bf16": 0.36, "fp32": 0.22},
    ("resnet18", 192, 128): {"bf16": 0.18, "fp32": 0.12},
}
#: The time model of everything but training, fitted to the demo's steps on a 2-core CPU: a forward
#: pass (validation, evaluation, prediction) costs this fraction of a training step per batch; Lightning,
#: data loading and checkpoints add this share to training; synthesis, data report, cache and DICOM
#: decoding cost this many seconds per patient; start-up, the split and the reports this many seconds.
FORWARD_SHARE = 0.35
TRAINING_OVERHEAD = 1.2
SECONDS_PER_PATIENT = 0.1
FIXED_SECONDS = 40.0
#: The share of the budget one measurement of a network may take (it times fewer steps past it).
MEASURE_SHARE = 0.05
#: Fewest epochs a planned demo trains: below this the model has not learnt the opacities.
MIN_EPOCHS = 3
#: Fewest synthetic patients a demo takes: 15 % of them must still make validation and test sets with boxes.
MIN_PATIENTS = 60


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains on this machine and why.

    ``seconds_per_step`` is the estimated training step (batch 8) of ``size``'s network in ``precision``,
    from ``measured_seconds_per_step`` of the ``measured`` network; ``estimated_seconds`` the whole demo
    by the time model; ``fits``: whether that is within :data:`BUDGET_SHARE` of ``budget_seconds``
    (false only when even the smallest size at :data:`MIN_EPOCHS` epochs does not fit).
    """

    size: DemoSize
    precision: str
    seconds_per_step: float
    measured: Network
    measured_seconds_per_step: float
    estimated_seconds: float
    budget_seconds: float
    fits: bool

    @property
    def reason(self) -> str:
        """One line: what was measured and what that chose."""
        encoder, side, channels = self.measured
        verdict = (f"within {BUDGET_SHARE:.0%} of" if self.fits else
                   "over (the smallest demo: expect it to run longer than)")
        return (f"measured {1 / self.measured_seconds_per_step:.2f} training steps/s "
                f"({self.measured_seconds_per_step:.2f} s/step, batch {DEMO_TRAINING['batch_size']}) for {encoder} "
                f"at {side} px, {channels} channels in {self.precision} -> chose {self.size.describe()}: "
                f"about {self.estimated_seconds / 60:.1f} min, {verdict} the {self.budget_seconds / 60:g} min budget")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "measured": list(self.measured), "reason": self.reason}


def step_cost(network: Network, precision: str) -> float:
    """:data:`STEP_COST` of ``network`` in ``precision``; for another network, the first's scaled by pixels
    and channels."""
    if network in STEP_COST:
        return STEP_COST[network]["fp32" if precision == "fp32" else "bf16"]
    return (network[1] / 256) ** 2 * (network[2] / 256) ** 2


def estimate_demo_seconds(size: DemoSize, seconds_per_step: float) -> float:
    """The whole demo's seconds by the time model, for a training step of ``seconds_per_step``."""
    batch = DEMO_TRAINING["batch_size"]
    val = test = round(size.patients * DEMO_VAL)
    train_steps = math.ceil((size.patients - val - test) / batch)
    forward = FORWARD_SHARE * seconds_per_step
    training = size.epochs * (train_steps * seconds_per_step + math.ceil(val / batch) * forward)
    testing = 2 * math.ceil(test / batch) * forward  # evaluate, then predict from the DICOMs
    return TRAINING_OVERHEAD * training + testing + SECONDS_PER_PATIENT * size.patients + FIXED_SECONDS


def plan_demo(seconds_per_step: float, precision: str, *, budget_seconds: float = DEFAULT_BUDGET_MINUTES * 60,
              measured: Network | None = None, spent_seconds: float = 0.0,
              sizes: tuple[DemoSize, ...] = DEMO_SIZES) -> DemoPlan:
    """The largest of ``sizes`` whose estimated demo fits :data:`BUDGET_SHARE` of ``budget_seconds``, from
    ``seconds_per_step`` measured for the ``measured`` network (default: the first size's) in ``precision``,
    after ``spent_seconds`` of the budget went on measuring.

    Pure: the same speed gives the same plan. When no size fits, the smallest with fewer epochs (at least
    :data:`MIN_EPOCHS`) that fits, else the smallest at :data:`MIN_EPOCHS` marked ``fits=False``.

    Raises:
        ConfigError: a speed or budget that is not a positive number.
    """
    if not (math.isfinite(seconds_per_step) and seconds_per_step > 0):
        raise ConfigError(f"a training step must take a positive time, got {seconds_per_step} s")
    if not (math.isfinite(budget_seconds) and budget_seconds > 0):
        raise ConfigError(f"the demo's time budget must be a positive number of minutes, got {budget_seconds / 60}")
    measured = measured or sizes[0].network
    per_cost = seconds_per_step / step_cost(measured, precision)

    def plan(size: DemoSize, fits: bool) -> DemoPlan:
        sps = per_cost * step_cost(size.network, precision)
        return DemoPlan(size, precision, sps, measured, seconds_per_step,
                        spent_seconds + estimate_demo_seconds(size, sps), budget_seconds, fits)

    limit = BUDGET_SHARE * budget_seconds
    for size in sizes:
        candidate = plan(size, True)
        if candidate.estimated_seconds <= limit:
            return candidate
    smallest = sizes[-1]
    for epochs in range(smallest.epochs - 1, MIN_EPOCHS - 1, -1):
        candidate = plan(dataclasses.replace(smallest, epochs=epochs), True)
        if candidate.estimated_seconds <= limit:
            return candidate
    return plan(dataclasses.replace(smallest, epochs=MIN_EPOCHS), False)


def measure_training_step(network: Network, precision: Precision, *, device: str = "cpu",
                          batch_size: int = DEMO_TRAINING["batch_size"], steps: int = 3, warmup: int = 1,
                          max_seconds: float = math.inf, seed: int = 0) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW step) of a random-init model of
    ``network`` (encoder, image side, FPN channels) on random images with one box each, in ``precision``
    (bf16 or fp16 autocast, else fp32) and channels-last as training runs it, after ``warmup`` untimed
    steps (the first step of a model pays for memory allocation and kernel selection). Fewer than ``steps``
    are timed (at least one) once the measurement has taken ``max_seconds``: on a slow machine one step
    already tells that the largest demo is out of reach."""
    import torch

    from pneumodet.model import ModelConfig, build_model

    encoder, image_size, channels = network
    generator = torch.Generator().manual_seed(seed)
    model = build_model(ModelConfig(encoder=encoder, image_size=image_size, fpn_channels=channels)).train()
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 1, image_size, image_size, generator=generator).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    corner = torch.rand(batch_size, 1, 2, generator=generator) * image_size / 2
    boxes = torch.cat([corner, corner + image_size / 4], dim=-1).to(device)
    classes = torch.randint(0, 3, (batch_size,), generator=generator).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times: list[float] = []
    begun = time.perf_counter()
    for i in range(warmup + steps):
        if times and time.perf_counter() - begun > max_seconds:
            break
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.loss(model(images), boxes, classes)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def size_demo(precision: Precision, *, budget_seconds: float, measure: Callable[[Network], float],
              say: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> DemoPlan:
    """Measure the largest size's network, plan; when that chose another network, measure it and plan
    again from its own speed (at most two measurements). ``measure(network)`` -> seconds per step; the
    time spent measuring counts against the budget."""
    started = clock()
    first = DEMO_SIZES[0].network
    seconds = measure(first)
    plan = plan_demo(seconds, precision, budget_seconds=budget_seconds, measured=first,
                     spent_seconds=clock() - started)
    if plan.size.network != first:
        say(f"  {plan.reason}; timing that network")
        seconds = measure(plan.size.network)
        plan = plan_demo(seconds, precision, budget_seconds=budget_seconds, measured=plan.size.network,
                         spent_seconds=clock() - started)
    return plan


def run_demo(out: Path, *, patients: int | None = None, seed: int = 0, epochs: int | None = None,
             budget_minutes: float = DEFAULT_BUDGET_MINUTES, precision: str = "auto",
             say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every step into ``out`` and return the headline numbers (also in ``out/demo.json``).

    The demo is sized first (:func:`size_demo`) to finish within ``budget_minutes`` on this machine;
    ``patients`` and ``epochs`` override the plan's. ``precision`` ("auto", "bf16", "fp16", "fp32")
    trains in that precision instead of the machine's native one (e.g. ``fp32`` shows the plan of a
    CPU without bf16). A folder with a plan already (``demo_plan.json``, an interrupted demo) reuses it
    so the data, split and run match it; delete the folder to measure again.
    """

    # checked before the machine is timed: a typo must not cost a measurement
    if not (math.isfinite(budget_minutes) and budget_minutes > 0):
        raise ConfigError(f"the demo's time budget must be a positive number of minutes, got {budget_minutes}")
    if patients is not None and patients < MIN_PATIENTS:
        raise ConfigError(f"the demo needs at least {MIN_PATIENTS} patients (a validation and a test set with "
                          f"patients with boxes), got {patients}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    parse_precision(precision, TRAINING_PRECISIONS)
    out = Path(out)
    started = time.perf_counter()
    data_dir, split_dir, run_dir = out / "data", out / "split", out / "run"

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - started:6.0f} s] {text}")

    plan = _plan(out, budget_minutes, precision, step, say)
    size = dataclasses.replace(plan.size, **{k: v for k, v in (("patients", patients), ("epochs", epochs)) if v})
    if size != plan.size:
        say(f"  given: {size.describe()} (instead of the plan's {plan.size.describe()})")
    if not (data_dir / "stage_2_train_labels.csv").exists():
        step(f"synth: writing {size.patients} synthetic patients to {data_dir}")
        say(str(make_synthetic_dataset(data_dir, patients=size.patients, size=DEMO_DATA_SIZE, seed=seed)))
    step(f"eda: report in {out / 'eda'}")
    build_eda_report(data_dir, out / "eda", seed=seed)
    data = load_rsna(data_dir)
    if not (split_dir / "split.json").exists():
        split = split_patients(data.records, val=DEMO_VAL, test=DEMO_TEST, seed=seed)
        write_split(split, split_dir, source=str(data_dir))
        say(split.summary())
    config = TrainConfig.with_recipe("default", data_dir=str(data_dir), split_dir=str(split_dir),
                                     out_dir=str(run_dir), seed=seed, encoder=size.encoder,
                                     image_size=size.image_size, fpn_channels=size.fpn_channels, epochs=size.epochs,
                                     precision=lightning_precision(plan.precision), **DEMO_TRAINING)
    # prediction autocasts to bf16 only: an fp16 plan predicts in the machine's own precision
    predicting = plan.precision if plan.precision in PREDICTION_PRECISIONS else None
    run = RunDir(run_dir)
    if not run.is_finished():
        step(f"train: {config.model.encoder}, {config.image_size} px, {config.epochs} epochs, aug {config.aug} "
             "(the image cache is built first)")
        say(train(config, resume=run.is_run(), progress=progress).summary())
    step("evaluate: best model on the held-out test set")
    metrics = evaluate(run_dir, split="test", precision=predicting)
    step("predict: the test DICOMs into a Kaggle submission")

    test_records = read_split(split_dir)["test"]
    prediction = predict(run_dir, [r.image_path for r in test_records if r.image_path], progress=progress,
                         precision=predicting)
    submission = write_prediction_submission(prediction, out / "submission.csv")
    ground_truth = read_ground_truth(data_dir / "stage_2_train_labels.csv")
    scored = rsna_map({r.patient_id: ground_truth[r.patient_id] for r in test_records},
                      prediction.submission_boxes())
    step("reports")
    run_report = write_run_report(run.root)
    summary = {
        "test_rsna_map": metrics["rsna_map"], "threshold_from_validation": metrics["threshold"],
        "submission_rsna_map": scored.score, "global_class_accuracy": metrics["global_class"]["accuracy"],
        "pneumonia_auc": metrics["global_class"]["pneumonia_auc"], "seconds": time.perf_counter() - started,
        "estimated_seconds": plan.estimated_seconds, "budget_seconds": plan.budget_seconds,
        "trained": dataclasses.asdict(size), "precision": plan.precision, "plan": plan.to_dict(),
        "reports": {"eda": str(out / "eda" / "report.html"), "run": str(run_report),
                    "evaluation": str(Path(metrics["out_dir"]) / METRICS_FILE), "submission": str(submission)},
    }
    write_json(out / "demo.json", summary)
    say("")
    say(f"test RSNA mAP {summary['test_rsna_map']:.4f} (threshold {metrics['threshold']:.2f} chosen on "
        f"validation); the submission scores {scored.score:.4f}; global-class accuracy "
        f"{summary['global_class_accuracy']:.3f}; finished in {summary['seconds']:.0f} s (estimated "
        f"{plan.estimated_seconds:.0f} s, budget {plan.budget_seconds:.0f} s)")
    for name, path in summary["reports"].items():
        say(f"  {name:<11} {path}")
    return summary


#: The file of a demo folder recording its plan (read again when the demo is run again in that folder).
PLAN_FILE = "demo_plan.json"


def _plan(out: Path, budget_minutes: float, precision: str, step: Callable[[str], None],
          say: Callable[[str], None]) -> DemoPlan:
    """The demo's plan: the one recorded in ``out`` by an earlier run of the demo there, else measured now
    on this machine (:func:`size_demo`) and recorded."""
    import json

    import torch

    recorded = out / PLAN_FILE
    if recorded.is_file():
        plan = plan_from_dict(json.loads(recorded.read_text(encoding="utf-8")))
        step(f"plan: the one in {recorded} (delete the folder to measure again): {plan.size.describe()}")
        return plan
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_precision(parse_precision(precision, TRAINING_PRECISIONS), device,
                                 choices=TRAINING_PRECISIONS)
    step(f"plan: timing a few training steps on this machine ({device}, {resolved}) to fit the demo in "
         f"{budget_minutes:g} minutes")
    plan = size_demo(resolved, budget_seconds=budget_minutes * 60, say=say,
                     measure=lambda network: measure_training_step(network, resolved, device=device,
                                                                   max_seconds=MEASURE_SHARE * budget_minutes * 60))
    say(f"  {plan.reason}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(recorded, plan.to_dict())
    return plan


def plan_from_dict(data: dict[str, Any]) -> DemoPlan:
    """Inverse of :meth:`DemoPlan.to_dict` (:class:`ConfigError` for a file that is not one)."""
    try:
        fields = {f.name: data[f.name] for f in dataclasses.fields(DemoPlan)}
        fields["size"] = DemoSize(**fields["size"])
        encoder, side, channels = fields["measured"]
        fields["measured"] = (str(encoder), int(side), int(channels))
        return DemoPlan(**fields)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ConfigError(f"{PLAN_FILE}: not a demo plan ({type(err).__name__}: {err}); delete the demo folder "
                          "to measure again") from None
