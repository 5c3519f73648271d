"""A real Orthanc with its DICOMweb plugin for the PACS tests and benchmark (docs: /work/shared/docs).

:class:`Orthanc` runs one ``Orthanc`` process on 127.0.0.1 at a free port, its database in a folder of
the caller's (temporary), without authentication or remote access; :func:`orthanc_binary` finds the
program (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by
``scripts/install-system-deps.sh``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30


#: Why the tests that need Orthanc are skipped when it is missing.
MISSING = ("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb: "
           "scripts/install-system-deps.sh)")


def orthanc_binary() -> str | None:
    """The Orthanc program, or ``None`` when it or its DICOMweb plugin is not installed."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    return binary if binary is not None and PLUGIN.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None = None, timeout: float = 30) -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read()


@dataclass
class Orthanc:
    """One Orthanc process on 127.0.0.1 with a temporary storage folder."""

    folder: Path
    binary: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def start(self) -> Orthanc:
        config = {"Name": "pneumodet-test", "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"), "HttpPort": self.port, "DicomPort": free_port(),
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - the process writes it until stopped
        self.process = subprocess.Popen([self.binary, str(self.folder / "config.json")], stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                http("GET", f"{self.rest}/system", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)

    def upload(self, paths) -> list[str]:
        """POST each file to Orthanc's REST API; the study UIDs, in file order."""
        studies = []
        for path in paths:
            http("POST", f"{self.rest}/instances", Path(path).read_bytes())
            studies.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
        return studies

    def instances(self, modality: str) -> list[pydicom.Dataset]:
        """Every stored instance of ``modality``, read back with WADO-RS through dicomweb-client."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.dicomweb)
        found = []
        for row in client.search_for_instances(fields=["Modality"]):
            if row.get("00080060", {}).get("Value", [None])[0] == modality:
                uids = (row[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
                found.append(client.retrieve_instance(*uids))
        return found

    def count(self) -> int:
        return json.loads(http("GET", f"{self.rest}/statistics"))["CountInstances"]
