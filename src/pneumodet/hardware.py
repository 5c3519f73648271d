"""What the machine computes natively and in which precision; light to import (no torch until a function
asks the machine), shared by training, prediction and the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pneumodet.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The precisions a network computes in: bf16 or fp16 autocast, plain fp32, or (prediction on the CPU only) a
#: run's int8 graph, made by ``pneumodet quantize`` (:mod:`pneumodet.inference.quantize`).
Precision = Literal["int8", "bf16", "fp16", "fp32"]
#: What prediction offers (it autocasts to bf16 only). int8 is never the machine's choice alone: whether a
#: run holds a current int8 graph decides (``--precision auto``, :func:`pneumodet.inference.engine.make_predictor`).
PREDICTION_PRECISIONS: tuple[Precision, ...] = ("int8", "bf16", "fp32")
#: Every precision, for training.
TRAINING_PRECISIONS: tuple[Precision, ...] = ("bf16", "fp16", "fp32")
#: Lightning's name of each precision (what a training config holds and ``L.Trainer`` takes).
_LIGHTNING_NAMES: dict[Precision, str] = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
#: Names that mean a precision: Lightning's, and its shorthand "32".
_ALIASES: dict[str, Precision] = {**{name: p for p, name in _LIGHTNING_NAMES.items()}, "32": "fp32"}


def parse_precision(requested: str | None, choices: Sequence[Precision] = PREDICTION_PRECISIONS) -> Precision | None:
    """``requested`` in the one vocabulary: ``None`` for ``None`` or ``"auto"`` (the machine decides),
    else one of ``choices``, given by its own name or by Lightning's (``"bf16-mixed"``, ``"16-mixed"``,
    ``"32-true"``, ``"32"``).

    Raises:
        ConfigError: a precision not among ``choices``.
    """
    if requested is None or requested == "auto":
        return None
    precision = _ALIASES.get(requested, requested)
    if precision not in choices:
        *first, last = (repr(c) for c in choices)
        raise ConfigError(f"unknown precision {requested!r}; choose " + (f"{', '.join(first)} or " if first else "")
                          + last)
    return precision  # type: ignore[return-value]


def resolve_precision(requested: str | None, device: torch.device | str,
                      *, choices: Sequence[Precision] = PREDICTION_PRECISIONS) -> Precision:
    """The one precision resolver of training and prediction: :func:`parse_precision`, and for ``None``
    or ``"auto"`` ``"bf16"`` where ``device`` (a torch device, or its type "cpu" or "cuda") computes it
    natively (:func:`bf16_is_native`), else ``"fp32"``.

    Raises:
        ConfigError: a precision not among ``choices``.
    """
    precision = parse_precision(requested, choices)
    if precision is not None:
        return precision
    device_type = device if isinstance(device, str) else device.type
    return "bf16" if bf16_is_native(device_type.split(":")[0]) else "fp32"


def lightning_precision(precision: Precision) -> str:
    """Lightning's name of ``precision`` (``"bf16"`` -> ``"bf16-mixed"``), for ``L.Trainer(precision=...)``."""
    return _LIGHTNING_NAMES[precision]


def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 autocast is fast on ``device_type`` ("cpu" or "cuda"): a GPU with bf16 support, or a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    import torch  # here, not at the top: the command line reads the precision names without loading torch

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
