"""read_dicom on the real RSNA files, on pydicom's own test files (every codec and photometric pydicom
ships) and on broken files; one error class, naming the file, for every failure."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array

from badinputs import (
    IDENTIFYING,
    PHI,
    add_identifying_data,
    blob_image,
    find_identifying,
    jpeg_bytes,
    make_dicom,
)
from pneumodet.data.dicom import HEADER_ELEMENTS, dicom_header_text, parse_age, read_dicom
from pneumodet.errors import DicomReadError

META_KEYS = {"patient_id", "age", "sex", "view_position", "modality", "body_part", "pixel_spacing", "rows",
             "columns", "photometric_interpretation", "transfer_syntax", "sop_instance_uid", "study_instance_uid",
             "series_instance_uid", "constant_image", "image_notes"}


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def real_files(real_sample: Path) -> list[Path]:
    files = sorted((real_sample / "stage_2_train_images").glob("*.dcm"))
    assert len(files) == 16
    return files


# ------------------------------------------------------------------------------------------ real RSNA
def test_real_rsna_files_decode_with_metadata(real_sample: Path) -> None:
    for path in real_files(real_sample):
        image, meta = read_dicom(path)
        assert image.dtype == np.uint8 and image.shape == (1024, 1024)
        assert image.std() > 20, f"{path.name} decoded to a nearly flat image"
        assert set(meta) == META_KEYS
        assert meta["patient_id"] == path.stem
        assert isinstance(meta["age"], float) and 0 < meta["age"] < 120
        assert meta["sex"] in {"M", "F"}
        assert meta["view_position"] in {"AP", "PA"}
        assert meta["modality"] == "CR" and meta["body_part"] == "CHEST"
        assert meta["rows"] == meta["columns"] == 1024
        assert meta["photometric_interpretation"] == "MONOCHROME2"
        assert meta["transfer_syntax"] == "JPEG Baseline (Process 1)"
        assert len(meta["pixel_spacing"]) == 2 and all(isinstance(v, float) for v in meta["pixel_spacing"])


def test_real_file_pixels_match_the_other_decoder(real_sample: Path) -> None:
    """Pillow (preferred for baseline JPEG) and pylibjpeg agree (JPEG decoders may differ by 1)."""
    path = real_files(real_sample)[0]
    image, _ = read_dicom(path)
    reference = pixel_array(pydicom.dcmread(path), decoding_plugin="pylibjpeg").astype(int)
    assert np.abs(image.astype(int) - reference).max() <= 1
    assert np.mean(image != reference) < 0.05


def test_metadata_only_skips_pixels(real_sample: Path) -> None:
    path = real_files(real_sample)[0]
    image, meta = read_dicom(path, metadata_only=True)
    assert image is None
    assert meta["constant_image"] is None and meta["image_notes"] == []
    full = read_dicom(path)[1]
    assert full["constant_image"] is False and full["image_notes"] == []
    assert {k: v for k, v in meta.items() if k != "constant_image"} == {k: v for k, v in full.items()
                                                                         if k != "constant_image"}


def test_identifying_tags_never_leak(real_sample: Path, tmp_path: Path) -> None:
    """A real file given names, addresses, phones, occupation, weight, every date and time, institution,
    accession, other IDs, comments and an MRN in a private element: the metadata is its allow-list of
    keys and the header text its allow-list of elements, neither with any of those values."""
    ds = pydicom.dcmread(real_files(real_sample)[0])
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    out = tmp_path / "identified.dcm"
    ds.save_as(out)
    add_identifying_data(out)
    assert len(find_identifying(out.read_bytes())) == len(PHI) + len(IDENTIFYING) + 1  # the check can fail
    for metadata_only in (False, True):
        meta = read_dicom(out, metadata_only=metadata_only)[1]
        assert set(meta) == META_KEYS
        assert find_identifying(repr(meta).encode()) == []
    text = dicom_header_text(out)
    assert find_identifying(text.encode()) == []
    *elements, last = text.splitlines()
    keywords = [keyword_for_tag(int(line[1:5] + line[6:10], 16)) for line in elements]
    assert "Rows" in keywords and "PatientID" in keywords and set(keywords) <= HEADER_ELEMENTS
    assert re.fullmatch(r"\((\d+) other element\(s\) withheld: .*\)", last)


def test_header_text_shows_the_header_without_pixels(real_sample: Path) -> None:
    path = real_files(real_sample)[0]
    text = dicom_header_text(path)
    assert "Transfer Syntax UID" in text and "JPEG Baseline" in text
    assert f"Patient ID                          LO: '{path.stem}'" in text
    assert "Pixel Data" not in text


# ------------------------------------------------------------------------------------------ photometrics
def with_tag_edited(source: Path, tmp_path: Path, **tags: object) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    out = tmp_path / f"edited_{source.name}"
    ds.save_as(out)
    return out


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    """RG1 is a MONOCHROME1 CR chest: the same stored pixels read as MONOCHROME2 give the negative."""
    mono1 = pydicom_file("RG1_UNCI.dcm")
    image1, meta = read_dicom(mono1)
    assert meta["photometric_interpretation"] == "MONOCHROME1"
    image2, _ = read_dicom(with_tag_edited(mono1, tmp_path, PhotometricInterpretation="MONOCHROME2"))
    np.testing.assert_array_equal(image1.astype(int), 255 - image2.astype(int))
    # bright = dense: the film border (no patient, high stored values in MONOCHROME1) comes out dark
    assert image1[:, :20].mean() < image1[800:1200, 800:1000].mean()


@pytest.mark.parametrize("compressed, uncompressed", [("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
                                                      ("RG1_J2KI.dcm", "RG1_UNCI.dcm")])
def test_compressed_monochrome1_matches_uncompressed(compressed: str, uncompressed: str) -> None:
    np.testing.assert_array_equal(read_dicom(pydicom_file(compressed))[0],
                                  read_dicom(pydicom_file(uncompressed))[0])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_16_bit_signed_is_windowed_monotonically(name: str) -> None:
    ds = pydicom.dcmread(pydicom_file(name))
    assert ds.BitsStored == 16 and ds.PixelRepresentation == 1
    image, meta = read_dicom(pydicom_file(name))
    assert image.dtype == np.uint8 and image.shape == (meta["rows"], meta["columns"])
    assert image.std() > 30
    # windowing is monotone: brighter stored value never gives a darker output pixel
    raw = ds.pixel_array.ravel()
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(image.ravel()[order].astype(int)) >= 0)


def test_window_centre_width_is_applied() -> None:
    """MR_small carries a window; pixels below/above it saturate, the rest map linearly."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    values = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    image, _ = read_dicom(pydicom_file("MR_small.dcm"))
    assert np.all(image[values <= centre - width / 2] == 0)
    assert np.all(image[values >= centre + width / 2] == 255)
    expected = np.clip(np.rint((values - (centre - width / 2)) * 255 / width), 0, 255)
    np.testing.assert_array_equal(image, expected.astype(np.uint8))


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    """A VOI LUT (here: an inverting 12-bit-in, 8-bit-out ramp) takes precedence over the window."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    first, entries = 100, 2100
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries, first, 8]
    item.add_new("LUTData", "US", [int(v) for v in np.linspace(255, 0, entries).round()])
    ds.VOILUTSequence = pydicom.Sequence([item])
    out = tmp_path / "voi_lut.dcm"
    ds.save_as(out)
    image, _ = read_dicom(out)
    stored = ds.pixel_array.astype(int)
    lut = np.asarray(item.LUTData)
    expected = lut[np.clip(stored - first, 0, entries - 1)]
    np.testing.assert_array_equal(image, expected.astype(np.uint8))
    assert np.corrcoef(image.ravel(), stored.ravel())[0, 1] < -0.99  # the LUT, not the window, decided


def test_no_window_uses_robust_min_max() -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert "WindowCenter" not in ds
    image, _ = read_dicom(pydicom_file("CT_small.dcm"))
    # 0.5 %/99.5 % clipping: a little of the image saturates at each end, not more than a few percent
    assert 0.001 < (image == 0).mean() < 0.05
    assert 0.001 < (image == 255).mean() < 0.05


def test_rescale_slope_intercept_is_applied(tmp_path: Path) -> None:
    """Same stored pixels, a negative slope: the image inverts (the window moves with the rescale)."""
    source = pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(source)
    plain, _ = read_dicom(with_tag_edited(source, tmp_path, WindowCenter=None, WindowWidth=None))
    ds.RescaleSlope, ds.RescaleIntercept = -1, 0
    del ds.WindowCenter, ds.WindowWidth
    out = tmp_path / "negative.dcm"
    ds.save_as(out)
    flipped, _ = read_dicom(out)
    assert np.corrcoef(plain.ravel(), flipped.ravel())[0, 1] < -0.99


def test_rgb_ybr_and_palette_become_grey() -> None:
    reference, _ = read_dicom(pydicom_file("SC_rgb.dcm"))
    rgb = pydicom.dcmread(pydicom_file("SC_rgb.dcm")).pixel_array.astype(float)
    expected = np.rint(rgb @ [0.299, 0.587, 0.114])
    assert np.abs(reference.astype(float) - expected).max() <= 1
    for name in ("SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        image, _ = read_dicom(pydicom_file(name))
        assert image.shape == reference.shape and image.dtype == np.uint8
        assert np.abs(image.astype(int) - reference.astype(int)).mean() < 3, name
    palette, meta = read_dicom(pydicom_file("OT-PAL-8-face.dcm"))
    assert meta["photometric_interpretation"] == "PALETTE COLOR"
    ds = pydicom.dcmread(pydicom_file("OT-PAL-8-face.dcm"), force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rgb = apply_color_lut(ds.pixel_array, ds).astype(float)
    if ds.RedPaletteColorLookupTableDescriptor[2] == 16:
        rgb = rgb / 257.0  # 16-bit LUT entries
    assert np.abs(palette - np.rint(rgb @ [0.299, 0.587, 0.114])).mean() < 2
    assert palette.std() > 20


def test_multiframe_keeps_first_frame_and_warns_naming_the_file() -> None:
    path = pydicom_file("SC_rgb_2frame.dcm")
    with pytest.warns(UserWarning, match=r"SC_rgb_2frame\.dcm.*2 frames"):
        image, _ = read_dicom(path)
    first = pydicom.dcmread(path).pixel_array[0].astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(image - np.rint(first)).max() <= 1


@pytest.mark.parametrize("name, equal_to", [
    ("MR_small_RLE.dcm", "MR_small.dcm"),              # RLE
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),     # JPEG 2000 lossless
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),                  # JPEG 2000 lossless, 12-bit
    ("JPEG2000.dcm", None),                            # JPEG 2000
    ("JPEG-LL.dcm", None),                             # JPEG lossless
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),          # JPEG lossless, 8-bit
    ("JPGExtended.dcm", None),                         # JPEG extended, 12-bit
    ("image_dfl.dcm", None),                           # deflate
])
def test_every_codec_decodes(name: str, equal_to: str | None) -> None:
    image, meta = read_dicom(pydicom_file(name))
    assert image.dtype == np.uint8 and image.shape == (meta["rows"], meta["columns"])
    assert image.std() > 5, f"{name} decoded to a flat image"
    if equal_to is not None:
        np.testing.assert_array_equal(image, read_dicom(pydicom_file(equal_to))[0])


def test_age_strings() -> None:
    assert parse_age("51") == 51.0
    assert parse_age("058Y") == 58.0
    assert parse_age("3M") == pytest.approx(0.25)
    assert parse_age("006W") == pytest.approx(42 / 365.25)
    assert parse_age("14D") == pytest.approx(14 / 365.25)
    assert parse_age("") is None and parse_age(None) is None and parse_age("old") is None


def test_missing_and_malformed_tags_give_none(tmp_path: Path, real_sample: Path) -> None:
    ds = pydicom.dcmread(real_files(real_sample)[0])
    for keyword in ("PatientAge", "PatientSex", "ViewPosition", "BodyPartExamined"):
        delattr(ds, keyword)
    ds.PixelSpacing = None
    out = tmp_path / "sparse.dcm"
    ds.save_as(out)
    image, meta = read_dicom(out)
    assert image.shape == (1024, 1024)
    assert meta["age"] is meta["sex"] is meta["view_position"] is meta["body_part"] is meta["pixel_spacing"] is None
    assert meta["patient_id"] == real_files(real_sample)[0].stem


# ------------------------------------------------------------------------------------------ errors
def assert_read_error(path: Path, cause: str) -> DicomReadError:
    with pytest.raises(DicomReadError) as info:
        read_dicom(path)
    assert re.search(cause, info.value.cause), info.value.cause
    assert path.name in str(info.value)
    assert info.value.path == str(path)
    return info.value


def test_empty_random_png_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert_read_error(empty, "empty file")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_read_error(noise, "not a DICOM file")
    png = tmp_path / "picture.dcm"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    assert_read_error(png, "not a DICOM file")
    assert_read_error(tmp_path / "absent.dcm", "file not found")
    with pytest.raises(DicomReadError, match="not found"):
        dicom_header_text(tmp_path / "absent.dcm")


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.95])
def test_truncated_real_file(real_sample: Path, tmp_path: Path, keep: float) -> None:
    data = real_files(real_sample)[0].read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert_read_error(cut, "truncated")


def test_no_pixel_data() -> None:
    assert_read_error(pydicom_file("rtplan.dcm"), "no pixel data.*RT Plan")


def test_unsupported_transfer_syntax(tmp_path: Path, real_sample: Path) -> None:
    ds = pydicom.dcmread(real_files(real_sample)[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists in pydicom
    out = tmp_path / "mpeg.dcm"
    ds.save_as(out, enforce_file_format=True)
    assert_read_error(out, "MPEG2")


def test_missing_decoder_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG-LS file in an environment without any JPEG-LS plugin: a clear error, nothing else escapes."""
    path = pydicom_file("JPEGLSNearLossless_08.dcm")
    decoder = get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})
    assert_read_error(path, "JPEG-LS.*(plugin|dependenc)")


def test_corrupt_jpeg_stream() -> None:
    """pydicom ships a JPEG-Extended file no decoder can read; the causes of both plugins are kept."""
    err = assert_read_error(pydicom_file("JPEG-lossy.dcm"), "JPEG Extended")
    assert "pillow" in err.cause and "pylibjpeg" in err.cause


def test_metadata_only_still_rejects_non_dicom(tmp_path: Path) -> None:
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(b"hello, this is not a DICOM file at all" * 10)
    with pytest.raises(DicomReadError, match="noise.dcm"):
        read_dicom(noise, metadata_only=True)


def test_no_stray_warnings_on_real_files(real_sample: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in real_files(real_sample)[:4]:
            read_dicom(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_give_an_image_or_a_dicom_read_error(data: st.DataObject, tmp_path: Path,
                                                             synth_dataset: Path) -> None:
    """Random byte damage (header or pixels, overwritten or cut) never lets another exception escape.
    Sources: a 16-bit uncompressed MR and a JPEG-Baseline file as RSNA's."""
    jpeg_file = sorted((synth_dataset / "stage_2_train_images").glob("*.dcm"))[0]
    source = data.draw(st.sampled_from([pydicom_file("MR_small.dcm"), jpeg_file]), label="source")
    original = source.read_bytes()
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="hits")):
        pos = data.draw(st.integers(0, len(damaged) - 1), label="position")
        damaged[pos] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(1, len(damaged)), label="length")
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(damaged[:cut]))
    for metadata_only in (True, False):
        try:
            image, meta = read_dicom(path, metadata_only=metadata_only)
        except DicomReadError as err:
            assert "damaged.dcm" in str(err) and err.cause
            continue
        assert set(meta) == META_KEYS
        if not metadata_only:
            assert image.dtype == np.uint8 and image.ndim == 2


@pytest.mark.parametrize("limit", [100, 128 * 128 - 1])
def test_a_decompression_bomb_verdict_of_pillow_is_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         limit: int) -> None:
    """Pillow refuses an image above twice ``Image.MAX_IMAGE_PIXELS`` and warns above it (here made
    small, as a user may set it); either verdict stands: no other decoder (pylibjpeg would decode this
    file) gets a turn."""
    grey = blob_image(128, 128, (40, 30, 90, 100))
    path = make_dicom(tmp_path / "jpeg.dcm", grey, transfer_syntax=pydicom.uid.JPEGBaseline8Bit,
                      encapsulated=jpeg_bytes(grey))
    assert read_dicom(path)[0].shape == (128, 128)  # the control: within Pillow's limit it decodes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert_read_error(path, r"refused by the JPEG decoder as a decompression bomb .*decompression bomb")
