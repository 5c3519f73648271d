"""Training is stable from the first step: the focal loss's divisor (hand-worked), the per-step record of the
first optimiser steps (``first_steps.csv``) through the CLI, its plot in the run report, and the recipe field
that keeps the earlier behaviour reachable (``baseline-v1``), validated like every config field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from pneumodet.cli import main
from pneumodet.config import RECIPES, TrainConfig
from pneumodet.errors import ConfigError
from pneumodet.model import ModelConfig, build_model
from pneumodet.model.loss import PositiveNormalizer
from pneumodet.rundir import RunDir

TINY = ["--encoder", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--aug", "light", "--precision", "32-true", "--checkpoint-every", "0"]


# ---------------------------------------------------------------- the divisor, by hand
def test_ema_normalizer_by_hand() -> None:
    """momentum 0.9, positive counts 0, 10, 0: ema 0, 1.0, 0.9; bias corrections 0.1, 0.19, 0.271."""
    norm = PositiveNormalizer("ema", 0.9).train()
    divisors = [float(norm(torch.tensor(n))) for n in (0, 10, 0)]
    # step 1: 0 / 0.1 = 0 -> at least 1; step 2: 1.0 / 0.19; step 3: 0.9 / 0.271 (not 1: the batch without
    # boxes is weighted like its neighbours)
    assert divisors == pytest.approx([1.0, 1.0 / 0.19, 0.9 / 0.271], rel=1e-5)
    assert (float(norm.last_count), float(norm.last_divisor)) == pytest.approx((0.0, 0.9 / 0.271), rel=1e-5)
    # evaluation reads the average and leaves it as it is
    norm.eval()
    assert float(norm(torch.tensor(500))) == pytest.approx(0.9 / 0.271, rel=1e-5)
    assert float(norm(torch.tensor(500))) == pytest.approx(0.9 / 0.271, rel=1e-5)


def test_first_ema_step_is_the_batch_count_and_batch_mode_is_the_old_one() -> None:
    norm = PositiveNormalizer("ema", 0.9).train()
    assert float(norm(torch.tensor(37))) == pytest.approx(37.0)  # bias-corrected: no assumed start value
    assert float(PositiveNormalizer("ema").eval()(torch.tensor(12))) == 12.0  # no training step yet: the batch's
    old = PositiveNormalizer("batch").train()
    assert [float(old(torch.tensor(n))) for n in (0, 10, 0)] == [1.0, 10.0, 1.0]
    with pytest.raises(ValueError, match="loss normalizer must be one of"):
        PositiveNormalizer("mean")


def test_loss_divides_the_same_sums_by_the_normalizer() -> None:
    """Both normalisers divide the same summed anchor losses: ``classification * divisor`` agrees; a batch
    without boxes after one with boxes is divided by the running mean, not by 1."""
    torch.manual_seed(0)
    config = ModelConfig(encoder="resnet18", image_size=64, fpn_channels=16, head_convs=1)
    models = {mode: build_model(config, loss_normalizer=mode).train() for mode in ("ema", "batch")}
    models["batch"].load_state_dict(models["ema"].state_dict())
    images = torch.rand(2, 1, 64, 64)
    boxes = torch.tensor([[[8.0, 10.0, 30.0, 50.0]], [[0.0, 0.0, 0.0, 0.0]]])
    no_boxes = torch.zeros(2, 1, 4)
    classes = torch.tensor([1, 0])
    sums = {}
    for mode, model in models.items():
        with torch.no_grad():
            outputs = model(images)
            model.loss(outputs, boxes, classes)
            crit = model.criterion.normalizer
            count = float(crit.last_count)
            assert count > 0 and float(crit.last_divisor) == pytest.approx(count)  # step 1: the batch's count
            second = model.loss(outputs, no_boxes, classes)
            sums[mode] = float(second["classification"]) * float(crit.last_divisor)
            divisor = float(crit.last_divisor)
        if mode == "ema":  # ema 0.1 * count, then 0.9 * that + 0.1 * 0; corrected by 1 - 0.9**2 = 0.19
            assert divisor == pytest.approx(0.09 * count / 0.19, rel=1e-5)
        else:
            assert divisor == 1.0
    assert sums["ema"] == pytest.approx(sums["batch"], rel=1e-5)


# ---------------------------------------------------------------- config
def test_recipes_name_the_normalizer_and_baseline_keeps_the_old_one() -> None:
    assert TrainConfig().loss_normalizer == "ema" and TrainConfig.with_recipe("default").loss_normalizer == "ema"
    base = TrainConfig.with_recipe("baseline-v1")
    assert base.loss_normalizer == "batch"
    # baseline-v1 differs from default in the two fixes only
    changed = {k: v for k, v in RECIPES["default"].items() if RECIPES["baseline-v1"][k] != v}
    assert changed == {"loss_normalizer": "ema", "warmup_steps": 200}
    assert (base.warmup_steps, base.warmup_fraction) == (0, 0.1)


def test_a_run_stored_before_the_stability_fields_resumes_as_it_started(tmp_path: Path) -> None:
    """An older run's config.yaml has no warmup_steps/loss_normalizer: it trained with no minimum warm-up and
    the per-batch divisor, so that is what its stored config means, while a user's own config file without
    them gets today's defaults."""
    values = TrainConfig().to_dict()
    del values["warmup_steps"], values["loss_normalizer"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    stored = TrainConfig.from_yaml(path, stored_run=True)
    assert (stored.warmup_steps, stored.loss_normalizer) == (0, "batch")
    given = TrainConfig.from_yaml(path)
    assert (given.warmup_steps, given.loss_normalizer) == (200, "ema")
    values["loss_normalizer"] = "ema"  # a field the file does hold is never replaced
    path.write_text(yaml.safe_dump(values))
    assert TrainConfig.from_yaml(path, stored_run=True).loss_normalizer == "ema"


def test_warmup_length_by_hand() -> None:
    from pneumodet.training import warmup_length

    assert warmup_length(280, 0.1, 0) == 28  # baseline-v1 on the demo: 10 % only
    assert warmup_length(280, 0.1, 200) == 140  # the floor, capped at half the run
    assert warmup_length(1000, 0.1, 200) == 200  # the floor
    assert warmup_length(24_000, 0.1, 200) == 2400  # a full RSNA run: the fraction is longer
    assert warmup_length(6, 0.1, 200) == 3 and warmup_length(1, 0.1, 200) == 0


@pytest.mark.parametrize(("value", "message"), [
    ("mean", "loss_normalizer must be one of ema, batch; got 'mean'"),
    (3, "config loss_normalizer must be"),
    ("{warmup_steps: -1}", "warmup_steps must be in"),
    ("{warmup_steps: 1.5}", "config warmup_steps must be a whole number"),
])
def test_a_bad_stability_setting_is_one_line(value: object, message: str, tmp_path: Path, capsys) -> None:
    text = value[1:-1] if isinstance(value, str) and value.startswith("{") else f"loss_normalizer: {value}"
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(yaml.safe_load(text))
    config = tmp_path / "config.yaml"
    config.write_text(text + "\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pneumodet train: error: ") and text.split(":")[0] in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- through the CLI
def _train(data: Path, split: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--split", str(split), "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), *TINY, *extra]


def test_first_steps_are_recorded_bounded_and_plotted(synth_dataset: Path, split_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    """A tiny run (2 epochs of 6 steps) records every step: losses finite, the classification loss bounded
    (the prior-initialised head starts near alpha * log(100) = 1.15 per positive anchor), the divisor the
    recipe's, and the report plots them."""
    out = tmp_path / "run"
    assert main(_train(synth_dataset, split_dir, out, "--epochs", "2")) == 0, capsys.readouterr().err[-2000:]
    run = RunDir(out)
    rows = run.read_first_steps()
    steps = run.read_done()["steps"]
    assert [r["step"] for r in rows] == list(range(steps)) and steps >= 10
    assert {r["epoch"] for r in rows} == {0, 1}
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("total", "classification", "regression", "global", "lr"))
        assert 0 < r["classification"] < 3.0, r
        assert r["normalizer"] >= 1.0 and 0 <= r["images_with_boxes"] <= r["images"] <= 4
    # the ema divisor: bias-corrected mean of the counts so far (step 0: its own count)
    ema, counts = 0.0, []
    for t, r in enumerate(rows, start=1):
        counts.append(r["positives"])
        ema = 0.9 * ema + 0.1 * r["positives"]
        assert r["normalizer"] == pytest.approx(max(1.0, ema / (1 - 0.9**t)), rel=1e-4)
    html = run.report.read_text(encoding="utf-8")
    assert 'id="first-steps"' in html and "Classification loss over the first" in html
    section = html.split('id="first-steps"', 1)[1].split("<section", 1)[0]
    assert "<img" in section


def test_baseline_recipe_divides_by_the_batch_count_and_resume_keeps_the_record(
        synth_dataset: Path, split_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "base"
    assert main(_train(synth_dataset, split_dir, out, "--recipe", "baseline-v1", "--epochs", "1")) == 0
    run = RunDir(out)
    first = run.read_first_steps()
    assert all(r["normalizer"] == max(1.0, r["positives"]) for r in first)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0, capsys.readouterr().err[-2000:]
    rows = run.read_first_steps()
    assert [r["step"] for r in rows] == list(range(run.read_done()["steps"]))
    assert rows[: len(first)] == first  # the steps taken before the resume are kept as they were


def test_a_damaged_first_steps_file_is_a_run_error_and_resume_records_on(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pneumodet.errors import RunError
    from pneumodet.training import FirstSteps

    run = RunDir(tmp_path)
    run.write_first_steps([{"step": 1, "classification": 0.5}, {"step": 0, "classification": 1.1}])
    assert [r["step"] for r in run.read_first_steps()] == [0, 1]  # written in step order
    run.first_steps.write_text("step,classification\nzero,1.0\n", encoding="utf-8")
    with pytest.raises(RunError, match=r"first_steps.csv: line 2: damaged \(step 'zero' is not a whole number\)"):
        run.read_first_steps()
    recorder = FirstSteps(run)
    recorder.on_train_start(SimpleNamespace(global_step=5), None)  # resumed at step 5 over a damaged record
    assert recorder.rows == []  # the steps from here on are still recorded
