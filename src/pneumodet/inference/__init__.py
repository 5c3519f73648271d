"""Prediction: from DICOM files (or a run's split) to boxes, and the network's ONNX export.

One module per concept, in the order data flows:

* :mod:`~pneumodet.inference.options` -- :class:`PredictOptions`, shared by ``predict``, ``evaluate`` and the CLI;
* :mod:`~pneumodet.inference.inputs` -- finding DICOM files and the stream that decodes them for the model;
* :mod:`~pneumodet.inference.engine` -- model loading and the :class:`Predictor` (precision, TTA, gating);
* :mod:`~pneumodet.inference.tta` -- merging the views of a test-time augmentation (WBF, NMS);
* :mod:`~pneumodet.inference.results` -- :class:`ImagePrediction` and :class:`PredictionResult`;
* :mod:`~pneumodet.inference.prediction` -- :func:`predict`, streaming files through the engine (not named
  ``predict.py``: a submodule of that name would shadow the function on the package once imported);
* :mod:`~pneumodet.inference.outputs` -- the submission CSV, the JSON and the overlay pictures;
* :mod:`~pneumodet.inference.export` -- ONNX export and the decoding of its outputs;
* :mod:`~pneumodet.inference.quantize` -- int8 graphs (ONNX Runtime), run by the engine with ``--precision int8``
  or ``auto`` (loaded only where a run holds an int8 graph, or int8 is asked for).

The public names are loaded on first use (PEP 562), as in :mod:`pneumodet.model`: reading the options (what
the command line does to show its defaults) loads no torch, and ``evaluate``, which needs the engine only,
never loads ONNX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pneumodet.lazy import lazy_exports

_HOMES = {
    "PredictOptions": "options", "TtaMerge": "options", "TTA_CHOICES": "options", "TTA_MERGES": "options",
    "DEVICE_CHOICES": "options", "check_predict_options": "options", "check_tta": "options",
    "FileSearch": "inputs", "find_dicom_files": "inputs", "DicomImageStream": "inputs", "StreamItem": "inputs",
    "weighted_boxes_fusion": "tta", "merge_views": "tta",
    "RawPrediction": "engine", "Predictor": "engine", "resolve_checkpoint": "engine",
    "load_for_inference": "engine", "model_image_size": "engine", "resolve_device": "engine",
    "check_options": "engine",
    "UnreadableInput": "results", "DuplicateInput": "results", "ImagePrediction": "results", "image_key": "results",
    "PredictionResult": "results", "SUBMISSION_MERGE": "results", "OPACITY_INDEX": "results",
    "xyxy_to_kaggle": "results",
    "predict": "prediction",
    "overlay_filename": "outputs", "draw_overlay": "outputs", "write_overlay": "outputs",
    "prediction_json": "outputs", "write_prediction_json": "outputs", "write_prediction_submission": "outputs",
    "ONNX_OUTPUTS": "export", "ONNX_FORMAT": "export", "MIN_ONNX_OPSET": "export", "OnnxNetwork": "export",
    "OnnxExport": "export", "onnx_side_file": "export", "export_onnx": "export", "onnx_opsets": "export",
    "decode_onnx_outputs": "export", "run_onnx": "export", "ONNX_DETECTION_OUTPUTS": "export",
    "OnnxDetector": "export", "DEFAULT_OPSET": "export", "DYNAMO_MIN_OPSET": "export",
    # owned below this package, kept here for the callers of the former single module
    "prepare_image": "pneumodet.data.preprocess", "resolve_precision": "pneumodet.hardware",
    "boxes_to_original": "pneumodet.boxes", "hflip_boxes": "pneumodet.boxes",
}
#: Names re-exported under another name.
_RENAMED = {"hflip_boxes": "hflip"}
__all__ = [
    "DEFAULT_OPSET",
    "DEVICE_CHOICES",
    "DYNAMO_MIN_OPSET",
    "DicomImageStream",
    "DuplicateInput",
    "FileSearch",
    "ImagePrediction",
    "MIN_ONNX_OPSET",
    "ONNX_DETECTION_OUTPUTS",
    "ONNX_FORMAT",
    "ONNX_OUTPUTS",
    "OPACITY_INDEX",
    "OnnxDetector",
    "OnnxExport",
    "OnnxNetwork",
    "PredictOptions",
    "PredictionResult",
    "Predictor",
    "RawPrediction",
    "SUBMISSION_MERGE",
    "StreamItem",
    "TTA_CHOICES",
    "TTA_MERGES",
    "TtaMerge",
    "UnreadableInput",
    "boxes_to_original",
    "check_options",
    "check_predict_options",
    "check_tta",
    "decode_onnx_outputs",
    "draw_overlay",
    "export_onnx",
    "find_dicom_files",
    "hflip_boxes",
    "image_key",
    "load_for_inference",
    "merge_views",
    "model_image_size",
    "onnx_opsets",
    "onnx_side_file",
    "overlay_filename",
    "predict",
    "prediction_json",
    "prepare_image",
    "resolve_checkpoint",
    "resolve_device",
    "resolve_precision",
    "run_onnx",
    "weighted_boxes_fusion",
    "write_overlay",
    "write_prediction_json",
    "write_prediction_submission",
    "xyxy_to_kaggle",
]

if TYPE_CHECKING:
    from pneumodet.boxes import boxes_to_original
    from pneumodet.boxes import hflip as hflip_boxes
    from pneumodet.data.preprocess import prepare_image
    from pneumodet.hardware import resolve_precision
    from pneumodet.inference.engine import (
        Predictor,
        RawPrediction,
        check_options,
        load_for_inference,
        model_image_size,
        resolve_checkpoint,
        resolve_device,
    )
    from pneumodet.inference.export import (
        DEFAULT_OPSET,
        DYNAMO_MIN_OPSET,
        MIN_ONNX_OPSET,
        ONNX_DETECTION_OUTPUTS,
        ONNX_FORMAT,
        ONNX_OUTPUTS,
        OnnxDetector,
        OnnxExport,
        OnnxNetwork,
        decode_onnx_outputs,
        export_onnx,
        onnx_opsets,
        onnx_side_file,
        run_onnx,
    )
    from pneumodet.inference.inputs import DicomImageStream, FileSearch, StreamItem, find_dicom_files
    from pneumodet.inference.options import (
        DEVICE_CHOICES,
        TTA_CHOICES,
        TTA_MERGES,
        PredictOptions,
        TtaMerge,
        check_predict_options,
        check_tta,
    )
    from pneumodet.inference.outputs import (
        draw_overlay,
        overlay_filename,
        prediction_json,
        write_overlay,
        write_prediction_json,
        write_prediction_submission,
    )
    from pneumodet.inference.prediction import predict
    from pneumodet.inference.results import (
        OPACITY_INDEX,
        SUBMISSION_MERGE,
        DuplicateInput,
        ImagePrediction,
        PredictionResult,
        UnreadableInput,
        image_key,
        xyxy_to_kaggle,
    )
    from pneumodet.inference.tta import merge_views, weighted_boxes_fusion


__getattr__ = lazy_exports(__name__, _HOMES, _RENAMED)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
