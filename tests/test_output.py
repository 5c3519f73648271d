"""What a user reads: ``train`` and ``predict`` say what matters in pneumodet's words, none of the libraries'
chatter, and report progress in a log file (not a terminal) as well as on a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import split_patients, write_split
from pneumodet.experiments import run_grid
from pneumodet.launch import library_output
from pneumodet.progress import Progress, format_duration, progress_style

TINY = ["--encoder", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--aug", "light", "--precision", "32-true", "--checkpoint-every", "0"]
#: Text that only the libraries write: hardware lines, adverts, settings notes, warnings of any category.
CHATTER = ("GPU available", "TPU", "HPU", "litlogger", "Tip", "_pytree", "LeafSpec", "log_every_n_steps",
           "limit_val_batches", "Warning", "Initializing distributed", "LOCAL_RANK", "Loading `train_dataloader`",
           "`Trainer.fit` stopped", "Traceback")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The command as a user runs it with its output going to a log file: a pipe, not a terminal."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pneumodet.cli", *args], env=env, capture_output=True, text=True,
                           timeout=timeout)


def _no_chatter(text: str) -> None:
    found = [word for word in CHATTER if word in text]
    assert not found, f"library chatter {found} in:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def trained(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("output")
    split = root / "split"
    write_split(split_patients(load_rsna(synth_dataset).records, val=0.2, test=0.2, seed=3), split,
                source=str(synth_dataset))
    out = root / "run"
    proc = _cli("train", "--data", str(synth_dataset), "--split", str(split), "--out", str(out),
                "--cache-dir", str(root / "cache"), *TINY, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_says_what_matters_and_no_library_chatter(trained) -> None:
    out, proc = trained
    text = proc.stdout + proc.stderr
    _no_chatter(text)
    err = proc.stderr.splitlines()
    # the start lines: run, data and split, device and resolved precision, encoder start, sets, steps, epochs
    assert err[0] == f"train: run {out.absolute()}"
    assert any(line.startswith("  data ") and ", split " in line for line in err)
    assert "  device cpu, precision 32-true" in err
    assert any("encoder resnet18, from random initialisation" in line for line in err)
    assert "  2 epochs, batch size 4" in err
    assert any(line.startswith("train: images train ") and "optimiser steps per epoch" in line for line in err)
    # the cache built first reports its progress off a terminal too, as a plain line (no bar frames)
    assert any(line.startswith("cache: 40/40 images (100 %)") for line in err)
    assert "\r" not in proc.stderr and "━" not in proc.stderr and "it/s" not in proc.stderr
    # one line per epoch: train loss, validation mAP and threshold
    epochs = [line for line in err if line.startswith("epoch ") and "train loss" in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val mAP " in line and " at threshold " in line for line in epochs)
    assert "trained 2 epochs" in proc.stdout


def test_predict_reports_progress_in_a_log(trained, synth_dataset: Path, tmp_path: Path) -> None:
    out, _ = trained
    images = sorted((synth_dataset / "stage_2_train_images").glob("*.dcm"))[:6]
    proc = _cli("predict", str(out), *map(str, images), "--out", str(tmp_path / "sub.csv"), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_chatter(proc.stdout + proc.stderr)
    assert "predict: 6/6 images (100 %) in " in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr


def test_progress_lines_off_a_terminal() -> None:
    """Plain lines every ``every`` seconds (a clock the test moves), none at the end but the last one."""
    now = [0.0]
    stream = io.StringIO()
    with Progress(1000, "predict", progress="lines", every=30, stream=stream, clock=lambda: now[0]) as bar:
        for _ in range(10):
            now[0] += 1.0
            bar.update(12)  # 120 images in 10 s: no line yet
        assert stream.getvalue() == ""
        now[0] = 30.0
        bar.update(0)
        assert stream.getvalue() == "predict: 120/1000 images (12 %), 4 images/s, ETA 3 m 40 s\n"
        now[0] = 50.0
        bar.update(880)
    assert stream.getvalue().splitlines()[1:] == ["predict: 1000/1000 images (100 %) in 50 s"]
    assert progress_style(True, io.StringIO()) == "lines" and progress_style(False) == "off"
    assert (format_duration(42), format_duration(108), format_duration(7500)) == ("42 s", "1 m 48 s", "2 h 05 m")


def test_library_output_silences_only_known_chatter() -> None:
    """Lightning's info lines and the known warnings are dropped; another warning still reaches the user;
    ``--verbose`` shows everything; levels and filters are restored afterwards."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    pytree = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_output(verbose=False):
            assert not lightning_log.isEnabledFor(logging.INFO)
            warnings.warn(pytree, FutureWarning, stacklevel=1)
            warnings.warn("something the user must see", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something the user must see"]
        with library_output(verbose=True):
            warnings.warn(pytree, FutureWarning, stacklevel=1)
        assert len(caught) == 2
    assert lightning_log.level == level


def test_grid_says_run_i_of_n_with_an_eta(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    def fake_train(config, **_):
        return SimpleNamespace(best_map=0.5, threshold=0.3, steps=1, seconds=0.0)

    base = TrainConfig.from_dict({"data_dir": str(synth_dataset)})
    run_grid(base, tmp_path / "grid", encoders=["resnet18"], augs=["light", "heavy"], samples=[None],
             val=0.2, test=0.2, train_fn=fake_train)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "grid: run 1 of 2: resnet18_light_nall"
    assert err[1].startswith("grid: run 2 of 2: resnet18_heavy_nall (ETA ")
