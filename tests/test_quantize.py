"""int8 post-training quantisation (``pneumodet.inference.quantize``, measured by ``benchmarks/bench_int8.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pneumodet.inference.export import onnx_side_file

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, extra={"threshold": 0.5, "image_size": SIZE})
    return path


def test_onnxruntime_int8_network_stays_close_to_the_model_and_decodes_as_it(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from pneumodet.inference.engine import Predictor, load_for_inference
    from pneumodet.inference.quantize import OrtNetwork, int8_predictor, quantize_onnx

    torch.manual_seed(1)
    calibration = torch.rand(8, 1, SIZE, SIZE)
    graph = quantize_onnx(checkpoint, tmp_path / "int8.onnx", calibration, batch_size=4)
    side = json.loads(onnx_side_file(graph).read_text())
    assert side["quantization"]["weights"] == "int8 per channel" and side["quantization"]["calibration_images"] == 8
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left

    model, _ = load_for_inference(checkpoint)
    reference = Predictor(model, SIZE, precision="fp32")
    quantized = int8_predictor(load_for_inference(checkpoint)[0], SIZE, OrtNetwork(graph))
    images = calibration[:3]  # a batch shorter than the first: padded as for a compiled network
    quantized(calibration[:4])
    for ref, q in zip(reference(images), quantized(images), strict=True):
        torch.testing.assert_close(q.class_probs, ref.class_probs, atol=0.05, rtol=0)
        assert q.boxes.shape[1] == 4 and (q.scores[:-1] >= q.scores[1:]).all()  # decoded and sorted, as the model's


def test_pt2e_route_without_torchao_says_what_to_install(checkpoint: Path) -> None:
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed: the route is measured by benchmarks/bench_int8.py")
    from pneumodet.inference.engine import load_for_inference
    from pneumodet.inference.quantize import QuantizationUnavailable, pt2e_int8_network

    model, _ = load_for_inference(checkpoint)
    with pytest.raises(QuantizationUnavailable, match="needs torchao"):
        pt2e_int8_network(model, SIZE, torch.rand(8, 1, SIZE, SIZE), batch_size=4)
