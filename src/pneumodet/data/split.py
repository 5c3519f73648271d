"""Patient-level train/val/test split, stratified by class and number of boxes.

Each patient lands in exactly one set, so no image of a validation or test patient is ever trained on.
Strata are ``class x boxes-per-patient``; a stratum too small to place even one patient in the smallest
set on average is merged into the stratum of the same class with the next smaller box count (then,
if still too small, the next larger), so rare 3- and 4-box patients are spread instead of left to chance.
Set sizes are the nearest whole numbers to ``N * fraction``, distributed over strata by largest
remainder; within a stratum the patients are shuffled with ``numpy.random.default_rng(seed)``.
The result depends only on the set of patients and the seed, not on their input order.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pneumodet import safeio
from pneumodet.data.records import CLASS_NAMES, PatientRecord
from pneumodet.data.rsna import frame_to_records, records_to_frame
from pneumodet.errors import LabelsError, SplitError
from pneumodet.textsafe import display_path

SET_NAMES: tuple[str, ...] = ("train", "val", "test")
SPLIT_JSON = "split.json"


@dataclass(frozen=True)
class Split:
    """Three disjoint patient sets and how they were drawn."""

    train: tuple[PatientRecord, ...]
    val: tuple[PatientRecord, ...]
    test: tuple[PatientRecord, ...]
    seed: int
    val_fraction: float
    test_fraction: float
    samples: int | None = None
    labels_only: bool = False

    @property
    def sets(self) -> dict[str, tuple[PatientRecord, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """``{set: {class: patients}}`` with every class present (0 when absent)."""
        return {name: {c: Counter(r.label_class for r in recs)[c] for c in CLASS_NAMES}
                for name, recs in self.sets.items()}

    def summary(self) -> str:
        """Patients, boxes and class shares per set, one line each."""
        total = sum(len(s) for s in self.sets.values())
        head = (f"split of {total} patients (seed {self.seed}, val {self.val_fraction:g}, "
                f"test {self.test_fraction:g}" + (f", sample of {self.samples}" if self.samples else "")
                + (", labels only" if self.labels_only else "") + ")")
        lines = [head]
        for name, counts in self.class_counts().items():
            recs = self.sets[name]
            shares = ", ".join(f"{c} {100 * n / max(len(recs), 1):.1f}%" for c, n in counts.items())
            lines.append(f"  {name:5s} {len(recs):6d} patients {sum(len(r.boxes) for r in recs):6d} boxes  "
                         f"{shares}")
        return "\n".join(lines)

    def sets_without_positives(self) -> list[str]:
        """The non-empty sets (in train, val, test order) where no patient has a box."""
        return [name for name, recs in self.sets.items() if recs and not any(r.boxes for r in recs)]

    def positives_warning(self) -> str | None:
        """One line for the user when a set holds no patient with boxes (what that costs, what to do), else
        ``None``. A split of few patients, or with small fractions, can leave a set with no Lung Opacity
        patient: the stratification spreads positives in proportion, and a proportion can round to 0."""
        names = self.sets_without_positives()
        if not names:
            return None
        cost = {"train": "the model has no box to learn from",
                "val": "validation mAP cannot reward a right box, so the threshold it chooses means little",
                "test": "the test score can only count false positives"}
        which = " and ".join(names)
        counts = ", ".join(f"{name} {len(self.sets[name])}" for name in names)
        return (f"the {which} set{'s have' if len(names) > 1 else ' has'} no patient with boxes ({counts} "
                f"patients): {'; '.join(cost[name] for name in names)}; split more patients, or use --val/--test "
                "fractions that leave positives in every set")


# ------------------------------------------------------------------------------------------ strata
def _strata(records: Sequence[PatientRecord], min_size: int) -> np.ndarray:
    """A stratum id per record: class x box count, with strata under ``min_size`` merged within a class."""
    keys = [(r.label_class, len(r.boxes)) for r in records]
    sizes = Counter(keys)
    merged: dict[tuple[str, int], tuple[str, int]] = {}
    for cls in sorted({k[0] for k in sizes}):
        counts = sorted(n for c, n in sizes if c == cls)
        groups: list[list[int]] = []
        carry: list[int] = []
        for n in reversed(counts):  # from most boxes down: a small group joins the next smaller count
            carry.append(n)
            if sum(sizes[(cls, m)] for m in carry) >= min_size:
                groups.append(carry)
                carry = []
        if carry:  # the smallest counts are still too few: join the group just above them
            if groups:
                groups[-1].extend(carry)
            else:
                groups.append(carry)
        for group in groups:
            for n in group:
                merged[(cls, n)] = (cls, min(group))
    ids = {key: i for i, key in enumerate(sorted(set(merged.values())))}
    return np.array([ids[merged[k]] for k in keys], dtype=np.int64)


def _apportion(sizes: np.ndarray, total: int, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole numbers per stratum summing to ``total``, proportional to ``sizes`` (largest remainder).

    Ties between equal remainders are broken at random so that no stratum is favoured by its position.
    """
    quota = sizes * (total / max(sizes.sum(), 1))
    alloc = np.minimum(np.floor(quota).astype(np.int64), caps)
    remainder = quota - alloc
    order = np.lexsort((rng.random(len(sizes)), -remainder))
    for i in order:
        if alloc.sum() >= total:
            break
        if alloc[i] < caps[i]:
            alloc[i] += 1
    return alloc


def _stratified_take(records: list[PatientRecord], n: int, rng: np.random.Generator,
                     strata: np.ndarray) -> tuple[list[int], list[int]]:
    """Indices of ``n`` records drawn proportionally from every stratum, and of the rest."""
    ids = np.unique(strata)
    members = [np.flatnonzero(strata == s) for s in ids]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    alloc = _apportion(sizes, n, sizes, rng)
    taken, rest = [], []
    for m, k in zip(members, alloc, strict=True):
        shuffled = rng.permutation(m)
        taken.extend(shuffled[:k].tolist())
        rest.extend(shuffled[k:].tolist())
    return taken, rest


# ------------------------------------------------------------------------------------------ public
def _check_fractions(val: float, test: float) -> None:
    for name, f in (("val", val), ("test", test)):
        if not 0.0 < f < 1.0:
            raise SplitError(f"{name} fraction must be between 0 and 1 (exclusive), got {f:g}")
    if val + test >= 1.0:
        raise SplitError(f"val + test = {val + test:g} leaves no patients for train")


def _min_patients(fraction: float) -> int:
    """The fewest patients for which ``round(n * fraction)`` is at least 1."""
    n = max(1, math.floor(0.5 / fraction))
    while round(n * fraction) < 1:
        n += 1
    return n


def split_patients(records: Sequence[PatientRecord], *, val: float = 0.1, test: float = 0.1,
                   samples: int | None = None, seed: int = 42, labels_only: bool = False) -> Split:
    """Split patients into train/val/test, stratified by class x boxes per patient.

    Args:
        records: one record per patient (from :func:`~pneumodet.data.rsna.load_rsna`).
        val, test: fractions of the (sampled) patients for validation and test.
        samples: first draw this many patients, stratified, for sample-size studies.
        seed: seed of the random generator; same records and seed give the same split.
        labels_only: split every record; otherwise only records with an ``image_path``.

    Raises:
        SplitError: fractions out of range, a patient listed twice, no patient with an image,
            ``samples`` larger than available, or a set that would be empty.
    """
    _check_fractions(val, test)
    ids = Counter(r.patient_id for r in records)
    twice = [pid for pid, n in ids.items() if n > 1]
    if twice:
        raise SplitError(f"{len(twice)} patient(s) listed more than once, e.g. {twice[0]}")
    pool = list(records) if labels_only else [r for r in records if r.image_path is not None]
    if not pool:
        raise SplitError(f"none of the {len(records)} patients has an image; pass labels_only=True "
                         "(--labels-only) to split the labels alone" if records else "no patients to split")
    # Sorting makes the split a function of the patient set and the seed, never of the input order.
    pool.sort(key=lambda r: r.patient_id)
    rng = np.random.default_rng(seed)
    min_size = math.ceil(1.0 / min(val, test))
    if samples is not None:
        what = "patients with an image" if not labels_only else "patients"
        if samples > len(pool):
            raise SplitError(f"samples={samples}: only {len(pool)} {what} available")
        if samples < 1:
            raise SplitError(f"samples={samples}: must be at least 1 (of {len(pool)} {what})")
        taken, _ = _stratified_take(pool, samples, rng, _strata(pool, min_size))
        pool = sorted((pool[i] for i in taken), key=lambda r: r.patient_id)

    n = len(pool)
    n_val, n_test = round(n * val), round(n * test)
    for name, k, f in (("val", n_val, val), ("test", n_test, test)):
        if k == 0:
            raise SplitError(f"the {name} set would be empty: {n} patients x {name} {f:g} = {n * f:g}, "
                             f"which rounds to 0; use at least {_min_patients(f)} patients or a larger fraction")
    if n - n_val - n_test <= 0:
        raise SplitError(f"the train set would be empty: {n} patients, {n_val} val and {n_test} test")

    strata = _strata(pool, min_size)
    val_idx, rest = _stratified_take(pool, n_val, rng, strata)
    rest.sort()
    sub = [pool[i] for i in rest]
    test_sub, train_sub = _stratified_take(sub, n_test, rng, strata[rest])
    chosen = {"val": {pool[i].patient_id for i in val_idx},
              "test": {sub[i].patient_id for i in test_sub}}
    # Each set keeps the input order of the records, which keeps the written files easy to compare.
    by_set: dict[str, list[PatientRecord]] = {name: [] for name in SET_NAMES}
    kept = {r.patient_id for r in pool}
    for r in records:
        if r.patient_id not in kept:
            continue
        name = "val" if r.patient_id in chosen["val"] else "test" if r.patient_id in chosen["test"] else "train"
        by_set[name].append(r)
    return Split(train=tuple(by_set["train"]), val=tuple(by_set["val"]), test=tuple(by_set["test"]), seed=seed,
                 val_fraction=val, test_fraction=test, samples=samples, labels_only=labels_only)


#: How the set CSVs are encoded: UTF-8, except that the bytes of a file name that are not UTF-8 are
#: written as they are, so that ``image_path`` gives back exactly the file it names.
_CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_split(split: Split, out_dir: Path, source: str | os.PathLike[str]) -> None:
    """Write ``train.csv``, ``val.csv``, ``test.csv`` (one row per patient) and ``split.json``, atomically.

    ``source`` (the data folder the records came from) is recorded in ``split.json`` as display text
    (:func:`~pneumodet.textsafe.display_path`: strict UTF-8 JSON whatever bytes the folder's name holds);
    the CSVs keep every ``image_path`` byte for byte.
    """
    out_dir = Path(out_dir)
    try:
        for name, recs in split.sets.items():
            with safeio.atomic_open(out_dir / f"{name}.csv", "w", newline="", **_CSV_ENCODING) as f:
                f.write(records_to_frame(recs).to_csv(index=False, lineterminator="\n"))
        meta = {
            "source": display_path(source),
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "test_fraction": split.test_fraction,
            "samples": split.samples,
            "labels_only": split.labels_only,
            "patients": {name: len(recs) for name, recs in split.sets.items()},
            "boxes": {name: sum(len(r.boxes) for r in recs) for name, recs in split.sets.items()},
            "classes": split.class_counts(),
        }
        safeio.write_json(out_dir / SPLIT_JSON, meta)
    except OSError as exc:
        raise SplitError(f"{display_path(out_dir)}: cannot write the split: {exc.strerror or exc}") from exc


def read_split(split_dir: Path) -> dict[str, list[PatientRecord]]:
    """The records of a split written by :func:`write_split`, keyed ``"train"``, ``"val"``, ``"test"``.

    Raises:
        SplitError: a file is missing or malformed, its patient count disagrees with ``split.json``,
            or a patient appears in two sets.
    """
    split_dir = Path(split_dir)
    meta_path = split_dir / SPLIT_JSON
    meta_name = display_path(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        expected = {name: int(meta["patients"][name]) for name in SET_NAMES}
    except FileNotFoundError as exc:
        raise SplitError(f"{meta_name}: not found (is {display_path(split_dir)} a split folder?)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SplitError(f"{meta_name}: unreadable split description: {exc}") from exc
    sets: dict[str, list[PatientRecord]] = {}
    seen: dict[str, str] = {}
    for name in SET_NAMES:
        path = split_dir / f"{name}.csv"
        shown = display_path(path)
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=_CSV_ENCODING["encoding"],
                                encoding_errors=_CSV_ENCODING["errors"])
            sets[name] = frame_to_records(frame, source=shown)
        except FileNotFoundError as exc:
            raise SplitError(f"{shown}: not found") from exc
        except (LabelsError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as exc:
            reason = " ".join(str(exc).split())  # the parser's messages end in a line break
            raise SplitError(reason if reason.startswith(shown) else f"{shown}: {reason}") from exc
        if len(sets[name]) != expected[name]:
            raise SplitError(f"{shown}: {len(sets[name])} patients, but {meta_name} says {expected[name]}")
        for r in sets[name]:
            if r.patient_id in seen:
                raise SplitError(f"patient {r.patient_id} is in both {seen[r.patient_id]}.csv and {name}.csv")
            seen[r.patient_id] = name
    return sets


def split_fingerprint(split_dir: Path) -> str:
    """SHA-256 over the split's three set files (names and bytes): what a run was trained and chosen on.

    A run records it at training time; ``evaluate`` and ``--resume`` refuse a split folder whose
    fingerprint has changed since (another split written over it, or the wrong folder).
    """
    import hashlib

    digest = hashlib.sha256()
    for name in SET_NAMES:
        path = Path(split_dir) / f"{name}.csv"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SplitError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        digest.update(f"{name}.csv:{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def fold_patients(records: Sequence[PatientRecord], folds: int, *,
                  seed: int = 42) -> list[tuple[PatientRecord, ...]]:
    """Divide patients into ``folds`` disjoint folds, stratified as :func:`split_patients` stratifies.

    Within each stratum (class x boxes per patient, small strata merged, here so that a stratum has at
    least ``folds`` patients) the patients are shuffled with ``numpy.random.default_rng(seed)``; the strata
    are then dealt out in turn, fold 1, 2, ..., K, 1, 2, ... continuing across strata, so every stratum is
    spread evenly (fold counts differ by at most one) and so are the fold sizes. As with
    :func:`split_patients`, the result depends only on the set of patients and the seed; each fold keeps
    the input order of its records.

    Raises:
        SplitError: fewer than 2 folds, more folds than patients, or a patient listed twice.
    """
    if folds < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, got {folds}")
    ids = Counter(r.patient_id for r in records)
    twice = [pid for pid, n in ids.items() if n > 1]
    if twice:
        raise SplitError(f"{len(twice)} patient(s) listed more than once, e.g. {twice[0]}")
    if len(records) < folds:
        raise SplitError(f"{folds} folds need at least {folds} patients, got {len(records)}")
    pool = sorted(records, key=lambda r: r.patient_id)
    rng = np.random.default_rng(seed)
    strata = _strata(pool, folds)
    order = np.concatenate([rng.permutation(np.flatnonzero(strata == s)) for s in np.unique(strata)])
    fold_of = {pool[i].patient_id: k % folds for k, i in enumerate(order.tolist())}
    return [tuple(r for r in records if fold_of[r.patient_id] == k) for k in range(folds)]
