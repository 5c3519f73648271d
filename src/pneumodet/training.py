"""Training: what is learned (:class:`DetectorModule`), how runs are kept (checkpoints, metrics.csv) and
the one door that runs it (:func:`train`).

The run folder's layout is owned by :mod:`pneumodet.rundir`.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import pneumodet
from pneumodet.boxes import kaggle_rows, xyxy_to_xywh
from pneumodet.config import TrainConfig
from pneumodet.data.dataset import RsnaDataModule
from pneumodet.data.preprocess import to_unit_range
from pneumodet.data.records import gate_scores
from pneumodet.data.split import split_fingerprint
from pneumodet.errors import CheckpointError, ConfigError, PneumodetError, RunError
from pneumodet.hardware import TRAINING_PRECISIONS, bf16_is_native, lightning_precision
from pneumodet.hardware import resolve_precision as resolve_device_precision
from pneumodet.launch import is_first_process, library_output
from pneumodet.metrics import rsna_map, sweep_thresholds
from pneumodet.model import ModelConfig, build_model
from pneumodet.model.checkpoint import load_checkpoint, save_checkpoint
from pneumodet.progress import Progress, format_duration, progress_style
from pneumodet.rundir import DONE, RunDir
from pneumodet.safeio import atomic_open

LOSS_NAMES = ("total", "classification", "regression", "global")
#: Low enough that the threshold sweep sees every useful box; the sweep picks the real cut-off.
VALIDATION_SCORE_THRESHOLD = 0.05


class NonFiniteLossError(PneumodetError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- hardware
def _device_type(accelerator: str) -> str:
    """The device type an accelerator choice trains on: a GPU when asked for or (``auto``) when present."""
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def hardware_has_bf16(accelerator: str = "auto") -> bool:
    """Whether bf16 autocast is fast for this accelerator choice (a bf16 GPU, or an AMX/AVX512-BF16 CPU)."""
    return bf16_is_native(_device_type(accelerator))


def resolve_precision(config: TrainConfig) -> str:
    """Lightning's name of the config's precision, resolved by :func:`pneumodet.hardware.resolve_precision`."""
    return lightning_precision(resolve_device_precision(config.precision, _device_type(config.accelerator),
                                                        choices=TRAINING_PRECISIONS))


def resolve_accelerator(config: TrainConfig) -> str:
    if config.accelerator != "auto":
        return config.accelerator
    return "gpu" if _device_type("auto") == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------- boxes
def _ground_truth(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{patient_id: [N, 4] xywh}`` from a collated batch (padded rows dropped)."""
    boxes = batch["boxes"].float().cpu().numpy()
    counts = batch["num_boxes"].cpu().numpy()
    return {pid: xyxy_to_xywh(boxes[i, : counts[i]]) for i, pid in enumerate(batch["patient_ids"])}


def _scored_predictions(detections: list, patient_ids: list[str], *, gate: bool = False) -> dict[str, np.ndarray]:
    """``{patient_id: [M, 5] confidence, x, y, w, h}`` from the model's detections; with ``gate`` the
    confidences are the gated ones (:func:`~pneumodet.data.records.gate_scores`)."""
    return {pid: kaggle_rows(det.boxes, gate_scores(det.scores, det.class_probs) if gate else det.scores)
            for pid, det in zip(patient_ids, detections, strict=True)}


# ---------------------------------------------------------------------------------------------- module
class DetectorModule(L.LightningModule):
    """RetinaNet + global class head, its losses, optimiser and validation metric.

    Batches are ``collate_detection`` dicts: ``images`` uint8 ``[B, 1, S, S]``, ``boxes`` float
    ``[B, M, 4]`` zero-padded xyxy in the S frame, ``num_boxes`` ``[B]``, ``classes`` ``[B]``,
    ``patient_ids``. Validation collects detections of every image and sweeps the confidence threshold
    for the RSNA metric at the end of the epoch (gathered across ranks under DDP).
    """

    def __init__(self, model_config: dict[str, Any], train_config: dict[str, Any]) -> None:
        super().__init__()

        self.save_hyperparameters()
        self.train_config = TrainConfig.from_dict(train_config)
        self.model = build_model(ModelConfig.from_dict(model_config),
                                 loss_normalizer=self.train_config.loss_normalizer)
        if self.train_config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if self.train_config.compile else self.model
        self._val_ground_truth: dict[str, np.ndarray] = {}
        self._val_predictions: dict[str, np.ndarray] = {}
        self._val_gated: dict[str, np.ndarray] = {}
        #: the latest validation result: map, threshold, per-threshold breakdown
        self.validation_result: dict[str, Any] = {}
        #: the latest training step's losses (detached; read by :class:`FirstSteps`)
        self.step_losses: dict[str, torch.Tensor] = {}

    # -- shared
    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = to_unit_range(batch["images"].to(self.device, non_blocking=True))
        if self.train_config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _losses(self, batch: Mapping[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        outputs = self.network(self._images(batch))
        losses = self.model.loss(outputs, batch["boxes"].float(), batch["classes"])
        return outputs, losses

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        for name in LOSS_NAMES:
            self.log(f"{stage}/{name}", losses[name].detach().float(), on_step=on_step, on_epoch=True,
                     batch_size=batch_size, sync_dist=stage != "train", prog_bar=name == "total")

    # -- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _, losses = self._losses(batch)
        if not torch.isfinite(losses["total"]):
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.current_epoch}, step {self.global_step} ({values}); "
                f"the last good checkpoint is kept in {Path(self.train_config.out_dir) / 'checkpoints'}")
        self._log_losses("train", losses, len(batch["patient_ids"]))
        self.step_losses = {name: losses[name].detach() for name in LOSS_NAMES}
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return losses["total"]

    # -- validation
    def on_validation_epoch_start(self) -> None:
        self._val_ground_truth, self._val_predictions, self._val_gated = {}, {}, {}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        outputs, losses = self._losses(batch)
        self._log_losses("val", losses, len(batch["patient_ids"]))
        detections = self.model.detect(outputs, score_thresh=VALIDATION_SCORE_THRESHOLD)
        self._val_ground_truth.update(_ground_truth(batch))
        self._val_predictions.update(_scored_predictions(detections, batch["patient_ids"]))
        self._val_gated.update(_scored_predictions(detections, batch["patient_ids"], gate=True))

    def on_validation_epoch_end(self) -> None:

        gt, preds, gated = self._gathered_validation()
        try:
            sweep = sweep_thresholds(gt, preds)
        except ValueError:  # nothing to score: no validation box and no prediction at any cut-off
            self.validation_result = {}
            return
        kept = {pid: p[p[:, 0] >= sweep.best_threshold] for pid, p in preds.items()}
        result = rsna_map(gt, kept)
        self.validation_result = {
            "map": float(sweep.best_score), "threshold": float(sweep.best_threshold),
            "per_threshold": {f"{t:.2f}": float(v) for t, v in result.per_threshold.items()},
            "images": int(result.n_images),
        }
        with contextlib.suppress(ValueError):  # gating can drop every box below the sweep's lowest cut-off
            gated_sweep = sweep_thresholds(gt, gated)
            self.validation_result.update(gate_map=float(gated_sweep.best_score),
                                          gate_threshold=float(gated_sweep.best_threshold))
            self.log("val/gate_map", float(gated_sweep.best_score), sync_dist=False)
            self.log("val/gate_threshold", float(gated_sweep.best_threshold), sync_dist=False)
        self.log("val/map", float(sweep.best_score), sync_dist=False, prog_bar=True)
        self.log("val/threshold", float(sweep.best_threshold), sync_dist=False)
        for t, v in result.per_threshold.items():
            self.log(f"val/map@{t:.2f}", float(v), sync_dist=False)

    def _gathered_validation(self) -> tuple[dict[str, np.ndarray], ...]:
        """Every rank's validation outputs (ground truth, predictions, gated predictions) merged by patient
        id (DDP samplers may repeat patients)."""
        mine = (self._val_ground_truth, self._val_predictions, self._val_gated)
        if not (self.trainer.world_size > 1 and torch.distributed.is_initialized()):
            return mine
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, mine)
        merged: tuple[dict[str, np.ndarray], ...] = tuple({} for _ in mine)
        for part in parts:
            for into, values in zip(merged, part, strict=True):
                into.update(values)
        return merged

    # -- optimisation
    def configure_optimizers(self) -> Any:
        cfg = self.train_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "monitor": "val/total", "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = warmup_length(total, cfg.warmup_fraction, cfg.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint contents: RNG streams so a resumed run draws what the uninterrupted one would have
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pneumodet"] = {
            "rng": _rng_state(), "validation_result": self.validation_result,
            "versions": _versions(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("pneumodet", {})
        if "rng" in state:
            _set_rng_state(state["rng"])
        self.validation_result = state.get("validation_result", {})


def warmup_length(total: int, fraction: float, min_steps: int) -> int:
    """Optimiser steps of linear warm-up in a run of ``total`` steps: ``fraction`` of them, but at least
    ``min_steps`` as long as that is at most half the run.

    Why a floor in steps: AdamW moves every weight by about the learning rate per step whatever its gradient,
    so the step count to the peak rate is what matters, not its share of the run. With 10 % of a short run
    (28 steps in a 280-step run) a network from random initialisation reaches 3e-4 before its features tell
    boxes from background: every anchor's logit is pushed up with the positives' and the background's focal
    loss jumps ~10^4-fold (docs/BENCHMARKS.md, bench_quality). The cap keeps a short run's peak rate.
    """
    return max(int(fraction * total), min(min_steps, total // 2))


class _WarmupCosine:
    """Linear warm-up to 1, then cosine decay to 1 % (a picklable LR lambda)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + float(np.cos(np.pi * progress)))


def _versions() -> dict[str, str]:

    return {"pneumodet": pneumodet.__version__, "torch": str(torch.__version__), "lightning": str(L.__version__)}


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values only, so checkpoints load with ``weights_only=True``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(map(int, random.getstate()[1])), random.getstate()[0]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))


# ---------------------------------------------------------------------------------------------- run keeping
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a killed write never leaves a half file
    where ``--resume`` looks; loaded with ``weights_only=True``, so loading never runs code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:  # disk full (torch says RuntimeError), read-only folder
            raise CheckpointError(f"{path}: cannot write the checkpoint ({getattr(err, 'strerror', None) or err}); "
                                  "the previous one is kept") from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            # torch's message is many lines and suggests weights_only=False; keep the one-line reason
            reason = " ".join(str(err).split("WeightsUnpickler error:")[-1].split())[:300]
            raise CheckpointError(f"{path}: cannot be loaded as a training checkpoint (objects other than "
                                  f"tensors and plain data are refused; a damaged file cannot be resumed): "
                                  f"{type(err).__name__}: {reason}") from err


class RunKeeper(L.Callback):
    """Keeps the run directory through :class:`~pneumodet.rundir.RunDir`: the ``last`` checkpoint, model
    files, ``metrics.csv``.

    ``last.ckpt`` is written every ``every_n_steps`` optimiser steps and at every epoch end;
    ``best_model.pt`` whenever validation mAP improves. An epoch that ends without validation (training
    stopped by ``max_steps`` part-way through it) is recorded by :meth:`record_epoch` after a final
    validation, so every run that trained at least one step ends with a validated model.
    """

    def __init__(self, run: RunDir, every_n_steps: int) -> None:
        self.run = run
        self.every_n_steps = every_n_steps
        self.best_map = -1.0
        #: the epoch whose validation ran last (``None``: none yet in this process)
        self.validated_epoch: int | None = None
        #: the epoch that ended without validation; recorded after :func:`train` validates it
        self.pending_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_map": self.best_map}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_map = float(state_dict.get("best_map", -1.0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.run.last_ckpt, weights_only=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DetectorModule) -> None:
        if self.validated_epoch != trainer.current_epoch:
            self.pending_epoch = trainer.current_epoch  # stopped mid-epoch: validated and recorded after fit
            trainer.save_checkpoint(self.run.last_ckpt, weights_only=False)
            return
        self.record_epoch(trainer, pl_module, trainer.current_epoch)

    def record_epoch(self, trainer: L.Trainer, pl_module: DetectorModule, epoch: int) -> None:
        """Write epoch ``epoch``'s metrics row, model files and checkpoints from its validation result."""
        result = pl_module.validation_result
        self.pending_epoch = None
        if trainer.is_global_zero:
            self.run.write_metrics_row(_epoch_row(trainer, result, epoch))
        improved = bool(result) and result["map"] > self.best_map
        if improved:
            self.best_map = result["map"]
        extra = {"threshold": result.get("threshold", 0.5), "val_map": result.get("map"),
                 "gate_threshold": result.get("gate_threshold"), "gate_val_map": result.get("gate_map"),
                 "epoch": epoch}
        extra = {k: v for k, v in extra.items() if v is not None}
        if trainer.is_global_zero:

            save_checkpoint(self.run.last_model, pl_module.model, extra=extra)
            if improved or not self.run.best_model.exists():
                save_checkpoint(self.run.best_model, pl_module.model, extra=extra)
        # No full-state copy at the best epoch: best_model.pt holds its weights, and a second optimiser-sized
        # file per run (3x the model) is what fills a disk; --resume continues from last.ckpt only.
        trainer.save_checkpoint(self.run.last_ckpt, weights_only=False)


#: How many optimiser steps of a run :class:`FirstSteps` records one by one.
FIRST_STEPS = 200


class FirstSteps(L.Callback):
    """Records each of a run's first ``steps`` optimiser steps in ``first_steps.csv`` (:class:`RunDir`):
    ``step`` (from 0), ``epoch``, ``lr`` (the step's learning rate), the four losses, ``images`` and
    ``images_with_boxes`` of the batch, ``positives`` (positive anchors) and ``normalizer`` (what the summed
    anchor losses were divided by: ``classification * normalizer`` is the sum, whatever the recipe).

    Epoch losses (``metrics.csv``) average a spike away; these rows show whether training is stable from the
    first step. The file is written (atomically) when the last recorded step is reached and at every epoch
    end before; a resumed run keeps the rows of the steps it had already taken. First rank only.
    """

    def __init__(self, run: RunDir, steps: int = FIRST_STEPS) -> None:
        self.run = run
        self.steps = steps
        self.rows: list[dict[str, Any]] = []
        self._lr = math.nan
        self._written = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self._written = [], 0
        if trainer.global_step > 0 and self.run.first_steps.exists():  # resumed: keep the steps taken
            try:
                self.rows = [r for r in self.run.read_first_steps() if r["step"] < trainer.global_step]
            except RunError:
                self.rows = []  # a damaged record: the steps from here on are still worth keeping
            self._written = len(self.rows)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step < self.steps and trainer.optimizers:
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DetectorModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimiser step just taken
        if not trainer.is_global_zero or not 0 <= step < self.steps or not pl_module.step_losses:
            return
        normalizer = pl_module.model.criterion.normalizer
        row: dict[str, Any] = {"step": step, "epoch": trainer.current_epoch, "lr": self._lr}
        row.update({name: float(value) for name, value in pl_module.step_losses.items()})
        row["images"] = len(batch["patient_ids"])
        row["images_with_boxes"] = int((batch["num_boxes"] > 0).sum())
        for name, value in (("positives", normalizer.last_count), ("normalizer", normalizer.last_divisor)):
            row[name] = float(value) if value is not None else math.nan
        self.rows.append(row)
        if step == self.steps - 1:
            self._write()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write()  # interrupted, or a non-finite loss: the steps up to it are the evidence

    def _write(self) -> None:
        if len(self.rows) > self._written:
            self.run.write_first_steps(self.rows)
            self._written = len(self.rows)


class TrainingInterrupted(PneumodetError):
    """Training stopped by Ctrl-C or SIGTERM; the run can be resumed. ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted ({name}); resume with: pneumodet train --out {run_dir} --resume")


class GracefulStop(L.Callback):
    """Turns SIGINT/SIGTERM into a clean stop: the optimiser step in progress finishes, ``last.ckpt`` is
    written, and :class:`TrainingInterrupted` ends :func:`train` (exit 130/143, with the resume command).

    Outside the training loop (setup, cache building, validation), or on a second signal, the stop is
    immediate: the previous ``last.ckpt`` is where ``--resume`` continues. Lightning's own handling would
    exit 1 on Ctrl-C and raise a SystemExit traceback on SIGTERM.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.signum: int | None = None
        self.in_training_loop = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere Python cannot, and the default stays)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loading worker: end quietly, as it would by default
            raise KeyboardInterrupt
        first = self.signum is None
        self.signum = signum
        if not (first and self.in_training_loop):
            raise TrainingInterrupted(signum, self.run.root)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_training_loop = True
        # Lightning put its own SIGTERM handler on top of ours when fit started: take it back
        if threading.current_thread() is threading.main_thread() and self._previous:
            signal.signal(signal.SIGTERM, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.in_training_loop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_training_loop = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_training_loop = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # back in fit: the epoch's records are written next, and the stop waits for them
        self.in_training_loop = trainer.state.fn == "fit"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.signum is not None:
            trainer.save_checkpoint(self.run.last_ckpt, weights_only=False)
            raise TrainingInterrupted(self.signum, self.run.root)


def _epoch_row(trainer: L.Trainer, result: dict[str, Any], epoch: int) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    row: dict[str, Any] = {"epoch": epoch, "step": trainer.global_step}
    for stage in ("train", "val"):
        for name in LOSS_NAMES:
            key = f"{stage}/{name}_epoch" if stage == "train" else f"{stage}/{name}"
            row[f"{stage}_{name}"] = metrics.get(key, float("nan"))
    row["val_map"] = result.get("map", float("nan"))
    row["val_threshold"] = result.get("threshold", float("nan"))
    for t, v in result.get("per_threshold", {}).items():
        row[f"val_map@{t}"] = v
    row["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
    return row


# ---------------------------------------------------------------------------------------------- what is shown
def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _start_lines(config: TrainConfig, run: RunDir, resumed: bool) -> list[str]:
    """What a run is about to do, before the first image is decoded: run, data, device, model, length."""
    processes = config.devices * config.num_nodes
    length = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}" + (f", at most {config.max_steps} steps" if config.max_steps > 0 else "")
    return [
        f"train: run {run.root}" + (" (resumed from its last checkpoint)" if resumed else ""),
        f"  data {config.data_dir}, split {config.split_dir}",
        f"  device {resolve_accelerator(config)}" + (f" x {processes} processes (DDP)" if processes > 1 else "")
        + f", precision {resolve_precision(config)}",
        f"  encoder {config.model.encoder}, from {_encoder_start(config)}; images {config.image_size} px, "
        f"augmentation {config.aug}",
        f"  {length}, batch size {config.batch_size}",
    ]


class RunReport(L.Callback):
    """Says what a run does on stderr, in pneumodet's words (first rank only): the sets and steps per epoch
    once the data is ready, warnings that are the user's business (a set without a patient with boxes,
    patients left out), one line per epoch (train loss, validation mAP and threshold) and, off a terminal
    (``lines``), a plain progress line every 30 s within an epoch. Also sets Lightning's logging interval to
    at most an epoch's batches."""

    def __init__(self, config: TrainConfig, style: str) -> None:
        self.config = config
        self.style = style
        self._steps: Progress | None = None
        self._validated: int | None = None
        self._epoch_started = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", {})
        if "train" not in datasets:
            return
        batches = max(1, math.ceil(len(datasets["train"]) / (self.config.batch_size * trainer.world_size)))
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, batches))
        if not trainer.is_global_zero:
            return
        sets = ", ".join(f"{name} {len(ds)}" for name, ds in datasets.items())
        _say(f"train: images {sets}; {batches} optimiser steps per epoch")
        for line in _data_warnings(datasets):
            _say(f"train: warning: {line}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.monotonic()
        if trainer.is_global_zero and self.style == "lines":
            total = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 0
            self._steps = Progress(int(total), f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", "steps",
                                   progress="lines", final_line=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._steps is not None:
            self._steps.update()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._validated == trainer.current_epoch:
            self.epoch_line(trainer, pl_module, trainer.current_epoch)

    def epoch_line(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """The line of epoch ``epoch`` (from 0) from its validation result."""
        if not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train/total_epoch")
        result = getattr(pl_module, "validation_result", {}) or {}
        text = f"epoch {epoch + 1}/{trainer.max_epochs}: train loss "
        text += f"{float(loss):.4f}" if loss is not None else "n/a"
        if result:
            text += f", val mAP {result['map']:.4f} at threshold {result['threshold']:.2f}"
        else:
            text += ", val mAP n/a (no box to score in the validation set, none predicted)"
        _say(text + f", step {trainer.global_step}, {format_duration(time.monotonic() - self._epoch_started)}")


def _data_warnings(datasets: Mapping[str, Any]) -> list[str]:
    """What the user should know about the sets before training: a set without any patient with boxes,
    patients left out for want of a readable image."""
    consequence = {"train": "the model has no box to learn from",
                   "val": "validation mAP cannot reward a right box, so the chosen threshold means little",
                   "test": "evaluate can only count false positives"}
    lines = [f"the {name} set has no patient with boxes ({len(ds)} patients): {consequence.get(name, '')}; "
             "split more patients, or use --val/--test fractions that leave positives in every set"
             for name, ds in datasets.items() if len(ds) and not any(r.boxes for r in ds.records)]
    excluded = {name: len(ds.excluded) for name, ds in datasets.items() if ds.excluded}
    if excluded:
        counts = ", ".join(f"{name} {n}" for name, n in excluded.items())
        lines.append(f"patients left out for an unreadable or missing image: {counts} "
                     f"(listed in {DONE} at the end)")
    return lines


# ---------------------------------------------------------------------------------------------- door
@dataclass
class TrainResult:
    run_dir: Path
    best_map: float
    threshold: float
    epochs: int
    steps: int
    seconds: float
    resumed: bool
    #: the threshold chosen for gated scores (``--gate``) at the best epoch, and their validation mAP there
    gate_threshold: float | None = None
    gate_map: float | None = None
    #: per set, the patients left out because their image is unreadable or missing (also in done.json)
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"trained {self.epochs} epoch{'s' if self.epochs != 1 else ''}, {self.steps} optimiser steps in "
                f"{self.seconds:.0f} s"
                f"{' (resumed)' if self.resumed else ''}; best validation RSNA mAP {self.best_map:.4f} "
                f"at confidence threshold {self.threshold:.2f}"
                + (f" (gated scores, --gate: {self.gate_map:.4f} at {self.gate_threshold:.2f})"
                   if self.gate_threshold is not None and self.gate_map is not None else "")
                + f"; run in {self.run_dir}")
        if any(self.excluded.values()):
            counts = ", ".join(f"{name} {len(ids)}" for name, ids in self.excluded.items())
            text += (f"\npatients left out for an unreadable or missing image: {counts} "
                     f"(listed in {RunDir(self.run_dir).done.name})")
        return text


def build_datamodule(config: TrainConfig, *, progress: bool | str = True) -> L.LightningDataModule:

    return RsnaDataModule(
        config.data_dir, config.split_dir, cache_dir=config.cache_dir, cache_size=config.image_size,
        image_size=config.image_size, aug=config.aug, batch_size=config.batch_size,
        num_workers=config.num_workers, seed=config.seed, progress=progress)


def epoch_label(epoch: int, max_epochs: int | None) -> str:
    """``"Epoch 1/8"`` for epoch 0 (Lightning's count) of 8: numbered from 1 like the per-epoch lines of
    :class:`RunReport`; ``"Epoch 1"`` when the number of epochs is open (``None`` or -1)."""
    return f"Epoch {epoch + 1}" + (f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else "")


def epoch_progress_bar() -> L.Callback:
    """Lightning's own progress bar (Rich where installed, else tqdm) with :func:`epoch_label` as the
    training description: Lightning's shows ``Epoch 0/7`` for the first of 8 epochs (``Epoch 0/0`` for a
    one-epoch run)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    class RichEpochBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            # padded to the validation bar's description as Lightning's own (no flicker between the two)
            return f"{epoch_label(current_epoch, self.trainer.max_epochs):{len(self.validation_description)}}"

    class TqdmEpochBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(epoch_label(trainer.current_epoch, trainer.max_epochs))

    return RichEpochBar() if _RICH_AVAILABLE else TqdmEpochBar()


def build_trainer(config: TrainConfig, run: RunDir, *, progress: bool = True,
                  callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning trainer of a run: :class:`RunKeeper` first, then ``callbacks``; with ``progress``
    Lightning's bar counting epochs from 1 (:func:`epoch_progress_bar`)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    accelerator = resolve_accelerator(config)
    # DDP re-launches the command for each extra process (gloo on CPU, NCCL on GPU)
    strategy = "ddp" if config.devices * config.num_nodes > 1 else "auto"
    return L.Trainer(
        default_root_dir=run.root,
        max_epochs=config.epochs,
        max_steps=config.max_steps,
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        precision=resolve_precision(config),
        gradient_clip_val=config.grad_clip or None,
        gradient_clip_algorithm="norm",
        limit_val_batches=config.limit_val_batches,
        logger=TensorBoardLogger(save_dir=str(run.root), name=run.tensorboard.name, version=""),
        callbacks=[RunKeeper(run, config.checkpoint_every_n_steps), *callbacks,
                   *([epoch_progress_bar()] if progress else [])],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        benchmark=accelerator in ("gpu", "cuda"),  # fixed input size: cuDNN's autotuned kernels pay off from the 2nd step
        log_every_n_steps=10,
    )


def prepare_run(config: TrainConfig, *, resume: bool) -> tuple[TrainConfig, list[str]]:
    """The config a run trains with, checked against its folder ``config.out_dir`` (the run).

    New run: refused if the folder holds a run already. Resume: the stored ``config.yaml`` with only what
    may change under ``--resume`` taken from ``config`` (see :meth:`TrainConfig.resumed_with`); the run
    trains where its folder is now, even if it was moved. Paths are made absolute and the split's
    fingerprint recorded (or, on resume, checked). Returns the config and notes for the user.
    """

    run = RunDir(Path(config.out_dir))
    notes: list[str] = []
    if resume and not is_first_process():  # rank 0 checked the stored run and may have written it since
        config = TrainConfig.from_yaml(run.config, stored_run=True)
    elif resume:
        if not run.is_run():
            raise ConfigError(f"{run.root}: no run to resume ({run.config.name} not found)")
        stored = TrainConfig.from_yaml(run.config, stored_run=True)
        config, notes = stored.resumed_with(config.to_dict(), run.root)
        if run.is_finished() and not notes:
            raise ConfigError(f"{run.root}: the run has finished; pass more --epochs to train it further")
    elif is_first_process() and (run.is_run() or run.last_ckpt.exists() or run.is_finished()):
        state = "a finished run" if run.is_finished() else "an unfinished run (pass --resume to continue it)"
        raise ConfigError(f"{run.root} holds {state}; choose another --out")
    config = config.with_absolute_paths()
    fingerprint = split_fingerprint(Path(config.split_dir))
    if config.split_fingerprint and config.split_fingerprint != fingerprint:
        raise ConfigError(f"{config.split_dir}: the split has changed since this run started; "
                          "resume it with the split it was trained on")
    return TrainConfig.from_dict({**config.to_dict(), "split_fingerprint": fingerprint}), notes


def train(config: TrainConfig, *, resume: bool = False, progress: bool | str = True, verbose: bool = False,
          callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Train one run into ``config.out_dir``; with ``resume``, continue from ``checkpoints/last.ckpt``.

    ``callbacks`` are added to the Lightning trainer (timing, extra logging). Ctrl-C or SIGTERM end in
    :class:`TrainingInterrupted` after ``last.ckpt`` is written. Writes ``config.yaml``, the checkpoints,
    ``metrics.csv`` and ``done.json``; the run report is the caller's (``reports.runs.write_run_report``).

    On stderr (:class:`RunReport`): what the run is (run folder, data, device, precision, encoder start,
    sets, steps, epochs), warnings that are the user's business, one line per epoch. ``progress``: ``True``
    is Lightning's bar on a terminal and plain lines otherwise (:func:`pneumodet.progress.progress_style`),
    also for the image cache built first. Lightning's own chatter is silenced unless ``verbose``
    (:func:`library_output`).
    """
    with library_output(verbose):
        return _train(config, resume=resume, style=progress_style(progress), callbacks=callbacks)


def _train(config: TrainConfig, *, resume: bool, style: str, callbacks: Sequence[L.Callback]) -> TrainResult:
    config, _ = prepare_run(config, resume=resume)
    run = RunDir(Path(config.out_dir))
    resumed = resume and run.last_ckpt.exists()
    if resumed:
        _check_resumable(run, config)
    if is_first_process():
        config.to_yaml(run.config)
        for line in _start_lines(config, run, resumed):
            _say(line)

    L.seed_everything(config.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    module = DetectorModule(config.model.to_dict(), config.to_dict())
    datamodule = build_datamodule(config, progress=style)
    stopper, report = GracefulStop(run), RunReport(config, style)
    trainer = build_trainer(config, run, progress=style == "bar",
                            callbacks=[FirstSteps(run), stopper, report, *callbacks])
    started = time.perf_counter()
    stopper.install()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.last_ckpt) if resumed else None,
                    weights_only=True)
        keeper = next(cb for cb in trainer.callbacks if isinstance(cb, RunKeeper))
        if keeper.pending_epoch is not None:  # stopped part-way through an epoch: validate what was learned
            trainer.validate(module, datamodule=datamodule, verbose=False)
            report.epoch_line(trainer, module, keeper.pending_epoch)
            keeper.record_epoch(trainer, module, keeper.pending_epoch)
    finally:
        stopper.uninstall()
    if stopper.signum is not None:  # arrived after the last batch: the epoch was recorded, then stop
        raise TrainingInterrupted(stopper.signum, run.root)
    best = _read_extra(run.best_model) if run.has_model() else {}
    result = TrainResult(run_dir=run.root, best_map=float(best.get("val_map", keeper.best_map)),
                         threshold=float(best.get("threshold", float("nan"))), epochs=trainer.current_epoch,
                         steps=trainer.global_step, seconds=time.perf_counter() - started, resumed=resumed,
                         gate_threshold=best.get("gate_threshold"), gate_map=best.get("gate_val_map"),
                         excluded={name: list(ds.excluded) for name, ds in datamodule.datasets.items()})
    if trainer.world_size > 1:
        run.write_rank_file(trainer.global_rank, _rank_fingerprint(module, result))
    if trainer.is_global_zero:
        run.write_done({
            "best_val_map": result.best_map, "threshold": result.threshold, "gate_threshold": result.gate_threshold,
            "gate_val_map": result.gate_map, "epochs": result.epochs,
            "steps": result.steps, "seconds": result.seconds, "precision": resolve_precision(config),
            "encoder_weights": _encoder_start(config), "images_excluded": result.excluded,
            "versions": _versions()})
    return result


def _encoder_start(config: TrainConfig) -> str:
    """What the encoder started from, in words (recorded in done.json and shown in the report)."""
    if config.model.weights:
        return f"weights file {config.model.weights}"
    return "ImageNet weights (timm)" if config.model.pretrained else "random initialisation"


def _check_resumable(run: RunDir, config: TrainConfig) -> None:
    """Refuse a ``last.ckpt`` whose model differs from the run's config before anything is built."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(run.last_ckpt)
    stored = (checkpoint.get("hyper_parameters") or {}).get("model_config") if isinstance(checkpoint, dict) else None
    expected = config.model.to_dict()
    if not isinstance(stored, dict):
        raise CheckpointError(f"{run.last_ckpt}: not a pneumodet training checkpoint (no model config)")
    differs = sorted(k for k in expected if k not in ("pretrained", "weights") and stored.get(k) != expected[k])
    if differs:
        shown = ", ".join(f"{k} (checkpoint: {stored.get(k)}, config: {expected[k]})" for k in differs[:4])
        raise CheckpointError(f"{run.last_ckpt}: does not match {run.config}: {shown}")


def _rank_fingerprint(module: DetectorModule, result: TrainResult) -> dict[str, Any]:
    """What each DDP rank ends with: both ranks must agree (same weights, same gathered metric)."""
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in module.model.parameters()))
    return {"val_map": module.validation_result.get("map"), "threshold": module.validation_result.get("threshold"),
            "steps": result.steps, "param_checksum": checksum}


def _read_extra(path: Path) -> dict[str, Any]:

    _, extra = load_checkpoint(path)
    return extra
