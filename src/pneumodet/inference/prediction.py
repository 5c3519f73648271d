"""``predict``: boxes and class probabilities for every DICOM under some inputs, streamed.

Files are found (:func:`~pneumodet.inference.inputs.find_dicom_files`), decoded and resized one by one in
a :class:`~torch.utils.data.DataLoader`, batched, run through the :class:`~pneumodet.inference.engine.Predictor`,
and the boxes are mapped back to each image's original pixels. Only one batch of images is ever in
memory; per image only its few boxes and class probabilities are kept.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumodet.errors import CheckpointError, ConfigError, PneumodetError
from pneumodet.hardware import release_free_heap
from pneumodet.inference.distributed import check_processes, launch_processes
from pneumodet.inference.engine import (
    EnsemblePredictor,
    Predictor,
    check_options,
    load_models,
    make_predictor,
    resolve_device,
)
from pneumodet.inference.inputs import (
    DicomImageStream,
    FileSearch,
    StreamItem,
    collate_items,
    find_dicom_files,
)
from pneumodet.inference.options import PredictOptions, check_predict_options
from pneumodet.inference.outputs import OverlayWriter, draw_overlay, overlay_filename
from pneumodet.inference.results import (
    DuplicateInput,
    ImagePrediction,
    PredictionResult,
    UnreadableInput,
    image_key,
)
from pneumodet.progress import track
from pneumodet.safeio import write_bytes
from pneumodet.submission import read_ground_truth
from pneumodet.textsafe import display_path, display_text

#: How often a streaming prediction returns freed heap pages to the system (see release_free_heap).
_TRIM_EVERY_BATCHES = 16


def predict(
    model_source: Path | str | Sequence[Path | str],
    inputs: Sequence[Path | str],
    options: PredictOptions | None = None,
    *,
    follow_symlinks: bool = False,
    overlay_dir: Path | str | None = None,
    labels: Path | str | None = None,
    progress: bool | str = True,
    devices: int = 1,
    num_nodes: int = 1,
    **overrides: Any,
) -> PredictionResult:
    """Predict boxes and class probabilities for every DICOM under ``inputs``.

    Args:
        model_source: a training run directory (its best model is used) or a checkpoint file; or an
            ensemble: several of them, or a cross-validation folder (all its fold runs), whose boxes are
            fused (:class:`~pneumodet.inference.engine.EnsemblePredictor`). The threshold, unless given,
            is the run's validation choice, a CV folder's out-of-fold one; an ensemble of separate runs
            needs one given (``pneumodet predict`` chooses it on their validation set).
        inputs: DICOM files and folders (searched recursively for ``*.dcm``, see
            :func:`~pneumodet.inference.inputs.find_dicom_files`).
        options: threshold, TTA, gating, batch size, precision, device, workers, compilation
            (:class:`~pneumodet.inference.options.PredictOptions`; default: its defaults).
        follow_symlinks: also follow symbolic links that lead out of an input folder.
        overlay_dir: when given, one PNG per predicted image with boxes, scores and class probabilities,
            named by :func:`~pneumodet.inference.outputs.overlay_filename`.
        labels: a labels CSV (``stage_2_train_labels.csv``): each overlay also shows its patient's
            ground-truth boxes (green); read and checked before the model is loaded; needs ``overlay_dir``.
        progress: ``True``: a bar on a terminal, a plain line every 30 s otherwise (in images); ``False``:
            nothing; or a style of :func:`pneumodet.progress.progress_style`.
        devices, num_nodes: predict in ``devices`` processes per node on ``num_nodes`` nodes, started as
            ``train --devices`` starts them (:mod:`pneumodet.inference.distributed`: the files are shared out
            by batch and merged in file order, so the result is the same for any number of processes). Only
            the first process returns the predictions and writes overlays; the others return a result
            without predictions (:func:`~pneumodet.launch.is_first_process` tells them apart).
        overrides: single fields of ``options`` replaced, e.g. ``predict(run, files, threshold=0.3)``.

    Returns:
        A :class:`PredictionResult` with one prediction per image (keyed by SOP Instance UID, see
        :class:`ImagePrediction`); unreadable files, duplicate images (a second file with the same SOP
        Instance UID, or the same file twice) and links not followed are listed there, never raised.

    Raises:
        ConfigError: an option no prediction can use (checked before the model is loaded).
        PneumodetError: no DICOM file was found, or none could be predicted (nothing to report).
    """
    options = PredictOptions.of(options, **overrides)
    check_processes(devices, num_nodes, check_options(options))
    if labels is not None and overlay_dir is None:
        raise ConfigError("labels are drawn on the overlays only: give an overlay folder (--overlays) too")
    truth = read_ground_truth(labels) if labels is not None else None  # a bad CSV fails before any work
    loaded = load_models(model_source)  # one model, or an ensemble (several, or a CV folder's folds)
    threshold = options.threshold
    ungated_threshold = False  # the gate asked for, but only a threshold for plain scores recorded
    if threshold is None:
        threshold, _ = loaded.threshold_for(options.gate)
        if threshold is None and options.gate:
            threshold, ungated_threshold = loaded.threshold, True
        if threshold is None:
            raise CheckpointError(
                "an ensemble of separate runs records no threshold; pass one (--threshold), or let "
                "`pneumodet predict` choose it on the runs' shared validation set" if loaded.is_ensemble else
                f"{display_path(loaded.sources[0])}: the checkpoint records no validation threshold; pass one "
                "explicitly (--threshold)")
        check_predict_options(threshold=threshold)
    image_size = loaded.image_size
    search = find_dicom_files(inputs, follow_symlinks=follow_symlinks)
    if not search.files:
        raise PneumodetError(_nothing_found(inputs, search))
    # every check above was made once, by this process alone: now the others start (devices * num_nodes > 1)
    processes = launch_processes(devices, num_nodes, resolve_device(options.device))
    if processes.world_size > 1:  # each process predicts on its own GPU (cuda:LOCAL_RANK), or on the CPU
        options = PredictOptions.of(options, device=str(processes.device))
    predictor = make_predictor(loaded.models, image_size, options, num_images=len(search.files),
                               sources=loaded.sources)  # where each run's int8 graph is

    result = PredictionResult({}, threshold, len(search.files), unreadable=list(search.missing),
                              skipped_links=list(search.skipped_links), tta=options.tta, gate=options.gate,
                              precision=predictor.precision, postprocess=dict(predictor.postprocess),
                              tta_merge=options.tta_merge if options.tta else None,
                              warnings=list(predictor.notes))  # an int8 graph passed over, and why
    if ungated_threshold:
        result.warnings.append(f"the run's threshold {threshold:.3f} was chosen on ungated scores (it was trained "
                               "before a threshold for gated scores was recorded); gating lowers every score, so "
                               "pass a threshold chosen with --gate (`pneumodet evaluate RUN --gate` chooses one "
                               "on validation and says it)")
    overlays = OverlayWriter(Path(overlay_dir), truth) if overlay_dir is not None else None
    if overlays is not None:
        overlays.folder.mkdir(parents=True, exist_ok=True)
        result.overlay_dir = overlays.folder

    try:
        files = processes.broadcast(search.files)  # the first process's list: every process shares out the same
        stream = DicomImageStream(processes.own_files(files, options.batch_size), image_size,
                                  keep_pixels=overlays is not None)
        loader = DataLoader(stream, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                            collate_fn=collate_items)
        computed = (_predict_batch(items, predictor, threshold, overlays) for items in loader)
        rounds = processes.in_file_order(computed, processes.rounds(len(files), options.batch_size))
        shown = progress if processes.first else False
        for number, outcomes in enumerate(track(rounds, len(files), "predict", progress=shown, sizes=len), 1):
            _merge(outcomes, result, overlays)
            if number % _TRIM_EVERY_BATCHES == 0:
                release_free_heap()
    finally:
        processes.close()
    result.compiled = predictor.compiled  # false if the compilation failed and eager took over
    if processes.first and not result.predictions:  # a run that predicted nothing must not look like a success
        raise PneumodetError(_nothing_predicted(result))
    return result


def _listing(items: Sequence[str], shown: int = 3) -> str:
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _nothing_found(inputs: Sequence[Path | str], search: FileSearch) -> str:
    parts = [f"no DICOM files (*.dcm) found in {', '.join(display_path(p) for p in inputs)}"]
    parts += [f"{display_path(u.path)}: {display_text(u.cause)}" for u in search.missing]
    if search.skipped_links:
        parts.append(f"{len(search.skipped_links)} symbolic link(s) leading out of the input folders were "
                     "not followed (follow_symlinks / --follow-symlinks)")
    return "; ".join(parts)


def _nothing_predicted(result: PredictionResult) -> str:
    causes = [f"{display_path(u.path)}: {display_text(u.cause)}" for u in result.unreadable]
    return (f"no image could be predicted from the {result.files_found} DICOM file(s) found ({len(causes)} "
            f"unreadable: {_listing(causes)}); nothing written")


#: Characters a printable patient id still cannot hold: it must stay one field of the submission CSV.
_CSV_BREAKING = frozenset(',"')


@dataclass(frozen=True)
class _PatientId:
    """A file's patient id, or why it has none usable (``problem``), and a warning about it, if any."""

    pid: str | None
    problem: str | None = None
    warning: str | None = None


def _patient_id(item: StreamItem) -> _PatientId:
    """The DICOM PatientID, else the file stem; no id (and the ``problem``) when unusable.

    Allowed: printable characters (no line breaks, no control characters, no undecodable bytes from a
    file name) except comma and double quote.
    """
    stem = item.path.stem
    pid = item.dicom_patient_id or stem
    if not pid.strip() or not pid.isprintable() or _CSV_BREAKING & set(pid):
        source = "DICOM PatientID" if item.dicom_patient_id else "file name (no PatientID in the file)"
        return _PatientId(None, f"patient id {pid!r} from the {source} cannot be a submission CSV field (comma, "
                                "quote, line break or unprintable character)")
    if item.dicom_patient_id and item.dicom_patient_id != stem:
        return _PatientId(pid, warning=f"{display_path(item.path)}: DICOM PatientID {item.dicom_patient_id!r} "
                                       "differs from the file name; using the PatientID")
    return _PatientId(pid)


@dataclass(frozen=True)
class _Outcome:
    """What the process that decoded one file learned about it, everything :func:`_merge` needs: why it
    failed (``error``), or its image's key and patient id, and, if it was predicted, its prediction and
    overlay (PNG bytes)."""

    path: Path
    error: str | None = None
    key: str = ""
    same: str = ""  # what makes a second file of this key the same image: "SOP Instance UID" or "file"
    patient: _PatientId | None = None
    prediction: ImagePrediction | None = None
    overlay: bytes | None = None


def _predict_batch(items: list[StreamItem], predictor: Predictor | EnsemblePredictor, threshold: float,
                   overlays: OverlayWriter | None) -> list[_Outcome]:
    """One outcome per item, in order. Predicted: every readable file with a usable patient id, except a
    second file of an image already in this batch (a duplicate whatever comes before). A file whose image
    an earlier batch holds is predicted too, and dropped by :func:`_merge`: which files a batch holds, and
    so what the network computes, must not depend on how the batches are shared out."""
    outcomes: list[_Outcome] = []
    chosen: dict[str, tuple[int, StreamItem, str]] = {}  # image key -> (its outcome's position, item, patient id)
    for item in items:
        if item.error is not None:
            outcomes.append(_Outcome(item.path, error=item.error))
            continue
        key = image_key(item.uids[0], item.path)
        patient = _patient_id(item)
        outcomes.append(_Outcome(item.path, key=key, same="SOP Instance UID" if item.uids[0] else "file",
                                 patient=patient))
        if patient.pid is not None and key not in chosen:
            chosen[key] = (len(outcomes) - 1, item, patient.pid)
    if not chosen:
        return outcomes
    raws = predictor(torch.stack([item.image for _, item, _ in chosen.values()]))
    for (position, item, pid), raw in zip(chosen.values(), raws, strict=True):
        pred = ImagePrediction(pid, raw.kaggle_rows(threshold, item.original_size, predictor.image_size),
                               raw.class_probs.numpy().astype(np.float32), item.path, item.original_size,
                               *item.uids)
        png = _overlay_png(overlays, item.pixels, pred) if overlays is not None and item.pixels is not None else None
        outcomes[position] = replace(outcomes[position], prediction=pred, overlay=png)
    return outcomes


def _overlay_png(overlays: OverlayWriter, pixels: np.ndarray, prediction: ImagePrediction) -> bytes:
    """The overlay of ``prediction`` as PNG bytes, drawn where the pixels are (any process); written by
    :func:`_merge` (the first process) if the image is kept."""
    truth = None if overlays.truth is None else overlays.truth.get(prediction.patient_id)
    buffer = io.BytesIO()
    draw_overlay(pixels, prediction, truth).save(buffer, format="PNG")
    return buffer.getvalue()


def _merge(outcomes: list[_Outcome], result: PredictionResult, overlays: OverlayWriter | None) -> None:
    """Add ``outcomes`` (files in file order, following every file merged before) to ``result``: the first
    file of an image is kept, a later one is a duplicate; files that failed, or whose patient id is
    unusable, are listed as unreadable."""
    for outcome in outcomes:
        if outcome.error is not None:
            result.unreadable.append(UnreadableInput(outcome.path, outcome.error))
            continue
        kept = result.predictions.get(outcome.key)
        if kept is not None:  # checked first: a second copy adds no warning of its own
            result.duplicates.append(DuplicateInput(kept.patient_id, outcome.path, kept.source, outcome.same))
            continue
        patient = outcome.patient
        if patient is None or patient.pid is None:
            result.unreadable.append(UnreadableInput(outcome.path, patient.problem if patient else "no patient id"))
            continue
        if patient.warning:
            result.warnings.append(patient.warning)
        if outcome.prediction is None:  # _predict_batch predicts the first usable file of a key in a batch
            raise RuntimeError(f"{display_path(outcome.path)}: a new image without its prediction (a bug)")
        result.predictions[outcome.key] = outcome.prediction
        if overlays is not None and outcome.overlay is not None:
            write_bytes(overlays.folder / overlay_filename(outcome.prediction), outcome.overlay)
