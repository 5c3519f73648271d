"""What one request and the whole service may take: sizes, counts, time, queue.

Every limit answers with a JSON error naming it, never by running out of memory or time:

* a body larger than ``max_upload_bytes`` (declared in ``Content-Length``, or counted while it streams
  in) -> 413, before or as soon as the excess arrives;
* more than ``max_files`` files in one request -> 413;
* more than ``max_queue`` images waiting for the model, or more than ``max_queue`` prediction requests in
  progress -> 503 with ``Retry-After`` (the request is refused before its body is read);
* a request not answered within ``timeout_s`` (slow upload included) -> 504, its images taken out of
  the queue.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pneumodet.errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The service's bounds (see the module docstring for what each answers)."""

    max_upload_bytes: int = 64 * MIB
    max_files: int = 16
    timeout_s: float = 60.0
    max_queue: int = 64

    def check(self) -> Limits:
        """``self``, or :class:`ConfigError` naming the first unusable value."""
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"the upload limit must be at least 1 KiB, got {self.max_upload_bytes} bytes")
        if self.max_files < 1:
            raise ConfigError(f"files per request must be at least 1, got {self.max_files}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"the request timeout must be a positive number of seconds, got {self.timeout_s}")
        if self.max_queue < self.max_files:
            raise ConfigError(f"the queue ({self.max_queue} images) must hold at least one full request "
                              f"({self.max_files} files)")
        return self


class UploadTooLarge(Exception):
    """The request body is larger than the limit."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        self.limit, self.declared = limit, declared
        size = f"{declared} bytes declared" if declared is not None else "more was sent"
        super().__init__(f"request body too large: at most {limit} bytes ({limit / MIB:g} MiB) per request; "
                         f"{size}")


def declared_length(headers: object) -> int | None:
    """The ``Content-Length`` of a request's headers (a Starlette ``Headers``), or ``None`` if absent or
    not a number (then the body is counted as it arrives)."""
    value = headers.get("content-length") if hasattr(headers, "get") else None
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


async def bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``stream``'s chunks, raising :class:`UploadTooLarge` as soon as more than ``limit`` bytes came."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise UploadTooLarge(limit)
        yield chunk
