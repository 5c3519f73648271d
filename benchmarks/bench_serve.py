"""Load test of ``pneumodet serve``: concurrent clients over loopback, batching on and off, against ``predict``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py [--encoder resnet50] [--size 256]
        [--clients 8] [--seconds 30] [--max-requests 3000] [--copies 8] [--max-batch 8] [--max-wait-ms 10]
        [--litserve]

The 16 real RSNA DICOMs (``../shared/data/rsna-sample``) are copied ``--copies`` times with new SOP Instance
UIDs (``predict`` counts a second file of the same image as a duplicate), into a temporary folder. A
random-init model of ``--encoder`` at ``--size`` px is saved as a checkpoint there. Then:

* offline: ``pneumodet.inference.predict`` on every copy, batch ``--max-batch``, default precision, no
  compilation (as ``serve``): images/s of the whole call (model load included, as the command line) and
  of the prediction alone (the model load, timed apart, taken out); median of 2 runs after a warm-up;
* served: ``pneumodet serve CHECKPOINT --port 0`` as a separate process, once with batching (``--max-batch``,
  ``--max-wait-ms``) and once without (``--max-batch 1``); ``--clients`` threads each send one DICOM per
  request (multipart, keep-alive) in a loop, for at most ``--seconds`` and ``--max-requests`` requests in
  all, after a warm-up of 2 requests per client. Reported: images/s, latency p50/p95/p99, errors (any
  status but 200, or a failed connection), the server's memory (RSS of its process tree) after the
  warm-up, at the end and at its peak (``/proc``), the mean batch, and the ratio to offline ``predict``;
* with ``--litserve`` (LitServe installed apart, e.g. ``pip install --target DIR litserve pyzmq`` and
  ``PYTHONPATH=DIR``; it is not a pneumodet dependency): the same model and the same decoding
  (:class:`~pneumodet.serve.model.ServedModel`) behind LitServe's batching (``max_batch_size``,
  ``batch_timeout``), one inference worker; LitServe takes JSON, so each DICOM is sent base64-encoded.

Clients and server share the machine's cores: on a small machine the clients' own work (multipart
encoding, JSON parsing, under the GIL) is part of what the numbers measure.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from _common import cpu_model, load_average
from pneumodet.inference import predict, resolve_precision
from pneumodet.model import ModelConfig, build_model, save_checkpoint

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-sample" / "stage_2_train_images"

try:  # optional: only for --litserve
    import litserve as ls
except ImportError:
    ls = None


def copy_images(out: Path, copies: int) -> list[Path]:
    """``copies`` copies of each sample DICOM, each with its own SOP Instance UID (the pixels unchanged)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    made = []
    for path in sorted(SAMPLE.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for i in range(copies):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            target = out / f"{path.stem}_{i}.dcm"
            ds.save_as(target)
            made.append(target)
    return made


def tree_rss_mib(root: int) -> float:
    """RSS of process ``root`` and all its descendants, MiB (``/proc``)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        try:
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
        except (OSError, AttributeError):
            continue
    return total / 1024


def offline(checkpoint: Path, files: list[Path], batch: int) -> tuple[float, float]:
    """Images/s of ``predict`` (whole call, and without the model load)."""
    from pneumodet.inference import Predictor, load_for_inference, model_image_size

    def load() -> None:
        model, _ = load_for_inference(checkpoint)
        Predictor(model, model_image_size(model), device="cpu")

    walls, loads = [], []
    for repeat in range(3):
        start = time.perf_counter()
        predict(checkpoint, files, batch_size=batch, device="cpu", compile=False, progress=False)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        load()
        if repeat:  # the first pass warms caches and kernels
            walls.append(wall)
            loads.append(time.perf_counter() - start)
    wall, loading = statistics.median(walls), statistics.median(loads)
    return len(files) / wall, len(files) / (wall - loading)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


Post = Callable[[httpx.Client, str, bytes], httpx.Response]


def load_test(proc: subprocess.Popen, url: str, files: list[Path], post: Post, *, clients: int, seconds: float,
              max_requests: int) -> dict:
    """``clients`` threads posting the files round-robin to the server at ``url`` (process ``proc``)."""
    bodies = [(p.name, p.read_bytes()) for p in files]
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    state = {"next": 0, "sent": 0, "stop_at": float("inf")}

    def client(warmup: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            done = 0
            while True:
                with lock:
                    if warmup and done >= warmup:
                        return
                    if not warmup:
                        if state["sent"] >= max_requests or time.perf_counter() >= state["stop_at"]:
                            return
                        state["sent"] += 1
                    name, body = bodies[state["next"] % len(bodies)]
                    state["next"] += 1
                start = time.perf_counter()
                try:
                    response = post(c, name, body)
                    ok, problem = response.status_code == 200, f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    ok, problem = False, type(exc).__name__
                took = time.perf_counter() - start
                done += 1
                if not warmup:
                    with lock:
                        if ok:
                            latencies.append(took)
                        else:
                            errors.append(problem)

    def run_clients(warmup: int) -> None:
        threads = [threading.Thread(target=client, args=(warmup,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_clients(2)
    rss_start = tree_rss_mib(proc.pid)
    peak = [rss_start]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            peak.append(tree_rss_mib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    begin = time.perf_counter()
    state["stop_at"] = begin + seconds
    run_clients(0)
    wall = time.perf_counter() - begin
    sampling.set()
    sampler.join()
    return {"images_s": len(latencies) / wall, "requests": len(latencies) + len(errors), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99), "rss_start": rss_start, "rss_end": tree_rss_mib(proc.pid),
            "rss_peak": max(peak), "seconds": wall}


def served(checkpoint: Path, files: list[Path], *, max_batch: int, max_wait_ms: float, log: Path, **load) -> dict:
    """One load test against a fresh ``pneumodet serve`` process."""
    command = [sys.executable, "-m", "pneumodet.cli", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-ids", "none",
               "--max-queue", str(max(64, 4 * load["clients"]))]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            url = re.search(r"on (http://[^/]+)/", proc.stdout.readline()).group(1)
            result = load_test(proc, url, files, lambda c, name, body: c.post(
                "/v1/predict", files=[("file", (name, body, "application/dicom"))]), **load)
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
    batches = int(re.search(r"^pneumodet_batch_size_count (\d+)$", metrics, re.M).group(1))
    images = float(re.search(r"^pneumodet_batch_size_sum (\S+)$", metrics, re.M).group(1))
    return {**result, "mean_batch": f"{images / max(1, batches):.1f}", "exit": proc.returncode}


# ---------------------------------------------------------------- LitServe, for comparison
if ls is not None:
    class PneumodetLitAPI(ls.LitAPI):
        """The served model behind LitServe: JSON ``{"dicom": base64}`` in, ``serve``'s image entry out."""

        def __init__(self, checkpoint: str, max_batch: int, max_wait_ms: float) -> None:
            super().__init__(max_batch_size=max_batch, batch_timeout=max_wait_ms / 1000)
            self.checkpoint = checkpoint

        def setup(self, device) -> None:
            from pneumodet.serve.model import ServedModel

            self.model = ServedModel(self.checkpoint, device="cpu")
            self.model.warm_up()
            self.folder = Path(tempfile.mkdtemp(prefix="litserve-"))

        def decode_request(self, request):
            path = self.folder / f"{os.getpid()}_{threading.get_ident()}.dcm"
            path.write_bytes(base64.b64decode(request["dicom"]))
            return self.model.decode(request.get("name", "upload"), path)

        def batch(self, inputs):
            return inputs

        def predict(self, x):
            items = x if isinstance(x, list) else [x]
            raws = self.model.run_batch([d.image for d in items])
            pairs = list(zip(items, raws, strict=True))
            return pairs if isinstance(x, list) else pairs[0]

        def unbatch(self, output):
            return output

        def encode_response(self, output):
            decoded, raw = output
            return self.model.answer(decoded, self.model.prediction(decoded, raw, self.model.threshold))


def litserve_main(checkpoint: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    server = ls.LitServer(PneumodetLitAPI(checkpoint, max_batch, max_wait_ms), accelerator="cpu", devices=1,
                          workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, num_api_servers=1, log_level="warning")


def litserved(checkpoint: Path, files: list[Path], *, max_batch: int, max_wait_ms: float, log: Path, **load) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, __file__, "--litserve-server", str(checkpoint), str(port), str(max_batch),
               str(max_wait_ms)]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=err, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"LitServe did not start; see {log}")
                time.sleep(0.5)
            encoded = {}

            def post(c: httpx.Client, name: str, body: bytes) -> httpx.Response:
                if name not in encoded:
                    encoded[name] = base64.b64encode(body).decode("ascii")
                return c.post("/predict", json={"dicom": encoded[name], "name": name})

            result = load_test(proc, url, files, post, **load)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {**result, "mean_batch": "?", "exit": proc.returncode}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--litserve-server":
        litserve_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--litserve", action="store_true", help="also measure LitServe (installed apart)")
    args = parser.parse_args()
    if not any(SAMPLE.glob("*.dcm")):
        raise SystemExit(f"no DICOMs under {SAMPLE}")
    if args.litserve and ls is None:
        raise SystemExit("--litserve: litserve is not importable (pip install --target DIR litserve pyzmq; "
                         "PYTHONPATH=DIR)")

    load = {"clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests}
    batching = {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
    with tempfile.TemporaryDirectory() as tmp:
        files = copy_images(Path(tmp) / "images", args.copies)
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder=args.encoder, image_size=args.size)).eval()
        checkpoint = save_checkpoint(Path(tmp) / "best_model.pt", model, extra={"threshold": 0.5})
        print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); load before: {load_average()}; torch "
              f"{torch.__version__}; {args.encoder} {args.size} px, {resolve_precision(None, torch.device('cpu'))}; "
              f"{len(files)} real 1024-px DICOMs ({args.copies} copies of 16); {args.clients} clients, "
              f"<= {args.seconds:g} s and <= {args.max_requests} requests per mode", flush=True)
        whole, alone = offline(checkpoint, files, args.max_batch)
        on = f"--max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g}"
        rows = {
            f"serve, batching on ({on})": served(checkpoint, files, **batching, log=Path(tmp) / "on.log", **load),
            "serve, batching off (--max-batch 1)": served(checkpoint, files, max_batch=1, max_wait_ms=0,
                                                          log=Path(tmp) / "off.log", **load),
        }
        if args.litserve:
            rows[f"LitServe {ls.__version__}, batching on (same settings)"] = litserved(
                checkpoint, files, **batching, log=Path(tmp) / "litserve.log", **load)
        print(f"load after: {load_average()}")
    print(f"\noffline predict, batch {args.max_batch}: {whole:.1f} images/s (whole call, model load included), "
          f"{alone:.1f} images/s (prediction alone)\n")
    print("| mode | images/s | vs predict (alone / whole call) | p50 ms | p95 ms | p99 ms | requests | errors | "
          "mean batch | RSS MiB start → end (peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        errors = f"{r['errors']}" + (f" ({', '.join(r['error_kinds'])})" if r["errors"] else "")
        print(f"| {name} | {r['images_s']:.1f} | {r['images_s'] / alone:.0%} / {r['images_s'] / whole:.0%} | "
              f"{r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | {r['p99'] * 1000:.0f} | {r['requests']} | {errors} | "
              f"{r['mean_batch']} | {r['rss_start']:.0f} → {r['rss_end']:.0f} ({r['rss_peak']:.0f}) |")


if __name__ == "__main__":
    main()
