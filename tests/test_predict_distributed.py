"""``predict --devices N``: the files shared out across processes (gloo on the CPU), merged into the same outputs
as one process gives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import write_spread_run
from pneumodet.cli import main
from pneumodet.errors import ConfigError
from pneumodet.inference.distributed import Processes, check_processes
from test_inference import write_dicom

SIZE = 64


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 64-px resnet18 model whose scores spread around its threshold 0.5."""
    return write_spread_run(tmp_path_factory.mktemp("run"), SIZE, 0.5)


def _archive(folder: Path) -> None:
    """Nine files, in name order: 5 batches of 2, so process 0 of 2 takes batches 0, 2, 4 and process 1
    batches 1 and 3. Among them, each needing the whole list in file order: an unreadable file (batch 1), a
    patient id that cannot be a CSV field (batch 2), a PatientID unlike the file name (a warning, batch 1),
    a copy of the first file in process 1's batch 3 (a duplicate across processes), and a second image of
    patient b in process 0's last batch."""
    rng = np.random.default_rng(0)

    def image() -> np.ndarray:
        return rng.integers(0, 256, (96, 80), dtype=np.uint8)

    first = write_dicom(folder / "a.dcm", image(), patient_id="a")
    write_dicom(folder / "b.dcm", image(), patient_id="b")
    (folder / "c_broken.dcm").write_bytes(b"not a DICOM file" * 8)
    write_dicom(folder / "d.dcm", image(), patient_id="dd")  # unlike its file name: a warning
    write_dicom(folder / "e.dcm", image(), patient_id="x,y")
    write_dicom(folder / "f.dcm", image(), patient_id="f")
    shutil.copy(first, folder / "g_copy.dcm")
    write_dicom(folder / "h.dcm", image(), patient_id="h")
    write_dicom(folder / "i.dcm", image(), patient_id="b")  # b's second image (a warning too)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by its relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a second command line starting two processes: torch and Lightning imported twice
def test_two_processes_write_the_same_outputs_as_one(small_run: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    _archive(folder)

    def args(out: Path) -> list[str]:
        return ["predict", str(small_run), str(folder), "--out", str(out / "sub.csv"), "--json",
                str(out / "pred.json"), "--overlays", str(out / "overlays"), "--batch-size", "2",
                "--precision", "fp32", "--no-compile"]

    # one thread per process in both runs: the same summation order in every convolution, so the numbers
    # match to the last bit (with other thread counts they match up to rounding)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args(tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    one_summary = capsys.readouterr().out.split("wrote submission")[0]
    # the real command line: Lightning's launcher starts the second process by running it again
    two = subprocess.run([sys.executable, "-m", "pneumodet.cli", *args(tmp_path / "two"), "--devices", "2"],
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.split("wrote submission")[0] == one_summary  # one summary: the first process's
    assert "images predicted: 6 of 5 patient(s)" in one_summary
    assert "unreadable: 2; duplicate images: 1; symlinks not followed: 0; warnings: 2" in one_summary
    assert "patients with several images: 1" in one_summary and " 0 boxes" not in one_summary

    one, two_files = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sorted(one) == sorted(two_files) and len([n for n in one if n.startswith("overlays")]) == 6
    for name in one:  # the same rows in the same order, the same JSON and overlay pictures, byte for byte
        assert two_files[name] == one[name], name


def test_processes_share_whole_batches_round_robin() -> None:
    files = list(range(9))
    shares = [Processes(rank, 2).own_files(files, 2) for rank in range(2)]
    assert shares == [[0, 1, 4, 5, 8], [2, 3, 6, 7]]
    assert Processes(0, 2).rounds(9, 2) == 3 and Processes(0, 1).rounds(9, 2) == 5
    assert Processes(0, 4).own_files(files, 2) == [0, 1, 8] and Processes(6, 8).own_files(files, 2) == []
    # one process: every file, its batches as they come
    assert Processes().own_files(files, 4) == files
    assert list(Processes().in_file_order([[1, 2], [3]], 2)) == [[1, 2], [3]]


def test_bad_process_counts_are_one_line_errors(small_run: Path, tmp_path: Path, capsys) -> None:
    write_dicom(tmp_path / "a.dcm", np.zeros((8, 8), np.uint8), patient_id="a")
    for option in (["--devices", "0"], ["--num-nodes", "0"], ["--devices", "2000"]):
        assert main(["predict", str(small_run), str(tmp_path / "a.dcm"), "--out", str(tmp_path / "s.csv"),
                     *option]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "must be a whole number from 1 to 1024" in err
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(ConfigError, match="pass --device cuda"):
        check_processes(2, 1, torch.device("cuda", 1))
