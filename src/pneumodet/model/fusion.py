"""Inference-only rewrites of a trained network: batch norm folded into convolutions, compilation.

Neither changes what the network computes (up to rounding); both are applied to a copy used for
prediction, never to the model that is trained or saved.
"""

from __future__ import annotations

import copy
import logging
import shutil
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) in eval mode with its encoder's batch norms folded into
    the convolutions before them (an affine map per channel, free once merged into the weights).

    The encoder is traced with ``torch.fx``; a pair is folded only where the convolution's output
    feeds nothing but the batch norm. Encoders that cannot be traced (timm's PNASNet branches on
    tensor shapes) are returned unfolded, which is slower but identical in results.
    """
    folded = (model if inplace else copy.deepcopy(model)).eval()
    body = getattr(getattr(folded, "encoder", None), "body", None)
    if body is None or count_batchnorms(body) == 0:
        return folded
    try:
        fused = fuse(body, inplace=True)
    except Exception as err:  # noqa: BLE001 - torch.fx raises several kinds for untraceable code
        log.info("batch norm left unfolded: the encoder cannot be traced (%s: %s)", type(err).__name__, err)
        return folded
    fused.feature_info = body.feature_info  # what the rest of the model reads from the timm body
    folded.encoder.body = fused
    return folded


def has_cpp_compiler() -> bool:
    """Inductor on CPU writes and compiles C++; without a compiler ``torch.compile`` cannot help."""
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    return any(shutil.which(c) for c in candidates if c)


class FrozenCompiled(nn.Module):
    """``torch.compile`` with Inductor's freezing: the weights become constants, so batch norm is
    folded, convolution + activation fused and weights pre-packed for oneDNN. Shapes are static:
    one compilation per distinct batch shape (callers pad the last batch).

    Freezing is switched on around each call, when compilation actually happens, rather than for
    the whole process: ``torch.compile(options={"freezing": True})`` alone does not reach the
    weight pre-packing (measured: 1.03x eager instead of 1.37x, docs/BENCHMARKS.md).

    Each instance compiles a code object of its own (:func:`_own_entry`). Dynamo keeps what it compiles on
    the code object of the frame it compiles, and freezing guards on the identity of the weights, so every
    model instance (each ``predict`` call, each ensemble member) needs a compilation of its own: on the
    shared ``forward`` of the model class they were counted as recompilations of one function, and from
    the ninth (``torch._dynamo.config.recompile_limit``) the network silently ran eager; and each compiled
    graph, which holds the weights, stayed in that shared cache after its model was gone. A code object
    of its own keeps one instance's compilations apart from the others', and they are dropped with the
    instance.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        entry = _own_entry(model)
        self.compiled = torch.compile(entry, dynamic=False)
        # the cache entries hold the weights, which keeps their guards (and so the entries) alive for ever:
        # drop them explicitly when this instance goes
        weakref.finalize(self, _forget_compilations, entry.__code__).atexit = False  # the process frees all then

    def forward(self, *args, **kwargs):
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def _own_entry(model: nn.Module) -> Callable[..., Any]:
    """A function calling ``model`` whose code object is its own (a copy), not shared with any other."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)


def _forget_compilations(code: types.CodeType) -> None:
    """Drop Dynamo's compilations of ``code`` (a :func:`_own_entry`'s: nobody else's)."""
    from torch._dynamo.eval_frame import remove_from_cache

    remove_from_cache(code)


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``model`` compiled for inference with frozen weights (see :class:`FrozenCompiled`)."""
    return FrozenCompiled(model)


#: Below this many images a compilation (seconds per batch shape) costs more than it saves.
COMPILE_MIN_IMAGES = 500


def compile_pays_off(num_images: int, device: torch.device | str) -> bool:
    """Whether ``compile=None`` ("auto") compiles: a large enough job on the CPU, with a C++ compiler.

    Not on a GPU: eager inference there already runs ~1200 images/s at batch 16 (docs/BENCHMARKS.md,
    H200), so a compilation stall of tens of seconds per batch shape would outlast most jobs; ask for
    ``compile=True`` explicitly there.
    """
    if num_images < COMPILE_MIN_IMAGES:
        return False
    return torch.device(device).type == "cpu" and has_cpp_compiler()
