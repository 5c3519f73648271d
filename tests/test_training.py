"""Training end to end on small synthetic data: runs keep what they promise, resume exactly, stop on NaN,
grids survive failures, DDP ranks agree, evaluation never tunes on test."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import read_split, split_patients, write_split
from pneumodet.errors import ConfigError
from pneumodet.model.checkpoint import load_checkpoint
from pneumodet.rundir import RunDir
from pneumodet.training import NonFiniteLossError, train

SMALL = dict(encoder="resnet18", image_size=96, batch_size=4, epochs=2, num_workers=0, aug="light",
             checkpoint_every_n_steps=0, precision="32-true", lr=1e-3)


@pytest.fixture(scope="module")
def split_dir(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    records = load_rsna(synth_dataset).records
    write_split(split_patients(records, val=0.2, test=0.2, seed=1), out, source=str(synth_dataset))
    return out


def small_config(synth_dataset: Path, split_dir: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig.with_recipe("default", data_dir=str(synth_dataset), split_dir=str(split_dir),
                                   out_dir=str(out), cache_dir=str(out.parent / "cache"),
                                   **{**SMALL, **overrides})


def expected_steps(split_dir: Path, batch_size: int, epochs: int) -> int:
    return math.ceil(len(read_split(split_dir)["train"]) / batch_size) * epochs


@pytest.fixture(scope="module")
def finished_run(synth_dataset: Path, split_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r18"
    train(small_config(synth_dataset, split_dir, out), progress=False)
    return out


def test_run_directory_holds_everything(finished_run: Path, split_dir: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "best_model.pt", "last_model.pt", "done.json",
                 "checkpoints/last.ckpt"):
        assert (finished_run / name).exists(), name
    # one full-state checkpoint only: the best epoch's weights are best_model.pt
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert list((finished_run / "tensorboard").rglob("events.out.tfevents.*"))
    rows = RunDir(finished_run).read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1]
    for stage in ("train", "val"):
        for name in ("total", "classification", "regression", "global"):
            assert all(math.isfinite(r[f"{stage}_{name}"]) for r in rows), (stage, name)
    assert all(0.0 <= r["val_map"] <= 1.0 for r in rows)
    assert all(f"val_map@{t:.2f}" in rows[0] for t in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75))
    done = json.loads((finished_run / "done.json").read_text())
    assert done["steps"] == expected_steps(split_dir, 4, 2)
    assert done["best_val_map"] == pytest.approx(max(r["val_map"] for r in rows))


def test_config_yaml_reproduces_the_run(finished_run: Path) -> None:
    config = TrainConfig.from_yaml(finished_run / "config.yaml")
    assert config.model.encoder == "resnet18" and config.model.image_size == 96 and config.epochs == 2
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_checkpoints_load_with_weights_only(finished_run: Path) -> None:
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] > 0 and "optimizer_states" in state and "pneumodet" in state
    model, extra = load_checkpoint(finished_run / "best_model.pt")
    assert 0.0 < extra["threshold"] <= 1.0 and model.config.image_size == 96
    assert "image_size" not in extra  # stored once: in the model config


def test_existing_run_is_not_overwritten(finished_run: Path, synth_dataset: Path, split_dir: Path) -> None:
    with pytest.raises(ConfigError, match="finished run"):
        train(small_config(synth_dataset, split_dir, finished_run), progress=False)


def test_reference_recipe_is_selectable() -> None:
    config = TrainConfig.with_recipe("reference")
    assert (config.optimizer, config.lr, config.scheduler, config.grad_clip) == ("adam", 1e-5, "plateau", 0.05)
    # the reference's global head settings come with it; the default's are the measured ones
    assert (config.model.global_loss_weight, config.model.global_dropout) == (0.1, 0.5)
    default = TrainConfig.with_recipe("default")
    assert (default.model.global_loss_weight, default.model.global_dropout) == (1.0, 0.2)
    # named over a config file, the recipe replaces the file's settings it sets, and keeps its other model ones
    layered = TrainConfig.layered(recipe="reference", base={"recipe": "default", "model": {
        "encoder": "resnet18", "global_loss_weight": 1.0}}, overrides={"global_dropout": 0.3})
    assert (layered.model.encoder, layered.model.global_loss_weight, layered.model.global_dropout) == (
        "resnet18", 0.1, 0.3)
    with pytest.raises(ConfigError, match="unknown recipe"):
        TrainConfig.with_recipe("fast")


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(
        synth_dataset: Path, split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumodet.model.retinanet import PneumoRetinaNet

    out = tmp_path / "nan"
    config = small_config(synth_dataset, split_dir, out, epochs=3)
    original = PneumoRetinaNet.loss
    calls = {"n": 0}
    steps_per_epoch = expected_steps(split_dir, 4, 1)

    def poisoned(self, outputs, boxes, classes):
        losses = original(self, outputs, boxes, classes)
        if self.training:
            calls["n"] += 1
            if calls["n"] > steps_per_epoch:  # the second epoch goes bad
                losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(PneumoRetinaNet, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1"):
        train(config, progress=False)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == steps_per_epoch
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumodet.cli", *args]


def _train_args(synth_dataset: Path, split_dir: Path, out: Path, *extra: str) -> list[str]:
    return _cli("train", "--data", str(synth_dataset), "--split", str(split_dir), "--out", str(out),
                "--encoder", "resnet18", "--image-size", "96", "--batch-size", "2", "--num-workers", "0",
                "--aug", "light", "--precision", "32-true", "--cache-dir", str(out.parent / "cache"), *extra)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_with_same_step_count(
        synth_dataset: Path, split_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    epochs = 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_train_args(synth_dataset, split_dir, out, "--epochs", str(epochs),
                                        "--checkpoint-every", "3"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.ckpt"
    steps_per_epoch = expected_steps(split_dir, 2, 1)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # noqa: BLE001 - the file is replaced atomically; a read may race the rename
                step = 0
            if step > 0 and step % steps_per_epoch != 0:  # a mid-epoch checkpoint exists
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.05)
    assert killed_at is not None, f"no mid-epoch checkpoint appeared: {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "done.json").exists()
    resumed = subprocess.run(_train_args(synth_dataset, split_dir, out, "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == expected_steps(split_dir, 2, epochs)
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == list(range(epochs))


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(synth_dataset: Path, split_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(_train_args(synth_dataset, split_dir, out, "--epochs", "1", "--devices", "2",
                                        "--accelerator", "cpu"),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    # each rank sees half of each batch: steps = ceil(train / (2 ranks x batch 2))
    assert ranks[0]["steps"] == math.ceil(len(read_split(split_dir)["train"]) / 4)


def test_grid_runs_every_combination_and_records_a_failure(synth_dataset: Path, tmp_path: Path) -> None:
    from pneumodet.experiments import run_grid

    base = TrainConfig.with_recipe("default", data_dir=str(synth_dataset), cache_dir=str(tmp_path / "cache"),
                                   **{**SMALL, "epochs": 1})
    result = run_grid(base, tmp_path / "grid", encoders=["resnet18", "no_such_encoder"], augs=["resize_only"],
                      samples=[30], val=0.2, test=0.2, progress=False)
    summary = pd.read_csv(tmp_path / "grid" / "summary.csv")
    assert list(summary["status"]) == ["done", "failed"]
    assert "no_such_encoder" in summary.loc[1, "error"]
    split = json.loads((tmp_path / "grid" / "splits" / "n30" / "split.json").read_text())
    assert sum(split["patients"].values()) == 30 and split["samples"] == 30
    again = run_grid(base, tmp_path / "grid", encoders=["resnet18"], augs=["resize_only"], samples=[30],
                     val=0.2, test=0.2, progress=False)
    assert again.runs[0].status.startswith("skipped")
    assert result.runs[0].best_val_map == pytest.approx(again.runs[0].best_val_map)


def test_evaluate_uses_the_validation_threshold(finished_run: Path) -> None:
    from pneumodet.evaluation import evaluate

    metrics = evaluate(finished_run, split="test", batch_size=8)
    _, extra = load_checkpoint(finished_run / "best_model.pt")
    assert metrics["threshold"] == pytest.approx(extra["threshold"])
    assert 0.0 <= metrics["rsna_map"] <= 1.0
    assert metrics["compiled"] is False  # a few images: compiling would cost more than it saves
    assert set(metrics["rsna_map_per_iou_threshold"]) == {"0.40", "0.45", "0.50", "0.55", "0.60", "0.65",
                                                          "0.70", "0.75"}
    cm = metrics["global_class"]["confusion_matrix"]
    assert sum(map(sum, cm)) == metrics["images"] == len(read_split(
        Path(TrainConfig.from_yaml(finished_run / "config.yaml").split_dir))["test"])
    for name in ("metrics.json", "metric_vs_threshold.png", "confusion_matrix.png"):
        assert (finished_run / "eval_test" / name).exists()


def test_training_records_a_threshold_for_gated_scores_that_evaluate_uses(finished_run: Path, tmp_path: Path) -> None:
    """Validation chooses a second threshold for the gated scores (box score x Lung-Opacity probability);
    ``evaluate --gate`` scores with it, and on the validation set it reproduces the mAP training recorded."""
    from pneumodet.evaluation import evaluate

    _, extra = load_checkpoint(finished_run / "best_model.pt")
    assert 0.0 <= extra["gate_threshold"] <= 1.0 and 0.0 <= extra["gate_val_map"] <= 1.0
    done = RunDir(finished_run).read_done()
    assert (done["gate_threshold"], done["gate_val_map"]) == (extra["gate_threshold"], extra["gate_val_map"])
    metrics = evaluate(finished_run, split="val", gate=True, precision="fp32", out_dir=tmp_path / "val")
    assert metrics["threshold"] == pytest.approx(extra["gate_threshold"])
    assert metrics["threshold_source"] == "chosen on the validation set during training, for gated scores"
    # the same images and model; float rounding may move a box across the cut-off, not the whole result
    assert metrics["rsna_map"] == pytest.approx(extra["gate_val_map"], abs=0.02)


def test_run_report_and_comparison(finished_run: Path, tmp_path: Path) -> None:
    from pneumodet.reports.runs import compare_runs, write_run_report

    report = write_run_report(finished_run, samples=4).read_text()
    for section in ("overview", "losses", "map", "predictions"):
        assert f'id="{section}"' in report
    assert report.count("data:image/png;base64,") >= 3
    gated = RunDir(finished_run).read_done()["gate_threshold"]
    assert f"for gated scores (<code>--gate</code>): {gated:.2f} (validation RSNA mAP " in report
    out = compare_runs([finished_run], tmp_path / "cmp")
    assert out.compared == 1 and out.skipped == []
    text = out.report.read_text()
    assert 'id="by_aug"' in text and 'id="by_encoder"' in text
    table = pd.read_csv(tmp_path / "cmp" / "best_map.csv")
    assert table.loc[0, "run"] == finished_run.name
