"""``pneumodet pacs`` against a real Orthanc with its DICOMweb plugin, and against fake servers for faults.

Every server binds 127.0.0.1 on a free port; Orthanc keeps its database in a temporary folder and is
stopped at the end. Waits are bounded; the back-off between retries is recorded, not slept.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from _dicom_results import TINY_THRESHOLD, dciodvfy_errors, referenced_image, sr_content, tiny_checkpoint
from _helpers import assert_same_detections, kaggle_to_xyxy
from _orthanc import MISSING, Orthanc, free_port, orthanc_binary
from badinputs import blob_image, make_dicom
from pneumodet.cli import main
from pneumodet.submission import read_submission


@pytest.fixture
def orthanc_factory(tmp_path) -> Iterator:
    """Starts Orthancs on demand (``factory(folder=None)``); all are stopped at the end."""
    binary = orthanc_binary()
    if binary is None:
        pytest.skip(MISSING)
    started: list[Orthanc] = []

    def start(folder: Path | None = None, port: int | None = None) -> Orthanc:
        server = Orthanc(folder or tmp_path / f"orthanc{len(started)}", binary)
        if port is not None:
            server.port = port
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model.pt")


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The back-off waits between attempts, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr("pneumodet.clinical.dicomweb._wait", recorded.append)
    return recorded


def _images(real_sample: Path) -> list[Path]:
    return sorted((real_sample / "stage_2_train_images").glob("*.dcm"))


def _by_study(studies) -> list[str]:
    return [arg for study in studies for arg in ("--study", study)]


def _pacs(model: Path, url: str, *args: str) -> list[str]:
    return ["pacs", str(model), "--url", url, "--threshold", TINY_THRESHOLD, "--precision", "fp32", *args]


# ---------------------------------------------------------------- the round trip
def test_round_trip_by_study_stores_one_sr_and_pr_per_image_matching_predict(
        orthanc_factory, tiny_model, real_sample, tmp_path, capsys, waits):
    server = orthanc_factory()
    files = _images(real_sample)
    studies = server.upload(files)
    report = tmp_path / "pacs.json"
    code = main(_pacs(tiny_model, server.dicomweb, *_by_study(studies), "--json", str(report)))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "instances found: 16; radiographs: 16; skipped: 0" in out.out
    assert ("stored: 16 SR and 16 presentation state(s); 16 of 16 predicted image(s) complete, in 16 "
            "study(ies)") in out.out
    for step in ("pacs: fetch", "predict", "pacs: store"):  # plain progress lines off a terminal
        assert f"{step}: 16/16 images (100 %) in " in out.err, out.err
    assert waits == [] and server.count() == 48

    # what predict writes for the same files, for comparison
    sub = tmp_path / "sub.csv"
    assert main(["predict", str(tiny_model), *map(str, files), "--out", str(sub), "--threshold",
                 TINY_THRESHOLD, "--precision", "fp32"]) == 0
    capsys.readouterr()
    submission = read_submission(sub)
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
               pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    reports, states = server.instances("SR"), server.instances("PR")
    assert len(reports) == len(states) == 16
    by_source = {}
    for ds in reports + states:
        by_source.setdefault(referenced_image(ds), {})[ds.Modality] = ds
    assert set(by_source) == set(sources)
    boxes = 0
    for sop, pair in by_source.items():
        assert set(pair) == {"SR", "PR"}, sop
        source = sources[sop]
        assert pair["SR"].StudyInstanceUID == pair["PR"].StudyInstanceUID == source.StudyInstanceUID
        content = sr_content(pair["SR"])
        want = submission[source.PatientID]
        assert_same_detections(*kaggle_to_xyxy(content["boxes"]), *kaggle_to_xyxy(want), box_atol=0.5,
                               score_atol=1e-4, cut=False)
        boxes += len(content["boxes"])
    assert boxes > 0
    # the objects as the archive holds them are valid
    for n, ds in enumerate(reports[:3] + states[:3]):
        ds.save_as(tmp_path / f"back{n}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"back{n}.dcm") == [], ds.Modality
    data = json.loads(report.read_text())
    assert len(data["images"]) == 16 and all(i["sr_stored"] and i["pr_stored"] for i in data["images"])

    # again, by a search: the results stored before are skipped and listed, and nothing is stored twice
    code = main(_pacs(tiny_model, server.dicomweb, "--modality", "CR", "--date-from", "1900-01-01",
                      "--date-to", "1901-12-31"))
    out = capsys.readouterr().out
    assert code == 0
    assert "instances found: 48; radiographs: 16; skipped: 32" in out
    assert "not a radiograph (SR Comprehensive 3D SR Storage)" in out
    assert "not a radiograph (PR Grayscale Softcopy Presentation State Storage)" in out
    assert "... and 22 more skipped (all of them in --json)" in out
    assert server.count() == 48  # the same UIDs: the archive already had every object


def test_non_radiographs_and_other_modalities_are_skipped_and_listed(orthanc_factory, tiny_model, tmp_path,
                                                                      capsys):
    from pydicom.data import get_testdata_file

    server = orthanc_factory()
    (ct_study,) = server.upload([get_testdata_file("CT_small.dcm")])
    scan = make_dicom(tmp_path / "form.dcm", blob_image(64, 64, (8, 8, 40, 40)),
                      tags={"Modality": "OT", "StudyInstanceUID": ct_study,
                            "SeriesInstanceUID": "1.2.3.4.5.6"})
    server.upload([scan])
    code = main(_pacs(tiny_model, server.dicomweb, "--study", ct_study))
    out = capsys.readouterr()
    assert code == 2
    assert "instances found: 2; radiographs: 0; skipped: 2" in out.out
    assert "not a radiograph (CT CT Image Storage)" in out.out
    assert "modality OT is not among CR, DX (--modality)" in out.out
    assert out.err.strip() == (f"pneumodet pacs: error: {server.dicomweb}: none of the 2 instance(s) found "
                               "is a radiograph to predict (modality CR, DX); nothing stored")
    assert server.count() == 2

    assert main(_pacs(tiny_model, server.dicomweb, "--study", ct_study, "--modality", "OT")) == 0  # asked for
    assert "stored: 1 SR and 1 presentation state(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- faults
def test_a_wrong_study_uid_is_one_line_and_fetches_nothing(orthanc_factory, tiny_model, real_sample, capsys):
    server = orthanc_factory()
    server.upload(_images(real_sample)[:1])
    code = main(_pacs(tiny_model, server.dicomweb, "--study", "1.2.3.4.5.6.7"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"pneumodet pacs: error: {server.dicomweb}: study 1.2.3.4.5.6.7 not found (QIDO-RS lists "
                   "no instance of it); nothing fetched")
    for bad in ("../../instances", "1.2.3?x=1", "1.02.3"):  # never put into a URL
        assert main(_pacs(tiny_model, server.dicomweb, "--study", bad)) == 2
        err = capsys.readouterr().err.strip()
        assert "is not a DICOM UID" in err and len(err.splitlines()) == 1
    assert server.count() == 1


@pytest.mark.parametrize("when", ["fetch", "store"])
def test_the_server_stopped_mid_run(orthanc_factory, tiny_model, real_sample, tmp_path, capsys, waits,
                                    monkeypatch, when):
    """Orthanc is stopped after the 3rd retrieval or after the first stored image: one line naming the server
    and the status; what was stored is exactly what the summary says (checked on the restarted server)."""
    from pneumodet.clinical.dicomweb import DicomWebServer

    server = orthanc_factory(tmp_path / "orthanc")
    studies = server.upload(_images(real_sample))
    calls = {"n": 0}
    original = getattr(DicomWebServer, when)

    def then_stop(self, *args, **kwargs):
        answer = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == (3 if when == "fetch" else 1):
            server.stop()
        return answer

    monkeypatch.setattr(DicomWebServer, when, then_stop)
    report = tmp_path / "pacs.json"
    code = main(_pacs(tiny_model, server.dicomweb, *_by_study(studies), "--stow-batch", "2", "--retries", "2",
                      "--json", str(report)))
    out = capsys.readouterr()
    assert code == 2
    (line,) = out.err.strip().splitlines()[-1:]
    what = "WADO-RS retrieval of instance" if when == "fetch" else "STOW-RS of 2 instance(s) to study"
    assert line.startswith(f"pneumodet pacs: error: {server.dicomweb}: {what} ")
    assert line.endswith(": cannot connect (connection refused) (3 attempts)")
    assert waits == [1.0, 2.0]  # bounded, with back-off
    data = json.loads(report.read_text())
    stored = [i for i in data["images"] if i["sr_stored"] and i["pr_stored"]]
    if when == "fetch":
        assert stored == [] and len(data["not_attempted"]) == 16
        assert "stored: 0 SR and 0 presentation state(s)" in out.out
        assert "16 image(s) not attempted" in out.out
    else:
        assert len(stored) == 1 and len(data["images"]) == 16
        assert "stored: 1 SR and 1 presentation state(s); 1 of 16 predicted image(s) complete" in out.out
        assert out.out.count("  NOT STORED ") == 15
    restarted = orthanc_factory(tmp_path / "orthanc", port=server.port)  # the same database
    assert {str(ds.SOPInstanceUID) for ds in restarted.instances("SR")} == {i["sr"] for i in stored}
    assert {str(ds.SOPInstanceUID) for ds in restarted.instances("PR")} == {i["pr"] for i in stored}


class _Fake(BaseHTTPRequestHandler):
    """A configurable fake DICOMweb server: ``respond(handler) -> (status, headers, body)``; requests are
    logged."""

    respond = None
    log: list = []

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        elif self.headers.get("Transfer-Encoding") == "chunked":
            while (size := int(self.rfile.readline().strip() or b"0", 16)):
                self.rfile.read(size + 2)
            self.rfile.readline()
        type(self).log.append((self.command, self.path, self.headers.get("Authorization")))
        status, headers, body = type(self).respond(self)
        if status is None:  # never answer
            time.sleep(5)
            return
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _any

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator:
    """``start(respond) -> (url, log)``: a fake DICOMweb server on 127.0.0.1 answering with ``respond``."""
    servers = []

    def start(respond):
        handler = type("Handler", (_Fake,), {"respond": staticmethod(respond), "log": []})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web", handler.log

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_500_from_the_server_is_retried_then_one_line(fake_server, tiny_model, capsys, waits):
    url, log = fake_server(lambda h: (500, {"Content-Type": "text/html"}, b"<h1>boom</h1>"))
    code = main(_pacs(tiny_model, url, "--study", "1.2.3.4"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"pneumodet pacs: error: {url}: QIDO-RS search for instances of study 1.2.3.4: "
                   "HTTP 500 Internal Server Error (4 attempts)")
    assert len(log) == 4 and waits == [1.0, 2.0, 4.0]


def test_a_failing_stow_is_retried_reported_and_nothing_is_half_stored(
        orthanc_factory, fake_server, tiny_model, real_sample, tmp_path, capsys, waits):
    """A proxy passes searches and retrievals to Orthanc and answers every STOW-RS with 503, Retry-After 3."""
    server = orthanc_factory()
    studies = server.upload(_images(real_sample)[:4])

    def proxy(handler):
        if handler.command == "POST":
            return 503, {"Retry-After": "3"}, b""
        forwarded = urllib.request.Request(server.rest + handler.path,
                                           headers={"Accept": handler.headers.get("Accept", "*/*")})
        with urllib.request.urlopen(forwarded, timeout=30) as answer:
            return answer.status, {"Content-Type": answer.headers["Content-Type"]}, answer.read()

    url, log = fake_server(proxy)
    report = tmp_path / "pacs.json"
    code = main(_pacs(tiny_model, url, *[a for s in studies for a in ("--study", s)], "--json", str(report)))
    out = capsys.readouterr()
    assert code == 2
    assert out.err.strip().splitlines()[-1] == (
        f"pneumodet pacs: error: {url}: STOW-RS of 2 instance(s) to study {studies[0]}: "
        "HTTP 503 Service Unavailable (4 attempts)")
    assert sum(1 for method, _, _ in log if method == "POST") == 4  # bounded
    assert waits == [3.0, 3.0, 4.0]  # the server's Retry-After, else the back-off
    assert "stored: 0 SR and 0 presentation state(s); 0 of 4 predicted image(s) complete" in out.out
    assert out.out.count("  NOT STORED ") == 4 and "retried: STOW-RS" in out.out
    assert all(not i["sr_stored"] and not i["pr_stored"] for i in json.loads(report.read_text())["images"])
    assert server.count() == 4  # nothing reached the archive


def test_a_server_that_never_answers_times_out_in_one_line(fake_server, tiny_model, capsys, waits):
    url, _ = fake_server(lambda h: (None, {}, b""))
    start = time.monotonic()
    code = main(_pacs(tiny_model, url, "--study", "1.2.3", "--timeout", "0.5", "--retries", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - start < 30
    assert err == (f"pneumodet pacs: error: {url}: QIDO-RS search for instances of study 1.2.3: no answer "
                   "within 0.5 s (2 attempts)")


def test_nothing_listening_is_one_line(tiny_model, capsys, waits):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert main(_pacs(tiny_model, url, "--modality", "CR", "--retries", "0")) == 2
    assert capsys.readouterr().err.strip() == (
        f"pneumodet pacs: error: {url}: QIDO-RS search for studies: cannot connect (connection refused)")


def test_credentials_come_from_the_environment_or_a_file_never_the_command_line(
        fake_server, tiny_model, tmp_path, capsys, monkeypatch, waits):
    token = "s3cr3t-t0ken"

    def guarded(handler):
        if handler.headers.get("Authorization") != f"Bearer {token}":
            return 401, {}, b""
        return 200, {"Content-Type": "application/dicom+json"}, b"[]"

    url, log = fake_server(guarded)
    monkeypatch.setenv("PACS_TOKEN", f"Bearer {token}")
    assert main(_pacs(tiny_model, url, "--study", "1.2.3", "--auth-env", "PACS_TOKEN")) == 2
    out = capsys.readouterr()
    assert "study 1.2.3 not found" in out.err and token not in out.out + out.err
    assert log[-1][2] == f"Bearer {token}"

    secret = tmp_path / "auth"
    secret.write_text("Basic alice:wonder land\n")
    secret.chmod(0o644)
    assert main(_pacs(tiny_model, url, "--study", "1.2.3", "--auth-file", str(secret))) == 2
    out = capsys.readouterr()
    assert f"warning: --auth-file {secret} can be read by other users (mode 644)" in out.err
    assert out.err.strip().splitlines()[-1] == (
        f"pneumodet pacs: error: {url}: QIDO-RS search for instances of study 1.2.3: HTTP 401 Unauthorized "
        f"(credentials: --auth-file {secret})")
    assert log[-1][2].startswith("Basic ") and "wonder" not in out.err

    requests_before = len(log)
    for argv, message in (
            (["--url", url.replace("http://", "http://alice:pw@")], "--url holds a user name or password"),
            (["--auth-env", "NO_SUCH_VARIABLE"], "--auth-env NO_SUCH_VARIABLE: the environment variable"),
            (["--auth-env", "PACS_TOKEN", "--auth-file", str(secret)], "not both")):
        monkeypatch.setenv("PACS_TOKEN", f"Bearer {token}")
        code = main(["pacs", str(tiny_model), "--url", url, "--study", "1.2.3", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert "pw" not in err.replace("pneumodet", "")
    monkeypatch.setenv("PACS_TOKEN", "token-without-scheme")
    assert main(_pacs(tiny_model, url, "--study", "1.2.3", "--auth-env", "PACS_TOKEN")) == 2
    err = capsys.readouterr().err
    assert "credentials must read 'Bearer <token>' or 'Basic <user>:<password>'" in err
    assert "token-without-scheme" not in err
    assert len(log) == requests_before  # refused before any request


def test_bad_options_are_one_line_before_any_request(fake_server, tiny_model, capsys):
    url, log = fake_server(lambda h: (200, {"Content-Type": "application/dicom+json"}, b"[]"))
    for argv, message in (
            ([], "name what to fetch"),
            (["--date-from", "2020-13-01"], "--date-from '2020-13-01' is not a date"),
            (["--date-from", "2021-01-01", "--date-to", "2020-01-01"], "is after --date-to"),
            (["--study", "1.2.3", "--date-from", "2020-01-01"], "with --study or --series"),
            (["--modality", "C;R"], "is not a DICOM modality"),
            (["--study", "1.2.3", "--batch-size", "0"], "batch size must be at least 1"),
            (["--study", "1.2.3", "--chunk", "0"], "--chunk must be at least 1"),
            (["--study", "1.2.3", "--uid-root", "9.x"], "UID root"),
            (["--study", "1.2.3", "--timeout", "0"], "--timeout must be above 0")):
        code = main(["pacs", str(tiny_model), "--url", url, *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert main(["pacs", str(tiny_model), "--url", "ftp://pacs/x", "--study", "1.2.3"]) == 2
    assert "is not an http:// or https:// URL" in capsys.readouterr().err
    assert log == []


def test_qido_paging_ends_when_the_server_ignores_offset(orthanc_factory, fake_server, real_sample):
    """Orthanc 1.10's paging fails with ``ModalitiesInStudy`` (``offset`` alone is ignored, so
    dicomweb-client's ``get_remaining`` asks forever; ``limit`` with ``offset`` gives an empty second page);
    a fake server repeats its page whatever the offset. Paging ends, and every match is there once."""
    from pneumodet.clinical.dicomweb import DicomWebServer

    server = orthanc_factory()
    studies = set(server.upload(_images(real_sample)))
    for filters in ({"ModalitiesInStudy": "CR"}, {}):  # offset ignored / honoured
        found = DicomWebServer(server.dicomweb, page_size=5).search("studies", filters=filters)
        assert sorted(row["0020000D"]["Value"][0] for row in found) == sorted(studies), filters

    page = json.dumps([{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]}} for i in range(3)]).encode()
    url, log = fake_server(lambda h: (200, {"Content-Type": "application/dicom+json"}, page))
    found = DicomWebServer(url, page_size=3).search("studies")
    assert [row["0020000D"]["Value"][0] for row in found] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert len(log) == 3  # the second page repeated the first: then once without paging
    assert "limit=" in log[0][1] and "limit=" not in log[2][1]


def test_images_of_one_study_are_stored_in_batches_with_their_sr_and_pr_together(
        orthanc_factory, tiny_model, tmp_path, capsys, monkeypatch):
    from pydicom.uid import generate_uid

    from pneumodet.clinical.dicomweb import DicomWebServer

    server = orthanc_factory()
    study, series = generate_uid(), generate_uid()
    server.upload([make_dicom(tmp_path / f"p{i}.dcm", blob_image(64, 64, (8 + i, 8, 40, 40)), patient_id="p1",
                              tags={"StudyInstanceUID": study, "SeriesInstanceUID": series}) for i in range(5)])
    requests: list[list[str]] = []
    original = DicomWebServer.store

    def recorded(self, study_uid, datasets):
        requests.append([ds.Modality for ds in datasets])
        return original(self, study_uid, datasets)

    monkeypatch.setattr(DicomWebServer, "store", recorded)
    assert main(_pacs(tiny_model, server.dicomweb, "--study", study, "--stow-batch", "4", "--threshold", "0.0")) == 0
    assert "stored: 5 SR and 5 presentation state(s); 5 of 5 predicted image(s) complete, in 1 study(ies)" in (
        capsys.readouterr().out)
    assert requests == [["SR", "PR", "SR", "PR"], ["SR", "PR", "SR", "PR"], ["SR", "PR"]]
    assert server.count() == 15 and len(server.instances("SR")) == 5


def test_ctrl_c_while_storing_still_says_what_was_stored(orthanc_factory, tiny_model, real_sample, capsys,
                                                        monkeypatch):
    from pneumodet.clinical.dicomweb import DicomWebServer

    server = orthanc_factory()
    studies = server.upload(_images(real_sample)[:4])
    original, calls = DicomWebServer.store, []

    def interrupted_on_the_second(self, study, datasets):
        calls.append(study)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, study, datasets)

    monkeypatch.setattr(DicomWebServer, "store", interrupted_on_the_second)
    assert main(_pacs(tiny_model, server.dicomweb, *_by_study(studies))) == 130
    out = capsys.readouterr()
    assert out.err.strip().splitlines()[-1] == "pneumodet pacs: interrupted"
    assert "stored: 1 SR and 1 presentation state(s); 1 of 4 predicted image(s) complete" in out.out
    assert "interrupted during its STOW-RS request (the server may hold it)" in out.out
    assert out.out.count("not attempted: the run stopped before") == 2
    assert "the same command again stores what is missing, and nothing twice" in out.out
    assert len(server.instances("SR")) == 1
