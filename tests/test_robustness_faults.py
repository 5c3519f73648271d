"""Faults during long work: a process killed mid-write, a disk that fills up, a damaged cache.

Kills are real SIGKILLs of a child process (nothing gets to clean up); a full disk is a real 1 MB
tmpfs where the machine allows mounting one, and otherwise a writer that stops half-way with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from badinputs import small_patients, write_dataset
from pneumodet.cli import main
from pneumodet.data.cache import ARRAY_NAME, INDEX_NAME, ImageCache, build_cache
from pneumodet.data.dicom import read_dicom
from pneumodet.data.preprocess import resize_area
from pneumodet.data.rsna import load_rsna
from pneumodet.errors import CheckpointError, SubmissionError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _quiet_stale_log_handlers(monkeypatch):
    """Library loggers may hold a stream captured by an earlier test; a write to it must not print a
    logging traceback into the stderr these tests read."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), small_patients(12), size=96)


def one_line_error(capsys, code: int, command: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"pneumodet {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_python(code: str, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ============================================================================================ training
@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(dataset, tmp_path):
    """The process dies (SIGKILL) half-way through writing ``last.ckpt`` the second time: the half file is
    the temporary one, ``last.ckpt`` is still the first complete checkpoint, and ``--resume`` loads it and
    finishes the run with exactly the steps of an uninterrupted one."""
    split = tmp_path / "split"
    assert main(["split", str(dataset), "--out", str(split), "--val", "0.25", "--test", "0.25"]) == 0
    run = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--split", str(split), "--out", str(run), "--encoder", "resnet18",
            "--image-size", "64", "--batch-size", "2", "--num-workers", "0", "--epochs", "2", "--aug", "resize_only",
            "--precision", "32-true", "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "2"]
    killed = run_python(f"""
        import io, os, signal, torch
        real_save, calls = torch.save, []

        def dying_save(obj, f, *a, **k):
            name = getattr(f, "name", "")
            if ".last.ckpt." in str(name) and str(name).endswith(".tmp"):  # safeio's temporary file
                calls.append(name)
                if len(calls) == 2:  # the second write of last.ckpt: half the bytes, then die
                    buffer = io.BytesIO()
                    real_save(obj, buffer)
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)

        torch.save = dying_save
        from pneumodet.cli import main
        main({args!r})
    """)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = run / "checkpoints"
    half = list(ckpt.glob(".last.ckpt.*.tmp"))
    assert len(half) == 1 and half[0].stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - the half file is not loadable, whatever torch calls it
        torch.load(half[0], weights_only=True)
    first = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2 and not (run / "done.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "pneumodet.cli", "train", "--out", str(run), "--resume"],
                             env=ENV, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = json.loads((run / "done.json").read_text())
    train_patients = len((split / "train.csv").read_text().splitlines()) - 1
    assert done["steps"] == 2 * -(-train_patients // 2) and done["epochs"] == 2
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == done["steps"]


def test_disk_full_while_writing_last_ckpt_keeps_the_previous_one(tmp_path, monkeypatch):
    from pneumodet.training import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: cannot write the checkpoint \(No space left on device: .* filled after "):
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io_.load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_disk_full_while_writing_a_model_file_keeps_the_previous_one(tmp_path, monkeypatch):
    import pneumodet.model.checkpoint as checkpoint
    from pneumodet.model import ModelConfig, build_model, load_checkpoint, save_checkpoint

    model = build_model(ModelConfig(encoder="resnet18", image_size=64))
    path = save_checkpoint(tmp_path / "best_model.pt", model, extra={"threshold": 0.3})

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"best_model\.pt: cannot write .*No space left on device"):
        save_checkpoint(path, model, extra={"threshold": 0.9})
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["threshold"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pt"]


class _HalfThenFull:
    """A text file whose first write stores half of the text, then fails as a full disk does."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, text: str) -> int:
        self.fh.write(text[: len(text) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def test_disk_full_while_writing_a_submission(tmp_path, monkeypatch, capsys):
    import pneumodet.safeio as safeio
    import pneumodet.submission as submission

    path = submission.write_submission(tmp_path / "sub.csv", {"a": np.array([[0.9, 1, 2, 3, 4]])})
    before = path.read_bytes()
    monkeypatch.setattr(safeio, "open", lambda *a, **k: _HalfThenFull(open(*a, **k)), raising=False)  # noqa: SIM115
    with pytest.raises(SubmissionError, match=r"sub\.csv: cannot write the submission \(No space left"):
        submission.write_submission(path, {"b": np.zeros((0, 5))})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


class _FullDiskFile:
    """A file open for writing on a disk that fills up: the first write stores half of its data, then
    fails with ENOSPC. No ``fileno``: writers that would go around Python's ``write`` (PIL does) use it."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


#: safeio's temporary file for destination NAME: ``.NAME.<12 hex digits>.tmp``.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")


def fill_the_disk_for(monkeypatch, pattern: str) -> None:
    """From now on, every file opened for writing (through ``open``, ``io.open`` or ``Path.open``) whose destination name
    matches the glob ``pattern`` (directly, or through its temporary file) fails half-way, as on a full
    disk; all other files are untouched."""
    import builtins
    import io
    from fnmatch import fnmatch

    real_open = io.open  # builtins.open is io.open; pathlib's Path.open calls io.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return fh
        name = Path(os.fsdecode(file)).name
        while (temporary := _TEMPORARY.match(name)) is not None:  # a temporary file's destination
            name = temporary["name"]
        return _FullDiskFile(fh) if fnmatch(name, pattern) else fh

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    monkeypatch.setattr(io, "open", open_on_a_full_disk)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_while_writing_the_eda_report_is_one_line(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eda"
    out.mkdir()
    (out / "report.html").write_text("the previous report")
    fill_the_disk_for(monkeypatch, "report.html")
    code = main(["eda", str(dataset), "--out", str(out), "--workers", "1", "--samples", "1"])
    line = one_line_error(capsys, code, "eda")
    assert f"{out / 'report.html'}: cannot write the report (No space left on device: " in line
    assert (out / "report.html").read_text() == "the previous report"
    assert not list(out.glob(".report.html.*"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB filesystem (needs root and a mount-capable container; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_gives_clear_errors_and_keeps_previous_files(small_tmpfs, dataset, capsys):
    """On a real 1 MB filesystem: a model checkpoint too big to fit, then predict's submission after
    a filler file takes the space: each is one line naming its file, and the earlier files are intact."""
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    small = small_tmpfs / "small.pt"
    (small_tmpfs / "previous.csv").write_text("patientId,PredictionString\nold,\n")
    model = build_model(ModelConfig(encoder="resnet18", image_size=64))
    with pytest.raises(CheckpointError, match=r"small\.pt: cannot write the checkpoint .*No space left"):
        save_checkpoint(small, model)
    assert not small.exists() and [p.name for p in small_tmpfs.iterdir()] == ["previous.csv"]

    run = dataset.parent / "run_for_tmpfs"
    save_checkpoint(run / "best_model.pt", model, extra={"threshold": 0.0, "image_size": 64})
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):  # take all the space left
        fh.write(b"\0" * (1 << 20))
    code = main(["predict", str(run), str(dataset / "stage_2_train_images"), "--out",
                 str(small_tmpfs / "previous.csv"), "--threshold", "0"])
    line = one_line_error(capsys, code, "predict")
    assert "previous.csv: cannot write the submission (No space left on device: " in line
    assert (small_tmpfs / "previous.csv").read_text() == "patientId,PredictionString\nold,\n"


def test_a_training_checkpoint_on_a_really_full_disk_says_the_disk_is_full(small_tmpfs):
    """torch reports a short write in its own words ("unexpected pos ..."); the error still says the disk
    is full, where, and how much was written, and the previous checkpoint stays loadable."""
    from pneumodet.training import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    target = small_tmpfs / "last.ckpt"
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(8)}, target)
    with pytest.raises(CheckpointError) as caught:
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(1 << 20)}, target)  # 4 MB on a 1 MB disk
    message = str(caught.value)
    assert message.startswith(f"{target}: cannot write the checkpoint (No space left on device: "), message
    assert f"{small_tmpfs.resolve()} filled after" in message and "unexpected pos" not in message, message
    assert message.endswith("the previous one is kept"), message
    assert io_.load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in small_tmpfs.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    """A run ``evaluate``, ``predict`` and ``export`` accept (random 64-px model, threshold 0)."""
    from _helpers import make_run

    return make_run(tmp_path_factory.mktemp("eval_run"), small_patients(12), threshold=0.0)


#: case -> (command line, the file the disk fills up on, as a glob of its name)
FULL_DISK_CASES = {
    "export: the graph": (["export", "{run}", "--onnx", "{out}/model.onnx"], "model.onnx"),
    "export: its side file": (["export", "{run}", "--onnx", "{out}/model.onnx"], "model.onnx.json"),
    "predict --json": (["predict", "{run}", "{images}", "--out", "{out}/sub.csv", "--json", "{out}/pred.json",
                        "--threshold", "0"], "pred.json"),
    "predict --overlays": (["predict", "{run}", "{images}", "--out", "{out}/sub.csv", "--overlays", "{out}/overlays",
                            "--threshold", "0"], "*.png"),
    "evaluate: metrics.json": (["evaluate", "{run}", "--out", "{out}/eval"], "metrics.json"),
    "evaluate: a plot": (["evaluate", "{run}", "--out", "{out}/eval"], "confusion_matrix.png"),
}


@pytest.mark.parametrize("case", FULL_DISK_CASES)
def test_disk_full_while_exporting_predicting_or_evaluating_keeps_the_previous_files(
        eval_run, tmp_path, monkeypatch, capsys, case):
    """Each command runs once, then again on a disk that fills up while one of its files is written: one
    line naming that file, exit 2, and every file of the first run byte-identical, no half file beside."""
    argv, pattern = FULL_DISK_CASES[case]
    out = tmp_path / "out"
    args = [a.format(run=eval_run, out=out, images=eval_run.parent / "data" / "stage_2_train_images") for a in argv]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    before = snapshot(out)
    assert any(Path(name).match(pattern) for name in before), before.keys()
    fill_the_disk_for(monkeypatch, pattern)
    line = one_line_error(capsys, main(args), args[0])
    assert re.search(rf"{re.escape(str(out))}/\S*{pattern.replace('*', '[^/]*').replace('.', '[.]')}: "
                     r".*No space left on device", line), line
    monkeypatch.undo()
    assert snapshot(out) == before


def test_a_really_full_disk_keeps_previous_exports_predictions_and_metrics(small_tmpfs, eval_run, capsys):
    """On a real 1 MB filesystem: the ONNX graph (MBs) does not fit; then, with a filler taking the space
    left, predict's JSON and overlays and evaluate's metrics do not either. One line each; the previous
    files are as they were and no temporary file is left."""
    images = eval_run.parent / "data" / "stage_2_train_images"
    (small_tmpfs / "model.onnx").write_bytes(b"previous graph")
    (small_tmpfs / "model.onnx.json").write_text("{}")
    line = one_line_error(capsys, main(["export", str(eval_run), "--onnx", str(small_tmpfs / "model.onnx")]),
                          "export")
    assert "model.onnx: No space left on device" in line
    assert snapshot(small_tmpfs) == {"model.onnx": b"previous graph", "model.onnx.json": b"{}"}

    (small_tmpfs / "pred.json").write_text("previous")
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):  # take all the space left
        fh.write(b"\0" * (1 << 20))
    before = snapshot(small_tmpfs)
    for args in (["predict", str(eval_run), str(images), "--out", str(eval_run.parent / "sub.csv"), "--json",
                  str(small_tmpfs / "pred.json"), "--threshold", "0"],
                 ["predict", str(eval_run), str(images), "--out", str(eval_run.parent / "sub.csv"), "--overlays",
                  str(small_tmpfs / "overlays"), "--threshold", "0"],
                 ["evaluate", str(eval_run), "--out", str(small_tmpfs / "eval")]):
        line = one_line_error(capsys, main(args), args[0])
        assert "No space left on device" in line and str(small_tmpfs) in line
        assert snapshot(small_tmpfs) == before


def test_atomic_writes_keep_the_usual_file_permissions(tmp_path):
    """Written through a temporary file, a report or a submission still gets 0666 less the umask (a
    mkstemp file would stay 0600, unreadable to the user's group)."""
    from pneumodet.reports.html import HtmlReport
    from pneumodet.safeio import write_json

    old = os.umask(0o022)
    try:
        report = HtmlReport("r").write(tmp_path / "report.html")
        data = write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert oct(report.stat().st_mode & 0o777) == oct(data.stat().st_mode & 0o777) == oct(0o644)


# ============================================================================================ cache
def test_cache_build_killed_mid_way_resumes(dataset, tmp_path):
    """A build SIGKILLed after 7 of 12 images keeps every row its index had flushed; the next build
    reuses those, decodes only the rest, and every row equals a fresh decode."""
    out = tmp_path / "cache"
    killed = run_python(f"""
        import os, signal
        import pneumodet.data.cache as cache
        from pneumodet.data.cache import build_cache
        from pneumodet.data.rsna import load_rsna
        real, done = cache.read_dicom, []

        def dying_read(path, **kw):
            if len(done) == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(path)
            return real(path, **kw)

        cache.read_dicom = dying_read  # the name the cache decodes with (imported at its top)
        build_cache(load_rsna({str(dataset)!r}).records, {str(out)!r}, size=32, workers=1, progress=False,
                    flush_every=3)
    """)
    assert killed.returncode == -9, killed.stderr[-2000:]
    index = json.loads((out / INDEX_NAME).read_text())
    flushed = [e for e in index["entries"] if e["status"] == "ok"]
    assert len(flushed) == 6  # flushed after 3 and 6 images; the 7th was decoded but not yet recorded
    records = load_rsna(dataset).records
    report = build_cache(records, out, size=32, workers=1, progress=False)
    assert report.reused == 6 and report.cached + report.rebuilt == 6 and not report.failed
    cache = ImageCache.open(out)
    for record in records:
        np.testing.assert_array_equal(cache.image(record.patient_id), resize_area(read_dicom(record.image_path)[0], 32))


def test_damaged_cache_files_are_detected_and_rebuilt_through_the_command(dataset, tmp_path, capsys):
    """Bytes flipped inside a cached row and, separately, a garbage index: ``pneumodet cache`` says what
    it found and rebuilds; the result always matches a fresh decode."""
    out = tmp_path / "cache"
    args = ["cache", str(dataset), "--size", "32", "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    cache = ImageCache.open(out)
    row = cache.index("p005")
    del cache
    offset = np.load(out / ARRAY_NAME, mmap_mode="r").offset + row * 32 * 32
    with open(out / ARRAY_NAME, "r+b") as fh:
        fh.seek(offset + 100)
        fh.write(b"\xff\x00\xff")
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"note: 1 rows? failed (its|their) checksum.*\(p005\)", stdout), stdout
    assert "reused 11, rebuilt 1," in stdout

    (out / INDEX_NAME).write_text("{not json")
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "unreadable cache index" in stdout and "starting over" in stdout and "cached 12" in stdout
    cache = ImageCache.open(out)
    assert cache.verify() == []
    for record in load_rsna(dataset).records:
        np.testing.assert_array_equal(cache.image(record.patient_id), resize_area(read_dicom(record.image_path)[0], 32))
