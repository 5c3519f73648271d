"""Decode every DICOM once into a memory-mapped uint8 array: the image cache training reads.

A cache folder holds two files::

    images.npy   uint8 [N, size, size], one row per patient (``np.lib.format``, memory-mapped)
    index.json   one entry per row: patient id, status (ok / failed / pending), original height and
                 width, source path, source size and mtime, CRC32 of the row, failure cause

The index is the truth. A row is used only when its entry says ``ok`` and the source file still has
the recorded path, size and mtime. The index is replaced atomically (write to a temporary file, then
rename) every ``flush_every`` images or ``flush_seconds``, so an interrupted build resumes where it
stopped; a worker writes its row into the array before the main process marks it ``ok``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import io
import json
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pneumodet.data.dicom import read_dicom, subgroup_fields
from pneumodet.data.preprocess import resize_area
from pneumodet.data.records import PatientRecord
from pneumodet.errors import CacheError
from pneumodet.progress import Progress
from pneumodet.safeio import write_json

ARRAY_NAME = "images.npy"
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
#: Fewer images than this are decoded in-process: starting worker processes costs about as much.
MIN_POOL_TASKS = 32
_FORMAT = "pneumodet-image-cache"
_VERSION = 1
_OK, _FAILED, _PENDING = "ok", "failed", "pending"
_STALE = "stale"  # was ok, but its row was lost (truncated or replaced array file)


def default_cache_dir(data_dir: Path | str, size: int) -> Path:
    """Where the cache of ``data_dir`` at ``size`` pixels lives unless told otherwise."""
    return Path(data_dir) / f"cache_{size}"


@dataclass
class CacheEntry:
    """One row of the cache and what it was made from."""

    patient_id: str
    row: int
    status: str = _PENDING
    height: int = 0
    width: int = 0
    source: str = ""
    source_size: int = -1
    source_mtime_ns: int = -1
    crc32: int = 0
    cause: str = ""
    constant: bool = False  # the decoded image has one value everywhere (see read_dicom)
    # For per-subgroup results (dicom.subgroup_fields; None: missing, or an index written before they were kept)
    view_position: str | None = None
    sex: str | None = None
    age_years: int | None = None

    def same_source(self, source: str, stat: os.stat_result) -> bool:
        return (self.source, self.source_size, self.source_mtime_ns) == (source, stat.st_size, stat.st_mtime_ns)


@dataclass
class CacheReport:
    """What one :func:`build_cache` run did."""

    cache_dir: Path
    size: int
    cached: int = 0
    reused: int = 0
    rebuilt: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (patient id, cause)
    constant: list[str] = field(default_factory=list)  # patients whose cached image is constant (kept)
    missing: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def decoded(self) -> int:
        """Images decoded and stored by this run (cached + rebuilt; failures not included)."""
        return self.cached + self.rebuilt

    @property
    def images_per_s(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self, max_causes: int = 5) -> str:
        lines = [
            f"image cache {self.cache_dir} ({self.size}x{self.size}): cached {self.cached}, "
            f"reused {self.reused}, rebuilt {self.rebuilt}, failed {len(self.failed)}, "
            f"missing {self.missing}; {self.seconds:.1f} s, {self.images_per_s:.1f} images/s decoded"
        ]
        lines += [f"  failed {pid}: {cause}" for pid, cause in self.failed[:max_causes]]
        if len(self.failed) > max_causes:
            lines.append(f"  ... and {len(self.failed) - max_causes} more failures (see {INDEX_NAME})")
        if self.constant:  # kept (the file is readable) but nothing to learn from: said, never silent
            more = ", ..." if len(self.constant) > max_causes else ""
            lines.append(f"  constant images (one value everywhere; cached, worth a look): "
                         f"{len(self.constant)}: {', '.join(self.constant[:max_causes])}{more}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ index file
def _read_index(cache_dir: Path) -> tuple[int, list[CacheEntry]]:
    """``(size, entries)`` from ``index.json``; raises :class:`CacheError` when it is unusable."""
    path = cache_dir / INDEX_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: no cache index (build it with `pneumodet cache`)") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable cache index: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise CacheError(f"{path}: not a version-{_VERSION} pneumodet image cache index")
    try:
        entries = [CacheEntry(**item) for item in data["entries"]]
        size = int(data["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{path}: malformed cache index: {exc}") from exc
    for position, entry in enumerate(entries):
        if entry.row != position:
            raise CacheError(f"{path}: entry {position} ({entry.patient_id}) says row {entry.row}")
    return size, entries


def _write_index(cache_dir: Path, size: int, entries: Sequence[CacheEntry]) -> None:
    path = cache_dir / INDEX_NAME
    data = {"format": _FORMAT, "version": _VERSION, "size": size, "array": ARRAY_NAME,
            "entries": [asdict(entry) for entry in entries]}
    try:  # a unique temporary file: ranks of one job may share a cache
        write_json(path, data, indent=0)
    except OSError as exc:
        raise CacheError(f"{path}: cannot write the cache index: {exc}") from exc


# ------------------------------------------------------------------------------------------ array file
def _array_header(path: Path) -> tuple[int, tuple[int, ...]] | None:
    """``(data offset, shape)`` of a uint8 C-order ``.npy`` file, or None when it is not one."""
    try:
        with open(path, "rb") as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                return None
            offset = fp.tell()
    except (OSError, ValueError):
        return None
    if fortran or dtype != np.uint8 or len(shape) != 3:
        return None
    return offset, shape


def _resize_array(path: Path, rows: int, size: int) -> int:
    """Make ``path`` a uint8 ``[rows, size, size]`` .npy file, keeping existing rows; returns the data offset.

    Growing rewrites the header in place (numpy pads it so the first axis can grow without moving the
    data) and reserves the disk space, so a full disk is an error here, not a crash in a worker.
    A zero-row memmap is not allowed, so an empty cache keeps one unused row.
    """
    rows = max(rows, 1)
    header = _array_header(path) if path.exists() else None
    if header is None or header[1][1:] != (size, size):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, size, size))
        header = _array_header(path)
        assert header is not None, path
    offset, shape = header
    try:
        with open(path, "r+b") as fp:
            if shape[0] != rows:
                fresh = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    fresh, {"descr": "|u1", "fortran_order": False, "shape": (rows, size, size)})
                if len(fresh.getvalue()) != offset:
                    raise CacheError(f"{path}: cannot resize the array header in place; delete the folder")
                fp.write(fresh.getvalue())
            # A truncated file is zero-extended here; the rows that lost data are rebuilt.
            fp.truncate(offset + rows * size * size)
            if hasattr(os, "posix_fallocate"):
                _reserve(fp.fileno(), offset + rows * size * size, path)
    except OSError as exc:
        raise CacheError(f"{path}: cannot resize the image array: {exc}") from exc
    return offset


def _reserve(fd: int, length: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(f"{path}: not enough disk space for {length / 2**30:.2f} GiB of images") from exc
        # Other file systems may not support reservation; the rows are then allocated as written.


def _row_crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


# ------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class _Task:
    row: int
    source: str
    array_path: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Result:
    row: int
    height: int = 0
    width: int = 0
    crc32: int = 0
    cause: str = ""
    constant: bool = False
    fields: tuple[tuple[str, object], ...] = ()  # dicom.subgroup_fields, as items


def _decode_row(task: _Task) -> _Result:
    """Decode one DICOM, resize it and write it into its row of the array (runs in a worker)."""

    try:
        pixels, meta = read_dicom(task.source)
        if pixels.ndim != 2 or pixels.dtype != np.uint8:
            raise ValueError(f"expected a 2-D uint8 image, got {pixels.dtype} {pixels.shape}")
        resized = resize_area(pixels, task.size)
    except Exception as exc:  # one bad image must never stop a build: the cause goes to the index
        return _Result(task.row, cause=f"{type(exc).__name__}: {exc}")
    view = np.memmap(task.array_path, dtype=np.uint8, mode="r+", shape=(task.size, task.size),
                     offset=task.offset + task.row * task.size * task.size)
    # No msync: once written, the page survives a crash of this process; the CRC in the index
    # catches what a crash of the machine could lose.
    view[:] = resized
    del view
    return _Result(task.row, pixels.shape[0], pixels.shape[1], _row_crc(resized),
                   constant=bool(meta.get("constant_image")), fields=tuple(subgroup_fields(meta).items()))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_tasks(tasks: Sequence[_Task], workers: int) -> Iterator[_Result]:
    if workers <= 1 or len(tasks) < MIN_POOL_TASKS:
        yield from map(_decode_row, tasks)
        return
    # forkserver: workers do not inherit the parent's threads (torch, tqdm) or its open memmaps.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    try:
        futures = [pool.submit(_decode_row, task) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    except concurrent.futures.process.BrokenProcessPool as exc:
        raise CacheError("a decoding worker died (a crash inside the image decoder?); the finished rows "
                         "are kept: run again to resume, with --workers 1 to find the file") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ build
def build_cache(
    records: Sequence[PatientRecord],
    out_dir: Path | str,
    *,
    size: int = 512,
    workers: int | None = None,
    progress: bool | str = True,
    verify: bool = True,
    flush_every: int = 1024,
    flush_seconds: float = 10.0,
) -> CacheReport:
    """Decode each record's DICOM once into ``out_dir`` at ``size`` x ``size`` pixels.

    Idempotent and resumable: rows whose source file is unchanged are reused (their CRC32 checked
    when ``verify``), unfinished or damaged rows and changed sources are decoded again, and patients
    already cached but absent from ``records`` are kept. Unreadable images are recorded as failed
    with their cause (and not retried while the file is unchanged); records without an image file
    are counted as missing. ``workers`` decoding processes (default: all cores) write straight into
    the memory-mapped rows. The index is saved every ``flush_every`` images or ``flush_seconds``
    seconds, and when the build ends or is interrupted. ``progress``: ``True`` is a bar on a terminal and a
    plain line every 30 s otherwise (see :func:`pneumodet.progress.progress_style`).
    """
    if size < 1:
        raise CacheError(f"cache size must be positive, got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"{out_dir}: cannot create the cache folder ({exc}); choose another folder") from exc
    with _exclusive(out_dir):
        return _build(records, out_dir, size, workers, progress, verify, flush_every, flush_seconds, start)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the cache folder's lock file: two builds writing the same rows would corrupt each other."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        yield
        return
    path = out_dir / LOCK_NAME
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{out_dir}: another build is writing this cache ({path} is locked); "
                             "wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _build(records: Sequence[PatientRecord], out_dir: Path, size: int, workers: int | None, progress: bool | str,
           verify: bool, flush_every: int, flush_seconds: float, start: float) -> CacheReport:
    report = CacheReport(out_dir, size)
    array_path = out_dir / ARRAY_NAME
    entries = _entries_to_keep(out_dir, size, array_path, report)
    _resize_array(array_path, len(entries), size)  # a truncated file is zero-extended, then checked
    jobs = _plan(records, entries, array_path, verify, report)
    offset = _resize_array(array_path, len(entries), size)
    _write_index(out_dir, size, entries)

    tasks = [_Task(entry.row, entry.source, str(array_path), offset, size) for entry, _ in jobs]
    was_good = {entry.row for entry, rebuild in jobs if rebuild}
    flushed = time.monotonic()
    try:
        with Progress(len(tasks), "cache", progress=progress) as bar:
            for done, result in enumerate(_run_tasks(tasks, workers or _usable_cores()), start=1):
                _record(entries[result.row], result, result.row in was_good, report)
                bar.update()
                if done % flush_every == 0 or time.monotonic() - flushed >= flush_seconds:
                    _write_index(out_dir, size, entries)
                    flushed = time.monotonic()
    finally:
        _write_index(out_dir, size, entries)
        report.seconds = time.perf_counter() - start
    return report


def _record(entry: CacheEntry, result: _Result, was_good: bool, report: CacheReport) -> None:
    if result.cause:
        entry.status, entry.cause = _FAILED, result.cause
        report.failed.append((entry.patient_id, result.cause))
        return
    entry.status, entry.cause = _OK, ""
    entry.height, entry.width, entry.crc32 = result.height, result.width, result.crc32
    entry.constant = result.constant
    for key, value in result.fields:
        setattr(entry, key, value)
    if result.constant:
        report.constant.append(entry.patient_id)
    if was_good:
        report.rebuilt += 1
    else:
        report.cached += 1


def _entries_to_keep(out_dir: Path, size: int, array_path: Path, report: CacheReport) -> list[CacheEntry]:
    """The existing index entries, with rows whose data is gone marked stale; ``[]`` to start over."""
    if not (out_dir / INDEX_NAME).exists():
        return []
    try:
        old_size, entries = _read_index(out_dir)
    except CacheError as exc:
        report.notes.append(f"{exc}; starting over")
        return []
    if old_size != size:
        report.notes.append(f"the cache held {old_size}-pixel images; rebuilt at {size}")
        return []
    header = _array_header(array_path) if array_path.exists() else None
    if header is None or header[1][1:] != (size, size):
        lost = entries
        report.notes.append(f"{array_path}: missing or not a {size}x{size} uint8 array; rebuilt")
    else:
        have = array_path.stat().st_size
        lost = [e for e in entries if e.status == _OK and header[0] + (e.row + 1) * size * size > have]
        if lost:
            report.notes.append(f"{array_path}: truncated ({have} bytes); {len(lost)} rows lost, rebuilt")
    for entry in lost:
        if entry.status == _OK:
            entry.status = _STALE
    return entries


def _plan(
    records: Sequence[PatientRecord],
    entries: list[CacheEntry],
    array_path: Path,
    verify: bool,
    report: CacheReport,
) -> list[tuple[CacheEntry, bool]]:
    """Decide for each record: reuse its row, decode into its row, decode into a new row, or skip.

    Appends new entries to ``entries`` and marks every entry to decode pending with its source
    stamp; returns those entries, each with whether its row held a good image before (a rebuild).
    """
    by_id = {entry.patient_id: entry for entry in entries}
    array = np.load(array_path, mmap_mode="r")
    jobs: list[tuple[CacheEntry, bool]] = []
    bad_crc: list[str] = []
    seen: dict[str, str | None] = {}
    for record in records:
        path = None if record.image_path is None else str(record.image_path)
        if record.patient_id in seen:
            if seen[record.patient_id] != path:
                report.notes.append(f"{record.patient_id} listed again with another image ({path}); "
                                    f"the first ({seen[record.patient_id]}) is cached")
            continue
        seen[record.patient_id] = path
        source = str(Path(record.image_path).absolute()) if record.image_path is not None else ""
        try:
            stat = os.stat(source) if source else None
        except OSError:
            stat = None
        if stat is None:
            report.missing += 1
            continue
        entry = by_id.get(record.patient_id)
        rebuild = entry is not None and entry.status in (_OK, _STALE)
        if entry is None:
            entry = by_id[record.patient_id] = CacheEntry(record.patient_id, len(entries))
            entries.append(entry)
        elif entry.same_source(source, stat) and entry.status == _FAILED:
            report.failed.append((entry.patient_id, f"{entry.cause} (unchanged since an earlier build)"))
            continue
        elif entry.same_source(source, stat) and entry.status == _OK:
            if not verify or _row_crc(array[entry.row]) == entry.crc32:
                report.reused += 1
                if entry.constant:
                    report.constant.append(entry.patient_id)
                continue
            bad_crc.append(entry.patient_id)
        entry.status, entry.cause, entry.source = _PENDING, "", source
        entry.source_size, entry.source_mtime_ns = stat.st_size, stat.st_mtime_ns
        jobs.append((entry, rebuild))
    del array
    if bad_crc:
        report.notes.append(f"{len(bad_crc)} rows failed their checksum and are rebuilt "
                            f"({', '.join(bad_crc[:3])}{', ...' if len(bad_crc) > 3 else ''})")
    return jobs


# ------------------------------------------------------------------------------------------ reading
class ImageCache:
    """Read-only view of a built cache: patient id -> memory-mapped uint8 ``[size, size]`` image.

    Only rows whose status is ``ok`` are visible; ``failed`` maps the others to their cause.
    """

    def __init__(self, cache_dir: Path, size: int, entries: Sequence[CacheEntry], array: np.ndarray) -> None:
        self.cache_dir = cache_dir
        self.size = size
        self._array = array
        self._ok = {e.patient_id: e for e in entries if e.status == _OK}
        self._ok_rows = {e.row for e in self._ok.values()}
        self.failed: dict[str, str] = {e.patient_id: e.cause for e in entries if e.status == _FAILED}
        #: patients whose (usable) image is constant: one value everywhere, nothing to learn from
        self.constant: set[str] = {e.patient_id for e in self._ok.values() if e.constant}

    @classmethod
    def open(cls, cache_dir: Path | str) -> ImageCache:
        """Open a cache folder; raises :class:`CacheError` when it is missing, foreign or truncated."""
        cache_dir = Path(cache_dir)
        size, entries = _read_index(cache_dir)
        array_path = cache_dir / ARRAY_NAME
        header = _array_header(array_path) if array_path.exists() else None
        if header is None or header[1][1:] != (size, size) or header[1][0] < len(entries):
            raise CacheError(f"{array_path}: missing or not a uint8 [>={len(entries)}, {size}, {size}] "
                             "array; rebuild with `pneumodet cache`")
        offset, shape = header
        expected = offset + shape[0] * size * size
        if array_path.stat().st_size < expected:
            raise CacheError(f"{array_path}: truncated ({array_path.stat().st_size} bytes, expected "
                             f"{expected}); rebuild with `pneumodet cache`")
        return cls(cache_dir, size, entries, np.load(array_path, mmap_mode="r"))

    def __getstate__(self) -> dict:
        # Loader workers started by spawn receive the cache by pickle: send the index, not the pixels.
        state = self.__dict__.copy()
        del state["_array"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._array = np.load(self.cache_dir / ARRAY_NAME, mmap_mode="r")

    def __len__(self) -> int:
        return len(self._ok)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self._ok

    @property
    def patient_ids(self) -> list[str]:
        """Patients with a usable image, in row order."""
        return [e.patient_id for e in sorted(self._ok.values(), key=lambda e: e.row)]

    def _entry(self, patient_id: str) -> CacheEntry:
        try:
            return self._ok[patient_id]
        except KeyError:
            why = f"failed: {self.failed[patient_id]}" if patient_id in self.failed else "not cached"
            raise KeyError(f"{patient_id} has no image in the cache {self.cache_dir} ({why})") from None

    def index(self, patient_id: str) -> int:
        """The array row of ``patient_id``."""
        return self._entry(patient_id).row

    def image(self, key: str | int) -> np.ndarray:
        """uint8 ``[size, size]`` image of a patient id or array row: a read-only memory-mapped view."""
        row = self.index(key) if isinstance(key, str) else int(key)
        if row not in self._ok_rows:
            raise KeyError(f"row {key} of the cache {self.cache_dir} holds no image (failed, unfinished or "
                           "out of range)")
        return self._array[row]

    def original_size(self, patient_id: str) -> tuple[int, int]:
        """``(height, width)`` of the original DICOM."""
        entry = self._entry(patient_id)
        return entry.height, entry.width

    def subgroup_fields(self, patient_id: str) -> dict[str, object]:
        """``view_position``, ``sex`` and ``age_years`` of a patient's image, as
        :func:`pneumodet.data.dicom.subgroup_fields` gives them (all ``None`` for an image cached before
        pneumodet kept them: rebuild the cache to have them)."""
        entry = self._entry(patient_id)
        return {"view_position": entry.view_position, "sex": entry.sex, "age_years": entry.age_years}

    def verify(self) -> list[str]:
        """Patients whose row no longer matches its checksum (reads the whole array)."""
        return [e.patient_id for e in self._ok.values() if _row_crc(self._array[e.row]) != e.crc32]
