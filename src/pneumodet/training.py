"""Training: what is learned (:class:`DetectorModule`), how runs are kept (checkpoints, metrics.csv) and
the one door that runs it (:func:`train`).

A run directory holds::

    config.yaml            the TrainConfig (enough to reproduce the run)
    metrics.csv            one row per epoch: train/val losses, val mAP at the swept threshold, per IoU
    tensorboard/           TensorBoard event files (per step and per epoch)
    checkpoints/last.ckpt  full Lightning state (model, optimiser, scheduler, loops, RNG) every epoch and
                           every K steps, written atomically; --resume continues from it
    checkpoints/best.ckpt  the same at the best validation mAP
    best_model.pt          tensors + model config + chosen threshold (what predict/evaluate/export load)
    last_model.pt          the same for the last epoch
    done.json              written when the run finished: best mAP, threshold, epochs, optimiser steps
    report.html            loss curves, mAP per epoch and per IoU threshold, sample validation predictions
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pneumodet.config import TrainConfig
from pneumodet.errors import CheckpointError, ConfigError, PneumodetError
from pneumodet.hardware import bf16_is_native
from pneumodet.metrics import xyxy_to_xywh

LOSS_NAMES = ("total", "classification", "regression", "global")
#: Low enough that the threshold sweep sees every useful box; the sweep picks the real cut-off.
VALIDATION_SCORE_THRESHOLD = 0.05


class NonFiniteLossError(PneumodetError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- hardware
def hardware_has_bf16(accelerator: str = "auto") -> bool:
    """Whether bf16 autocast is fast for this accelerator choice (a bf16 GPU, or an AMX/AVX512-BF16 CPU)."""
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return bf16_is_native("cuda" if use_gpu else "cpu")


def resolve_precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return "32-true" if config.precision == "32" else config.precision
    return "bf16-mixed" if hardware_has_bf16(config.accelerator) else "32-true"


def resolve_accelerator(config: TrainConfig) -> str:
    if config.accelerator != "auto":
        return config.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- boxes
def _ground_truth(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{patient_id: [N, 4] xywh}`` from a collated batch (padded rows dropped)."""
    boxes = batch["boxes"].float().cpu().numpy()
    counts = batch["num_boxes"].cpu().numpy()
    return {pid: xyxy_to_xywh(boxes[i, : counts[i]]) for i, pid in enumerate(batch["patient_ids"])}


def _scored_predictions(detections: list, patient_ids: list[str]) -> dict[str, np.ndarray]:
    """``{patient_id: [M, 5] confidence, x, y, w, h}`` from the model's detections."""
    out = {}
    for pid, det in zip(patient_ids, detections, strict=True):
        boxes = det.boxes.detach().float().cpu().numpy().reshape(-1, 4)
        scores = det.scores.detach().float().cpu().numpy().reshape(-1, 1)
        out[pid] = np.concatenate([scores, xyxy_to_xywh(boxes)], axis=1)
    return out


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
        from pneumodet.model import ModelConfig, build_model

        self.save_hyperparameters()
        self.train_config = TrainConfig.from_dict(train_config)
        self.model = build_model(ModelConfig.from_dict(model_config))
        if self.train_config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if self.train_config.compile else self.model
        self._val_ground_truth: dict[str, np.ndarray] = {}
        self._val_predictions: dict[str, np.ndarray] = {}
        #: the latest validation result: map, threshold, per-threshold breakdown
        self.validation_result: dict[str, Any] = {}

    # -- shared
    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch["images"].to(self.device, non_blocking=True).float().div_(255.0)
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
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.current_epoch}, step {self.global_step} ({values}); "
                f"the last good checkpoint is kept in {Path(self.train_config.out_dir) / 'checkpoints'}")
        self._log_losses("train", losses, len(batch["patient_ids"]))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return losses["total"]

    # -- validation
    def on_validation_epoch_start(self) -> None:
        self._val_ground_truth, self._val_predictions = {}, {}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        outputs, losses = self._losses(batch)
        self._log_losses("val", losses, len(batch["patient_ids"]))
        detections = self.model.detect(outputs, score_thresh=VALIDATION_SCORE_THRESHOLD)
        self._val_ground_truth.update(_ground_truth(batch))
        self._val_predictions.update(_scored_predictions(detections, batch["patient_ids"]))

    def on_validation_epoch_end(self) -> None:
        from pneumodet.metrics import rsna_map, sweep_thresholds

        gt, preds = self._gathered_validation()
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
        self.log("val/map", float(sweep.best_score), sync_dist=False, prog_bar=True)
        self.log("val/threshold", float(sweep.best_threshold), sync_dist=False)
        for t, v in result.per_threshold.items():
            self.log(f"val/map@{t:.2f}", float(v), sync_dist=False)

    def _gathered_validation(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every rank's validation outputs merged by patient id (DDP samplers may repeat patients)."""
        gt, preds = self._val_ground_truth, self._val_predictions
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, (gt, preds))
            gt, preds = {}, {}
            for part_gt, part_preds in parts:
                gt.update(part_gt)
                preds.update(part_preds)
        return gt, preds

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
        warmup = int(cfg.warmup_fraction * total)
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
    import pneumodet

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # disk full (torch says RuntimeError), read-only folder
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path}: cannot write the checkpoint ({getattr(err, 'strerror', None) or err}); "
                                  "the previous one is kept") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
    """Keeps the run directory: ``last``/``best`` checkpoints, model files, ``metrics.csv``.

    ``last.ckpt`` is written every ``every_n_steps`` optimiser steps and at every epoch end; ``best.ckpt``
    and ``best_model.pt`` whenever validation mAP improves.
    """

    def __init__(self, run_dir: Path, every_n_steps: int) -> None:
        self.run_dir = run_dir
        self.every_n_steps = every_n_steps
        self.best_map = -1.0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        return {"best_map": self.best_map}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_map = float(state_dict.get("best_map", -1.0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DetectorModule) -> None:
        result = pl_module.validation_result
        row = _epoch_row(trainer, result)
        if trainer.is_global_zero:
            _append_metrics_row(self.run_dir / "metrics.csv", row)
        improved = bool(result) and result["map"] > self.best_map
        if improved:
            self.best_map = result["map"]
        extra = {"threshold": result.get("threshold", 0.5), "val_map": result.get("map", float("nan")),
                 "epoch": trainer.current_epoch, "image_size": pl_module.train_config.image_size,
                 "encoder": pl_module.train_config.encoder}
        if trainer.is_global_zero:
            from pneumodet.model.checkpoint import save_checkpoint

            save_checkpoint(self.run_dir / "last_model.pt", pl_module.model, extra=extra)
            if improved:
                save_checkpoint(self.run_dir / "best_model.pt", pl_module.model, extra=extra)
        if improved:
            trainer.save_checkpoint(self.ckpt_dir / "best.ckpt", weights_only=False)
        trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)


def _epoch_row(trainer: L.Trainer, result: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
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


def _append_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """Rewrite metrics.csv atomically with ``row`` replacing any row of the same epoch (a resumed run
    repeats the epoch it was killed in)."""
    rows = read_metrics(path) if path.exists() else []
    rows = [r for r in rows if int(r["epoch"]) < int(row["epoch"])] + [row]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


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
    #: per set, the patients left out because their image is unreadable or missing (also in done.json)
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"trained {self.epochs} epochs, {self.steps} optimiser steps in {self.seconds:.0f} s"
                f"{' (resumed)' if self.resumed else ''}; best validation RSNA mAP {self.best_map:.4f} "
                f"at confidence threshold {self.threshold:.2f}; run in {self.run_dir}")
        if any(self.excluded.values()):
            counts = ", ".join(f"{name} {len(ids)}" for name, ids in self.excluded.items())
            text += f"\npatients left out for an unreadable or missing image: {counts} (listed in done.json)"
        return text


def model_config_for(config: TrainConfig) -> dict[str, Any]:
    """The model configuration a training config implies (encoder, size, loss settings, overrides)."""
    from pneumodet.model import ModelConfig

    values = {"encoder": config.encoder, "image_size": config.image_size, "pretrained": config.pretrained,
              "weights": config.weights, "global_loss_weight": config.global_loss_weight,
              "box_loss": config.box_loss, **config.model}
    return ModelConfig.from_dict(values).to_dict()


def build_datamodule(config: TrainConfig, *, progress: bool = True) -> L.LightningDataModule:
    from pneumodet.data.dataset import RsnaDataModule

    return RsnaDataModule(
        config.data_dir, config.split_dir, cache_dir=config.cache_dir, cache_size=config.image_size,
        image_size=config.image_size, aug=config.aug, batch_size=config.batch_size,
        num_workers=config.num_workers, seed=config.seed, progress=progress)


def build_trainer(config: TrainConfig, run_dir: Path, *, progress: bool = True,
                  extra_callbacks: list[L.Callback] | None = None) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    accelerator = resolve_accelerator(config)
    # DDP re-launches the command for each extra process (gloo on CPU, NCCL on GPU)
    strategy = "ddp" if config.devices * config.num_nodes > 1 else "auto"
    return L.Trainer(
        default_root_dir=run_dir,
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
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        callbacks=[RunKeeper(run_dir, config.checkpoint_every_n_steps), *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        benchmark=accelerator in ("gpu", "cuda"),  # fixed input size: cuDNN's autotuned kernels pay off from the 2nd step
        log_every_n_steps=10,
    )


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one run into ``config.out_dir``; with ``resume``, continue from ``checkpoints/last.ckpt``."""
    run_dir = Path(config.out_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "done.json").exists() and not resume:
        raise ConfigError(f"{run_dir} holds a finished run; choose another --out")
    if last.exists() and not resume:
        raise ConfigError(f"{run_dir} holds an unfinished run; pass --resume to continue it or choose another --out")
    if resume and (run_dir / "config.yaml").exists():
        config = TrainConfig.from_yaml(run_dir / "config.yaml")
    config.to_yaml(run_dir / "config.yaml")

    L.seed_everything(config.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    module = DetectorModule(model_config_for(config), config.to_dict())
    datamodule = build_datamodule(config, progress=progress)
    trainer = build_trainer(config, run_dir, progress=progress)
    started = time.perf_counter()
    resumed = resume and last.exists()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resumed else None, weights_only=True)
    if trainer.interrupted:
        raise PneumodetError(f"training interrupted; resume with: pneumodet train --out {run_dir} --resume")
    keeper = next(cb for cb in trainer.callbacks if isinstance(cb, RunKeeper))
    best = _read_extra(run_dir / "best_model.pt") if (run_dir / "best_model.pt").exists() else {}
    result = TrainResult(run_dir=run_dir, best_map=float(best.get("val_map", keeper.best_map)),
                         threshold=float(best.get("threshold", float("nan"))), epochs=trainer.current_epoch,
                         steps=trainer.global_step, seconds=time.perf_counter() - started, resumed=resumed,
                         excluded={name: list(ds.excluded) for name, ds in datamodule.datasets.items()})
    if trainer.world_size > 1:
        _write_json(run_dir / f"rank{trainer.global_rank}.json", _rank_fingerprint(module, result))
    if trainer.is_global_zero:
        if (run_dir / "best_model.pt").exists():
            from pneumodet.reports.runs import write_run_report

            write_run_report(run_dir)
        _write_json(run_dir / "done.json", {
            "best_val_map": result.best_map, "threshold": result.threshold, "epochs": result.epochs,
            "steps": result.steps, "seconds": result.seconds, "precision": resolve_precision(config),
            "images_excluded": result.excluded, "versions": _versions()})
    return result


def _rank_fingerprint(module: DetectorModule, result: TrainResult) -> dict[str, Any]:
    """What each DDP rank ends with: both ranks must agree (same weights, same gathered metric)."""
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in module.model.parameters()))
    return {"val_map": module.validation_result.get("map"), "threshold": module.validation_result.get("threshold"),
            "steps": result.steps, "param_checksum": checksum}


def _read_extra(path: Path) -> dict[str, Any]:
    from pneumodet.model.checkpoint import load_checkpoint

    _, extra = load_checkpoint(path)
    return extra


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
