"""Reference decoder for a model exported by ``pneumodet export``: DICOM in, boxes in the DICOM's pixels out.

A single file to copy into a deployment: it imports numpy and onnxruntime, and pydicom (3.x, with Pillow for
JPEG) and OpenCV only to read and resize DICOM pixels; nothing of pneumodet and no torch. It reproduces
``pneumodet predict`` (at ``--precision fp32``, without ``--tta`` or ``--gate``) step by step, as
``docs/ONNX.md`` describes them:

1. :func:`read_grey`: the DICOM's first frame as uint8 grey ``[H, W]``, bright = dense, decoded as pneumodet
   decodes it (JPEG Baseline through Pillow; the same VOI LUT / window / min-max and MONOCHROME1 rules);
2. :func:`prepare`: OpenCV area resize to ``S x S``, float32 / 255, as ``[1, S, S]``;
3. onnxruntime runs the graph on ``[B, 1, S, S]``;
4. :func:`decode` (a network graph) or :func:`unpad` (a graph exported ``--with-postprocess``): boxes in
   ``S x S`` input pixels, scores, class probabilities;
5. :func:`to_original`: boxes scaled to the ``H x W`` original; ``score >= threshold`` (the run's, from
   the side file) is the final cut.

Use::

    detector = Detector("model.onnx")           # reads model.onnx.json beside it
    result = detector.predict_dicom("patient.dcm")
    result.boxes, result.scores, result.class_probs   # xyxy original pixels, by decreasing score

or ``python onnx_reference.py model.onnx a.dcm b.dcm`` (one JSON line per file).

Not covered: pneumodet's defences against hostile files (bounded reads, decompression bombs, truncation
checks) beyond a pixel-count limit, and its notes on what it worked around; read untrusted files with
pneumodet's reader.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The side file's format this decoder reads (``pneumodet export`` of format 1 lacks the post-processing values:
#: export again).
SIDE_FORMAT = "pneumodet-onnx-2"
#: Refuse files declaring more pixels than this (decoders allocate what a file declares).
MAX_PIXELS = 50_000_000
#: ITU-R BT.601 luma weights: RGB -> grey.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Percentiles of the min-max used for a > 8-bit image without a usable VOI LUT or window.
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` float32 ``[N, 4]`` xyxy, ``scores`` float32 ``[N]`` by decreasing
    score, ``class_probs`` float32 ``[C]`` (the side file's ``class_names`` order)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_probs: np.ndarray


@dataclass(frozen=True)
class Prediction(Detections):
    """:class:`Detections` of a DICOM in its original pixels, scoring at least ``threshold``."""

    original_size: tuple[int, int] = (0, 0)
    threshold: float = 0.0


# ---------------------------------------------------------------------------------------------- DICOM
def read_grey(path: str | Path) -> np.ndarray:
    """The first frame of a DICOM file as uint8 ``[H, W]``, bright = dense, exactly as pneumodet reads it.

    8-bit grey is taken as stored; deeper data goes through the modality LUT, then the first of VOI LUT,
    window and robust min-max that does not make a varied image constant; MONOCHROME1 is inverted; colour
    (RGB, YBR, palette) becomes grey with BT.601 weights.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = _read_dataset(Path(path))
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > MAX_PIXELS:
        raise ValueError(f"{path}: {rows} x {columns} pixels is more than {MAX_PIXELS:,}; refused")
    photometric = (_text(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    arr = _first_frame(ds, pydicom)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit LUT entries are display values on 0..65535
            arr = np.rint(arr / 257.0).astype(np.uint8)
    colour = arr.ndim == 3
    if colour:  # pydicom has converted YBR to RGB already
        grey = arr.astype(np.float32) @ LUMA
        arr = np.clip(np.rint(grey), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else grey
    display_ready = arr.dtype == np.uint8 and (colour or (_int(ds, "BitsStored") or 8) == 8)
    image = arr if display_ready else _to_uint8(arr, ds, photometric)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image)


def _read_dataset(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:  # no preamble: a bare data set, whose transfer syntax follows from its encoding
        ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        implicit, little = ds.original_encoding
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little
                                          else ExplicitVRBigEndian)
    return ds


def _first_frame(ds: Any, pydicom: Any) -> np.ndarray:
    """JPEG Baseline and Extended go to Pillow first (libjpeg-turbo; pydicom's default plugin for them may
    be another decoder, whose pixels differ by a grey level here and there); everything else, and what
    Pillow cannot decode, to pydicom's default plugins."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    if ds.file_meta.get("TransferSyntaxUID") in (JPEGBaseline8Bit, JPEGExtended12Bit):
        try:
            return pixel_array(ds, index=0, decoding_plugin="pillow")
        except Exception:  # noqa: BLE001 - Pillow cannot do every JPEG variant: the other plugins try
            pass
    return pixel_array(ds, index=0)


def _to_uint8(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    monochrome = photometric.startswith("MONOCHROME")
    values = np.asarray(apply_modality_lut(arr, ds) if monochrome else arr, dtype=np.float32)
    flat = bool(values.min() == values.max())  # then every mapping is constant, and rightly so
    if monochrome and "VOILUTSequence" in ds:
        image = _voi_lut(values, ds)
        if image is not None and (flat or image.min() != image.max()):
            return image
    window = _window(ds) if monochrome else None
    if window is not None:
        image = _scale(values, window[0] - window[1] / 2.0, window[0] + window[1] / 2.0)
        if flat or image.min() != image.max():
            return image
    sample = values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)]
    low, high = (float(v) for v in np.percentile(sample, ROBUST_PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return _scale(values, low, high)


def _voi_lut(values: np.ndarray, ds: Any) -> np.ndarray | None:
    """The first VOI LUT, scaled to uint8 by its entries' bit depth (the descriptor's, unless the entries
    exceed it or stay below a sixteenth of it); ``None`` when it is unusable. Not pydicom's ``apply_voi``,
    which indexes an 8-bit LUT with uint8 indices that wrap above 255."""
    try:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except Exception:  # noqa: BLE001 - missing, empty or malformed: the LUT is unusable, not the file
        return None
    entries = entries or 65536
    if isinstance(data, bytes):  # VR OW: 16-bit words in the file's byte order
        syntax = ds.file_meta.get("TransferSyntaxUID")
        big = syntax is not None and syntax.is_transfer_syntax and not syntax.is_little_endian
        lut = np.frombuffer(data[: len(data) // 2 * 2], dtype=">u2" if big else "<u2")
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64)).ravel()
    if lut.size < entries:
        return None
    lut = lut[:entries].astype(np.float32)
    if first >= 32768 and values.min() < 0:  # VR 'US or SS': a signed first value read as unsigned
        first -= 65536
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    own_bits = max(max(int(lut.max()), 0).bit_length(), 1)
    if not 1 <= bits <= 16 or own_bits > bits or own_bits <= bits - 4:
        bits = own_bits
    return _scale(lut[index], 0.0, float(2**bits - 1))


def _window(ds: Any) -> tuple[float, float] | None:
    """The first window centre and width; ``None`` when missing, malformed or of width 0 or less."""
    from pydicom.multival import MultiValue

    try:
        centre, width = (ds.get(keyword) for keyword in ("WindowCenter", "WindowWidth"))
        centre = float(centre[0] if isinstance(centre, MultiValue) else centre)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except Exception:  # noqa: BLE001 - missing (None), empty or malformed: no window
        return None
    return (centre, width) if width > 0 else None


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    out = (values - low) * (255.0 / (high - low))  # float32 arithmetic, as pneumodet
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element counts as missing
        return None
    return None if value is None else str(value).strip() or None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except Exception:  # noqa: BLE001 - missing (None), empty or malformed
        return None


# ---------------------------------------------------------------------------------------------- input
def prepare(grey: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey ``[H, W]`` -> the model's input for one image, float32 ``[1, S, S]`` in ``[0, 1]``: OpenCV's
    area resize (``cv2.INTER_AREA``; no resize when already ``S x S``), then divided by 255."""
    import cv2

    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grey image, got {grey.dtype} of shape {grey.shape}")
    if grey.shape != (size, size):
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    return (grey.astype(np.float32) / np.float32(255.0))[None]


# ---------------------------------------------------------------------------------------------- decoding
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray, scale_clamp: float) -> np.ndarray:
    """Anchor deltas ``(dx, dy, dw, dh)`` ``[N, 4]`` on anchors xyxy ``[N, 4]`` -> boxes xyxy, float32: the
    Faster R-CNN parameterisation with unit weights; ``dw, dh`` are capped at ``scale_clamp``."""
    d, a = np.asarray(deltas, dtype=np.float32), np.asarray(anchors, dtype=np.float32)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    ax, ay = a[:, 0] + 0.5 * aw, a[:, 1] + 0.5 * ah
    cx, cy = ax + d[:, 0] * aw, ay + d[:, 1] * ah
    w = aw * np.exp(np.minimum(d[:, 2], np.float32(scale_clamp)))
    h = ah * np.exp(np.minimum(d[:, 3], np.float32(scale_clamp)))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression (torchvision's): by decreasing score (ties in input order), a box is
    dropped when its IoU with a kept box is above ``iou_threshold``. Returns the kept indices, at most
    ``limit`` (the first ``limit`` of the full result)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable"):
        if suppressed[i]:
            continue
        kept.append(int(i))
        if limit is not None and len(kept) == limit:
            break
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2) - np.maximum(x1[i], x1))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2) - np.maximum(y1[i], y1))
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou.astype(np.float64) > iou_threshold  # float32 IoU, compared in double as torchvision
    return np.asarray(kept, dtype=np.int64)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def decode(outputs: dict[str, np.ndarray], side: dict[str, Any], *, score_thresh: float | None = None,
           nms_iou: float | None = None, max_detections: int | None = None) -> list[Detections]:
    """A network graph's outputs (``cls_logits [B, A]``, ``box_deltas [B, A, 4]``, ``global_logits [B, C]``,
    ``anchors [A, 4]``, by name) -> per image, boxes in ``S x S`` input pixels.

    Per image: ``sigmoid``; the ``topk_per_level`` best anchors of each pyramid level (``anchors_per_level``
    consecutive anchors); :func:`decode_boxes`; clipped to ``[0, S]``; kept when ``score > score_thresh``
    with positive width and height; :func:`nms` at ``nms_iou``; the ``max_detections`` best. The values
    default to the side file's ``postprocess``.
    """
    post, size = side["postprocess"], float(side["image_size"])
    score_thresh = post["score_thresh"] if score_thresh is None else score_thresh
    nms_iou = post["nms_iou"] if nms_iou is None else nms_iou
    max_detections = post["max_detections"] if max_detections is None else max_detections
    anchors = np.asarray(outputs["anchors"], dtype=np.float32)
    probs = softmax(outputs["global_logits"])
    result = []
    for image, logits in enumerate(np.asarray(outputs["cls_logits"])):
        scores_all = sigmoid(logits)
        index, start = [], 0
        for count in side["anchors_per_level"]:
            order = np.argsort(-scores_all[start:start + count], kind="stable")[: post["topk_per_level"]]
            index.append(order + start)
            start += count
        top = np.concatenate(index)
        scores = scores_all[top]
        boxes = decode_boxes(np.asarray(outputs["box_deltas"][image])[top], anchors[top], post["box_scale_clamp"])
        boxes = np.minimum(np.maximum(boxes, np.float32(0)), np.float32(size))
        ok = (scores > score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[ok], scores[ok]
        kept = nms(boxes, scores, nms_iou, max_detections)
        result.append(Detections(boxes[kept].reshape(-1, 4), scores[kept], probs[image]))
    return result


def unpad(outputs: dict[str, np.ndarray]) -> list[Detections]:
    """A graph exported ``--with-postprocess`` (``boxes [B, M, 4]``, ``scores [B, M]``, ``num_detections
    [B]``, ``class_probs [B, C]``) -> per image its ``num_detections`` first rows."""
    return [Detections(b[:n].astype(np.float32), s[:n].astype(np.float32), p.astype(np.float32))
            for b, s, n, p in zip(outputs["boxes"], outputs["scores"], outputs["num_detections"],
                                  outputs["class_probs"], strict=True)]


def to_original(boxes: np.ndarray, original_size: tuple[int, int], image_size: int) -> np.ndarray:
    """xyxy boxes in ``S x S`` input pixels -> the ``(H, W)`` original's pixels (x times ``W / S``, y times
    ``H / S``, in float32)."""
    height, width = original_size
    sx, sy = width / image_size, height / image_size
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32([sx, sy, sx, sy])


# ---------------------------------------------------------------------------------------------- runtime
class Detector:
    """An exported pneumodet model in onnxruntime, with its side file (``model.onnx.json``)."""

    def __init__(self, onnx_path: str | Path, side_file: str | Path | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime

        onnx_path = Path(onnx_path)
        side_path = Path(side_file) if side_file is not None else onnx_path.with_name(onnx_path.name + ".json")
        self.side: dict[str, Any] = json.loads(side_path.read_text(encoding="utf-8"))
        if self.side.get("format") != SIDE_FORMAT:
            raise ValueError(f"{side_path}: not a pneumodet ONNX side file ({SIDE_FORMAT!r} expected)")
        self.image_size = int(self.side["image_size"])
        self.session = onnxruntime.InferenceSession(str(onnx_path), providers=list(providers))

    @property
    def threshold(self) -> float | None:
        """The run's validation threshold (``None`` when the checkpoint recorded none)."""
        value = self.side.get("threshold")
        return None if value is None else float(value)

    def detect(self, images: np.ndarray, **overrides: Any) -> list[Detections]:
        """float32 ``[B, 1, S, S]`` (:func:`prepare`, stacked) -> detections in input pixels, before the
        threshold. ``overrides`` (``score_thresh``, ``nms_iou``, ``max_detections``) apply to a network graph
        only: a post-processed graph has them built in."""
        names = list(self.side["outputs"])
        values = self.session.run(names, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        outputs = dict(zip(names, values, strict=True))
        if self.side.get("graph") == "detections":
            if any(v is not None for v in overrides.values()):
                raise ValueError("this graph decodes itself: its post-processing values were fixed at export")
            return unpad(outputs)
        return decode(outputs, self.side, **overrides)

    def predict_grey(self, grey: np.ndarray, threshold: float | None = None) -> Prediction:
        """One uint8 grey image ``[H, W]`` (:func:`read_grey`) -> boxes in its pixels scoring at least
        ``threshold`` (default: the run's)."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None or not 0.0 <= threshold <= 1.0:  # NaN fails the range too
            raise ValueError(f"a threshold from 0 to 1 is needed (the side file records {self.threshold})")
        det = self.detect(prepare(grey, self.image_size)[None])[0]
        keep = det.scores >= threshold
        boxes = to_original(det.boxes[keep], grey.shape, self.image_size)
        return Prediction(boxes, det.scores[keep], det.class_probs, tuple(grey.shape), threshold)

    def predict_dicom(self, path: str | Path, threshold: float | None = None) -> Prediction:
        """A DICOM file -> :class:`Prediction` in its original pixels (:func:`read_grey`, then
        :meth:`predict_grey`)."""
        return self.predict_grey(read_grey(path), threshold)


def main(argv: list[str] | None = None) -> int:
    """``onnx_reference.py MODEL.onnx FILE.dcm ...``: one JSON line per file (boxes xyxy in its pixels)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: onnx_reference.py MODEL.onnx FILE.dcm [FILE.dcm ...]", file=sys.stderr)
        return 2
    detector = Detector(args[0])
    names = detector.side["class_names"]
    for path in args[1:]:
        pred = detector.predict_dicom(path)
        print(json.dumps({"file": path, "boxes": pred.boxes.round(2).tolist(),
                          "scores": pred.scores.round(5).tolist(),
                          "class_probs": dict(zip(names, pred.class_probs.round(5).tolist(), strict=True))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
