"""Safe writes and safe reads of small structured files: the one owner of both.

Every file pneumodet writes goes through :func:`atomic_path` (or a helper built on it): the bytes go to a
temporary file beside the destination, are flushed and ``fsync``-ed, and only then renamed over the
destination. A full disk, a kill or an exception therefore leaves the previous file byte-identical and no
half file where a reader looks; the temporary file is removed on failure.

JSON written here is strict: NaN and infinities become ``null`` (``json.dumps`` would write bare ``NaN``,
which is not JSON). YAML is read with :func:`load_yaml`: safe types only, no anchors or aliases (a
"billion laughs" file is refused, not expanded), bounded in size and decoded as UTF-8 with a one-line
error otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import yaml

from pneumodet.errors import ConfigError

#: Largest YAML file read (a run config is ~1 KB).
MAX_YAML_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends cleanly.

    For libraries that write to a file name themselves (safetensors, ONNX, matplotlib). The file is
    fsync-ed before the rename. On any exception the temporary file is removed and ``path`` is untouched;
    an ``OSError`` about the temporary file (or about no file, as a full disk's) is re-raised naming
    ``path``; one naming another file (an inner ``atomic_path``'s destination) keeps its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is not None and os.fsdecode(err.filename) not in (str(tmp), str(path)):
            tmp.unlink(missing_ok=True)
            raise  # an inner write's error, already naming its own file
        full = _disk_full_error(tmp, path, err)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except Exception as err:  # a library's own error for a short write (torch: "unexpected pos ...")
        full = _disk_full_error(tmp, path, err)
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: Free space under which a failed write is taken for a full disk (libraries that report a short write in
#: their own words do not pass on ENOSPC).
_FULL_DISK_BYTES = 16 << 20


def _disk_full_error(tmp: Path, path: Path, err: BaseException) -> OSError | None:
    """An ``ENOSPC`` error naming ``path``, its folder and how much of it was written, when the disk that was
    written to is (nearly) full; ``None`` when the failure has another cause."""
    try:
        free = shutil.disk_usage(path.parent).free
        written = tmp.stat().st_size if tmp.exists() else 0
    except OSError:
        return None
    if getattr(err, "errno", None) != errno.ENOSPC and free >= _FULL_DISK_BYTES:
        return None
    where = path.parent.resolve()
    return OSError(errno.ENOSPC, f"No space left on device: {where} filled after {written / 2**20:.1f} MB of "
                   "this file", str(path))


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that only replaces ``path`` once the block has finished without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: NaN/inf floats become ``None``, numpy/torch scalars and arrays plain
    numbers and lists, paths strings. Anything else is a :class:`TypeError` (a writer bug, never silently
    written as its ``str()``)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars (-> a number) and arrays (-> lists)
        return json_safe(value.tolist())
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def dumps_json(payload: Any, indent: int | None = 2) -> str:
    """Strict JSON text (no bare NaN/Infinity) of ``payload``."""
    return json.dumps(json_safe(payload), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    """Write ``payload`` as strict JSON, atomically."""
    return write_text(path, dumps_json(payload, indent) + "\n")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in blocks: the identity of a checkpoint or a graph."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a config has no use for them, and expanding nested
    aliases is how a 1 KB file costs gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in pneumodet files", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> Any:
    """The safe-typed content of a small YAML file, or :class:`ConfigError` naming the file and the cause.

    Refused: files over :data:`MAX_YAML_BYTES`, bytes that are not UTF-8, anchors/aliases, tags that
    construct objects (``!!python/...``), syntax errors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: too large for a config file (over {MAX_YAML_BYTES // 1024} KB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - SafeLoader subclass
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a value PyYAML cannot build (2024-13-45, 5000 digits)
        reason = " ".join(str(err).split())
        raise ConfigError(f"{path}: not a valid config file: {reason[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None


def _new_temp_file(path: Path) -> Path:
    """An empty new file ``.<name>.<random>.tmp`` beside ``path``, with the permissions a plain ``open``
    would give (0666 less the umask): ``mkstemp``'s 0600 would make every report, submission and JSON
    file unreadable to the user's group once renamed into place."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name[:80]}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:  # read-only or full folder: name the destination, not the temporary file
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
