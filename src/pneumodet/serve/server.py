"""``pneumodet serve``: load the run once, bind, serve with uvicorn, stop gracefully.

The model is loaded and warmed up before the socket is bound, so a bad run is a one-line error and a
listening service is a ready one. SIGTERM or Ctrl-C: the listening socket closes, ``/readyz`` turns 503,
requests in progress are answered (up to the request timeout, plus a margin), the batcher finishes its
queue, then the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pneumodet.errors import ConfigError
from pneumodet.serve.app import TOKEN_ENV, ServeSettings, create_app
from pneumodet.serve.model import ServedModel
from pneumodet.textsafe import display_path

log = logging.getLogger("pneumodet.serve")
#: Seconds beyond the request timeout that a graceful shutdown waits for requests in progress.
_SHUTDOWN_MARGIN_S = 5.0
#: Connections the kernel holds until they are accepted (uvicorn's default).
_BACKLOG = 2048
#: Where pneumodet's own code lives: the warnings whose source is there are logged (the formatted warning
#: starts with the source file's path).
_PNEUMODET_SOURCE = str(Path(__file__).resolve().parents[1]) + os.sep


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one; read it back from the socket).

    Raises:
        ConfigError: the address cannot be used (in use, not this machine's, not an address).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r}: not an address or name this machine can resolve ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)  # listening before the address is announced: early clients wait, not fail
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _configure_logging() -> None:
    """Service and uvicorn messages to stderr, one line each, with a timestamp (access lines are the
    service's own: route, status, seconds; uvicorn's, which name the client and the query, are off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # read_dicom's notes on odd images become log lines; warnings from libraries are dropped: a DICOM
    # library may quote a malformed header value (a name, a date) in its warning (allow-list, not block-list)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(lambda record: _PNEUMODET_SOURCE in record.getMessage()[:500])
    for name in ("pneumodet.serve", "uvicorn", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(model_source: Path | str, *, host: str = "127.0.0.1", port: int = 8000, device: str | None = "auto",
          precision: str | None = None, settings: ServeSettings | None = None,
          announce: Callable[[str], Any] = print) -> str:
    """Serve ``model_source`` (a run folder or a checkpoint) until SIGTERM / SIGINT; returns a summary line.

    ``announce`` gets the line with the address once the socket is bound (the CLI prints it; with
    ``port=0`` it is how a caller learns the port).

    Raises:
        PneumodetError: an unusable run, device, setting or address (before anything listens).
    """
    import uvicorn

    settings = (settings or ServeSettings()).check()
    model = ServedModel(model_source, device=device, precision=precision)
    model.warm_up()
    app = create_app(model, settings)
    state = app.state.pneumodet
    sock = bind(host, port)
    _configure_logging()  # only now: a command that fails before listening leaves logging as it was
    bound_host, bound_port = sock.getsockname()[:2]
    stopped_by: list[int] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # /readyz says so at once; requests in progress are still answered
            state.batcher.hurry()  # what is queued runs now, without waiting for fuller batches
            stopped_by.append(sig)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.limits.timeout_s + _SHUTDOWN_MARGIN_S),
                            timeout_keep_alive=5)
    server = _Server(config)
    if not is_loopback(host) and settings.token is None:
        log.warning("listening on %s, reachable from other machines, without a token: anyone who can reach "
                     "this port can send images; set $%s", host, TOKEN_ENV)
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    announce(f"pneumodet serve: {model.encoder} {model.image_size} px from {display_path(model.checkpoint)} "
             f"(threshold {model.threshold:.3f}, {model.predictor.device}, {model.predictor.precision}) on "
             f"http://{shown}:{bound_port}/ (API docs /docs; auth {'on' if settings.token else 'off'})")
    def stop_early(sig: int, frame: Any) -> None:  # before uvicorn's own handlers are in place
        stopped_by.append(sig)
        server.should_exit = True

    # uvicorn re-raises the signal it stopped on once it has shut down: this handler takes it then, so that a
    # clean stop exits normally instead of being killed by the signal
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop_early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    why = signal.Signals(stopped_by[0]).name if stopped_by else "server exit"
    answered = sum(state.metrics.requests.values())
    return f"pneumodet serve: stopped ({why}) after {answered} request(s), {state.batcher.batches} batch(es)"
