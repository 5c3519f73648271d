"""Paths as text that can always be printed and written.

On POSIX a file name is bytes; Python turns bytes that are not valid in the file-system encoding into
lone surrogates (``b"\\xff"`` -> ``"\\udcff"``). Such a ``str`` works as a path but cannot be encoded to
UTF-8, so printing it, or writing it into a report, summary or JSON file, raises ``UnicodeEncodeError``.
Text meant for people (messages, summaries, reports) shows a path through :func:`display_path`, which
never fails: undecodable bytes appear as ``\\xff`` escapes. Files that must give the path back to a
program (e.g. a split's ``image_path`` column) keep the exact bytes instead (``errors="surrogateescape"``
on both write and read).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["display_path", "display_text"]


def display_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``path`` as one line of printable text: each undecodable byte shown as ``\\xNN``, each control
    character (a line break in a folder name) as its escape (:func:`display_text`).

    An ordinary path comes back unchanged (``str(Path(p))``), so messages naming ordinary files do not
    change. The result is for display only; it is not guaranteed to name the same file.
    """
    text = os.fsdecode(path)
    # The undecodable bytes fsdecode turned into surrogates, back as the bytes they were; other lone
    # surrogates (not from a file name) cannot be, and are left to display_text.
    with contextlib.suppress(UnicodeEncodeError):
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    return display_text(text)


def display_text(text: str) -> str:
    """``text`` on one line that any UTF-8 stream can print: characters that are not printable (line
    breaks, tabs, escape codes, lone surrogates) are shown as Python escapes (``\\n``, ``\\x1b``,
    ``\\udcff``); everything else, accented letters included, is kept as is."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
