"""Who made a result (the algorithm's identity) and the UIDs of the DICOM objects pneumodet writes.

Algorithm identification
------------------------
Every SR and presentation state names its maker as an algorithm, never a person: name ``pneumodet``,
its version, the SHA-256 of the model checkpoint file and the prediction settings (threshold, TTA,
gating, precision). In the SR they are the TID 4019 Algorithm Identification of every finding and a
*device* observer (TID 1004) whose UID is derived from the checkpoint's hash.

UIDs
----
Every UID pneumodet writes (SR and presentation state instances and series, tracking UIDs, the device
observer) is derived from a description of what it identifies:

* default root ``2.25``: ``2.25.<a UUID as one decimal number>`` (ISO/IEC 9834-8, ITU-T X.667; DICOM
  PS3.5 B.2). It needs no registered root and is unique without coordination. The UUID is name-based
  (version 5): a fixed pneumodet namespace (:data:`UUID_NAMESPACE`) and the description.
* a site's own registered root (``--uid-root``, e.g. ``1.2.826.0.1.3680043.10.999.``): the root, then
  the decimal digits of the description's SHA-256, cut so the UID has at most 64 characters (at least
  :data:`MIN_UID_DIGITS` digits remain).

An instance's description holds the source image's SOP Instance UID, the checkpoint's SHA-256, the
settings and the predicted values, so one model on one image with one result always gets the same UID:
a rerun after a partial failure stores nothing twice (the archive already holds that instance), and two
different results never share a UID.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pneumodet import __version__
from pneumodet.errors import ConfigError
from pneumodet.safeio import file_sha256
from pneumodet.textsafe import display_text

ALGORITHM_NAME = "pneumodet"
#: The Manufacturer written into every object: the software, not a hospital or a vendor.
MANUFACTURER = "pneumodet (open-source research software)"
#: Namespace of the name-based UUIDs under the ``2.25`` root (a fixed, random UUID: pneumodet's own).
UUID_NAMESPACE = uuid.UUID("6f1f4a6e-3b1c-4d8e-9a57-2f0c8e5b7d21")
#: Digits of the hash a site root must leave room for (20 decimal digits: 66 bits).
MIN_UID_DIGITS = 20
MAX_UID_LENGTH = 64

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(text: str) -> bool:
    """A DICOM UID: dot-separated decimal numbers without leading zeros, at most 64 characters."""
    return isinstance(text, str) and len(text) <= MAX_UID_LENGTH and _UID.fullmatch(text) is not None


def check_uid(text: str, what: str) -> str:
    """``text`` if it is a DICOM UID, else :class:`ConfigError` naming ``what`` (checked before any request,
    so a UID never carries a path or a query into a URL)."""
    if not is_valid_uid(text):
        raise ConfigError(f"{what} {display_text(str(text))!r} is not a DICOM UID (dot-separated numbers "
                          f"without leading zeros, at most {MAX_UID_LENGTH} characters)")
    return text


def check_uid_root(root: str | None) -> str | None:
    """A site's UID root with its trailing dot, or ``None`` for the ``2.25`` default; :class:`ConfigError`
    when it is not a UID prefix or leaves fewer than :data:`MIN_UID_DIGITS` digits."""
    if root is None:
        return None
    stripped = root[:-1] if root.endswith(".") else root
    if not is_valid_uid(stripped):
        raise ConfigError(f"UID root {display_text(root)!r} is not a DICOM UID prefix (dot-separated numbers "
                          "without leading zeros, e.g. 1.2.826.0.1.3680043.10.999.)")
    if len(stripped) + 1 > MAX_UID_LENGTH - MIN_UID_DIGITS:
        raise ConfigError(f"UID root {display_text(root)!r} is {len(stripped) + 1} characters with its dot; "
                          f"at most {MAX_UID_LENGTH - MIN_UID_DIGITS} leave the {MIN_UID_DIGITS} digits a "
                          "unique UID needs")
    return stripped + "."


def derive_uid(description: Sequence[str], root: str | None = None) -> str:
    """The UID of the object ``description`` describes (see the module docstring); ``root`` from
    :func:`check_uid_root`."""
    text = "\x1f".join(description)  # a separator no part holds: ("a", "bc") and ("ab", "c") differ
    if root is None:
        return f"2.25.{uuid.uuid5(UUID_NAMESPACE, text).int}"
    digits = str(int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), "big"))
    return root + digits[: MAX_UID_LENGTH - len(root)]  # a prefix of a number: no leading zero


def checkpoint_sha256(path: Path | str) -> str:
    """The SHA-256 of a checkpoint file (:func:`pneumodet.safeio.file_sha256`)."""
    return file_sha256(path)


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The algorithm that made a result: name, version, checkpoint hash and the prediction settings.

    ``settings`` are ``(name, value)`` text pairs in a fixed order (threshold, tta, gate, precision).
    """

    checkpoint_sha256: str
    settings: tuple[tuple[str, str], ...] = ()
    name: str = ALGORITHM_NAME
    version: str = __version__
    uid_root: str | None = None

    @classmethod
    def for_prediction(cls, checkpoint_hash: str, *, threshold: float, tta: str | None, gate: bool,
                       precision: str, uid_root: str | None = None) -> AlgorithmIdentity:
        """The identity of a ``predict`` result made with the checkpoint whose SHA-256 is ``checkpoint_hash``
        (:func:`checkpoint_sha256`)."""
        settings = (("threshold", f"{threshold:.4f}"), ("tta", tta or "none"),
                    ("gate", "on" if gate else "off"), ("precision", precision))
        return cls(checkpoint_hash, settings, uid_root=check_uid_root(uid_root))

    @property
    def parameters(self) -> list[str]:
        """The TID 4019 Algorithm Parameters: the checkpoint hash, then each setting as ``name=value``."""
        return [f"model checkpoint SHA-256={self.checkpoint_sha256}"] + [f"{k}={v}" for k, v in self.settings]

    @property
    def settings_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.settings)

    def uid(self, kind: str, *parts: str) -> str:
        """The UID of the object of ``kind`` (``"sr"``, ``"sr-series"``, ...) described by ``parts``, made by
        this algorithm with these settings."""
        settings = [f"{k}={v}" for k, v in self.settings]
        return derive_uid((ALGORITHM_NAME, kind, self.version, self.checkpoint_sha256, *settings, *parts),
                          self.uid_root)

    @property
    def device_uid(self) -> str:
        """The SR's device observer UID: this model (checkpoint and version), whatever the settings."""
        return derive_uid((ALGORITHM_NAME, "device", self.version, self.checkpoint_sha256), self.uid_root)
