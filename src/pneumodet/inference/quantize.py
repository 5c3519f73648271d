"""int8 post-training quantisation of the network, for CPU deployment without a GPU: two routes, measured
against the compiled bf16 path by ``benchmarks/bench_int8.py``.

* **ONNX Runtime static quantisation** (:func:`quantize_onnx`): the network graph of
  :func:`~pneumodet.inference.export.export_onnx`, pre-processed (shape inference, graph optimisation),
  then ``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per output channel, uint8
  activations whose ranges are calibrated on training images. :class:`OrtNetwork` runs it.
* **PyTorch 2 export quantisation** (:func:`pt2e_int8_network`): ``torch.export``, then the x86 Inductor
  quantizer (int8 static, per-channel weights) through ``prepare_pt2e`` / calibration / ``convert_pt2e``,
  then Inductor with frozen weights (:func:`~pneumodet.model.fusion.compile_for_inference`) lowers the
  quantised patterns to oneDNN int8 kernels. torch 2.14 no longer ships ``torch.ao.quantization.
  quantize_pt2e``: the route lives in ``torchao`` (``torchao.quantization.pt2e``), an optional package.

Both give a network that returns :class:`~pneumodet.model.HeadOutputs`, so it drops into a
:class:`~pneumodet.inference.engine.Predictor` as its ``network`` (:func:`int8_predictor`): the decoding,
NMS, TTA, gating and box mapping stay the model's own, and only the network's numbers change.

Neither route is ``predict``'s default: int8 replaces bf16 only where it is measured both faster (goal 1.5x
the compiled bf16 path) and as accurate (test mAP within 0.01); see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumodet.data.preprocess import to_unit_range
from pneumodet.errors import ConfigError, PneumodetError
from pneumodet.inference.engine import Predictor
from pneumodet.inference.export import OnnxNetwork, export_onnx, onnx_side_file
from pneumodet.model import HeadOutputs
from pneumodet.model.fusion import compile_for_inference
from pneumodet.safeio import atomic_path, write_json

#: The int8 routes :func:`int8_predictor` knows.
INT8_ROUTES = ("onnxruntime", "pt2e")
#: Calibration methods of ONNX Runtime's static quantisation (``onnxruntime.quantization.CalibrationMethod``).
ORT_CALIBRATION = ("minmax", "entropy", "percentile")


class QuantizationUnavailable(PneumodetError):
    """An int8 route this installation cannot run (a package missing), with what to install."""


def calibration_images(cache: Any, patient_ids: Sequence[str], count: int, *, seed: int = 0) -> torch.Tensor:
    """``count`` images (float ``[N, 1, S, S]`` in ``[0, 1]``) of ``patient_ids`` from an image cache
    (:class:`~pneumodet.data.cache.ImageCache`), a seeded random choice: the training images a model saw,
    prepared exactly as for prediction (the cache is :func:`~pneumodet.data.preprocess.prepare_image`'s)."""
    usable = [pid for pid in patient_ids if pid in cache]
    if not usable:
        raise ConfigError("no calibration image: none of the patients is in the image cache")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(usable), size=min(count, len(usable)), replace=False).tolist())
    pixels = np.stack([np.asarray(cache.image(usable[i])) for i in chosen])[:, None]
    return to_unit_range(torch.from_numpy(pixels))


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader``: the calibration images in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self._batches: Iterator[torch.Tensor] = iter(images.split(batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": np.ascontiguousarray(batch.numpy(), dtype=np.float32)}


def quantize_onnx(model_source: Path | str, out_path: Path | str, calibration: torch.Tensor, *,
                  batch_size: int = 8, method: str = "minmax", per_channel: bool = True) -> Path:
    """The network as a statically quantised int8 ONNX graph at ``out_path``, with its side file
    (:func:`~pneumodet.inference.export.onnx_side_file`, plus ``"quantization"``); returns the path.

    ``calibration``: float ``[N, 1, S, S]`` images (:func:`calibration_images`) whose activation ranges
    (``method``: one of :data:`ORT_CALIBRATION`) fix the int8 scales. Written atomically.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError as exc:
        raise QuantizationUnavailable("ONNX Runtime quantisation needs onnxruntime (pip install onnxruntime)") from exc
    if method not in ORT_CALIBRATION:
        raise ConfigError(f"unknown calibration method {method!r}; choose {', '.join(ORT_CALIBRATION)}")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="pneumodet-int8-") as tmp:
        exported = export_onnx(model_source, Path(tmp) / "network.onnx")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(exported.path), str(prepared))  # shapes known, BN folded: better ranges
        side = json.loads(exported.side_file.read_text(encoding="utf-8"))
        with atomic_path(out_path) as tmp_out:
            quantize_static(str(prepared), str(tmp_out), _Calibration(calibration, batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[method])
    side["quantization"] = {"route": "onnxruntime static", "format": "QDQ", "weights": "int8 per channel"
                            if per_channel else "int8 per tensor", "activations": "uint8",
                            "calibration": method, "calibration_images": len(calibration)}
    write_json(onnx_side_file(out_path), side, indent=1)
    return out_path


class OrtNetwork(nn.Module):
    """An ONNX network graph (:func:`export_onnx`'s default kind, fp32 or int8) run by ONNX Runtime on the
    CPU: images float ``[B, 1, S, S]`` -> :class:`HeadOutputs`, as the model's own ``forward``."""

    def __init__(self, onnx_path: Path | str, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        side = json.loads(onnx_side_file(onnx_path).read_text(encoding="utf-8"))
        if side.get("graph") != "network":
            raise ConfigError(f"{onnx_path}: a graph with post-processing; OrtNetwork runs the network graph")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.output_names = list(side["outputs"])
        self.anchors_per_level = tuple(side["anchors_per_level"])
        self.image_size = int(side["image_size"])

    def forward(self, images: torch.Tensor) -> HeadOutputs:
        feed = {"images": np.ascontiguousarray(images.float().cpu().numpy())}
        cls_logits, box_deltas, global_logits, anchors = (torch.from_numpy(o) for o in
                                                          self.session.run(self.output_names, feed))
        return HeadOutputs(cls_logits, box_deltas, global_logits, anchors, self.anchors_per_level,
                           (self.image_size, self.image_size))


class _TensorHeads(nn.Module):
    """A network of tensor outputs (:class:`OnnxNetwork`'s, as ``torch.export`` needs) turned back into
    :class:`HeadOutputs`."""

    def __init__(self, network: nn.Module, anchors_per_level: tuple[int, ...], image_size: int) -> None:
        super().__init__()
        self.network, self.anchors_per_level, self.image_size = network, anchors_per_level, image_size

    def forward(self, images: torch.Tensor) -> HeadOutputs:
        cls_logits, box_deltas, global_logits, anchors = self.network(images)
        return HeadOutputs(cls_logits, box_deltas, global_logits, anchors, self.anchors_per_level,
                           (self.image_size, self.image_size))


def pt2e_int8_network(model: nn.Module, image_size: int, calibration: torch.Tensor, *,
                      batch_size: int = 8) -> nn.Module:
    """``model``'s network quantised by PyTorch 2 export quantisation with the x86 Inductor quantizer, then
    compiled with frozen weights; its batch shape is ``batch_size`` (a :class:`Predictor` pads shorter
    batches). Compilation happens at the first call.

    Raises:
        QuantizationUnavailable: ``torchao`` is not installed (torch 2.14 ships the route no more).
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as exc:
        raise QuantizationUnavailable(
            "PyTorch 2 export quantisation needs torchao (pip install torchao): torch "
            f"{torch.__version__.split('+')[0]} no longer ships torch.ao.quantization.quantize_pt2e") from exc
    network = OnnxNetwork(model.float().eval(), image_size).eval()
    example = calibration[:batch_size].contiguous(memory_format=torch.channels_last)
    if len(example) < batch_size:
        raise ConfigError(f"at least {batch_size} calibration images are needed, got {len(calibration)}")
    exported = torch.export.export(network, (example,)).module()
    _one_partition_per_call(exported)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration.split(batch_size):
            if len(batch) == batch_size:  # the exported graph's batch shape is static
                prepared(batch.contiguous(memory_format=torch.channels_last))
    converted = convert_pt2e(prepared)
    return _TensorHeads(compile_for_inference(converted), network.anchors_per_level, image_size)


def _one_partition_per_call(graph_module: torch.fx.GraphModule) -> None:
    """Give each call of a convolution or ReLU module its own source partition.

    The quantizer finds conv + ReLU pairs by source module (the innermost entry of a node's
    ``nn_module_stack``); RetinaNet's heads run the same modules on every pyramid level, so one module's
    partition has one output per level and the x86 quantizer refuses it ("Input partition has more than
    one output node"). Each such node is one aten call, so naming its module per node changes nothing else.
    """
    ops = {torch.ops.aten.conv2d.default, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.target in ops and stack:
            key, (fqn, module_type) = list(stack.items())[-1]
            node.meta["nn_module_stack"] = {**stack, key: (f"{fqn}.{node.name}", module_type)}


def int8_predictor(model: nn.Module, image_size: int, network: nn.Module, **options: Any) -> Predictor:
    """A CPU :class:`Predictor` of ``model`` (fp32, its post-processing) whose network is the int8
    ``network`` (:class:`OrtNetwork` of :func:`quantize_onnx`'s graph, or :func:`pt2e_int8_network`);
    ``options``: the Predictor's (TTA, gating, post-processing values)."""
    predictor = Predictor(model, image_size, device="cpu", precision="fp32", compile=False, **options)
    predictor.network = network  # Predictor._forward runs it (padding a short batch) and decodes as usual
    return predictor
