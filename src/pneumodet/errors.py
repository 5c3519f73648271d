"""One error family for everything a user can get wrong.

The CLI turns any :class:`PneumodetError` into a one-line message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pneumodet.textsafe import display_path


class PneumodetError(Exception):
    """Base class of the errors caused by input, configuration or environment."""


class LabelsError(PneumodetError):
    """A labels/classes CSV is unusable (missing columns, unreadable, or a problem under ``--strict``)."""


class DicomReadError(PneumodetError):
    """A file is not a readable DICOM image. The message names the file and the cause."""

    def __init__(self, path: object, cause: str) -> None:
        self.path = str(path)  # exact (it may hold undecodable bytes as surrogates); the message is printable
        self.cause = cause
        super().__init__(f"{display_path(self.path)}: {cause}")


class SplitError(PneumodetError):
    """A split cannot be made or read (e.g. a set would be empty)."""


class CacheError(PneumodetError):
    """An image cache is missing, inconsistent or cannot be written."""


class SubmissionError(PneumodetError):
    """A submission CSV is malformed; the message names the line."""


class ConfigError(PneumodetError):
    """A run configuration or model configuration is invalid."""


class CheckpointError(PneumodetError):
    """A checkpoint or weights file cannot be loaded safely."""


class RunError(PneumodetError):
    """A run folder is not a run, has not finished, or holds a damaged file; the message names it."""
