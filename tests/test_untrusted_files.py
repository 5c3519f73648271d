"""Untrusted checkpoints, configs and weights: refused early, cheaply, in one line naming the file.

A checkpoint or a ``config.yaml`` may come from anywhere. Whatever it holds (a tensor of another shape,
metadata that is a list, nested 10 000 deep or not JSON, a threshold ``"abc"``, a config value of another
type, YAML aliases that expand to gigabytes, bytes that are not UTF-8), loading it ends in a valid object
or in one ``CheckpointError``/``ConfigError`` line naming the file, before anything costly is built.
``--pretrained`` without a network fails at once instead of retrying for a minute and then training
from random weights. docs/ROBUSTNESS.md lists the cases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from _helpers import assert_one_line_error
from badinputs import small_patients, write_dataset
from pneumodet.cli import main
from pneumodet.config import TrainConfig
from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from pneumodet.rundir import RunDir

#: A small network (about 1 MB of weights) for checkpoints written many times.
TINY = dict(encoder="mobilenetv3_small_050", image_size=64, fpn_channels=16, head_convs=1)
BILLION_LAUGHS = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    epochs: [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)


@pytest.fixture(autouse=True)
def _quiet_stale_log_handlers(monkeypatch):
    """Library loggers may hold a stream captured by an earlier test; a write to it must not print a
    logging traceback into the stderr these tests read."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err




# ------------------------------------------------------------------------------------------ checkpoints
def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def rewrite(src: Path, dst: Path, *, tensors: Any = None, config: Any = None, extra: Any = None,
            meta: dict[str, str] | None = None) -> Path:
    """A copy of checkpoint ``src`` with some parts replaced: ``tensors`` (a function of the tensors),
    ``config``/``extra`` (functions of the parsed JSON), ``meta`` (raw metadata strings)."""
    state, metadata = read_parts(src)
    if tensors is not None:
        state = tensors(state)
    if config is not None:
        metadata["config"] = json.dumps(config(json.loads(metadata["config"])))
    if extra is not None:
        metadata["extra"] = json.dumps(extra(json.loads(metadata["extra"])))
    metadata.update(meta or {})
    save_file(state, str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.pt", model,
                           extra={"threshold": 0.4, "image_size": 64, "epoch": 0, "val_map": float("nan")})


def _reshaped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k in state if k.endswith("conv.weight") or k.endswith(".weight"))
    return {**state, name: torch.zeros(3, 5)}


def _as_int(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k, v in state.items() if v.is_floating_point())
    return {**state, name: state[name].to(torch.int32)}


#: name -> (what to change with :func:`rewrite`, patterns the one line must hold)
MALFORMED: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "tensor_of_another_shape": ({"tensors": _reshaped}, (r"of another shape or dtype", r"\[3, 5\]")),
    "tensor_of_another_dtype": ({"tensors": _as_int}, (r"of another shape or dtype", r"I32")),
    "tensor_missing": ({"tensors": lambda s: dict(list(s.items())[1:])}, (r"1 missing",)),
    "tensor_unexpected": ({"tensors": lambda s: {**s, "evil\nname": torch.zeros(1)}}, (r"1 unexpected", r"evil\\nname")),
    "config_is_a_list": ({"config": lambda c: [c]}, (r"'config' must be a JSON object, not list",)),
    "config_nested_deeply": ({"meta": {"config": '{"encoder": ' + "[" * 5000 + "]" * 5000 + "}"}},
                             (r"'config' is nested too deeply",)),
    "config_too_long": ({"config": lambda c: {**c, "encoder": "x" * 100_000}}, (r"'config' is \d+ characters",)),
    "config_not_json": ({"meta": {"config": "{encoder: resnet"}}, (r"'config' is not JSON",)),
    "config_value_of_wrong_type": ({"config": lambda c: {**c, "fpn_channels": "16"}},
                                   (r"fpn_channels must be a whole number, got '16'",)),
    "config_bool_for_int": ({"config": lambda c: {**c, "head_convs": True}}, (r"head_convs must be a whole number",)),
    "config_unknown_key": ({"config": lambda c: {**c, "__class__": "os.system"}}, (r"unknown model config key",)),
    "image_size_a_list": ({"config": lambda c: {**c, "image_size": [64, 64]}}, (r"image_size must be a whole number",)),
    "image_size_huge": ({"config": lambda c: {**c, "image_size": 1 << 20}}, (r"image_size must be in \[32, 2048\]",)),
    "unknown_encoder": ({"config": lambda c: {**c, "encoder": "no_such_net"}}, (r"unknown encoder 'no_such_net'",)),
    "extra_not_json": ({"meta": {"extra": "threshold=0.4"}}, (r"'extra' is not JSON",)),
    "threshold_abc": ({"extra": lambda e: {**e, "threshold": "abc"}}, (r"threshold must be a number in \[0, 1\], got 'abc'",)),
    "threshold_out_of_range": ({"extra": lambda e: {**e, "threshold": 7}}, (r"threshold must be a number in \[0, 1\]",)),
    "threshold_of_400_digits": ({"extra": lambda e: {**e, "threshold": 10**400}},
                                (r"threshold must be a number in \[0, 1\], got 1000",)),
    "number_of_5000_digits": ({"meta": {"extra": '{"epoch": ' + "9" * 5000 + "}"}}, (r"'extra' is not usable JSON",)),
    "extra_image_size_a_list": ({"extra": lambda e: {**e, "image_size": [1, 2]}}, (r"image_size must be a whole number",)),
    "versions_not_json": ({"meta": {"versions": "torch 2"}}, (r"'versions' is not JSON",)),
    "format_version_2": ({"meta": {"format_version": "2"}}, (r"format version '2'",)),
    "not_safetensors": ({"garbage": True}, (r"not a pneumodet checkpoint",)),
    # case 3: a 1 KB file naming a 5 GB encoder is refused from its header, nothing built
    "huge_encoder_tiny_file": ({"tensors": lambda s: {"x": torch.zeros(4)},
                                "config": lambda c: {**c, "encoder": "regnety_2560", "image_size": 512,
                                                     "fpn_channels": 256, "head_convs": 4}},
                               (r"weights do not match the model config \(encoder 'regnety_2560'\)", r"unexpected")),
}


def make_malformed(good: Path, dst: Path, case: str) -> Path:
    change = dict(MALFORMED[case][0])
    if change.pop("garbage", False):  # the start of a pickle, then noise
        dst.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00torch" + bytes(range(256)))
        return dst
    return rewrite(good, dst, **change)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), small_patients(12), size=96)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_one_line_naming_the_file(case, good_checkpoint, dataset, tmp_path, capsys):
    """``predict`` and ``export`` of each malformed checkpoint: one line naming it, exit 2, nothing written."""
    bad = make_malformed(good_checkpoint, tmp_path / f"{case}.pt", case)
    patterns = (re.escape(str(bad)), *MALFORMED[case][1])
    code, err = run_cli(capsys, "predict", bad, dataset / "stage_2_train_images", "--out", tmp_path / "s.csv")
    assert_one_line_error(code, err, "predict", *patterns)
    code, err = run_cli(capsys, "export", bad, "--onnx", tmp_path / "m.onnx")
    assert_one_line_error(code, err, "export", *patterns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]
    with pytest.raises(CheckpointError):  # the library says the same
        load_checkpoint(bad)


def test_the_good_checkpoint_still_loads(good_checkpoint):
    """The control of the cases above: the file they are made from loads, extra and all."""
    model, extra = load_checkpoint(good_checkpoint)
    assert model.config == ModelConfig(**TINY)
    assert extra["threshold"] == 0.4 and extra["image_size"] == 64 and extra["val_map"] != extra["val_map"]


def test_a_1kb_checkpoint_naming_a_huge_encoder_costs_no_memory(good_checkpoint, tmp_path):
    """Case 3, measured: ``predict`` of a 1 KB file whose config names regnety_2560 (5 GB of weights, over a
    minute to build) is refused from its header. Every model built before the refusal is on the ``meta``
    device, and the process's peak memory stays near that of importing torch (a real build needs 5 GB)."""
    bad = make_malformed(good_checkpoint, tmp_path / "huge.pt", "huge_encoder_tiny_file")
    assert bad.stat().st_size < 1024
    script = textwrap.dedent(f"""
        import sys, torch
        from pneumodet.cli import main
        from pneumodet.model import retinanet
        devices = []
        init = retinanet.PneumoRetinaNet.__init__
        def spy(self, config, **kwargs):
            devices.append(torch.empty(0).device.type)
            init(self, config, **kwargs)
        retinanet.PneumoRetinaNet.__init__ = spy
        code = main(["predict", {str(bad)!r}, {str(tmp_path)!r}, "--out", {str(tmp_path / "s.csv")!r}])
        # VmHWM: this process's own peak (ru_maxrss may carry the forking pytest process's peak across exec)
        hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("RESULT", code, ",".join(devices), hwm_kb // 1024)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result, done.stdout + done.stderr
    _, code, devices, peak_mb = result[0].split(" ")
    assert code == "2" and "weights do not match" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert devices == "meta"  # one build, on the meta device: no tensor memory, no weight initialisation
    assert int(peak_mb) < 3000, f"peak RSS {peak_mb} MB"


def test_metadata_limits_refuse_before_any_model_is_built(good_checkpoint, tmp_path, monkeypatch):
    """Config and extra problems are found from the metadata alone: not even a meta model is built."""
    from pneumodet.model import retinanet

    built = []
    monkeypatch.setattr(retinanet.PneumoRetinaNet, "__init__", lambda *a: built.append(a))
    for case in ("config_is_a_list", "config_nested_deeply", "threshold_abc", "image_size_huge", "extra_not_json"):
        with pytest.raises(CheckpointError):
            load_checkpoint(make_malformed(good_checkpoint, tmp_path / f"{case}.pt", case))
    assert built == []


# --------------------------------------------------------------------------------------------- configs
def train_args(dataset: Path, split_dir: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--data", dataset, "--split", split_dir, "--out", out, "--encoder", TINY["encoder"],
            "--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--epochs", "1", "--aug", "resize_only",
            "--precision", "32-true", "--cache-dir", out.parent / "cache", *extra]


@pytest.fixture(scope="module")
def split_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    assert main(["split", str(dataset), "--out", str(out), "--val", "0.25", "--test", "0.25"]) == 0
    return out


@pytest.fixture(scope="module")
def finished_run(dataset: Path, split_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of the tiny network, trained through ``train --config`` with model overrides."""
    root = tmp_path_factory.mktemp("run")
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump({"model": {"fpn_channels": TINY["fpn_channels"],
                                                "head_convs": TINY["head_convs"]}}))
    assert main([str(a) for a in train_args(dataset, split_dir, root / "run", "--config", config)]) == 0
    return root / "run"


#: name -> (config.yaml text or bytes, patterns the one line must hold)
BAD_CONFIGS: dict[str, tuple[str | bytes, tuple[str, ...]]] = {
    "epochs_text": ("epochs: abc\n", (r"epochs must be a whole number, got 'abc'",)),
    "epochs_true": ("epochs: true\n", (r"epochs must be a whole number, got True",)),
    "image_size_list": ("image_size: [1, 2]\n", (r"image_size must be a whole number, got \[1, 2\]",)),
    "lr_null": ("lr: null\n", (r"lr must be a finite number, got None",)),
    "lr_1e-4": ("lr: 1e-4\n", (r"YAML reads 1e-4 as text",)),
    "lr_nan": ("lr: .nan\n", (r"lr must be a finite number",)),
    "data_dir_number": ("data_dir: 5\n", (r"data_dir must be text, got 5",)),
    "seed_negative": ("seed: -1\n", (r"seed must be in \[0, 4294967295\]",)),
    "num_workers_negative": ("num_workers: -3\n", (r"num_workers must be in \[0, 256\]",)),
    "devices_zero": ("devices: 0\n", (r"devices must be in \[1, 1024\]",)),
    "image_size_huge": ("image_size: 65536\n", (r"image_size must be in \[32, 2048\], got 65536",)),
    "image_size_odd": ("image_size: 100\n", (r"image_size must be a multiple of 32 in \[64, 2048\], got 100",)),
    "batch_size_huge": ("batch_size: 100000000\n", (r"batch_size must be in \[1, 4096\]",)),
    "epochs_huge": ("epochs: 1000000000\n", (r"epochs must be in \[1, 100000\]",)),
    "model_wrong_type": ("model: {fpn_channels: wide}\n", (r"model config fpn_channels must be a whole number",)),
    "model_unknown_key": ("model: {layers: 3}\n", (r"unknown model config key\(s\): layers",)),
    "model_a_list": ("model: [1, 2]\n", (r"model must be a mapping",)),
    "unknown_key": ("epoch: 3\n", (r"unknown config keys: epoch",)),
    "not_a_mapping": ("- epochs\n- 3\n", (r"must be a mapping of keys to values, not list",)),
    "not_utf8": (b"epochs: 3\ndata_dir: \xff\xfe\n", (r"not UTF-8",)),
    "billion_laughs": (BILLION_LAUGHS, (r"aliases",)),
    "python_tag": ("epochs: !!python/object/apply:os.system ['true']\n", (r"not a valid config file",)),
    "syntax_error": ("epochs: [3\n", (r"not a valid config file",)),
    "nul_in_path": ('data_dir: "a\\0b"\n', (r"data_dir must be text",)),
    "number_of_5000_digits": ("epochs: " + "9" * 5000 + "\n", (r"not a valid config file: Exceeds the limit",)),
    "number_of_400_digits": ("epochs: " + "9" * 400 + "\n", (r"epochs must be in \[1, 100000\], got 9999",)),
    "impossible_date": ("epochs: 2024-13-45\n", (r"not a valid config file: month must be in 1\.\.12",)),
    "aug_unknown": ("aug: extreme\n", (r"aug must be one of",)),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_train_config_of_wrong_types_is_one_line_naming_the_file(case, dataset, split_dir, tmp_path, capsys):
    text, patterns = BAD_CONFIGS[case]
    config = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(dataset, split_dir, out, "--config", config))
    assert_one_line_error(code, err, "train", re.escape(str(config)), *patterns)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train --resume", "evaluate"])
def test_a_billion_laughs_config_yaml_in_a_run_is_refused(command, finished_run, tmp_path, capsys):
    """A 0.6 KB ``config.yaml`` of nested aliases (10^9 strings once expanded) is refused, not expanded."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    RunDir(run).config.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 700
    args = ["train", "--out", run, "--resume"] if command == "train --resume" else ["evaluate", run]
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, command.split()[0], re.escape(str(RunDir(run).config)), "aliases")


@pytest.mark.parametrize("case", ["threshold_abc", "tensor_of_another_shape", "config_is_a_list", "unknown_encoder"])
def test_evaluate_of_a_run_with_a_malformed_best_model(case, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    best = RunDir(run).best_model
    make_malformed(RunDir(finished_run).best_model, best, case)
    code, err = run_cli(capsys, "evaluate", run)
    assert_one_line_error(code, err, "evaluate", re.escape(str(best)), *MALFORMED[case][1])
    assert not list(run.glob("eval_*"))


@pytest.mark.parametrize("text, patterns", [
    ("epochs: abc\n", (r"epochs must be a whole number",)),
    (b"\xff\xfe\x00e\x00p", (r"not UTF-8",)),
])
def test_evaluate_of_a_run_with_a_malformed_config_yaml(text, patterns, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = RunDir(run).config
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli(capsys, "evaluate", run)
    assert_one_line_error(code, err, "evaluate", re.escape(str(config)), *patterns)


def test_the_finished_run_config_round_trips(finished_run):
    """The control: the config ``train`` wrote reads back, with its model overrides."""
    config = TrainConfig.from_yaml(RunDir(finished_run).config)
    assert (config.model.fpn_channels, config.model.head_convs) == (16, 1)
    assert config.model.encoder == TINY["encoder"]


# ------------------------------------------------------------------------------- pretrained, offline
@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and torch hub caches, and a spy failing the test if a hub download starts."""
    import timm.models._hub as timm_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a hub download started: {args} {kwargs}")

    monkeypatch.setattr(timm_hub, "hf_hub_download", no_download)
    return tmp_path


def test_train_pretrained_offline_is_one_line(dataset, split_dir, tmp_path, empty_caches, monkeypatch, capsys):
    """``HF_HUB_OFFLINE=1`` and no cached weights: one line suggesting ``--weights FILE``, exit 2, no hub
    request, and no run trained from random weights under a config saying ``pretrained: true``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(dataset, split_dir, out, "--pretrained"))
    assert_one_line_error(code, err, "train", TINY["encoder"], "HF_HUB_OFFLINE", r"--weights FILE")
    run = RunDir(out)
    assert not run.done.exists() and not run.best_model.exists() and not run.last_ckpt.exists()


def test_train_pretrained_with_the_hub_unreachable_fails_without_retries(dataset, split_dir, tmp_path, empty_caches,
                                                                         monkeypatch, capsys):
    """Not offline, but the hub's host cannot be reached: found by one connection attempt (bounded), not by a
    minute of download retries (the spy fails the test if a download starts)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.pneumodet.invalid")  # RFC 6761: never resolves
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(dataset, split_dir, out, "--pretrained"))
    assert_one_line_error(code, err, "train", r"hub\.pneumodet\.invalid", r"--weights FILE")
    assert not RunDir(out).done.exists()


def _imagenet_like_weights(path: Path) -> dict[str, torch.Tensor]:
    """A classification state dict of the tiny encoder (3-channel stem, classifier), saved as ``path``."""
    import timm

    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model(TINY["encoder"]).state_dict().items()}
    save_file(state, str(path))
    return state


def test_train_with_a_local_weights_file_works_offline(dataset, split_dir, tmp_path, empty_caches, monkeypatch,
                                                       capsys):
    """``--weights FILE`` needs no network: the run trains from the file (the stem is still the file's RGB
    kernels summed to one channel after a few small steps) and its config records the file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    weights = tmp_path / "imagenet.safetensors"
    state = _imagenet_like_weights(weights)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(dataset, split_dir, out, "--weights", weights, "--config",
                                            _tiny_model_yaml(tmp_path)))
    assert code == 0, err
    run = RunDir(out)
    assert run.done.exists() and TrainConfig.from_yaml(run.config).model.weights == str(weights)
    model, _ = load_checkpoint(run.best_model)
    stem = model.encoder.body.state_dict()["conv_stem.weight"]
    expected = state["conv_stem.weight"].sum(dim=1, keepdim=True)
    assert (stem - expected).abs().max() < 0.02 < (expected - expected.mean()).abs().max()


def _tiny_model_yaml(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {"fpn_channels": TINY["fpn_channels"], "head_convs": TINY["head_convs"]}}))
    return path


def test_pretrained_weights_in_the_local_cache_load_offline(tmp_path, empty_caches, monkeypatch):
    """The neighbour: weights downloaded before (in the Hugging Face cache) are used offline, from disk."""
    import timm
    from huggingface_hub import constants

    from pneumodet.model.encoders import Encoder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_id = timm.models.get_pretrained_cfg(TINY["encoder"]).hf_hub_id
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    state = _imagenet_like_weights(snapshot / "model.safetensors")
    encoder = Encoder(TINY["encoder"], pretrained=True)
    torch.testing.assert_close(encoder.body.state_dict()["conv_stem.weight"],
                               state["conv_stem.weight"].sum(dim=1, keepdim=True))


def test_pretrained_for_an_encoder_without_published_weights_is_refused(empty_caches):
    """timm would log a warning and go on from random weights; pneumodet refuses."""
    from pneumodet.model.encoders import Encoder

    with pytest.raises(ConfigError, match="'convnext_atto_rms' unavailable: timm publishes none"):
        Encoder("convnext_atto_rms", pretrained=True)


# ------------------------------------------------------------------------------------------------ fuzz
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**400, 10**400) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = st.sampled_from([f.name for f in dataclasses.fields(ModelConfig)])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                          torch.bool])


class Parts:
    """The tensors and metadata of a checkpoint (shown briefly in hypothesis's reports)."""

    def __init__(self, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.state, self.meta = state, meta

    def __repr__(self) -> str:
        return f"Parts({len(self.state)} tensors, metadata {self.meta})"


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@st.composite
def checkpoint_parts(draw, good: Parts) -> Parts:
    """The good tiny checkpoint with a few of its parts replaced at random."""
    state, meta = dict(good.state), dict(good.meta)
    for _ in range(draw(st.integers(0, 3))):
        part = draw(st.sampled_from(["config_value", "extra_value", "metadata_text", "metadata_json",
                                     "drop_tensor", "add_tensor", "reshape_tensor"]))
        if part in ("config_value", "extra_value"):
            key = "config" if part == "config_value" else "extra"
            values = _json_object(meta[key])
            if values is None:  # an earlier change made it something else
                continue
            names = CONFIG_KEYS if key == "config" else st.sampled_from(
                ["threshold", "image_size", "epoch", "val_map", "encoder", "other"])
            values[draw(names)] = draw(JSONISH)
            meta[key] = json.dumps(values)
        elif part == "metadata_text":
            meta[draw(st.sampled_from(["config", "extra", "versions", "format_version"]))] = draw(st.text(max_size=40))
        elif part == "metadata_json":
            meta[draw(st.sampled_from(["config", "extra", "versions"]))] = json.dumps(draw(JSONISH))
        elif part == "drop_tensor" and state:
            state.pop(draw(st.sampled_from(sorted(state))))
        elif part in ("add_tensor", "reshape_tensor"):
            name = draw(st.sampled_from(sorted(state))) if part == "reshape_tensor" and state else \
                draw(st.text(min_size=1, max_size=20))
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            state[name] = torch.zeros(shape, dtype=draw(DTYPES))
    return Parts(state, meta)


@pytest.fixture(scope="module")
def good_parts(good_checkpoint) -> Parts:
    return Parts(*read_parts(good_checkpoint))


def test_fuzzed_checkpoints_only_ever_load_or_raise_checkpoint_error(good_parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_ckpt")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(parts=checkpoint_parts(good_parts))
    def check(parts):
        path = folder / "fuzzed.pt"
        save_file(parts.state, str(path), metadata=parts.meta)
        try:
            model, extra = load_checkpoint(path)
        except CheckpointError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            return
        assert isinstance(model.config, ModelConfig) and isinstance(extra, dict)

    check()


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**400, 10**400) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]


@st.composite
def config_files(draw) -> bytes:
    """A YAML document of real and made-up keys with random values, random bytes, or a valid config with
    bytes flipped."""
    kind = draw(st.sampled_from(["document", "bytes", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "document":
        keys = st.sampled_from(TRAIN_KEYS) | st.text(max_size=6)
        doc = draw(st.dictionaries(keys, YAML_VALUES, max_size=6) | YAML_VALUES)
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    text = bytearray(yaml.safe_dump(TrainConfig().to_dict(), sort_keys=False).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text) - 1))
        text[at] = draw(st.integers(0, 255))
    return bytes(text)


def test_fuzzed_config_yaml_only_ever_loads_or_raises_config_error(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_yaml")

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(content=config_files())
    def check(content):
        path = folder / "config.yaml"
        path.write_bytes(content)
        try:
            config = TrainConfig.from_yaml(path)
        except ConfigError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            return
        assert TrainConfig.from_dict(config.to_dict()) == config

    check()
