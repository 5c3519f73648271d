"""``pneumodet quantize RUN``: a finished run's int8 graph, calibrated on its training images, kept in the run.

The calibration images are ``N`` of the run's *training* patients (a seeded choice), read from the run's image
cache, which is built first where it is missing, as ``evaluate`` builds it (:func:`pneumodet.training.build_datamodule`):
the images the model learned from, prepared exactly as prediction prepares an image. The graph is
:func:`pneumodet.inference.quantize.quantize_onnx`'s, written into the run folder
(:attr:`~pneumodet.rundir.RunDir.int8_model` and its side file, which records the SHA-256 of the best model it
was made from). ``predict`` and ``evaluate`` then run it on the CPU: by default (``--precision auto``) while
it is current, or when asked (``--precision int8``).

Above ``evaluation`` (it checks a run as ``evaluate`` does) and ``inference`` (it makes what inference runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumodet.data.cache import ImageCache
from pneumodet.data.split import read_split
from pneumodet.errors import ConfigError, RunError
from pneumodet.evaluation import format_metric, load_run_config, load_runs, predict_split
from pneumodet.hardware import resolve_precision
from pneumodet.inference.options import PredictOptions
from pneumodet.inference.quantize import (
    ORT_CALIBRATION,
    calibration_images,
    check_deploy_packages,
    quantize_onnx,
    record_validation,
)
from pneumodet.metrics import rsna_map
from pneumodet.rundir import CvDir, RunDir
from pneumodet.textsafe import display_path
from pneumodet.training import build_datamodule

#: Training images calibrated on by default: the number measured in docs/BENCHMARKS.md.
DEFAULT_CALIBRATION_IMAGES = 256


@dataclass(frozen=True)
class QuantizedRun:
    """What :func:`quantize_run` did: the run, its int8 graph and side file, the calibration images, the time."""

    run: Path
    graph: Path
    side_file: Path
    calibration_images: int
    training_images: int
    method: str
    seconds: float
    #: the validation check (:func:`validate_int8`) recorded in the side file
    validation: dict[str, Any]

    def summary(self) -> str:
        v = self.validation
        check = (f"validation RSNA mAP {format_metric(v['int8_rsna_map'], 4)} in int8, "
                 f"{format_metric(v['reference_rsna_map'], 4)} in {v['reference_precision']} ({v['images']} images, "
                 f"threshold {v['threshold']:.2f})")
        use = ("predict and evaluate run it on the CPU (--precision auto, the default, or int8) while the run's "
               "model stays the one it was made from" if v["within_tolerance"] else
               f"they differ by more than {v['tolerance']}, so --precision auto (the default) does not run it; "
               "--precision int8 does")
        return (f"calibrated on {self.calibration_images} of the {self.training_images} training images of "
                f"{display_path(self.run)} ({self.method}) in {self.seconds:.1f} s; wrote {display_path(self.graph)} "
                f"and {display_path(self.side_file)}\n{check}: {use}")


def quantize_run(run_dir: Path | str, *, calibration: int = DEFAULT_CALIBRATION_IMAGES, batch_size: int = 8,
                 method: str = "minmax", seed: int = 0, verbose: bool = False, progress: bool | str = False,
                 say: Callable[[str], None] | None = None) -> QuantizedRun:
    """Quantise the best model of the finished run ``run_dir`` to an int8 ONNX graph kept in the run folder.

    Args:
        calibration: how many training images calibrate the activation ranges (all of them, if fewer).
        batch_size: images per calibration batch.
        method: ONNX Runtime's calibration method, one of :data:`~pneumodet.inference.quantize.ORT_CALIBRATION`.
        seed: which training images are chosen.
        verbose: let ONNX Runtime say what it does (see :func:`~pneumodet.inference.quantize.quantize_onnx`).
        progress: the image cache's progress, if it has to be built.
        say: called with a line saying what is about to happen (the calibration takes a while).

    Raises:
        ConfigError: a bad option (checked first).
        QuantizationUnavailable: onnx, onnxruntime or onnxscript is not installed (checked before the run is
            read).
        RunError: ``run_dir`` is no finished run (or a cross-validation folder), its data or split moved or
            changed (as ``evaluate`` says), or its training set holds no cached image.
    """
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ConfigError(f"calibration images must be a whole number of at least 1, got {calibration!r}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if method not in ORT_CALIBRATION:
        raise ConfigError(f"unknown calibration method {method!r}; choose {', '.join(ORT_CALIBRATION)}")
    check_deploy_packages("`pneumodet quantize`")
    start = time.perf_counter()
    run = RunDir(Path(run_dir))
    if CvDir(run.root).is_cv():
        raise RunError(f"{display_path(run.root)}: a cross-validation folder holds one model per fold: quantize "
                       f"each fold's run (e.g. `pneumodet quantize {display_path(CvDir(run.root).fold(1).root)}`); "
                       "predict and evaluate of the folder then run each fold's int8 graph")
    config = load_run_config(run)  # a finished run whose data and split are where, and what, training used
    datamodule = build_datamodule(config, progress=progress)
    datamodule.prepare_data()  # the run's image cache, built where missing (as evaluate does)
    cache = ImageCache.open(datamodule.cache_dir)
    training = [record.patient_id for record in read_split(Path(config.split_dir))["train"]]
    try:
        images = calibration_images(cache, training, calibration, seed=seed)
    except ConfigError:
        raise RunError(f"{display_path(run.root)}: none of its {len(training)} training patients has an image in "
                       f"the cache {display_path(datamodule.cache_dir)}; nothing to calibrate on") from None
    if say is not None:
        say(f"calibrating on {len(images)} of the {len(training)} training images of {display_path(run.root)}")
    graph = quantize_onnx(run.best_model, run.int8_model, images, batch_size=batch_size, method=method,
                          verbose=verbose)
    if say is not None:
        say("checking it on the validation set against the float network")
    check = validate_int8(run, batch_size=batch_size)
    return QuantizedRun(run.root, graph, run.int8_side, len(images), len(training), method,
                        time.perf_counter() - start, check)


def validate_int8(run: RunDir, *, batch_size: int = 8) -> dict[str, Any]:
    """Score the run's validation set at its threshold with the float network (bf16 where the CPU computes it
    natively, else fp32) and with its int8 graph, and record both in the graph's side file
    (:func:`~pneumodet.inference.quantize.record_validation`): ``--precision auto`` runs the graph only when
    they are within :data:`~pneumodet.inference.quantize.INT8_MAP_TOLERANCE`. On a weak model many boxes score
    near the threshold, and int8's small changes move them across it."""
    runs = load_runs(run.root, split="val")
    threshold = float(runs.loaded.threshold)
    reference = resolve_precision(None, "cpu")
    scores = {}
    for precision in (reference, "int8"):
        options = PredictOptions(precision=precision, device="cpu", batch_size=batch_size, compile=False)
        predicted = predict_split(runs, "val", options)
        kept = {pid: p[p[:, 0] >= threshold] for pid, p in predicted.preds.items()}
        scores[precision] = rsna_map(predicted.gt, kept).score
    return record_validation(run.root, reference=reference, reference_map=scores[reference],
                             int8_map=scores["int8"], images=len(predicted.gt), threshold=threshold)
