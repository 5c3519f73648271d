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
