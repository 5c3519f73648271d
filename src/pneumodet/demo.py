"""``pneumodet demo``: the whole job on synthetic data, end to end, in minutes on a CPU.

synth → eda → split → cache → train (resnet50, 256 px, bf16 where the hardware has it) →
evaluate on the held-out test set → predict the test DICOMs into a submission → score it → reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pneumodet.config import TrainConfig
from pneumodet.data.rsna import load_rsna
from pneumodet.data.split import read_split, split_patients, write_split
from pneumodet.data.synth import make_synthetic_dataset
from pneumodet.evaluation import METRICS_FILE, evaluate
from pneumodet.inference import predict, write_prediction_submission
from pneumodet.metrics import rsna_map
from pneumodet.reports.eda import build_eda_report
from pneumodet.reports.runs import write_run_report
from pneumodet.rundir import RunDir
from pneumodet.safeio import write_json
from pneumodet.submission import read_ground_truth
from pneumodet.training import train

#: The demo's training settings: small enough for 2 CPU cores, large enough to learn the opacities.
DEMO_TRAINING: dict[str, Any] = dict(encoder="resnet50", aug="light", image_size=256, epochs=8, batch_size=8,
                                     num_workers=1, checkpoint_every_n_steps=50)


def run_demo(out: Path, *, patients: int = 400, seed: int = 0, epochs: int | None = None,
             say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every step into ``out`` and return the headline numbers (also in ``out/demo.json``)."""

    out = Path(out)
    started = time.perf_counter()
    data_dir, split_dir, run_dir = out / "data", out / "split", out / "run"

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - started:6.0f} s] {text}")

    if not (data_dir / "stage_2_train_labels.csv").exists():
        step(f"synth: writing {patients} synthetic patients to {data_dir}")
        say(str(make_synthetic_dataset(data_dir, patients=patients, size=DEMO_TRAINING["image_size"], seed=seed)))
    step(f"eda: report in {out / 'eda'}")
    build_eda_report(data_dir, out / "eda", seed=seed)
    data = load_rsna(data_dir)
    if not (split_dir / "split.json").exists():
        split = split_patients(data.records, val=0.15, test=0.15, seed=seed)
        write_split(split, split_dir, source=str(data_dir))
        say(split.summary())
    config = TrainConfig.with_recipe("default", data_dir=str(data_dir), split_dir=str(split_dir),
                                     out_dir=str(run_dir), seed=seed,
                                     **{**DEMO_TRAINING, **({"epochs": epochs} if epochs else {})})
    run = RunDir(run_dir)
    if not run.is_finished():
        step(f"train: {config.model.encoder}, {config.image_size} px, {config.epochs} epochs, aug {config.aug} "
             "(the image cache is built first)")
        say(train(config, resume=run.is_run(), progress=progress).summary())
    step("evaluate: best model on the held-out test set")
    metrics = evaluate(run_dir, split="test")
    step("predict: the test DICOMs into a Kaggle submission")

    test_records = read_split(split_dir)["test"]
    prediction = predict(run_dir, [r.image_path for r in test_records if r.image_path], progress=progress)
    submission = write_prediction_submission(prediction, out / "submission.csv")
    ground_truth = read_ground_truth(data_dir / "stage_2_train_labels.csv")
    scored = rsna_map({r.patient_id: ground_truth[r.patient_id] for r in test_records},
                      prediction.submission_boxes())
    step("reports")
    run_report = write_run_report(run.root)
    summary = {
        "test_rsna_map": metrics["rsna_map"], "threshold_from_validation": metrics["threshold"],
        "submission_rsna_map": scored.score, "global_class_accuracy": metrics["global_class"]["accuracy"],
        "pneumonia_auc": metrics["global_class"]["pneumonia_auc"], "seconds": time.perf_counter() - started,
        "reports": {"eda": str(out / "eda" / "report.html"), "run": str(run_report),
                    "evaluation": str(Path(metrics["out_dir"]) / METRICS_FILE), "submission": str(submission)},
    }
    write_json(out / "demo.json", summary)
    say("")
    say(f"test RSNA mAP {summary['test_rsna_map']:.4f} (threshold {metrics['threshold']:.2f} chosen on "
        f"validation); the submission scores {scored.score:.4f}; global-class accuracy "
        f"{summary['global_class_accuracy']:.3f}; finished in {summary['seconds']:.0f} s")
    for name, path in summary["reports"].items():
        say(f"  {name:<11} {path}")
    return summary
