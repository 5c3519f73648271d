"""A synthetic RSNA-format dataset: chest-film-like images, lung opacities with boxes, the Kaggle layout.

``make_synthetic_dataset`` writes exactly what the Kaggle download holds::

    out_dir/stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box)
    out_dir/stage_2_detailed_class_info.csv   patientId,class (same row order)
    out_dir/stage_2_train_images/<id>.dcm     JPEG Baseline, 8-bit MONOCHROME2, the RSNA tags
    out_dir/stage_2_test_images/<id>.dcm      the same for the test patients, whose labels are not given
    out_dir/stage_2_sample_submission.csv     patientId,PredictionString: one row per test patient, Kaggle's
                                              dummy "0.5 0 0 100 100", sorted by patientId, CRLF line ends

Class shares, boxes per patient and box sizes/positions follow the real labels (constants below).
Images are drawn with vectorised numpy: body outline, two dark lung fields, spine and mediastinum,
heart, ribs, clavicles, lung texture, film noise; AP films show a smaller, magnified patient and an
"AP" marker. "Lung Opacity" patients get 1-4 soft, patchy bright opacities confined to the lung fields
and their boxes are the opacities' visible extent; "No Lung Opacity / Not Normal" patients get a
finding outside the box criteria (a line or tube, a small nodule, cardiomegaly).

The same seed gives byte-identical CSVs and pixel-identical images.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid
from scipy import ndimage

from pneumodet.data.records import CLASS_NAMES
from pneumodet.errors import ConfigError
from pneumodet.progress import track
from pneumodet.safeio import atomic_open, atomic_path

__all__ = ["SynthSummary", "SyntheticChest", "PatientSpec", "make_synthetic_dataset", "sample_patients",
           "render_chest", "LABELS_FILE", "CLASSES_FILE", "IMAGES_DIR", "TEST_IMAGES_DIR", "SUBMISSION_FILE"]

LABELS_FILE = "stage_2_train_labels.csv"
CLASSES_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
TEST_IMAGES_DIR = "stage_2_test_images"
SUBMISSION_FILE = "stage_2_sample_submission.csv"
#: Kaggle's stage-2 test patients per training patient (3000 / 26684): the default test set's size.
TEST_SHARE = 3000 / 26684
#: The prediction string of every row of Kaggle's sample submission.
SAMPLE_PREDICTION = "0.5 0 0 100 100"
NORMAL, OPACITY, NOT_NORMAL = CLASS_NAMES

# Measured from stage_2_train_labels.csv / stage_2_detailed_class_info.csv (30227 rows, 26684 patients).
#: Share of patients per class.
CLASS_SHARES: dict[str, float] = {NOT_NORMAL: 0.4430, NORMAL: 0.3317, OPACITY: 0.2253}
#: Share of Lung Opacity patients with 1, 2, 3, 4 boxes.
BOXES_PER_PATIENT: dict[int, float] = {1: 0.4348, 2: 0.5432, 3: 0.0198, 4: 0.0022}
#: Share of boxes on the image's left half (the patient's right lung).
BOX_LEFT_SHARE = 0.535
#: Share of 2+-box patients whose boxes are in both lungs.
BOX_BILATERAL_SHARE = 0.98
#: Box centre x as a fraction of the image width, per image half: mean, std.
BOX_CX = {"left": (0.313, 0.059), "right": (0.697, 0.059)}
#: Box centre y as a fraction of the image height: mean, std.
BOX_CY = (0.519, 0.112)
#: log(width / image side) and log(height / image side): means, stds and their correlation.
BOX_LOG_W = (-1.585, 0.291)
BOX_LOG_H = (-1.258, 0.514)
BOX_LOG_WH_CORR = 0.611
#: Largest box width and height (fractions of the image side).
BOX_MAX_W, BOX_MAX_H = 0.516, 0.920

# Not in the labels CSV (they come from DICOM headers); chosen by hand to resemble RSNA's mix:
# AP (bedside) films are more common among patients with opacities.
AP_SHARE = {NORMAL: 0.30, OPACITY: 0.65, NOT_NORMAL: 0.50}
MALE_SHARE = 0.57
AGE_MEAN_SD = (47.0, 16.5)
NOT_NORMAL_FINDINGS = ("line", "nodule", "cardiomegaly")

#: Pixel spacing (mm) of a 1024-pixel RSNA film; a smaller synthetic image covers the same body.
RSNA_PIXEL_SPACING_MM = 0.143
#: Smallest image side: below it ribs and small opacities are no longer drawable.
MIN_SIZE = 64
#: A pixel (in the lung field) belongs to an opacity's visible extent when the opacity reaches this
#: fraction of its peak; the box is that extent.
VISIBLE_FRACTION = 0.25


@dataclass(frozen=True)
class PatientSpec:
    """What one synthetic patient will show: identity, class and the drawing's random seed."""

    patient_id: str
    label_class: str
    view: str  # "AP" or "PA"
    sex: str
    age: int
    n_boxes: int
    finding: str | None  # for "No Lung Opacity / Not Normal"
    seed: int


@dataclass
class SyntheticChest:
    """One drawn film.

    ``image``: uint8 ``[S, S]``; ``lung_field``: bool ``[S, S]``, the dark lung areas where opacities may
    lie (heart and mediastinum excluded); ``opacity``: float32 ``[S, S]``, the added opacity signal
    (0 elsewhere); ``boxes``: float ``[N, 4]`` xyxy, inclusive pixel extents, one per opacity.
    """

    image: np.ndarray
    lung_field: np.ndarray
    opacity: np.ndarray
    boxes: np.ndarray


@dataclass
class SynthSummary:
    """What :func:`make_synthetic_dataset` wrote."""

    out_dir: Path
    size: int
    seed: int
    class_counts: dict[str, int]
    view_counts: dict[str, int]
    boxes: int
    files: int
    label_rows: int
    findings: dict[str, int] = field(default_factory=dict)
    #: unlabelled test DICOMs (and rows of the sample submission)
    test_files: int = 0

    @property
    def patients(self) -> int:
        return sum(self.class_counts.values())

    def __str__(self) -> str:
        classes = ", ".join(f"{name}: {self.class_counts.get(name, 0)}" for name in CLASS_NAMES)
        views = ", ".join(f"{v}: {n}" for v, n in sorted(self.view_counts.items()))
        findings = ", ".join(f"{k}: {n}" for k, n in sorted(self.findings.items())) or "none"
        return "\n".join([
            f"synthetic RSNA dataset in {self.out_dir} ({self.size}x{self.size} px, seed {self.seed})",
            f"  {self.patients} patients ({classes})",
            f"  {self.boxes} boxes, {self.label_rows} label rows, {self.files} DICOM files",
            f"  views: {views}; Not Normal findings: {findings}",
        ] + ([f"  {self.test_files} unlabelled test DICOMs in {TEST_IMAGES_DIR}/, listed in {SUBMISSION_FILE}"]
             if self.test_files else []))


# ---------------------------------------------------------------------------------------------- dataset
def make_synthetic_dataset(out_dir: Path, *, patients: int, size: int = 1024, seed: int = 0,
                           progress: bool | str = False, overwrite: bool = False,
                           test_patients: int | None = None) -> SynthSummary:
    """Write a synthetic dataset in the Kaggle layout; returns what was written.

    Args:
        out_dir: created if needed. A folder that already holds a dataset (a labels CSV, or DICOMs of
            other patients) is refused unless ``overwrite``; DICOMs of this very dataset (an interrupted
            run with the same seed) are simply rewritten.
        patients: number of patients (one image each).
        size: image side in pixels; boxes are in this image's pixels.
        seed: same seed, same CSVs byte for byte and the same pixels.
        progress: ``True``: a bar on a terminal, a plain line every 30 s otherwise; ``False``: nothing
            (see :func:`pneumodet.progress.progress_style`).
        overwrite: replace an existing dataset in ``out_dir`` (its CSVs and all its DICOMs).
        test_patients: unlabelled patients written to ``stage_2_test_images/`` and listed in the sample
            submission, as Kaggle's test set; ``None``: :data:`TEST_SHARE` of ``patients`` (at least 1); 0: none.
            They are drawn from a stream of their own: the training files are the same whatever their number.

    Raises:
        ConfigError: ``patients < 1``, ``test_patients < 0``, ``size`` below :data:`MIN_SIZE`, or ``out_dir``
            holds another dataset and ``overwrite`` is false.
    """
    if patients < 1:
        raise ConfigError(f"patients must be >= 1, got {patients}")
    if test_patients is not None and test_patients < 0:
        raise ConfigError(f"test patients must be >= 0, got {test_patients}")
    n_test = max(1, round(patients * TEST_SHARE)) if test_patients is None else test_patients
    if size < MIN_SIZE:
        raise ConfigError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    specs = sample_patients(patients, seed=seed)
    test_specs = sample_patients(n_test, seed=_test_seed(seed)) if n_test else []
    _clear_or_refuse(out_dir, {f"{s.patient_id}.dcm" for s in specs}, overwrite=overwrite)
    _clear_or_refuse_test(out_dir, {f"{s.patient_id}.dcm" for s in test_specs}, overwrite=overwrite)
    images_dir.mkdir(parents=True, exist_ok=True)
    label_rows: list[tuple] = []
    class_rows: list[tuple[str, str]] = []
    n_boxes = 0
    for spec in track(specs, len(specs), "synth", progress=progress):
        chest = render_chest(spec, size)
        write_dicom(images_dir / f"{spec.patient_id}.dcm", chest.image, spec)
        rows = _label_rows(spec.patient_id, chest.boxes)
        label_rows.extend(rows)
        class_rows.extend((spec.patient_id, spec.label_class) for _ in rows)
        n_boxes += len(chest.boxes)

    _write_csv(out_dir / LABELS_FILE, ("patientId", "x", "y", "width", "height", "Target"), label_rows)
    _write_csv(out_dir / CLASSES_FILE, ("patientId", "class"), class_rows)
    _write_test_set(out_dir, test_specs, size, progress)
    return SynthSummary(
        out_dir=out_dir, size=size, seed=seed,
        class_counts=dict(Counter(s.label_class for s in specs)),
        view_counts=dict(Counter(s.view for s in specs)),
        boxes=n_boxes, files=len(specs), label_rows=len(label_rows),
        findings=dict(Counter(s.finding for s in specs if s.finding)), test_files=len(test_specs),
    )


def _test_seed(seed: int) -> int:
    """The test patients' seed: a stream independent of the training patients' (same ``seed``, other ids)."""
    return int(np.random.SeedSequence([seed, 0x7E57]).generate_state(1)[0])


def _clear_or_refuse_test(out_dir: Path, own_files: set[str], *, overwrite: bool) -> None:
    """As :func:`_clear_or_refuse` for the test images; a stale sample submission goes with them."""
    foreign = [p for p in (out_dir / TEST_IMAGES_DIR).glob("*.dcm") if p.name not in own_files]
    if foreign and not overwrite:
        raise ConfigError(f"{out_dir} already holds a dataset ({len(foreign)} test DICOMs of other patients); "
                          "choose an empty folder, or overwrite it (--overwrite)")
    for path in foreign:
        path.unlink()
    if overwrite and not own_files:
        (out_dir / SUBMISSION_FILE).unlink(missing_ok=True)


def _write_test_set(out_dir: Path, specs: list[PatientSpec], size: int, progress: bool | str) -> None:
    """The unlabelled test DICOMs and Kaggle's sample submission listing them."""
    if not specs:
        return
    (out_dir / TEST_IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for spec in track(specs, len(specs), "synth test images", progress=progress):
        write_dicom(out_dir / TEST_IMAGES_DIR / f"{spec.patient_id}.dcm", render_chest(spec, size).image, spec)
    rows = sorted((s.patient_id, SAMPLE_PREDICTION) for s in specs)
    with atomic_open(out_dir / SUBMISSION_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n")  # as Kaggle's stage_2_sample_submission.csv
        writer.writerow(("patientId", "PredictionString"))
        writer.writerows(rows)


def _clear_or_refuse(out_dir: Path, own_files: set[str], *, overwrite: bool) -> None:
    labels = out_dir / LABELS_FILE
    foreign = [p for p in (out_dir / IMAGES_DIR).glob("*.dcm") if p.name not in own_files]
    if not overwrite and (labels.exists() or foreign):
        found = f"{labels.name}" if labels.exists() else f"{len(foreign)} DICOMs of other patients"
        raise ConfigError(f"{out_dir} already holds a dataset ({found}); "
                          "choose an empty folder, or overwrite it (--overwrite)")
    if overwrite:
        for path in foreign:
            path.unlink()


def sample_patients(patients: int, *, seed: int = 0) -> list[PatientSpec]:
    """Patient identities and classes; class counts are the real shares rounded (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes = [name for name, n in zip(CLASS_SHARES, _apportion(patients, list(CLASS_SHARES.values())),
                                       strict=True) for _ in range(n)]
    rng.shuffle(classes)
    box_counts, box_p = list(BOXES_PER_PATIENT), list(BOXES_PER_PATIENT.values())
    specs = []
    for label_class in classes:
        words = rng.integers(0, 2**32, size=4, dtype=np.uint64)
        h = "".join(f"{int(w):08x}" for w in words)
        variant = "89ab"[int(h[16], 16) % 4]  # a version-4 UUID, as RSNA's ids are
        patient_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"
        view = "AP" if rng.random() < AP_SHARE[label_class] else "PA"
        sex = "M" if rng.random() < MALE_SHARE else "F"
        age = int(np.clip(round(rng.normal(*AGE_MEAN_SD)), 1, 92))
        n_boxes = int(rng.choice(box_counts, p=box_p)) if label_class == OPACITY else 0
        finding = str(rng.choice(NOT_NORMAL_FINDINGS)) if label_class == NOT_NORMAL else None
        specs.append(PatientSpec(patient_id, label_class, view, sex, age, n_boxes, finding,
                                 seed=int(rng.integers(0, 2**31))))
    return specs


def _apportion(total: int, shares: list[float]) -> list[int]:
    raw = np.asarray(shares) / sum(shares) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _label_rows(patient_id: str, boxes: np.ndarray) -> list[tuple]:
    if len(boxes) == 0:
        return [(patient_id, "", "", "", "", 0)]
    return [(patient_id, f"{x0:.1f}", f"{y0:.1f}", f"{x1 - x0 + 1:.1f}", f"{y1 - y0 + 1:.1f}", 1)
            for x0, y0, x1, y1 in boxes]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- DICOM
def write_dicom(path: Path, image: np.ndarray, spec: PatientSpec, *, quality: int = 90) -> None:
    """A JPEG Baseline 8-bit MONOCHROME2 secondary-capture file with the tags RSNA's files carry.

    Args:
        image: uint8 ``[H, W]``.
    """
    # pydicom 3.0 has no JPEG Baseline encoder: Pillow writes the (baseline, 8-bit) JPEG stream and
    # pydicom encapsulates it
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=quality)
    rows, cols = image.shape
    sop_uid = generate_uid(entropy_srcs=[spec.patient_id, "sop"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"  # RSNA's anonymised values
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {spec.view}"
    ds.PatientName = spec.patient_id  # RSNA writes the id here too
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = spec.sex
    with warnings.catch_warnings():  # RSNA's '51' is not a valid AS value ('051Y'); keep it as RSNA has it
        warnings.filterwarnings("ignore", message="Invalid value for VR AS")
        ds.PatientAge = str(spec.age)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = spec.view
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[spec.patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[spec.patient_id, "series"])
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    spacing = round(RSNA_PIXEL_SPACING_MM * 1024 / cols, 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    with atomic_path(path) as tmp:  # an interrupted write leaves no half file where a reader looks
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------- drawing
@dataclass(frozen=True)
class _Anatomy:
    """Per-patient geometry, in fractions of the image side."""

    cx: float  # body midline
    cy: float  # lung centre height
    scale: float  # patient size in frame (AP films: smaller, the detector is closer to the patient)
    heart: float  # heart size factor (AP magnifies it; cardiomegaly enlarges it)
    lung_w: float
    lung_h: float
    rib_spacing: float
    brightness: float
    contrast: float


class _Canvas:
    """Normalised coordinate grids ``u`` (x) and ``v`` (y), each broadcastable to ``[S, S]``."""

    def __init__(self, size: int) -> None:
        self.size = size
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.u = axis[None, :]
        self.v = axis[:, None]

    def superellipse(self, cx: float, cy: float, ax: float, ay: float, power: float = 2.0,
                     edge: float = 0.03) -> np.ndarray:
        """Soft mask ``[S, S]`` in [0, 1]: 1 inside, falling to 0 over ``edge`` (fraction of the radius)."""
        r = (np.abs((self.u - cx) / ax) ** power + np.abs((self.v - cy) / ay) ** power) ** (1.0 / power)
        return np.clip((1.0 - r) / edge, 0.0, 1.0)

    def segment(self, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
        """Soft band ``[S, S]`` of half-width ``width`` around the segment p0-p1 (rounded profile)."""
        (x0, y0), (x1, y1) = p0, p1
        out = np.zeros((self.size, self.size), dtype=np.float32)
        # only the segment's bounding window is computed: thin features cover little of the frame
        c0, c1 = self._index(min(x0, x1) - width), self._index(max(x0, x1) + width) + 1
        r0, r1 = self._index(min(y0, y1) - width), self._index(max(y0, y1) + width) + 1
        u, v = self.u[:, c0:c1], self.v[r0:r1, :]
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        dist2 = (u - (x0 + t * dx)) ** 2 + (v - (y0 + t * dy)) ** 2
        out[r0:r1, c0:c1] = np.clip(1.0 - dist2 / width**2, 0.0, 1.0)
        return out

    def _index(self, coord: float) -> int:
        return int(np.clip(coord * self.size, 0, self.size))

    def smooth_noise(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """Smooth random field ``[S, S]``, zero mean, unit std, features about ``2 * scale`` of S wide.

        White noise on a coarse grid, cubic-interpolated up: the same draws at every image size,
        so a patient looks the same at 256 and 1024 pixels (and it is cheaper than filtering).
        """
        cells = max(4, round(0.5 / scale))
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        noise = ndimage.zoom(coarse, self.size / cells, order=3, mode="mirror", grid_mode=True)
        return (noise - noise.mean()) / (noise.std() + 1e-6)

    def random_point(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        """A uniformly random point ``(x, y)`` (fractions of S) on a non-empty boolean mask ``[S, S]``."""
        ys, xs = np.nonzero(mask)
        x0, x1 = xs.min() / self.size, (xs.max() + 1) / self.size
        y0, y1 = ys.min() / self.size, (ys.max() + 1) / self.size
        while True:  # rejection in continuous coordinates: the same draws at every image size
            x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if mask[min(int(y * self.size), self.size - 1), min(int(x * self.size), self.size - 1)]:
                return x, y


def render_chest(spec: PatientSpec, size: int) -> SyntheticChest:
    """Draw one patient's film. Deterministic in ``spec.seed`` and ``size``."""
    rng = np.random.default_rng(spec.seed)
    canvas = _Canvas(size)
    anatomy = _sample_anatomy(spec, rng)
    lungs, lung_field, heart = _lungs(canvas, anatomy)
    body = _body(canvas, anatomy)
    aerated = lungs * (1.0 - 0.9 * heart)  # the heart's soft tissue hides the lung behind it

    film = 0.05 + 0.04 * canvas.v + 0.62 * body  # air around the patient, then soft tissue
    film = film + 0.10 * body * _below_diaphragm(canvas, anatomy)
    film = film + 0.06 * _spine(canvas, anatomy) + 0.12 * _mediastinum(canvas, anatomy)
    film = film - aerated * (0.50 - 0.10 * np.abs(canvas.u - anatomy.cx) / (2 * anatomy.lung_w)
                             + 0.07 * (canvas.v - anatomy.cy) / anatomy.lung_h)
    film = film + aerated * _vessels(canvas, anatomy, rng)
    film = film + _ribs(canvas, anatomy, rng) * _rib_cage(canvas, anatomy) * (0.025 + 0.06 * lungs)
    film = film + 0.16 * _clavicles(canvas, anatomy)

    boxes = np.zeros((0, 4), dtype=np.float32)
    opacity = np.zeros((size, size), dtype=np.float32)
    if spec.n_boxes:
        opacity, boxes = _opacities(canvas, anatomy, lung_field, spec.n_boxes, rng)
        film = film + opacity
    if spec.finding is not None:
        film = film + _finding(canvas, anatomy, lung_field, spec.finding, rng)

    film = ndimage.gaussian_filter(film, 0.0012 * size)  # detector blur
    film = anatomy.brightness + anatomy.contrast * (film - 0.4)
    # quantum noise from its own stream: the number of draws depends on the size, the geometry must not
    noise_rng = np.random.default_rng([spec.seed, size])
    film = film + 0.012 * noise_rng.standard_normal(film.shape, dtype=np.float32)
    image = np.clip(np.rint(film * 255.0), 0, 255).astype(np.uint8)
    _draw_markers(image, spec, rng)
    return SyntheticChest(image=image, lung_field=lung_field, opacity=opacity, boxes=boxes)


def _sample_anatomy(spec: PatientSpec, rng: np.random.Generator) -> _Anatomy:
    ap = spec.view == "AP"
    scale = rng.normal(0.90, 0.03) if ap else rng.normal(1.0, 0.03)
    heart = rng.normal(1.15, 0.05) if ap else rng.normal(1.0, 0.05)
    if spec.finding == "cardiomegaly":
        heart *= 1.35
    return _Anatomy(
        cx=0.5 + rng.normal(0, 0.015), cy=0.49 + rng.normal(0, 0.015) + (0.02 if ap else 0.0),
        scale=scale, heart=heart,
        lung_w=0.175 * scale * rng.normal(1.0, 0.04), lung_h=0.36 * scale * rng.normal(1.0, 0.04),
        rib_spacing=0.075 * scale * rng.normal(1.0, 0.05),
        brightness=0.43 + rng.normal(0, 0.03), contrast=rng.normal(1.0, 0.06),
    )


def _lung_centre(a: _Anatomy, side: int) -> tuple[float, float]:
    """Centre of one lung; ``side`` -1 is the image's left (the patient's right), +1 the image's right."""
    return a.cx + side * (a.lung_w + 0.05 * a.scale), a.cy


def _dome(canvas: _Canvas, a: _Anatomy, side: int) -> np.ndarray:
    """Height of one hemidiaphragm: highest mid-lung, lowest at the costophrenic angle."""
    lx, ly = _lung_centre(a, side)
    return ly + a.lung_h * (0.62 + 0.40 * ((canvas.u - lx) / a.lung_w) ** 2) + (0.02 if side > 0 else 0.0)


def _lungs(canvas: _Canvas, a: _Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft lung mask, boolean lung field (lungs minus heart) and the soft heart mask, each ``[S, S]``."""
    lungs = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    for side in (-1, 1):
        lx, ly = _lung_centre(a, side)
        # lateral wall: an ellipse; medial wall: straight along the mediastinum; apex narrows medially
        lung = canvas.superellipse(lx - side * 0.25 * a.lung_w, ly, 1.25 * a.lung_w, a.lung_h, power=2.2,
                                   edge=0.05)
        medial = np.clip((side * (canvas.u - a.cx) - 0.05 * a.scale) / 0.012, 0, 1)
        diaphragm = np.clip((_dome(canvas, a, side) - canvas.v) / 0.015, 0, 1)
        lungs = np.maximum(lungs, lung * medial * diaphragm)
    # the heart sits mostly on the patient's left (image right), its base on the diaphragm
    heart = canvas.superellipse(a.cx + 0.04 * a.scale * a.heart, a.cy + 0.6 * a.lung_h,
                                0.16 * a.scale * a.heart, 0.16 * a.scale * a.heart, power=2.6, edge=0.15)
    lung_field = (lungs > 0.5) & (heart < 0.4)
    return lungs, lung_field, heart


def _below_diaphragm(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    dome = np.minimum(_dome(canvas, a, -1), _dome(canvas, a, 1))
    return np.clip((canvas.v - dome) / 0.03, 0, 1)


def _body(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    # the chest narrows above the armpits into sloping shoulders
    half_width = 0.46 * a.scale * (1.0 - 0.35 * np.clip((a.cy - 0.25 * a.scale - canvas.v) / (0.3 * a.scale),
                                                        0, 1) ** 2)
    top = a.cy - 0.5 * a.scale + 0.25 * (np.abs(canvas.u - a.cx) / (0.46 * a.scale)) ** 2
    torso = (np.clip((half_width - np.abs(canvas.u - a.cx)) / 0.02, 0, 1)
             * np.clip((canvas.v - top) / 0.03, 0, 1))
    neck = canvas.superellipse(a.cx, a.cy - 0.45 * a.scale, 0.085 * a.scale, 0.2 * a.scale, edge=0.3)
    return np.clip(torso + neck, 0, 1)


def _spine(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    band = np.clip(1.0 - np.abs(canvas.u - a.cx) / (0.035 * a.scale), 0, 1) ** 0.5
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * canvas.v / (0.045 * a.scale)) ** 2
    return band * vertebrae


def _mediastinum(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    """Great vessels and trachea area: a column that widens at the aortic knob."""
    half = 0.05 * a.scale + 0.02 * a.scale * np.exp(-(((canvas.v - a.cy + 0.45 * a.lung_h) / 0.05) ** 2))
    column = np.clip((half - np.abs(canvas.u - a.cx - 0.01)) / 0.015, 0, 1)
    trachea = np.clip(1.0 - np.abs(canvas.u - a.cx) / (0.013 * a.scale), 0, 1)
    trachea = trachea * np.clip((a.cy - 0.35 * a.lung_h - canvas.v) / 0.03, 0, 1)
    return column - 0.6 * trachea


def _rib_cage(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    top = a.cy - 1.1 * a.lung_h
    bottom = a.cy + 0.95 * a.lung_h
    vertical = np.clip((canvas.v - top) / 0.02, 0, 1) * np.clip((bottom - canvas.v) / 0.05, 0, 1)
    lateral = np.clip((2.1 * a.lung_w + 0.06 * a.scale - np.abs(canvas.u - a.cx)) / 0.02, 0, 1)
    medial = np.clip((np.abs(canvas.u - a.cx) - 0.03 * a.scale) / 0.02, 0, 1)
    return vertical * lateral * medial


def _ribs(canvas: _Canvas, a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs: bands that leave the spine rising, then arc down laterally; bright cortical edges."""
    d = np.abs(canvas.u - a.cx) / (2 * a.lung_w)  # 0 at the spine, ~1 at the chest wall
    # rib spacing grows downwards (phase ~ sqrt of depth) and each patient's ribs wobble a little
    depth = np.clip(canvas.v - a.cy - a.lung_h * (1.1 * d**2 - 0.45 * d) + 1.2 * a.lung_h, 0, None)
    phase = np.sqrt(depth * 2.4 * a.lung_h) / a.rib_spacing + 0.15 * np.sin(6 * d + rng.random() * 6.28)
    frac = phase - np.floor(phase)
    bone = np.clip(1.0 - np.abs(frac - 0.5) / 0.17, 0, 1) ** 0.5
    cortex = np.exp(-(((np.abs(frac - 0.5) - 0.15) / 0.04) ** 2))
    return 0.6 * bone + 0.6 * cortex


def _clavicles(canvas: _Canvas, a: _Anatomy) -> np.ndarray:
    y = a.cy - 0.9 * a.lung_h
    out = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    for side in (-1, 1):
        medial = (a.cx + side * 0.04 * a.scale, y + 0.03 * a.scale)
        lateral = (a.cx + side * 0.34 * a.scale, y - 0.05 * a.scale)
        out = np.maximum(out, canvas.segment(medial, lateral, 0.014 * a.scale))
    return out


def _vessels(canvas: _Canvas, a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Lung markings: curvy lines (level sets of smooth noise), dense at the hila, faint at the periphery."""
    noise = canvas.smooth_noise(rng, 0.01)
    # thin lines where the field crosses zero, broken up by a second field so they branch and end
    lines = np.exp(-((noise / 0.25) ** 2)) * np.clip(canvas.smooth_noise(rng, 0.02) + 0.3, 0, 1)
    hilum = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    for side in (-1, 1):
        dist2 = (canvas.u - a.cx - side * 0.1 * a.scale) ** 2 + (canvas.v - a.cy - 0.1 * a.lung_h) ** 2
        hilum = np.maximum(hilum, np.exp(-dist2 / (0.02 * a.scale**2)))
    return (0.03 + 0.07 * hilum) * lines + 0.10 * hilum**3


def _opacities(canvas: _Canvas, a: _Anatomy, lung_field: np.ndarray, n: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` patchy opacities inside the lung field: the signal ``[S, S]`` and the boxes ``[n, 4]`` xyxy."""
    size = canvas.size
    patches = 0.6 * canvas.smooth_noise(rng, 0.03) + 0.5 * canvas.smooth_noise(rng, 0.012)
    fields = {side: _fading_field(canvas, lung_field & ((canvas.u < a.cx) if side < 0 else (canvas.u > a.cx)))
              for side in (-1, 1)}
    signal = np.zeros((size, size), dtype=np.float32)
    boxes: list[tuple[float, float, float, float]] = []
    for side in _box_sides(n, rng):
        field, soft = fields[side]
        for _attempt in range(20):
            blob = _opacity_blob(canvas, a, field, side, patches, rng) * soft
            visible = (blob >= VISIBLE_FRACTION * blob.max()) & field
            if visible.sum() < (0.02 * size) ** 2:
                continue
            ys, xs = np.nonzero(visible)
            box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
            if all(_overlap(box, other) == 0 for other in boxes):
                break
        else:
            continue  # no room for another separate opacity in this lung: keep the ones placed
        boxes.append(box)
        signal = np.maximum(signal, blob * rng.uniform(0.28, 0.40))
    return signal, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _fading_field(canvas: _Canvas, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One lung's field and a soft weight ``[S, S]`` that fades to ~0 just inside its border.

    Opacities are multiplied by the weight, so they never show outside the lung nor end in a hard edge.
    """
    sigma = 0.004 * canvas.size
    inner = ndimage.gaussian_filter(field.astype(np.float32), 2 * sigma) > 0.97  # eroded by ~2 sigma
    return field, ndimage.gaussian_filter(inner.astype(np.float32), sigma)


def _box_sides(n: int, rng: np.random.Generator) -> list[int]:
    first = -1 if rng.random() < BOX_LEFT_SHARE else 1
    if n == 1:
        return [first]
    if rng.random() < BOX_BILATERAL_SHARE:
        return [first, -first] + [int(rng.choice([-1, 1])) for _ in range(n - 2)]
    return [first] * n


def _opacity_blob(canvas: _Canvas, a: _Anatomy, field: np.ndarray, side: int, patches: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """One opacity, peak ~1, with the real box size and position statistics (before lung clipping)."""
    mean_cx, sd_cx = BOX_CX["left" if side < 0 else "right"]
    lx, _ = _lung_centre(a, side)
    cov = BOX_LOG_WH_CORR * BOX_LOG_W[1] * BOX_LOG_H[1]
    log_w, log_h = rng.multivariate_normal(
        [BOX_LOG_W[0], BOX_LOG_H[0]], [[BOX_LOG_W[1] ** 2, cov], [cov, BOX_LOG_H[1] ** 2]])
    w, h = min(float(np.exp(log_w)), BOX_MAX_W), min(float(np.exp(log_h)), BOX_MAX_H)
    for _ in range(20):  # centre: real statistics, moved with this patient's lung, inside the field
        cx = rng.normal(mean_cx, sd_cx) + (lx - (0.5 + side * 0.23))
        cy = rng.normal(*BOX_CY) + (a.cy - 0.49)
        px, py = int(cx * canvas.size), int(cy * canvas.size)
        if 0 <= px < canvas.size and 0 <= py < canvas.size and field[py, px]:
            break
    else:
        cx, cy = canvas.random_point(field, rng)
    # the soft edge and the lung border trim the visible extent: draw a little larger than the target box
    core = canvas.superellipse(cx, cy, 0.6 * w, 0.6 * h, power=2.0, edge=0.45)
    return core * np.clip(0.8 + 0.3 * patches, 0.25, 1.25)


def _overlap(b1: tuple[float, ...], b2: tuple[float, ...]) -> float:
    w = min(b1[2], b2[2]) - max(b1[0], b2[0])
    h = min(b1[3], b2[3]) - max(b1[1], b2[1])
    return max(w, 0.0) * max(h, 0.0)


def _finding(canvas: _Canvas, a: _Anatomy, lung_field: np.ndarray, finding: str,
             rng: np.random.Generator) -> np.ndarray:
    """A "Not Normal" finding that is not a lung opacity (cardiomegaly is drawn by the heart size)."""
    # Sizes are what a reader sees on a ~40 cm film, and what a network sees at the 128-512 px it trains on:
    # a 1-pixel line or a 2-pixel nodule (as drawn before) left "Not Normal" indistinguishable from "Normal"
    # except by cardiomegaly, and capped the global head's 3-class accuracy near 0.5.
    out = np.zeros((canvas.size, canvas.size), dtype=np.float32)
    if finding == "line":  # a tube or central line (~5-8 mm wide): very bright, crossing the mediastinum
        start = (a.cx + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3), a.cy - 1.1 * a.lung_h)
        mid = (a.cx + rng.normal(0, 0.02), a.cy - 0.5 * a.lung_h)
        end = (a.cx + rng.normal(0.02, 0.02), a.cy + rng.uniform(-0.1, 0.2) * a.lung_h)
        width = rng.uniform(0.006, 0.01)
        for p, q in ((start, mid), (mid, end)):
            out = np.maximum(out, canvas.segment(p, q, width))
        out *= 0.45
    elif finding == "nodule":  # 1-3 round nodules of 1.5-2.5 cm, well below the size of a labelled opacity
        for _ in range(int(rng.integers(1, 4))):
            x, y = canvas.random_point(lung_field, rng)
            r = rng.uniform(0.02, 0.032)
            out = np.maximum(out, 0.3 * canvas.superellipse(x, y, r, r, edge=0.4))
    return out


def _draw_markers(image: np.ndarray, spec: PatientSpec, rng: np.random.Generator) -> None:
    """Burn in the film markers: a side letter, and "AP" plus "PORTABLE" on bedside films."""
    size = image.shape[0]
    font = ImageFont.load_default(size=max(8, size // 28))
    text = "AP PORTABLE" if spec.view == "AP" else "R"
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    x = int(size * rng.uniform(0.03, 0.08)) if spec.view == "AP" or rng.random() < 0.5 else int(size * 0.88)
    draw.text((x, int(size * rng.uniform(0.03, 0.07))), text, fill=235, font=font)
    image[...] = np.asarray(pil)
