"""``pneumodet serve``: a detection service with a review page (FastAPI + uvicorn, one process).

* :mod:`~pneumodet.serve.model`: the run loaded once; decoding uploads, answers, model card, DICOM SR;
* :mod:`~pneumodet.serve.batching`: the dynamic batcher (concurrent requests -> one batch in one thread);
* :mod:`~pneumodet.serve.limits`: upload size, files per request, timeout, queue;
* :mod:`~pneumodet.serve.metrics`: Prometheus text for ``/metrics``;
* :mod:`~pneumodet.serve.app`: the FastAPI app (``/v1/predict``, ``/v1/model``, probes, the page at ``/``);
* :mod:`~pneumodet.serve.server`: binding, uvicorn, graceful shutdown;
* ``static/``: the review page (plain HTML, JavaScript and CSS, served by the service: works offline).

The submodules import FastAPI and uvicorn; nothing else in pneumodet imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pneumodet.lazy import lazy_exports

if TYPE_CHECKING:
    from pneumodet.serve.app import ServeSettings, create_app
    from pneumodet.serve.limits import Limits
    from pneumodet.serve.model import ServedModel
    from pneumodet.serve.server import serve

__all__ = ["Limits", "ServeSettings", "ServedModel", "create_app", "serve"]
_HOMES = {"Limits": "limits", "ServeSettings": "app", "create_app": "app", "ServedModel": "model", "serve": "server"}


__getattr__ = lazy_exports(__name__, _HOMES)
