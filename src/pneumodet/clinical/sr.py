"""One image's prediction as DICOM objects a viewer and an archive understand: an SR and a presentation state.

For each predicted image pneumodet writes

* a **Comprehensive 3D SR** holding a TID 1500 *Measurement Report* (highdicom): the source image is
  referenced by its Study, Series and SOP Instance UIDs; each box is a planar ROI group (TID 1410): a
  closed SCOORD ``POLYLINE`` through its four corners in the source image's own pixels (the top left
  corner of the image is ``0, 0``, as for the submission's ``x, y``), the finding coded ``(233604007, SCT,
  "Pneumonia")`` at the finding site ``(39607008, SCT, "Lung")``, and its score as the measurement
  ``(111012, DCM, "Certainty of Finding")`` from 0 to 1 (unit ``(1, UCUM, "no units")``); the global
  head's image-class probabilities are one TID 1501 group per class, its finding a local code (scheme
  ``99PNEUMODET``: the RSNA classes are labels of that data set, not SNOMED concepts), measured as
  ``(122157, DCM, "Probability")``;
* a **Grayscale Softcopy Presentation State** drawing each box (a closed polyline) with its score, and a
  legend line with the class probabilities, on the graphic layer ``PNEUMODET``, so that a viewer shows
  them over the image (MONOCHROME1 sources keep their polarity: presentation LUT ``INVERSE``; the
  source's window or VOI LUT is carried over).

Both say they come from an algorithm, not a physician: a *device* observer named ``pneumodet`` (TID 1004),
the TID 4019 Algorithm Identification (name, version, checkpoint SHA-256, settings) on every finding, the
verification flag ``UNVERIFIED``, the preliminary flag ``PRELIMINARY``, and series and content descriptions
that say so. UIDs: :mod:`pneumodet.clinical.identity`.

Privacy: what is copied from the source header is an allow-list, never the header minus a block-list.
highdicom copies the patient and study modules of the dataset it is given, so it is only ever given
:func:`source_reference`'s dataset: the linkage (:data:`LINKAGE_ELEMENTS`: the PatientID and the Study
Instance UID; the Series and SOP Instance UIDs are in the references), the image description a
presentation state needs (:data:`IMAGE_ELEMENTS`, and the VOI / modality LUT data without their free-text
explanations) and the IOD's type 2 patient and study elements left *empty*. The patient's name, birth date
and sex and the study's date, time, accession number, ID and referring physician
(:data:`PATIENT_DETAIL_ELEMENTS`) are copied only with ``patient_details=True``
(``--dicom-patient-details``); nothing else ever is (addresses, institution, other IDs, comments, private
elements, ...).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumodet.clinical.identity import MANUFACTURER, AlgorithmIdentity, checkpoint_sha256, is_valid_uid
from pneumodet.data.records import CLASS_NAMES
from pneumodet.errors import PneumodetError
from pneumodet.inference import ImagePrediction, PredictionResult, overlay_filename, resolve_checkpoint
from pneumodet.safeio import atomic_path
from pneumodet.textsafe import display_path, display_text

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Copied from the source: what links a result to its patient and study (the Series and SOP Instance UIDs of
#: the image are in the references, :data:`IMAGE_ELEMENTS`).
LINKAGE_ELEMENTS = ("PatientID", "StudyInstanceUID")
#: Copied only when asked (``patient_details=True``), empty otherwise (type 2 in the SR and PR IODs). An
#: archive that checks new instances against the attributes of their study may want them.
PATIENT_DETAIL_ELEMENTS = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "AccessionNumber", "StudyID")
#: What the references and the presentation state need to know about the image itself.
IMAGE_ELEMENTS = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
                  "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                  "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "WindowCenter",
                  "WindowWidth", "VOILUTFunction", "RescaleSlope", "RescaleIntercept", "RescaleType",
                  "BodyPartExamined", "Laterality")
#: LUT sequences copied item by item with these elements only (their LUTExplanation is free text).
LUT_SEQUENCES = {"VOILUTSequence": ("LUTDescriptor", "LUTData"),
                 "ModalityLUTSequence": ("LUTDescriptor", "ModalityLUTType", "LUTData")}

#: The local coding scheme of the RSNA image classes.
LOCAL_SCHEME = "99PNEUMODET"
CLASS_CODE_VALUES = {"Normal": "RSNA-NORMAL", "No Lung Opacity / Not Normal": "RSNA-NOT-NORMAL",
                     "Lung Opacity": "RSNA-OPACITY"}
SR_SERIES_NUMBER = 9701
PR_SERIES_NUMBER = 9702
#: The graphic layer of the boxes, and the presentation state's content label (a DICOM code string).
GRAPHIC_LAYER = "PNEUMODET"
#: Said in every description (fits a 64-character LO with its prefix).
ALGORITHM_NOTE = "algorithm, not verified by a physician"
#: Elements larger than this are not read when the source header is read again (the pixels never are).
_HEADER_DEFER = "64 KB"


class SourceHeaderError(PneumodetError):
    """The source file's header cannot be referenced by an SR (a UID missing or malformed, a size that
    disagrees with the predicted image), or cannot have a grayscale presentation state."""


def _codes() -> dict[str, Any]:
    """The coded concepts: pydicom's dictionary where it has them (SNOMED CT 233604007 "Pneumonia" is not
    in it)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "finding": Code("233604007", "SCT", "Pneumonia"),
        "site": codes.SCT.Lung,  # 39607008
        "category": codes.SCT.MorphologicallyAbnormalStructure,  # 49755003
        "certainty": codes.DCM.CertaintyOfFinding,  # 111012
        "probability": codes.DCM.Probability,  # 122157
        "no_units": codes.UCUM.NoUnits,  # 1
        "procedure": codes.SCT.ChestImaging,  # 413815006
        "device": codes.DCM.Device,  # 121007: the observer is a device (an algorithm), not a person
        "classes": {name: Code(CLASS_CODE_VALUES[name], LOCAL_SCHEME, name) for name in CLASS_NAMES},
    }


# ---------------------------------------------------------------- the allow-listed source header
def source_reference(path: Path | str, *, patient_details: bool = False) -> Dataset:
    """The allow-listed copy of ``path``'s header the SR and PR are built from (see the module docstring).

    Raises:
        SourceHeaderError: the file cannot be read again, or lacks a UID or the image size an SR needs.
    """
    import pydicom
    from pydicom.dataset import Dataset

    try:
        source = pydicom.dcmread(path, stop_before_pixels=True, defer_size=_HEADER_DEFER)
    except Exception as exc:  # noqa: BLE001 - it was predicted: a file changed since is named, not raised
        raise SourceHeaderError(f"{display_path(path)}: cannot read its header again: {type(exc).__name__}: "
                                f"{display_text(str(exc))[:200]}") from None
    ref = Dataset()
    for keyword in LINKAGE_ELEMENTS + IMAGE_ELEMENTS + (PATIENT_DETAIL_ELEMENTS if patient_details else ()):
        if keyword in source and source[keyword].value is not None:
            ref.add(source[keyword])
    for keyword, allowed in LUT_SEQUENCES.items():
        items = [_lut_item(item, allowed, voi=keyword == "VOILUTSequence")
                 for item in (source.get(keyword) or [])]
        if items and all(item is not None for item in items):
            setattr(ref, keyword, items)
    for keyword in PATIENT_DETAIL_ELEMENTS + ("PatientID", "Modality"):
        if keyword not in ref:  # type 2 in the SR and PR IODs: present, empty (Modality: read by highdicom)
            setattr(ref, keyword, "")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ref.get(keyword, "") or "")
        if not is_valid_uid(value):
            what = "missing" if not value else f"not a UID ({display_text(value)[:70]!r})"
            raise SourceHeaderError(f"{display_path(path)}: its {keyword} is {what}; an SR cannot "
                                    "reference it")
    if not ref.get("Rows") or not ref.get("Columns"):
        raise SourceHeaderError(f"{display_path(path)}: its header has no Rows/Columns")
    _with_functional_groups(ref)
    return ref


def _with_functional_groups(ref: Dataset) -> None:
    """highdicom reads the rescale of an image of a multi-frame IOD from its functional groups, which a legacy
    multi-frame image (a multi-frame Secondary Capture) has not: give it its own rescale there (shared by
    every frame; the per-frame groups empty)."""
    from highdicom.utils import is_multiframe_image
    from pydicom.dataset import Dataset

    if not is_multiframe_image(ref) or "SharedFunctionalGroupsSequence" in ref:
        return
    group = Dataset()
    if "RescaleSlope" in ref and "RescaleIntercept" in ref:
        transformation = Dataset()
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ref:
                transformation.add(ref[keyword])
        group.PixelValueTransformationSequence = [transformation]
    ref.SharedFunctionalGroupsSequence = [group]
    ref.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(int(ref.get("NumberOfFrames", 1) or 1))]


def _lut_item(item: Dataset, allowed: tuple[str, ...], *, voi: bool) -> Dataset | None:
    """A LUT item with the ``allowed`` elements only and its LUT Data as bytes of 8 or 16 bits an entry (how
    highdicom reads them); ``None`` when the data do not fit their descriptor.

    A VOI LUT of 10 to 15 bits an entry (allowed in an image) is scaled to 16 bits, the only wide entries a
    softcopy VOI LUT may have: the same curve relative to its output range, so the same picture.
    """
    from pydicom.dataset import Dataset

    copy = Dataset()
    for element in allowed:
        if element in item:
            copy.add(item[element])
    if "LUTData" not in copy or "LUTDescriptor" not in copy:
        return None
    bits = int(copy.LUTDescriptor[2])
    if isinstance(copy.LUTData, bytes):
        entries = np.frombuffer(copy.LUTData, np.uint8 if bits <= 8 else "<u2").astype(np.int64)
    else:  # read as US: a list of entries
        entries = np.atleast_1d(np.asarray(copy.LUTData, dtype=np.int64))
    if not 1 <= bits <= 16 or entries.min(initial=0) < 0 or entries.max(initial=0) >= 1 << bits:
        return None  # a viewer would misread it: the presentation state goes without it
    if voi and 8 < bits < 16:
        entries = (entries * 65535 + ((1 << bits) - 1) // 2) // ((1 << bits) - 1)
        copy.LUTDescriptor = [copy.LUTDescriptor[0], copy.LUTDescriptor[1], 16]
    copy.add_new(0x00283006, "OW", entries.astype(np.uint8 if bits <= 8 else "<u2").tobytes())
    return copy


# ---------------------------------------------------------------- the objects
def _result_digest(prediction: ImagePrediction) -> str:
    """A digest of the predicted values (what makes two results different), for the instance UIDs."""
    digest = hashlib.sha256(np.round(np.asarray(prediction.boxes, np.float64), 4).tobytes())
    digest.update(np.round(np.asarray(prediction.class_probs, np.float64), 6).tobytes())
    return digest.hexdigest()


def box_corners(x: float, y: float, w: float, h: float) -> np.ndarray:
    """A box's closed outline, ``[5, 2]`` (column, row): from the top left corner clockwise and back."""
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float64)


def _frames(ref: Dataset) -> list[int] | None:
    """Frame 1 (the one pneumodet predicts on) of an image of a multi-frame IOD; ``None`` for any other image,
    even one whose header declares several frames (an image of a single-frame IOD is referenced whole)."""
    from highdicom.utils import is_multiframe_image

    return [1] if is_multiframe_image(ref) else None


def _check_size(prediction: ImagePrediction, ref: Dataset) -> None:
    height, width = prediction.original_size
    if (int(ref.Rows), int(ref.Columns)) != (height, width):
        raise SourceHeaderError(f"{display_path(prediction.source)}: its header says {ref.Rows} x "
                                f"{ref.Columns} pixels but the image predicted was {height} x {width}; the "
                                "boxes cannot be placed")


def _now() -> tuple[datetime.date, datetime.time]:
    now = datetime.datetime.now()
    return now.date(), now.time().replace(microsecond=0)


def build_report(prediction: ImagePrediction, ref: Dataset, identity: AlgorithmIdentity, *,
                 instance_number: int = 1) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) of one image's prediction; ``ref`` from :func:`source_reference`."""
    import highdicom as hd

    _check_size(prediction, ref)
    c = _codes()
    algorithm = hd.sr.AlgorithmIdentification(name=identity.name, version=identity.version,
                                              parameters=identity.parameters, manufacturer=MANUFACTURER)
    sop = str(ref.SOPInstanceUID)
    groups: list[Any] = []
    region_source = hd.sr.SourceImageForRegion.from_source_image(ref, referenced_frame_numbers=_frames(ref))
    for number, (score, x, y, w, h) in enumerate(prediction.boxes.tolist(), 1):
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                   graphic_data=box_corners(x, y, w, h), source_image=region_source)
        # the algorithm is named once per group (TID 1410's own TID 4019), not again in each measurement
        certainty = hd.sr.Measurement(name=c["certainty"], value=round(float(score), 6), unit=c["no_units"])
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("box", sop, str(number)),
                                                         identifier=f"pneumodet box {number}"),
            referenced_region=region, finding_type=c["finding"], finding_category=c["category"],
            finding_sites=[hd.sr.FindingSite(c["site"])], algorithm_id=algorithm, measurements=[certainty]))
    group_source = hd.sr.SourceImageForMeasurementGroup.from_source_image(
        ref, referenced_frame_numbers=_frames(ref))
    for name, probability in zip(CLASS_NAMES, prediction.class_probs.tolist(), strict=True):
        measured = hd.sr.Measurement(name=c["probability"], value=round(float(probability), 6),
                                     unit=c["no_units"])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("class", sop, name),
                                                         identifier=f"pneumodet image class {name}"),
            finding_type=c["classes"][name], algorithm_id=algorithm, source_images=[group_source],
            measurements=[measured]))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid, name=identity.name, manufacturer_name=MANUFACTURER,
        model_name=f"{identity.name} {identity.version}", serial_number=identity.checkpoint_sha256[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=c["device"], observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=c["procedure"],
                                     imaging_measurements=groups)
    day, time = _now()
    return hd.sr.Comprehensive3DSR(
        evidence=[ref], content=report[0], series_number=SR_SERIES_NUMBER, instance_number=instance_number,
        series_instance_uid=identity.uid("sr-series", str(ref.StudyInstanceUID)),
        sop_instance_uid=identity.uid("sr", sop, _result_digest(prediction)),
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=f"pneumodet findings: {ALGORITHM_NOTE}",
        manufacturer_model_name=identity.name, software_versions=identity.version,
        device_serial_number=identity.checkpoint_sha256[:64], content_date=day, content_time=time,
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="pneumodet image classes (RSNA Pneumonia Detection Challenge)",
            responsible_organization="pneumodet")],
    )


def build_presentation_state(prediction: ImagePrediction, ref: Dataset, identity: AlgorithmIdentity, *,
                             instance_number: int = 1) -> Dataset:
    """The Grayscale Softcopy Presentation State drawing one image's boxes, scores and class probabilities.

    Raises:
        SourceHeaderError: the source is not a grey (MONOCHROME1/2) image, which a grayscale state cannot
            be applied to.
    """
    import highdicom as hd

    _check_size(prediction, ref)
    photometric = str(ref.get("PhotometricInterpretation", ""))
    if int(ref.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        kind = display_text(photometric) or "colour"
        raise SourceHeaderError(f"{display_path(prediction.source)}: a {kind} image; a grayscale "
                                "presentation state applies to MONOCHROME1/2 images only")
    rows, cols = int(ref.Rows), int(ref.Columns)
    text_h = max(8.0, rows / 40)  # a line of text about 1/40 of the image high
    pixel = hd.pr.AnnotationUnitsValues.PIXEL

    def text_object(left: float, top: float, text: str) -> Any:
        left, top = min(max(0.0, left), cols - 1.0), min(max(0.0, top), rows - 1.0)
        box = (left, top, min(float(cols), left + 0.6 * text_h * len(text)), min(float(rows), top + text_h))
        return hd.pr.TextObject(text_value=text, units=pixel, bounding_box=box,
                                text_justification=hd.pr.TextJustificationValues.LEFT)

    graphics, texts = [], []
    for score, x, y, w, h in prediction.boxes.tolist():
        graphics.append(hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                            graphic_data=box_corners(x, y, w, h), units=pixel))
        texts.append(text_object(x, y - text_h if y >= text_h else y, f"{score:.2f}"))  # above the box
    probabilities = zip(CLASS_NAMES, prediction.class_probs.tolist(), strict=True)
    texts.append(text_object(cols / 100, rows / 100, "pneumodet (algorithm, unverified): "
                             + ", ".join(f"{name} {p:.2f}" for name, p in probabilities)))
    layer = hd.pr.GraphicLayer(GRAPHIC_LAYER, order=1, description=f"boxes and scores: {ALGORITHM_NOTE}",
                               display_color=hd.color.CIELabColor.from_rgb(255, 40, 40))
    annotation = hd.pr.GraphicAnnotation(referenced_images=[ref], graphic_layer=layer,
                                         referenced_frame_number=_frames(ref),
                                         graphic_objects=graphics or None, text_objects=texts)
    shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"  # shown as the modality shows it
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ref], series_number=PR_SERIES_NUMBER, instance_number=instance_number,
        series_instance_uid=identity.uid("pr-series", str(ref.StudyInstanceUID)),
        sop_instance_uid=identity.uid("pr", str(ref.SOPInstanceUID), _result_digest(prediction)),
        manufacturer=MANUFACTURER, manufacturer_model_name=identity.name, software_versions=identity.version,
        device_serial_number=identity.checkpoint_sha256[:64], content_label=GRAPHIC_LAYER,
        content_description=f"pneumodet boxes: {ALGORITHM_NOTE}", graphic_annotations=[annotation],
        graphic_layers=[layer], series_description=f"pneumodet boxes: {ALGORITHM_NOTE}",
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues(shape)),
    )
    # The General Series module's Laterality is required for a paired body part: say which part this is (a
    # chest radiograph unless the source says otherwise) and carry the source's laterality when it has one.
    state.BodyPartExamined = ref.get("BodyPartExamined") or "CHEST"
    if ref.get("Laterality"):
        state.Laterality = ref.Laterality
    return state


# ---------------------------------------------------------------- per image, and predict --dicom-out
@dataclass
class ImageObjects:
    """One image's SR and presentation state (``presentation`` is ``None`` when it cannot have one; ``note``
    says why)."""

    prediction: ImagePrediction
    report: Dataset
    presentation: Dataset | None = None
    note: str | None = None

    @property
    def datasets(self) -> list[Dataset]:
        return [self.report] + ([self.presentation] if self.presentation is not None else [])

    @property
    def study_instance_uid(self) -> str:
        return str(self.report.StudyInstanceUID)


def image_objects(prediction: ImagePrediction, identity: AlgorithmIdentity, *, patient_details: bool = False,
                  instance_number: int = 1) -> ImageObjects:
    """The SR and presentation state of one predicted image (read from ``prediction.source``'s header).

    Raises:
        SourceHeaderError: no SR can reference this image (see :func:`source_reference`).
    """
    ref = source_reference(prediction.source, patient_details=patient_details)
    objects = ImageObjects(prediction, _built(build_report, prediction, ref, identity, instance_number, "SR"))
    try:
        objects.presentation = _built(build_presentation_state, prediction, ref, identity, instance_number,
                                      "presentation state")
    except SourceHeaderError as exc:
        objects.note = f"no presentation state: {exc}"
    return objects


def _built(build: Any, prediction: ImagePrediction, ref: Dataset, identity: AlgorithmIdentity,
           instance_number: int, what: str) -> Dataset:
    """``build(...)``; highdicom refuses an unusual header in many ways (ValueError, TypeError,
    AttributeError, ...): that image gets no such object, named with the cause, and the others go on."""
    try:
        return build(prediction, ref, identity, instance_number=instance_number)
    except SourceHeaderError:
        raise
    except Exception as exc:  # noqa: BLE001 - one odd header must not end a run of many images
        raise SourceHeaderError(f"{display_path(prediction.source)}: no {what} can be built from its header "
                                f"({type(exc).__name__}: {display_text(str(exc))[:200]})") from None


def identity_for(result: PredictionResult, checkpoint_hash: str, *,
                 uid_root: str | None = None) -> AlgorithmIdentity:
    """The algorithm identity of ``result``, predicted with the checkpoint of SHA-256 ``checkpoint_hash``."""
    return AlgorithmIdentity.for_prediction(checkpoint_hash, threshold=result.threshold, tta=result.tta,
                                            gate=result.gate, precision=result.precision, uid_root=uid_root)


def iter_image_objects(result: PredictionResult, identity: AlgorithmIdentity, *, patient_details: bool = False
                       ) -> Iterator[ImageObjects | tuple[ImagePrediction, str]]:
    """Each predicted image's objects, in file order, or ``(prediction, cause)`` when it can have none."""
    numbers: dict[str, int] = {}
    for prediction in result.predictions.values():
        study = prediction.study_instance_uid or ""
        numbers[study] = numbers.get(study, 0) + 1
        try:
            yield image_objects(prediction, identity, patient_details=patient_details,
                                instance_number=numbers[study])
        except SourceHeaderError as exc:
            yield prediction, str(exc)


def dicom_filenames(prediction: ImagePrediction) -> tuple[str, str]:
    """The SR's and the presentation state's file names: the overlay's name (the patient id, sanitised, and a
    hash of the SOP Instance UID) with ``_sr.dcm`` / ``_pr.dcm``."""
    stem = Path(overlay_filename(prediction)).stem
    return f"{stem}_sr.dcm", f"{stem}_pr.dcm"


def save_dataset(dataset: Dataset, path: Path) -> Path:
    """Write a DICOM file (with its file meta header) atomically."""
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


@dataclass
class DicomOutSummary:
    """What ``predict --dicom-out`` wrote: per image its SR and PR files, and the images that got none."""

    out_dir: Path
    written: list[tuple[ImagePrediction, Path, Path | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_written: list[tuple[ImagePrediction, str]] = field(default_factory=list)

    def summary(self) -> str:
        states = sum(1 for _, _, pr in self.written if pr is not None)
        lines = [f"wrote {len(self.written)} DICOM SR and {states} presentation state(s) to "
                 f"{display_path(self.out_dir)}"
                 + (f"; {len(self.not_written)} image(s) without" if self.not_written else "")]
        lines += [f"  no SR for {display_path(p.source)}: {display_text(cause)}"
                  for p, cause in self.not_written]
        lines += [f"  {display_text(note)}" for note in self.notes]
        return "\n".join(lines)


def write_dicom_results(result: PredictionResult, out_dir: Path | str, model_source: Path | str, *,
                        patient_details: bool = False, uid_root: str | None = None) -> DicomOutSummary:
    """Write every predicted image's SR and presentation state into ``out_dir`` (``predict --dicom-out``).

    An image no SR can reference is listed in the summary, never fatal; when no image at all gets an SR,
    :class:`PneumodetError` (DICOM was asked for and none would come).
    """
    out = Path(out_dir)
    identity = identity_for(result, checkpoint_sha256(resolve_checkpoint(model_source)), uid_root=uid_root)
    summary = DicomOutSummary(out)
    for item in iter_image_objects(result, identity, patient_details=patient_details):
        if isinstance(item, tuple):
            summary.not_written.append(item)
            continue
        sr_name, pr_name = dicom_filenames(item.prediction)
        sr_path = save_dataset(item.report, out / sr_name)
        pr_path = save_dataset(item.presentation, out / pr_name) if item.presentation is not None else None
        if item.note:
            summary.notes.append(item.note)
        summary.written.append((item.prediction, sr_path, pr_path))
    if not summary.written:
        causes = "; ".join(display_text(cause) for _, cause in summary.not_written[:3])
        raise PneumodetError(f"--dicom-out: no image could get a DICOM SR ({len(summary.not_written)} of "
                             f"{len(result.predictions)}: {causes}); the submission was written")
    return summary
