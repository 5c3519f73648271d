"""Generators of bad (and good) inputs for the robustness tests: DICOM files, label CSVs, submissions.

Everything is written by the tests themselves into temporary folders; nothing here reads the network.
The DICOMs carry identifying tags (:data:`PHI`) so that privacy tests can look for them in outputs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

#: Identifying values written into every generated DICOM; no pneumodet output may contain them.
PHI = {"PatientName": "Quixote^Alonso", "PatientBirthDate": "19230417",
       "InstitutionName": "Hospital de la Mancha", "ReferringPhysicianName": "Panza^Sancho",
       "AccessionNumber": "ACC77441"}
#: A transfer syntax no decoder knows (a private UID under the pydicom root).
PRIVATE_TRANSFER_SYNTAX = UID("1.2.826.0.1.3680043.8.498.99999.1")

#: A 12-bit VOI LUT that is not a straight line (square root), so its use is visible in the output.
VOI_LUT = np.clip(np.rint(np.sqrt(np.arange(4096) * 4095.0)), 0, 4095).astype(np.uint16)

LABELS_HEADER = "patientId,x,y,width,height,Target"
CLASSES_HEADER = "patientId,class"


# ------------------------------------------------------------------------------------------- DICOM
def blob_image(height: int, width: int, box: tuple[int, int, int, int] | None = None,
               dtype: type = np.uint8, high: int = 255, low: int = 0) -> np.ndarray:
    """A flat ``low`` image with one ``high`` rectangle ``box`` = (x1, y1, x2, y2), plus a grey ramp row."""
    pixels = np.full((height, width), low, dtype=dtype)
    if box is not None:
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = high
    pixels[-1, :] = np.linspace(low, high, width).astype(dtype)  # never flat, so windowing is defined
    return pixels


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    patient_id: str | None = "",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    voi_lut_bits: int = 12,
    palette: np.ndarray | None = None,
    frames: int = 1,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    encapsulated: bytes | None = None,
    tags: dict[str, object] | None = None,
    omit: Iterable[str] = (),
) -> Path:
    """Write one DICOM file; ``pixels`` is ``[H, W]`` (uint8/uint16/int16) or ``[H, W, 3]`` (RGB uint8).

    ``patient_id=""`` uses the file stem; ``None`` leaves the tag out. ``pixels=None`` writes a header
    without pixel data. ``encapsulated`` replaces the pixel data with those bytes as one compressed
    frame (with ``transfer_syntax``). ``omit`` removes tags after everything is set.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    if patient_id is not None:
        ds.PatientID = patient_id or Path(path).stem
    ds.Modality, ds.PatientAge, ds.PatientSex, ds.ViewPosition = "CR", "051Y", "F", "PA"
    ds.BodyPartExamined = "CHEST"
    if pixels is not None:
        _set_pixels(ds, pixels, photometric, bits_stored, frames)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, voi_lut_bits]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = DicomSequence([item])
    if palette is not None:  # palette: [256, 3] uint16 entries, 16-bit
        for i, channel in enumerate(("Red", "Green", "Blue")):
            setattr(ds, f"{channel}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{channel}PaletteColorLookupTableData", palette[:, i].astype("<u2").tobytes())
    if encapsulated is not None:
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    for keyword in omit:
        if keyword in ds:
            delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=encapsulated is None and transfer_syntax == ExplicitVRLittleEndian)
    return path


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int | None, frames: int) -> None:
    colour = pixels.ndim == 3
    itemsize = pixels.dtype.itemsize
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * itemsize
    ds.BitsStored = bits_stored or 8 * itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    data = np.ascontiguousarray(np.stack([pixels] * frames) if frames > 1 else pixels)
    ds.PixelData = data.astype(data.dtype.newbyteorder("<")).tobytes()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def dicom_cases(folder: Path) -> dict[str, Path]:
    """Every DICOM variant that must decode, keyed by case name (128-px images unless the case is size)."""
    folder.mkdir(parents=True, exist_ok=True)
    box = (40, 30, 90, 100)
    grey = blob_image(128, 128, box)
    wide = blob_image(128, 128, box, dtype=np.uint16, high=4000, low=100)
    rgb = np.stack([grey] * 3, axis=-1)
    palette = np.stack([np.arange(256) * 257] * 3, axis=1).astype(np.uint16)  # grey ramp palette
    make = {
        "monochrome2_8bit": lambda p: make_dicom(p, grey),
        "monochrome1": lambda p: make_dicom(p, 255 - grey, photometric="MONOCHROME1"),
        "12bit_window": lambda p: make_dicom(p, wide, bits_stored=12, window=(2050, 3900)),
        "12bit_no_window": lambda p: make_dicom(p, wide, bits_stored=12),
        "16bit_voi_lut": lambda p: make_dicom(p, wide, bits_stored=16,
                                              voi_lut=VOI_LUT),
        "16bit_voi_lut_8bit_entries": lambda p: make_dicom(p, wide, bits_stored=16, voi_lut=np.arange(4096) // 16,
                                                           voi_lut_bits=8),
        "signed_16bit": lambda p: make_dicom(p, (wide.astype(np.int32) - 2000).astype(np.int16), bits_stored=16),
        "rgb": lambda p: make_dicom(p, rgb, photometric="RGB"),
        "palette_colour": lambda p: make_dicom(p, grey, photometric="PALETTE COLOR", palette=palette),
        "multi_frame": lambda p: make_dicom(p, grey, frames=3),
        "non_square": lambda p: make_dicom(p, blob_image(96, 160, (10, 10, 60, 50))),
        "tiny_16px": lambda p: make_dicom(p, blob_image(16, 16, (4, 4, 12, 12))),
        "huge_4096px": lambda p: make_dicom(p, blob_image(4096, 4096, (1024, 1024, 3072, 3072))),
        "missing_tags": lambda p: make_dicom(p, grey, patient_id=None,
                                             omit=("PatientAge", "PatientSex", "ViewPosition")),
        "jpeg_baseline": lambda p: make_dicom(p, grey, transfer_syntax=UID("1.2.840.10008.1.2.4.50"),
                                              encapsulated=jpeg_bytes(grey)),
    }
    return {name: fn(folder / f"{name}.dcm") for name, fn in make.items()}


def broken_dicom_cases(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files that must be refused: case name -> (path, regex the ``DicomReadError`` cause matches).

    ``good`` is a readable DICOM whose bytes are cut or bent.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    grey = blob_image(64, 64, (8, 8, 40, 40))

    def raw(name: str, content: bytes) -> Path:
        path = folder / f"{name}.dcm"
        path.write_bytes(content)
        return path

    return {
        "empty": (raw("empty", b""), r"empty file"),
        "truncated_header": (raw("truncated_header", data[:300]), r"truncated|unreadable|not a DICOM|pixel data"),
        "truncated_pixels": (raw("truncated_pixels", data[: len(data) - len(data) // 3]),
                             r"pixel data|unreadable|decode"),
        "random_bytes": (raw("random_bytes", rng.bytes(4096)), r"not a DICOM|unreadable"),
        "png_renamed": (raw("png_renamed", png_bytes(grey)), r"not a DICOM|unreadable"),
        "text_renamed": (raw("text_renamed", b"patientId,x,y\n" * 50), r"not a DICOM|unreadable"),
        "no_pixel_data": (make_dicom(folder / "no_pixel_data.dcm", None), r"no pixel data"),
        "private_transfer_syntax": (
            make_dicom(folder / "private_transfer_syntax.dcm", grey, transfer_syntax=PRIVATE_TRANSFER_SYNTAX,
                       encapsulated=jpeg_bytes(grey)),
            r"cannot decode|transfer syntax"),
        "pixel_data_too_short": (
            make_dicom(folder / "pixel_data_too_short.dcm", grey, tags={"Rows": 640}), r"cannot decode|pixel"),
    }


def symlink_loop(folder: Path) -> Path:
    """A folder holding a link to itself and two links forming a cycle."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "self").symlink_to(folder, target_is_directory=True)
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder


# ------------------------------------------------------------------------------------------- datasets
def write_dataset(root: Path, patients: Sequence[tuple[str, Sequence[tuple[int, int, int, int]]]], *,
                  size: int = 128, images: bool = True) -> Path:
    """A Kaggle-layout folder: labels + class CSVs and one DICOM per patient with a bright box per label.

    ``patients``: ``(patient id, boxes as x, y, width, height in 1024-pixel label space)``. Images are
    ``size`` pixels; the bright rectangles are the boxes scaled to that size.
    """
    labels, classes = [LABELS_HEADER], [CLASSES_HEADER]
    for pid, boxes in patients:
        for x, y, w, h in boxes:
            labels.append(f"{pid},{x},{y},{w},{h},1")
            classes.append(f"{pid},Lung Opacity")
        if not boxes:
            labels.append(f"{pid},,,,,0")
            classes.append(f"{pid},Normal")
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    if images:
        scale = size / 1024
        for pid, boxes in patients:
            pixels = np.full((size, size), 30, np.uint8)
            for x, y, w, h in boxes:
                pixels[int(y * scale):int((y + h) * scale), int(x * scale):int((x + w) * scale)] = 220
            make_dicom(root / "stage_2_train_images" / f"{pid}.dcm", pixels, patient_id=pid)
    return root


def small_patients(n: int = 12, seed: int = 0) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
    """``n`` patients, every other one positive with one or two boxes (ids ``p000``...)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        boxes = []
        if i % 2:
            for _ in range(1 + i % 4 // 3):
                x, y = (int(v) for v in rng.integers(100, 600, 2))
                boxes.append((x, y, int(rng.integers(150, 300)), int(rng.integers(150, 300))))
        out.append((f"p{i:03d}", boxes))
    return out


def write_csv(path: Path, lines: Sequence[str], *, newline: str = "\n", bom: bool = False) -> Path:
    text = newline.join(lines) + newline
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def write_big_labels(path: Path, megabytes: int) -> int:
    """A labels CSV of about ``megabytes`` MB (positive patients, two boxes each); returns its data rows."""
    row_block = []
    rows = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(LABELS_HEADER + "\n")
        i = 0
        while fh.tell() < megabytes * 1_000_000:
            row_block.clear()
            for _ in range(10_000):
                pid = f"{i:08x}-0000-4000-8000-{i:012x}"
                row_block.append(f"{pid},264.0,152.0,213.0,379.0,1\n{pid},562.0,152.0,256.0,453.0,1\n")
                i += 1
                rows += 2
            fh.write("".join(row_block))
    os.sync()
    return rows


def write_big_classes(path: Path, labels_path: Path) -> None:
    with open(labels_path, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        next(src)
        dst.write(CLASSES_HEADER + "\n")
        for line in src:
            dst.write(line.split(",", 1)[0] + ",Lung Opacity\n")
