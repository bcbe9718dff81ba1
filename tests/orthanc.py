"""A real Orthanc server (Debian's orthanc and orthanc-dicomweb packages) for the DICOMweb tests.

Started on a free loopback port with a temporary storage directory and HTTP basic auth, fed through
its REST API (POST /instances), stopped (and restarted on the same storage) on request. A small
fault-injecting HTTP proxy can stand in front of it to answer 503s or cut answers short.
"""

from __future__ import annotations

import base64
import glob
import http.client
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

__all__ = ["USER", "PASSWORD", "orthanc_missing", "Orthanc", "FaultProxy"]

USER = "nightly"
# Distinctive, so a test can look for it in every output byte.
PASSWORD = "pw-Zq7xK2-never-in-outputs"

_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*", "/usr/lib/*/orthanc/libOrthancDicomWeb.so*")


def _plugin() -> str | None:
    for pattern in _PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def orthanc_missing() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    if shutil.which("Orthanc") is None:
        return "needs the Orthanc server (apt-get install orthanc orthanc-dicomweb; .ci/run installs it)"
    if _plugin() is None:
        return "needs Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb; .ci/run installs it)"
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        return "needs dicomweb-client (pip install 'spinelevel[dicomweb]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on 127.0.0.1 with basic auth and its own storage."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "spinelevel-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "Plugins": [_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.port}"},
            "HttpThreadsCount": 16,
            "StableAge": 1,
        }
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(config), encoding="utf-8")

    @property
    def url(self) -> str:
        """The DICOMweb root, without credentials."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def input(self) -> str:
        """The DICOMweb root as a spinelevel run input."""
        return "dicomweb+" + self.url

    def _request(self, method: str, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self._request("GET", "/system")
                return
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def upload(self, files: Iterable[Path]) -> int:
        """POST each DICOM file to /instances; returns how many were stored."""
        n = 0
        for path in files:
            answer = json.loads(self._request("POST", "/instances", Path(path).read_bytes()))
            n += answer.get("Status") in ("Success", "AlreadyStored")
        return n

    def clear(self) -> None:
        for patient in json.loads(self._request("GET", "/patients")):
            self._request("DELETE", f"/patients/{patient}")

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Orthanc's own view (REST) of a study's series: for checks that do not use spinelevel."""
        ids = json.loads(self._request("POST", "/tools/lookup", study_uid.encode()))
        out = []
        for entry in ids:
            if entry["Type"] == "Study":
                for series in json.loads(self._request("GET", f"/studies/{entry['ID']}/series")):
                    out.append(series["MainDicomTags"])
        return out


def _is_retrieval(path: str) -> bool:
    """A WADO-RS instance or series retrieval (not metadata, not a QIDO-RS query)."""
    return re.search(r"/series/[^/?]+(/instances/[^/?]+)?$", path.split("?", 1)[0]) is not None


class FaultProxy:
    """An HTTP proxy in front of a server that misbehaves on purpose.

    ``mode``: "pass"; "503" (the next ``count`` answers are 503, then pass); "truncate" (answers to
    instance and series retrievals lose their second half and the closing boundary).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.count = 0
        self.requests = 0
        # path (with query) of every GET, in order
        self.paths: list[str] = []
        self.port = free_port()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                proxy.requests += 1
                proxy.paths.append(self.path)
                if proxy.mode == "503" and proxy.count > 0:
                    proxy.count -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if proxy.mode == "truncate" and _is_retrieval(self.path) and resp.status == 200:
                    body = body[: len(body) // 2]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def input(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
