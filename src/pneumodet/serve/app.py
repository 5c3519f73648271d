"""The HTTP API (FastAPI): ``/v1/predict``, ``/v1/model``, probes, metrics and the review page.

:func:`create_app` builds one app around one loaded model (:class:`~pneumodet.serve.model.ServedModel`);
nothing is global, so tests build as many as they like. Requests flow::

    guard (size, requests in progress, metrics, log line)
      -> auth (optional bearer token) -> body read within the limits -> decode (threads)
      -> DynamicBatcher (one model thread) -> answer per image (JSON, or DICOM SR)

Every error is a JSON object ``{"status": N, "error": "one line", ...}`` (``files`` lists each unusable
upload with its cause for a 422); no traceback ever reaches a client (an unexpected error is logged and
answered 500 "internal error"). Logs name images by their IDs only (PatientID, SOP Instance UID), or by
keyed hashes of them, or not at all (``log_ids``); never a file name, never anything else from a header.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from pneumodet import __version__
from pneumodet.errors import ConfigError, PneumodetError
from pneumodet.safeio import dumps_json
from pneumodet.serve.batching import BatcherStopped, DynamicBatcher, QueueFull
from pneumodet.serve.limits import Limits, UploadTooLarge, bounded, declared_length
from pneumodet.serve.metrics import ServiceMetrics
from pneumodet.serve.model import BOX_FORMAT, ServedModel, UnreadableUpload
from pneumodet.textsafe import display_text

log = logging.getLogger("pneumodet.serve")

STATIC_DIR = Path(__file__).with_name("static")
#: Environment variable holding the bearer token (never a command-line option: it would show in `ps`).
TOKEN_ENV = "PNEUMODET_SERVE_TOKEN"
LOG_IDS = ("plain", "hash", "none")
#: Routes named in metrics; anything else is "other" (a scanner must not create series).
_ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json")
#: Routes whose requests hold images: limited in number, in body size and in time.
_IMAGE_ROUTES = ("/v1/predict",)
#: where the OpenAPI page's own Swagger UI files are served
_DOCS_STATIC = "/docs-static"
#: Shown with a 415 and in the API description.
_HOW_TO_SEND = ("send DICOM files as multipart/form-data file parts (any field name, e.g. curl -F "
                "file=@image.dcm), or one file as the body with Content-Type: application/dicom")
#: The review page loads only what this service serves; images are data URLs made here.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
_SR_MEDIA = "application/dicom"
#: The optional bearer token, as OpenAPI documents it (module level: FastAPI resolves annotations here).
_BEARER = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV} on the server")


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches and bounds work, its optional token and how logs name images."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    log_ids: str = "plain"

    def check(self) -> ServeSettings:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not (0 <= self.max_wait_ms <= 10_000):
            raise ConfigError(f"--max-wait-ms must be from 0 to 10000, got {self.max_wait_ms}")
        if self.log_ids not in LOG_IDS:
            raise ConfigError(f"--log-ids must be one of {', '.join(LOG_IDS)}, got {self.log_ids!r}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError(f"${TOKEN_ENV} is set but shorter than 16 characters; use a long random token "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self.limits.check()
        return self


class ApiError(Exception):
    """An answer other than 200: status, one-line message, extra JSON fields and headers."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        self.status, self.message, self.headers, self.fields = status, message, headers or {}, fields
        super().__init__(message)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps_json(payload, indent=None), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **fields: Any) -> Response:
    return _json({"status": status, "error": display_text(message), **fields}, status, headers)


class _IdLog:
    """How log lines name an image: its IDs (``plain``), keyed hashes of them (``hash``: the same image gives
    the same hash within one server process, and the IDs cannot be found by trying candidates without the
    per-process key), or nothing (``none``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._key = secrets.token_bytes(32)

    def __call__(self, patient_id: str | None, sop_uid: str | None) -> str:
        if self.mode == "none":
            return "an image"
        if self.mode == "hash":
            def digest(text: str | None) -> str:
                return hmac.new(self._key, (text or "").encode("utf-8", "surrogatepass"), "sha256").hexdigest()[:16]
            return f"patient#{digest(patient_id)} sop#{digest(sop_uid)}"
        return f"patient {display_text(patient_id or '?')} sop {display_text(sop_uid or '?')}"


@dataclass
class _State:
    model: ServedModel
    settings: ServeSettings
    metrics: ServiceMetrics
    batcher: DynamicBatcher
    id_log: _IdLog
    image_requests: int = 0  # /v1/predict requests in progress
    draining: bool = False  # SIGTERM received: finish what is in progress, take nothing new
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.batcher.running and not self.draining


# ---------------------------------------------------------------- the guard (pure ASGI middleware)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def route_of(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith(_DOCS_STATIC + "/"):
        return _DOCS_STATIC
    return "other"


class _Guard:
    """Around every HTTP request: the size and in-progress limits of image requests (refused before the
    body is read), security headers, metrics and one log line (method, route, status, seconds; never the
    query string or a file name)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], state: _State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, metrics = self.state, self.state.metrics
        route, method = route_of(scope["path"]), scope["method"]
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if route.startswith("/v1/"):  # answers carry patient IDs: no cache may keep them
                    headers.append((b"cache-control", b"no-store"))
                if route == "/":
                    headers.append((b"content-security-policy", _PAGE_CSP.encode()))
                message["headers"] = headers
            await send(message)

        metrics.in_progress += 1
        counted = False
        try:
            refusal = self._refusal(scope, route, method)
            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
                return
            if route in _IMAGE_ROUTES and method == "POST":
                state.image_requests += 1
                counted = True
            await self.app(scope, receive, send_with_headers)
        finally:
            if counted:
                state.image_requests -= 1
            metrics.in_progress -= 1
            seconds = time.perf_counter() - started
            metrics.request_done(route, method, status, seconds)
            if route not in ("/healthz", "/readyz", "/metrics", "/static"):
                log.info("%s %s %d %.3fs", method, route, status, seconds)

    def _refusal(self, scope: Scope, route: str, method: str) -> Response | None:
        if route not in _IMAGE_ROUTES or method != "POST":
            return None
        state, limits = self.state, self.state.settings.limits
        length = declared_length(Headers(scope=scope))
        if length is not None and length > limits.max_upload_bytes:
            return error_response(413, str(UploadTooLarge(limits.max_upload_bytes, length)),
                                  limit_bytes=limits.max_upload_bytes)
        if not state.ready:
            return error_response(503, "the service is shutting down or not ready", {"Retry-After": "5"})
        if state.image_requests >= limits.max_queue:
            return error_response(503, f"{state.image_requests} prediction requests are in progress (at most "
                                       f"{limits.max_queue}); retry later",
                                  {"Retry-After": str(state.batcher.retry_after())})
        if state.batcher.depth >= limits.max_queue:
            return error_response(503, f"the queue is full ({state.batcher.depth} images wait for the model); "
                                       "retry later", {"Retry-After": str(state.batcher.retry_after())})
        return None


# ---------------------------------------------------------------- reading a request's files
def _upload_name(upload: UploadFile, number: int) -> str:
    name = display_text(Path(upload.filename or "").name)[:200]
    return name or f"file {number}"


async def read_uploads(request: Request, limits: Limits) -> list[UploadFile]:
    """The files of a request (multipart file parts, or an ``application/dicom`` body), within the limits.

    Raises:
        ApiError: 413 (too large, too many files), 415 (another content type), 400 (malformed, no file).
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    stream = bounded(request.stream(), limits.max_upload_bytes)
    too_large = {"limit_bytes": limits.max_upload_bytes}
    if media == "multipart/form-data":
        parser = MultiPartParser(request.headers, stream, max_files=limits.max_files, max_fields=16,
                                 max_part_size=64 * 1024)
        try:
            form = await parser.parse()
        except UploadTooLarge as exc:
            raise ApiError(413, str(exc), **too_large) from None
        except MultiPartException as exc:
            if exc.message.startswith("Too many files"):
                raise ApiError(413, f"too many files: at most {limits.max_files} per request",
                               limit_files=limits.max_files) from None
            raise ApiError(400, f"malformed multipart body: {exc.message}") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            await form.close()
            raise ApiError(400, f"no file in the request; {_HOW_TO_SEND}")
        return files
    if media == "application/dicom":
        from tempfile import SpooledTemporaryFile

        from starlette.formparsers import parse_options_header

        _, options = parse_options_header(request.headers.get("content-disposition", ""))
        filename = options.get(b"filename", b"").decode("utf-8", "replace") or "body.dcm"
        spool = SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115 - the UploadFile owns it and closes it
        upload = UploadFile(spool, filename=filename, headers=Headers())  # type: ignore[arg-type]
        try:
            async for chunk in stream:
                await upload.write(chunk)
        except UploadTooLarge as exc:
            await upload.close()
            raise ApiError(413, str(exc), **too_large) from None
        await upload.seek(0)
        return [upload]
    raise ApiError(415, f"unsupported content type {media or '(none)'!r}; {_HOW_TO_SEND}")


def _save(upload: UploadFile, path: Path) -> None:
    upload.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


# ---------------------------------------------------------------- the app
def create_app(model: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The service around ``model`` (loaded already). The batcher starts and stops with the app's lifespan:
    on shutdown every queued image is still answered."""
    settings = (settings or ServeSettings()).check()
    limits = settings.limits
    metrics = ServiceMetrics(model_info={"encoder": model.encoder, "image_size": str(model.image_size),
                                         "checkpoint_sha256": model.sha256})
    # the model's run_batch is looked up per batch (a test may hold it)
    batcher: DynamicBatcher = DynamicBatcher(lambda images: model.run_batch(images), max_batch=settings.max_batch,
                                             max_wait_s=settings.max_wait_ms / 1000.0, max_queue=limits.max_queue,
                                             on_batch=metrics.batch_done)
    metrics.queue_depth = lambda: batcher.depth
    state = _State(model, settings, metrics, batcher, _IdLog(settings.log_ids))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's own type
        await batcher.start()
        log.info("ready: %s %d px, checkpoint sha256 %s, threshold %.3f; batches of at most %d image(s), "
                 "waiting at most %g ms", model.encoder, model.image_size, model.sha256[:12], model.threshold,
                 settings.max_batch, settings.max_wait_ms)
        try:
            yield
        finally:
            state.draining = True
            await batcher.stop()
            log.info("stopped: %d batch(es) run", batcher.batches)

    # FastAPIOffline: the OpenAPI page (/docs) served with its own Swagger UI files, no CDN (works offline)
    app = FastAPIOffline(
        redoc_url=None, static_url=_DOCS_STATIC,
        title="pneumodet", version=__version__, lifespan=lifespan,
        summary="Pneumonia (lung opacity) boxes on chest X-ray DICOMs: RetinaNet trained on the RSNA challenge data.",
        description=(f"Predictions are an algorithm's output, not a diagnosis. POST DICOMs to `/v1/predict` "
                     f"({_HOW_TO_SEND}); boxes are {BOX_FORMAT}. Limits: {limits.max_files} files and "
                     f"{limits.max_upload_bytes >> 20} MiB per request, {limits.timeout_s:g} s per request, "
                     f"{limits.max_queue} images waiting. The review page is at `/`."),
    )
    app.state.pneumodet = state
    app.add_middleware(_Guard, state=state)  # type: ignore[arg-type]

    # ------------------------------------------------------------ errors: always JSON, never a traceback
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.headers, **exc.fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = ["{} {!r}: {}".format(e.get("loc", ("?",))[0], ".".join(str(p) for p in e.get("loc", ())[1:]),
                                         e.get("msg", "invalid")) for e in exc.errors()]
        return error_response(422, "invalid request: " + "; ".join(problems))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("internal error answering %s %s: %s", request.method, route_of(request.url.path),
                  type(exc).__name__, exc_info=exc)
        return error_response(500, "internal error (the server's log has the details)")

    # ------------------------------------------------------------ auth
    async def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), settings.token.encode("utf-8")):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                           headers={"WWW-Authenticate": "Bearer"})

    secured = [Depends(authorised)] if settings.token is not None else []

    # ------------------------------------------------------------ routes
    @app.get("/healthz", tags=["probes"], summary="liveness: the process answers")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.monotonic() - state.started, 1)}

    @app.get("/readyz", tags=["probes"], summary="readiness: the model is loaded and takes requests",
             responses={503: {"description": "shutting down, or the batcher is not running"}})
    async def readyz() -> Response:
        if not state.ready:
            return error_response(503, "not ready (starting or shutting down)", {"Retry-After": "5"})
        return _json({"status": "ready", "queue_depth": batcher.depth})

    @app.get("/metrics", tags=["probes"], summary="Prometheus text exposition",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model", tags=["v1"], summary="the model card", dependencies=secured)
    async def model_card() -> Response:
        card = await run_in_threadpool(model.model_card)
        card["serving"] = {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                           "max_files": limits.max_files, "max_upload_bytes": limits.max_upload_bytes,
                           "timeout_s": limits.timeout_s, "max_queue": limits.max_queue,
                           "auth": settings.token is not None}
        return _json(card)

    predict_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
                "type": "array", "items": {"type": "string", "format": "binary"},
                "description": f"DICOM files (1 to {limits.max_files}; any field name)"}}}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    errors_doc = {
        400: {"description": "malformed body, or no file in it"},
        401: {"description": "missing or wrong bearer token (when the server has one)"},
        413: {"description": "body or file count over the limits"},
        415: {"description": "neither multipart/form-data nor application/dicom"},
        422: {"description": "a file is not a readable DICOM image (`files` names each, with its cause), "
                             "or a query parameter is invalid"},
        503: {"description": "queue full, too many requests in progress, or shutting down (Retry-After)"},
        504: {"description": "not answered within the request timeout"},
    }

    @app.post("/v1/predict", tags=["v1"], dependencies=secured, summary="boxes and class probabilities per image",
              openapi_extra={"requestBody": predict_body}, response_class=Response,
              responses={200: {"description": "JSON: one entry per image (format=json); the DICOM SR "
                                              "(format=sr; several images: multipart/related)",
                               "content": {"application/json": {}, _SR_MEDIA: {}}}, **errors_doc})
    async def predict(
        request: Request,
        threshold: Annotated[float | None, Query(ge=0.0, le=1.0, description="keep boxes with a score at least "
                                                 "this (default: the run's validation threshold)")] = None,
        preview: Annotated[bool, Query(description="add each image as a PNG (windowed, at most 768 px) for "
                                                   "display")] = False,
        format: Annotated[Literal["json", "sr"], Query(description="json, or sr: the DICOM Structured "
                                                                   "Report")] = "json",
    ) -> Response:
        used = model.threshold if threshold is None else float(threshold)
        try:
            async with asyncio.timeout(limits.timeout_s):
                return await _predict(request, used, preview, format)
        except TimeoutError:
            raise ApiError(504, f"not answered within {limits.timeout_s:g} s (the request timeout); "
                                "its images were dropped", limit_s=limits.timeout_s) from None
        except ClientDisconnect:
            return error_response(400, "the client went away before sending the whole body")

    async def _predict(request: Request, threshold: float, preview: bool, format: str) -> Response:
        uploads = await read_uploads(request, limits)
        folder = Path(await run_in_threadpool(tempfile.mkdtemp, prefix="pneumodet-serve-"))
        try:
            names = [_upload_name(u, i) for i, u in enumerate(uploads, 1)]

            def decode(i: int) -> Any:
                path = folder / f"{i}.dcm"  # never the client's name: no path in it can escape the folder
                _save(uploads[i], path)
                try:
                    return model.decode(names[i], path, preview=preview)
                except UnreadableUpload as exc:
                    return exc

            decoded = await asyncio.gather(*(run_in_threadpool(decode, i) for i in range(len(uploads))))
            bad = [d for d in decoded if isinstance(d, UnreadableUpload)]
            if bad:
                metrics.count_images("unreadable", len(bad))
                listing = "; ".join(f"{b.name}: {b.cause}" for b in bad[:3]) + ("; ..." if len(bad) > 3 else "")
                raise ApiError(422, f"{len(bad)} of {len(decoded)} file(s) are not readable DICOM images "
                                    f"(nothing was predicted): {listing}",
                               files=[{"file": b.name, "cause": display_text(b.cause)} for b in bad])
            try:
                raws = await batcher.submit([d.image for d in decoded])
            except QueueFull as exc:
                raise ApiError(503, f"{exc}; retry later", headers={"Retry-After": str(exc.retry_after)}) from None
            except BatcherStopped:
                raise ApiError(503, "the service is shutting down", headers={"Retry-After": "5"}) from None
            except asyncio.CancelledError:  # timed out (or the server stops) while its images waited or ran
                metrics.count_images("dropped", len(decoded))
                raise
            except Exception:
                metrics.count_images("failed", len(decoded))
                raise
            metrics.count_images("predicted", len(decoded))
            predictions = [model.prediction(d, r, threshold) for d, r in zip(decoded, raws, strict=True)]
            for d, p in zip(decoded, predictions, strict=True):
                log.info("predicted %s: %d box(es) at threshold %.3f", state.id_log(d.patient_id, d.sop_instance_uid),
                         len(p.boxes), threshold)
            if format == "sr":
                return await run_in_threadpool(_sr_response, decoded, predictions, threshold)
            return _json({"box_format": BOX_FORMAT, "threshold": threshold,
                          "threshold_source": "request" if threshold != model.threshold else "run validation",
                          "model": model.identity,
                          "images": [model.answer(d, p) for d, p in zip(decoded, predictions, strict=True)]})
        finally:
            for upload in uploads:
                await upload.close()
            await run_in_threadpool(shutil.rmtree, folder, True)

    def _sr_response(decoded: list[Any], predictions: list[Any], threshold: float) -> Response:
        reports, bad = [], []
        for d, p in zip(decoded, predictions, strict=True):
            try:
                reports.append(model.structured_report(p, threshold))
            except PneumodetError as exc:
                bad.append({"file": d.name, "cause": display_text(str(exc).replace(str(d.source), d.name))})
        if bad:
            return error_response(422, f"{len(bad)} image(s) cannot be referenced by a DICOM SR: "
                                       + "; ".join(f"{b['file']}: {b['cause']}" for b in bad[:3]), files=bad)
        if len(reports) == 1:
            return Response(reports[0], media_type=_SR_MEDIA,
                            headers={"Content-Disposition": 'attachment; filename="pneumodet_sr.dcm"'})
        boundary = secrets.token_hex(16)
        parts = [f"--{boundary}\r\nContent-Type: {_SR_MEDIA}\r\n\r\n".encode() + r + b"\r\n" for r in reports]
        return Response(b"".join(parts) + f"--{boundary}--\r\n".encode(),
                        media_type=f'multipart/related; type="{_SR_MEDIA}"; boundary={boundary}')

    # ------------------------------------------------------------ the review page
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
