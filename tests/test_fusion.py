"""Inference rewrites: batch norm folding, compilation choice, compiled prediction with padding and fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import assert_same_detections
from pneumodet.model import ModelConfig, build_model
from pneumodet.model.fusion import (
    COMPILE_MIN_IMAGES,
    compile_pays_off,
    count_batchnorms,
    fold_batchnorm,
)

SIZE = 128


def _with_trained_looking_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init batch norm is the identity (mean 0, var 1, weight 1, bias 0), which would make
    folding trivially right; give every batch norm statistics and affine terms far from that."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    with torch.no_grad():  # scores spread around 0.5, so detections survive the score threshold
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    return _with_trained_looking_batchnorm(model)


def test_folding_removes_every_encoder_batchnorm_and_keeps_the_outputs(resnet18_model):
    images = torch.rand(2, 1, SIZE, SIZE)
    before = count_batchnorms(resnet18_model.encoder)
    folded = fold_batchnorm(resnet18_model)
    assert before == 20 and count_batchnorms(folded.encoder) == 0
    assert count_batchnorms(resnet18_model.encoder) == before  # the original is untouched
    with torch.no_grad():
        want, got = resnet18_model(images), folded(images)
    for name in ("cls_logits", "box_deltas", "global_logits"):
        a, b = getattr(want, name), getattr(got, name)
        assert a.abs().max() > 0.1  # a non-trivial output, so closeness means something
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    dets_a, dets_b = resnet18_model.detect(want, score_thresh=0.0), folded.detect(got, score_thresh=0.0)
    # as sets: boxes whose scores agree to 6 digits may swap places, or sides of the top-5 cut
    assert_same_detections(dets_b[0].boxes[:5], dets_b[0].scores[:5], dets_a[0].boxes[:5], dets_a[0].scores[:5],
                           box_atol=1e-3, score_atol=1e-4)


def test_folding_inplace_returns_the_same_object_with_a_folded_encoder():
    model = _with_trained_looking_batchnorm(build_model(ModelConfig(encoder="resnet18", image_size=SIZE)))
    assert fold_batchnorm(model, inplace=True) is model
    assert count_batchnorms(model.encoder) == 0
    assert model.encoder.body.feature_info.channels() == list(model.encoder.channels)


class _ShapeBranchingBody(nn.Module):
    """Like timm's PNASNet: control flow on tensor shapes, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = x[..., ::2, ::2]
        return self.bn(self.conv(x))


def test_untraceable_encoder_is_left_unfolded_with_identical_results():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.body = _with_trained_looking_batchnorm(_ShapeBranchingBody())
    folded = fold_batchnorm(model)
    assert count_batchnorms(folded) == 1
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded.encoder.body(x), model.encoder.body(x), rtol=0, atol=0)


def test_compile_is_chosen_only_for_large_jobs_with_a_compiler(monkeypatch):
    import pneumodet.model.fusion as fusion

    assert not compile_pays_off(COMPILE_MIN_IMAGES - 1, "cpu")
    monkeypatch.setattr(fusion, "has_cpp_compiler", lambda: True)
    assert compile_pays_off(COMPILE_MIN_IMAGES, "cpu")
    monkeypatch.setattr(fusion, "has_cpp_compiler", lambda: False)
    assert not compile_pays_off(10 * COMPILE_MIN_IMAGES, "cpu")
    monkeypatch.setattr(fusion, "has_cpp_compiler", lambda: True)
    assert not compile_pays_off(10 * COMPILE_MIN_IMAGES, "cuda")  # eager is fast there; explicit only


def test_has_cpp_compiler_follows_the_path(monkeypatch, tmp_path):
    from pneumodet.model.fusion import has_cpp_compiler

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on the path
    assert not has_cpp_compiler()


def test_predictor_with_folding_matches_the_unfolded_model(resnet18_model):
    import copy

    from pneumodet.inference import Predictor

    images = torch.rand(3, 1, SIZE, SIZE)
    plain = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32", fold_batchnorm=False)
    folded = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32")
    assert count_batchnorms(plain.model.encoder) == 20 and count_batchnorms(folded.model.encoder) == 0
    for a, b in zip(plain(images), folded(images), strict=True):
        torch.testing.assert_close(b.class_probs, a.class_probs, rtol=0, atol=1e-5)
        n = min(len(a.scores), len(b.scores), 10)
        assert n > 0
        torch.testing.assert_close(b.scores[:n], a.scores[:n], rtol=0, atol=1e-4)


def test_failed_compilation_falls_back_to_eager_with_a_warning(resnet18_model, monkeypatch):
    import copy

    import pneumodet.model.fusion as fusion
    from pneumodet.inference import Predictor

    def broken(model):
        def network(images):
            raise RuntimeError("no C++ compiler")
        return network

    monkeypatch.setattr(fusion, "compile_for_inference", broken)
    images = torch.rand(2, 1, SIZE, SIZE)
    eager = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32")(images)
    predictor = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32", compile=True)
    assert predictor.compiled
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        out = predictor(images)
    assert not predictor.compiled
    for a, b in zip(eager, out, strict=True):
        np.testing.assert_allclose(b.class_probs, a.class_probs, atol=1e-6)
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)


def test_compiled_predictor_pads_a_short_batch_to_the_compiled_shape(resnet18_model, monkeypatch):
    import copy

    import pneumodet.model.fusion as fusion
    from pneumodet.inference import Predictor

    seen = []

    def recording(model):
        def network(images):
            seen.append(images.shape[0])
            return model(images)
        return network

    monkeypatch.setattr(fusion, "compile_for_inference", recording)
    predictor = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32", compile=True)
    eager = Predictor(copy.deepcopy(resnet18_model), SIZE, precision="fp32")
    full, short = torch.rand(4, 1, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE)
    predictor(full)
    out = predictor(short)
    assert seen == [4, 4]  # the 1-image batch ran as 4 (zero padded): no new shape to compile
    assert len(out) == 1
    want = eager(short)[0]
    np.testing.assert_allclose(out[0].class_probs, want.class_probs, atol=1e-5)
    np.testing.assert_allclose(out[0].scores[:10], want.scores[:10], atol=1e-4)


def test_predict_compiles_by_itself_only_from_the_size_threshold(tmp_path, monkeypatch):
    import pneumodet.model.fusion as fusion
    from pneumodet.inference import predict
    from pneumodet.model import save_checkpoint
    from test_inference import write_dicom

    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    save_checkpoint(tmp_path / "model.pt", model, extra={"threshold": 0.5, "image_size": SIZE})
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_dicom(tmp_path / "in" / f"p{i}.dcm", rng.integers(0, 256, (150, 140), dtype=np.uint8),
                    patient_id=f"p{i}")
    calls = []

    def recording(net):
        calls.append(net)
        return net  # "compiled" = the network itself: no compilation cost in this test

    monkeypatch.setattr(fusion, "compile_for_inference", recording)
    monkeypatch.setattr(fusion, "has_cpp_compiler", lambda: True)
    small = predict(tmp_path / "model.pt", [tmp_path / "in"], progress=False)
    assert not calls and len(small.predictions) == 3
    monkeypatch.setattr(fusion, "COMPILE_MIN_IMAGES", 3)
    predict(tmp_path / "model.pt", [tmp_path / "in"], progress=False)
    assert len(calls) == 1
    predict(tmp_path / "model.pt", [tmp_path / "in"], progress=False, compile=False)
    assert len(calls) == 1  # an explicit choice wins over the size rule
