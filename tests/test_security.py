"""Security: loading never runs code, outputs carry no identifying DICOM data, inputs stay in their folder."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from badinputs import (
    IDENTIFYING,
    PHI,
    PRIVATE_MRN,
    add_identifying_data,
    find_identifying,
    make_dicom,
    small_patients,
    write_dataset,
)
from pneumodet.cli import main
from pneumodet.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src" / "pneumodet"


@pytest.fixture(autouse=True)
def _quiet_stale_log_handlers(monkeypatch):
    """Library loggers may hold a stream captured by an earlier test; a write to it must not print a
    logging traceback into the stderr these tests read."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


class _CreatesFile:
    """Unpickling this object opens ``path`` for writing: the file appearing proves code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def poisoned_files(folder: Path) -> tuple[dict[str, Path], Path]:
    """A pickled ``.pt`` model, a Lightning-style ``.ckpt`` and a ``.pth`` weights file, each of which
    would create ``marker`` if unpickled without ``weights_only``."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    payload = _CreatesFile(marker)
    files = {
        "model.pt": {"state_dict": {"w": torch.zeros(2)}, "extra": payload},
        "lightning.ckpt": {"epoch": 0, "global_step": 3, "state_dict": {"model.w": torch.zeros(2)},
                           "callbacks": {"RunKeeper": payload}, "pytorch-lightning_version": "2.6.0"},
        "weights.pth": {"conv1.weight": torch.zeros(1), "fc": payload},
    }
    paths = {}
    for name, content in files.items():
        torch.save(content, folder / name)
        paths[name] = folder / name
    assert not marker.exists()
    return paths, marker


def assert_refused(code: int, err: str, command: str, marker: Path, *patterns: str) -> None:
    assert not marker.exists(), "unpickling ran code"
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"pneumodet {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    """The control: without ``weights_only`` the same file does create the marker."""
    paths, marker = poisoned_files(tmp_path)
    torch.load(paths["model.pt"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "lightning.ckpt"])
def test_load_checkpoint_refuses_pickles(tmp_path, name):
    from pneumodet.model.checkpoint import load_checkpoint

    paths, marker = poisoned_files(tmp_path)
    with pytest.raises(CheckpointError, match="pickled files are refused"):
        load_checkpoint(paths[name])
    assert not marker.exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), small_patients(12), size=96)


@pytest.mark.parametrize("name", ["model.pt", "lightning.ckpt"])
def test_predict_refuses_a_pickled_model(tmp_path, dataset, capsys, name):
    paths, marker = poisoned_files(tmp_path / "evil")
    code = main(["predict", str(paths[name]), str(dataset / "stage_2_train_images"), "--out", str(tmp_path / "s.csv")])
    assert_refused(code, capsys.readouterr().err, "predict", marker, re.escape(str(paths[name])), "refused")
    assert not (tmp_path / "s.csv").exists()


@pytest.fixture(scope="module")
def split_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    assert main(["split", str(dataset), "--out", str(out), "--val", "0.25", "--test", "0.25"]) == 0
    return out


def train_args(dataset: Path, split_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset), "--split", str(split_dir), "--out", str(out), "--encoder", "resnet18",
            "--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--epochs", "1", "--aug", "resize_only",
            "--precision", "32-true", "--cache-dir", str(out.parent / "cache"), *extra]


def test_train_resume_refuses_a_poisoned_last_checkpoint(tmp_path, dataset, split_dir, capsys):
    from pneumodet.config import TrainConfig

    paths, marker = poisoned_files(tmp_path / "evil")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    TrainConfig.with_recipe("default", data_dir=str(dataset), split_dir=str(split_dir), out_dir=str(run),
                            cache_dir=str(tmp_path / "cache"), encoder="resnet18", image_size=64, batch_size=2,
                            num_workers=0, epochs=1, precision="32-true").to_yaml(run / "config.yaml")
    shutil.copy(paths["lightning.ckpt"], run / "checkpoints" / "last.ckpt")
    code = main(["train", "--out", str(run), "--resume"])
    assert_refused(code, capsys.readouterr().err, "train", marker, r"last\.ckpt")
    assert not (run / "done.json").exists()


def test_train_refuses_pickled_encoder_weights(tmp_path, dataset, split_dir, capsys):
    paths, marker = poisoned_files(tmp_path / "evil")
    code = main(train_args(dataset, split_dir, tmp_path / "run", "--weights", str(paths["weights.pth"])))
    assert_refused(code, capsys.readouterr().err, "train", marker, re.escape(str(paths["weights.pth"])))


def test_every_torch_load_in_the_library_passes_weights_only_true():
    """No loader in ``src/`` may unpickle arbitrary objects (torch.load, pickle, numpy pickles)."""
    calls = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            calls.append((path.name, match.group(1)))
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True|\bdill\b|joblib\.load", text), path
    assert calls, "no torch.load found: the search pattern is broken"
    unsafe = [(name, args) for name, args in calls if not re.search(r"weights_only\s*=\s*True", args)]
    assert unsafe == []


# ============================================================================================ privacy
@pytest.fixture(scope="module")
def identified(tmp_path_factory) -> Path:
    """A dataset whose every DICOM carries identifying data in standard elements (names, addresses,
    phones, occupation, weight, every date and time, institution, accession, other IDs, comments) and
    a medical record number in a private element (``badinputs.add_identifying_data``)."""
    root = write_dataset(tmp_path_factory.mktemp("identified"), small_patients(12), size=96)
    for path in sorted((root / "stage_2_train_images").glob("*.dcm")):
        add_identifying_data(path)
    return root


def assert_no_identifying_data(out: Path, printed: list[str], source: Path) -> None:
    """No file under ``out`` and no printed text holds an identifying value, while ``source`` (an input)
    holds every one of them: the check can fail."""
    as_written = [*PHI.values(), *IDENTIFYING.values(), PRIVATE_MRN]
    assert find_identifying(source.read_bytes(), as_written) == as_written
    leaks = [(str(p.relative_to(out)), v) for p in sorted(out.rglob("*")) if p.is_file()
             for v in find_identifying(p.read_bytes())]
    leaks += [("stdout/stderr", v) for text in printed for v in find_identifying(text.encode())]
    assert leaks == []


def test_eda_shows_only_technical_header_elements_and_reads_an_allow_list(tmp_path, identified, capsys):
    """``pneumodet eda`` on files full of identifying data: the sample header shows allow-listed
    technical elements and says how many it withheld; no output file or printed line holds any
    identifying value, and neither does what ``read_dicom`` returns."""
    from pneumodet.data.dicom import read_dicom

    out = tmp_path / "eda"
    code = main(["eda", str(identified), "--out", str(out), "--workers", "1", "--samples", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "(0028,0010) Rows" in html and "(0010,0020) Patient ID" in html
    assert re.search(r"\d+ other element\(s\) withheld", html)
    images = identified / "stage_2_train_images"
    assert_no_identifying_data(out, [captured.out + captured.err], images / "p000.dcm")
    for metadata_only in (True, False):
        meta = read_dicom(images / "p001.dcm", metadata_only=metadata_only)[1]
        assert find_identifying(repr(meta).encode()) == []


@pytest.mark.slow
def test_outputs_carry_no_identifying_dicom_data(tmp_path, identified, capsys):
    """Every DICOM carries identifying data in standard and private elements (``identified``); no file
    written by eda, cache, split, train (metrics, logs, report, checkpoints), predict (CSV, JSON,
    overlays) or score, and no printed line, contains any of it."""
    import torch as _torch

    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    _torch.manual_seed(0)
    run = tmp_path / "run"
    save_checkpoint(run / "best_model.pt", build_model(ModelConfig(encoder="resnet18", image_size=64)),
                    extra={"threshold": 0.0, "image_size": 64})
    out = tmp_path / "outputs"
    images = identified / "stage_2_train_images"
    commands = [
        ["eda", str(identified), "--out", str(out / "eda"), "--workers", "1", "--samples", "2"],
        ["cache", str(identified), "--size", "32", "--out", str(out / "cache"), "--workers", "1"],
        ["predict", str(run), str(images), "--out", str(out / "sub.csv"), "--json", str(out / "pred.json"),
         "--overlays", str(out / "overlays"), "--threshold", "0.0"],
        ["score", str(out / "sub.csv"), "--labels", str(identified / "stage_2_train_labels.csv"), "--json",
         str(out / "score.json")],
        ["split", str(identified), "--out", str(out / "split"), "--val", "0.25", "--test", "0.25"],
        train_args(identified, out / "split", out / "train" / "run"),
    ]
    printed = []
    for command in commands:
        assert main(command) == 0, command
        captured = capsys.readouterr()
        printed.append(captured.out + captured.err)
    assert len(list((out / "overlays").glob("*.png"))) == 12 and (out / "eda" / "report.html").exists()
    assert (out / "train" / "run" / "report.html").exists() and (out / "score.json").exists()
    assert pd.read_csv(out / "sub.csv")["patientId"].nunique() == 12
    assert_no_identifying_data(out, printed, images / "p000.dcm")


# ============================================================================================ paths
def test_predict_does_not_follow_links_out_of_its_folder_unless_asked(tmp_path, capsys):
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "best_model.pt", build_model(ModelConfig(encoder="resnet18", image_size=64)),
                    extra={"threshold": 0.5, "image_size": 64})
    outside = tmp_path / "outside"
    make_dicom(outside / "secret.dcm", np.zeros((64, 64), np.uint8))
    make_dicom(outside / "deeper" / "secret2.dcm", np.zeros((64, 64), np.uint8))
    inputs = tmp_path / "inputs"
    make_dicom(inputs / "mine.dcm", np.zeros((64, 64), np.uint8))
    (inputs / "link.dcm").symlink_to(outside / "secret.dcm")
    (inputs / "dir_link").symlink_to(outside / "deeper", target_is_directory=True)
    (inputs / "inner.dcm").symlink_to(inputs / "mine.dcm")  # stays inside: followed (and a duplicate)

    def predicted(*extra: str) -> tuple[set[str], str]:
        sub = tmp_path / "sub.csv"
        assert main(["predict", str(run), str(inputs), "--out", str(sub), *extra]) == 0
        return set(pd.read_csv(sub)["patientId"]), capsys.readouterr().out

    ids, out = predicted()
    assert ids == {"mine"}
    assert "symlinks not followed: 2" in out and "duplicate mine" in out
    ids, out = predicted("--follow-symlinks")
    assert ids == {"mine", "secret", "secret2"}
