import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = PROJECT_ROOT.parent / "shared" / "data" / "rsna-sample"


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real RSNA labels (all rows) and 16 real DICOMs, read in place, never copied."""
    if not (REAL_SAMPLE / "stage_2_train_labels.csv").exists():
        pytest.skip(f"real RSNA sample not found at {REAL_SAMPLE}")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the Kaggle layout (40 patients, 256 px, seed 0), written once per session.

    Treat it as read-only: every test of the session shares it.
    """
    from pneumodet.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth_dataset")
    make_synthetic_dataset(out, patients=40, size=256, seed=0)
    return out


@pytest.fixture(scope="session")
def real_eda_report(real_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``pneumodet eda`` of the real sample (seed 0), built once per session: (folder, summary)."""
    from pneumodet.reports.eda import build_eda_report

    out = tmp_path_factory.mktemp("eda_real")
    return out, build_eda_report(real_sample, out, seed=0)


@pytest.fixture(scope="module")
def split_dir(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patient split of :func:`synth_dataset` (val 0.2, test 0.2, seed 3), once per test module (a module
    may define its own ``split_dir`` instead)."""
    from pneumodet.data.rsna import load_rsna
    from pneumodet.data.split import split_patients, write_split

    out = tmp_path_factory.mktemp("split")
    write_split(split_patients(load_rsna(synth_dataset).records, val=0.2, test=0.2, seed=3), out,
                source=str(synth_dataset))
    return out
