"""The ``pneumodet`` command: parse arguments, call the library, print.

Every subcommand is one ``_add_<name>`` function (its arguments) and one ``_run_<name>`` function
(its work). Library imports happen inside ``_run_*`` so that ``--help`` stays instant.
A :class:`~pneumodet.errors.PneumodetError` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from pneumodet import __version__, rundir
from pneumodet.config import RECIPES, TrainConfig
from pneumodet.data.levels import LEVELS as AUGMENTATION_LEVELS
from pneumodet.errors import PneumodetError
from pneumodet.hardware import PREDICTION_PRECISIONS
from pneumodet.inference.options import DEVICE_CHOICES, TTA_CHOICES, TTA_MERGES, PredictOptions
from pneumodet.model.config import ModelConfig
from pneumodet.textsafe import display_path, display_text


def _add_data_source(p: argparse.ArgumentParser) -> None:
    """The Kaggle-layout folder and the overrides for each of its parts."""
    p.add_argument("data_dir", type=Path, help="folder laid out as the Kaggle download")
    p.add_argument("--labels", type=Path, help="labels CSV (default: DATA_DIR/stage_2_train_labels.csv)")
    p.add_argument("--classes", type=Path, help="class CSV (default: DATA_DIR/stage_2_detailed_class_info.csv)")
    p.add_argument("--images", type=Path, help="DICOM folder (default: DATA_DIR/stage_2_train_images)")
    p.add_argument("--strict", action="store_true", help="make any label problem fatal")


def _load_records(args: argparse.Namespace):
    from pneumodet.data.rsna import load_rsna

    data = load_rsna(args.data_dir, labels=args.labels, classes=args.classes, images=args.images,
                     strict=args.strict)
    print(data.report.summary(), file=sys.stderr)
    return data


# ---------------------------------------------------------------- synth
def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="where to write the Kaggle-layout dataset")
    p.add_argument("--patients", type=int, default=200, help="number of patients (default 200)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024, as RSNA)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
    p.add_argument("--test-patients", type=int, metavar="N",
                   help="unlabelled patients in stage_2_test_images/, listed in stage_2_sample_submission.csv as "
                        "Kaggle's test set (default: 11%% of --patients, Kaggle's 3000 per 26684; 0: none)")


def _run_synth(args: argparse.Namespace) -> None:
    from pneumodet.data.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(args.out_dir, patients=args.patients, size=args.size, seed=args.seed,
                                     overwrite=args.overwrite, progress=True, test_patients=args.test_patients)
    print(summary)


# ---------------------------------------------------------------- split
def _add_split(p: argparse.ArgumentParser) -> None:
    _add_data_source(p)
    p.add_argument("--out", type=Path, required=True, help="split folder (train/val/test.csv, split.json)")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction of patients (default 0.1)")
    p.add_argument("--test", type=float, default=0.1, help="test fraction of patients (default 0.1)")
    p.add_argument("--samples", type=int, help="first draw N patients (stratified) for sample-size studies")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--labels-only", action="store_true",
                   help="split every labelled patient, not only those whose image is present")


def _run_split(args: argparse.Namespace) -> None:
    from pneumodet.data.split import split_patients, write_split

    data = _load_records(args)
    split = split_patients(data.records, val=args.val, test=args.test, samples=args.samples,
                           seed=args.seed, labels_only=args.labels_only)
    write_split(split, args.out, source=str(args.data_dir))
    print(split.summary())
    print(f"wrote {display_path(args.out)}")
    warning = split.positives_warning()
    if warning:  # written all the same: a labels-only study may want it; train says it again
        print(f"pneumodet split: warning: {warning}", file=sys.stderr)


# ---------------------------------------------------------------- cache
def _add_cache(p: argparse.ArgumentParser) -> None:
    _add_data_source(p)
    p.add_argument("--size", type=int, default=512, help="cached image side in pixels (default 512)")
    p.add_argument("--out", type=Path, help="cache folder (default DATA_DIR/cache_<size>)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: all cores)")


def _run_cache(args: argparse.Namespace) -> None:
    from pneumodet.data.cache import build_cache, default_cache_dir

    data = _load_records(args)
    out = args.out or default_cache_dir(args.data_dir, args.size)
    report = build_cache(data.records, out, size=args.size, workers=args.workers or None, progress=True)
    print(report.summary())


# ---------------------------------------------------------------- score
def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission", type=Path, help="submission CSV (patientId,PredictionString)")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV (e.g. stage_2_train_labels.csv)")
    p.add_argument("--classes", type=Path,
                   help="class CSV checked with the labels (default: the Kaggle one beside --labels, if any)")
    p.add_argument("--all", action="store_true",
                   help="also score labelled patients missing from the submission (as no prediction)")
    p.add_argument("--json", type=Path, help="also write the result (with per-image scores) as JSON")


def _run_score(args: argparse.Namespace) -> None:
    from pneumodet.safeio import write_json
    from pneumodet.submission import score_submission

    result = score_submission(args.submission, args.labels, classes_csv=args.classes, all_patients=args.all)
    print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict(), indent=1)
        print(f"wrote {display_path(args.json)}")


# ---------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help=f"training run directory (uses its {rundir.BEST_MODEL}) or a checkpoint")
    p.add_argument("inputs", type=Path, nargs="+", help="DICOM files or folders (searched recursively for *.dcm)")
    p.add_argument("--out", type=Path, required=True,
                   help="Kaggle submission CSV to write: one row per patient; a patient with several images "
                        "(several studies, series) gets the boxes of its image with the highest box score "
                        "(ties: the higher Lung Opacity probability, then the first file), as the RSNA metric "
                        "scores one image per patient; --json and --overlays keep every image")
    _add_prediction_options(p)
    _add_ensemble_option(p)
    p.add_argument("--overlays", type=Path,
                   help="folder for one PNG per image with boxes and probabilities, named <patient id, "
                        "sanitised, at most 40 characters>_<hash of the SOP Instance UID>.png")
    p.add_argument("--labels", type=Path,
                   help="labels CSV (e.g. stage_2_train_labels.csv): the overlays also draw each patient's "
                        "ground-truth boxes, in green (needs --overlays)")
    p.add_argument("--json", type=Path,
                   help="JSON file with one entry per image: patient id, study/series/SOP instance UIDs, "
                        "file, boxes, scores, class probabilities, overlay name, whether it makes the "
                        "submission row")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow symbolic links that lead out of an input folder")
    p.add_argument("--dicom-out", type=Path, metavar="DIR",
                   help="folder for one DICOM SR (TID 1500 measurement report: boxes in the image's own pixels, "
                        "scores, class probabilities) and one grayscale presentation state (boxes drawn) per "
                        "image, linked to it by its UIDs: <overlay name>_sr.dcm / _pr.dcm")
    _add_dicom_out_options(p)
    p.add_argument("--devices", type=int, default=1,
                   help="processes per node (default 1); > 1 shares the files out by batch, started as "
                        "`train --devices` starts them (gloo on the CPU; one GPU each with --device cuda): "
                        "the outputs are the same as with one process, written by the first")
    p.add_argument("--num-nodes", type=int, default=1,
                   help="nodes (default 1): run the command on each, with NODE_RANK, MASTER_ADDR and "
                        "MASTER_PORT set, or under SLURM or torchrun")


def _run_predict(args: argparse.Namespace) -> None:
    from pneumodet.clinical.identity import check_uid_root
    from pneumodet.inference import predict, write_prediction_json, write_prediction_submission
    from pneumodet.launch import is_first_process

    check_uid_root(args.uid_root)  # before any work
    models, options = _ensemble_models(args), _prediction_options(args)
    if args.dicom_out and (len(models) > 1 or rundir.CvDir(args.model).is_cv()):
        from pneumodet.errors import ConfigError

        raise ConfigError("--dicom-out names one algorithm (its checkpoint's SHA-256) in each SR; it is not "
                          "available for an ensemble")
    if len(models) > 1 and options.threshold is None:  # separate runs: their threshold is chosen here
        from dataclasses import replace

        from pneumodet.evaluation import validation_threshold

        # every process of `--devices N` chooses the same threshold (the same data, deterministically); the
        # first one says so
        threshold, source = validation_threshold(models, options)
        if is_first_process():
            print(f"ensemble of {len(models)} sources: threshold {threshold:.3f}, {display_text(source)}",
                  file=sys.stderr)
        options = replace(options, threshold=threshold)
    result = predict(models if len(models) > 1 else args.model, args.inputs, options,
                     follow_symlinks=args.follow_symlinks, overlay_dir=args.overlays, labels=args.labels,
                     progress=True, devices=args.devices, num_nodes=args.num_nodes)
    if args.devices * args.num_nodes > 1 and not is_first_process():
        return  # the first process merged every share: it reports and writes
    print(result.summary())
    rows = len(result.submission_rows())
    submission = write_prediction_submission(result, args.out)
    print(f"wrote submission {display_path(submission)} ({rows} patient row(s))")
    if args.json:
        print(f"wrote {display_path(write_prediction_json(result, args.json))}")
    if args.overlays:
        print(f"wrote {len(result.predictions)} overlays to {display_path(args.overlays)}")
    if args.dicom_out:
        from pneumodet.clinical.sr import write_dicom_results

        print(write_dicom_results(result, args.dicom_out, args.model,
                                  patient_details=args.dicom_patient_details, uid_root=args.uid_root).summary())


# ---------------------------------------------------------------- pacs
def _add_prediction_options(p: argparse.ArgumentParser, *, threshold: bool = True) -> None:
    """The fields of :class:`~pneumodet.inference.options.PredictOptions`, with its defaults, for every command
    that predicts (``predict``, ``evaluate``, ``pacs``); ``evaluate`` takes no threshold (it scores the run's)."""
    default = PredictOptions()
    if threshold:
        p.add_argument("--threshold", type=float,
                       help="confidence threshold from 0 to 1 (default: the run's validation choice)")
    p.add_argument("--tta", choices=TTA_CHOICES, help="test-time augmentation: also predict the mirrored image")
    p.add_argument("--tta-merge", choices=TTA_MERGES, default=default.tta_merge,
                   help=f"how TTA views are merged: wbf (weighted box fusion) or nms (default {default.tta_merge})")
    p.add_argument("--gate", action="store_true",
                   help="multiply box scores by the global Lung-Opacity probability before thresholding")
    p.add_argument("--batch-size", type=int, default=default.batch_size,
                   help=f"images per forward pass (default {default.batch_size})")
    p.add_argument("--precision", choices=("auto", *PREDICTION_PRECISIONS), default=default.precision,
                   help="int8: the run's int8 graph (made by `pneumodet quantize RUN`) in ONNX Runtime, CPU only; "
                        "bf16 (autocast) or fp32; auto (the default): on the CPU int8 where the run holds a current "
                        "int8 graph whose validation mAP was within 0.01 of the float network's and onnxruntime is "
                        "installed (measured 1.7-1.8x bf16's speed), otherwise bf16 where the hardware computes it "
                        "natively, else fp32")
    p.add_argument("--device", default=default.device,
                   help=f"{DEVICE_CHOICES}; auto: the GPU when this machine has one, else the CPU "
                        f"(default {default.device})")
    p.add_argument("--workers", type=int, default=default.workers,
                   help=f"data-loading processes: DICOM decoding (predict, pacs), cache reading (evaluate) "
                        f"(default {default.workers}: in this process)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=default.compile,
                   help="torch.compile the network with frozen weights: seconds of compilation per batch shape, "
                        "then ~1.4x faster batches (default: on for CPU jobs from 500 images where a C++ compiler exists)")
    _add_postprocess_options(p, "")


def _add_postprocess_options(p: argparse.ArgumentParser, where: str) -> None:
    """``--nms-iou``, ``--max-det``, ``--min-score`` (default: the model's own, recorded in its checkpoint);
    ``where`` says where a command puts them (export: the side file and the graph)."""
    p.add_argument("--nms-iou", type=float, metavar="IOU",
                   help="non-maximum suppression: drop a box overlapping a better one of its image by more than "
                        f"this IoU, above 0 up to 1{where} (default: the model's, recorded in the checkpoint)")
    p.add_argument("--max-det", dest="max_detections", type=int, metavar="N",
                   help=f"boxes kept per image after NMS, 1 to 10000{where} (default: the model's)")
    p.add_argument("--min-score", type=float, metavar="SCORE",
                   help=f"candidate boxes must score above this before NMS, 0 up to 1{where} (default: the "
                        "model's score_thresh)")


def _prediction_options(args: argparse.Namespace) -> PredictOptions:
    """The :class:`~pneumodet.inference.options.PredictOptions` given by :func:`_add_prediction_options`' options."""
    return PredictOptions(**{f.name: getattr(args, f.name) for f in fields(PredictOptions) if hasattr(args, f.name)})


def _add_ensemble_option(p: argparse.ArgumentParser) -> None:
    """``--ensemble``: further models fused with the first (``predict``, ``evaluate``)."""
    p.add_argument("--ensemble", type=Path, action="append", default=[], metavar="RUN",
                   help="also fuse this run's model with the first one's (repeat for more): boxes by weighted box "
                        "fusion, class probabilities averaged; a cross-validation folder (`pneumodet cv`) given as "
                        "the model is the ensemble of its folds; the threshold, unless given, is chosen for the "
                        "ensemble on validation (a CV folder's: its out-of-fold one)")


def _ensemble_models(args: argparse.Namespace) -> list[Path]:
    """The first model (``model`` or ``run_dir``) and those of ``--ensemble``."""
    return [getattr(args, "model", None) or args.run_dir, *args.ensemble]


def _add_dicom_out_options(p: argparse.ArgumentParser) -> None:
    """How the DICOM SR and presentation state of each image are made (``predict --dicom-out``, ``pacs``)."""
    p.add_argument("--dicom-patient-details", action="store_true",
                   help="also copy the patient's name, birth date and sex and the study's date, time, "
                        "accession number, ID and referring physician from each source image into its SR and "
                        "PR (default: only what links a result to its image: PatientID and the "
                        "Study/Series/SOP Instance UIDs)")
    p.add_argument("--uid-root", metavar="ROOT",
                   help="your organisation's registered UID root for the new SR/PR UIDs (default 2.25: "
                        "UUID-derived UIDs, unique without registration)")


def _add_pacs(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path,
                   help=f"training run directory (uses its {rundir.BEST_MODEL}) or a checkpoint")
    p.add_argument("--url", required=True,
                   help="DICOMweb base URL, e.g. http://pacs.example.org:8042/dicom-web (never with "
                        "credentials in it)")
    p.add_argument("--study", action="append", default=[], metavar="UID",
                   help="a Study Instance UID to fetch (repeat for several)")
    p.add_argument("--series", action="append", default=[], metavar="UID",
                   help="a Series Instance UID to fetch (repeat for several)")
    p.add_argument("--modality", metavar="LIST",
                   help="comma-separated modalities, e.g. CR,DX: without --study/--series, search the "
                        "studies holding them (with --date-from/--date-to); always, predict only images of "
                        "these modalities (default CR,DX); everything else is skipped and listed")
    p.add_argument("--date-from", metavar="YYYY-MM-DD", help="search studies from this study date")
    p.add_argument("--date-to", metavar="YYYY-MM-DD", help="search studies up to this study date")
    p.add_argument("--auth-env", metavar="VAR",
                   help="environment variable holding 'Bearer <token>' or 'Basic <user>:<password>' "
                        "(default: $PNEUMODET_DICOMWEB_AUTH when set; credentials are never taken from the "
                        "command line)")
    p.add_argument("--auth-file", type=Path, metavar="FILE",
                   help="file whose first line is 'Bearer <token>' or 'Basic <user>:<password>' (chmod 600)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to connect and to wait for each answer (default 30)")
    p.add_argument("--retries", type=int, default=3,
                   help="further attempts after a transient failure (no connection, timeout, 429/5xx), "
                        "waiting 1, 2, 4... s between them (default 3)")
    _add_prediction_options(p)
    _add_dicom_out_options(p)
    p.add_argument("--chunk", type=int, default=256,
                   help="images fetched, predicted and stored per round (default 256: bounded disk, memory)")
    p.add_argument("--stow-batch", type=int, default=16,
                   help="instances per STOW-RS request (default 16: 8 images' SR and PR)")
    p.add_argument("--json", type=Path,
                   help="JSON file with every instance found and what became of it: skipped, fetched, "
                        "predicted, the UIDs of its SR and PR and whether the server stored them")
    p.add_argument("--dicom-out", type=Path, metavar="DIR", help="also keep a copy of every SR and PR in DIR")


def _run_pacs(args: argparse.Namespace) -> None:
    from pneumodet.clinical.dicomweb import DicomWebServer, PacsError, read_credentials
    from pneumodet.clinical.identity import check_uid_root
    from pneumodet.clinical.pacs import PacsQuery, parse_date, run_pacs
    from pneumodet.safeio import write_json

    query = PacsQuery(studies=tuple(args.study), series=tuple(args.series),
                      modalities=tuple(_csv(args.modality.upper())) if args.modality else (),
                      date_from=parse_date(args.date_from, "--date-from"),
                      date_to=parse_date(args.date_to, "--date-to"))
    check_uid_root(args.uid_root)
    credentials, warnings = read_credentials(env=args.auth_env, file=args.auth_file)
    for warning in warnings:
        print(f"pneumodet pacs: warning: {warning}", file=sys.stderr)
    server = DicomWebServer(args.url, credentials=credentials, timeout=args.timeout, retries=args.retries)
    summary = run_pacs(args.model, server, query, options=_prediction_options(args), chunk=args.chunk,
                       stow_batch=args.stow_batch, patient_details=args.dicom_patient_details,
                       uid_root=args.uid_root, dicom_out=args.dicom_out,
                       progress="bar" if sys.stderr.isatty() else "lines")
    print(summary.render())
    if args.json:
        print(f"wrote {display_path(write_json(args.json, summary.to_json(), indent=1))}")
    if summary.interrupted:
        raise KeyboardInterrupt  # reported above; ends as any interrupted command (exit 130)
    if summary.error:
        raise PacsError(summary.error)


# ---------------------------------------------------------------- export
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help=f"training run directory (uses its {rundir.BEST_MODEL}) or a checkpoint")
    p.add_argument("--onnx", type=Path, required=True, help="ONNX file to write (a .json side file goes next to it)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the training size)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset: 18 and newer through the dynamo exporter, 11 to 17 (older runtimes) through "
                        "the TorchScript exporter; the newest is onnxscript's (default 18)")
    p.add_argument("--with-postprocess", action="store_true",
                   help="put decoding and NMS into the graph: outputs boxes, scores, num_detections, class_probs "
                        "(opset 18 or newer; docs/ONNX.md)")
    _add_postprocess_options(p, "; recorded in the side file, fixed in the graph with --with-postprocess")


def _run_export(args: argparse.Namespace) -> None:
    from pneumodet.inference import export_onnx

    print(export_onnx(args.model, args.onnx, image_size=args.image_size, opset=args.opset,
                      postprocess=args.with_postprocess, min_score=args.min_score, nms_iou=args.nms_iou,
                      max_detections=args.max_detections).summary())


# ---------------------------------------------------------------- quantize
def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="finished training run folder (its best model is quantised)")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training images (from the run's image cache, built if missing) whose activation ranges "
                        "set the int8 scales (default 256; all of them if the run has fewer)")
    p.add_argument("--verbose", action="store_true",
                   help="also show ONNX Runtime's own messages (its advice, notes and warnings)")


def _run_quantize(args: argparse.Namespace) -> None:
    from pneumodet.quantization import quantize_run

    done = quantize_run(args.run_dir, calibration=args.calibration, verbose=args.verbose, progress=True,
                        say=lambda line: print(f"{display_text(line)} ...", file=sys.stderr, flush=True))
    print(done.summary())


# ---------------------------------------------------------------- serve
def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help=f"training run directory (uses its {rundir.BEST_MODEL}) or a checkpoint")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network: set a token in $PNEUMODET_SERVE_TOKEN, which every /v1 request must then send "
                        "as 'Authorization: Bearer TOKEN')")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free port, printed)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, or auto: the GPU when this machine has one, else the CPU (default auto)")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="default: bf16 where the hardware computes it natively, else fp32")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most images the model runs at once, gathered from concurrent requests (default 8; "
                        "1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first waiting image waits for others to fill its batch (default 10)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most images waiting for the model, and most prediction requests in progress; beyond, "
                        "503 with Retry-After (default 64)")
    p.add_argument("--max-files", type=int, default=16, help="most files per request (default 16; beyond: 413)")
    p.add_argument("--max-upload-mb", type=float, default=64.0,
                   help="largest request body in MiB (default 64; beyond: 413)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to answer a request, upload included (default 60; beyond: 504)")
    p.add_argument("--log-ids", choices=["plain", "hash", "none"], default="plain",
                   help="how the log names each predicted image: its PatientID and SOP Instance UID (plain, "
                        "default), keyed hashes of them (hash), or not at all (none); nothing else from an "
                        "image ever reaches the log")


def _run_serve(args: argparse.Namespace) -> None:
    import os

    from pneumodet.serve.app import TOKEN_ENV, ServeSettings
    from pneumodet.serve.limits import MIB, Limits
    from pneumodet.serve.server import serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * MIB), max_files=args.max_files,
                    timeout_s=args.timeout, max_queue=args.max_queue)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits,
                             token=os.environ.get(TOKEN_ENV) or None, log_ids=args.log_ids)
    summary = serve(args.model, host=args.host, port=args.port, device=args.device, precision=args.precision,
                    settings=settings, announce=lambda line: print(line, flush=True))
    print(summary, flush=True)


# ---------------------------------------------------------------- eda
def _add_eda(p: argparse.ArgumentParser) -> None:
    _add_data_source(p)
    p.add_argument("--out", type=Path, required=True, help="report folder (report.html, summary.json, CSVs)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the sample images (default 0)")
    p.add_argument("--max-images", type=int, default=5000,
                   help="read at most N DICOM headers, a seeded subset (default 5000; 0: all)")
    p.add_argument("--samples", type=int, default=4, help="sample images per class (default 4)")
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (default: all cores)")


def _run_eda(args: argparse.Namespace) -> None:
    from pneumodet.reports.eda import build_eda_report

    summary = build_eda_report(args.data_dir, args.out, labels=args.labels, classes=args.classes,
                               images=args.images, strict=args.strict, seed=args.seed,
                               max_images=args.max_images or None,
                               samples_per_class=args.samples, workers=args.workers or None,
                               progress=True)
    print(f"{summary['patients']:,} patients, {summary['label_rows']:,} label rows, {summary['boxes']:,} boxes; "
          f"images found {summary['images_found']:,}, missing {summary['images_missing']:,}; "
          f"{summary['label_problems']} label problem(s), {summary['images_unreadable']} unreadable image(s), "
          f"{summary['images_constant']} constant of {summary['images_decoded']} sample image(s)")
    print(f"wrote {display_path(args.out / 'report.html')}")


# ---------------------------------------------------------------- train
ENCODER_HELP = ("encoder: resnet50, se_resnext50 (timm seresnext50_32x4d), legacy_se_resnext50 (Cadene-"
                "compatible), pnasnet5 (timm pnasnet5large), or any other timm model name with feature support")


def _add_training_options(p: argparse.ArgumentParser, *, level: bool = True) -> None:
    """Options shared by ``train``, ``cv`` and ``grid``; unset options keep the recipe's or config's value. The
    defaults shown are the config's own (:class:`~pneumodet.config.TrainConfig`, its ``model``). ``level``:
    offer ``--aug`` (``grid`` has its own list, ``--augs``, which sets every run's level)."""
    train, model = TrainConfig(), ModelConfig()
    p.add_argument("--data", type=Path, help="Kaggle-layout data folder")
    if level:
        p.add_argument("--aug", help=f"augmentation level: {', '.join(AUGMENTATION_LEVELS)} (default {train.aug})")
    p.add_argument("--epochs", type=int, help=f"epochs (default {train.epochs})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {train.batch_size})")
    p.add_argument("--image-size", type=int, help=f"training image side in pixels (default {model.image_size})")
    p.add_argument("--cache-dir", type=Path, help="image cache folder (default DATA/cache_<size>)")
    recipes = "; ".join(f"{name}: {r['optimizer']} {r['lr']:g}, {r['scheduler']} schedule, clip {r['grad_clip']:g}, "
                        f"warm-up >= {r['warmup_steps']} steps, loss / {r['loss_normalizer']} positives"
                        + "".join(f", {k.replace('_', ' ')} {v:g}" for k, v in r.get("model", {}).items())
                        for name, r in RECIPES.items())
    p.add_argument("--recipe", help=f"optimisation recipe (default {train.recipe}) — {recipes}")
    p.add_argument("--lr", type=float, help="learning rate (overrides the recipe)")
    p.add_argument("--precision", help=f"{train.precision} (bf16-mixed where the hardware has bf16, else 32-true; "
                                       "the default), bf16-mixed, 16-mixed, 32-true")
    p.add_argument("--devices", type=int, help=f"devices (processes) per node; > 1 runs DDP (default {train.devices})")
    p.add_argument("--num-nodes", type=int, help=f"nodes for DDP (default {train.num_nodes})")
    p.add_argument("--accelerator", help=f"auto, cpu or gpu (default {train.accelerator})")
    p.add_argument("--num-workers", type=int, help=f"data-loading processes (default {train.num_workers})")
    p.add_argument("--seed", type=int, help=f"random seed (default {train.seed})")
    p.add_argument("--weights", type=str, help="local encoder weights file (.pth/.safetensors) for offline use")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="ImageNet weights through timm (needs a network)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    p.add_argument("--checkpoint-every", dest="checkpoint_every_n_steps", type=int,
                   help=f"also write the resumable checkpoint every K optimiser steps "
                        f"(default {train.checkpoint_every_n_steps}; 0: at epoch ends only)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (default: no limit)")
    p.add_argument("--config", type=Path, help=f"a {rundir.CONFIG} to start from (a run's own reproduces it)")
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' own messages (Lightning's hardware lines, tips, notes, warnings)")


_OPTION_FIELDS = {"data": "data_dir", "aug": "aug", "epochs": "epochs", "batch_size": "batch_size",
                  "image_size": "image_size", "cache_dir": "cache_dir", "lr": "lr", "precision": "precision",
                  "devices": "devices", "num_nodes": "num_nodes", "accelerator": "accelerator",
                  "num_workers": "num_workers", "seed": "seed", "weights": "weights", "pretrained": "pretrained",
                  "compile": "compile", "checkpoint_every_n_steps": "checkpoint_every_n_steps",
                  "max_steps": "max_steps", "encoder": "encoder", "split": "split_dir", "out": "out_dir"}


def _given_options(args: argparse.Namespace) -> dict:
    """The training options set on the command line, as config fields (paths as strings)."""
    given = {field: getattr(args, option) for option, field in _OPTION_FIELDS.items()
             if getattr(args, option, None) is not None}
    return {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}


def _train_config(args: argparse.Namespace):
    """Recipe defaults, then ``--config FILE``'s values, then the options given on the command line."""
    from pneumodet.config import TrainConfig

    base = TrainConfig.from_yaml(args.config).to_dict() if args.config else {}
    base.pop("split_fingerprint", None)  # a new run records its own
    return TrainConfig.layered(recipe=args.recipe, base=base, overrides=_given_options(args))


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", type=Path, help="split folder written by `pneumodet split`")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--encoder", help=f"{ENCODER_HELP} (default {ModelConfig().encoder})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_training_options(p)


def _run_train(args: argparse.Namespace) -> None:
    from pneumodet.config import TrainConfig
    from pneumodet.errors import ConfigError
    from pneumodet.reports.runs import write_run_report
    from pneumodet.rundir import RunDir
    from pneumodet.training import prepare_run, train

    run = RunDir(args.out)
    if args.resume:
        if args.config or args.recipe:
            raise ConfigError("--config and --recipe start a new run; --resume continues the one in --out")
        if not run.is_run():
            raise ConfigError(f"{args.out}: no run to resume ({run.config.name} not found)")
        config = TrainConfig.from_dict({**TrainConfig.from_yaml(run.config, stored_run=True).to_dict(), **_given_options(args)})
        _, notes = prepare_run(config, resume=True)
        for note in notes:
            print(f"resuming with {display_text(note)}", file=sys.stderr)
    else:
        config = _train_config(args)
        if not config.data_dir or not config.split_dir:
            raise ConfigError("--data and --split are required (or --config with data_dir and split_dir)")
    result = train(config, resume=args.resume, verbose=args.verbose)
    print(result.summary())
    if run.has_model():
        print(f"report: {display_path(write_run_report(run.root))}")


# ---------------------------------------------------------------- grid / compare / evaluate
def _add_grid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoders", default="resnet50", help="comma-separated encoders; " + ENCODER_HELP)
    p.add_argument("--augs", default="heavy",
                   help=f"comma-separated augmentation levels: {', '.join(AUGMENTATION_LEVELS)} (default heavy)")
    p.add_argument("--samples", default="", help="comma-separated patient sample sizes (default: all patients)")
    p.add_argument("--out", type=Path, required=True, help="grid folder")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction per split (default 0.1)")
    p.add_argument("--test", type=float, default=0.1, help="test fraction per split (default 0.1)")
    _add_training_options(p, level=False)  # each run's level comes from --augs: one option, not two


def _run_grid(args: argparse.Namespace) -> None:
    from pneumodet.errors import ConfigError
    from pneumodet.experiments import run_grid

    config = _train_config(args)
    if not config.data_dir:
        raise ConfigError("--data is required (or --config with data_dir)")
    try:
        samples = [int(s) for s in args.samples.split(",") if s.strip()] or [None]
    except ValueError:
        raise ConfigError(f"--samples takes comma-separated whole numbers, got {args.samples!r}") from None
    result = run_grid(config, args.out, encoders=_csv(args.encoders), augs=_csv(args.augs), samples=samples,
                      val=args.val, test=args.test, verbose=args.verbose)
    print(result.summary())
    print(f"summary: {display_path(args.out / 'summary.csv')}")


def _add_cv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, help="number of folds, at least 2 (default 5; a folder run again: its own)")
    p.add_argument("--split", type=Path,
                   help="split folder (`pneumodet split`): its test patients stay held out, its train+val patients "
                        "are divided into the folds (stratified as split stratifies)")
    p.add_argument("--out", type=Path, required=True,
                   help="cross-validation folder: fold<k>/ runs, splits/, cv.json and summary.csv; run again to "
                        "resume (finished folds are skipped; `cv --out CV` alone reuses its data, split, folds "
                        "and training options)")
    p.add_argument("--encoder", help=f"{ENCODER_HELP} (default {ModelConfig().encoder})")
    _add_training_options(p)


def _run_cv(args: argparse.Namespace) -> None:
    from pneumodet.config import TrainConfig
    from pneumodet.crossval import run_cv, stored_cv_config
    from pneumodet.errors import ConfigError

    folds = args.folds
    if not (args.data or args.split or args.config) and rundir.CvDir(args.out).is_cv():  # run again from its folder
        stored, stored_folds = stored_cv_config(args.out)
        config = TrainConfig.from_dict({**stored.to_dict(), **_given_options(args)})
        folds = folds or stored_folds
    else:
        config = _train_config(args)
    if not config.data_dir or not config.split_dir:
        raise ConfigError("--data and --split are required (or --config with data_dir and split_dir)")
    result = run_cv(config, args.out, folds=folds or 5, verbose=args.verbose)
    print(result.summary())
    print(f"summary: {display_path(rundir.CvDir(args.out).summary)}, {display_path(rundir.CvDir(args.out).table)}")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", type=Path, nargs="+", help="training run folders (or a grid folder)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs, best_map.csv and report.html")


def _run_compare(args: argparse.Namespace) -> None:
    from pneumodet.errors import RunError
    from pneumodet.reports.runs import compare_runs
    from pneumodet.rundir import find_runs

    runs = find_runs(args.run_dirs)
    if not runs:
        raise RunError("no training run found in " + ", ".join(str(p) for p in args.run_dirs))
    comparison = compare_runs([r.root for r in runs], args.out)
    for line in comparison.skipped:
        print(f"skipped {display_text(line)}", file=sys.stderr)
    print(f"compared {comparison.compared} run(s)"
          + (f", skipped {len(comparison.skipped)}" if comparison.skipped else "") + f"; report: {display_path(comparison.report)}")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="training run folder")
    p.add_argument("--split", default="test", choices=["val", "test"], help="set to evaluate (default test)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval_<split>)")
    _add_prediction_options(p, threshold=False)
    _add_ensemble_option(p)


def _run_evaluate(args: argparse.Namespace) -> None:
    from pneumodet.data.records import CLASS_SHORT_NAMES
    from pneumodet.evaluation import METRICS_FILE, evaluate, format_metric

    models = _ensemble_models(args)
    metrics = evaluate(models if len(models) > 1 else args.run_dir, split=args.split, out_dir=args.out,
                       options=_prediction_options(args))
    gc = metrics["global_class"]
    print(f"{args.split}: RSNA mAP {format_metric(metrics['rsna_map'], 4)} over {metrics['images_scored']} "
          f"images ({metrics['images_excluded']} without boxes either way, not scored) at confidence "
          f"threshold {metrics['threshold']:.2f} ({display_text(metrics['threshold_source'])})")
    print("  per IoU threshold: " + ", ".join(f"{t}: {format_metric(v)}"
                                              for t, v in metrics["rsna_map_per_iou_threshold"].items()))
    recall = ", ".join(f"{CLASS_SHORT_NAMES[name]} {format_metric(value)}" for name, value in gc["recall"].items())
    print(f"  global class accuracy {format_metric(gc['accuracy'])} (recall: {recall}), macro AUC "
          f"{format_metric(gc['macro_auc'])}, pneumonia-vs-not AUC {format_metric(gc['pneumonia_auc'])}")
    froc, coco, roc = metrics["froc"], metrics["coco"], metrics["image_roc"]["best_box_score"]
    print(f"  FROC mean sensitivity {format_metric(froc['mean_sensitivity'])} (1/8-8 FP/image, {froc['lesions']} "
          f"lesions); COCO AP@[.5:.95] {format_metric(coco['ap'])}, AP50 {format_metric(coco['ap50'])}")
    print(f"  pneumonia per image (best box): AUC {format_metric(roc['auc'])}, sensitivity "
          f"{format_metric(roc['operating_point']['sensitivity'])} / specificity "
          f"{format_metric(roc['operating_point']['specificity'])} at the threshold; class ECE "
          f"{format_metric(metrics['calibration']['top_label']['ece'])}")
    if "note" in metrics["subgroups"]:
        print(f"note: subgroups: {metrics['subgroups']['note']}", file=sys.stderr)
    print(f"  predicted in {metrics['precision']}" + (", compiled" if metrics["compiled"] else ""))
    for note in metrics.get("precision_notes", []):
        print(f"note: {display_text(note)}", file=sys.stderr)
    print(f"wrote {display_path(Path(metrics['out_dir']) / METRICS_FILE)}")


# ---------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    p.add_argument("--budget-minutes", type=float, default=10.0, metavar="MIN",
                   help="time budget of the whole demo: the demo times a few training steps and sizes itself "
                        "(encoder, image size, epochs, patients) to fit it (default 10)")
    p.add_argument("--patients", type=int, help="synthetic patients (default: the plan's, 400 on a fast CPU)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the plan's, 8 on a fast CPU)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 where the hardware has it, else fp32; the default), bf16, fp16 or fp32: "
                        "fp32 shows the demo of a CPU without bf16")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_demo(args: argparse.Namespace) -> None:
    from pneumodet.demo import run_demo

    run_demo(args.out, patients=args.patients, seed=args.seed, epochs=args.epochs,
             budget_minutes=args.budget_minutes, precision=args.precision)


# ---------------------------------------------------------------- augment-preview
def _add_augment_preview(p: argparse.ArgumentParser) -> None:
    _add_data_source(p)
    p.add_argument("--level", default="heavy",
                   help="resize_only, light, heavy, heavy_with_rotations, or all (default heavy)")
    p.add_argument("--n", type=int, default=4, help="patients to show, those with boxes first (default 4)")
    p.add_argument("--out", type=Path, default=Path("augment_preview.png"),
                   help="picture to write: .png (default augment_preview.png), .jpg, .jpeg, .pdf or .svg")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same picture")
    p.add_argument("--size", type=int, default=512, help="training image side in pixels (default 512)")
    p.add_argument("--draws", type=int, default=3, help="augmented versions per image for one level (default 3)")


def _run_augment_preview(args: argparse.Namespace) -> None:
    from pneumodet.data.augment import LEVELS, build_augmentation
    from pneumodet.errors import ConfigError
    from pneumodet.reports.augment_preview import preview_figure, preview_samples
    from pneumodet.safeio import atomic_path

    # every option is checked before any image is read: a typo must not cost a data load
    image_format = args.out.suffix.lower().lstrip(".")
    if image_format not in PREVIEW_FORMATS:
        suffix = args.out.suffix or "(no suffix)"
        raise ConfigError(f"--out {display_path(args.out)}: unknown picture format {suffix!r}; "
                          f"name a {', '.join('.' + f for f in PREVIEW_FORMATS)} file")
    if args.n < 1 or args.draws < 1:
        raise ConfigError(f"--n and --draws must be at least 1, got {args.n} and {args.draws}")
    levels = LEVELS if args.level == "all" else (args.level,)
    build_augmentation(levels[0], args.size)  # an unknown level or size fails before any image is read
    data = _load_records(args)
    samples, skipped = preview_samples(data.records, args.n, seed=args.seed)
    for line in skipped:
        print(f"skipped unreadable image {display_text(line)}", file=sys.stderr)
    fig = preview_figure(samples, levels, args.size, seed=args.seed, draws=1 if args.level == "all" else args.draws)
    with atomic_path(args.out) as tmp:  # the temporary name has no picture suffix: say the format
        fig.savefig(tmp, dpi=110, format=image_format)
    print(f"wrote {display_path(args.out)}: {len(samples)} patient(s) x {', '.join(levels)}"
          + (f"; {len(skipped)} unreadable image(s) skipped" if skipped else ""))


#: Picture formats ``augment-preview --out`` writes (matplotlib's, without a plugin).
PREVIEW_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]

COMMANDS: list[_Command] = [
    ("synth", "write a synthetic RSNA-format dataset (Kaggle layout)", _add_synth, _run_synth),
    ("eda", "data exploration report: one HTML file, summary.json and table CSVs", _add_eda, _run_eda),
    ("split", "split patients into train/val/test (patient level, stratified)", _add_split, _run_split),
    ("cache", "decode every DICOM once into a memory-mapped image cache", _add_cache, _run_cache),
    ("augment-preview", "before/after grid of an augmentation level on real images, boxes drawn",
     _add_augment_preview, _run_augment_preview),
    ("train", f"train RetinaNet on a split (Lightning; checkpoints, {rundir.METRICS}, {rundir.REPORT})", _add_train,
     _run_train),
    ("grid", "train every encoder x augmentation x sample size; summary table", _add_grid, _run_grid),
    ("cv", "cross-validation: K runs on patient-level folds (test held out), mean ± sd, out-of-fold threshold",
     _add_cv, _run_cv),
    ("compare", "compare runs: validation curves per encoder/augmentation/sample size", _add_compare,
     _run_compare),
    ("evaluate", "score a run's best model on the held-out test set (threshold from validation)",
     _add_evaluate, _run_evaluate),
    ("predict", "predict boxes for DICOM files: Kaggle submission, JSON, overlays", _add_predict, _run_predict),
    ("pacs", "fetch radiographs from a DICOMweb PACS, predict, store DICOM SR and presentation states back",
     _add_pacs, _run_pacs),
    ("score", "score a Kaggle submission CSV against the labels (RSNA mAP)", _add_score, _run_score),
    ("export", "export the network, or with --with-postprocess the whole detector, to ONNX (docs/ONNX.md)", _add_export,
     _run_export),
    ("quantize", f"int8 graph of a run's best model for the CPU, calibrated on its training images, kept in the "
                 f"run ({rundir.INT8_MODEL}) and checked on its validation set; predict and evaluate run it by "
                 "default where its validation mAP is within 0.01 of the float network's", _add_quantize,
     _run_quantize),
    ("serve", "HTTP detection service with a review page: batched, bounded, JSON or DICOM SR answers",
     _add_serve, _run_serve),
    ("demo", "the whole job on synthetic data: synth, eda, split, cache, train, evaluate, predict, score",
     _add_demo, _run_demo),
]


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help shows its default: an option whose help does not say it already gets
    ``(default: VALUE)``. Options without a value of their own (``None``, ``False``, an empty list) are
    "not set" by default; their help says what happens then where it matters."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = (default is None or default is False or default is argparse.SUPPRESS
                 or (isinstance(default, list | tuple | str) and not default))
        if not action.option_strings or unset or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumodet", formatter_class=_HelpFormatter,
        description="Find pneumonia (lung opacity) regions on chest X-rays: RSNA data, RetinaNet, "
                    "the competition metric.",
    )
    parser.add_argument("--version", action="version", version=f"pneumodet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def _error_line(command: str, message: str) -> None:
    """The one line an error is: line breaks inside a message (from a file name, a library) become spaces,
    and text the terminal cannot encode is escaped rather than raising again."""
    text = " ".join(f"pneumodet {command}: error: {message}".split())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except PneumodetError as exc:
        _error_line(args.command, str(exc))
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # disk full, permissions: the environment, not a bug; one line naming the file
        where = f"{exc.filename}: " if exc.filename else ""
        _error_line(args.command, f"{where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        print(f"pneumodet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
