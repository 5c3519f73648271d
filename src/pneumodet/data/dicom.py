"""Read one DICOM file into a greyscale uint8 image and a small, non-identifying metadata dict.

Decoding goes through pydicom 3 and its plugins (Pillow, pylibjpeg with libjpeg/openjpeg/rle), so JPEG
Baseline/Extended/Lossless, JPEG 2000, RLE, deflate and uncompressed files all decode. Baseline and extended
JPEG (the RSNA format is baseline) go to Pillow first: it decodes them several times faster than
pylibjpeg, pydicom's default pick (``benchmarks/bench_dicom.py``); what Pillow cannot decode (12-bit
JPEG, for one) falls back to the other plugins.

Every failure (not DICOM, no pixel data, truncated, unsupported transfer syntax, missing decoder)
becomes one :class:`~pneumodet.errors.DicomReadError` naming the file and the cause.

Untrusted files cannot make a read allocate more than they hold or more than one image needs: reads
never ask for more bytes than the file has, a deflated data set may inflate to at most
:data:`MAX_INFLATED_BYTES`, and the size a file declares (its header and the frame header inside a
JPEG or JPEG 2000 stream) is checked against :data:`MAX_PIXELS` before any decoder runs, since
decoders allocate what the file declares. Only the first frame is ever decoded.

Nothing identifying leaves this module: :func:`extract_metadata` and :func:`dicom_header_text` are
allow-lists.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    UncompressedTransferSyntaxes,
)

from pneumodet.errors import DicomReadError
from pneumodet.textsafe import display_path

__all__ = ["MAX_INFLATED_BYTES", "MAX_PIXELS", "HEADER_ELEMENTS", "read_dicom", "dicom_header_text",
           "extract_metadata", "parse_age"]

#: The most pixels (Rows x Columns) the first frame of a file may declare. A chest radiograph has at most
#: about 4300 x 4300 (18.5 M); decoders allocate whatever a file declares, and a 1 KB file can declare
#: 65535 x 65535 (4.3 G pixels, gigabytes before the decoder notices the data is missing). Checked
#: before any decoder runs, against the header and against the JPEG / JPEG 2000 frame header.
MAX_PIXELS = 50_000_000
#: The most bytes a deflated data set (Deflated Explicit VR Little Endian) may inflate to: room for a
#: MAX_PIXELS frame of three 16-bit samples and its header. zlib turns 1 MB into 1 GB.
MAX_INFLATED_BYTES = 8 * MAX_PIXELS

#: Transfer syntaxes for which Pillow is tried before the other plugins (it is the fastest for them).
_PILLOW_FIRST = {JPEGBaseline8Bit, JPEGExtended12Bit}
#: Percentiles of the robust min-max used when a > 8-bit image carries no window.
_ROBUST_PERCENTILES = (0.5, 99.5)
#: ITU-R BT.601 luma weights: RGB -> grey as a radiograph viewer would show it.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)


def read_dicom(path: str | Path, *, metadata_only: bool = False) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Read a DICOM file.

    Args:
        path: the ``.dcm`` file.
        metadata_only: read the header only (fast; the pixel data is neither read nor checked) and
            return ``None`` for the image.

    Returns:
        ``(image, metadata)``: ``image`` is a ``uint8`` array of shape ``[H, W]`` where bright means
        dense (MONOCHROME1 is inverted; > 8-bit data goes through the VOI LUT, else the window, else a
        robust min-max, whichever first gives a usable image; colour becomes grey; only the first frame
        of a multi-frame file is decoded). ``metadata`` is an allow-list, never a copy of the header: the
        keys ``patient_id, age, sex, view_position, modality, body_part, pixel_spacing, rows, columns,
        photometric_interpretation, transfer_syntax, sop_instance_uid, study_instance_uid,
        series_instance_uid`` (a missing or malformed tag gives ``None``), plus what decoding found:
        ``constant_image`` (every pixel of ``image`` has one value; ``None`` with ``metadata_only``)
        and ``image_notes`` (one sentence per thing worked around or worth a look: first frame of many,
        an unusable VOI LUT or window and what was used instead, a constant image; each is also issued
        as a ``UserWarning`` naming the file).

    Raises:
        DicomReadError: the file cannot be read or decoded, or declares more than :data:`MAX_PIXELS`
            pixels (checked before any decoder runs); the message names the file and the cause.
    """
    path = Path(path)
    try:
        ds = _read_dataset(path, stop_before_pixels=metadata_only)
        metadata = extract_metadata(ds)
    except DicomReadError:
        raise
    except Exception as exc:  # pydicom raises many types on odd headers; the boundary is here
        raise DicomReadError(path, f"unreadable DICOM header ({_describe(exc)})") from exc
    metadata.update(constant_image=None, image_notes=[])
    if metadata_only:
        return None, metadata
    notes: list[str] = metadata["image_notes"]
    try:
        image = _decode_grey_uint8(ds, path, notes)
    except DicomReadError:
        raise
    except Exception as exc:  # pydicom, numpy and the plugins raise many types; the boundary is here.
        raise DicomReadError(path, f"cannot decode the pixel data ({_ts_name(ds)}): {_describe(exc)}") from exc
    low, high = int(image.min()), int(image.max())
    metadata["constant_image"] = low == high
    if low == high:
        notes.append(f"the decoded image is constant (every pixel {low}): there is nothing to see in it")
    for note in notes:
        warnings.warn(f"{display_path(path)}: {note}", stacklevel=2)  # printed: must encode
    return image, metadata


#: The only header elements :func:`dicom_header_text` shows: the patient ID (pneumodet's key) and technical
#: elements that say what the image is and how its pixels are stored and meant to be displayed. No
#: free text, no dates, no instance UIDs, no sequences, no private elements: whatever a file carries
#: beyond this list (names, addresses, phones, dates, institutions, record numbers in private tags) is
#: withheld, since an allow-list cannot miss an element no one thought of.
HEADER_ELEMENTS = frozenset({
    "TransferSyntaxUID", "MediaStorageSOPClassUID", "SpecificCharacterSet", "SOPClassUID", "PatientID",
    "Modality", "ConversionType", "BodyPartExamined", "ViewPosition", "PatientOrientation",
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows",
    "Columns", "PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope",
    "RescaleType", "VOILUTFunction", "PresentationLUTShape", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod", "BurnedInAnnotation",
})


def dicom_header_text(path: str | Path) -> str:
    """The header's :data:`HEADER_ELEMENTS` (file meta and data set) as pydicom prints them, then how
    many elements were withheld: reports show this text, and the images may come from anywhere.

    Raises:
        DicomReadError: the file is not a readable DICOM file.
    """
    path = Path(path)
    ds = _read_dataset(path, stop_before_pixels=True)
    shown, withheld = Dataset(), 0
    for source in (getattr(ds, "file_meta", Dataset()), ds):
        # By tag, not by element: a withheld element's value is never even converted.
        for tag in list(source.keys()):
            if keyword_for_tag(tag) in HEADER_ELEMENTS and not tag.is_private:
                try:
                    shown.add(source[tag])
                except Exception:  # a malformed value is withheld like the rest, not a failure
                    withheld += 1
            else:
                withheld += 1
    return (str(shown) + f"\n({withheld} other element(s) withheld: only technical elements and the patient "
            "ID are shown; names, dates, free text, instance UIDs, sequences and private elements never are)")


def extract_metadata(ds: Dataset) -> dict[str, Any]:
    """The header fields pneumodet uses, by name (an allow-list: never names, dates, institutions,
    free text or private elements)."""
    spacing = _tag(ds, "PixelSpacing")
    try:
        pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    except (TypeError, ValueError):
        pixel_spacing = None
    ts = _tag(getattr(ds, "file_meta", None), "TransferSyntaxUID")
    return {
        "patient_id": _text(_tag(ds, "PatientID")),
        "age": parse_age(_tag(ds, "PatientAge")),
        "sex": _text(_tag(ds, "PatientSex")),
        "view_position": _text(_tag(ds, "ViewPosition")),
        "modality": _text(_tag(ds, "Modality")),
        "body_part": _text(_tag(ds, "BodyPartExamined")),
        "pixel_spacing": pixel_spacing,
        "rows": _int(_tag(ds, "Rows")),
        "columns": _int(_tag(ds, "Columns")),
        "photometric_interpretation": _text(_tag(ds, "PhotometricInterpretation")),
        "transfer_syntax": ts.name if ts else None,
        # the UIDs tell one image from another of the same patient (predict keys its results by them)
        "sop_instance_uid": _text(_tag(ds, "SOPInstanceUID")),
        "study_instance_uid": _text(_tag(ds, "StudyInstanceUID")),
        "series_instance_uid": _text(_tag(ds, "SeriesInstanceUID")),
    }


def parse_age(value: object) -> float | None:
    """A DICOM age string in years: ``'51'`` (as RSNA writes it) -> 51.0, ``'058Y'`` -> 58.0,
    ``'3M'`` -> 0.25, ``'14D'`` -> 0.038; anything else -> ``None``."""
    if value is None:
        return None
    match = _AGE_RE.match(str(value))
    if match is None:
        return None
    return float(match.group(1)) * _AGE_UNIT_YEARS[(match.group(2) or "Y").upper()]


#: The oldest plausible age in years; an age beyond it (RSNA has '148', '155') is a typo, taken as unknown.
MAX_PLAUSIBLE_AGE = 120
#: View positions kept as themselves; any other value is kept as 'other'.
_VIEWS = frozenset({"AP", "PA"})
#: DICOM's PatientSex values (CS: M, F, O); anything else is unknown.
_SEXES = frozenset({"M", "F", "O"})


def subgroup_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    """The header fields per-subgroup results need, reduced to what groups need (an allow-list of values,
    never free text): ``view_position`` 'AP', 'PA', 'other' or ``None``; ``sex`` 'M', 'F', 'O' or ``None``;
    ``age_years`` whole years (0 .. :data:`MAX_PLAUSIBLE_AGE`) or ``None`` (missing, unparsable or
    implausible). ``metadata`` is :func:`read_dicom`'s."""
    view = (metadata.get("view_position") or "").strip().upper()
    sex = (metadata.get("sex") or "").strip().upper()
    age = metadata.get("age")
    return {
        "view_position": view if view in _VIEWS else ("other" if view else None),
        "sex": sex if sex in _SEXES else None,
        "age_years": int(age) if isinstance(age, float) and 0 <= age <= MAX_PLAUSIBLE_AGE else None,
    }


# ---------------------------------------------------------------------------------------------- reading
def _read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    if not path.exists():
        raise DicomReadError(path, "file not found")
    if path.is_dir():
        raise DicomReadError(path, "is a folder, not a DICOM file")
    if path.stat().st_size == 0:
        raise DicomReadError(path, "empty file (0 bytes)")
    try:
        return _dcmread(path, force=False, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no 'DICM' preamble: may still be a bare dataset, checked below
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(path, f"unreadable DICOM ({_describe(exc)})") from exc
    # Old files without the 128-byte preamble are legal; anything else read this way is noise, so
    # only accept it when it carries the tags every real image object has.
    try:
        ds = _dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        looks_real = "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:
        looks_real = False
    if not looks_real:
        raise DicomReadError(path, "not a DICOM file (no 'DICM' marker and no image header)")
    _infer_transfer_syntax(ds)
    return ds


def _dcmread(path: Path, *, force: bool, stop_before_pixels: bool) -> Dataset:
    """``pydicom.dcmread`` with its warnings kept out of the caller's way and truncation made an error;
    reads are bounded by the file's size and a deflated data set by :data:`MAX_INFLATED_BYTES`."""
    with warnings.catch_warnings(record=True) as caught, _BoundedReader(path) as fp:
        warnings.simplefilter("always")
        _refuse_deflate_bomb(path, fp)
        ds = pydicom.dcmread(fp, force=force, stop_before_pixels=stop_before_pixels)
    _raise_if_truncated(path, caught)
    if fp.cut_short is not None:  # pydicom keeps a value the file ended inside without a word
        asked, held = fp.cut_short
        raise DicomReadError(path, f"truncated file (an element declares {asked:,} bytes; the file holds "
                                   f"{held:,} more)")
    return ds


#: Reads up to this size are passed through as asked; larger ones are cut to what the file still holds.
_SMALL_READ = 1 << 16


class _BoundedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than the file still holds.

    pydicom reads an element's value with one ``read(declared length)``, and CPython allocates the
    requested length before reading: a 1 MB file declaring a 4 GB element would take 4 GB.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(str(path), "rb"))  # pydicom joins .name with strings
        self._size = os.fstat(self.fileno()).st_size
        #: ``(asked, held)`` of the first large read that asked for more than the file still held
        self.cut_short: tuple[int, int] | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        if size is not None and size > _SMALL_READ:
            held = max(0, self._size - self.tell())
            if size > held:
                self.cut_short = self.cut_short or (size, held)
                size = held
        return super().read(size)


#: Output asked of zlib per step while measuring a deflated data set (bounds the memory the check uses).
_INFLATE_STEP = 1 << 20


def _refuse_deflate_bomb(path: Path, fp: io.BufferedReader) -> None:
    """Raise when ``fp`` is a deflated data set that inflates past :data:`MAX_INFLATED_BYTES`; leave
    ``fp`` at its start. pydicom inflates the whole data set in one call, even for a header-only read."""
    try:  # the same two steps pydicom's own readers begin with
        pydicom.filereader.read_preamble(fp, True)
        meta = pydicom.filereader._read_file_meta_info(fp)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # not for this check to judge: dcmread will say what is wrong
        deflated = False
    if deflated:
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while total <= MAX_INFLATED_BYTES and not inflater.eof:
            pending = inflater.unconsumed_tail or fp.read(_SMALL_READ)
            if not pending:
                break
            try:
                total += len(inflater.decompress(pending, _INFLATE_STEP))
            except zlib.error:
                break  # corrupt: dcmread reports it
        if total > MAX_INFLATED_BYTES:
            raise DicomReadError(path, f"the deflated data set inflates to more than {MAX_INFLATED_BYTES:,} "
                                       "bytes (a decompression bomb?); refused before reading it")
    fp.seek(0)


def _raise_if_truncated(path: Path, caught: list[warnings.WarningMessage]) -> None:
    """pydicom only warns when a file ends inside an element (and then drops it): make that an error."""
    for w in caught:
        if "end of file" in str(w.message).lower():
            raise DicomReadError(path, f"truncated file ({' '.join(str(w.message).split())})")


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta are native (uncompressed): the syntax follows from how they were read."""
    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = uid


def _decode_grey_uint8(ds: Dataset, path: Path, notes: list[str]) -> np.ndarray:
    """Decoded first frame as ``uint8 [H, W]``, display-ready (bright = dense); what was worked around
    goes to ``notes``."""
    if "PixelData" not in ds:
        if len(ds) == 0:
            raise DicomReadError(path, "truncated file (nothing after the file meta header)")
        kind = _tag(ds, "SOPClassUID")
        raise DicomReadError(path, f"no pixel data (not an image: {getattr(kind, 'name', kind) or 'unknown object'})")
    rows, columns = _check_declared_size(ds, path)
    frames = _int(_tag(ds, "NumberOfFrames")) or 1
    if frames > 1:
        notes.append(f"{frames} frames, only the first is used")
    photometric = (_text(_tag(ds, "PhotometricInterpretation")) or "MONOCHROME2").upper()

    arr = _decode_pixels(ds, path)
    if arr.shape[:2] != (rows, columns) or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise DicomReadError(path, f"the decoded first frame has shape {arr.shape}, not the {rows} x "
                                   f"{columns} the header declares")
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit LUT entries are display values on 0..65535
            arr = np.rint(arr / 257.0).astype(np.uint8)
    colour = arr.ndim == 3
    if colour:  # RGB (pydicom has already converted YBR to RGB; the palette gave RGB)
        arr = _to_grey(arr)
    # 8-bit colour and 8-bit greyscale are display values already; anything else is windowed
    display_ready = arr.dtype == np.uint8 and (colour or (_int(_tag(ds, "BitsStored")) or 8) == 8)
    image = arr if display_ready else _window_to_uint8(arr, ds, photometric, notes)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image)


def _decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Raw decoded pixels of the first frame (``[H, W]`` or ``[H, W, 3]``); never any other frame."""
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    if ts in _PILLOW_FIRST:
        from PIL import Image

        try:
            with warnings.catch_warnings():  # Pillow only warns below twice its limit: a refusal too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return pixel_array(ds, index=0, decoding_plugin="pillow")
        except Exception as exc:  # Pillow cannot do every JPEG variant; the other plugins get their turn...
            if "decompression bomb" in str(exc).lower():  # ...unless it refused the size: no decoder may try
                verdict = f"refused by the JPEG decoder as a decompression bomb ({_describe(exc)})"
                raise DicomReadError(path, verdict) from exc
    return pixel_array(ds, index=0)


# ---------------------------------------------------------------------------------------------- sizes
#: Bits per stored sample a file may declare (pydicom also knows 64, which no radiograph uses).
_BITS_ALLOCATED = (1, 8, 16, 32)
#: The most bytes of the first frame searched for its JPEG / JPEG 2000 frame header.
_STREAM_HEAD_BYTES = 1 << 20
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic; JPEG-LS SOF55).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
#: JPEG markers without a length field (TEM, RSTn, SOI).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: More components than this (RGBA/CMYK) in a codestream is no radiograph, and each costs a full plane.
_MAX_COMPONENTS = 4


def _check_declared_size(ds: Dataset, path: Path) -> tuple[int, int]:
    """``(rows, columns)`` once the size the file declares is known to be sane; raises otherwise.

    Decoders allocate what a file declares before they find that its data is missing, so this runs
    before any of them: the header's Rows x Columns against :data:`MAX_PIXELS`, the samples and bits,
    the length of uncompressed pixel data against the header, and the frame header inside a JPEG or
    JPEG 2000 stream against both.
    """
    rows, columns = _int(_tag(ds, "Rows")), _int(_tag(ds, "Columns"))
    if not rows or not columns or rows < 0 or columns < 0:
        raise DicomReadError(path, f"no image size in the header (Rows {rows}, Columns {columns})")
    _check_pixel_count(path, rows, columns, "the header declares")
    samples, bits = _int(_tag(ds, "SamplesPerPixel")) or 1, _int(_tag(ds, "BitsAllocated"))
    if samples not in (1, 3):
        raise DicomReadError(path, f"SamplesPerPixel is {samples}; an image has 1 (grey) or 3 (colour)")
    if bits not in _BITS_ALLOCATED:
        allowed = ", ".join(map(str, _BITS_ALLOCATED))
        raise DicomReadError(path, f"BitsAllocated is {bits}, not one of {allowed}")
    ts = _tag(getattr(ds, "file_meta", None), "TransferSyntaxUID")
    if ts in UncompressedTransferSyntaxes:
        _check_native_length(ds, path, rows, columns)
    elif getattr(ds["PixelData"], "is_undefined_length", False) or (ts is not None and ts.is_transfer_syntax
                                                                      and ts.is_encapsulated):
        _check_codestream(ds, path, rows, columns)
    # else an unknown syntax: no decoder knows it either, and pydicom says so
    return rows, columns


def _check_pixel_count(path: Path, rows: int, columns: int, who: str) -> None:
    if rows * columns > MAX_PIXELS:
        raise DicomReadError(path, f"{who} {rows} x {columns} pixels ({rows * columns / 1e6:,.0f} Mpixel), "
                                   f"more than the {MAX_PIXELS / 1e6:g} Mpixel limit for one image (a "
                                   "chest radiograph has at most about 20); refused before decoding (a "
                                   "decompression bomb?)")


def _check_native_length(ds: Dataset, path: Path, rows: int, columns: int) -> None:
    """Uncompressed pixel data must hold what the header declares: fewer bytes is a truncated file,
    a whole frame or more beyond it a wrong Rows/Columns/NumberOfFrames (an odd pad byte is fine)."""
    actual = len(ds.PixelData)
    expected = get_expected_length(ds, "bytes")
    frames = _int(_tag(ds, "NumberOfFrames")) or 1
    frame = -(-expected // frames)
    if actual < expected or actual - expected >= frame:
        declared = f"{rows} x {columns}, {frames} frame(s), {_int(_tag(ds, 'BitsAllocated'))} bits"
        raise DicomReadError(path, f"the pixel data holds {actual:,} bytes but the header declares "
                                   f"{expected:,} ({declared}); the file is truncated or its header is wrong")


def _check_codestream(ds: Dataset, path: Path, rows: int, columns: int) -> None:
    """The frame header of the first frame's JPEG / JPEG 2000 stream: within :data:`MAX_PIXELS` and
    equal to Rows x Columns (other codecs, such as RLE, allocate from the header alone)."""
    head = bytearray()
    try:
        for number, fragment in enumerate(generate_fragments(io.BytesIO(ds.PixelData))):
            if number:  # the first item is the basic offset table; frame 0 starts with the next one
                head += fragment[: _STREAM_HEAD_BYTES - len(head)]
            if len(head) >= _STREAM_HEAD_BYTES:
                break
    except ValueError as exc:
        raise DicomReadError(path, f"malformed encapsulated pixel data ({_describe(exc)})") from exc
    try:
        size = _codestream_size(bytes(head))
    except ValueError as exc:
        raise DicomReadError(path, f"{exc}; refused before decoding") from exc
    if size is None:
        return
    kind, (height, width, components) = size
    _check_pixel_count(path, height, width, f"its {kind} stream declares")
    if components > _MAX_COMPONENTS:
        raise DicomReadError(path, f"its {kind} stream declares {components} components; refused before "
                                   "decoding")
    if (height, width) != (rows, columns):
        raise DicomReadError(path, f"its {kind} stream holds {height} x {width} pixels but the header "
                                   f"declares {rows} x {columns}; refused before decoding")


def _codestream_size(head: bytes) -> tuple[str, tuple[int, int, int]] | None:
    """``(kind, (height, width, components))`` from the start of a JPEG (incl. lossless and JPEG-LS)
    or JPEG 2000 stream; ``None`` when ``head`` is neither. Raises ``ValueError`` when it is one of
    them but no frame header can be found in it."""
    if head.startswith(b"\xff\xd8"):
        return "JPEG", _jpeg_size(head)
    if head.startswith(_J2K_SOC_SIZ) or head.startswith(_JP2_SIGNATURE):
        return "JPEG 2000", _j2k_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int, int]:
    """Walk the marker segments up to the start-of-frame header (ITU-T T.81 B.2.2, T.87 for JPEG-LS)."""
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            raise ValueError(f"malformed JPEG stream (no marker at byte {at})")
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            break
        if marker in _JPEG_SOF:
            if at + 10 > len(head):
                break
            height, width = struct.unpack(">HH", head[at + 5:at + 9])
            if height == 0:
                raise ValueError("its JPEG frame header leaves the height to a later DNL marker "
                                 "(not supported)")
            return height, width, head[at + 9]
        at += 2 + struct.unpack(">H", head[at + 2:at + 4])[0]
    raise ValueError("no frame header (SOF marker) found before the JPEG scan data")


def _j2k_size(head: bytes) -> tuple[int, int, int]:
    """The image size and components of the SIZ segment (ITU-T T.800 A.5.1)."""
    at = head.find(_J2K_SOC_SIZ)
    if at < 0 or at + 42 > len(head):
        raise ValueError("no JPEG 2000 image header (SIZ segment) found")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[at + 8:at + 24])
    components = struct.unpack(">H", head[at + 40:at + 42])[0]
    if xsiz <= xosiz or ysiz <= yosiz:
        raise ValueError(f"its JPEG 2000 image header declares an empty image ({xsiz}-{xosiz} x "
                         f"{ysiz}-{yosiz})")
    return ysiz - yosiz, xsiz - xosiz, components


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    grey = rgb.astype(np.float32) @ _LUMA
    if rgb.dtype == np.uint8:
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return grey


def _window_to_uint8(arr: np.ndarray, ds: Dataset, photometric: str, notes: list[str]) -> np.ndarray:
    """Rescale slope/intercept, then the first of VOI LUT, window and robust min-max that gives a
    usable image.

    A VOI LUT or window is unusable when it makes the image constant although the pixel values differ
    (a first mapped value beyond every pixel, LUT entries all equal, a window far from the data): that
    would be a black or white image cached, trained on and predicted without a word. It is skipped,
    and ``notes`` says why and what was used instead.
    """
    monochrome = photometric.startswith("MONOCHROME")
    values = np.asarray(apply_modality_lut(arr, ds) if monochrome else arr, dtype=np.float32)
    flat = bool(values.min() == values.max())  # then every mapping is constant, and rightly so
    skipped: list[str] = []
    if monochrome and "VOILUTSequence" in ds:
        image, why, depth = _voi_lut_image(values, ds)
        if image is not None and (flat or not _is_constant(image)):
            notes.extend(depth)
            return image
        skipped.append(f"the VOI LUT {why or _maps_to_one(image)}")
    window = _window(ds) if monochrome else None
    if window is not None:
        centre, width = window
        image = _scale(values, centre - width / 2.0, centre + width / 2.0)
        if flat or not _is_constant(image):
            if skipped:
                notes.append(f"{skipped[0]}; the window was used instead")
            return image
        skipped.append(f"the window (centre {centre:g}, width {width:g}) {_maps_to_one(image)} "
                       f"(the values span {values.min():g} to {values.max():g})")
    if skipped:
        notes.append(f"{' and '.join(skipped)}; a min-max of the pixel values was used instead")
    return _robust_min_max(values)


def _robust_min_max(values: np.ndarray) -> np.ndarray:
    """Percentiles :data:`_ROBUST_PERCENTILES` of a subsample to black and white; the full range when
    they coincide (a mostly uniform image with a small object must not come out flat)."""
    sample = values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)]
    lo, hi = (float(v) for v in np.percentile(sample, _ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return _scale(values, lo, hi)


def _is_constant(image: np.ndarray) -> bool:
    return bool(image.min() == image.max())


def _maps_to_one(image: np.ndarray | None) -> str:
    return "is unusable" if image is None else f"maps every pixel to {int(image.flat[0])}"


def _voi_lut_image(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray | None, str | None, list[str]]:
    """``(image, why, notes)``: the first VOI LUT applied to ``values`` and scaled to ``uint8``, or
    ``None`` and why when the LUT cannot be used at all. Whether a constant image is acceptable is the
    caller's call; ``why`` then names the cause when it is a known one (all entries equal, a first
    mapped value beyond the data). ``notes`` say what was read differently from the descriptor.

    Not pydicom's ``apply_voi``: it indexes an 8-bit LUT with uint8 indices, which wrap above 255,
    so a 4096-entry 8-bit LUT would map 4000 to entry 160 without a word. The output range follows
    the entries when they contradict the descriptor's bit depth (entries above it, or all below a
    sixteenth of it, as in a 12-bit LUT declared 16-bit, which would come out nearly black).
    """
    try:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except Exception as exc:  # missing, empty or malformed: the LUT is unusable, not the file
        return None, f"is unusable ({_describe(exc)})", []
    entries = entries or 65536
    if isinstance(data, bytes):  # VR OW: 16-bit words in the file's byte order
        little = getattr(getattr(ds, "file_meta", None), "_tsyntax_encoding", (None, True))[1] is not False
        lut = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64)).ravel()
    if lut.size < entries:
        return None, f"holds {lut.size} entries but its descriptor declares {entries}", []
    lut = lut[:entries].astype(np.float32)
    if first >= 32768 and values.min() < 0:  # VR 'US or SS': a signed first value read as unsigned
        first -= 65536
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    top = max(int(lut.max()), 0)
    own_bits = max(top.bit_length(), 1)
    notes = []
    if not 1 <= bits <= 16 or own_bits > bits or own_bits <= bits - 4:
        notes.append(f"the VOI LUT's entries reach {top} but its descriptor declares {bits}-bit entries; "
                     f"scaled as {own_bits}-bit")
        bits = own_bits
    image = _scale(lut[index], 0.0, float(2**bits - 1))
    why = None
    if lut.min() == lut.max():
        why = f"has all {entries} entries equal to {int(lut[0])}"
    elif values.max() < first:
        why = f"starts at value {first}, above every pixel value (the largest is {values.max():g})"
    elif values.min() > first + entries - 1:
        why = (f"ends at value {first + entries - 1}, below every pixel value (the smallest is "
               f"{values.min():g})")
    return image, why, notes


def _window(ds: Dataset) -> tuple[float, float] | None:
    centre, width = _tag(ds, "WindowCenter"), _tag(ds, "WindowWidth")
    if centre is None or width is None:
        return None
    try:
        centre = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (centre, width) if width > 0 else None


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # a flat image: keep it flat rather than divide by zero
        return np.zeros(values.shape, dtype=np.uint8)
    out = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- helpers
def _tag(ds: Any, keyword: str) -> Any:
    """A tag's value, ``None`` when missing, empty or unparsable (a bad tag never stops a read)."""
    if ds is None:
        return None
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return None
    return value


def _text(value: Any) -> str | None:
    return None if value is None else str(value).strip() or None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _ts_name(ds: Dataset) -> str:
    ts = _tag(getattr(ds, "file_meta", None), "TransferSyntaxUID")
    return f"transfer syntax {ts.name}" if ts else "no transfer syntax"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
