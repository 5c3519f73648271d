"""Compiled prediction, over and over in one process (the HTTP server, a notebook, an ensemble's members).

Every new model instance needs its own compilation (Inductor's freezing guards on the weights' identity).
They used to share the model class's ``forward`` code object, so Dynamo counted them as recompilations of
one function: from the ninth (``recompile_limit``, 8) the network silently ran eager while ``compiled``
still said true, and each compiled graph kept its model's weights alive in that shared cache.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from pneumodet.inference.engine import make_predictor
from pneumodet.inference.options import PredictOptions
from pneumodet.model import ModelConfig, build_model
from pneumodet.model.fusion import has_cpp_compiler

SIZE = 64
#: The smallest network the model builds: compiling it takes seconds.
TINY = ModelConfig(encoder="resnet10t", image_size=SIZE, fpn_channels=16, head_convs=0)


@pytest.mark.skipif(not has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")
def test_each_new_predictor_in_one_process_runs_compiled_once_and_frees_its_weights() -> None:
    # 3 predictors with the limit at 2 are what 9 were with the default 8 (each compilation takes seconds).
    # torch's own patch: pytest's monkeypatch would delete the setting on undo (Dynamo's config module reads
    # as a missing attribute what is not in its __dict__), breaking every later compilation in the process.
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2):
        _three_predictors_in_one_process()
    assert torch._dynamo.config.recompile_limit == limit  # restored for the tests after this one


def _three_predictors_in_one_process() -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    options = PredictOptions(precision="fp32", compile=True)
    images = torch.rand(2, 1, SIZE, SIZE)
    weights = []
    for _ in range(3):  # as predict() does per call: a freshly loaded model, a new predictor
        torch.manual_seed(0)
        model = build_model(TINY).eval()
        weights.append(weakref.ref(next(model.parameters())))
        predictor = make_predictor([model], SIZE, options, num_images=2)
        predictor(images)
        predictor(images)  # the same batch shape again: no new compilation
        assert predictor.compiled
        del model, predictor
    gc.collect()
    assert not counters["unimplemented"], dict(counters["unimplemented"])  # no "recompile limit" fallback to eager
    assert counters["frames"]["ok"] == counters["stats"]["unique_graphs"] == 3  # one compilation per predictor
    assert not any(ref() is not None for ref in weights)  # a predictor's compilation goes with it
