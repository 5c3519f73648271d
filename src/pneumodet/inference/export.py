"""ONNX export of the network, with or without its post-processing, and the decoding of its outputs.

:func:`export_onnx` writes one of two graphs, both with a dynamic batch axis and the input ``images``,
float32 ``[B, 1, S, S]`` in ``[0, 1]`` (:func:`pneumodet.data.preprocess.prepare_image` of the image
:func:`pneumodet.data.dicom.read_dicom` decodes: OpenCV area resize, divided by 255):

* the **network** alone (default): ``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits
  [B, C]`` and the constant ``anchors [A, 4]`` (:data:`ONNX_OUTPUTS`); :func:`decode_onnx_outputs`
  turns them into boxes with the model's own post-processing
  (:func:`pneumodet.model.retinanet.postprocess`);
* the network **with its post-processing** (``postprocess=True``, ``export --with-postprocess``): per
  image the top ``topk_per_level`` anchors of each level, decoded, clipped, thresholded, non-maximum
  suppression (ONNX ``NonMaxSuppression``) and the ``max_detections`` best, as ``boxes [B, M, 4]``,
  ``scores [B, M]`` (by decreasing score, zero-padded), ``num_detections [B]`` and ``class_probs [B, C]``
  (:data:`ONNX_DETECTION_OUTPUTS`): no decoding code is needed.

Next to ``model.onnx`` a side file ``model.onnx.json`` records what a deployer needs: ``S``, the exact
preprocessing, the outputs, the anchors per pyramid level, the post-processing values, the class names
and the run's validation threshold. ``docs/ONNX.md`` writes every step out;
:mod:`pneumodet.deploy.onnx_reference` implements them with numpy and onnxruntime only (a file to copy).

Opsets 18 and newer are written by the dynamo exporter (``torch.onnx.export(..., dynamo=True)``: the same
numbers, under half the TorchScript exporter's nodes); opsets 11 to 17, for older runtimes, by the TorchScript
exporter, which the dynamo exporter cannot replace there (it keeps opset 18 when asked for less).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import ops as tv_ops

from pneumodet.data.records import CLASS_NAMES
from pneumodet.errors import ConfigError
from pneumodet.inference.engine import load_for_inference, model_image_size
from pneumodet.inference.options import check_postprocess_options
from pneumodet.launch import quiet_loggers
from pneumodet.model import BoxCoder, Detections, HeadOutputs, ModelConfig
from pneumodet.model.retinanet import postprocess
from pneumodet.safeio import atomic_path, write_json
from pneumodet.textsafe import display_path

#: Output names of the network graph, in order.
ONNX_OUTPUTS: tuple[str, ...] = ("cls_logits", "box_deltas", "global_logits", "anchors")
#: Output names of the graph exported with its post-processing (``postprocess=True``), in order.
ONNX_DETECTION_OUTPUTS: tuple[str, ...] = ("boxes", "scores", "num_detections", "class_probs")
#: The side file's format: 2 added the graph kind, its outputs, the preprocessing and the post-processing
#: values (a reader of format 1 would take a post-processed graph's outputs for the network's).
ONNX_FORMAT = "pneumodet-onnx-2"
#: Side files :func:`decode_onnx_outputs` reads (format 1: a network graph, values in its model_config).
READABLE_ONNX_FORMATS = ("pneumodet-onnx-1", ONNX_FORMAT)
#: Where the preprocessing and the decoding are written out for deployers.
ONNX_DOC = "docs/ONNX.md"

#: The oldest opset whose Resize matches PyTorch's nearest-neighbour upsampling (the FPN's); opsets 9 and
#: 10 export, but their Upsample may not give PyTorch's results.
MIN_ONNX_OPSET = 11
#: The oldest opset the dynamo exporter writes (it keeps 18 when asked for less); below it the TorchScript
#: exporter writes the network, and the post-processing cannot be exported.
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18


class OnnxNetwork(nn.Module):
    """The network with plain tensor outputs, for export; the anchors (fixed by ``S``) are a constant."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        anchors, per_level = model.anchor_generator(image_size, image_size, torch.device("cpu"))
        # not "anchors": the dynamo exporter names the constant after the buffer, and the output is "anchors"
        self.register_buffer("anchor_grid", anchors.clone(), persistent=False)
        self.anchors_per_level = tuple(int(n) for n in per_level)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images ``[B, 1, S, S]`` -> cls_logits ``[B, A]``, box_deltas ``[B, A, 4]``, global_logits ``[B, C]``,
        anchors ``[A, 4]``."""
        out = self.model(images)
        # clone: an output must be an op's result for the TorchScript tracer
        return out.cls_logits, out.box_deltas, out.global_logits, self.anchor_grid.clone()


@torch.library.custom_op("pneumodet::nms_per_image", mutates_args=())
def nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_per_image: int) -> torch.Tensor:
    """Non-maximum suppression within each image: boxes ``[B, K, 4]`` xyxy, scores ``[B, K]`` (a negative
    score is no candidate) -> bool ``[B, K]``, true for the (at most ``max_per_image``) boxes kept.

    torchvision's NMS (a box is dropped when it overlaps a kept, higher-scoring one by more than
    ``iou_threshold``); exported as ONNX ``NonMaxSuppression``, which computes the same per image.
    """
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for image in range(boxes.shape[0]):
        candidates = torch.nonzero(scores[image] >= 0).flatten()
        order = tv_ops.nms(boxes[image, candidates], scores[image, candidates], iou_threshold)
        kept[image, candidates[order[:max_per_image]]] = True
    return kept


@nms_per_image.register_fake
def _nms_per_image_shape(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                         max_per_image: int) -> torch.Tensor:
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _nms_per_image_onnx(boxes: Any, scores: Any, iou_threshold: float, max_per_image: int) -> Any:
    """:func:`nms_per_image` in ONNX: ``NonMaxSuppression`` (one class) gives (image, class, box) triples,
    scattered into a mask. A negative score fails its score threshold 0 (candidates score above 0)."""
    from onnx import TensorProto, helper
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, op.Constant(value_ints=[1])),
                                    op.Constant(value_ints=[max_per_image]),
                                    op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[0.0]))
    image_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [N, 2]
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    ones = op.ConstantOfShape(op.Shape(selected, end=1), value=one)
    mask = op.ScatterND(op.ConstantOfShape(op.Shape(scores)), image_and_box, ones)
    return op.Cast(mask, to=TensorProto.BOOL)


class OnnxDetector(nn.Module):
    """The network and its post-processing in one exportable graph with fixed-size outputs.

    The same steps as :func:`pneumodet.model.retinanet.postprocess` (sigmoid, top-k per level, decode,
    clip to the image, ``score > score_thresh`` and positive size, NMS, the ``max_detections`` best), with
    masks instead of dropped rows so that every shape but the batch is fixed; NMS runs per image.
    """

    def __init__(self, model: nn.Module, image_size: int, *, score_thresh: float, nms_thresh: float,
                 topk_per_level: int, max_detections: int) -> None:
        super().__init__()
        self.network = OnnxNetwork(model, image_size)
        self.image_size = image_size
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.topk = tuple(min(int(topk_per_level), n) for n in self.network.anchors_per_level)
        self.max_detections = min(int(max_detections), sum(self.topk))
        self.box_coder = BoxCoder()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images ``[B, 1, S, S]`` -> boxes ``[B, M, 4]`` xyxy in input pixels, scores ``[B, M]`` by decreasing
        score (rows from ``num_detections`` on are zero), num_detections ``[B]`` int64, class_probs ``[B, C]``."""
        cls_logits, box_deltas, global_logits, anchors = self.network(images)
        scores_all = torch.sigmoid(cls_logits.float())
        top_scores, top_index, start = [], [], 0
        for count, k in zip(self.network.anchors_per_level, self.topk, strict=True):
            s, i = scores_all[:, start:start + count].topk(k, dim=1)
            top_scores.append(s)
            top_index.append(i + start)
            start += count
        scores, index = torch.cat(top_scores, dim=1), torch.cat(top_index, dim=1)  # [B, K]
        deltas = torch.gather(box_deltas.float(), 1, index[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(deltas, anchors[index])
        # as postprocess; clamp(min=0, max=S) in one call trips the dynamo exporter
        boxes = torch.minimum(boxes.clamp(min=0), torch.full((4,), float(self.image_size)))
        valid = (scores > self.score_thresh) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        candidates = torch.where(valid, scores, torch.full_like(scores, -1.0))
        kept = nms_per_image(boxes, candidates, self.nms_thresh, self.max_detections)
        best, order = torch.where(kept, scores, torch.full_like(scores, -1.0)).topk(self.max_detections, dim=1)
        found = best >= 0
        out_boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4)) * found[..., None]
        out_scores = torch.where(found, best, torch.zeros_like(best))
        return out_boxes, out_scores, found.sum(dim=1), torch.softmax(global_logits.float(), dim=1)


@dataclass(frozen=True)
class OnnxExport:
    """Where :func:`export_onnx` wrote the graph and its side file, and what it holds."""

    path: Path
    side_file: Path
    image_size: int
    num_anchors: int
    postprocess: bool = False
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET

    def summary(self) -> str:
        side = self.image_size
        outputs = (f"boxes, scores, num_detections, class_probs (decoded in the graph, {self.num_anchors} anchors)"
                   if self.postprocess else f"the network's outputs for {self.num_anchors} anchors")
        return (f"wrote {display_path(self.path)} (input images [B, 1, {side}, {side}] in [0, 1]; {outputs}; "
                f"opset {self.opset}, {self.exporter} exporter) and {display_path(self.side_file)}; "
                f"preprocessing and decoding: {ONNX_DOC}")


def onnx_side_file(onnx_path: Path | str) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


#: The exact preprocessing, recorded in the side file (docs/ONNX.md explains each step).
PREPROCESSING: dict[str, str] = {
    "decode": "pydicom 3 pixel_array of the first frame; JPEG Baseline and Extended through its Pillow plugin "
              "first (libjpeg-turbo), other syntaxes through pydicom's default plugins",
    "grey": "uint8 [H, W], bright = dense: 8-bit grey as stored; otherwise modality LUT, then the first usable "
            "of VOI LUT, window (first centre/width), robust 0.5-99.5 percentile min-max, scaled to 0..255 "
            "and rounded; MONOCHROME1 inverted (255 - v); colour to grey with BT.601 weights",
    "resize": "cv2.resize(grey, (S, S), interpolation=cv2.INTER_AREA); none when already S x S",
    "scale": "float32(grey) / 255",
    "layout": "NCHW float32 [B, 1, S, S]",
}


def export_onnx(model_source: Path | str, out_path: Path | str, *, image_size: int | None = None,
                opset: int = DEFAULT_OPSET, postprocess: bool = False, min_score: float | None = None,
                nms_iou: float | None = None, max_detections: int | None = None) -> OnnxExport:
    """Export the network (default) or the network with its post-processing to ONNX, with a dynamic batch
    axis; see the module docstring.

    Args:
        model_source: a training run directory (its best model) or a checkpoint file.
        out_path: the ``.onnx`` file; the side file :func:`onnx_side_file` goes next to it.
        image_size: input side ``S`` (default: the size the model was trained at).
        opset: ONNX opset, one of :func:`onnx_opsets`; 18 and newer through the dynamo exporter.
        postprocess: put the decoding and NMS into the graph (:class:`OnnxDetector`; opset 18 or newer).
        min_score, nms_iou, max_detections: the post-processing values (as ``predict --min-score``,
            ``--nms-iou``, ``--max-det``; default the model's); recorded in the side file, and fixed in
            the graph with ``postprocess``.

    Both files are written to temporary files and renamed into place only when both are complete: a
    full disk or an interruption leaves the previous pair as it was.

    Raises:
        ConfigError: an opset outside :func:`onnx_opsets`, post-processing below opset 18, a bad
            post-processing value (all checked before the model is loaded), an ``image_size`` below the
            coarsest stride, or an operator the opset cannot express.
    """
    if opset not in onnx_opsets():
        newest = onnx_opsets()[-1]
        raise ConfigError(f"ONNX opset {opset} is not supported: choose {MIN_ONNX_OPSET} to {newest} "
                          f"(default {DEFAULT_OPSET})")
    if postprocess and opset < DYNAMO_MIN_OPSET:
        raise ConfigError(f"post-processing in the graph needs opset {DYNAMO_MIN_OPSET} or newer (the dynamo "
                          f"exporter); opset {opset} can hold the network alone")
    if opset >= DYNAMO_MIN_OPSET and importlib.util.find_spec("onnxscript") is None:
        raise ConfigError(f"ONNX opset {opset} is written by the dynamo exporter, which needs onnxscript (pip "
                          "install onnxscript); opsets 11 to 17 need only torch")
    check_postprocess_options(nms_iou=nms_iou, max_detections=max_detections, min_score=min_score)
    model, extra = load_for_inference(model_source)
    size = int(image_size) if image_size is not None else model_image_size(model)
    if size < 2 ** max(model.config.pyramid_levels):
        raise ConfigError(f"image_size {size} is smaller than the coarsest pyramid stride "
                          f"{2 ** max(model.config.pyramid_levels)}")
    config = model.config
    post = {
        "score_thresh": float(config.score_thresh if min_score is None else min_score),
        "nms_iou": float(config.nms_thresh if nms_iou is None else nms_iou),
        "topk_per_level": int(config.topk_per_level),
        "max_detections": int(config.max_detections if max_detections is None else max_detections),
        "box_scale_clamp": BoxCoder().scale_clamp,
        "in_graph": postprocess,
    }
    network: nn.Module
    if postprocess:
        network = OnnxDetector(model.float().eval(), size, score_thresh=post["score_thresh"],
                               nms_thresh=post["nms_iou"], topk_per_level=post["topk_per_level"],
                               max_detections=post["max_detections"]).eval()
        per_level = network.network.anchors_per_level
    else:
        network = OnnxNetwork(model.float().eval(), size).eval()
        per_level = network.anchors_per_level
    outputs = ONNX_DETECTION_OUTPUTS if postprocess else ONNX_OUTPUTS
    exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    out_path = Path(out_path)
    side = {
        "format": ONNX_FORMAT,
        "graph": "detections" if postprocess else "network",
        "docs": ONNX_DOC,
        "image_size": size,
        "input": f"images: float32 [B, 1, {size}, {size}], grey pixels / 255 after area resize",
        "preprocessing": PREPROCESSING,
        "outputs": list(outputs),
        "anchors_per_level": list(per_level),
        "class_names": list(CLASS_NAMES),
        "threshold": extra.get("threshold"),
        "postprocess": post,
        "exporter": exporter,
        "opset": opset,
        "model_config": config.to_dict(),
    }
    side_file = onnx_side_file(out_path)
    # the side file is renamed first, the graph last: both are complete before either replaces its old file
    with atomic_path(out_path) as graph_tmp:
        _export_graph(network, size, graph_tmp, opset, outputs)
        write_json(side_file, side, indent=1)
    return OnnxExport(out_path, side_file, size, sum(per_level), postprocess, exporter, opset)


def onnx_opsets() -> range:
    """The opsets :func:`export_onnx` accepts: :data:`MIN_ONNX_OPSET` to the newest the dynamo exporter's
    version converter knows (onnxscript's; 25 with onnxscript 0.7)."""
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET as newest
    except ImportError:  # a private module: fall back to the value of onnxscript 0.5 to 0.7
        newest = 23
    return range(MIN_ONNX_OPSET, int(newest) + 1)


def _export_graph(network: nn.Module, size: int, path: Path, opset: int, outputs: Sequence[str]) -> None:
    example = (torch.rand(2, 1, size, size),)
    # the library's progress lines and advice are not the user's business: kept out of the output
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers(_EXPORT_LOGGERS, logging.ERROR):
        warnings.simplefilter("ignore")
        try:
            if opset >= DYNAMO_MIN_OPSET:
                batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
                program = torch.onnx.export(
                    network, example, dynamo=True, input_names=["images"], output_names=list(outputs),
                    dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
                    custom_translation_table={torch.ops.pneumodet.nms_per_image.default: _nms_per_image_onnx})
                graph = program.model_proto.SerializeToString()
            else:
                buffer = io.BytesIO()
                torch.onnx.export(network, example, buffer, dynamo=False, input_names=["images"],
                                  output_names=list(outputs), opset_version=opset, do_constant_folding=True,
                                  dynamic_axes={name: {0: "batch"} for name in ("images", *outputs[:3])})
                graph = buffer.getvalue()
        except torch.onnx.errors.OnnxExporterError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"ONNX opset {opset} cannot express this network: {first[:300]}") from None
    with open(path, "wb") as fh:  # path is safeio's temporary file, renamed into place when complete
        fh.write(graph)


#: The largest batch the dynamo export declares (the graph takes any batch up to it).
_MAX_BATCH = 4096


#: The exporters' loggers (warnings and progress), silenced while exporting.
_EXPORT_LOGGERS = ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")


def _read_side_file(side: Path | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(side, dict):
        return side
    try:
        meta = json.loads(Path(side).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{side}: cannot read the ONNX side file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_ONNX_FORMATS:
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
        outputs: the graph's outputs in the side file's ``outputs`` order (numpy or torch): the network's
            :data:`ONNX_OUTPUTS` (decoded here), or a post-processed graph's :data:`ONNX_DETECTION_OUTPUTS`
            (only unpadded here).
        side: the side file written by :func:`export_onnx` (path or its parsed dict).
        score_thresh, nms_thresh, max_detections: override the values the side file records (a network
            graph only: a post-processed graph has its values built in).

    Returns:
        One :class:`~pneumodet.model.Detections` per image: boxes ``[N, 4]`` xyxy in ``S x S`` input
        pixels, scores ``[N]`` by decreasing score, class probabilities ``[C]``.
    """
    meta = _read_side_file(side)
    names = tuple(meta.get("outputs", ONNX_OUTPUTS))
    if len(outputs) != len(names):
        raise ConfigError(f"expected the {len(names)} ONNX outputs {names}, got {len(outputs)}")
    tensors = [torch.as_tensor(np.asarray(o)) for o in outputs]
    if meta.get("graph") == "detections":
        if (score_thresh, nms_thresh, max_detections) != (None, None, None):
            raise ConfigError("this graph decodes itself: its score threshold, NMS IoU and max detections were "
                              "fixed at export (export --with-postprocess --min-score/--nms-iou/--max-det)")
        boxes, scores, counts, probs = tensors
        return [Detections(b[:n].float(), s[:n].float(), p.float())
                for b, s, n, p in zip(boxes, scores, counts.tolist(), probs, strict=True)]
    post = meta.get("postprocess") or {}
    config = ModelConfig.from_dict(meta["model_config"])  # side files before "postprocess" have these only
    cls_logits, box_deltas, global_logits, anchors = tensors
    size = int(meta["image_size"])
    head = HeadOutputs(cls_logits, box_deltas, global_logits, anchors.float(),
                       tuple(meta["anchors_per_level"]), (size, size))
    return postprocess(
        head, BoxCoder(),
        score_thresh=post.get("score_thresh", config.score_thresh) if score_thresh is None else score_thresh,
        nms_thresh=post.get("nms_iou", config.nms_thresh) if nms_thresh is None else nms_thresh,
        topk_per_level=post.get("topk_per_level", config.topk_per_level),
        max_detections=post.get("max_detections", config.max_detections) if max_detections is None
        else max_detections,
    )


def run_onnx(onnx_path: Path | str, images: np.ndarray, **decode_options: Any) -> list[Detections]:
    """End to end with onnxruntime: ``images`` float32 ``[B, 1, S, S]`` in ``[0, 1]`` -> detections
    (see :func:`decode_onnx_outputs`); either kind of graph."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("running an ONNX model needs onnxruntime (pip install onnxruntime)") from exc
    side = _read_side_file(onnx_side_file(onnx_path))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(side.get("outputs", ONNX_OUTPUTS)),
                          {"images": np.ascontiguousarray(images, dtype=np.float32)})
    return decode_onnx_outputs(outputs, side, **decode_options)
