"""``predict``: boxes and class probabilities for every DICOM under some inputs, streamed.

Files are found (:func:`~pneumodet.inference.inputs.find_dicom_files`), decoded and resized one by one in
a :class:`~torch.utils.data.DataLoader`, batched, run through the :class:`~pneumodet.inference.engine.Predictor`,
and the boxes are mapped back to each image's original pixels. Only one batch of images is ever in
memory; per image only its few boxes and class probabilities are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumodet.errors import CheckpointError, ConfigError, PneumodetError
from pneumodet.hardware import release_free_heap
from pneumodet.inference.engine import Predictor, check_options, load_for_inference, model_image_size
from pneumodet.inference.inputs import (
    DicomImageStream,
    FileSearch,
    StreamItem,
    collate_items,
    find_dicom_files,
)
from pneumodet.inference.options import PredictOptions, check_predict_options
from pneumodet.inference.outputs import OverlayWriter
from pneumodet.inference.results import (
    DuplicateInput,
    ImagePrediction,
    PredictionResult,
    UnreadableInput,
    image_key,
)
from pneumodet.progress import track
from pneumodet.submission import read_ground_truth
from pneumodet.textsafe import display_path, display_text

#: How often a streaming prediction returns freed heap pages to the system (see release_free_heap).
_TRIM_EVERY_BATCHES = 16


def predict(
    model_source: Path | str,
    inputs: Sequence[Path | str],
    options: PredictOptions | None = None,
    *,
    follow_symlinks: bool = False,
    overlay_dir: Path | str | None = None,
    labels: Path | str | None = None,
    progress: bool | str = True,
    **overrides: Any,
) -> PredictionResult:
    """Predict boxes and class probabilities for every DICOM under ``inputs``.

    Args:
        model_source: a training run directory (its best model is used) or a checkpoint file.
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
    check_options(options)
    if labels is not None and overlay_dir is None:
        raise ConfigError("labels are drawn on the overlays only: give an overlay folder (--overlays) too")
    truth = read_ground_truth(labels) if labels is not None else None  # a bad CSV fails before any work
    model, extra = load_for_inference(model_source)
    threshold = options.threshold
    if threshold is None:
        if "threshold" not in extra:
            raise CheckpointError(f"{display_path(model_source)}: the checkpoint records no validation "
                                  "threshold; pass one explicitly (--threshold)")
        threshold = float(extra["threshold"])
        check_predict_options(threshold=threshold)
    image_size = model_image_size(model)
    search = find_dicom_files(inputs, follow_symlinks=follow_symlinks)
    if not search.files:
        raise PneumodetError(_nothing_found(inputs, search))
    predictor = Predictor.from_options(model, image_size, options, num_images=len(search.files))

    result = PredictionResult({}, threshold, len(search.files), unreadable=list(search.missing),
                              skipped_links=list(search.skipped_links), tta=options.tta, gate=options.gate,
                              precision=predictor.precision)
    if options.gate and options.threshold is None:
        result.warnings.append(f"the run's threshold {threshold:.3f} was chosen on ungated scores; gating "
                               "lowers every score, so a threshold chosen with --gate may suit better")
    overlays = OverlayWriter(Path(overlay_dir), truth) if overlay_dir is not None else None
    if overlays is not None:
        overlays.folder.mkdir(parents=True, exist_ok=True)
        result.overlay_dir = overlays.folder

    stream = DicomImageStream(search.files, image_size, keep_pixels=overlays is not None)
    loader = DataLoader(stream, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                        collate_fn=collate_items)
    batches = track(loader, len(search.files), "predict", progress=progress, sizes=len)
    for number, items in enumerate(batches, 1):
        _predict_batch(items, predictor, result, overlays)
        if number % _TRIM_EVERY_BATCHES == 0:
            release_free_heap()
    result.compiled = predictor.compiled  # false if the compilation failed and eager took over
    if not result.predictions:  # a run that predicted nothing must not look like a success
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


def _patient_id(item: StreamItem, result: PredictionResult) -> str | None:
    """The DICOM PatientID, else the file stem; ``None`` (and the file listed) when unusable.

    Allowed: printable characters (no line breaks, no control characters, no undecodable bytes from a
    file name) except comma and double quote.
    """
    stem = item.path.stem
    pid = item.dicom_patient_id or stem
    if not pid.strip() or not pid.isprintable() or _CSV_BREAKING & set(pid):
        source = "DICOM PatientID" if item.dicom_patient_id else "file name (no PatientID in the file)"
        result.unreadable.append(UnreadableInput(
            item.path, f"patient id {pid!r} from the {source} cannot be a submission CSV field (comma, "
                       "quote, line break or unprintable character)"))
        return None
    if item.dicom_patient_id and item.dicom_patient_id != stem:
        result.warnings.append(f"{display_path(item.path)}: DICOM PatientID {item.dicom_patient_id!r} "
                               f"differs from the file name; using the PatientID")
    return pid


def _predict_batch(items: list[StreamItem], predictor: Predictor, result: PredictionResult,
                   overlays: OverlayWriter | None) -> None:
    good: dict[str, tuple[str, StreamItem]] = {}  # image key -> (patient id, item), in file order
    for item in items:
        if item.error is not None:
            result.unreadable.append(UnreadableInput(item.path, item.error))
            continue
        key = image_key(item.uids[0], item.path)
        first = result.predictions[key].source if key in result.predictions else (
            good[key][1].path if key in good else None)
        if first is not None:  # checked first: a second copy adds no warning of its own
            same = "SOP Instance UID" if item.uids[0] else "file"
            pid = result.predictions[key].patient_id if key in result.predictions else good[key][0]
            result.duplicates.append(DuplicateInput(pid, item.path, first, same))
            continue
        pid = _patient_id(item, result)
        if pid is None:
            continue
        good[key] = (pid, item)
    if not good:
        return
    raws = predictor(torch.stack([item.image for _, item in good.values()]))
    for (key, (pid, item)), raw in zip(good.items(), raws, strict=True):
        pred = ImagePrediction(pid, raw.kaggle_rows(result.threshold, item.original_size, predictor.image_size),
                               raw.class_probs.numpy().astype(np.float32), item.path, item.original_size,
                               *item.uids)
        result.predictions[key] = pred
        if overlays is not None and item.pixels is not None:
            overlays.write(item.pixels, pred)
