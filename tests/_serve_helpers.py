"""Helpers of the service tests: a tiny served run, a live server in a thread, a gate on the model.

The run is ``_helpers.make_run``'s (Kaggle-layout data, split, config) with a 64-px resnet18 whose box
scores spread around 0.5 (so that the threshold has boxes on both sides), a ``done.json`` and a test
evaluation, so that the model card has something to read.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SIZE = 64
THRESHOLD = 0.56  # the random model's box scores lie around 0.53-0.58: the threshold cuts through them
VAL_MAP = 0.25


def make_served_run(root: Path) -> Path:
    import torch

    from _helpers import make_run
    from badinputs import small_patients
    from pneumodet.evaluation import METRICS_FILE
    from pneumodet.model import ModelConfig, build_model, save_checkpoint
    from pneumodet.rundir import RunDir
    from pneumodet.safeio import write_json

    run = RunDir(make_run(root, small_patients(12), threshold=THRESHOLD, size=SIZE))
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", image_size=SIZE))
    with torch.no_grad():  # scores spread around 0.5 instead of the focal-loss prior's 0.01
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
    save_checkpoint(run.best_model, model, extra={"threshold": THRESHOLD, "image_size": SIZE, "val_map": VAL_MAP,
                                                  "epoch": 3})
    run.write_done({"best_val_map": VAL_MAP, "threshold": THRESHOLD, "epochs": 4, "steps": 40,
                    "precision": "fp32", "encoder_weights": "random initialisation"})
    write_json(run.eval_dir("test") / METRICS_FILE,
               {"run": str(run.root), "rsna_map": 0.125, "images": 3, "images_scored": 2, "threshold": THRESHOLD,
                "global_class": {"accuracy": 0.5, "pneumonia_auc": 0.75}})
    return run.root


class LiveServer:
    """``app`` served by uvicorn on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 60, "the server to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``seconds`` (a bound, not a timing assumption)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def gated(model) -> Iterator[tuple[threading.Event, list[int]]]:
    """Hold every batch of ``model`` (a ServedModel) until the event is set; yields (event, batch sizes).

    The batch sizes are recorded as the batches start, so a test can wait for "the first batch is held"
    and then fill the queue behind it: what is batched with what no longer depends on timing.
    """
    gate, sizes = threading.Event(), []
    original = model.run_batch

    def run_batch(images):
        sizes.append(len(images))
        if not gate.wait(120):
            raise RuntimeError("gate never opened")
        return original(images)

    model.run_batch = run_batch
    try:
        yield gate, sizes
    finally:
        gate.set()
        model.run_batch = original


def dicom_files(real_sample: Path) -> list[Path]:
    return sorted((real_sample / "stage_2_train_images").glob("*.dcm"))


def parts(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for DICOM paths (field name ``file``)."""
    return [("file", (p.name, p.read_bytes(), "application/dicom")) for p in paths]
