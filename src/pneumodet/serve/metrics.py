"""The service's numbers in the Prometheus text exposition format (version 0.0.4), for ``GET /metrics``.

A handful of series in one process do not need a client library: counters, histograms and gauges are
kept here and rendered on request. Every update happens on the event loop's thread (the batcher reports
a batch once its worker thread has returned), so nothing here is locked.

Series (all prefixed ``pneumodet_``):

* ``http_requests_total{route, method, status}``: answered requests (``route`` is the route's template,
  ``other`` for unknown paths, so that a scanner cannot create series);
* ``http_request_duration_seconds{route}``: histogram of the time from the request's first byte to its
  answer;
* ``http_requests_in_progress``: requests being answered now;
* ``images_total{outcome}``: images ``predicted``, ``unreadable`` (422), ``dropped`` (the request timed
  out before its answer) or ``failed`` (their batch raised: 500);
* ``batch_size``, ``batch_duration_seconds``: histograms of the batches the model ran;
* ``queue_depth``: images waiting for the model now;
* ``model_info{encoder, image_size, checkpoint_sha256}``: always 1, the served model's identity.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

#: Seconds: from a health probe (ms) to a large multi-image request on a busy CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREFIX = "pneumodet_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class Histogram:
    """Cumulative-bucket histogram: ``counts[i]`` observations at most ``buckets[i]``; ``+Inf`` is ``count``."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted(self.buckets))
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        first = bisect.bisect_left(self.buckets, value)  # the first bucket whose bound is >= value
        for i in range(first, len(self.buckets)):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Mapping[str, str]) -> Iterable[str]:
        for bound, n in zip(self.buckets, self.counts, strict=True):
            yield f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {n}"
        yield f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}"
        yield f"{name}_sum{_labels(labels)} {_number(self.total)}"
        yield f"{name}_count{_labels(labels)} {self.count}"


@dataclass
class ServiceMetrics:
    """Counters, histograms and gauges of one service (one per app: no global registry).

    ``queue_depth`` is read when the metrics are rendered (the batcher owns the number); ``model_info``
    labels the served model.
    """

    queue_depth: Callable[[], int] = lambda: 0
    model_info: Mapping[str, str] = field(default_factory=dict)
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)
    in_progress: int = 0
    images: dict[str, int] = field(default_factory=lambda: {"predicted": 0, "unreadable": 0, "dropped": 0,
                                                                      "failed": 0})
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    batch_seconds: Histogram = field(default_factory=lambda: Histogram(BATCH_SECONDS_BUCKETS))

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_images(self, outcome: str, n: int = 1) -> None:
        self.images[outcome] = self.images.get(outcome, 0) + n

    def batch_done(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> str:
            out.append(f"# HELP {PREFIX}{name} {text}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            return PREFIX + name

        name = head("http_requests_total", "counter", "HTTP requests answered, by route, method and status.")
        for (route, method, status), n in sorted(self.requests.items()):
            out.append(f"{name}{_labels({'route': route, 'method': method, 'status': status})} {n}")
        name = head("http_request_duration_seconds", "histogram", "Time to answer a request, by route.")
        for route, hist in sorted(self.latency.items()):
            out.extend(hist.lines(name, {"route": route}))
        name = head("http_requests_in_progress", "gauge", "Requests being answered now.")
        out.append(f"{name} {self.in_progress}")
        name = head("images_total", "counter", "Images by outcome: predicted, unreadable (422), dropped "
                                               "(the request timed out before its answer), failed (500).")
        for outcome, n in sorted(self.images.items()):
            out.append(f"{name}{_labels({'outcome': outcome})} {n}")
        name = head("batch_size", "histogram", "Images per batch run by the model.")
        out.extend(self.batch_size.lines(name, {}))
        name = head("batch_duration_seconds", "histogram", "Time the model took per batch.")
        out.extend(self.batch_seconds.lines(name, {}))
        name = head("queue_depth", "gauge", "Images waiting for the model.")
        out.append(f"{name} {int(self.queue_depth())}")
        name = head("model_info", "gauge", "The served model (always 1).")
        out.append(f"{name}{_labels(self.model_info)} 1")
        return "\n".join(out) + "\n"
