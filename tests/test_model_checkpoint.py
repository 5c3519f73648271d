"""Checkpoints: a round trip rebuilds the same model; nothing in a file can run code."""

from __future__ import annotations

import os

import pytest
import torch

from pneumodet.errors import CheckpointError
from pneumodet.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from pneumodet.model.encoders import read_state_dict


class _Payload:
    """Unpickling this calls ``os.system`` to create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="resnet18", image_size=128, fpn_channels=32, head_convs=1,
                                   anchor_ratios=(1.0, 2.0), nms_thresh=0.3))


def test_round_trip_rebuilds_the_same_model_and_extra(tmp_path):
    model = _small_model().eval()
    with torch.no_grad():  # make the BN statistics differ from their defaults
        model.encoder.body.bn1.running_mean.uniform_()
    extra = {"epoch": 3, "val_map": 0.21, "threshold": 0.4, "note": float("nan"), "ema": torch.arange(3.0)}
    path = save_checkpoint(tmp_path / "run" / "best_model.pt", model, extra=extra)
    assert sorted(os.listdir(tmp_path / "run")) == ["best_model.pt"]  # no temporary file left

    loaded, got = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    images = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    torch.testing.assert_close(a.cls_logits, b.cls_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.box_deltas, b.box_deltas, rtol=0, atol=0)
    assert got["epoch"] == 3 and got["threshold"] == 0.4 and got["note"] != got["note"]
    torch.testing.assert_close(got["ema"], torch.arange(3.0))
    assert got["versions"]["torch"] == torch.__version__


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    model = _small_model()
    path = save_checkpoint(tmp_path / "m.pt", model, extra={"epoch": 1})
    save_checkpoint(path, model, extra={"epoch": 2})
    assert load_checkpoint(path)[1]["epoch"] == 2


def test_extra_that_is_not_json_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(CheckpointError, match="JSON-able"):
        save_checkpoint(tmp_path / "m.pt", _small_model(), extra={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "best_model.pt"
    # torch.load(weights_only=False) of this file would run the payload
    torch.save({"state_dict": _Payload(str(marker)), "config": {}}, evil)
    with pytest.raises(CheckpointError, match="best_model.pt: not a pneumodet checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()

    # an encoder weights file goes through torch.load(weights_only=True): refused too
    torch.save({"conv1.weight": _Payload(str(marker))}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="weights.pth: cannot be read as weights"):
        read_state_dict(tmp_path / "weights.pth")
    assert not marker.exists()


def test_other_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without pneumodet metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")
