"""The image cache: built once, reused, resumed, repaired, and never stopped by one bad file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import pneumodet.data.cache  # its read_dicom is patched: the name the cache decodes with
from pneumodet.cli import main
from pneumodet.data.cache import (
    ARRAY_NAME,
    INDEX_NAME,
    LOCK_NAME,
    MIN_POOL_TASKS,
    ImageCache,
    build_cache,
    default_cache_dir,
)
from pneumodet.data.dicom import read_dicom
from pneumodet.data.preprocess import resize_area
from pneumodet.data.records import PatientRecord
from pneumodet.data.rsna import load_rsna
from pneumodet.errors import CacheError

SIZE = 64


@pytest.fixture(scope="module")
def synth_records(synth_dataset) -> list[PatientRecord]:
    """The synthetic patients that have an image (a handful is enough)."""
    records = [r for r in load_rsna(synth_dataset).records if r.image_path is not None]
    assert len(records) >= 6
    return records[:8]


@pytest.fixture
def own_records(synth_records, tmp_path) -> list[PatientRecord]:
    """The synthetic records pointing at copies of their DICOMs that a test may change."""
    folder = tmp_path / "images"
    folder.mkdir()
    copies = []
    for record in synth_records:
        path = folder / Path(record.image_path).name
        shutil.copy2(record.image_path, path)
        copies.append(replace(record, image_path=path))
    return copies


class CountingReads:
    """Wraps ``read_dicom`` (in-process builds only) to count decodes and interrupt after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.paths: list[str] = []
        self.stop_after = stop_after

    def __call__(self, path):
        if self.stop_after is not None and len(self.paths) == self.stop_after:
            raise KeyboardInterrupt
        self.paths.append(str(path))
        return read_dicom(path)


def expected_image(path: Path, size: int = SIZE) -> np.ndarray:
    return resize_area(read_dicom(path)[0], size)


def assert_cache_holds(cache_dir: Path, records: list[PatientRecord], size: int = SIZE) -> None:
    cache = ImageCache.open(cache_dir)
    assert cache.verify() == []
    for record in records:
        pixels = read_dicom(record.image_path)[0]
        np.testing.assert_array_equal(cache.image(record.patient_id), resize_area(pixels, size))
        assert cache.original_size(record.patient_id) == pixels.shape
        assert np.array_equal(cache.image(cache.index(record.patient_id)), cache.image(record.patient_id))


def test_build_once_then_reuse(synth_records, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    first = build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    assert (first.cached, first.reused, first.rebuilt, first.failed, first.missing) == (len(synth_records), 0,
                                                                                       0, [], 0)
    assert_cache_holds(out, synth_records)
    cache = ImageCache.open(out)
    assert len(cache) == len(synth_records) and cache.patient_ids == [r.patient_id for r in synth_records]
    assert cache.image(synth_records[0].patient_id).dtype == np.uint8
    view = cache.image(0)
    assert isinstance(view, np.memmap) and not view.flags.owndata and not view.flags.writeable

    reads = CountingReads()
    monkeypatch.setattr(pneumodet.data.cache, "read_dicom", reads)
    second = build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    assert reads.paths == [] and second.decoded == 0 and second.reused == len(synth_records)
    assert "reused 8" in second.summary()


def test_cache_pickles_as_its_index_not_its_pixels(synth_records, tmp_path):
    """Loader workers started by spawn get the cache by pickle; the array must stay on disk."""
    out = tmp_path / "cache"
    build_cache(synth_records, out, size=256, workers=1, progress=False)
    cache = ImageCache.open(out)
    payload = pickle.dumps(cache)
    assert len(payload) < 256 * 256  # less than one image: the pixels were not copied
    copy = pickle.loads(payload)
    assert isinstance(copy.image(0), np.memmap) and copy.patient_ids == cache.patient_ids
    for pid in cache.patient_ids:
        np.testing.assert_array_equal(copy.image(pid), cache.image(pid))


def test_parallel_build_equals_a_fresh_decode(real_sample, tmp_path, monkeypatch):
    """Two worker processes on the 16 real JPEG DICOMs write the same rows a fresh decode gives."""
    # Decoding in this process would fail: the rows must come from the worker processes.
    def refuse(path):
        raise RuntimeError("decoded in the main process")

    monkeypatch.setattr(pneumodet.data.cache, "read_dicom", refuse)
    files = sorted((real_sample / "stage_2_train_images").glob("*.dcm"))
    # Each file under two ids: enough images for the build to start its worker pool.
    records = [PatientRecord(f"{p.stem}-{copy}", "Normal", 0, (), p) for copy in (0, 1) for p in files]
    assert len(records) >= MIN_POOL_TASKS
    report = build_cache(records, tmp_path / "cache", size=128, workers=2, progress=False)
    assert report.cached == 32 and not report.failed, report.summary()
    assert_cache_holds(tmp_path / "cache", records, size=128)
    assert ImageCache.open(tmp_path / "cache").original_size(records[0].patient_id) == (1024, 1024)


def test_interrupted_build_resumes_where_it_stopped(synth_records, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setattr(pneumodet.data.cache, "read_dicom", CountingReads(stop_after=3))
    with pytest.raises(KeyboardInterrupt):
        build_cache(synth_records, out, size=SIZE, workers=1, progress=False, flush_every=1)
    index = json.loads((out / INDEX_NAME).read_text())
    assert [e["status"] for e in index["entries"]].count("ok") == 3

    reads = CountingReads()
    monkeypatch.setattr(pneumodet.data.cache, "read_dicom", reads)
    report = build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    assert report.reused == 3 and report.cached == len(synth_records) - 3
    assert reads.paths == [str(Path(r.image_path).absolute()) for r in synth_records[3:]]
    assert_cache_holds(out, synth_records)


def test_lost_index_entries_are_decoded_again(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    index = json.loads((out / INDEX_NAME).read_text())
    index["entries"] = index["entries"][:5]
    (out / INDEX_NAME).write_text(json.dumps(index))
    report = build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    assert (report.reused, report.cached) == (5, len(synth_records) - 5)
    assert_cache_holds(out, synth_records)


def test_new_patients_grow_the_cache_and_old_rows_stay(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records[:3], out, size=SIZE, workers=1, progress=False)
    before = np.array(ImageCache.open(out).image(synth_records[0].patient_id))
    report = build_cache(synth_records[2:], out, size=SIZE, workers=1, progress=False)
    assert (report.reused, report.cached) == (1, len(synth_records) - 3)
    cache = ImageCache.open(out)
    assert len(cache) == len(synth_records)  # patients of the first build are kept
    np.testing.assert_array_equal(cache.image(synth_records[0].patient_id), before)
    assert_cache_holds(out, synth_records)


def test_changed_source_file_is_decoded_again(own_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(own_records, out, size=SIZE, workers=1, progress=False)
    changed, donor = own_records[1], own_records[4]
    shutil.copyfile(donor.image_path, changed.image_path)  # new content, size and mtime
    touched = own_records[2]
    stat = os.stat(touched.image_path)
    os.utime(touched.image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer
    report = build_cache(own_records, out, size=SIZE, workers=1, progress=False)
    assert (report.rebuilt, report.reused, report.cached) == (2, len(own_records) - 2, 0)
    cache = ImageCache.open(out)
    np.testing.assert_array_equal(cache.image(changed.patient_id), expected_image(donor.image_path))
    assert_cache_holds(out, own_records)


def test_truncated_array_is_detected_and_damaged_rows_rebuilt(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    array = out / ARRAY_NAME
    os.truncate(array, array.stat().st_size - 2 * SIZE * SIZE - 10)  # last row gone, one more cut
    with pytest.raises(CacheError, match="truncated"):
        ImageCache.open(out)
    report = build_cache(synth_records, out, size=SIZE, workers=1, progress=False, verify=False)
    assert (report.rebuilt, report.reused) == (3, len(synth_records) - 3)
    assert any("truncated" in note for note in report.notes)
    assert_cache_holds(out, synth_records)


def test_lost_array_file_is_rebuilt_even_without_checksums(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    (out / ARRAY_NAME).unlink()
    with pytest.raises(CacheError, match="missing or not a uint8"):
        ImageCache.open(out)
    report = build_cache(synth_records, out, size=SIZE, workers=1, progress=False, verify=False)
    assert (report.rebuilt, report.reused) == (len(synth_records), 0)
    assert_cache_holds(out, synth_records)


def test_corrupted_row_fails_its_checksum_and_is_rebuilt(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    cache = ImageCache.open(out)
    victim = synth_records[2].patient_id
    row = cache.index(victim)
    data = np.load(out / ARRAY_NAME, mmap_mode="r+")
    data[row, 10, :5] ^= 0xFF
    data.flush()
    del data
    assert ImageCache.open(out).verify() == [victim]
    report = build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
    assert (report.rebuilt, report.reused) == (1, len(synth_records) - 1)
    assert report.notes == [f"1 rows failed their checksum and are rebuilt ({victim})"]
    assert_cache_holds(out, synth_records)


def test_garbage_file_is_listed_as_failed_and_others_are_fine(synth_records, tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 200 + b"this is no DICOM")
    bad = PatientRecord("garbage-patient", "Normal", 0, (), garbage)
    gone = PatientRecord("gone-patient", "Normal", 0, (), tmp_path / "gone.dcm")
    none = PatientRecord("no-image-patient", "Normal", 0, (), None)
    records = [*synth_records[:2], bad, gone, none, *synth_records[2:4]]
    out = tmp_path / "cache"
    report = build_cache(records, out, size=SIZE, workers=1, progress=False)
    assert report.cached == 4 and report.missing == 2
    assert [pid for pid, _ in report.failed] == ["garbage-patient"]
    assert "garbage-patient" in report.summary() and "failed 1" in report.summary()
    cache = ImageCache.open(out)
    assert "garbage-patient" not in cache and "garbage-patient" in cache.failed
    with pytest.raises(KeyError, match="garbage-patient.*failed"):
        cache.image("garbage-patient")
    failed_row = json.loads((out / INDEX_NAME).read_text())["entries"][2]
    assert (failed_row["patient_id"], failed_row["status"]) == ("garbage-patient", "failed")
    assert failed_row["cause"] == cache.failed["garbage-patient"] == report.failed[0][1] != ""
    with pytest.raises(KeyError, match="row 2 .* holds no image"):
        cache.image(failed_row["row"])
    with pytest.raises(KeyError, match="holds no image"):
        cache.image(len(records) + 5)
    assert_cache_holds(out, [*synth_records[:4]])

    # The failure is remembered: the unchanged file is not read again, and still reported.
    reads = CountingReads()
    monkeypatch.setattr(pneumodet.data.cache, "read_dicom", reads)
    again = build_cache(records, out, size=SIZE, workers=1, progress=False)
    assert reads.paths == [] and [pid for pid, _ in again.failed] == ["garbage-patient"]


def test_another_size_starts_over(synth_records, tmp_path):
    out = tmp_path / "cache"
    build_cache(synth_records[:3], out, size=SIZE, workers=1, progress=False)
    report = build_cache(synth_records[:3], out, size=32, workers=1, progress=False)
    assert report.cached == 3 and report.reused == 0 and any("64-pixel" in n for n in report.notes)
    assert_cache_holds(out, synth_records[:3], size=32)


def test_unusable_cache_folder_is_a_clear_error(synth_records, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(CacheError, match="a_file/cache: cannot create the cache folder"):
        build_cache(synth_records, blocker / "cache", size=SIZE, workers=1, progress=False)


def test_a_second_build_of_the_same_folder_is_refused(synth_records, tmp_path):
    import fcntl

    out = tmp_path / "cache"
    out.mkdir()
    with open(out / LOCK_NAME, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a build in another process would
        with pytest.raises(CacheError, match="another build is writing this cache"):
            build_cache(synth_records, out, size=SIZE, workers=1, progress=False)
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert build_cache(synth_records, out, size=SIZE, workers=1, progress=False).cached == len(synth_records)


def test_open_names_what_is_wrong(tmp_path):
    with pytest.raises(CacheError, match="no cache index"):
        ImageCache.open(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(CacheError, match="unreadable cache index"):
        ImageCache.open(tmp_path)
    assert default_cache_dir(tmp_path, 256) == tmp_path / "cache_256"


def test_cache_command(synth_dataset, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache", str(synth_dataset), "--size", "32", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"image cache {out} (32x32): cached" in printed
    n = len(ImageCache.open(out))
    assert n == sum(r.image_path is not None for r in load_rsna(synth_dataset).records)
    assert main(["cache", str(synth_dataset), "--size", "32", "--out", str(out), "--workers", "1"]) == 0
    assert f"cached 0, reused {n}," in capsys.readouterr().out
