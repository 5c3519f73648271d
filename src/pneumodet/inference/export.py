"""ONNX export of the network, and the decoding of its outputs in Python.

:func:`export_onnx` writes the network alone (no decoding, no NMS), with a dynamic batch axis:

* input ``images``: float32 ``[B, 1, S, S]`` in ``[0, 1]`` (the DICOM's pixels resized with area
  interpolation to ``S x S`` and divided by 255: :func:`pneumodet.data.preprocess.prepare_image`, as
  prediction and the training cache prepare them);
* outputs ``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits [B, C]`` and
  ``anchors [A, 4]`` (a constant: the anchors depend on ``S`` only).

Next to ``model.onnx`` a side file ``model.onnx.json`` records ``S``, the anchors per pyramid level,
the class names, the model configuration (score/NMS thresholds, top-k) and the run's validation
threshold. :func:`decode_onnx_outputs` turns the four outputs into boxes with the model's own
post-processing (:func:`pneumodet.model.retinanet.postprocess`); :func:`run_onnx` does both steps
with onnxruntime. Written out, for an implementation in another language, per image:

1. ``score = sigmoid(cls_logits)``; within each pyramid level (``anchors_per_level`` consecutive
   anchors) keep the ``topk_per_level`` best anchors.
2. Decode each kept anchor ``(x1, y1, x2, y2)`` with its deltas ``(dx, dy, dw, dh)``:
   ``aw = x2 - x1``, ``ah = y2 - y1``, ``cx = x1 + aw/2 + dx*aw``, ``cy = y1 + ah/2 + dy*ah``,
   ``w = aw * exp(min(dw, log(1000/16)))``, ``h = ah * exp(min(dh, log(1000/16)))``,
   box ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``, clipped to ``[0, S]``.
3. Keep boxes with ``score > score_thresh`` and positive width and height; non-maximum suppression
   at IoU ``nms_thresh``; keep the ``max_detections`` best.
4. Class probabilities: ``softmax(global_logits)`` in ``class_names`` order.
5. Boxes are in ``S x S`` input pixels: multiply x by ``W / S`` and y by ``H / S`` for an ``H x W``
   original image (:func:`pneumodet.boxes.boxes_to_original`); keep those with score at least the run's
   ``threshold``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumodet.data.records import CLASS_NAMES
from pneumodet.errors import ConfigError
from pneumodet.inference.engine import load_for_inference, model_image_size
from pneumodet.model import BoxCoder, Detections, HeadOutputs, ModelConfig
from pneumodet.model.retinanet import postprocess
from pneumodet.safeio import atomic_path, write_json
from pneumodet.textsafe import display_path

#: Output names of the exported graph, in order.
ONNX_OUTPUTS: tuple[str, ...] = ("cls_logits", "box_deltas", "global_logits", "anchors")
ONNX_FORMAT = "pneumodet-onnx-1"


class OnnxNetwork(nn.Module):
    """The network with plain tensor outputs, for export; the anchors (fixed by ``S``) are a constant."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        anchors, per_level = model.anchor_generator(image_size, image_size, torch.device("cpu"))
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.anchors_per_level = tuple(int(n) for n in per_level)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images ``[B, 1, S, S]`` -> cls_logits ``[B, A]``, box_deltas ``[B, A, 4]``, global_logits ``[B, C]``,
        anchors ``[A, 4]``."""
        out = self.model(images)
        return out.cls_logits, out.box_deltas, out.global_logits, self.anchors.clone()  # an op: the tracer needs one


@dataclass(frozen=True)
class OnnxExport:
    """Where :func:`export_onnx` wrote the graph and its side file, and the input side it fixed."""

    path: Path
    side_file: Path
    image_size: int
    num_anchors: int

    def summary(self) -> str:
        side = self.image_size
        return (f"wrote {display_path(self.path)} (input images [B, 1, {side}, {side}] in [0, 1], "
                f"{self.num_anchors} anchors) and {display_path(self.side_file)}")


def onnx_side_file(onnx_path: Path | str) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def export_onnx(model_source: Path | str, out_path: Path | str, *, image_size: int | None = None,
                opset: int = 17) -> OnnxExport:
    """Export the network (no decoding) to ONNX with a dynamic batch axis; see the module docstring.

    Args:
        model_source: a training run directory (its best model) or a checkpoint file.
        out_path: the ``.onnx`` file; the side file :func:`onnx_side_file` goes next to it.
        image_size: input side ``S`` (default: the size the model was trained at).
        opset: ONNX opset, one of :func:`onnx_opsets`.

    Both files are written to temporary files and renamed into place only when both are complete: a
    full disk or an interruption leaves the previous pair as it was.
    """
    if opset not in onnx_opsets():
        newest = onnx_opsets()[-1]
        raise ConfigError(f"ONNX opset {opset} is not supported: choose {MIN_ONNX_OPSET} to {newest} "
                          "(default 17)")
    model, extra = load_for_inference(model_source)
    size = int(image_size) if image_size is not None else model_image_size(model)
    if size < 2 ** max(model.config.pyramid_levels):
        raise ConfigError(f"image_size {size} is smaller than the coarsest pyramid stride "
                          f"{2 ** max(model.config.pyramid_levels)}")
    network = OnnxNetwork(model.float().eval(), size).eval()
    out_path = Path(out_path)
    side = {
        "format": ONNX_FORMAT,
        "image_size": size,
        "input": f"images: float32 [B, 1, {size}, {size}], grey pixels / 255 after area resize",
        "outputs": list(ONNX_OUTPUTS),
        "anchors_per_level": list(network.anchors_per_level),
        "class_names": list(CLASS_NAMES),
        "threshold": extra.get("threshold"),
        "model_config": model.config.to_dict(),
    }
    side_file = onnx_side_file(out_path)
    # the side file is renamed first, the graph last: both are complete before either replaces its old file
    with atomic_path(out_path) as graph_tmp:
        _export_graph(network, size, graph_tmp, opset)
        write_json(side_file, side, indent=1)
    return OnnxExport(out_path, side_file, size, int(network.anchors.shape[0]))


#: The oldest opset whose Resize matches PyTorch's nearest-neighbour upsampling (the FPN's); opsets 9 and
#: 10 export, but their Upsample may not give PyTorch's results.
MIN_ONNX_OPSET = 11


def onnx_opsets() -> range:
    """The opsets :func:`export_onnx` accepts: :data:`MIN_ONNX_OPSET` to the newest the TorchScript exporter
    supports (20 in torch 2.x; it writes newer numbers with a warning, unsupported)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest
    except ImportError:  # a private module: fall back to torch 2.x's value
        newest = 20
    return range(MIN_ONNX_OPSET, int(newest) + 1)


def _export_graph(network: OnnxNetwork, size: int, path: Path, opset: int) -> None:
    batch_axes = {name: {0: "batch"} for name in ("images", *ONNX_OUTPUTS[:3])}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which needs onnxscript.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        # The anchors are meant to be constants of the graph: S is fixed at export.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(network, (torch.rand(2, 1, size, size),), str(path), dynamo=False,
                              input_names=["images"], output_names=list(ONNX_OUTPUTS),
                              dynamic_axes=batch_axes, opset_version=opset, do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as err:  # an operator this opset cannot express
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"ONNX opset {opset} cannot express this network: {first[:300]}") from None


def _read_side_file(side: Path | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(side, dict):
        return side
    try:
        meta = json.loads(Path(side).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{side}: cannot read the ONNX side file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ConfigError(f"{side}: not a pneumodet ONNX side file (format {ONNX_FORMAT!r} expected)")
    return meta


def decode_onnx_outputs(
    outputs: Sequence[np.ndarray | torch.Tensor],
    side: Path | str | dict[str, Any],
    *,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_detections: int | None = None,
) -> list[Detections]:
    """Boxes from the four ONNX outputs, by the same decoding as :meth:`PneumoRetinaNet.detect`.

    Args:
        outputs: ``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits [B, C]``,
            ``anchors [A, 4]`` (numpy or torch), in :data:`ONNX_OUTPUTS` order.
        side: the side file written by :func:`export_onnx` (path or its parsed dict).
        score_thresh, nms_thresh, max_detections: override the model configuration's values.

    Returns:
        One :class:`~pneumodet.model.Detections` per image: boxes ``[N, 4]`` xyxy in ``S x S`` input
        pixels, scores ``[N]``, class probabilities ``[C]``.
    """
    meta = _read_side_file(side)
    config = ModelConfig.from_dict(meta["model_config"])
    if len(outputs) != len(ONNX_OUTPUTS):
        raise ConfigError(f"expected the {len(ONNX_OUTPUTS)} ONNX outputs {ONNX_OUTPUTS}, got {len(outputs)}")
    cls_logits, box_deltas, global_logits, anchors = (torch.as_tensor(np.asarray(o)) for o in outputs)
    size = int(meta["image_size"])
    head = HeadOutputs(cls_logits, box_deltas, global_logits, anchors.float(),
                       tuple(meta["anchors_per_level"]), (size, size))
    return postprocess(
        head, BoxCoder(),
        score_thresh=config.score_thresh if score_thresh is None else score_thresh,
        nms_thresh=config.nms_thresh if nms_thresh is None else nms_thresh,
        topk_per_level=config.topk_per_level,
        max_detections=config.max_detections if max_detections is None else max_detections,
    )


def run_onnx(onnx_path: Path | str, images: np.ndarray, **decode_options: Any) -> list[Detections]:
    """End to end with onnxruntime: ``images`` float32 ``[B, 1, S, S]`` in ``[0, 1]`` -> detections
    (see :func:`decode_onnx_outputs`)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("running an ONNX model needs onnxruntime (pip install onnxruntime)") from exc
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(ONNX_OUTPUTS), {"images": np.ascontiguousarray(images, dtype=np.float32)})
    return decode_onnx_outputs(outputs, onnx_side_file(onnx_path), **decode_options)
