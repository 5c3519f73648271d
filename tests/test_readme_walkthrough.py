"""The README's walkthrough ("A typical run on the real data") runs as written on the real sample.

The block's first line sets the variables for the Kaggle download; its second, commented out, sets them for a
small sample in the same layout (``sample/``). This test takes the block from README.md, builds ``sample/``
from the real sample (16 DICOMs and the full labels, linked, never copied or written to), sets the second
line's values, and runs every ``pneumodet`` line through the command line's ``main`` exactly as written
(the shell's ``"$VAR"`` expansion and ``#`` comments are the only processing), each in turn; each must exit 0
and leave what the README says it writes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_ASSIGNMENT = re.compile(r"\b([A-Z_]+)=(\S+)")


def walkthrough_block() -> list[str]:
    """The lines of the first code block after "A typical run on the real data" in README.md."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("A typical run on the real data")
    match = re.search(r"^```\n(.*?)^```", text[start:], re.S | re.M)
    assert match, "the walkthrough's code block is missing"
    return match.group(1).splitlines()


def variables(line: str) -> dict[str, str]:
    """The ``NAME=value`` assignments of a line (commented out or not)."""
    return dict(_ASSIGNMENT.findall(line))


def test_the_walkthrough_defines_the_same_variables_for_the_download_and_the_sample():
    lines = walkthrough_block()
    full, sample = variables(lines[0]), variables(lines[1])
    assert lines[1].startswith("#") and full.keys() == sample.keys() and full
    assert full["DATA"] == "rsna" and sample["DATA"] == "sample"
    used = set(re.findall(r"\$\{?([A-Z_]+)", "\n".join(lines[2:])))
    assert used <= full.keys(), f"variables used but not set: {used - full.keys()}"
    assert all(line.startswith("pneumodet ") for line in lines[2:])


def test_the_walkthrough_runs_as_written_on_the_real_sample(real_sample, tmp_path, monkeypatch, capsys):
    from pneumodet.cli import main
    from pneumodet.evaluation import METRICS_FILE
    from pneumodet.rundir import RunDir
    from pneumodet.submission import read_submission

    lines = walkthrough_block()
    values = variables(lines[1])
    sample = tmp_path / values["DATA"]  # the sample's files linked into a folder of this test's own
    sample.mkdir()
    for item in sorted(real_sample.iterdir()):
        (sample / item.name).symlink_to(item)
    shared_before = sorted(p.name for p in real_sample.iterdir())
    monkeypatch.chdir(tmp_path)
    for name, value in values.items():
        monkeypatch.setenv(name, value)

    outputs = {
        "eda": lambda: Path("reports/eda/report.html").is_file(),
        "split": lambda: Path("splits/main/split.json").is_file(),
        "cache": lambda: (sample / f"cache_{values['SIZE']}").is_dir(),
        "train": lambda: RunDir(Path("runs/main")).best_model.is_file(),
        "evaluate": lambda: (RunDir(Path("runs/main")).eval_dir("test") / METRICS_FILE).is_file(),
        "predict": lambda: Path("submission.csv").is_file() and Path("predictions.json").is_file(),
    }
    ran = []
    for line in lines[2:]:
        argv = shlex.split(os.path.expandvars(line), comments=True)
        assert argv[0] == "pneumodet"
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"{line}\n-> exit {code}\n{out[-2000:]}\n{err[-2000:]}"
        assert outputs[argv[1]](), f"{line}: its output is missing"
        ran.append(argv[1])
    assert ran == list(outputs)

    # what the README says of the last two steps' files
    assert "runs/main/eval_test/metrics.json" in (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((RunDir(Path("runs/main")).eval_dir("test") / METRICS_FILE).read_text())
    assert metrics["split"] == "test" and metrics["images"] > 0
    rows = read_submission(Path("submission.csv"))
    assert len(rows) == 16  # one row per patient: the sample's 16 images
    predicted = json.loads(Path("predictions.json").read_text())
    assert len(predicted["images"]) == 16 and predicted["tta"] == "hflip"
    assert set(predicted["postprocess"]) == {"nms_iou", "max_detections", "min_score"}
    assert sorted(p.name for p in real_sample.iterdir()) == shared_before  # nothing written beside the sample
