"""Read one DICOM file into a greyscale uint8 image and a small, non-identifying metadata dict.

Decoding goes through pydicom 3 and its plugins (Pillow, pylibjpeg with libjpeg/openjpeg/rle), so JPEG
Baseline/Extended/Lossless, JPEG 2000, RLE, deflate and uncompressed files all decode. Baseline and extended
JPEG (the RSNA format is baseline) go to Pillow first: it decodes them several times faster than
pylibjpeg, pydicom's default pick (``benchmarks/bench_dicom.py``); what Pillow cannot decode (12-bit
JPEG, for one) falls back to the other plugins.

Every failure (not DICOM, no pixel data, truncated, unsupported transfer syntax, missing decoder)
becomes one :class:`~pneumodet.errors.DicomReadError` naming the file and the cause.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from pneumodet.errors import DicomReadError

__all__ = ["read_dicom", "dicom_header_text", "extract_metadata", "parse_age"]

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
        dense (MONOCHROME1 is inverted, > 8-bit data is windowed, colour becomes grey, only the first
        frame of a multi-frame file is kept, with a warning). ``metadata`` has the keys ``patient_id,
        age, sex, view_position, modality, body_part, pixel_spacing, rows, columns,
        photometric_interpretation, transfer_syntax``; a missing or malformed tag gives ``None``.

    Raises:
        DicomReadError: the file cannot be read or decoded; the message names the file and the cause.
    """
    path = Path(path)
    try:
        ds = _read_dataset(path, stop_before_pixels=metadata_only)
        metadata = extract_metadata(ds)
    except DicomReadError:
        raise
    except Exception as exc:  # pydicom raises many types on odd headers; the boundary is here
        raise DicomReadError(path, f"unreadable DICOM header ({_describe(exc)})") from exc
    if metadata_only:
        return None, metadata
    try:
        image = _decode_grey_uint8(ds, path)
    except DicomReadError:
        raise
    except Exception as exc:  # pydicom, numpy and the plugins raise many types; the boundary is here.
        raise DicomReadError(path, f"cannot decode the pixel data ({_ts_name(ds)}): {_describe(exc)}") from exc
    return image, metadata


def dicom_header_text(path: str | Path) -> str:
    """The header (file meta and dataset) as pydicom prints it, without the pixel data and without
    identifying elements (person names, birth dates, addresses, institutions, accession numbers; the
    patient ID stays): reports show this text, and the images may come from anywhere."""
    ds = _read_dataset(Path(path), stop_before_pixels=True)
    found: list[tuple[Dataset, Any]] = []
    ds.walk(lambda parent, elem: found.append((parent, elem.tag)) if _identifying(elem) else None)
    names = sorted({parent[tag].name for parent, tag in found})
    for parent, tag in found:
        del parent[tag]
    return str(ds) + (f"\n(identifying elements removed: {', '.join(names)})" if names else "")


#: Identifying elements never shown (besides every person name, VR PN); the patient ID is pneumodet's key.
_IDENTIFYING = frozenset({
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "MedicalRecordLocator", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "AccessionNumber", "StationName", "DeviceSerialNumber", "MilitaryRank", "EthnicGroup", "PatientComments",
})


def _identifying(elem: Any) -> bool:
    return elem.VR == "PN" or elem.keyword in _IDENTIFYING


def extract_metadata(ds: Dataset) -> dict[str, Any]:
    """The non-identifying tags pneumodet uses; never names, birth dates or institutions."""
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
    """``pydicom.dcmread`` with its warnings kept out of the caller's way and truncation made an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, force=force, stop_before_pixels=stop_before_pixels)
    _raise_if_truncated(path, caught)
    return ds


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


def _decode_grey_uint8(ds: Dataset, path: Path) -> np.ndarray:
    """Decoded first frame as ``uint8 [H, W]``, display-ready (bright = dense)."""
    if "PixelData" not in ds:
        if len(ds) == 0:
            raise DicomReadError(path, "truncated file (nothing after the file meta header)")
        kind = _tag(ds, "SOPClassUID")
        raise DicomReadError(path, f"no pixel data (not an image: {getattr(kind, 'name', kind) or 'unknown object'})")
    frames = _int(_tag(ds, "NumberOfFrames")) or 1
    if frames > 1:
        warnings.warn(f"{path}: {frames} frames, only the first is used", stacklevel=3)
    photometric = (_text(_tag(ds, "PhotometricInterpretation")) or "MONOCHROME2").upper()

    arr = _decode_pixels(ds, first_frame_only=frames > 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit LUT entries are display values on 0..65535
            arr = np.rint(arr / 257.0).astype(np.uint8)
    colour = arr.ndim == 3
    if colour:  # RGB (pydicom has already converted YBR to RGB; the palette gave RGB)
        arr = _to_grey(arr)
    # 8-bit colour and 8-bit greyscale are display values already; anything else is windowed
    display_ready = arr.dtype == np.uint8 and (colour or (_int(_tag(ds, "BitsStored")) or 8) == 8)
    image = arr if display_ready else _window_to_uint8(arr, ds, photometric)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image)


def _decode_pixels(ds: Dataset, *, first_frame_only: bool) -> np.ndarray:
    """Raw decoded pixels of the first frame (``[H, W]`` or ``[H, W, 3]``)."""
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    index = 0 if first_frame_only else None
    if ts in _PILLOW_FIRST:
        try:
            return pixel_array(ds, index=index, decoding_plugin="pillow")
        except Exception:  # Pillow cannot do every JPEG variant; the other plugins get their turn
            pass
    return pixel_array(ds, index=index)


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    grey = rgb.astype(np.float32) @ _LUMA
    if rgb.dtype == np.uint8:
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return grey


def _window_to_uint8(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Rescale slope/intercept, then the VOI LUT or window when present, else a robust min-max."""
    values = apply_modality_lut(arr, ds) if photometric.startswith("MONOCHROME") else arr
    values = np.asarray(values, dtype=np.float32)
    if "VOILUTSequence" in ds and photometric.startswith("MONOCHROME"):
        lut_item = ds.VOILUTSequence[0]
        bits = int(lut_item.LUTDescriptor[2])
        return _scale(_apply_voi_lut(values, lut_item, ds), 0.0, float(2**bits - 1))
    window = _window(ds)
    if window is not None and photometric.startswith("MONOCHROME"):
        centre, width = window
        return _scale(values, centre - width / 2.0, centre + width / 2.0)
    sample = values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)]
    lo, hi = np.percentile(sample, _ROBUST_PERCENTILES)
    return _scale(values, float(lo), float(hi))


def _apply_voi_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray:
    """The VOI LUT ``item`` looked up for ``values`` (float32 in, float32 out).

    Not pydicom's ``apply_voi``: it indexes an 8-bit LUT with uint8 indices, which wrap above 255,
    so a 4096-entry 8-bit LUT would map 4000 to entry 160 without a word.
    """
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW: 16-bit words in the file's byte order
        little = getattr(getattr(ds, "file_meta", None), "_tsyntax_encoding", (None, True))[1] is not False
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2")[:entries]
    else:
        lut = np.atleast_1d(np.asarray(data))
    index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)
    return lut.astype(np.float32)[index]


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
