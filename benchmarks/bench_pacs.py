"""PACS round trip: images/s of ``pneumodet pacs`` (fetch -> predict -> store) against plain ``predict``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_pacs.py [--encoder resnet18] [--size 512] [--repeats 3]

On the 16 real RSNA DICOMs (``../shared/data/rsna-sample``), one random-init ``--encoder`` checkpoint at
``--size`` px whose detections are capped at ``--boxes`` an image (``max_detections``) and kept whatever their
score (threshold 0), so that every image gets ``--boxes`` boxes, as a positive RSNA image has 1 to 4; batch
8, default precision:

* **round trip**: :func:`pneumodet.clinical.pacs.run_pacs` against a real Orthanc with its DICOMweb
  plugin on 127.0.0.1 holding the 16 files (one study each): QIDO-RS of the 16 studies, WADO-RS of each
  instance, ``predict``, an SR and a presentation state per image, STOW-RS of all 32 (8 images per
  request). A fresh Orthanc (started and filled outside the timing) for each pass, so every pass stores;
* **predict --dicom-out**: ``predict`` on the local files, then the same SR and PR written to a folder;
* **plain predict**: ``predict`` on the local files (the peer).

Each pass loads the model, as each command does. Every figure is the median of ``--repeats`` passes after
a warm-up pass; the three are timed in turn within a repeat so that they see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import cpu_model, load_average

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "rsna-sample" / "stage_2_train_images"
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc launcher the PACS tests use

from _orthanc import MISSING, Orthanc, orthanc_binary  # noqa: E402
from pneumodet.clinical.dicomweb import DicomWebServer  # noqa: E402
from pneumodet.clinical.pacs import PacsQuery, run_pacs  # noqa: E402
from pneumodet.clinical.sr import write_dicom_results  # noqa: E402
from pneumodet.inference import PredictOptions, predict  # noqa: E402
from pneumodet.model import ModelConfig, build_model, save_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=3, help="boxes per image (default 3)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    binary = orthanc_binary()
    if binary is None:
        raise SystemExit(MISSING)
    files = sorted(SAMPLE.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOMs under {SAMPLE}")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, image_size=args.size, max_detections=args.boxes))
    with torch.no_grad():  # scores around 0.5 (a random head scores ~0.01, under the model's score_thresh)
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ckpt = save_checkpoint(tmp_path / "model.pt", model,
                               extra={"threshold": 0.5, "image_size": args.size})
        options = PredictOptions(threshold=0.0, batch_size=args.batch)
        print(f"CPU: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); torch "
              f"{torch.__version__}; load average {load_average()}; {len(files)} real DICOMs 1024 px -> "
              f"{args.size} px; {args.encoder}; {args.boxes} boxes an image; batch {args.batch}")

        def round_trip(n: int) -> None:
            server = Orthanc(tmp_path / f"orthanc{n}", binary).start()
            try:
                studies = tuple(server.upload(files))
                start = time.perf_counter()
                summary = run_pacs(ckpt, DicomWebServer(server.dicomweb), PacsQuery(studies=studies),
                                   options=options)
                elapsed = time.perf_counter() - start
                assert summary.error is None and len(summary.images) == len(files), summary.render()
                times["round trip (pacs)"].append(elapsed)
            finally:
                server.stop()

        def timed(name: str, run) -> None:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

        def dicom_out(n: int) -> None:
            result = predict(ckpt, files, options, progress=False)
            write_dicom_results(result, tmp_path / f"dicom{n}", ckpt)

        times: dict[str, list[float]] = {name: [] for name in ("round trip (pacs)", "predict --dicom-out",
                                                                "plain predict")}
        for repeat in range(args.repeats + 1):
            round_trip(repeat)
            timed("predict --dicom-out", lambda repeat=repeat: dicom_out(repeat))
            timed("plain predict", lambda: predict(ckpt, files, options, progress=False))
            if repeat == 0:  # the warm-up pass: caches, oneDNN kernels, the first Orthanc
                for samples in times.values():
                    samples.clear()

    plain = statistics.median(times["plain predict"])
    print(f"{'':24s} {'images/s':>9s} {'s/pass':>7s} {'vs plain predict':>17s}")
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"{name:24s} {len(files) / t:9.2f} {t:7.2f} {plain / t:16.2f}x")


if __name__ == "__main__":
    main()
