"""Platform helpers: native bf16 detection and returning freed heap memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pneumodet.hardware import bf16_is_native

_FRAGMENTED_HEAP = """
import numpy as np
from pneumodet.hardware import release_free_heap

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

buffers = [np.ones(64 * 1024 // 8) for _ in range(4000)]  # 250 MiB in pieces under the mmap threshold
pinned = buffers[::50]  # a few survivors keep the freed pieces inside the heap, as a long prediction does
del buffers
before = rss_mib()
released = release_free_heap()
print(before, rss_mib(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap behaviour")
def test_release_free_heap_returns_fragmented_memory_to_the_system():
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    before, after, released = out.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 150  # most of the 245 MiB freed but still resident comes back


def test_bf16_is_not_native_on_devices_without_it():
    assert not bf16_is_native("mps")
    if not torch.cuda.is_available():
        assert not bf16_is_native("cuda")


def test_one_precision_resolver_for_training_and_prediction():
    """``hardware.resolve_precision`` speaks bf16/fp16/fp32 (Lightning's names accepted); the trainer gets
    Lightning's name back, prediction is offered int8 (a run's int8 graph), bf16 and fp32."""
    from pneumodet.config import TrainConfig
    from pneumodet.errors import ConfigError
    from pneumodet.hardware import TRAINING_PRECISIONS, lightning_precision, resolve_precision
    from pneumodet.training import resolve_precision as training_precision

    native = "bf16" if bf16_is_native("cpu") else "fp32"
    assert resolve_precision(None, "cpu") == resolve_precision("auto", torch.device("cpu")) == native
    for name, precision in {"bf16-mixed": "bf16", "16-mixed": "fp16", "32-true": "fp32", "32": "fp32"}.items():
        assert resolve_precision(name, "cpu", choices=TRAINING_PRECISIONS) == precision
        assert training_precision(TrainConfig(precision=name, accelerator="cpu")) == lightning_precision(precision)
    assert training_precision(TrainConfig(precision="auto", accelerator="cpu")) == lightning_precision(native)
    with pytest.raises(ConfigError, match="unknown precision 'fp16'; choose 'int8', 'bf16' or 'fp32'"):
        resolve_precision("fp16", "cpu")
