"""int8 post-training quantisation of the network, for prediction on the CPU: ONNX Runtime static quantisation.

:func:`quantize_onnx` exports the network graph (:func:`~pneumodet.inference.export.export_onnx`), pre-processes
it (shape inference, graph optimisation), then ``onnxruntime.quantization.quantize_static`` quantises it: QDQ
format, int8 weights per output channel, uint8 activations whose ranges are calibrated on training images
(:func:`calibration_images`). :class:`OrtNetwork` runs such a graph and returns the model's
:class:`~pneumodet.model.HeadOutputs`, so it drops into a :class:`~pneumodet.inference.engine.Predictor` as
its ``network`` (:func:`int8_predictor`): the decoding, NMS, TTA, gating and box mapping stay the model's own;
only the network's numbers change.

A run's int8 graph is kept in its folder (:attr:`~pneumodet.rundir.RunDir.int8_model`, written by ``pneumodet
quantize``: :func:`pneumodet.quantization.quantize_run`). Its side file records the SHA-256 of the
best_model.pt it was made from and of the graph itself, so that a model retrained or replaced since, or a graph
replaced or half written, is found out (:func:`run_int8_graph`) instead of predicting with another model's
numbers. ``predict`` and ``evaluate`` run it with ``--precision int8``, and by default (``auto``) on the CPU
wherever it is current and ONNX Runtime is installed (:func:`int8_graphs`).

Why int8, and why this route: benchmarks/bench_int8.py measured it against the compiled bf16 path on the demo's
run (docs/BENCHMARKS.md): 1.83x as fast, test mAP 0.0032 lower (the goal of issue 18: 1.5x, within 0.01).
The other route measured, PyTorch 2 export quantisation with the x86 Inductor quantizer, was slower than bf16
(0.85x); it lives in the benchmark only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumodet.data.preprocess import to_unit_range
from pneumodet.errors import ConfigError, PneumodetError, RunError
from pneumodet.inference.engine import Predictor, resolve_checkpoint
from pneumodet.inference.export import export_onnx, onnx_side_file
from pneumodet.launch import quiet_loggers
from pneumodet.model import HeadOutputs
from pneumodet.rundir import RunDir
from pneumodet.safeio import atomic_path, file_sha256, write_json
from pneumodet.textsafe import display_path, display_text

#: Calibration methods of ONNX Runtime's static quantisation (``onnxruntime.quantization.CalibrationMethod``).
ORT_CALIBRATION = ("minmax", "entropy", "percentile")
#: How far the int8 graph's validation RSNA mAP may be from the float network's for ``--precision auto`` to
#: run it (the goal int8 was measured against: docs/BENCHMARKS.md).
INT8_MAP_TOLERANCE = 0.01
#: What making an int8 graph needs beyond pneumodet's own dependencies (the ``deploy`` extra); running one
#: needs ``onnxruntime`` only.
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
#: How to install them.
DEPLOY_INSTALL = "pip install 'pneumodet[deploy]'"


class QuantizationUnavailable(PneumodetError):
    """int8 quantisation or prediction that this installation cannot run (a package missing), with what to
    install."""


def check_deploy_packages(what: str, packages: Sequence[str] = DEPLOY_PACKAGES) -> None:
    """:class:`QuantizationUnavailable` naming the ``packages`` that ``what`` needs and that are not installed."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise QuantizationUnavailable(f"{what} needs {', '.join(missing)}, not installed: {DEPLOY_INSTALL}")


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
                  batch_size: int = 8, method: str = "minmax", per_channel: bool = True,
                  verbose: bool = False) -> Path:
    """The network as a statically quantised int8 ONNX graph at ``out_path``, with its side file
    (:func:`~pneumodet.inference.export.onnx_side_file`, plus ``"quantization"``: how, on how many images,
    and the SHA-256 of the checkpoint it was made from, ``model_sha256``, and of the graph, ``graph_sha256``);
    returns the path.

    ``model_source``: a run folder (its best model) or a checkpoint file. ``calibration``: float
    ``[N, 1, S, S]`` images (:func:`calibration_images`) whose activation ranges (``method``: one of
    :data:`ORT_CALIBRATION`) fix the int8 scales. ``verbose``: let the exporter and ONNX Runtime say what they
    do (their progress lines, warnings and notes); otherwise they are quiet.

    Written atomically: the graph goes to a temporary file; once it is complete, the old side file is removed,
    the graph renamed into place and its new side file written (itself atomically). A failure before leaves
    the old pair as it was; an interruption between leaves a graph without a side file, which
    :func:`run_int8_graph` refuses; never a graph with another's side file.

    Raises:
        QuantizationUnavailable: onnx, onnxruntime or onnxscript is not installed (checked first).
        ConfigError: an unknown calibration method, no calibration image, or images of another size.
    """
    check_deploy_packages("int8 quantisation")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in ORT_CALIBRATION:
        raise ConfigError(f"unknown calibration method {method!r}; choose {', '.join(ORT_CALIBRATION)}")
    if len(calibration) == 0:
        raise ConfigError("no calibration image: int8 scales are calibrated on at least one image")
    out_path = Path(out_path)
    checkpoint = resolve_checkpoint(model_source)
    model_sha256 = file_sha256(checkpoint)  # before the export reads it: the identity of what is quantised
    side_file = onnx_side_file(out_path)
    with tempfile.TemporaryDirectory(prefix="pneumodet-int8-") as tmp, _library_chatter(verbose):
        exported = export_onnx(checkpoint, Path(tmp) / "network.onnx")
        size = exported.image_size
        if tuple(calibration.shape[1:]) != (1, size, size):
            raise ConfigError(f"the calibration images are {list(calibration.shape[1:])}, but the network takes "
                              f"[1, {size}, {size}]: calibrate on images of the size the model was trained at")
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
            graph_sha256 = file_sha256(tmp_out)
            # last, as the new graph is about to replace the old: until then the old pair stays usable
            side_file.unlink(missing_ok=True)
    side["quantization"] = {"route": "onnxruntime static", "format": "QDQ", "weights": "int8 per channel"
                            if per_channel else "int8 per tensor", "activations": "uint8",
                            "calibration": method, "calibration_images": len(calibration),
                            "model_sha256": model_sha256, "graph_sha256": graph_sha256}
    write_json(side_file, side, indent=1)
    return out_path


@contextlib.contextmanager
def _library_chatter(verbose: bool) -> Iterator[None]:
    """Without ``verbose``, ONNX Runtime's quantiser says nothing: its advice and notes (logged through the root
    logger), warnings and printed lines are not the user's business (the exporter is always quiet)."""
    if verbose:
        yield
        return
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          quiet_loggers(("", "onnxruntime"), logging.ERROR)):
        warnings.simplefilter("ignore")
        yield


class OrtNetwork(nn.Module):
    """An ONNX network graph (:func:`export_onnx`'s default kind, fp32 or int8) run by ONNX Runtime on the
    CPU: images float ``[B, 1, S, S]`` -> :class:`HeadOutputs`, as the model's own ``forward``."""

    def __init__(self, onnx_path: Path | str, *, threads: int | None = None) -> None:
        super().__init__()
        check_deploy_packages("running an int8 graph", ("onnxruntime",))
        import onnxruntime

        side_file = onnx_side_file(onnx_path)
        try:
            side = json.loads(side_file.read_text(encoding="utf-8"))
            kind = side.get("graph")
            self.output_names = [str(name) for name in side["outputs"]]
            self.anchors_per_level = tuple(int(n) for n in side["anchors_per_level"])
            self.image_size = int(side["image_size"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{display_path(side_file)}: not a readable pneumodet ONNX side file "
                              f"({type(err).__name__})") from None
        if kind != "network":
            raise ConfigError(f"{display_path(onnx_path)}: a graph with post-processing; OrtNetwork runs the "
                              "network graph")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # from its bytes, not its path: the graph is self-contained, and no tensor data is read from other files
        self.session = onnxruntime.InferenceSession(Path(onnx_path).read_bytes(), options,
                                                    providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> HeadOutputs:
        feed = {"images": np.ascontiguousarray(images.float().cpu().numpy())}
        cls_logits, box_deltas, global_logits, anchors = (torch.from_numpy(o) for o in
                                                          self.session.run(self.output_names, feed))
        return HeadOutputs(cls_logits, box_deltas, global_logits, anchors, self.anchors_per_level,
                           (self.image_size, self.image_size))


def int8_predictor(model: nn.Module, image_size: int, network: nn.Module, **options: Any) -> Predictor:
    """A CPU :class:`Predictor` of ``model`` (fp32: it decodes) whose network is ``network``
    (:class:`OrtNetwork` of :func:`quantize_onnx`'s graph); ``options``: the Predictor's (TTA, gating,
    post-processing values). ``predict`` and ``evaluate`` make theirs in
    :func:`~pneumodet.inference.engine.make_predictor`."""
    return Predictor(model, image_size, device="cpu", precision="int8", network=network, **options)


def run_int8_graph(source: Path | str) -> Path:
    """The int8 graph of the run folder ``source``, checked to be current (see :func:`_current_int8`)."""
    return _current_int8(source)[0]


def _current_int8(source: Path | str) -> tuple[Path, dict[str, Any]]:
    """The int8 graph of the run folder ``source`` and its side file's content, checked to be current: made by
    ``pneumodet quantize`` from the best model the run holds now, and the graph its side file describes.

    Raises:
        ConfigError: ``source`` is a checkpoint file, not a run folder (it has no int8 graph).
        RunError: the run holds no int8 graph, or one without its side file (unfinished), with a damaged
            side file, made from another best model (retrained or replaced since: stale), or replaced since.
            Each message names the file and says to run ``pneumodet quantize RUN``.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"{display_path(source)}: int8 prediction runs a run folder's int8 graph (made by "
                          "`pneumodet quantize RUN`); a checkpoint file has none: give its run folder, or choose "
                          "--precision bf16 or fp32")
    run = RunDir(folder)
    again = f"run `pneumodet quantize {display_path(folder)}` again"
    if not run.int8_model.is_file():
        raise RunError(f"{display_path(folder)} holds no int8 graph ({run.int8_model.name}); make it with "
                       f"`pneumodet quantize {display_path(folder)}`")
    try:
        side = json.loads(run.int8_side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{display_path(run.int8_model)}: its side file {run.int8_side.name} is missing (the "
                       f"quantisation did not finish); {again}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{display_path(run.int8_side)}: damaged ({type(err).__name__}); {again}") from None
    made = side.get("quantization") if isinstance(side, dict) else None
    made = made if isinstance(made, dict) else {}
    if not run.best_model.is_file():
        raise RunError(f"{display_path(folder)}: {run.best_model.name} is missing, so its int8 graph cannot be "
                       "checked against it")
    if made.get("model_sha256") != file_sha256(run.best_model):
        raise RunError(f"{display_path(run.int8_model)} is stale: it was made from another {run.best_model.name} "
                       f"(the model was retrained or replaced since); {again}")
    if made.get("graph_sha256") != file_sha256(run.int8_model):
        raise RunError(f"{display_path(run.int8_model)} is not the graph its side file describes (replaced or "
                       f"damaged since it was made); {again}")
    return run.int8_model, side


def record_validation(source: Path | str, *, reference: str, reference_map: float, int8_map: float,
                      images: int, threshold: float) -> dict[str, Any]:
    """Add to the run's int8 side file how the graph scored on the validation set against the float network
    (``reference`` precision), at the run's ``threshold``; ``--precision auto`` runs the graph only when the
    two are within :data:`INT8_MAP_TOLERANCE`. Returns the record (also written, atomically)."""
    run = RunDir(Path(source))
    side = json.loads(run.int8_side.read_text(encoding="utf-8"))
    record = {"split": "val", "images": images, "threshold": threshold, "reference_precision": reference,
              "reference_rsna_map": reference_map, "int8_rsna_map": int8_map, "tolerance": INT8_MAP_TOLERANCE,
              # both undefined (nothing to score at the threshold either way) is agreement too
              "within_tolerance": bool(abs(int8_map - reference_map) <= INT8_MAP_TOLERANCE
                                       or (math.isnan(int8_map) and math.isnan(reference_map)))}
    write_json(run.int8_side, {**side, "validation": record})
    return record


def _auto_refusal(source: Path | str, side: dict[str, Any]) -> str | None:
    """Why ``--precision auto`` does not run the current int8 graph of ``source`` whose side file holds
    ``side`` (its validation check failed, or none is recorded), or ``None`` when it may."""
    run = RunDir(Path(source))
    check = side.get("validation")
    if not isinstance(check, dict) or not isinstance(check.get("within_tolerance"), bool):
        return (f"{display_path(run.int8_model)} records no validation check; run `pneumodet quantize "
                f"{display_path(run.root)}` again, or --precision int8 to run it as it is")
    if check["within_tolerance"]:
        return None
    return (f"{display_path(run.int8_model)} moved the validation RSNA mAP from {_map(check['reference_rsna_map'])} "
            f"({check['reference_precision']}) to {_map(check['int8_rsna_map'])}, more than {check['tolerance']}; "
            "--precision int8 runs it anyway")


def _map(value: Any) -> str:
    """A recorded mAP as printed: 4 decimals, ``n/a`` where undefined (``null`` in the JSON)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def int8_graphs(sources: Sequence[Path | str] | None, *, required: bool) -> tuple[list[Path] | None, list[str]]:
    """Each source's current int8 graph (:func:`run_int8_graph`), or ``None``; and notes on graphs passed over.

    ``required`` (``--precision int8``): every source must be a run folder holding a current int8 graph, and
    ONNX Runtime installed; otherwise the error says which and what to do. Not ``required`` (``auto``, on the
    CPU): the graphs when every source has a current one that passed its validation check
    (:func:`record_validation`) and ONNX Runtime is installed, else ``None`` (the precision is then what it
    was without int8), with a note for each source whose graph exists but is not used (stale, unfinished,
    damaged, off the float network's validation mAP, or ONNX Runtime missing).

    Raises:
        ConfigError: ``required`` without sources (a bare model), or with a checkpoint file.
        RunError: ``required``, and a source's graph is missing or not current.
        QuantizationUnavailable: ``required``, and onnxruntime is not installed.
    """
    if not sources:
        if required:
            raise ConfigError("int8 prediction runs a run's int8 graph: give the run folders the models come from")
        return None, []
    if required:
        graphs = [run_int8_graph(source) for source in sources]
        check_deploy_packages("--precision int8 (the int8 graph runs in ONNX Runtime)", ("onnxruntime",))
        return graphs, []
    found: list[Path] = []
    notes: list[str] = []
    without = []
    for source in sources:
        run = RunDir(Path(source))
        if not run.root.is_dir() or not run.int8_model.is_file():
            without.append(display_path(source))
            continue
        try:
            graph, side = _current_int8(source)
        except PneumodetError as err:
            notes.append(f"int8 graph not used: {display_text(str(err))}")
            continue
        found.append(graph)
        refusal = _auto_refusal(source, side)
        if refusal is not None:
            notes.append(f"int8 graph not used by default: {display_text(refusal)}")
    if without and len(without) < len(sources):  # an ensemble runs in one precision: every member needs one
        notes.append(f"int8 graphs not used: an ensemble runs int8 only when every member has its int8 graph, and "
                     f"{', '.join(without)} has none (`pneumodet quantize RUN`)")
    if notes or without:
        return None, notes
    try:
        check_deploy_packages("running the int8 graph", ("onnxruntime",))
    except QuantizationUnavailable as err:
        return None, [f"int8 graph of {display_path(sources[0])} not used: {err}"]
    return found, []
