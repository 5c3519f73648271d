"""``pneumodet pacs``: find studies on a DICOMweb server, fetch the radiographs, predict, store SR and PR.

The round trip, :func:`run_pacs`:

1. **find** (QIDO-RS): the instances of the studies (``--study``) or series (``--series``) named, or of
   the studies matching ``--modality`` and a study date range; a UID named that the server does not have
   ends the run before anything is fetched. An instance is predicted when its SOP class is a radiograph
   (:data:`IMAGE_SOP_CLASSES`) and its modality one of the accepted ones (default CR and DX); every other
   instance (an SR, a presentation state, a CT, a scanned form) is skipped and listed with its reason;
2. then chunk by chunk (``chunk`` images: bounded disk and memory; a failure later leaves the earlier
   chunks stored and says so): **fetch** (WADO-RS, in the stored transfer syntax) into a private temporary
   folder (mode 0700, removed after the chunk); **predict** with :func:`pneumodet.inference.predict`;
   **build** each image's SR and presentation state (:mod:`pneumodet.clinical.sr`); **store** (STOW-RS)
   them study by study, an image's SR and PR in the same request, ``stow_batch`` instances per request.

Nothing is half-stored silently: an instance counts as stored only when the server's STOW-RS answer lists
it, and the summary names every image whose SR or PR was not stored, with the reason. A transient failure
(no connection, a timeout, 429/5xx) is retried with back-off
(:class:`~pneumodet.clinical.dicomweb.DicomWebServer`); when every attempt failed the run stops there
(nothing more is sent to a server that is down) and reports what was stored before. A request the server
refuses (another 4xx) fails that request's images only. UIDs are derived from the content
(:mod:`pneumodet.clinical.identity`), so the same command run again after a failure stores what was
missing and adds no duplicates.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumodet.clinical.dicomweb import DicomWebServer, PacsError, first_value
from pneumodet.clinical.identity import check_uid, checkpoint_sha256, is_valid_uid
from pneumodet.clinical.sr import (
    ImageObjects,
    SourceHeaderError,
    dicom_filenames,
    identity_for,
    image_objects,
    save_dataset,
)
from pneumodet.errors import ConfigError, PneumodetError
from pneumodet.inference import PredictionResult, PredictOptions, check_options, predict, resolve_checkpoint
from pneumodet.progress import PROGRESS_STYLES, Progress
from pneumodet.textsafe import display_text

#: SOP classes pneumodet predicts on: radiographs, and secondary captures of them (the RSNA files are these).
#: DX "for processing" (raw detector data) is left out: it is not an image meant to be looked at.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
DEFAULT_MODALITIES = ("CR", "DX")
#: Listed one by one in the printed summary, per kind of skip (all of them in ``--json``).
_SHOWN = 10
_QIDO_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality")
_NOT_ATTEMPTED = "not attempted: the run stopped before (see the error)"


# ---------------------------------------------------------------- what to fetch
@dataclass(frozen=True)
class PacsQuery:
    """What ``pneumodet pacs`` fetches: studies and/or series by UID, or studies by modality and date.

    Checked when made (:class:`ConfigError`), before any request: every UID is a DICOM UID (so none can
    carry a path or a query into a URL), every modality a code string.
    """

    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    date_from: str | None = None  # YYYYMMDD
    date_to: str | None = None

    def __post_init__(self) -> None:
        for uid in self.studies:
            check_uid(uid, "--study")
        for uid in self.series:
            check_uid(uid, "--series")
        for modality in self.modalities:
            if not (modality.isascii() and modality.isalnum() and modality.isupper() and len(modality) <= 16):
                raise ConfigError(f"--modality {display_text(modality)!r} is not a DICOM modality "
                                  "(e.g. CR, DX)")
        if (self.date_from or self.date_to) and (self.studies or self.series):
            raise ConfigError("--date-from/--date-to select studies by date; with --study or --series they "
                              "would select nothing more: leave them out")
        if not (self.studies or self.series or self.modalities or self.date_from or self.date_to):
            raise ConfigError("name what to fetch: --study UID, --series UID, or a search by --modality "
                              "and/or --date-from/--date-to")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ConfigError(f"--date-from {self.date_from} is after --date-to {self.date_to}")

    @property
    def accepted_modalities(self) -> tuple[str, ...]:
        return self.modalities or DEFAULT_MODALITIES

    def describe(self) -> str:
        parts = [f"study {uid}" for uid in self.studies] + [f"series {uid}" for uid in self.series]
        if self.modalities:
            parts.append("modality " + "/".join(self.modalities))
        if self.date_from or self.date_to:
            parts.append(f"study date {self.date_from or '...'}-{self.date_to or '...'}")
        return ", ".join(parts)


def parse_date(text: str | None, option: str) -> str | None:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` -> ``YYYYMMDD`` (a real date), or :class:`ConfigError`."""
    import datetime

    if text is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise ConfigError(f"{option} {display_text(text)!r} is not a date (YYYY-MM-DD)")


@dataclass(frozen=True)
class InstanceRef:
    """One instance on the server, as QIDO-RS described it."""

    study: str
    series: str
    sop: str
    sop_class: str | None
    modality: str | None

    def kind(self) -> str:
        from pydicom.uid import UID

        name = UID(self.sop_class).name if self.sop_class else "unknown SOP class"
        return f"{self.modality or '?'} {name}"


def _skip_reason(ref: InstanceRef, modalities: Sequence[str]) -> str | None:
    """Why ``ref`` is not predicted, or ``None`` when it is a radiograph of an accepted modality."""
    if not (is_valid_uid(ref.study) and is_valid_uid(ref.series) and is_valid_uid(ref.sop)):
        return "the server gave a malformed Study/Series/SOP Instance UID"
    if ref.sop_class is not None and ref.sop_class not in IMAGE_SOP_CLASSES:
        return f"not a radiograph ({ref.kind()})"
    if ref.modality is not None and ref.modality not in modalities:
        return f"modality {ref.modality} is not among {', '.join(modalities)} (--modality)"
    return None


@dataclass
class Plan:
    """The instances to predict, and those skipped with their reason."""

    images: list[InstanceRef] = field(default_factory=list)
    skipped: list[tuple[InstanceRef, str]] = field(default_factory=list)
    found: int = 0


def find_instances(server: DicomWebServer, query: PacsQuery) -> Plan:
    """QIDO-RS: every instance the query selects, sorted into images to predict and skipped instances.

    Raises:
        PacsError: a study or series named is not on the server, or no study matches the search.
    """
    rows: list[dict[str, Any]] = []
    for study in query.studies:
        found = server.search("instances", study=study, fields=_QIDO_FIELDS)
        if not found:
            raise PacsError(f"{server.label}: study {study} not found (QIDO-RS lists no instance of it); "
                            "nothing fetched")
        rows += found
    for series in query.series:
        found = server.search("instances", filters={"SeriesInstanceUID": series}, fields=_QIDO_FIELDS,
                              what=f"QIDO-RS search for the instances of series {series}")
        if not found:
            raise PacsError(f"{server.label}: series {series} not found (QIDO-RS lists no instance of it); "
                            "nothing fetched")
        rows += found
    if not (query.studies or query.series):
        rows = _search_studies(server, query)
    plan = Plan()
    seen: set[str] = set()
    for row in rows:
        ref = InstanceRef(first_value(row, "0020000D") or "", first_value(row, "0020000E") or "",
                          first_value(row, "00080018") or "", first_value(row, "00080016"),
                          first_value(row, "00080060"))
        if ref.sop in seen:  # named twice (a study and one of its series): fetched once
            continue
        seen.add(ref.sop)
        reason = _skip_reason(ref, query.accepted_modalities)
        if reason is None:
            plan.images.append(ref)
        else:
            plan.skipped.append((ref, reason))
    plan.found = len(seen)
    return plan


def _search_studies(server: DicomWebServer, query: PacsQuery) -> list[dict[str, Any]]:
    filters: dict[str, str] = {}
    if query.date_from or query.date_to:
        filters["StudyDate"] = f"{query.date_from or ''}-{query.date_to or ''}"
    studies: dict[str, None] = {}
    # one search per modality: matching several values of ModalitiesInStudy at once is not portable
    for modality in query.modalities or (None,):
        wanted = dict(filters, **({"ModalitiesInStudy": modality} if modality else {}))
        for row in server.search("studies", filters=wanted, fields=("StudyInstanceUID",)):
            uid = first_value(row, "0020000D")
            if uid:
                studies[uid] = None
    if not studies:
        raise PacsError(f"{server.label}: no study matches {query.describe()}; nothing fetched")
    rows: list[dict[str, Any]] = []
    for study in studies:
        if is_valid_uid(study):  # a malformed UID from the server is never put into a URL
            rows += server.search("instances", study=study, fields=_QIDO_FIELDS)
    return rows


# ---------------------------------------------------------------- the summary
@dataclass
class ImageRecord:
    """One predicted image and what became of its SR and presentation state."""

    ref: InstanceRef
    patient_id: str
    boxes: int
    sr_uid: str
    pr_uid: str | None
    sr_stored: bool = False
    pr_stored: bool = False
    problem: str | None = None  # why something was not stored

    @property
    def complete(self) -> bool:
        return self.sr_stored and (self.pr_uid is None or self.pr_stored)


@dataclass
class PacsSummary:
    """Everything one ``pneumodet pacs`` run did: found, skipped, fetched, predicted, stored, and what not."""

    server: str
    query: str
    found: int = 0
    skipped: list[tuple[InstanceRef, str]] = field(default_factory=list)
    not_fetched: list[tuple[InstanceRef, str]] = field(default_factory=list)
    not_predicted: list[tuple[InstanceRef, str]] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    not_attempted: list[InstanceRef] = field(default_factory=list)  # left when the run stopped
    notes: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    error: str | None = None  # what stopped the run, or why it is not a success
    interrupted: bool = False  # stopped by Ctrl-C: the caller reports, then ends as interrupted

    def render(self) -> str:
        complete = [r for r in self.images if r.complete]
        reports = sum(r.sr_stored for r in self.images)
        states = sum(r.pr_stored for r in self.images)
        stopped = f"; {len(self.not_attempted)} image(s) not attempted" if self.not_attempted else ""
        lines = [f"{self.server}: {self.query}",
                 f"instances found: {self.found}; radiographs: {self.found - len(self.skipped)}; skipped: "
                 f"{len(self.skipped)}; not fetched: {len(self.not_fetched)}; not predicted: "
                 f"{len(self.not_predicted)}; predicted: {len(self.images)}",
                 f"stored: {reports} SR and {states} presentation state(s); {len(complete)} of "
                 f"{len(self.images)} predicted image(s) complete, in {len({r.ref.study for r in complete})} "
                 f"study(ies){stopped}"]
        lines += _listing("skipped", [(ref.sop, reason) for ref, reason in self.skipped])
        lines += _listing("not fetched", [(ref.sop, reason) for ref, reason in self.not_fetched])
        lines += _listing("not predicted", [(ref.sop, reason) for ref, reason in self.not_predicted])
        lines += _listing("NOT STORED", [(r.ref.sop, _not_stored(r)) for r in self.images if not r.complete],
                          shown=len(self.images))
        lines += _listing("not attempted (the run stopped)", [(ref.sop, "") for ref in self.not_attempted])
        if self.not_attempted or any(not r.complete for r in self.images):
            lines.append("  (an object counts as stored only when the server's answer says so; the same command "
                         "again stores what is missing, and nothing twice)")
        lines += [f"  retried: {display_text(line)}" for line in self.retries]
        lines += [f"  note: {display_text(line)}" for line in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def ref_json(ref: InstanceRef) -> dict[str, Any]:
            return {"studyInstanceUID": ref.study, "seriesInstanceUID": ref.series, "sopInstanceUID": ref.sop,
                    "sopClassUID": ref.sop_class, "modality": ref.modality}

        return {
            "server": self.server, "query": self.query, "instances_found": self.found,
            "images": [{**ref_json(r.ref), "patientId": r.patient_id, "boxes": r.boxes, "sr": r.sr_uid,
                        "sr_stored": r.sr_stored, "pr": r.pr_uid, "pr_stored": r.pr_stored,
                        "problem": r.problem} for r in self.images],
            "skipped": [{**ref_json(ref), "reason": reason} for ref, reason in self.skipped],
            "not_fetched": [{**ref_json(ref), "reason": reason} for ref, reason in self.not_fetched],
            "not_predicted": [{**ref_json(ref), "reason": reason} for ref, reason in self.not_predicted],
            "not_attempted": [ref_json(ref) for ref in self.not_attempted],
            "retries": self.retries, "notes": self.notes, "error": self.error,
        }


def _not_stored(record: ImageRecord) -> str:
    stored = {"SR": record.sr_stored, "PR": record.pr_stored or record.pr_uid is None}
    missing = [name for name, done in stored.items() if not done]
    return f"{' and '.join(missing)} not stored: {record.problem or 'unknown'}"


def _listing(label: str, items: list[tuple[str, str]], shown: int = _SHOWN) -> list[str]:
    lines = [f"  {label} {sop}" + (f": {display_text(reason)}" if reason else "")
             for sop, reason in items[:shown]]
    if len(items) > shown:
        lines.append(f"  ... and {len(items) - shown} more {label} (all of them in --json)")
    return lines


def _progress(total: int, what: str, style: str) -> Progress:
    """The shared progress display (:class:`pneumodet.progress.Progress`) of one pacs step."""
    return Progress(total, f"pacs: {what}", "images", progress=style)


# ---------------------------------------------------------------- the run
def run_pacs(model_source: Path | str, server: DicomWebServer, query: PacsQuery, *,
             options: PredictOptions | None = None, chunk: int = 256, stow_batch: int = 16,
             patient_details: bool = False, uid_root: str | None = None, dicom_out: Path | None = None,
             progress: str = "off", workdir: Path | None = None) -> PacsSummary:
    """The round trip (see the module docstring). Always returns the summary; ``summary.error`` says what
    stopped the run, or why it is not a success (an image's SR or PR not stored, nothing predicted).

    ``progress`` is one of :data:`PROGRESS_STYLES` (on stderr); ``dicom_out`` also keeps a copy of every SR
    and PR there; ``workdir`` holds the temporary folder of the fetched images (default: the system's).
    Ctrl-C stops the run too, with ``summary.interrupted`` set: the caller can still say what was stored.

    Raises (before anything is fetched):
        ConfigError, CheckpointError: an option or a model no prediction can use.
        PacsError: the server cannot be searched, or a study or series named is not there.
    """

    options = options or PredictOptions()
    if progress not in PROGRESS_STYLES:
        raise ValueError(f"progress must be one of {PROGRESS_STYLES}, got {progress!r}")
    if chunk < 1 or stow_batch < 2:
        raise ConfigError(f"--chunk must be at least 1 and --stow-batch at least 2 (an SR and its PR), got "
                          f"{chunk} and {stow_batch}")
    check_options(options)
    checkpoint_hash = checkpoint_sha256(resolve_checkpoint(model_source))

    summary = PacsSummary(server.label, query.describe())
    plan = find_instances(server, query)
    summary.found, summary.skipped = plan.found, list(plan.skipped)
    if not plan.images:
        summary.error = (f"{server.label}: none of the {plan.found} instance(s) found is a radiograph to "
                         f"predict (modality {', '.join(query.accepted_modalities)}); nothing stored")
        return summary
    chunks = [plan.images[i:i + chunk] for i in range(0, len(plan.images), chunk)]
    with tempfile.TemporaryDirectory(prefix="pneumodet-pacs-", dir=workdir) as tmp:  # mode 0700: patient data
        for number, refs in enumerate(chunks):
            folder = Path(tmp) / f"chunk{number}"
            try:
                _run_chunk(model_source, checkpoint_hash, server, refs, folder, summary, options=options,
                           stow_batch=stow_batch, patient_details=patient_details, uid_root=uid_root,
                           dicom_out=dicom_out, progress=progress)
            except (PacsError, KeyboardInterrupt) as exc:  # the server failed beyond its retries, or Ctrl-C
                summary.interrupted = isinstance(exc, KeyboardInterrupt)
                summary.error = str(exc) if not summary.interrupted else (
                    f"{server.label}: interrupted; what was stored before is listed above")
                done = ({r.ref.sop for r in summary.images} | {ref.sop for ref, _ in summary.not_fetched}
                        | {ref.sop for ref, _ in summary.not_predicted})
                summary.not_attempted = [ref for later in chunks[number:] for ref in later
                                         if ref.sop not in done]
                break
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    summary.retries = list(server.retries_made)
    if summary.error is None:
        summary.error = _verdict(summary)
    return summary


def _verdict(summary: PacsSummary) -> str | None:
    """Why a run that went to its end is not a success, or ``None``."""
    incomplete = [r for r in summary.images if not r.complete]
    if incomplete:
        return (f"{summary.server}: {len(incomplete)} of {len(summary.images)} predicted image(s) not "
                "completely stored (listed above as NOT STORED)")
    if not summary.images:
        return f"{summary.server}: no image could be fetched and predicted; nothing stored"
    return None


def _run_chunk(model_source: Path | str, checkpoint_hash: str, server: DicomWebServer,
               refs: list[InstanceRef], folder: Path, summary: PacsSummary, *, options: PredictOptions,
               stow_batch: int, patient_details: bool, uid_root: str | None, dicom_out: Path | None,
               progress: str) -> None:
    files = _fetch(server, refs, folder, summary, progress)
    if not files:
        return
    result = _predict(model_source, folder, files, summary, options, progress)
    if result is None:
        return
    identity = identity_for(result, checkpoint_hash, uid_root=uid_root)
    by_study: dict[str, list[tuple[ImageRecord, ImageObjects]]] = {}
    numbers: dict[str, int] = {}
    for prediction in result.predictions.values():
        ref = files[Path(prediction.source).name]
        numbers[ref.study] = numbers.get(ref.study, 0) + 1
        try:
            objects = image_objects(prediction, identity, patient_details=patient_details,
                                    instance_number=numbers[ref.study])
        except SourceHeaderError as exc:
            summary.not_predicted.append((ref, f"no SR can reference it: {exc}"))
            continue
        if objects.study_instance_uid != ref.study:  # the file names another study than QIDO-RS did
            summary.not_predicted.append((ref, f"the file's Study Instance UID {objects.study_instance_uid} "
                                               f"is not the {ref.study} QIDO-RS gave; not stored"))
            continue
        if objects.note:
            summary.notes.append(f"{ref.sop}: {objects.note}")
        pr_uid = str(objects.presentation.SOPInstanceUID) if objects.presentation is not None else None
        record = ImageRecord(ref, prediction.patient_id, len(prediction.boxes),
                             str(objects.report.SOPInstanceUID), pr_uid)
        summary.images.append(record)
        by_study.setdefault(ref.study, []).append((record, objects))
        if dicom_out is not None:
            sr_name, pr_name = dicom_filenames(prediction)
            save_dataset(objects.report, dicom_out / sr_name)
            if objects.presentation is not None:
                save_dataset(objects.presentation, dicom_out / pr_name)
    _store(server, by_study, stow_batch, progress)


def _fetch(server: DicomWebServer, refs: list[InstanceRef], folder: Path, summary: PacsSummary,
           progress: str) -> dict[str, InstanceRef]:
    """WADO-RS each instance into ``folder`` as ``<n>.dcm`` (never a name from the server); ``{name: ref}``.

    An instance gone meanwhile (404, 410) is listed; any other failure ends the run (:class:`PacsError`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, InstanceRef] = {}
    bar = _progress(len(refs), "fetch", progress)
    try:
        for n, ref in enumerate(refs):
            try:
                dataset = server.fetch(ref.study, ref.series, ref.sop)
            except PacsError as exc:
                if exc.status not in (404, 410):
                    raise
                summary.not_fetched.append((ref, str(exc).split(": ", 1)[-1]))
                continue
            finally:
                bar.update()
            problem = _fetched_problem(dataset, ref)
            if problem is None:
                name = f"{n:06d}.dcm"
                try:
                    dataset.save_as(folder / name, enforce_file_format=True)
                except Exception as exc:  # noqa: BLE001 - pydicom cannot write it back: that image only
                    problem = (f"cannot be written to a file ({type(exc).__name__}: "
                               f"{display_text(str(exc))[:120]})")
                else:
                    files[name] = ref
            if problem is not None:
                summary.not_fetched.append((ref, problem))
    finally:
        bar.close()
    return files


def _fetched_problem(dataset: Any, ref: InstanceRef) -> str | None:
    """Why a retrieved instance is not the image QIDO-RS announced, or ``None``."""
    sop = str(dataset.get("SOPInstanceUID", ""))
    if sop != ref.sop:
        return f"the server sent instance {display_text(sop)[:70] or '(none)'} for {ref.sop}"
    if ref.sop_class is None and str(dataset.get("SOPClassUID", "")) not in IMAGE_SOP_CLASSES:
        return f"not a radiograph ({display_text(str(dataset.get('SOPClassUID', 'unknown SOP class')))})"
    return None


def _predict(model_source: Path | str, folder: Path, files: dict[str, InstanceRef], summary: PacsSummary,
             options: PredictOptions, progress: str) -> PredictionResult | None:

    try:
        result = predict(model_source, [folder], options, progress=progress)
    except PneumodetError as exc:
        if "no image could be predicted" not in str(exc):  # the model or an option: every chunk would fail
            raise
        summary.not_predicted += [(ref, "unreadable (no image of its chunk could be predicted)")
                                  for ref in files.values()]
        summary.notes.append(display_text(str(exc)))
        return None
    for item in result.unreadable:
        ref = files.get(Path(item.path).name)
        if ref is not None:
            summary.not_predicted.append((ref, f"unreadable: {display_text(item.cause)}"))
    for duplicate in result.duplicates:
        ref = files.get(Path(duplicate.path).name)
        if ref is not None:
            summary.not_predicted.append((ref, "a copy of an image predicted already (same SOP UID)"))
    # the fetched files are named <n>.dcm, so "PatientID differs from the file name" says nothing here
    summary.notes += [f"predict: {display_text(w)}" for w in result.warnings
                      if "differs from the file name" not in w]
    return result


def _store(server: DicomWebServer, by_study: dict[str, list[tuple[ImageRecord, ImageObjects]]],
           stow_batch: int, progress: str) -> None:
    """STOW-RS each study's objects, ``stow_batch // 2`` images per request; each record says what was stored.

    Raises:
        PacsError: a request failed transiently beyond its retries, or was refused for its credentials; the
            images not stored yet are marked not attempted.
    """
    per_request = max(1, stow_batch // 2)  # images per request: an image's SR and PR travel together
    batches = [(study, items[i:i + per_request]) for study, items in by_study.items()
               for i in range(0, len(items), per_request)]
    bar = _progress(sum(len(items) for items in by_study.values()), "store", progress)
    try:
        for number, (study, batch) in enumerate(batches):
            datasets = [ds for _, objects in batch for ds in objects.datasets]
            try:
                outcome = server.store(study, datasets)
            except (PacsError, KeyboardInterrupt) as exc:
                for record, _ in batch:  # a request cut short may or may not have been stored: not counted
                    record.problem = (str(exc).split(": ", 1)[-1] if isinstance(exc, PacsError)
                                      else "interrupted during its STOW-RS request (the server may hold it)")
                if isinstance(exc, KeyboardInterrupt) or exc.transient or exc.status in (401, 403, 407):
                    for _, later in batches[number + 1:]:
                        for record, _ in later:
                            record.problem = _NOT_ATTEMPTED
                    raise
                bar.update(len(batch))
                continue
            for record, _ in batch:
                record.sr_stored = record.sr_uid in outcome.stored
                record.pr_stored = record.pr_uid is not None and record.pr_uid in outcome.stored
                failed = [outcome.failed[uid] for uid in (record.sr_uid, record.pr_uid)
                          if uid in outcome.failed]
                record.problem = "; ".join(failed) or None
            bar.update(len(batch))
    finally:
        bar.close()
