"""Lightning's training progress bar counts epochs from 1, as pneumodet's own epoch lines do."""

from __future__ import annotations

import io

import pytest


def test_epoch_label_counts_from_one():
    from pneumodet.training import epoch_label

    assert epoch_label(0, 8) == "Epoch 1/8"
    assert epoch_label(7, 8) == "Epoch 8/8"
    assert epoch_label(0, 1) == "Epoch 1/1"  # Lightning's own bar said "Epoch 0/0" here
    assert epoch_label(2, None) == epoch_label(2, -1) == "Epoch 3"


@pytest.mark.parametrize("epochs", [1, 8])
def test_the_trainer_bar_shows_epochs_from_one(tmp_path, epochs):
    from pneumodet.config import TrainConfig
    from pneumodet.rundir import RunDir
    from pneumodet.training import build_trainer

    config = TrainConfig(accelerator="cpu", epochs=epochs, out_dir=str(tmp_path))
    trainer = build_trainer(config, RunDir(tmp_path), progress=True)
    bar = trainer.progress_bar_callback
    assert bar is not None
    bar._trainer = trainer  # as Lightning's setup() does when fit starts
    if hasattr(bar, "_get_train_description"):  # Rich (installed with the package)
        assert bar._get_train_description(0).strip() == f"Epoch 1/{epochs}"
        assert bar._get_train_description(epochs - 1).strip() == f"Epoch {epochs}/{epochs}"
    else:  # tqdm: the description is set when an epoch starts
        bar._train_progress_bar = bar.init_train_tqdm()
        bar.train_progress_bar.fp = io.StringIO()
        bar.on_train_epoch_start(trainer)
        assert bar.train_progress_bar.desc.startswith(f"Epoch 1/{epochs}")
    assert build_trainer(config, RunDir(tmp_path), progress=False).progress_bar_callback is None
