"""What the machine computes natively; light to import (no Lightning), shared by training and prediction."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 autocast is fast on ``device_type`` ("cpu" or "cuda"): a GPU with bf16 support, or a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    with contextlib.suppress(AttributeError):  # torch's own probe, where this torch has it
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim``).

    A long stream of per-image buffers under glibc's mmap threshold fragments the heap: freed memory
    stays mapped and the resident size creeps up with the number of images (docs/BENCHMARKS.md,
    streaming prediction). Calling this every few batches keeps it flat. Returns whether memory was
    released; a no-op (False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
