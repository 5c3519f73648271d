"""Where the time of ``predict`` goes, end to end on the CPU: DICOM files -> submission, at 512 px.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_predict_profile.py [--source real|synth]
        [--repeat 8] [--size 512] [--batch 8] [--encoder resnet50] [--precision bf16] [--compile auto]
        [--workers 0 1 2] [--processes 1 2] [--run RUN]

Inputs: ``real`` (default): the 16 real RSNA sample DICOMs (1024 x 1024, JPEG baseline) at
``../shared/data/rsna-sample``, each written ``--repeat`` times with new UIDs and patient ids (the JPEG
pixel data as it is), so every file is a new image; ``synth``: ``16 x --repeat`` synthetic 1024-px DICOMs
(uncompressed, :func:`pneumodet.data.synth.make_synthetic_dataset`). The model: ``--run``, else a
random-weight ``--encoder`` RetinaNet at ``--size`` (timing does not depend on what the weights learned;
the candidates per image before NMS are bounded by ``topk_per_level``).

Stages, each timed alone over every file, in this process (the peer is the network alone):

    set-up        once per predict(): the checkpoint loaded and the model prepared (batch norms folded)
    decode        read_dicom: the file read and its pixel data decoded (pydicom + the JPEG codec)
    resize        prepare_image: OpenCV area resize to --size, uint8 -> float in [0, 1]
    batching      stacking a batch and making it channels_last
    network       the network's forward (--precision, compiled as --compile): the peer
    postprocess   anchors decoded, NMS, probabilities (Predictor minus its network) and boxes mapped back
                  to the original pixels (kaggle_rows)
    writing       the submission CSV and the JSON of the whole result

Each stage's share is its time divided by the network's; stages above 10 % of the network are flagged.
Then ``predict()`` end to end (file search to result) with each ``--workers`` (0: decoding in this process,
serial with the network; N: N DataLoader processes decode while the network runs), plus writing: seconds,
images/s, and the ratio of end-to-end time to the network alone (1.00 = nothing but the network costs).

Last, the command itself, ``pneumodet predict FOLDER --devices P`` for each ``--processes`` (a fresh
command per P: interpreter start, model load and compilation included; the files shared out across P
processes, gloo): seconds, images/s and the speed-up over 1 process (the peer).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from _common import cpu_model, load_average
from pneumodet.data.dicom import read_dicom
from pneumodet.data.preprocess import prepare_image
from pneumodet.inference import predict, write_prediction_json, write_prediction_submission
from pneumodet.inference.engine import Predictor, RawPrediction, load_for_inference, model_image_size
from pneumodet.model import ModelConfig, build_model, save_checkpoint

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-sample" / "stage_2_train_images"
#: A stage costing more than this share of the network is worth overlapping or removing (issue 18).
FLAG_SHARE = 0.10


def write_inputs(folder: Path, source: str, repeat: int) -> list[Path]:
    """The DICOM files profiled: 16 x ``repeat`` distinct images (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source == "synth":
        from pneumodet.data.synth import make_synthetic_dataset

        make_synthetic_dataset(folder / "synth", patients=16 * repeat, size=1024, seed=0)
        return sorted((folder / "synth").rglob("*.dcm"))
    import pydicom
    from pydicom.uid import generate_uid

    originals = sorted(REAL_SAMPLE.glob("*.dcm"))
    if not originals:
        raise SystemExit(f"no real sample DICOMs at {REAL_SAMPLE}; use --source synth")
    files = []
    for copy in range(repeat):
        for original in originals:
            ds = pydicom.dcmread(original)
            uid = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.PatientID = f"{ds.PatientID}_{copy}"
            path = folder / f"{ds.PatientID}.dcm"
            ds.save_as(path)
            files.append(path)
    return files


def model_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    if args.run:
        return args.run
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, image_size=args.size))
    path = folder / "model.pt"
    save_checkpoint(path, model, extra={"threshold": 0.5, "image_size": args.size})
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def profile_stages(files: Sequence[Path], checkpoint: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Seconds per stage over every file (the module docstring's stages)."""
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    setup, (model, predictor) = timed(lambda: _predictor(checkpoint, args, compile_, len(files)))
    size = model_image_size(model)
    seconds = dict.fromkeys(("set-up", "decode", "resize", "batching", "network", "postprocess", "writing"), 0.0)
    seconds["set-up"] = setup
    decoded = []
    for path in files:
        t, (pixels, _) = timed(lambda p=path: read_dicom(p))
        seconds["decode"] += t
        decoded.append(pixels)
    images = []
    for pixels in decoded:
        t, image = timed(lambda px=pixels: prepare_image(px, size))
        seconds["resize"] += t
        images.append(image)
    batches = []
    for start in range(0, len(images), args.batch):
        t, batch = timed(lambda s=start: torch.stack(images[s:s + args.batch]).contiguous(
            memory_format=torch.channels_last))
        seconds["batching"] += t
        batches.append(batch)
    post = predictor.postprocess
    with torch.inference_mode():
        predictor(batches[0])  # warm-up: compiles, if compiling
        for start, batch in zip(range(0, len(files), args.batch), batches, strict=True):
            with predictor._autocast():  # as Predictor._detect: the network under autocast, decoding in fp32
                t, outputs = timed(lambda b=batch: predictor._forward(b))
            seconds["network"] += t
            t, dets = timed(lambda o=outputs: predictor.model.detect(
                o, score_thresh=post["min_score"], nms_thresh=post["nms_iou"], max_detections=post["max_detections"]))
            seconds["postprocess"] += t
            sizes = [tuple(px.shape) for px in decoded[start:start + args.batch]]
            t, _ = timed(lambda d=dets, o=sizes: [
                RawPrediction(det.boxes.float().cpu(), det.scores.float().cpu(), det.class_probs.float().cpu())
                .kaggle_rows(0.5, shape, size) for det, shape in zip(d, o, strict=True)])
            seconds["postprocess"] += t
    result = predict(checkpoint, files, _options(args, compile_), progress=False)
    t, _ = timed(lambda: (write_prediction_submission(result, out / "submission.csv"),
                          write_prediction_json(result, out / "prediction.json")))
    seconds["writing"] = t
    return seconds


def _predictor(checkpoint: Path, args: argparse.Namespace, compile_: bool | None, count: int) -> tuple[Any, Predictor]:
    """What each ``predict`` call does once: the model loaded, its batch norms folded (not compiled yet)."""
    model, _ = load_for_inference(checkpoint)
    return model, Predictor.from_options(model, model_image_size(model), _options(args, compile_), num_images=count)


def _options(args: argparse.Namespace, compile_: bool | None, workers: int = 0) -> Any:
    from pneumodet.inference.options import PredictOptions

    return PredictOptions(batch_size=args.batch, precision=args.precision, device="cpu", workers=workers,
                          compile=compile_)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("real", "synth"), default="real")
    parser.add_argument("--repeat", type=int, default=8, help="copies of the 16 images (new UIDs)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder", default=ModelConfig().encoder)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="on",
                        help="the network compiled (on: as predict does for jobs of 500 images and more)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="predict --devices P, each as its own command")
    parser.add_argument("--run", type=Path, help="a training run's model instead of random weights")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-predict-profile-") as tmp:
        root = Path(tmp)
        files = write_inputs(root / "in", args.source, args.repeat)
        checkpoint = model_checkpoint(root, args)
        print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; load {load_average()}")
        print(f"{len(files)} {args.source} DICOM files -> {args.size} px, batch {args.batch}, {args.encoder}, "
              f"{args.precision}, compile {args.compile}; torch {torch.__version__}")
        seconds = profile_stages(files, checkpoint, args, root)
        network = seconds["network"]
        print(f"\n{'stage':<14}{'s':>9}{'ms/image':>10}{'x network':>11}")
        for stage, value in seconds.items():
            flag = "  > 10 % of the network" if stage != "network" and value > FLAG_SHARE * network else ""
            print(f"{stage:<14}{value:>9.2f}{1000 * value / len(files):>10.1f}{value / network:>11.2f}{flag}")
        total = sum(seconds.values())
        print(f"{'sum':<14}{total:>9.2f}{1000 * total / len(files):>10.1f}{total / network:>11.2f}")

        compile_ = {"auto": None, "on": True, "off": False}[args.compile]
        # compilation is not what is profiled: a first call on one batch warms Inductor's caches
        predict(checkpoint, files[:args.batch], _options(args, compile_), progress=False)
        print(f"\n{'predict()':<14}{'workers':>8}{'s':>9}{'img/s':>9}{'x network':>11}")
        print(f"{'network alone':<14}{'':>8}{network:>9.2f}{len(files) / network:>9.2f}{1.0:>11.2f}")
        for workers in args.workers:
            t, result = timed(lambda w=workers: predict(checkpoint, files, _options(args, compile_, w),
                                                        progress=False))
            t_write, _ = timed(lambda r=result: write_prediction_submission(r, root / "submission.csv"))
            t += t_write
            print(f"{'end to end':<14}{workers:>8}{t:>9.2f}{len(files) / t:>9.2f}{t / network:>11.2f}")

        print(f"\n{'pneumodet predict':<18}{'processes':>10}{'s':>9}{'img/s':>9}{'x 1 process':>13}")
        single = None
        for processes in args.processes:
            command = [sys.executable, "-m", "pneumodet.cli", "predict", str(checkpoint), str(root / "in"),
                       "--out", str(root / f"submission_{processes}.csv"), "--batch-size", str(args.batch),
                       "--precision", args.precision, "--devices", str(processes)]
            command += {"auto": [], "on": ["--compile"], "off": ["--no-compile"]}[args.compile]
            t, done = timed(lambda c=command: subprocess.run(c, capture_output=True, text=True))
            if done.returncode != 0:
                raise SystemExit(f"predict --devices {processes} failed: {done.stderr[-2000:]}")
            single = single or t
            print(f"{'':<18}{processes:>10}{t:>9.2f}{len(files) / t:>9.2f}{single / t:>13.2f}")


if __name__ == "__main__":
    main()
