"""A run's life through the CLI as careless hands live it: started from a config file, moved, resumed with
other options, evaluated from another folder, stopped early, interrupted, damaged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pneumodet.cli import main
from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import split_patients, write_split
from pneumodet.rundir import RunDir

TINY = ["--encoder", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--aug", "light", "--precision", "32-true", "--checkpoint-every", "0"]


def _train(data: Path, split: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--split", str(split), "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), *TINY, *extra]


@pytest.fixture(scope="module")
def one_epoch_run(synth_dataset: Path, split_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    assert main(_train(synth_dataset, split_dir, out, "--epochs", "1")) == 0
    return out


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]


def test_train_from_a_runs_own_config_yaml(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    """``--config RUN/config.yaml`` starts a new run with the same settings; options on the line win."""
    out = tmp_path / "again"
    assert main(["train", "--config", str(RunDir(one_epoch_run).config), "--out", str(out), "--max-steps", "2"]) == 0
    again, first = TrainConfig.from_yaml(RunDir(out).config), TrainConfig.from_yaml(RunDir(one_epoch_run).config)
    assert (again.model, again.data_dir) == (first.model, first.data_dir)
    assert again.max_steps == 2 and again.out_dir == str(out.absolute())
    assert RunDir(out).read_done()["steps"] == 2
    # a recipe named on the line replaces the file's optimisation settings, and nothing else
    ref = tmp_path / "ref"
    assert main(["train", "--config", str(RunDir(one_epoch_run).config), "--out", str(ref), "--recipe", "reference",
                 "--max-steps", "1"]) == 0
    cfg = TrainConfig.from_yaml(RunDir(ref).config)
    assert (cfg.recipe, cfg.optimizer, cfg.lr, cfg.model.encoder) == ("reference", "adam", 1e-5, "resnet18")


def test_grid_from_a_config_file(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid"
    code = main(["grid", "--config", str(RunDir(one_epoch_run).config), "--out", str(grid), "--augs",
                 "resize_only", "--encoders", "resnet18", "--samples", "30", "--val", "0.2", "--test", "0.2",
                 "--max-steps", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert list(pd.read_csv(grid / "summary.csv")["status"]) == ["done"]


def test_relative_paths_are_recorded_absolute_and_checked(synth_dataset: Path, split_dir: Path,
                                                          tmp_path: Path, monkeypatch, capsys) -> None:
    """A run trained with relative paths is evaluated correctly from any folder; a split rewritten in its
    place after training is refused, not scored under the run's name."""
    work = tmp_path / "work"
    shutil.copytree(split_dir, work / "split")
    monkeypatch.chdir(work)
    os.symlink(synth_dataset, work / "data")
    assert main(["train", "--data", "data", "--split", "split", "--out", "run", "--cache-dir", "cache",
                 *TINY, "--max-steps", "2"]) == 0
    config = TrainConfig.from_yaml(work / "run" / "config.yaml")
    assert Path(config.data_dir).is_absolute() and Path(config.split_dir) == work / "split"
    assert config.split_fingerprint and len(config.split_fingerprint) == 64
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "split").mkdir(parents=True)  # a different "split" where the relative path would point
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", str(work / "run"), "--split", "val"]) == 0
    assert "RSNA mAP" in capsys.readouterr().out
    # the split written over after training: refused in one line, nothing scored
    write_split(split_patients(load_rsna(synth_dataset).records, val=0.3, test=0.2, seed=9), work / "split",
                source=str(synth_dataset))
    assert main(["evaluate", str(work / "run"), "--split", "val", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "the split has changed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_max_steps_shorter_than_an_epoch_still_gives_a_validated_run(synth_dataset: Path, split_dir: Path,
                                                                     tmp_path: Path, capsys) -> None:
    out = tmp_path / "short"
    assert main(_train(synth_dataset, split_dir, out, "--max-steps", "2")) == 0
    run = RunDir(out)
    done = json.loads(run.done.read_text())  # strict JSON: a bare NaN would not parse
    assert done["steps"] == 2 and 0.0 <= done["best_val_map"] <= 1.0 and 0.0 < done["threshold"] <= 1.0
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [0] and rows[0]["step"] == 2 and 0.0 <= rows[0]["val_map"] <= 1.0
    assert run.best_model.exists() and run.last_ckpt.exists()
    assert "nan" not in capsys.readouterr().out.lower()
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    sub = tmp_path / "sub.csv"
    assert main(["predict", str(out), str(synth_dataset / "stage_2_train_images"), "--out", str(sub)]) == 0


def test_a_moved_run_resumes_where_it_is_now(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    """``--out`` is the run: a renamed run folder resumes there (not in the folder named inside its
    config.yaml), with the new ``--epochs`` said and applied; options that would change what is learned
    are refused."""
    moved = tmp_path / "moved"
    shutil.copytree(one_epoch_run, moved)
    shutil.rmtree(moved / "tensorboard", ignore_errors=True)
    capsys.readouterr()
    assert main(["train", "--out", str(moved), "--resume", "--encoder", "resnet34"]) == 2
    err = capsys.readouterr().err
    assert "cannot change encoder (run: resnet18, given: resnet34)" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(moved), "--resume"]) == 2
    assert "has finished; pass more --epochs" in capsys.readouterr().err
    assert main(["train", "--out", str(moved), "--resume", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "resuming with epochs: 1 -> 2" in captured.err
    run = RunDir(moved)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]
    assert TrainConfig.from_yaml(run.config).out_dir == str(moved.absolute())
    assert TrainConfig.from_yaml(run.config).epochs == 2
    first = RunDir(one_epoch_run).read_done()["steps"]
    assert run.read_done()["steps"] == 2 * first
    assert [r["epoch"] for r in RunDir(one_epoch_run).read_metrics()] == [0]  # the original is untouched


def test_a_damaged_metrics_csv_does_not_lose_an_epoch_on_resume(one_epoch_run: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "damaged")
    shutil.copytree(one_epoch_run, run.root)
    with open(run.metrics, "a") as f:
        f.write('1,"unterminated\n\x00garbage,,,\n')
    assert main(["train", "--out", str(run.root), "--resume", "--epochs", "2"]) == 0
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1] and all(0.0 <= r["val_map"] <= 1.0 for r in rows)


def test_a_resumed_checkpoint_of_another_encoder_is_one_line(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    run = RunDir(tmp_path / "edited")
    shutil.copytree(one_epoch_run, run.root)
    run.config.write_text(run.config.read_text().replace("encoder: resnet18", "encoder: resnet34"))
    capsys.readouterr()
    assert main(["train", "--out", str(run.root), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("pneumodet train: error: ") and "last.ckpt: does not match" in last
    assert "encoder (checkpoint: resnet18, config: resnet34)" in last


def test_damaged_runs_are_skipped_by_grid_and_compare(one_epoch_run: Path, synth_dataset: Path, tmp_path: Path,
                                                      capsys) -> None:
    from pneumodet.experiments import run_grid, run_name

    grid = tmp_path / "grid"
    base = TrainConfig.from_yaml(RunDir(one_epoch_run).config)
    base = TrainConfig.from_dict({**base.to_dict(), "max_steps": 1, "split_fingerprint": None})
    bad = RunDir(grid / run_name("resnet18", "resize_only", 30))
    bad.root.mkdir(parents=True)
    bad.done.write_text('{"best_val_map": 0.5, ')  # cut off mid-write by an older version
    result = run_grid(base, grid, encoders=["resnet18"], augs=["resize_only", "light"], samples=[30],
                      val=0.2, test=0.2, progress=False)
    assert [r.status for r in result.runs] == ["damaged", "done"]
    assert "done.json: damaged" in result.runs[0].error
    # compare: a run with an empty metrics.csv is named and skipped, the others compared
    empty = RunDir(tmp_path / "empty")
    shutil.copytree(one_epoch_run, empty.root)
    empty.metrics.write_text("")
    capsys.readouterr()
    assert main(["compare", str(one_epoch_run), str(empty.root), str(grid), "--out", str(tmp_path / "cmp")]) == 0
    captured = capsys.readouterr()
    assert f"skipped {empty.metrics}" in captured.err
    assert "compared 2 run(s), skipped 1" in captured.out
    assert set(pd.read_csv(tmp_path / "cmp" / "best_map.csv")["run"]) == {one_epoch_run.name,
                                                                         run_name("resnet18", "light", 30)}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_training_ends_cleanly_with_the_resume_hint(synth_dataset: Path, split_dir: Path,
                                                                 tmp_path: Path, signum: int) -> None:
    out = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pneumodet.cli", *_train(synth_dataset, split_dir, out, "--epochs", "2")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not RunDir(out).metrics.exists():
        time.sleep(0.1)  # training is under way once the first epoch is recorded
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    _no_traceback(err)
    assert f"pneumodet train: error: training interrupted ({signal.Signals(signum).name}); resume with: " \
           f"pneumodet train --out {out} --resume" in err
    assert RunDir(out).last_ckpt.exists() and not RunDir(out).is_finished()
    resumed = subprocess.run([sys.executable, "-m", "pneumodet.cli", "train", "--out", str(out), "--resume"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == [0, 1]
