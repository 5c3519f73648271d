"""``pneumodet serve``: the API contract, dynamic batching, every bad input, auth, privacy, graceful SIGTERM.

A tiny run (64-px resnet18, scores spread around the 0.5 threshold) is served in fp32 on the CPU. Most
tests use FastAPI's in-process client; batching, slow uploads and the declared-size check use a live
uvicorn server in a thread (real sockets), and SIGTERM a real ``pneumodet serve`` process. Nothing
depends on timing: batches are held by a gate on the model until the queue holds what the test needs.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from _helpers import assert_one_line_error, assert_same_detections
from _serve_helpers import (
    SIZE,
    THRESHOLD,
    VAL_MAP,
    LiveServer,
    dicom_files,
    gated,
    make_served_run,
    parts,
    wait_for,
)
from badinputs import (
    add_identifying_data,
    blob_image,
    broken_dicom_cases,
    decompression_bombs,
    find_identifying,
    make_dicom,
)
from pneumodet.cli import main
from pneumodet.serve import Limits, ServedModel, ServeSettings, create_app

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # read_dicom's notes on odd test images


@pytest.fixture(scope="module")
def served_run(tmp_path_factory) -> Path:
    return make_served_run(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def model(served_run) -> ServedModel:
    return ServedModel(served_run, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def files(real_sample) -> list[Path]:
    return dicom_files(real_sample)


def _client(model, **settings):
    from fastapi.testclient import TestClient

    limits = settings.pop("limits", Limits())
    return TestClient(create_app(model, ServeSettings(limits=limits, **settings)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(model):
    with _client(model) as c:
        yield c


def _xyxy(image: dict) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(image["boxes"], dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1), np.asarray(image["scores"], dtype=np.float64)


def assert_same_image(got: dict, want: dict) -> None:
    """The same image's answers: same IDs, boxes as matched sets (never by position), probabilities close."""
    for key in ("patientId", "sopInstanceUID", "original_size"):
        assert got[key] == want[key]
    assert_same_detections(*_xyxy(got), *_xyxy(want), box_atol=0.5, score_atol=2e-4)
    assert got["class_probs"].keys() == want["class_probs"].keys()
    np.testing.assert_allclose(list(got["class_probs"].values()), list(want["class_probs"].values()), atol=2e-4)


def _error(response, status: int, *patterns: str) -> dict:
    """A JSON error of ``status`` whose message matches every pattern, and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str)
    assert "Traceback" not in response.text and "File \"" not in response.text
    for pattern in patterns:
        assert re.search(pattern, body["error"]), (pattern, body["error"])
    return body


# ---------------------------------------------------------------- contract
def test_model_card_describes_the_run_and_no_patient(client, served_run):
    card = client.get("/v1/model").json()
    assert card["encoder"] == "resnet18" and card["image_size"] == SIZE
    assert card["validation_threshold"] == THRESHOLD and card["validation_map"] == VAL_MAP
    import hashlib

    from pneumodet.rundir import RunDir

    assert card["checkpoint_sha256"] == hashlib.sha256(RunDir(served_run).best_model.read_bytes()).hexdigest()
    # epoch 3 from 0 in the checkpoint: the fourth, as train and the reports count
    assert card["metrics"]["validation"] == {"rsna_map": VAL_MAP, "threshold": THRESHOLD, "epoch": 4,
                                             "best_rsna_map": VAL_MAP}
    assert card["metrics"]["test"] == {"rsna_map": 0.125, "images": 3, "images_scored": 2, "threshold": THRESHOLD,
                                       "accuracy": 0.5, "pneumonia_auc": 0.75}
    training = card["training"]
    assert training["data"] == "data"  # the folder's name, not its path
    assert training["split"]["patients"] == {"train": 6, "val": 3, "test": 3}
    assert training["encoder_weights"] == "random initialisation" and card["notes"] == []
    text = json.dumps(card)
    patients = [line.split(",")[0] for line in (served_run.parent / "data" / "stage_2_train_labels.csv")
                .read_text().splitlines()[1:]]
    assert patients and not [p for p in patients if p in text]  # counts only, never a patient
    assert str(served_run.parent) not in text  # nor a path of the serving machine


def test_model_card_of_a_checkpoint_file_or_a_damaged_run(served_run, tmp_path):
    import shutil

    from pneumodet.evaluation import METRICS_FILE
    from pneumodet.rundir import RunDir

    alone = shutil.copy(RunDir(served_run).best_model, tmp_path / "model.pt")
    card = ServedModel(alone, device="cpu").model_card()
    assert card["training"] == {} and card["notes"] == ["served from a checkpoint file: no run folder to describe "
                                                        "the training"]
    assert card["validation_map"] == VAL_MAP and card["checkpoint"] == "model.pt"
    damaged = RunDir(shutil.copytree(served_run, tmp_path / "run"))
    damaged.done.write_text("{not json")
    damaged.config.write_text("model: [unclosed")
    (damaged.eval_dir("test") / METRICS_FILE).write_bytes(b"\xff\xfe")
    card = ServedModel(damaged.root, device="cpu").model_card()  # the model still serves; the card says what is missing
    assert card["training"] == {} and "test" not in card["metrics"]
    assert [note.split(":")[0].split(" (")[0] for note in card["notes"]] == [
        "run config unreadable", "the run has no readable done.json", "the test evaluation's metrics are unreadable"]


def test_predict_answers_each_image_in_original_pixels(client, model, files):
    response = client.post("/v1/predict", files=parts(*files[:3]))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["threshold"] == THRESHOLD and body["threshold_source"] == "run validation"
    assert body["model"]["checkpoint_sha256"] == model.sha256 and body["model"]["validation_map"] == VAL_MAP
    assert [image["file"] for image in body["images"]] == [f.name for f in files[:3]]
    import pydicom

    for path, image in zip(files[:3], body["images"], strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert image["patientId"] == ds.PatientID and image["sopInstanceUID"] == ds.SOPInstanceUID
        assert image["original_size"] == [ds.Rows, ds.Columns]
        assert len(image["boxes"]) == len(image["scores"])
        assert all(s >= THRESHOLD for s in image["scores"]) and image["scores"] == sorted(image["scores"], reverse=True)
        for x, y, w, h in image["boxes"]:
            assert min(x, y) >= 0 and w > 0 and h > 0 and x + w <= ds.Columns + 0.01 and y + h <= ds.Rows + 0.01
        assert list(image["class_probs"]) == ["Normal", "Lung Opacity", "No Lung Opacity / Not Normal"]
        assert sum(image["class_probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert "preview" not in image
    assert sum(len(image["boxes"]) for image in body["images"]) > 0
    # the same file as an application/dicom body gets the same answer
    alone = client.post("/v1/predict", content=files[1].read_bytes(),
                        headers={"content-type": "application/dicom",
                                 "content-disposition": f'attachment; filename="{files[1].name}"'}).json()
    assert alone["images"][0]["file"] == files[1].name
    assert_same_image(alone["images"][0], body["images"][1])


def test_service_answers_what_offline_predict_writes(client, served_run, files, tmp_path):
    out = tmp_path / "predict.json"
    assert main(["predict", str(served_run), *map(str, files[:5]), "--out", str(tmp_path / "sub.csv"),
                 "--json", str(out), "--precision", "fp32", "--device", "cpu", "--no-compile"]) == 0
    offline = {image["sopInstanceUID"]: image for image in json.loads(out.read_text())["images"]}
    served = client.post("/v1/predict", files=parts(*files[:5])).json()["images"]
    assert len(served) == len(offline) == 5
    for image in served:
        assert_same_image(image, offline[image["sopInstanceUID"]])


def test_threshold_and_preview_on_request(client, files):
    base = client.post("/v1/predict", files=parts(files[0])).json()["images"][0]
    low = client.post("/v1/predict?threshold=0&preview=1", files=parts(files[0])).json()
    assert low["threshold"] == 0 and low["threshold_source"] == "request"
    image = low["images"][0]

    def kept(cut: float) -> dict:
        return {**image, "boxes": [b for b, s in zip(image["boxes"], image["scores"], strict=True) if s >= cut],
                "scores": [s for s in image["scores"] if s >= cut]}

    assert_same_image(kept(THRESHOLD), base)  # the run's threshold, applied by the service
    cut = float(np.median(image["scores"]))
    mid = client.post(f"/v1/predict?threshold={cut}", files=parts(files[0])).json()["images"][0]
    assert 0 < len(mid["scores"]) < len(image["scores"]) and min(mid["scores"]) >= cut
    assert_same_image(mid, kept(cut))
    from PIL import Image

    preview = image["preview"]
    assert preview["png"].startswith("data:image/png;base64,")
    import base64

    picture = Image.open(io.BytesIO(base64.b64decode(preview["png"].split(",", 1)[1])))
    assert picture.size == (preview["width"], preview["height"]) and max(picture.size) == 768
    assert picture.mode == "L" and np.asarray(picture).std() > 10  # the windowed radiograph, not a blank


def test_probes_metrics_docs_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/dicom"} <= set(body)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # the OpenAPI page works offline
    assets = re.findall(r'(?:src|href)="(/docs-static/[^"]+)"', docs.text)
    assert len(assets) >= 2 and all(client.get(a).status_code == 200 for a in assets)
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text and not re.search(r"https?://", page.text)
    for asset in ("app.js", "style.css"):
        text = client.get(f"/static/{asset}").text
        assert not re.search(r"https?://", text), f"{asset} loads something from outside the service"
    client.post("/v1/predict", files=[("file", ("empty.dcm", b"", "application/dicom"))])  # a 422
    metrics = client.get("/metrics").text
    for series in ("pneumodet_http_requests_total", "pneumodet_http_request_duration_seconds_bucket",
                   "pneumodet_batch_size_bucket", "pneumodet_queue_depth", "pneumodet_images_total",
                   "pneumodet_model_info"):
        assert series in metrics
    assert re.search(r'pneumodet_http_requests_total\{route="/v1/predict",method="POST",status="422"\} [1-9]', metrics)
    assert client.get("/no/such/page").json() == {"status": 404, "error": "Not Found"}
    assert 'route="other"' in client.get("/metrics").text  # unknown paths share one series


# ---------------------------------------------------------------- batching
def _send(url: str, paths: list[Path]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post("/v1/predict", files=parts(*paths))


def _post(url: str, path: Path) -> dict:
    response = _send(url, [path])
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_concurrent_clients_get_the_answers_of_sequential_calls(model, files):
    app = create_app(model, ServeSettings(max_batch=4, max_wait_ms=20))
    batcher = app.state.pneumodet.batcher
    jobs = files[:6] * 2  # 12 simultaneous clients, each image twice
    with LiveServer(app) as live:
        sequential = {path.name: _post(live.url, path) for path in files[:6]}
        with gated(model) as (gate, sizes), ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(_post, live.url, path) for path in jobs]
            wait_for(lambda: len(sizes) == 1, 120, "the first batch")  # held: everything else queues
            wait_for(lambda: sizes[0] + batcher.depth == len(jobs), 120, "every client queued")
            gate.set()
            answers = [future.result() for future in futures]
        metrics = httpx.get(f"{live.url}/metrics").text
    assert sum(sizes) == len(jobs) and all(1 <= s <= 4 for s in sizes)
    assert sizes.count(4) >= 2  # the 8+ queued images ran as full batches of --max-batch
    for path, answer in zip(jobs, answers, strict=True):
        assert answer["file"] == path.name
        assert_same_image(answer, sequential[path.name])
    batch_count = int(re.search(r"^pneumodet_batch_size_count (\d+)$", metrics, re.M).group(1))
    assert batch_count == 6 + len(sizes)  # 6 sequential calls, one batch each, then the gated batches
    assert re.search(r'^pneumodet_images_total\{outcome="predicted"\} 18$', metrics, re.M)


# ---------------------------------------------------------------- bad inputs
def test_unreadable_files_are_422_naming_each(client, files, tmp_path):
    good = make_dicom(tmp_path / "good.dcm", blob_image(64, 64, (8, 8, 40, 40)))
    cases = {**broken_dicom_cases(tmp_path / "broken", good), **decompression_bombs(tmp_path / "bombs")}
    for name, (path, cause) in cases.items():
        body = _error(client.post("/v1/predict", files=parts(path)), 422, re.escape(path.name))
        assert body["files"] == [{"file": path.name, "cause": body["files"][0]["cause"]}], name
        assert re.search(cause, body["files"][0]["cause"]), (name, body["files"][0]["cause"])
    # several at once: every bad file named, the good ones not, nothing predicted
    bad = [cases["png_renamed"][0], cases["empty"][0], cases["jpeg_65535"][0]]
    body = _error(client.post("/v1/predict", files=parts(files[0], *bad)), 422, r"3 of 4 file\(s\)")
    assert [f["file"] for f in body["files"]] == [p.name for p in bad]
    # a client's file name is a label, never a path: folders dropped, length bounded, nothing written by it
    junk = cases["text_renamed"][0].read_bytes()
    for sent, shown in (("../../../tmp/evil.dcm", "evil.dcm"), ("x" * 300 + ".dcm", "x" * 200), ("/", "file 1")):
        body = _error(client.post("/v1/predict", files=[("file", (sent, junk, "application/dicom"))]), 422)
        assert body["files"][0]["file"] == shown
    assert not Path("/tmp/evil.dcm").exists()


def test_size_count_type_and_parameter_limits(model, files, tmp_path):
    limits = Limits(max_upload_bytes=1_000_000, max_files=2, timeout_s=60, max_queue=4)
    small = [make_dicom(tmp_path / f"small{i}.dcm", blob_image(64, 64, (8, 8, 40, 40))) for i in range(3)]
    with _client(model, limits=limits) as c:
        _error(c.post("/v1/predict", files=parts(*small)), 413, r"too many files: at most 2")
        big = [("file", ("big.dcm", b"\0" * 1_100_000, "application/dicom"))]
        body = _error(c.post("/v1/predict", files=big), 413, r"at most 1000000 bytes")
        assert body["limit_bytes"] == 1_000_000

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(40):
                yield b"\0" * 30_000
        _error(c.post("/v1/predict", content=chunks(), headers={"content-type": "application/dicom"}), 413,
               r"at most 1000000 bytes")
        _error(c.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}), 415,
               r"unsupported content type 'application/json'.*multipart/form-data")
        fields_only = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file\r\n--b--\r\n'
        _error(c.post("/v1/predict", content=fields_only, headers={"content-type": "multipart/form-data; boundary=b"}),
               400, r"no file in the request")
        _error(c.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
               400, r"malformed multipart")
        _error(c.post("/v1/predict?threshold=1.5", files=parts(files[0])), 422, r"threshold")
        _error(c.post("/v1/predict?format=png", files=parts(files[0])), 422, r"format")
        assert c.post("/v1/predict", files=parts(*files[:2])).status_code == 200  # at the limits: fine


def _raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send ``head`` and ``body`` on a raw socket (the body may be shorter than the head declares) and read
    the answer: (status, JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + body)
        data = b""
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(re.search(rb"content-length: *(\d+)", data[:head_end], re.I).group(1))
                if len(data) >= head_end + 4 + length:
                    break
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a whole answer: {data!r}"
            data += chunk
    return int(data.split(b" ", 2)[1]), json.loads(data[head_end + 4:head_end + 4 + length])


def test_declared_oversize_refused_before_the_body_and_slow_upload_times_out(model):
    limits = Limits(max_upload_bytes=1 << 20, max_files=2, timeout_s=1.0, max_queue=4)
    with LiveServer(create_app(model, ServeSettings(limits=limits))) as live:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                b"Content-Length: 1000000000000\r\n\r\n")
        status, body = _raw_request(live.port, head)  # no body sent at all: refused on the header alone
        assert status == 413 and "1000000000000 bytes declared" in body["error"]
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                b"Content-Length: 5000\r\n\r\n")
        status, body = _raw_request(live.port, head, b"\0" * 100)  # then nothing: a stalled upload
        assert status == 504 and "not answered within 1 s" in body["error"]
        assert httpx.get(f"{live.url}/readyz").status_code == 200  # the service is still fine


def test_full_queue_and_too_many_requests_are_503_with_retry_after(model, files):
    limits = Limits(max_files=3, max_queue=3, timeout_s=120)
    app = create_app(model, ServeSettings(max_batch=1, max_wait_ms=0, limits=limits))
    state = app.state.pneumodet
    with LiveServer(app) as live, gated(model) as (gate, sizes), ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, live.url, files[0])
        wait_for(lambda: len(sizes) == 1, 60, "the first batch (held)")
        with httpx.Client(base_url=live.url, timeout=60) as c:
            second = pool.submit(_send, live.url, files[1:3])
            wait_for(lambda: state.batcher.depth == 2, 60, "two images queued")
            full = c.post("/v1/predict", files=parts(*files[3:5]))  # 2 + 2 > 3 images
            body = _error(full, 503, r"the queue holds 2 image\(s\) of at most 3")
            assert int(full.headers["retry-after"]) >= 1 and body["status"] == 503
            third = pool.submit(_post, live.url, files[5])  # 1 image fits: 3 requests in progress now
            wait_for(lambda: state.batcher.depth == 3, 60, "three images queued")
            busy = c.post("/v1/predict", files=parts(files[6]))
            _error(busy, 503, r"3 prediction requests are in progress \(at most 3\)")
            assert int(busy.headers["retry-after"]) >= 1
            gate.set()
            assert first.result()["file"] == files[0].name and third.result()["file"] == files[5].name
            assert second.result().status_code == 200
    assert sizes == [1, 1, 1, 1]


def test_timeout_drops_the_images_of_the_request(model, files):
    app = create_app(model, ServeSettings(limits=Limits(timeout_s=0.5)))
    from fastapi.testclient import TestClient

    with TestClient(app) as c, gated(model) as (gate, sizes):
        _error(c.post("/v1/predict", files=parts(files[0], files[1])), 504, r"not answered within 0.5 s")
        assert app.state.pneumodet.batcher.depth == 0  # nothing of it left waiting
        assert 'pneumodet_images_total{outcome="dropped"} 2' in c.get("/metrics").text


def test_internal_error_is_a_json_500_without_details(model, files, caplog):
    with _client(model) as c, gated(model) as (gate, _):
        def boom(images):
            raise RuntimeError("kernel exploded at /secret/path")
        model.run_batch = boom  # gated() restores the real one
        gate.set()
        response = c.post("/v1/predict", files=parts(files[0]))
        _error(response, 500, r"internal error")
        assert "secret" not in response.text and "exploded" not in response.text
        assert c.get("/readyz").status_code == 200  # one failed batch does not stop the service
    assert "kernel exploded" in caplog.text  # the details are in the server's log


def test_not_ready_while_draining(model, files):
    with _client(model) as c:
        c.app.state.pneumodet.draining = True
        _error(c.get("/readyz"), 503, r"not ready")
        response = c.post("/v1/predict", files=parts(files[0]))
        _error(response, 503, r"shutting down")
        assert response.headers["retry-after"] == "5"


# ---------------------------------------------------------------- auth, privacy, SR
def test_bearer_token_guards_the_api(model, files):
    token = "t0ken-for-tests-0123456789"
    with _client(model, token=token) as c:
        for method, path in (("get", "/v1/model"), ("post", "/v1/predict")):
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": token}):
                response = getattr(c, method)(path, headers=headers)
                _error(response, 401, r"bearer token")
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {token}"}
        assert c.get("/v1/model", headers=good).json()["serving"]["auth"] is True
        assert c.post("/v1/predict", files=parts(files[0]), headers=good).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js"):
            assert c.get(open_path).status_code == 200  # probes and the page need no token
        spec = c.get("/openapi.json").json()
        assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_answers_and_logs_carry_ids_only(model, tmp_path, caplog):
    import logging

    path = add_identifying_data(make_dicom(tmp_path / "phi.dcm", blob_image(96, 96, (20, 20, 60, 70)),
                                           patient_id="PID-4242"))
    caplog.set_level(logging.INFO, logger="pneumodet.serve")
    with _client(model) as c:
        response = c.post("/v1/predict?preview=1&threshold=0", files=parts(path))
    assert response.status_code == 200 and response.json()["images"][0]["patientId"] == "PID-4242"
    assert find_identifying(response.content) == []
    assert find_identifying(caplog.text.encode()) == [] and "PID-4242" in caplog.text  # IDs only
    assert "phi.dcm" not in caplog.text  # a file name may hold anything: never logged
    caplog.clear()
    with _client(model, log_ids="hash") as c:
        assert c.post("/v1/predict", files=parts(path)).status_code == 200
    assert "PID-4242" not in caplog.text and re.search(r"patient#[0-9a-f]{16} sop#[0-9a-f]{16}", caplog.text)


def test_dicom_sr_answers(client, files, tmp_path, monkeypatch):
    pytest.importorskip("highdicom")
    import pydicom

    response = client.post("/v1/predict?format=sr", files=parts(files[0]))
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    report = pydicom.dcmread(io.BytesIO(response.content))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert report.Modality == "SR" and report.PatientID == source.PatientID
    assert source.SOPInstanceUID in response.content.decode("latin-1")  # the image it reports on
    several = client.post("/v1/predict?format=sr", files=parts(*files[:2]))
    assert several.status_code == 200
    kind = several.headers["content-type"]
    assert kind.startswith('multipart/related; type="application/dicom"')
    boundary = kind.rsplit("boundary=", 1)[1].encode()
    bodies = [p.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0] for p in several.content.split(b"--" + boundary)
              if p.strip() not in (b"", b"--")]
    assert [pydicom.dcmread(io.BytesIO(b)).Modality for b in bodies] == ["SR", "SR"]
    no_uid = make_dicom(tmp_path / "no_uid.dcm", blob_image(64, 64, (8, 8, 40, 40)), omit=("StudyInstanceUID",))
    _error(client.post("/v1/predict?format=sr", files=parts(no_uid)), 422, r"no_uid\.dcm.*StudyInstanceUID")


# ---------------------------------------------------------------- the command line
def test_cli_refuses_bad_runs_settings_tokens_and_addresses(served_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PNEUMODET_SERVE_TOKEN", raising=False)
    cases = [
        ([str(tmp_path / "missing")], r"no such checkpoint file or run directory"),
        ([str(served_run), "--max-files", "0"], r"files per request must be at least 1"),
        ([str(served_run), "--max-files", "100", "--max-queue", "10"], r"queue \(10 images\) must hold"),
        ([str(served_run), "--max-batch", "0"], r"--max-batch must be at least 1"),
        ([str(served_run), "--max-wait-ms", "-1"], r"--max-wait-ms must be from 0 to 10000"),
        ([str(served_run), "--max-upload-mb", "0"], r"upload limit must be at least 1 KiB"),
        ([str(served_run), "--timeout", "0"], r"request timeout must be a positive"),
        ([str(served_run), "--device", "tpu"], r"device 'tpu'"),
        ([str(served_run), "--host", "192.0.2.1", "--device", "cpu"], r"cannot listen on 192.0.2.1:8000"),
    ]
    for argv, pattern in cases:
        code = main(["serve", *argv])
        assert_one_line_error(code, capsys.readouterr().err, "serve", pattern)
    from pneumodet.model import ModelConfig, build_model, save_checkpoint

    no_threshold = save_checkpoint(tmp_path / "no_threshold.pt", build_model(ModelConfig(encoder="resnet18",
                                                                                         image_size=SIZE)))
    assert_one_line_error(main(["serve", str(no_threshold), "--device", "cpu"]), capsys.readouterr().err, "serve",
                          r"no_threshold\.pt: records no usable validation threshold \(None\)")
    monkeypatch.setenv("PNEUMODET_SERVE_TOKEN", "short")
    assert_one_line_error(main(["serve", str(served_run)]), capsys.readouterr().err, "serve",
                          r"PNEUMODET_SERVE_TOKEN is set but shorter than 16")
    monkeypatch.delenv("PNEUMODET_SERVE_TOKEN")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(main(["serve", str(served_run), "--port", str(port), "--device", "cpu"]),
                              capsys.readouterr().err, "serve", rf"cannot listen on 127.0.0.1:{port}")


def _read_line(stream, seconds: float) -> str:
    """The next line of a subprocess's stream, or an AssertionError after ``seconds`` (never a hang)."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert line, f"no line within {seconds} s"
    return line[0]


def test_sigterm_mid_load_answers_every_request_in_progress(served_run, files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PNEUMODET_SERVE_TOKEN", None)
    # a batch waits up to 10 s for fuller batches: the requests are surely in progress when SIGTERM comes
    proc = subprocess.Popen([sys.executable, "-m", "pneumodet.cli", "serve", str(served_run), "--port", "0",
                             "--device", "cpu", "--precision", "fp32", "--max-batch", "64", "--max-wait-ms", "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = _read_line(proc.stdout, 180)
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/", banner).group(1)
        jobs = files[:6]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(_post, url, path) for path in jobs]

            def queued() -> int:
                text = httpx.get(f"{url}/metrics", timeout=30).text
                return int(re.search(r"^pneumodet_queue_depth (\d+)$", text, re.M).group(1))

            wait_for(lambda: queued() == len(jobs), 120, "every image queued")
            proc.send_signal(signal.SIGTERM)
            failed = [f.exception(timeout=120) for f in futures]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not any(failed), f"{failed}\n{err}"
    assert [f.result()["file"] for f in futures] == [p.name for p in jobs]
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM)" in out and "Traceback" not in err
    assert re.search(r"stopped: 1 batch\(es\) run", err)  # the queued images ran at once, as one batch
