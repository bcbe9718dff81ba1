"""DICOMweb input: ask a PACS what it holds (QIDO-RS), read headers (series metadata), retrieve
instances (WADO-RS), and store Key Object Selection documents back (STOW-RS).

HTTP goes through dicomweb-client on a requests session built here:

- credentials come from the environment only: ``SPINELEVEL_DICOMWEB_USER`` and
  ``SPINELEVEL_DICOMWEB_PASSWORD`` (HTTP basic auth), or ``SPINELEVEL_DICOMWEB_TOKEN`` (a bearer token),
  or else a netrc entry for the host (requests reads ``~/.netrc`` or ``$NETRC``). A URL with
  credentials in it is refused, so none reaches a ``source`` label, run.json, a log or a message;
- TLS certificates are always verified, against the system's CAs or ``--dicomweb-ca FILE``;
- transient failures (connection refused or reset, timeouts, HTTP 408/429/500/502/503/504, a response
  cut short) are retried with exponential backoff, a bounded number of times and seconds; the
  library's own retrying is switched off so there is one policy.

A remote instance is a :class:`~spinelevel.engine.sources.Source` of kind ``"dicomweb"`` that carries
its :class:`DicomwebConnection`; every process (decode workers included) builds its own client from
it, once, and keeps it in a per-thread cache. Headers come from the series metadata resource, parsed
with ``pydicom.Dataset.from_json`` (bulk data is never fetched) and turned into scan headers by the
same function as local files, so the identity and geometry rules are the same; where a server has no
metadata resource, each instance is retrieved and its header read.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from spinelevel.engine.scan import FileHeader, ScanOptions, SkippedFile
from spinelevel.engine.sources import Source
from spinelevel.errors import DecodeError, DicomwebError, InputError, RemoteReadError

__all__ = [
    "SCHEME_PREFIX",
    "USER_ENV",
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "DicomwebConnection",
    "DicomwebQuery",
    "DicomwebScanner",
    "is_dicomweb_input",
    "parse_input",
    "parse_date",
    "check_server",
    "instance_source",
    "retrieve_dataset",
    "prefetch_series",
    "discard_spooled",
    "read_instance",
    "store_instances",
]

log = logging.getLogger(__name__)

# How a DICOMweb input is written on the command line: dicomweb+https://host/dicom-web
SCHEME_PREFIX = "dicomweb+"
# Environment variables holding the credentials (never options: command lines are visible to all).
USER_ENV = "SPINELEVEL_DICOMWEB_USER"
PASSWORD_ENV = "SPINELEVEL_DICOMWEB_PASSWORD"
TOKEN_ENV = "SPINELEVEL_DICOMWEB_TOKEN"

# HTTP statuses worth another try: the server is busy, restarting or behind a failing proxy.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Statuses of a server that has no metadata resource (then instances are read for their headers).
_NO_METADATA_STATUS = frozenset({400, 404, 405, 406, 501})
# Accept any transfer syntax: the instance as stored, no transcoding on the server.
_AS_STORED = (("application/dicom", "*"),)
# The same, as the Accept header of a streamed series retrieval.
_AS_STORED_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Statuses of a series retrieval that a server does not offer: the instances are retrieved one by one.
_NO_SERIES_RETRIEVE_STATUS = frozenset({400, 404, 405, 406, 501})
# Bytes read from a streamed answer at a time.
_STREAM_CHUNK = 1 << 20
# Results asked for per QIDO-RS page.
_PAGE = 1000
# Most pages of one query (a server that ignores offset must not keep a run asking forever).
_MAX_PAGES = 10_000


@dataclass(frozen=True)
class DicomwebConnection:
    """How to reach one DICOMweb service (no credentials: those come from the environment)."""

    # Base URL of the service, http(s)://host[:port]/path, without credentials or trailing slash.
    url: str
    # Seconds to wait for a connection, and for each read of a response.
    timeout_s: float = 30.0
    # PEM bundle of the CAs that sign the server's certificate (None: the system's). TLS is always verified.
    ca_file: str | None = None
    # Tries of one request when it fails transiently (1: no retry).
    tries: int = 5
    # Wait before the second try in seconds, doubled before each further one.
    backoff_s: float = 0.5
    # Most seconds spent waiting between the tries of one request.
    max_retry_s: float = 60.0
    # Retrieve a series in one streamed WADO-RS series request, once per run, into the run's spool on
    # local disk (engine.series_spool), when a round of decoding asks for at least this fraction of
    # its instances; every later round reads from the spool. Below it, instances the spool does not
    # hold go one request each. 0 (the default): every series by series; above 1: never. A series
    # answer costs loopback Orthanc about 1/30 of an instance request per instance, so even the
    # sparse search (15-45 % of the slices) pays; over a slow link, instance by instance moves fewer
    # bytes (BENCHMARKS.md).
    series_fraction: float = 0.0


@dataclass(frozen=True)
class DicomwebQuery:
    """What to read from one service: which studies, which series."""

    connection: DicomwebConnection
    # StudyDate range, inclusive, as YYYYMMDD (None: open).
    since: str | None = None
    until: str | None = None
    # Study Instance UIDs to read (empty: every study the date range matches).
    studies: tuple[str, ...] = ()
    # Modality of the series read (series of other modalities are not even listed).
    modality: str = "CT"


def is_dicomweb_input(text: str) -> bool:
    """True for an input written as ``dicomweb+http(s)://...``."""
    return text.startswith(SCHEME_PREFIX)


def parse_input(text: str, **connection: Any) -> DicomwebConnection:
    """The connection for an input ``dicomweb+https://host/path`` (``connection``: its other fields).

    Raises:
        InputError: not an http(s) URL, or credentials written into it.
    """
    url = text[len(SCHEME_PREFIX) :] if is_dicomweb_input(text) else text
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise InputError(f"{SCHEME_PREFIX}...: not a valid URL; write it as dicomweb+https://host/dicom-web") from None
    if parts.username is not None or parts.password is not None:
        # the message must not repeat the credentials it refuses
        host = parts.hostname or "?"
        raise InputError(
            f"{SCHEME_PREFIX}{parts.scheme}://...@{host}: credentials do not belong on the command line; remove them from "
            f"the URL and set {USER_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}, or a netrc entry for {host})"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{text}: a DICOMweb input is dicomweb+https://host/path (or dicomweb+http:// on a trusted network)")
    if parts.query or parts.fragment:
        raise InputError(f"{text}: the DICOMweb base URL takes no query or fragment; use --since/--until/--study to choose studies")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    conn = DicomwebConnection(url=base, **connection)
    if conn.ca_file is not None and not os.path.isfile(conn.ca_file):
        raise InputError(f"--dicomweb-ca {conn.ca_file}: no such file; give the PEM bundle of the CA that signed the server's certificate")
    if conn.tries < 1 or conn.timeout_s <= 0 or conn.backoff_s < 0 or conn.max_retry_s < 0:
        raise InputError("--dicomweb-timeout must be positive and --dicomweb-retries at least 0")
    return conn


def parse_date(text: str, option: str) -> str:
    """YYYY-MM-DD or YYYYMMDD as the YYYYMMDD of a DICOM date.

    Raises:
        InputError: not such a date.
    """
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return _dt.datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            pass
    raise InputError(f"{option} {text!r}: give a date as YYYY-MM-DD (for example 2026-11-30)")


# -- the client, per process and thread --------------------------------------------------------


def _credentials() -> tuple[tuple[str, str] | None, str | None]:
    """(basic auth pair, bearer token) from the environment; both None: netrc or anonymous."""
    user, password, token = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV), os.environ.get(TOKEN_ENV)
    if token and (user or password):
        raise InputError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
    if bool(user) != bool(password):
        raise InputError(f"{USER_ENV} and {PASSWORD_ENV} go together: set both, or neither")
    return ((user, password) if user else None), (token or None)


class _Truncated(Exception):
    """A multipart response that ends before its closing boundary."""


def _check_response(max_bytes: int) -> Callable:
    """A requests response hook: refuse oversized and truncated multipart responses."""

    def hook(response, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kwargs.get("stream"):
            # a streamed series retrieval: its reader checks each part's size and the closing boundary
            return response
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _Oversized(f"the answer is {length} bytes, over the {max_bytes}-byte limit")
        ctype = response.headers.get("Content-Type", "")
        if response.ok and ctype.lower().startswith("multipart/related"):
            match = re.search(r'boundary="?([^";]+)"?', ctype)
            body = response.content  # not streamed: read now, so the check sees all of it
            if match and not body.rstrip().endswith(b"--" + match.group(1).encode() + b"--"):
                raise _Truncated("the multipart answer ends before its closing boundary (cut short)")
        return response

    return hook


class _Oversized(Exception):
    """An answer larger than the file size limit."""


class _Clients(threading.local):
    """This thread's clients by connection (a cache: a requests session is not shared by threads)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[DicomwebConnection, int], Any] = {}


_CLIENTS = _Clients()


def _client(conn: DicomwebConnection, max_bytes: int = 2 << 30):  # noqa: ANN202 - DICOMwebClient
    key = (conn, max_bytes)
    client = _CLIENTS.by_key.get(key)
    if client is None:
        client = _new_client(conn, max_bytes)
        _CLIENTS.by_key[key] = client
    return client


def _new_client(conn: DicomwebConnection, max_bytes: int):  # noqa: ANN202
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise InputError("DICOMweb input needs dicomweb-client: pip install 'spinelevel[dicomweb]'") from None
    basic, token = _credentials()
    session = requests.Session()
    session.verify = conn.ca_file or True
    if basic is not None:
        session.auth = basic
    elif token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    # else: requests' netrc lookup for the host (trust_env) supplies basic auth, if there is an entry
    session.hooks["response"].append(_check_response(max_bytes))
    client = DICOMwebClient(conn.url, session=session, timeout=(conn.timeout_s, conn.timeout_s))
    client.set_http_retry_params(retry=False)
    # the retrying package still wraps every request and logs each failure with a traceback at
    # WARNING: _call retries and logs (without tracebacks) instead
    logging.getLogger("retrying").setLevel(logging.ERROR)
    return client


# -- retries and messages ----------------------------------------------------------------------

T = TypeVar("T")


def _network_reason(exc: BaseException) -> str:
    """A short reason for a failure without an HTTP answer (no URL, no credentials)."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS certificate verification failed"
    if isinstance(exc, (requests.exceptions.ConnectTimeout,)):
        return "connection timed out"
    if isinstance(exc, requests.exceptions.Timeout):
        return "no answer within the timeout"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, _Truncated)) or "IncompleteRead" in text:
        return "the answer was cut short"
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "the server closed the connection"),
        ("Connection aborted", "the server closed the connection"),
        ("No route to host", "no route to host"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__


def _call(conn: DicomwebConnection, what: str, url: str, fn: Callable[[], T]) -> T:
    """``fn()`` with retries on transient failures.

    Raises:
        DicomwebError: a permanent failure, or a transient one that outlived the tries (``url``, the
            HTTP status and the number of tries in the message).
    """
    import requests

    waited = 0.0
    for attempt in range(1, conn.tries + 1):
        try:
            return fn()
        except requests.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else None
            reason = f"HTTP {status} {response.reason if response is not None else ''}".strip()
            transient = status in _TRANSIENT_STATUS
        except requests.exceptions.SSLError as exc:
            raise DicomwebError(f"{url}: {_network_reason(exc)}; give the CA bundle that signed the server's certificate with --dicomweb-ca FILE") from None
        except (requests.RequestException, _Truncated) as exc:
            status, reason, transient = None, _network_reason(exc), True
        except _Oversized as exc:
            raise DicomwebError(f"{url}: {exc}") from None
        except ValueError as exc:
            # dicomweb-client's answer parsing: a malformed multipart or JSON body (a server mid-restart)
            status, reason, transient = None, f"malformed answer ({type(exc).__name__})", True
        if not transient or attempt == conn.tries:
            break
        wait = min(conn.backoff_s * 2 ** (attempt - 1), conn.max_retry_s - waited)
        if wait < 0 or waited >= conn.max_retry_s:
            break
        log.info("%s: %s; retrying in %.1f s (try %d of %d)", url, reason, wait, attempt + 1, conn.tries)
        time.sleep(wait)
        waited += wait
    tries = f" after {attempt} tr{'y' if attempt == 1 else 'ies'}" if transient else ""
    raise DicomwebError(f"{url}: {what} failed: {reason}{tries}", status=status, transient=transient)


def check_server(conn: DicomwebConnection) -> None:
    """Ask the server one small QIDO-RS question, so a wrong URL or credentials fail before any output.

    Raises:
        DicomwebError: unreachable, not DICOMweb, or the credentials are refused (named, with the fix).
    """
    client = _client(conn)
    url = f"{conn.url}/studies"
    try:
        answer = _call(conn, "a QIDO-RS study query", url, lambda: client.search_for_studies(limit=1, fields=["StudyInstanceUID"]))
    except DicomwebError as exc:
        host = urlsplit(conn.url).hostname
        if exc.status in (401, 403):
            raise DicomwebError(
                f"{url}: the server refused the credentials (HTTP {exc.status}); set {USER_ENV} and {PASSWORD_ENV}, "
                f"or {TOKEN_ENV}, or a netrc entry for {host}",
                status=exc.status,
            ) from None
        if exc.status == 404:
            raise DicomwebError(f"{url}: no DICOMweb service at this URL (HTTP 404); check the path (Orthanc: /dicom-web)", status=404) from None
        raise
    if not isinstance(answer, list) or any(not isinstance(item, dict) for item in answer):
        raise DicomwebError(f"{url}: the answer is not DICOM JSON; is this the DICOMweb root of the server?")


# -- what a remote instance is -----------------------------------------------------------------


def instance_source(conn: DicomwebConnection, study: str, series: str, sop: str) -> Source:
    """The source of one instance; its label is the instance's WADO-RS URL."""
    return Source(conn.url, "dicomweb", f"studies/{study}/series/{series}/instances/{sop}", remote=conn)


def _uids(src: Source) -> tuple[str, str, str]:
    parts = (src.member or "").split("/")
    if len(parts) != 6 or parts[0] != "studies" or parts[2] != "series" or parts[4] != "instances":
        raise RemoteReadError(f"not a DICOMweb instance address: {src.label}")
    return parts[1], parts[3], parts[5]


def _connection(src: Source) -> DicomwebConnection:
    # A source rebuilt from an output label has no settings: the defaults apply.
    return src.remote if src.remote is not None else DicomwebConnection(src.path)


def retrieve_dataset(src: Source, max_bytes: int):  # noqa: ANN201 - pydicom Dataset
    """The instance ``src`` as a pydicom Dataset, retrieved with WADO-RS in its stored transfer syntax.

    Raises:
        RemoteReadError: not retrievable after retries (the message names the URL and HTTP status).
    """
    cached = _cached_dataset(src)
    if cached is not None:
        return cached
    conn = _connection(src)
    study, series, sop = _uids(src)
    client = _client(conn, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a non-conformant single-part answer; pydicom's value warnings
            return _call(conn, "WADO-RS retrieve", src.label, lambda: client.retrieve_instance(study, series, sop, media_types=_AS_STORED))
    except DicomwebError as exc:
        if exc.transient:  # the server may answer next time: the series is redone by the next run
            raise RemoteReadError(str(exc)) from None
        # permanent (404 gone, 403, oversized): a dropped slice like any undecodable file, so nightly
        # re-runs do not redo the series for ever
        raise DecodeError(str(exc)) from None
    except InputError:
        raise
    except Exception as exc:  # an unparseable instance: the bytes came, they are not DICOM
        raise DecodeError(f"{src.label}: the retrieved instance is unreadable ({type(exc).__name__})") from None


def read_instance(src: Source, max_bytes: int) -> bytes:
    """The bytes of one instance (as the server sent it, re-encoded by pydicom: same elements).

    Raises:
        RemoteReadError: not retrievable after retries.
    """
    import pydicom

    ds = retrieve_dataset(src, max_bytes)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


# -- series retrieval: one streamed request for many instances -------------------------------


def _multipart_parts(response, max_bytes: int) -> Iterator[bytes]:  # noqa: ANN001 - requests Response
    """The bodies of a streamed multipart/related answer, one at a time (memory: one part).

    Raises:
        _Truncated: the answer ends before its closing boundary.
        _Oversized: a part is over ``max_bytes``.
        ValueError: not a multipart answer, or a part without headers.
    """
    ctype = response.headers.get("Content-Type", "")
    match = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.lower().startswith("multipart/related") or not match:
        raise ValueError(f"not a multipart/related answer ({ctype.split(';')[0] or 'no Content-Type'})")
    marker = b"--" + match.group(1).strip().encode()
    delimiter = b"\r\n" + marker
    # the first delimiter may come without its CRLF (at the very start of the body)
    buf = bytearray(b"\r\n")
    started = after_delimiter = False
    for chunk in response.iter_content(chunk_size=_STREAM_CHUNK):
        buf += chunk
        while True:
            if after_delimiter:
                if len(buf) < 2:
                    break
                if buf[:2] == b"--":
                    return  # the closing boundary: the answer is complete
                after_delimiter = False
            at = buf.find(delimiter)
            if at < 0:
                if len(buf) > max_bytes + (64 << 10):
                    raise _Oversized(f"an instance in the answer is over the {max_bytes}-byte limit")
                break
            if started:
                part = bytes(buf[:at])
                head_end = part.find(b"\r\n\r\n")
                if head_end < 0:
                    raise ValueError("a multipart part without headers")
                body = part[head_end + 4 :]
                if len(body) > max_bytes:
                    raise _Oversized(f"an instance in the answer is {len(body)} bytes, over the {max_bytes}-byte limit")
                yield body
            started = after_delimiter = True
            del buf[: at + len(delimiter)]
    raise _Truncated("the multipart answer ends before its closing boundary (cut short)")


def _part_sop(part: bytes) -> str:
    """The SOPInstanceUID of one retrieved instance, read from the start of its header only (the
    file meta and the elements up to (0008,0018): every part of a series answer is read so)."""
    from pydicom.filereader import read_partial

    ds = read_partial(io.BytesIO(part), stop_when=lambda tag, vr, length: tag > 0x00080018, force=True)
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "").strip() if meta is not None else ""
    return uid


def _meta_sop(part: bytes) -> str:
    """The SOPInstanceUID of one instance of a series answer, for filing it in the spool: the file
    meta's Media Storage SOP Instance UID (0002,0003), read by walking the file meta group, which
    PS3.10 7.1 fixes as explicit VR little endian after the 128-byte preamble and "DICM". A part
    that is not so (no preamble, no such element) is read by pydicom (``_part_sop``). The dataset's
    own SOPInstanceUID is checked when the instance is taken from the spool."""
    if part[128:132] == b"DICM":
        at = 132
        while at + 8 <= len(part) and part[at : at + 2] == b"\x02\x00":
            element = int.from_bytes(part[at + 2 : at + 4], "little")
            vr = part[at + 4 : at + 6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
                length, start = int.from_bytes(part[at + 8 : at + 12], "little"), at + 12
            else:
                length, start = int.from_bytes(part[at + 6 : at + 8], "little"), at + 8
            if element == 0x0003:
                uid = part[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
                if uid:
                    return uid
                break
            if length == 0xFFFFFFFF:
                break
            at = start + length
    return _part_sop(part)


class _SpoolUse(threading.local):
    """The spool directory of the task this thread decodes (None: no spool, instances one by one),
    and the connections whose server has no series retrieval (HTTP 400/405/406/501 to one)."""

    def __init__(self) -> None:
        self.root: str | None = None


_SPOOL = _SpoolUse()
_NO_SERIES_RETRIEVAL: set[DicomwebConnection] = set()


def _spool_series(root: str, conn: DicomwebConnection, study: str, series: str, max_bytes: int) -> None:
    """Retrieve one series in one streamed request into the spool (series_spool), unless another
    process or thread did or does (it waits for that one). A transient failure after retries is
    recorded there for every round of the series; a permanent one (404, oversized) leaves the
    instances to be retrieved one by one."""
    from spinelevel.engine import series_spool

    directory = series_spool.series_dir(root, conn.url, study, series)
    if series_spool.lookup(directory).state != "absent":
        return
    with series_spool.retrieving(directory) as state:
        if state.state != "absent":
            return
        client = _client(conn, max_bytes)
        url = f"{conn.url}/studies/{study}/series/{series}"

        def fetch() -> series_spool.SpoolState:
            response = client._session.get(url, headers={"Accept": _AS_STORED_ACCEPT}, stream=True, timeout=(conn.timeout_s, conn.timeout_s))
            with response:
                response.raise_for_status()
                return series_spool.write_series(directory, _multipart_parts(response, max_bytes), _meta_sop)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's value warnings
                _call(conn, "WADO-RS series retrieve", url, fetch)
        except DicomwebError as exc:
            if exc.status in _NO_SERIES_RETRIEVE_STATUS and exc.status != 404:
                log.info("%s: no series retrieval (HTTP %s); retrieving instances one by one", conn.url, exc.status)
                _NO_SERIES_RETRIEVAL.add(conn)
                series_spool.mark(directory, "none")
            elif exc.transient:
                series_spool.mark(directory, "failed", str(exc))
            else:  # oversized, 404 or another permanent failure: each instance on its own says why
                series_spool.mark(directory, "none")


def prefetch_series(spool: str | None, sources: tuple[Source, ...], by_series: bool, max_bytes: int) -> None:
    """Before decoding a task: make this thread read DICOMweb instances from the run's ``spool``,
    and, with ``by_series``, put the series of ``sources`` (all of one series) into the spool unless
    it is there already (or being put there: then wait for it). Without a spool, or from a server
    without series retrieval, ``retrieve_dataset`` asks for each instance."""
    _SPOOL.root = spool
    if spool is None or not sources or not by_series:
        return
    conn = _connection(sources[0])
    study, series, _ = _uids(sources[0])
    if conn in _NO_SERIES_RETRIEVAL or any(_uids(src)[:2] != (study, series) for src in sources):
        return
    _spool_series(spool, conn, study, series, max_bytes)


def discard_spooled(spool: str, sources: Iterable[Source]) -> None:
    """Remove from the spool the series of these DICOMweb ``sources`` (their rows are written)."""
    from spinelevel.engine import series_spool

    seen: set[tuple[str, str, str]] = set()
    for src in sources:
        if src.kind != "dicomweb":
            continue
        try:
            study, series, _ = _uids(src)
        except RemoteReadError:
            continue
        key = (_connection(src).url, study, series)
        if key not in seen:
            seen.add(key)
            series_spool.discard(spool, *key)


def _cached_dataset(src: Source):  # noqa: ANN202 - pydicom Dataset or None
    """The instance ``src`` from the run's spool, or None where the spool does not hold it.

    Raises:
        RemoteReadError: the series retrieval failed transiently (after its retries): the series is
            then redone by the next run, like any instance that could not be retrieved.
    """
    if _SPOOL.root is None:
        return None
    from spinelevel.engine import series_spool

    conn = _connection(src)
    study, series, sop = _uids(src)
    directory = series_spool.series_dir(_SPOOL.root, conn.url, study, series)
    state = series_spool.lookup(directory)
    if state.state == "failed":
        raise RemoteReadError(state.index["reason"])
    try:
        data = state.read(directory, sop)
    except FileNotFoundError:  # removed with its series: asked for alone
        series_spool.forget(directory)
        return None
    if data is None:
        return None
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception:  # not readable as it came in the series answer: asked for alone, which says why
        return None
    # filed by its file meta's SOP instance UID: the dataset must say the same
    return ds if str(ds.get("SOPInstanceUID", "") or "").strip() == sop else None


# -- scan: QIDO-RS, then series metadata -------------------------------------------------------


def _search_all(conn: DicomwebConnection, what: str, url: str, search: Callable[[int, int], list], key: str) -> list[str]:
    """The values of ``key`` (a tag) over every page of a QIDO-RS search ``search(limit, offset)``.

    Pages by limit and offset until a short page; a page that brings nothing new (a server that
    ignores offset, such as Orthanc's plugin without a limit) ends it too.
    """
    found: set[str] = set()
    for page in range(_MAX_PAGES):
        answer = _call(conn, what, url, lambda: search(_PAGE, page * _PAGE))
        values = {_first(item, key) for item in answer} - {""}
        if not values - found:
            break
        found |= values
        if len(answer) < _PAGE:
            break
    return sorted(found)


def _first(item: dict, tag: str) -> str:
    value = item.get(tag, {}).get("Value") or [""]
    return str(value[0]).strip()


def _date_range(query: DicomwebQuery) -> str | None:
    if query.since is None and query.until is None:
        return None
    return f"{query.since or ''}-{query.until or ''}"


@dataclass
class DicomwebScanner:
    """Yields a header (or a skip record) for every instance of the series that ``query`` selects.

    Each series' metadata is requested and read into headers by one job (``series_headers``), in
    the decode pool's worker processes where ``read_batches`` is given (several series in flight, so
    the server's work overlaps with ours; the metadata of a series never reaches this process), else
    in two threads here. ``series_labels`` collects the URL of every series listed, so skip rows of
    a series that failed before are replaced when it is met again.
    """

    query: DicomwebQuery
    options: ScanOptions = field(default_factory=ScanOptions)
    # Runs series_headers jobs elsewhere (the decode pool's worker processes): called with an
    # iterator of jobs, yields their results in order. None runs them here.
    read_batches: Callable[[Iterator[tuple]], Iterator[list | None]] | None = None
    # WADO-RS URLs of the series listed (filled while scanning).
    series_labels: set[str] = field(default_factory=set)

    def __iter__(self) -> Iterator[FileHeader | SkippedFile]:
        conn = self.query.connection
        pairs = [(study, series) for study in self._studies() for series in self._series(study)]
        for study, series in pairs:
            self.series_labels.add(f"{conn.url}/studies/{study}/series/{series}")
        jobs = ((conn, study, series, self.options) for study, series in pairs)
        results = self.read_batches(jobs) if self.read_batches is not None else _two_ahead(series_headers, jobs)
        for (study, series), found in zip(pairs, results):
            if found is not None:
                yield from found
                continue
            try:  # no metadata resource on this server: each instance's header
                yield from self._headers_from_instances(study, series)
            except DicomwebError as exc:
                yield SkippedFile(Source(f"{conn.url}/studies/{study}/series/{series}", "dicomweb"), f"series headers could not be read: {exc}; re-run to retry")

    def _studies(self) -> list[str]:
        conn = self.query.connection
        client = _client(conn)
        filters: dict[str, Any] = {}
        dates = _date_range(self.query)
        if dates:
            filters["StudyDate"] = dates
        found: list[str] = []
        targets: list[str | None] = list(self.query.studies) or [None]
        for uid in targets:
            f = dict(filters)
            if uid is not None:
                f["StudyInstanceUID"] = uid
            elif self.query.modality:
                f["ModalitiesInStudy"] = self.query.modality
            found.extend(
                _search_all(conn, "the QIDO-RS study query", f"{conn.url}/studies", lambda limit, offset, f=f: client.search_for_studies(search_filters=f, fields=["StudyInstanceUID"], limit=limit, offset=offset), "0020000D")
            )
        studies = sorted({uid for uid in found if uid})
        log.info("%s: %d studies match", conn.url, len(studies))
        return studies

    def _series(self, study: str) -> list[str]:
        conn = self.query.connection
        client = _client(conn)
        filters = {"Modality": self.query.modality} if self.query.modality else {}
        return _search_all(
            conn,
            "the QIDO-RS series query",
            f"{conn.url}/studies/{study}/series",
            lambda limit, offset: client.search_for_series(study_instance_uid=study, search_filters=filters, fields=["SeriesInstanceUID", "Modality"], limit=limit, offset=offset),
            "0020000E",
        )

    def _headers_from_instances(self, study: str, series: str) -> Iterator[FileHeader | SkippedFile]:
        from spinelevel.engine.scan import _read_header_stream

        conn = self.query.connection
        client = _client(conn)
        sops = _search_all(
            conn,
            "the QIDO-RS instance query",
            f"{conn.url}/studies/{study}/series/{series}/instances",
            lambda limit, offset: client.search_for_instances(study_instance_uid=study, series_instance_uid=series, fields=["SOPInstanceUID"], limit=limit, offset=offset),
            "00080018",
        )
        for sop in sops:
            src = instance_source(conn, study, series, sop)
            try:
                data = read_instance(src, self.options.max_file_bytes)
            except RemoteReadError as exc:
                yield SkippedFile(src, f"instance could not be retrieved: {exc}; re-run to retry")
                continue
            yield from _read_header_stream(src, io.BytesIO(data), self.options.keep_tags)


def _two_ahead(fn: Callable[[tuple], T], jobs: Iterator[tuple]) -> Iterator[T]:
    """``fn`` of every job, in order, two at a time in threads (one waits for the server while the
    other reads its answer)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="spinelevel-metadata") as threads:
        running: deque = deque()
        for job in jobs:
            running.append(threads.submit(fn, job))
            if len(running) > 2:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def series_headers(job: tuple) -> list[FileHeader | SkippedFile] | None:
    """Headers of every instance of one series from its metadata resource (one WADO-RS request):
    job = (connection, study UID, series UID, ScanOptions). None where the server has no metadata
    resource (the caller then reads each instance's header); a series whose metadata could not be
    had after retries is one skip record (not entered into the output state: the next run reads the
    series again)."""
    conn, study, series, options = job
    client = _client(conn)
    url = f"{conn.url}/studies/{study}/series/{series}"
    try:
        items = _call(conn, "the series metadata request", url + "/metadata", lambda: client.retrieve_series_metadata(study, series))
    except DicomwebError as exc:
        if exc.status in _NO_METADATA_STATUS:
            log.info("%s/metadata: no metadata resource (HTTP %s); reading each instance's header", url, exc.status)
            return None
        return [SkippedFile(Source(url, "dicomweb"), f"series headers could not be read: {exc}; re-run to retry")]
    out: list[FileHeader | SkippedFile] = []
    for item in items:
        out.extend(_headers_from_json(conn, study, series, item, options))
    return out


def _no_bulk(item: dict) -> dict:
    """``item`` with its bulk data references (pixels, large values) turned into empty values, and
    without private elements.

    Bulk data is never fetched while scanning. Dropping the references before
    ``Dataset.from_json``, rather than passing it a handler, also saves pydicom an
    ``inspect.signature`` of the handler for every element (most of the scan's time). The scan reads
    no private element (odd group; --keep-phi takes standard keywords only), and vendors' CT headers
    hold hundreds of them, each costing from_json a data element.
    """
    out = {}
    for tag, element in item.items():
        if len(tag) == 8 and tag[3] in "13579bBdDfF":  # odd group: private
            continue
        if isinstance(element, dict):
            if "BulkDataURI" in element:
                element = {"vr": element.get("vr", "UN")}
            elif element.get("vr") == "SQ" and isinstance(element.get("Value"), list):
                element = dict(element, Value=[_no_bulk(x) if isinstance(x, dict) else x for x in element["Value"]])
        out[tag] = element
    return out


def _headers_from_json(conn: DicomwebConnection, study: str, series: str, item: dict, options: ScanOptions) -> list[FileHeader | SkippedFile]:
    """Scan headers of one instance's DICOM JSON metadata, by the scan module's rules."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    from spinelevel.engine.scan import _headers_from_dataset

    sop = _first(item, "00080018")
    src = instance_source(conn, _first(item, "0020000D") or study, _first(item, "0020000E") or series, sop)
    if not sop:
        return [SkippedFile(src, "instance metadata without SOPInstanceUID (0008,0018)")]
    # file meta and transfer syntax, where the server tells them (Available Transfer Syntax UID)
    meta = {k: v for k, v in item.items() if k.startswith("0002")}
    body = {k: v for k, v in item.items() if not k.startswith("0002")}
    tsyntax = _first(item, "00020010") or _first(item, "00083002")
    body = _no_bulk(body)

    def headers(ds) -> list[FileHeader | SkippedFile]:  # noqa: ANN001 - pydicom Dataset
        ds.file_meta = FileMetaDataset(pydicom.Dataset.from_json(meta)) if meta else FileMetaDataset()
        if tsyntax:
            ds.file_meta.TransferSyntaxUID = tsyntax
        return _headers_from_dataset(src, ds, False, options.keep_tags)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom quotes odd values (patient data) in its warnings
        try:
            return headers(_dataset(body))
        except Exception:  # a value the binary form reads otherwise: pydicom's from_json decides
            pass
        try:
            return headers(pydicom.Dataset.from_json(body))
        except Exception as exc:  # a malformed value surfaces only when accessed
            return [SkippedFile(src, f"instance metadata is unreadable ({type(exc).__name__})")]


def _dataset(body: dict):  # noqa: ANN202 - pydicom Dataset
    """The instance's dataset, re-encoded and read lazily (engine.json_header, several times faster
    than pydicom's from_json); raises where the item does not encode."""
    from spinelevel.engine.json_header import dataset_from_json

    return dataset_from_json(body)


# -- STOW-RS -----------------------------------------------------------------------------------


def store_instances(conn: DicomwebConnection, files: list[bytes], study: str | None = None) -> None:
    """Store DICOM instances (Part 10 bytes) on the server with STOW-RS.

    Raises:
        DicomwebError: the server refused them (after retries for transient failures).
    """
    import pydicom

    client = _client(conn)
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
    url = f"{conn.url}/studies" + (f"/{study}" if study else "")
    _call(conn, "STOW-RS store", url, lambda: client.store_instances(datasets, study_instance_uid=study))
