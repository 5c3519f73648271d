"""DICOM results: ``predict --dicom-out`` writes a TID 1500 SR and a GSPS per image (pneumodet.clinical.sr).

Every written object is validated with dciodvfy (dicom3tools) and read back with pydicom alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from _dicom_results import (
    TINY_THRESHOLD,
    all_values,
    dciodvfy_errors,
    pr_content,
    referenced_image,
    sr_content,
    tiny_checkpoint,
)
from _helpers import assert_one_line_error, assert_same_detections, kaggle_to_xyxy
from badinputs import PHI, add_identifying_data, blob_image, dicom_cases, find_identifying, make_dicom
from pneumodet.cli import main
from pneumodet.clinical.identity import MIN_UID_DIGITS, check_uid_root, derive_uid, is_valid_uid
from pneumodet.submission import read_submission


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model.pt")


def _results(folder: Path) -> dict[str, dict[str, pydicom.Dataset]]:
    """``{source SOP Instance UID: {"SR": dataset, "PR": dataset}}`` of the files in ``folder``."""
    out: dict[str, dict[str, pydicom.Dataset]] = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        sop = referenced_image(ds)
        assert ds.Modality not in out.setdefault(sop, {}), f"two {ds.Modality} for {sop}"
        out[sop][ds.Modality] = ds
    return out


def _with_uids(path: Path) -> Path:
    """The generated test file with Study and Series Instance UIDs (the bad-input corpus has none)."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(path)
    return path


def test_predict_dicom_out_writes_a_valid_sr_and_pr_per_image_matching_the_submission(
        tiny_model, real_sample, tmp_path, capsys):
    images = real_sample / "stage_2_train_images"
    out, sub, js = tmp_path / "dicom", tmp_path / "sub.csv", tmp_path / "pred.json"
    code = main(["predict", str(tiny_model), str(images), "--out", str(sub), "--json", str(js),
                 "--dicom-out", str(out), "--threshold", TINY_THRESHOLD, "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote 16 DICOM SR and 16 presentation state(s) to {out}" in printed
    assert len(list(out.glob("*.dcm"))) == 32
    for path in sorted(out.glob("*.dcm")):
        assert dciodvfy_errors(path) == [], path.name

    results = _results(out)
    submission = read_submission(sub)
    predictions = {image["sopInstanceUID"]: image for image in json.loads(js.read_text())["images"]}
    checkpoint_hash = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert set(results) == set(predictions) and len(results) == 16
    boxes_seen = 0
    for path in sorted(images.glob("*.dcm")):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        sr, pr = results[source.SOPInstanceUID]["SR"], results[source.SOPInstanceUID]["PR"]
        content = sr_content(sr)
        # linked to the source image, in its study
        assert sr.StudyInstanceUID == pr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.PatientID == pr.PatientID == source.PatientID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert pr.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        # the boxes in the source's own pixels: the submission's (0.1 px, 4 decimals of score) to 0.5 px
        want = submission[source.PatientID]
        assert_same_detections(*kaggle_to_xyxy(content["boxes"]), *kaggle_to_xyxy(want), box_atol=0.5,
                               score_atol=1e-4, cut=False)
        drawn = pr_content(pr)
        np.testing.assert_allclose(drawn["boxes"], content["boxes"][:, 1:], atol=1e-3)
        assert len(drawn["texts"]) == len(content["boxes"]) + 1 and "algorithm" in drawn["texts"][-1]
        boxes_seen += len(content["boxes"])
        want_probs = predictions[source.SOPInstanceUID]["class_probs"]
        assert content["probabilities"] == pytest.approx(want_probs, abs=1e-5)
        # made by an algorithm, not a person, and said so
        assert content["observer"] == ("121007", "DCM")  # Device
        assert content["algorithm"]["name"] == "pneumodet"
        assert f"model checkpoint SHA-256={checkpoint_hash}" in content["algorithm"]["parameters"]
        assert f"threshold={float(TINY_THRESHOLD):.4f}" in content["algorithm"]["parameters"]
        assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE",
                                                                                  "PRELIMINARY")
        assert "not verified by a physician" in sr.SeriesDescription
        assert "not verified by a physician" in pr.SeriesDescription
        assert pr.PresentationLUTShape == "IDENTITY"
        assert pr.GraphicLayerSequence[0].GraphicLayer == "PNEUMODET"
    assert boxes_seen > 0  # some images have boxes, some none: both shapes of report are checked


@pytest.mark.filterwarnings("ignore:.*only the first is used")
def test_every_pixel_format_gets_a_valid_sr_and_a_fitting_presentation_state(tiny_model, tmp_path, capsys):
    cases = {name: _with_uids(path) for name, path in dicom_cases(tmp_path / "in").items()}
    cases.pop("huge_4096px").unlink()  # decoding it takes long and adds no case here
    cases["multi_frame_iod"] = _with_uids(make_dicom(  # a Multi-frame Grayscale Byte Secondary Capture image
        tmp_path / "in" / "mf.dcm", blob_image(64, 64, (8, 8, 40, 40)), frames=3,
        tags={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.2"}))
    out = tmp_path / "dicom"
    code = main(["predict", str(tiny_model), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                 "--dicom-out", str(out), "--threshold", "0.0", "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0
    grey = len(cases) - 2  # RGB and palette colour images get an SR but no (grayscale) presentation state
    assert f"wrote {len(cases)} DICOM SR and {grey} presentation state(s)" in printed
    assert printed.count("no presentation state:") == 2
    assert "a RGB image" in printed and "a PALETTE COLOR image" in printed
    for path in sorted(out.glob("*.dcm")):
        assert dciodvfy_errors(path) == [], path.name
    results = _results(out)
    by_case = {name: results[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
               for name, path in cases.items()}
    for name, found in by_case.items():
        content = sr_content(found["SR"])
        source = pydicom.dcmread(cases[name], stop_before_pixels=True)
        assert len(content["boxes"]) > 0, name  # threshold 0: every image has boxes
        assert (content["boxes"][:, [1, 2]] >= 0).all() and (content["boxes"][:, 1] + content["boxes"][:, 3]
                                                              <= source.Columns + 1e-3).all(), name
        assert ("PR" in found) == (name not in ("rgb", "palette_colour")), name
    assert by_case["monochrome1"]["PR"].PresentationLUTShape == "INVERSE"  # shown as the modality shows it
    assert by_case["monochrome2_8bit"]["PR"].PresentationLUTShape == "IDENTITY"
    window = by_case["12bit_window"]["PR"].SoftcopyVOILUTSequence[0]
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (2050.0, 3900.0)
    assert "VOILUTSequence" in by_case["16bit_voi_lut"]["PR"].SoftcopyVOILUTSequence[0]
    # an image of a multi-frame IOD is referenced by the frame predicted, the first; a Secondary Capture (a
    # single-frame IOD) whose header declares 3 frames can only be referenced whole
    for name, frame in (("multi_frame_iod", 1), ("multi_frame", None)):
        pr_image = by_case[name]["PR"].GraphicAnnotationSequence[0].ReferencedImageSequence[0]
        first_group = by_case[name]["SR"].ContentSequence[-1].ContentSequence[0].ContentSequence
        scoord = next(item for item in first_group if item.ValueType == "SCOORD")
        sr_image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert pr_image.get("ReferencedFrameNumber") == sr_image.get("ReferencedFrameNumber") == frame
    assert by_case["missing_tags"]["SR"].PatientID == ""  # no PatientID in the source: none invented
    non_square = pydicom.dcmread(cases["non_square"], stop_before_pixels=True)
    assert by_case["non_square"]["SR"].StudyInstanceUID == non_square.StudyInstanceUID


def test_sr_and_pr_carry_nothing_identifying_beyond_the_linkage(tiny_model, tmp_path, capsys):
    source = make_dicom(tmp_path / "in" / "p1.dcm", blob_image(96, 128, (20, 20, 60, 70)))
    source = add_identifying_data(_with_uids(source))
    original = pydicom.dcmread(source, stop_before_pixels=True)
    allowed_detail = {PHI["PatientName"], PHI["PatientBirthDate"], PHI["ReferringPhysicianName"],
                      PHI["AccessionNumber"], original.StudyDate, original.StudyTime, original.StudyID}
    allowed_detail |= {v.replace("^", " ") for v in allowed_detail}
    for flag, allowed in (([], set()), (["--dicom-patient-details"], allowed_detail)):
        out = tmp_path / f"dicom{len(flag)}"
        assert main(["predict", str(tiny_model), str(source), "--out", str(tmp_path / "s.csv"),
                     "--dicom-out", str(out), "--threshold", "0.0", *flag]) == 0
        capsys.readouterr()
        written = sorted(out.glob("*.dcm"))
        assert len(written) == 2
        for path in written:
            assert set(find_identifying(path.read_bytes())) <= allowed, (path.name, flag)
            ds = pydicom.dcmread(path)
            assert not any(elem.tag.is_private for elem in ds.iterall()), path.name
            values = dict(all_values(ds))
            assert values["PatientID"] == original.PatientID  # the linkage
            assert str(ds.StudyInstanceUID) == original.StudyInstanceUID
            for keyword in ("InstitutionName", "InstitutionAddress", "PatientAddress", "OtherPatientIDs",
                            "PatientComments", "StationName"):
                assert keyword not in values, (keyword, path.name)
            if not flag:  # the type 2 patient and study elements are there, empty
                empty = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber",
                         "StudyID", "ReferringPhysicianName")
                assert [str(ds.get(keyword)) for keyword in empty] == [""] * len(empty)
            else:
                assert str(ds.PatientName) == PHI["PatientName"]
                assert ds.AccessionNumber == PHI["AccessionNumber"]
        if flag:
            assert find_identifying(written[0].read_bytes()), "the details asked for are copied"


def test_an_image_no_sr_can_reference_is_named_and_the_others_written(tiny_model, tmp_path, capsys):
    good = _with_uids(make_dicom(tmp_path / "in" / "good.dcm", blob_image(64, 64, (10, 10, 40, 40))))
    bare = make_dicom(tmp_path / "in" / "bare.dcm", blob_image(64, 64, (10, 10, 40, 40)))  # no Study UID
    out = tmp_path / "dicom"
    code = main(["predict", str(tiny_model), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                 "--dicom-out", str(out), "--threshold", "0.5"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "wrote 1 DICOM SR and 1 presentation state(s)" in printed and "1 image(s) without" in printed
    assert f"no SR for {bare}: {bare}: its StudyInstanceUID is missing; an SR cannot reference it" in printed
    assert len(list(out.glob("*.dcm"))) == 2 and good.exists()

    sub = tmp_path / "s2.csv"
    code = main(["predict", str(tiny_model), str(bare), "--out", str(sub), "--dicom-out",
                 str(tmp_path / "none"), "--threshold", "0.5"])
    err = capsys.readouterr().err
    line = assert_one_line_error(code, err, "predict")  # beside predict's own progress line
    assert line.startswith("pneumodet predict: error: --dicom-out: no image could get a DICOM SR (1 of 1:")
    assert sub.exists() and not list((tmp_path / "none").glob("*.dcm"))  # the submission, no DICOM


def test_uids_follow_the_result_and_the_chosen_root(tiny_model, tmp_path, capsys):
    make_dicom(tmp_path / "in" / "p1.dcm", blob_image(64, 64, (10, 10, 40, 40)))
    _with_uids(tmp_path / "in" / "p1.dcm")

    def uids(*extra: str) -> dict[str, str]:
        out = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        assert main(["predict", str(tiny_model), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                     "--dicom-out", str(out), "--precision", "fp32", *extra]) == 0
        capsys.readouterr()
        found = {}
        for path in out.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            found[ds.Modality] = ds.SOPInstanceUID
            found[ds.Modality + " series"] = ds.SeriesInstanceUID
        return found

    first, again, other = uids("--threshold", "0.3"), uids("--threshold", "0.3"), uids("--threshold", "0.9")
    assert first == again  # the same result of the same model: the same UIDs (a rerun stores nothing twice)
    assert first["SR"] != other["SR"] and first["PR"] != other["PR"]
    assert all(uid.startswith("2.25.") and is_valid_uid(uid) for uid in first.values())
    root = "1.2.826.0.1.3680043.10.999"
    rooted = uids("--threshold", "0.3", "--uid-root", root)
    assert all(uid.startswith(root + ".") and len(uid) <= 64 and is_valid_uid(uid) for uid in rooted.values())

    for bad in ("1.02.3", "1.2.x", "1." + "2." * 22):
        code = main(["predict", str(tiny_model), str(tmp_path / "in"), "--out", str(tmp_path / "s.csv"),
                     "--dicom-out", str(tmp_path / "bad"), "--uid-root", bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "UID root" in err, err
        assert not (tmp_path / "bad").exists()


def test_derived_uids_are_valid_unique_and_bounded():
    seen = {derive_uid(("sr", str(i))) for i in range(2000)}
    assert len(seen) == 2000 and all(is_valid_uid(u) for u in seen)
    root = check_uid_root("1." + "23." * 14)  # 43 characters with the dot: 21 digits left
    assert len(root) <= 64 - MIN_UID_DIGITS
    assert all(is_valid_uid(derive_uid(("x", str(i)), root)) and len(derive_uid(("x", str(i)), root)) == 64
               for i in range(200))
    assert derive_uid(("a", "bc")) != derive_uid(("ab", "c"))
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", derive_uid(("a",)))
