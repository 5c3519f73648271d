"""A thin DICOMweb client: QIDO-RS search, WADO-RS retrieval and STOW-RS storage over ``dicomweb-client``.

What it adds to ``dicomweb-client``:

* **credentials** from an environment variable or a file, never from the command line (a URL holding a
  user name or password is refused: the process list shows it): ``Bearer <token>`` or
  ``Basic <user>:<password>`` (:func:`read_credentials`); a credential is never printed;
* **timeouts** on every request (connect and read, ``timeout`` seconds each);
* **bounded retries with back-off** of transient failures (no connection, a timeout, HTTP 429, 500, 502,
  503, 504): at most ``retries`` more attempts, waiting ``backoff * 2**k`` seconds (or the server's
  ``Retry-After``, at most :data:`MAX_WAIT_S`) between them. dicomweb-client's own retrying is off, so every
  attempt is counted here (:attr:`DicomWebServer.retries_made`);
* **one-line errors** (:class:`PacsError`) naming the server (without credentials), what was being done and
  the status: ``http://pacs:8042/dicom-web: STOW-RS of 2 instance(s) to study 1.2.3: HTTP 500 Internal
  Server Error (4 attempts)``, ``...: cannot connect (connection refused)``, ``...: no answer within 30 s``;
* **paging that ends and misses nothing**: QIDO results are read ``page_size`` at a time until a short
  page. A page with nothing new after a full one is either the end or a server whose paging fails for
  this query (Orthanc 1.10 with ``ModalitiesInStudy``: ``offset`` alone is ignored, ``limit`` with
  ``offset`` gives an empty page), so one request without paging then completes the results
  (dicomweb-client's own ``get_remaining`` asks forever there); more than :data:`MAX_RESULTS` matches is
  refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pneumodet.errors import ConfigError, PneumodetError
from pneumodet.textsafe import display_path, display_text

if TYPE_CHECKING:
    import requests
    from pydicom.dataset import Dataset

#: The environment variable read for credentials when neither ``--auth-env`` nor ``--auth-file`` is given.
DEFAULT_AUTH_ENV = "PNEUMODET_DICOMWEB_AUTH"
#: HTTP statuses worth another attempt.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
#: Longest wait between two attempts, whatever the server's Retry-After says.
MAX_WAIT_S = 60.0
#: Most QIDO matches one query may have (a query matching more is refused: narrow it).
MAX_RESULTS = 100_000
#: Largest credentials file read.
_MAX_AUTH_FILE = 64 * 1024

T = TypeVar("T")


class PacsError(PneumodetError):
    """A DICOMweb request failed; the message names the server, the request and the status, on one line.

    ``status`` is the HTTP status (``None`` without an answer); ``transient`` is true when the failure was one
    worth retrying and every attempt failed (the server is down or overloaded: nothing more should be sent).
    """

    exit_code = 2

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


# ---------------------------------------------------------------- URL and credentials
def check_url(url: str) -> str:
    """The DICOMweb base URL without a trailing slash; :class:`ConfigError` for anything but
    ``http(s)://host[...]`` or a URL holding credentials."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {display_text(url)!r} is not an http:// or https:// URL with a host "
                          "(e.g. http://pacs.example.org:8042/dicom-web)")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--url holds a user name or password, which other users can read in the process "
                          f"list; put the credentials in ${DEFAULT_AUTH_ENV} (or --auth-env VAR, --auth-file "
                          "FILE) instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"--url {display_text(server_label(url))!r} must not have a query or fragment "
                          "(?... or #...): give the DICOMweb base URL")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def server_label(url: str) -> str:
    """The server as shown in messages: scheme, host, port and path; never user name, password or query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        if parts.port:
            host += f":{parts.port}"
    return display_text(f"{parts.scheme}://{host}{parts.path.rstrip('/')}")


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials and where they came from (``source`` is shown in messages; the secret never is)."""

    scheme: str  # "Bearer" or "Basic"
    secret: str = field(repr=False)
    source: str = ""

    def auth(self) -> Any:
        """A ``requests`` auth object."""
        import requests

        if self.scheme == "Basic":
            user, _, password = self.secret.partition(":")
            return requests.auth.HTTPBasicAuth(user, password)
        return _BearerAuth(self.secret)


class _BearerAuth:
    """``Authorization: Bearer <token>`` on every request (a callable ``requests`` auth)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def _parse_credentials(text: str, source: str) -> Credentials:
    scheme, _, secret = text.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() == "bearer" and secret and " " not in secret:
        return Credentials("Bearer", secret, source)
    if scheme.lower() == "basic" and ":" in secret and secret.partition(":")[0]:
        return Credentials("Basic", secret, source)
    raise ConfigError(f"{source}: credentials must read 'Bearer <token>' or 'Basic <user>:<password>' "
                      "(the value is not shown)")


def read_credentials(*, env: str | None = None, file: Path | str | None = None,
                     environ: Mapping[str, str] | None = None) -> tuple[Credentials | None, list[str]]:
    """Credentials from the environment variable ``env`` or the first non-empty line of ``file`` (not both);
    with neither, from :data:`DEFAULT_AUTH_ENV` when it is set. Returns ``(credentials or None, warnings)``.

    Raises:
        ConfigError: both given, the variable unset or empty, the file unreadable, or a value that is
            neither ``Bearer <token>`` nor ``Basic <user>:<password>``.
    """
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    if env is not None and file is not None:
        raise ConfigError("give credentials by --auth-env or by --auth-file, not both")
    if file is not None:
        path = Path(file)
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"--auth-file {display_path(path)}: not a regular file")
            if info.st_size > _MAX_AUTH_FILE:
                raise ConfigError(f"--auth-file {display_path(path)}: {info.st_size:,} bytes; a credentials "
                                  f"file holds one line (at most {_MAX_AUTH_FILE:,} bytes)")
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--auth-file {display_path(path)}: cannot read it "
                              f"({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--auth-file {display_path(path)}: not UTF-8 text") from None
        if info.st_mode & 0o077:
            warnings.append(f"--auth-file {display_path(path)} can be read by other users (mode "
                            f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it")
        line = next((ln for ln in text.splitlines() if ln.strip()), "")
        if not line:
            raise ConfigError(f"--auth-file {display_path(path)}: empty")
        return _parse_credentials(line, f"--auth-file {display_path(path)}"), warnings
    name = env if env is not None else DEFAULT_AUTH_ENV
    value = environ.get(name)
    if value is None or not value.strip():
        if env is not None:
            raise ConfigError(f"--auth-env {display_text(name)}: the environment variable is not set or "
                              "empty")
        return None, warnings
    return _parse_credentials(value, f"${display_text(name)}"), warnings


# ---------------------------------------------------------------- the client
@dataclass
class StoreOutcome:
    """What one STOW-RS request stored: the SOP Instance UIDs the server confirmed, the others with a
    reason."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


def _quiet_library_logs() -> None:
    """dicomweb-client logs warnings and errors that it also raises or returns; without a handler of its own
    Python prints them on stderr as stray lines. A NullHandler keeps them off (errors are reported here)."""
    log = logging.getLogger("dicomweb_client")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())


class DicomWebServer:
    """One DICOMweb server: searches, retrievals and stores, with timeouts, bounded retries, one-line errors.

    Args:
        url: the DICOMweb base URL (QIDO, WADO and STOW below it), checked by :func:`check_url`.
        credentials: from :func:`read_credentials`, or ``None``.
        timeout: seconds to connect and seconds to wait for each answer.
        retries: further attempts after a transient failure (0: none).
        backoff: seconds before the first retry; doubled for each next one.
        sleep: how to wait between attempts (default :func:`_wait`, which tests replace with a recorder).
        page_size: QIDO results asked for per page.
    """

    def __init__(self, url: str, *, credentials: Credentials | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 1.0, sleep: Callable[[float], None] | None = None,
                 page_size: int = 1000) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not (timeout > 0) or retries < 0 or not (backoff >= 0) or page_size < 1:
            raise ConfigError(f"--timeout must be above 0 and --retries at least 0 (got {timeout}, "
                              f"{retries})")
        self.url = check_url(url)
        self.label = server_label(self.url)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._sleep = sleep or _wait
        self.page_size = page_size
        self.retries_made: list[str] = []  # one line per retry: what, why, the wait
        self.credentials = credentials
        session = requests.Session()
        if credentials is not None:
            session.auth = credentials.auth()
        _quiet_library_logs()
        self._client = DICOMwebClient(self.url, session=session, timeout=(self.timeout, self.timeout))
        self._client.set_http_retry_params(retry=False)  # every attempt is made and counted here

    # -------------------------------------------------------------- attempts
    def call(self, what: str, request: Callable[[], T], *, retry: bool = True) -> T:
        """``request()``, retried on transient failures; any failure becomes one :class:`PacsError`."""
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            try:
                return request()
            except PacsError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure of the request becomes one line
                status, cause, transient, wait_hint = self._describe(exc)
                if not transient or attempt == attempts:
                    tries = f" ({attempt} attempts)" if attempt > 1 else ""
                    raise PacsError(f"{self.label}: {what}: {cause}{tries}", status=status,
                                    transient=transient) from None
                wait = min(MAX_WAIT_S, max(self.backoff * 2 ** (attempt - 1), wait_hint or 0.0))
                self.retries_made.append(f"{what}: {cause}; attempt {attempt + 1} of {attempts} after "
                                         f"{wait:g} s")
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _describe(self, exc: Exception) -> tuple[int | None, str, bool, float | None]:
        """``(HTTP status, cause text, transient, server's Retry-After)`` of a failed request."""
        import requests

        response = getattr(exc, "response", None)
        if isinstance(exc, requests.exceptions.HTTPError) and response is not None:
            status = int(response.status_code)
            reason = display_text(str(response.reason or ""))[:80]
            cause = f"HTTP {status} {reason}".rstrip()
            if status in (401, 403):
                source = self.credentials.source if self.credentials else "none given"
                cause += f" (credentials: {source})"
            return status, cause, status in TRANSIENT_STATUS, _retry_after(response)
        if isinstance(exc, requests.exceptions.SSLError):
            return None, (f"TLS error ({_root_cause(exc)}); for a site certificate authority set "
                          "REQUESTS_CA_BUNDLE=/path/to/ca.pem"), False, None
        if isinstance(exc, requests.exceptions.Timeout):
            return None, f"no answer within {self.timeout:g} s", True, None
        if isinstance(exc, requests.exceptions.ConnectionError):
            root = _root_cause(exc)
            if "refused" in root.lower():
                return None, "cannot connect (connection refused)", True, None
            if "name or service" in root.lower() or "nodename" in root.lower() or "resolve" in root.lower():
                return None, f"cannot connect (unknown host: {root})", False, None
            return None, f"connection failed ({root})", True, None
        if isinstance(exc, requests.exceptions.RequestException):
            return None, f"request failed ({type(exc).__name__}: {display_text(str(exc))[:150]})", False, None
        # dicomweb-client's parsing of an answer that is not what DICOMweb promises (HTML, bad JSON, ...)
        return None, (f"the answer is not valid DICOMweb ({type(exc).__name__}: "
                      f"{display_text(str(exc))[:150]})"), False, None

    # -------------------------------------------------------------- QIDO-RS
    def search(self, level: str, *, filters: Mapping[str, str] | None = None, fields: Sequence[str] = (),
               study: str | None = None, what: str | None = None) -> list[dict[str, Any]]:
        """QIDO-RS at ``level`` (``"studies"``, ``"series"`` or ``"instances"``, within ``study`` if given),
        every page of it (see the module docstring). Results are DICOM JSON objects."""
        what = what or f"QIDO-RS search for {level}" + (f" of study {study}" if study else "")
        uid_tag = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[level]
        method = {"studies": self._client.search_for_studies, "series": self._client.search_for_series,
                  "instances": self._client.search_for_instances}[level]
        kwargs: dict[str, Any] = {"search_filters": dict(filters or {}), "fields": list(fields) or None}
        if study is not None:
            kwargs["study_instance_uid"] = study

        def key(item: dict[str, Any]) -> str:  # one without a UID is kept (and reported by the caller)
            return first_value(item, uid_tag) or f"#{id(item)}"

        results: dict[str, dict[str, Any]] = {}
        while True:
            offset = len(results)
            page = self.call(what, lambda offset=offset: method(limit=self.page_size, offset=offset,
                                                                 **kwargs))
            fresh = {key(item): item for item in page if key(item) not in results}
            results.update(fresh)
            if not fresh and offset:  # an end at a page boundary, or paging broken for this query: ask once
                results.update({key(item): item for item in self.call(what, lambda: method(**kwargs))})
            if len(results) > MAX_RESULTS:
                raise PacsError(f"{self.label}: {what}: more than {MAX_RESULTS:,} matches; narrow the query")
            if not fresh or len(page) < self.page_size:
                return list(results.values())

    # -------------------------------------------------------------- WADO-RS
    def fetch(self, study: str, series: str, sop: str) -> Dataset:
        """One instance by WADO-RS, in the transfer syntax it is stored in (no transcoding by the server)."""
        return self.call(f"WADO-RS retrieval of instance {sop}",
                         lambda: self._client.retrieve_instance(study, series, sop,
                                                                media_types=(("application/dicom", "*"),)))

    # -------------------------------------------------------------- STOW-RS
    def store(self, study: str, datasets: Sequence[Dataset]) -> StoreOutcome:
        """Store ``datasets`` (all of ``study``) in one STOW-RS request.

        Each SOP Instance UID is *stored* only when the server's answer lists it among the referenced
        instances; one it lists as failed, or does not mention, is in ``failed`` with the reason.

        Raises:
            PacsError: the request failed as a whole; ``transient`` when every attempt failed transiently.
        """
        what = f"STOW-RS of {len(datasets)} instance(s) to study {study}"
        answer = self.call(what, lambda: self._client.store_instances(datasets, study_instance_uid=study))
        outcome = StoreOutcome()
        for item in answer.get("ReferencedSOPSequence", []) or []:
            outcome.stored.add(str(item.get("ReferencedSOPInstanceUID", "")))
        for item in answer.get("FailedSOPSequence", []) or []:
            sop = str(item.get("ReferencedSOPInstanceUID", ""))
            reason = item.get("FailureReason")
            code = reason if reason is not None else "?"
            outcome.failed[sop] = f"refused by the server (failure reason {code})"
            outcome.stored.discard(sop)
        for ds in datasets:
            sop = str(ds.SOPInstanceUID)
            if sop not in outcome.stored and sop not in outcome.failed:
                outcome.failed[sop] = "not confirmed by the server's STOW-RS answer"
        outcome.stored &= {str(ds.SOPInstanceUID) for ds in datasets}
        return outcome


def _wait(seconds: float) -> None:
    """The wait between two attempts (looked up at each wait, so a test can replace it)."""
    time.sleep(seconds)


def first_value(item: Mapping[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, as text, or ``None``."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the back-off applies


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message, short (requests wraps urllib3 wraps socket errors)."""
    inner: BaseException = exc
    for _ in range(10):
        nxt = inner.__cause__ or inner.__context__ or (inner.args[0] if inner.args and
                                                        isinstance(inner.args[0], BaseException) else None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = display_text(str(getattr(inner, "reason", None) or inner))
    if "]" in text and "Errno" in text:  # "[Errno 111] Connection refused" -> "Connection refused"
        text = text.split("]", 1)[1].strip()
    return text[:150] or type(inner).__name__
