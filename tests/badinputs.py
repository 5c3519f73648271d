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


# ------------------------------------------------------------------------------------------- bombs
def with_jpeg_frame_size(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with the size in its start-of-frame header replaced (the scan data is left as it is)."""
    data, at = bytearray(jpeg), 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    data[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def j2k_bytes(pixels: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """A lossless JPEG 2000 codestream of ``pixels``; ``size`` = (height, width) replaces the image and
    tile size its SIZ header declares (one tile, so decoders take it at its word)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG2000", irreversible=False, no_jp2=True)
    data = bytearray(buffer.getvalue())
    if size is not None:
        at = data.index(b"\xff\x51")  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz (ITU-T T.800 A.5.1)
        height, width = size
        data[at + 6:at + 14] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[at + 22:at + 30] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


#: The start of a private (0029,1010) OB element, explicit VR little endian, before its 4-byte length.
_PRIVATE_OB = b"\x29\x00\x10\x10OB\0\0"


def deflated_dicom(path: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose data set (a small header, then one private
    element of zeros) inflates to about ``inflated_bytes``: about 1 KB per MB inflated."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.PatientID, ds.Modality = SecondaryCaptureImageStorage, path.stem, "CR"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    zeros = inflated_bytes - len(body.getvalue())
    header = _PRIVATE_OB + zeros.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body.getvalue() + header)]
    chunk = bytes(1 << 20)
    for start in range(0, zeros, len(chunk)):
        parts.append(deflater.compress(chunk[: zeros - start]))
    parts.append(deflater.flush())
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head.getvalue() + b"".join(parts))
    return path


def with_huge_element(path: Path, source: Path, length: int = 0xFFFFFFF0) -> Path:
    """``source`` with a private OB element declaring ``length`` bytes inserted before its pixel data
    (which becomes part of that element's value, cut short by the end of the file)."""
    data = source.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    element = _PRIVATE_OB + length.to_bytes(4, "little")
    path.write_bytes(data[:at] + element + data[at:])
    return path


def decompression_bombs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files of 1-2 KB that declare far more pixels (or bytes) than they hold: case name -> (path, regex
    the ``DicomReadError`` cause matches). Unchecked, each takes gigabytes in a decoder (or in the
    header parse) before anything notices the data is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = blob_image(16, 16, (4, 4, 12, 12))
    jpeg, huge = jpeg_bytes(grey), {"Rows": 65535, "Columns": 65535}
    baseline, j2k = UID("1.2.840.10008.1.2.4.50"), UID("1.2.840.10008.1.2.4.90")
    rle_one_segment = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + b"\x81\x00" * 8
    refused = r"65535 x 65535 pixels \(4,295 Mpixel\), more than the 50 Mpixel limit .*refused before"
    made = {
        "jpeg_65535": (lambda p: make_dicom(p, grey, transfer_syntax=baseline, tags=huge,
                                            encapsulated=with_jpeg_frame_size(jpeg, 65535, 65535)),
                       rf"the header declares {refused}"),
        "jpeg_stream_65535": (lambda p: make_dicom(p, grey, transfer_syntax=baseline,
                                                   encapsulated=with_jpeg_frame_size(jpeg, 65535, 65535)),
                              rf"its JPEG stream declares {refused}"),
        "jpeg_stream_disagrees": (lambda p: make_dicom(p, grey, transfer_syntax=baseline,
                                                       encapsulated=with_jpeg_frame_size(jpeg, 16, 32)),
                                  r"its JPEG stream holds 16 x 32 pixels but the header declares 16 x 16"),
        "j2k_65535": (lambda p: make_dicom(p, grey, transfer_syntax=j2k, tags=huge,
                                           encapsulated=j2k_bytes(grey, (65535, 65535))),
                      rf"the header declares {refused}"),
        "j2k_stream_65535": (lambda p: make_dicom(p, grey, transfer_syntax=j2k,
                                                  encapsulated=j2k_bytes(grey, (65535, 65535))),
                             rf"its JPEG 2000 stream declares {refused}"),
        "rle_65535": (lambda p: make_dicom(p, grey, transfer_syntax=UID("1.2.840.10008.1.2.5"), tags=huge,
                                           encapsulated=rle_one_segment),
                      rf"the header declares {refused}"),
        "native_65535": (lambda p: make_dicom(p, grey, tags=huge), rf"the header declares {refused}"),
        "native_2g_frames": (lambda p: make_dicom(p, grey, tags={"NumberOfFrames": 2**31 - 1}),
                             r"the pixel data holds 256 bytes but the header declares 549,755,813,632"),
        "native_more_than_declared": (lambda p: make_dicom(p, grey, tags={"Rows": 8}),
                                      r"the pixel data holds 256 bytes but the header declares 128"),
        "huge_element": (lambda p: with_huge_element(p, make_dicom(folder / "plain.tmp", grey)),
                         r"truncated file \(an element declares 4,294,967,280 bytes"),
        "deflate_512mb": (lambda p: deflated_dicom(p, 2**29), r"inflates to more than 400,000,000 bytes"),
    }
    cases = {name: (make(folder / f"{name}.dcm"), cause) for name, (make, cause) in made.items()}
    (folder / "plain.tmp").unlink()
    return cases


# ------------------------------------------------------------------------------- labels, submissions, paths
#: Box coordinates ``x,y,width,height`` that no image can have (all beyond +-1e6 px), by case name.
ABSURD_BOXES = {"width_1e300": "10,20,1e300,40", "x_minus_1e300": "-1e300,20,30,40",
                "height_2e6": "10,20,30,2000000", "x_max_float": "1.7976931348623157e308,20,30,40"}


def crowded_submission(path: Path, patient_id: str, boxes: int,
                       group: str = "0.5000 100.0 100.0 200.0 300.0") -> Path:
    """A submission whose only row gives ``patient_id`` ``boxes`` copies of one box ``group``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row = " ".join([group] * boxes)
    path.write_text(f"patientId,PredictionString\n{patient_id},{row}\n", encoding="utf-8")
    return path


def non_utf8_path(parent: Path, name: bytes = b"data\xff") -> Path:
    """``parent / name`` where ``name`` holds bytes that are not UTF-8 (Python shows them as surrogate
    escapes: such a ``str`` opens files fine but cannot be printed or written as UTF-8 text)."""
    return Path(os.fsdecode(os.fsencode(parent) + b"/" + name))


# ------------------------------------------------------------------------------------------- identifying data
#: Identifying values in standard elements, beyond :data:`PHI`: names, addresses, phones, occupation,
#: weight, every date and time, institution, other IDs, comments. No pneumodet output may contain them.
IDENTIFYING = {
    "OtherPatientNames": "Ximenez^Teresa", "PatientBirthName": "Quixana^Alonsa",
    "PatientMotherBirthName": "Zurita^Marisol", "PerformingPhysicianName": "Perez^Pedro",
    "OperatorsName": "Nicolas^Maese", "RequestingPhysician": "Carrasco^Sanson",
    "PatientAddress": "7 Rue Rocinante, Argamasilla", "PatientTelephoneNumbers": "+34-926-551208",
    "ReferringPhysicianAddress": "12 Calle Molinos, Toboso",
    "ReferringPhysicianTelephoneNumbers": "+34-925-770341",
    "InstitutionAddress": "3 Plaza Mayor, Ciudad Real", "InstitutionalDepartmentName": "Caballeria Andante",
    "Occupation": "Hidalgo errante", "PatientWeight": "88.76543", "PatientBirthTime": "052311.250613",
    "StudyDate": "19970305", "SeriesDate": "19970306", "AcquisitionDate": "19970307",
    "ContentDate": "19970308",
    "StudyTime": "141516.171819", "SeriesTime": "141517.181920", "AcquisitionTime": "141518.192021",
    "ContentTime": "141519.202122", "StationName": "ROCINANTE-CR7", "DeviceSerialNumber": "SN-DQX-550912",
    "OtherPatientIDs": "OPID-77120-MX", "MedicalRecordLocator": "MRL-44821-LM", "StudyID": "STU98127",
    "PatientComments": "allergic to windmills", "ImageComments": "bed 14B beside the barber",
    "AdditionalPatientHistory": "fell off the horse twice", "StudyDescription": "Chest for Dulcinea",
    "EthnicGroup": "Manchego", "MilitaryRank": "Caballero andante",
}
#: A medical record number hidden in a private element, as some vendors do.
PRIVATE_MRN = "MRN-5523-1907-Q"


def add_identifying_data(path: Path) -> Path:
    """Rewrite the DICOM ``path`` with every :data:`IDENTIFYING` value and :data:`PRIVATE_MRN` in a
    private element (besides the :data:`PHI` every generated file has)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    ds.private_block(0x0029, "ACME RECORDS 1.0", create=True).add_new(0x10, "LO", PRIVATE_MRN)
    ds.save_as(path)
    return path


def identifying_values() -> list[str]:
    """Every identifying value the generated files can carry, as written and with ``^`` as a space."""
    values = [*PHI.values(), *IDENTIFYING.values(), PRIVATE_MRN]
    return sorted({v for value in values for v in (value, value.replace("^", " "))})


def find_identifying(data: bytes, values: Iterable[str] | None = None) -> list[str]:
    """The identifying values found in ``data``; all-digit values (dates, times, numbers) only as a
    whole number, so that the digits of some other number never count as a leak."""
    import re

    found = []
    for value in identifying_values() if values is None else values:
        needle = re.escape(value.encode())
        pattern = rb"(?<![0-9.])" + needle + rb"(?![0-9])" if re.fullmatch(r"[0-9.]+", value) else needle
        if re.search(pattern, data):
            found.append(value)
    return found


def jpeg_frames_dicom(path: Path, frames: Sequence[bytes], pixels: np.ndarray) -> Path:
    """A multi-frame JPEG Baseline file of ``pixels``' size whose frames are the given JPEG streams
    (with a basic offset table, as DICOM writers make them)."""
    import pydicom
    from pydicom.encaps import encapsulate

    make_dicom(path, pixels, transfer_syntax=UID("1.2.840.10008.1.2.4.50"), encapsulated=frames[0],
               tags={"NumberOfFrames": len(frames)})
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate(list(frames), has_bot=True)
    ds.save_as(path)
    return path


# ------------------------------------------------------------------------------------------- display
def with_voi_lut(path: Path, descriptor: Sequence[int], data: Sequence[int]) -> Path:
    """Replace the VOI LUT of the DICOM ``path`` (made with one) by ``descriptor`` and ``data`` as given,
    however inconsistent."""
    import pydicom

    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    item.LUTDescriptor = list(descriptor)
    item.LUTData = [int(v) for v in data]
    ds.save_as(path)
    return path


def display_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    """12-bit images (a 4000 box on 100, with a ramp row) whose VOI LUT or window cannot be used as it
    stands, and a mostly uniform one: case name -> (path, regex one of its ``image_notes`` matches).
    Each must still come out with the box bright and the background dark."""
    folder.mkdir(parents=True, exist_ok=True)
    wide = blob_image(128, 128, (40, 30, 90, 100), dtype=np.uint16, high=4000, low=100)
    speck = np.full((128, 128), 100, np.uint16)
    speck[40:45, 40:45] = 4000  # 0.15 % of the pixels: the 0.5/99.5 percentiles are both 100

    def lut(path: Path, **kw: object) -> Path:
        return make_dicom(path, wide, bits_stored=12, voi_lut=VOI_LUT, **kw)

    min_max = "a min-max of the pixel values was used instead"
    made = {
        "lut_first_beyond_data": (
            lambda p: with_voi_lut(lut(p, window=(2050, 3900)), [4096, 30000, 12], VOI_LUT),
            r"the VOI LUT starts at value 30000, above every pixel value .*; the window was used instead"),
        "lut_all_zero": (lambda p: with_voi_lut(lut(p), [4096, 0, 12], np.zeros(4096, np.uint16)),
                         rf"the VOI LUT has all 4096 entries equal to 0; {min_max}"),
        "lut_shorter_than_declared": (
            lambda p: with_voi_lut(lut(p), [4096, 0, 12], VOI_LUT[:100]),
            rf"the VOI LUT holds 100 entries but its descriptor declares 4096; {min_max}"),
        "lut_16_bit_declared_12_bit_entries": (
            lambda p: lut(p, voi_lut_bits=16),
            r"entries reach 4095 but its descriptor declares 16-bit entries; scaled as 12-bit"),
        "window_far_off": (lambda p: make_dicom(p, wide, bits_stored=12, window=(30000, 10)),
                           rf"the window \(centre 30000, width 10\) maps every pixel to 0 .*; {min_max}"),
        "mostly_uniform": (lambda p: make_dicom(p, speck, bits_stored=12), r"^$"),
    }
    return {name: (make(folder / f"{name}.dcm"), note) for name, (make, note) in made.items()}
