"""Metrics a radiologist reads, beside the competition score: FROC, image-level ROC, COCO AP, calibration of
the class probabilities, and per-subgroup results with bootstrap confidence intervals.

Inputs are those of :func:`pneumodet.metrics.rsna_map` (ground truth: patient id -> ``[N, 4]`` xywh boxes;
predictions: patient id -> ``[M, 5]`` rows ``(confidence, x, y, w, h)``, every box the model proposes, not
only those above the run's threshold), plus per-image class labels and probabilities. The rules:

* **Lesion matching** (FROC): predictions of an image, most confident first, each take the still unmatched
  ground-truth box with the highest IoU >= :data:`LESION_IOU` (0.5), as :func:`~pneumodet.metrics.rsna_map`
  matches; a prediction that takes no box is a false positive, so each lesion is found at most once and a
  second box on it counts against the model.
* **FROC**: over all images, predictions in descending confidence; each distinct confidence is an operating
  point (tied predictions enter together) with sensitivity = lesions found / lesions and false positives per
  image = false positives / images (every image counts, with or without boxes). The sensitivity at a rate
  ``f`` is that of the last operating point with at most ``f`` false positives per image (0 before the
  first); where the model's boxes run out before ``f`` (it proposes fewer), the curve stays at its last
  sensitivity. The summary is the mean at :data:`FROC_FP_RATES` (1/8 .. 8), undefined without lesions.
* **COCO AP** is pycocotools' bbox AP for one category, area "all", at most :data:`COCO_MAX_DETECTIONS`
  boxes per image, IoU thresholds ``np.linspace(0.5, 0.95, 10)`` (IoU >= t), 101-point interpolated
  precision, detections of all images ranked by confidence (ties: image order, then within-image order).
  It matches like the rest, except that an exact IoU tie between two free boxes goes to the first box
  (pycocotools: the last). ``tests/test_metrics.py`` checks it against pycocotools.
* **Image-level ROC**: the label is the image's class (pneumonia = the positive class index given); the
  scores are the image's best box confidence (0 without a box) and the global head's probability of the
  class. AUC is Mann-Whitney's, ties counting one half; undefined with one class.
* **Calibration**: :data:`CALIBRATION_BINS` equal-width bins on [0, 1] (bin b holds [b/10, (b+1)/10), the
  last also 1.0); ECE = sum over bins of (images in bin / images) x |accuracy - mean confidence|, for the
  top-label confidence (max probability vs. argmax correct) and for the pneumonia probability (mean
  probability vs. fraction positive).
* **Subgroups and confidence intervals**: view position, sex and age band (header fields the image cache
  keeps, :func:`pneumodet.data.dicom.subgroup_fields`; anything missing or implausible is ``unknown``).
  Each group reports its patient, positive-patient and lesion counts, and, when it holds at least
  :data:`MIN_GROUP_PATIENTS` patients, the RSNA mAP at the run's threshold, the FROC mean and the
  best-box AUC, each with a 95 % percentile bootstrap interval over the group's patients
  (:data:`BOOTSTRAP_RESAMPLES` resamples, seeded from :data:`BOOTSTRAP_SEED` and the group's name, so
  the numbers repeat). An interval is ``None`` when the metric is undefined in more than
  :data:`MAX_UNDEFINED_RESAMPLES` of the resamples. RSNA has one image per patient, so patients are images.

Only aggregates leave this module: counts, metrics and curves of groups, never a patient's attributes.
Undefined values are NaN here and ``null`` in ``metrics.json`` (:func:`pneumodet.safeio.json_safe`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumodet.metrics import match_predictions, rsna_map

#: False positives per image at which the FROC sensitivity is read (the usual 1/8 .. 8).
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: IoU at which a prediction finds a lesion (FROC).
LESION_IOU = 0.5
#: pycocotools' IoU thresholds, exactly as it builds them (so an IoU on a threshold compares the same).
COCO_IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)
#: pycocotools' recall points of the interpolated precision.
COCO_RECALL_POINTS: np.ndarray = np.linspace(0.0, 1.0, 101)
#: pycocotools' default (and largest) boxes per image.
COCO_MAX_DETECTIONS = 100
#: Equal-width bins of the calibration on [0, 1].
CALIBRATION_BINS = 10
#: Age bands (label, from years inclusive, to years exclusive).
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<18", 0.0, 18.0), ("18-39", 18.0, 40.0), ("40-59", 40.0, 60.0), ("60+", 60.0, float("inf")))
#: The group of a patient whose attribute is missing or implausible.
UNKNOWN = "unknown"
#: Every group reported per attribute, always listed (a stable schema; empty groups count 0).
SUBGROUPS: dict[str, tuple[str, ...]] = {
    "view_position": ("AP", "PA", "other", UNKNOWN),
    "sex": ("F", "M", "O", UNKNOWN),
    "age_band": (*(band for band, _, _ in AGE_BANDS), UNKNOWN),
}
#: Bootstrap resamples per group, and the seed they start from.
BOOTSTRAP_RESAMPLES = 500
BOOTSTRAP_SEED = 0
#: Fewer patients than this: the group's metrics are withheld (too few to mean anything, and too close to
#: one patient's result).
MIN_GROUP_PATIENTS = 5
#: The largest share of resamples in which a metric may be undefined for its interval to be given.
MAX_UNDEFINED_RESAMPLES = 0.05
#: Work arrays of the bootstrap hold at most this many elements (resamples are processed in chunks).
_CHUNK_ELEMENTS = 1 << 22
#: The FROC reads its curve up to where the unweighted one has this many times the largest budget of false
#: positives; a resample still within its budget there is redone on the whole curve (exact either way).
_FROC_MARGIN = 1.5
#: The plotted curves: FROC sampled at these false positives per image, ROC at these false-positive rates.
FROC_CURVE_RATES: np.ndarray = 2.0 ** np.linspace(-6, 6, 49)
ROC_CURVE_FPR: np.ndarray = np.linspace(0.0, 1.0, 101)


# ------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class _Lesions:
    """Predictions of a set of images in descending confidence (ties: image order, then input order)."""

    confidence: np.ndarray  # [P]
    tp: np.ndarray  # [P] bool: found a lesion at LESION_IOU
    image: np.ndarray  # [P] image index
    lesions: np.ndarray  # [I] ground-truth boxes per image

    @classmethod
    def build(cls, confidence: np.ndarray, tp: np.ndarray, image: np.ndarray, lesions: np.ndarray) -> _Lesions:
        order = np.argsort(-confidence, kind="mergesort")  # inputs are image after image: ties by image
        return cls(confidence[order], tp[order], image[order], lesions)

    @property
    def tie_end(self) -> np.ndarray:
        """Positions closing a run of equal confidence: the operating points (tied boxes enter together)."""
        conf = self.confidence
        return np.flatnonzero(np.r_[conf[1:] != conf[:-1], True]) if len(conf) else np.zeros(0, np.int64)

    def subset(self, members: np.ndarray) -> _Lesions:
        """The same table over images ``members`` (indices), renumbered ``0 .. len(members) - 1``."""
        remap = np.full(len(self.lesions), -1, dtype=np.int64)
        remap[members] = np.arange(len(members))
        keep = remap[self.image] >= 0
        return _Lesions(self.confidence[keep], self.tp[keep], remap[self.image[keep]], self.lesions[members])


def _froc_sensitivity(table: _Lesions, weights: np.ndarray, rates: Sequence[float] | np.ndarray) -> np.ndarray:
    """``[B, R]`` FROC sensitivity at ``rates`` for each row of image weights ``[B, I]`` (bootstrap counts,
    or ones for the estimate itself); NaN where the weighted set has no lesion."""
    rates = np.asarray(rates, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.int64)
    lesions = weights @ table.lesions
    budget = rates[None, :] * weights.sum(axis=1)[:, None]  # [B, R] false positives allowed
    found = np.zeros(budget.shape)
    ends = table.tie_end
    if len(ends) and len(rates):
        # Most boxes lie far beyond the largest budget (8 per image): read the curve up to where the
        # unweighted one has spent _FROC_MARGIN times it, and redo on the whole table only the rows
        # (resamples) that have not spent their budget there.
        unweighted = np.cumsum(~table.tp)[ends]
        cut = int(np.searchsorted(unweighted, _FROC_MARGIN * rates.max() * len(table.lesions), side="right")) + 1
        found, spent = _froc_found(table, weights, ends[:cut], budget)
        redo = ~spent if cut < len(ends) else np.zeros(len(weights), dtype=bool)
        if redo.any():
            found[redo] = _froc_found(table, weights[redo], ends, budget[redo])[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lesions[:, None] > 0, found / lesions[:, None], np.nan)


def _froc_found(table: _Lesions, weights: np.ndarray, ends: np.ndarray,
                budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[B, R]`` (weighted) lesions found at the last operating point of ``ends`` within each budget, and
    ``[B]`` whether the last of ``ends`` is already over the largest budget (then later points cannot
    count)."""
    found = np.zeros(budget.shape)
    spent = np.zeros(len(weights), dtype=bool)
    last = int(ends[-1]) + 1
    tp = table.tp[:last]
    chunk = max(1, _CHUNK_ELEMENTS // last)
    # int32 halves the memory traffic where it holds every sum: a running sum is at most boxes x largest weight
    dtype = np.int32 if last * max(int(weights.max(initial=0)), 1) < 2**31 else np.int64
    for lo in range(0, len(weights), chunk):
        w = weights[lo : lo + chunk].astype(dtype)[:, table.image[:last]]
        hits = np.cumsum(w * tp, axis=1, dtype=dtype)[:, ends]
        false = np.cumsum(w, axis=1, dtype=dtype)[:, ends] - hits  # grows along each row: budgets are prefixes
        rows = np.arange(len(w))
        # one searchsorted for every row: row r's values shifted by r * span stay in their own range
        span = float(max(false[:, -1].max(), budget[lo : lo + chunk].max())) + 1.0
        shifted = (false + rows[:, None] * span).ravel()
        points = np.searchsorted(shifted, budget[lo : lo + chunk] + (rows * span)[:, None], side="right")
        points -= (rows * len(ends))[:, None]
        found[lo : lo + chunk] = np.where(points > 0, hits[rows[:, None], np.maximum(points - 1, 0)], 0)
        spent[lo : lo + chunk] = false[:, -1] > budget[lo : lo + chunk].max(axis=1)
    return found, spent


def _weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[B]`` ROC AUC (Mann-Whitney, ties one half) for each row of image weights ``[B, N]``; NaN where a
    row has one class."""
    labels = np.asarray(labels, dtype=bool)
    if len(labels) == 0:
        return np.full(len(weights), np.nan)
    order = np.argsort(scores, kind="mergesort")
    s, y, w = np.asarray(scores, np.float64)[order], labels[order], weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, np.nan)


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counting one half); NaN with a single class."""
    labels = np.asarray(labels, dtype=bool)
    return float(_weighted_auc(labels, np.asarray(scores, np.float64), np.ones((1, len(labels))))[0])


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n, n]`` counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(true) * n_classes + np.asarray(pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def image_class_metrics(true: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int) -> dict[str, Any]:
    """The global head as an image classifier: accuracy of the most probable class, the confusion matrix,
    each class's recall (its images predicted as it) and one-vs-rest AUC, their unweighted mean (macro
    AUC, over the classes present with some other class), and the AUC of class ``positive`` (pneumonia vs
    not). ``true`` ``[N]`` class indices, ``probs`` ``[N, C]``; NaN where a value is undefined (no image of
    a class, or a single class)."""
    true = np.asarray(true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(true), len(classes))
    predicted = probs.argmax(axis=1) if len(true) else np.zeros(0, np.int64)
    matrix = confusion_matrix(true, predicted, len(classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(matrix) / matrix.sum(axis=1)
    auc = np.array([binary_auc(true == k, probs[:, k]) for k in range(len(classes))])
    return {
        "classes": list(classes),
        "accuracy": float((predicted == true).mean()) if len(true) else float("nan"),
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class",
        "recall": dict(zip(classes, recall.astype(float).tolist(), strict=True)),
        "auc_one_vs_rest": dict(zip(classes, auc.tolist(), strict=True)),
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "pneumonia_auc": float(auc[positive]),
    }


# ------------------------------------------------------------------------------------------ FROC
@dataclass(frozen=True)
class FrocResult:
    """Lesion-level sensitivity at :data:`FROC_FP_RATES` false positives per image (see the module rules)."""

    sensitivity: dict[float, float]
    mean: float
    n_images: int
    n_lesions: int
    curve: list[tuple[float, float]]  # (false positives per image, sensitivity) at FROC_CURVE_RATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": f"a box finds a lesion at IoU >= {LESION_IOU} (greedy, most confident first); each "
                         "lesion is found at most once, other boxes are false positives",
            "sensitivity_at_fp_per_image": {_rate_key(r): s for r, s in self.sensitivity.items()},
            "mean_sensitivity": self.mean, "images": self.n_images, "lesions": self.n_lesions,
            "curve_fp_per_image_sensitivity": [list(point) for point in self.curve],
        }


def _rate_key(rate: float) -> str:
    """``0.125`` -> ``'1/8'``, ``2.0`` -> ``'2'``, ``0.3`` -> ``'0.3'``: how FROC rates are written."""
    return f"1/{round(1 / rate)}" if 0 < rate < 1 and (1 / rate).is_integer() else f"{rate:g}"


def _lesion_table(ground_truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray]) -> _Lesions:
    matches = match_predictions(ground_truth, predictions, (LESION_IOU,))
    return _Lesions.build(matches.confidence, matches.tp[:, 0], matches.image, matches.n_gt)


def froc(ground_truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray], *,
         fp_rates: Sequence[float] = FROC_FP_RATES) -> FrocResult:
    """The FROC of a set of images (rules in the module docstring).

    Raises:
        ValueError: as :func:`pneumodet.metrics.rsna_map`.
    """
    table = _lesion_table(ground_truth, predictions)
    return _froc_of(table, fp_rates)


def _froc_of(table: _Lesions, fp_rates: Sequence[float]) -> FrocResult:
    ones = np.ones((1, len(table.lesions)))
    sens = _froc_sensitivity(table, ones, fp_rates)[0]
    curve = _froc_sensitivity(table, ones, FROC_CURVE_RATES)[0]
    return FrocResult(
        sensitivity={float(r): float(s) for r, s in zip(fp_rates, sens, strict=True)},
        mean=float(sens.mean()), n_images=len(table.lesions), n_lesions=int(table.lesions.sum()),
        curve=[(float(r), float(s)) for r, s in zip(FROC_CURVE_RATES, curve, strict=True)],
    )


# ------------------------------------------------------------------------------------------ COCO AP
@dataclass(frozen=True)
class CocoResult:
    """pycocotools' bbox AP (one category, area all, 100 boxes per image); NaN without a ground-truth box."""

    ap: float
    per_threshold: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ap": self.ap, "ap50": self.per_threshold[float(COCO_IOU_THRESHOLDS[0])],
            "ap75": self.per_threshold[float(COCO_IOU_THRESHOLDS[5])],
            "per_iou_threshold": {f"{t:.2f}": v for t, v in self.per_threshold.items()},
            "definition": f"pycocotools bbox AP@[.50:.95], one category, area all, at most "
                          f"{COCO_MAX_DETECTIONS} boxes per image, 101-point interpolated precision",
        }


def coco_ap(ground_truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray], *,
            max_detections: int = COCO_MAX_DETECTIONS) -> CocoResult:
    """COCO-style AP@[.5:.95] as pycocotools computes it (rules in the module docstring).

    Raises:
        ValueError: as :func:`pneumodet.metrics.rsna_map`.
    """
    matches = match_predictions(ground_truth, predictions, COCO_IOU_THRESHOLDS)
    keep = matches.rank < max_detections  # a box's match depends only on more confident ones
    order = np.argsort(-matches.confidence[keep], kind="mergesort")
    tp = matches.tp[keep][order]
    n_gt = int(matches.n_gt.sum())
    per_t = np.full(len(COCO_IOU_THRESHOLDS), np.nan)
    if n_gt:
        tps = np.cumsum(tp, axis=0, dtype=np.float64)
        fps = np.cumsum(~tp, axis=0, dtype=np.float64)
        recall = tps / n_gt
        precision = tps / (tps + fps + np.spacing(1))  # pycocotools' guard, kept for equal numbers
        precision = np.maximum.accumulate(precision[::-1], axis=0)[::-1]  # the precision envelope
        for t in range(len(COCO_IOU_THRESHOLDS)):
            # the envelope at the first rank reaching each recall point; 0 where recall never gets there
            at = np.searchsorted(recall[:, t], COCO_RECALL_POINTS, side="left")
            reached = at < len(tp)
            per_t[t] = precision[at[reached], t].sum() / len(COCO_RECALL_POINTS)
    return CocoResult(float(per_t.mean()),
                      {float(t): float(v) for t, v in zip(COCO_IOU_THRESHOLDS, per_t, strict=True)})


# ------------------------------------------------------------------------------------------ ROC
def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of every distinct score cut-off (positive: score >= cut-off), from (0, 0) to (1, 1);
    empty arrays with a single class."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tpr = np.r_[0.0, np.cumsum(y)[ends] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~y)[ends] / n_neg]
    return fpr, tpr


def operating_point(labels: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity and the four counts of calling ``positive`` (bool per image)."""
    labels, positive = np.asarray(labels, dtype=bool), np.asarray(positive, dtype=bool)
    tp, fn = int((labels & positive).sum()), int((labels & ~positive).sum())
    tn, fp = int((~labels & ~positive).sum()), int((~labels & positive).sum())
    return {"sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "true_positives": tp, "false_positives": fp, "true_negatives": tn, "false_negatives": fn}


def _roc_entry(labels: np.ndarray, scores: np.ndarray, positive: np.ndarray, rule: str) -> dict[str, Any]:
    fpr, tpr = roc_points(labels, scores)
    curve = []
    if len(fpr):  # the best sensitivity at each false-positive rate of the grid (a step curve's samples)
        at = np.searchsorted(fpr, ROC_CURVE_FPR, side="right") - 1
        curve = [[float(x), float(tpr[i])] for x, i in zip(ROC_CURVE_FPR, at, strict=True)]
    return {"auc": binary_auc(labels, scores), "operating_point": {"rule": rule, **operating_point(labels, positive)},
            "curve_fpr_tpr": curve}


def best_box_scores(ground_truth: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[I]`` each image's highest box confidence (0 without a box), images in ``ground_truth`` order."""
    out = np.zeros(len(ground_truth))
    for i, pid in enumerate(ground_truth):
        rows = np.asarray(predictions.get(pid, ()), dtype=np.float64).reshape(-1, 5)
        if len(rows):
            out[i] = rows[:, 0].max()
    return out


# ------------------------------------------------------------------------------------------ calibration
def _reliability(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> tuple[float, list[dict[str, Any]]]:
    """ECE and the per-bin table of ``confidence`` (in [0, 1]) against ``outcome`` (0/1)."""
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    outcome = np.asarray(outcome, dtype=np.float64)
    index = np.minimum(np.floor(confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / count
        observed = np.bincount(index, outcome, minlength=bins) / count
    ece = float((count * np.abs(observed - mean_conf))[count > 0].sum() / count.sum()) if count.sum() else np.nan
    table = [{"range": [b / bins, (b + 1) / bins], "count": int(count[b]), "mean_confidence": float(mean_conf[b]),
              "observed": float(observed[b])} for b in range(bins)]
    return ece, table


def calibration(class_probs: np.ndarray, true_class: np.ndarray, *, positive: int,
                bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability tables and ECE of the class probabilities ``[N, C]`` against the true classes ``[N]``:
    top-label (max probability vs. argmax correct) and the ``positive`` class (its probability vs. being
    it). ECE is NaN without images."""
    true = np.asarray(true_class, dtype=np.int64).reshape(-1)
    probs = np.asarray(class_probs, dtype=np.float64).reshape(len(true), -1) if len(true) else np.zeros((0, 1))
    top_ece, top = _reliability(probs.max(axis=1, initial=0.0), probs.argmax(axis=1) == true, bins)
    pos_ece, pos = _reliability(probs[:, positive] if len(true) else np.zeros(0), true == positive, bins)
    return {
        "bins": f"{bins} equal-width bins on [0, 1]; ECE = sum over bins of (images in bin / images) x "
                "|observed - mean confidence|",
        "top_label": {"ece": top_ece, "observed": "argmax class correct", "reliability": top},
        "pneumonia": {"ece": pos_ece, "observed": "image is of the pneumonia class", "reliability": pos},
    }


# ------------------------------------------------------------------------------------------ subgroups
def age_band(age_years: float | None) -> str:
    """The :data:`AGE_BANDS` label of an age in years; :data:`UNKNOWN` for anything but a finite number."""
    if not isinstance(age_years, int | float) or isinstance(age_years, bool) or not np.isfinite(age_years):
        return UNKNOWN
    for band, lo, hi in AGE_BANDS:
        if lo <= age_years < hi:
            return band
    return UNKNOWN


def subgroup_labels(fields: Mapping[str, Any]) -> dict[str, str]:
    """One patient's group per attribute of :data:`SUBGROUPS` from its header fields (``view_position``,
    ``sex``, ``age_years``, as the image cache keeps them; a value outside the groups is :data:`UNKNOWN`)."""
    labels = {"view_position": fields.get("view_position"), "sex": fields.get("sex"),
              "age_band": age_band(fields.get("age_years"))}
    return {key: value if value in SUBGROUPS[key] else UNKNOWN for key, value in labels.items()}


@dataclass(frozen=True)
class _Images:
    """Per-image inputs of the group metrics, in ground-truth order."""

    image_ap: np.ndarray  # [I] RSNA image AP at the run's threshold (0 where not included)
    included: np.ndarray  # [I] bool: counted by the RSNA mean
    positive: np.ndarray  # [I] bool: the pneumonia class
    best_score: np.ndarray  # [I]
    lesions: _Lesions


def _group_metrics(images: _Images, members: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``[B]`` RSNA mAP, FROC mean and best-box AUC of the images ``members`` under weights ``[B, m]``."""
    included = images.included[members]
    with np.errstate(invalid="ignore", divide="ignore"):
        rsna = (weights @ (images.image_ap[members] * included)) / (weights @ included)
    return {
        "rsna_map": rsna,
        "froc_mean": _froc_sensitivity(images.lesions.subset(members), weights, FROC_FP_RATES).mean(axis=1),
        "image_auc": _weighted_auc(images.positive[members], images.best_score[members], weights),
    }


def _bootstrap_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, n]`` counts: how often each of ``n`` patients is drawn into each resample."""
    draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)


def _interval(values: np.ndarray) -> list[float] | None:
    defined = values[np.isfinite(values)]
    if len(values) == 0 or len(defined) < (1.0 - MAX_UNDEFINED_RESAMPLES) * len(values):
        return None
    return [float(v) for v in np.percentile(defined, [2.5, 97.5])]


def _group_entry(images: _Images, members: np.ndarray, resamples: int, seed: int, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "patients": len(members), "positive_patients": int(images.positive[members].sum()),
        "lesions": int(images.lesions.lesions[members].sum()),
    }
    metric_names = ("rsna_map", "froc_mean", "image_auc")
    if len(members) < MIN_GROUP_PATIENTS:
        return {**entry, **{key: {"value": None, "ci95": None} for key in metric_names}}
    point = _group_metrics(images, members, np.ones((1, len(members)), dtype=np.int64))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    spread = _group_metrics(images, members, _bootstrap_weights(len(members), resamples, rng))
    return {**entry, **{key: {"value": float(point[key][0]), "ci95": _interval(spread[key])}
                        for key in metric_names}}


def subgroup_results(images: _Images, labels: Sequence[Mapping[str, str]], *, resamples: int,
                     seed: int) -> dict[str, Any]:
    """Every group of :data:`SUBGROUPS` (and ``all``) with counts, metrics and bootstrap intervals."""
    out: dict[str, Any] = {
        "method": f"95% percentile bootstrap over patients, {resamples} resamples, seed {seed} (per group: "
                  f"the seed and the group's name); metrics withheld (null) for groups under "
                  f"{MIN_GROUP_PATIENTS} patients; an interval is null where the metric is undefined in over "
                  f"{MAX_UNDEFINED_RESAMPLES:.0%} of resamples",
        "metrics": {"rsna_map": "RSNA mAP at the run's threshold", "froc_mean": "FROC mean sensitivity",
                    "image_auc": "image-level pneumonia AUC of the best box score"},
        "age_bands_years": {band: [lo, None if hi == float("inf") else hi] for band, lo, hi in AGE_BANDS},
        "all": _group_entry(images, np.arange(len(labels)), resamples, seed, "all"),
    }
    blank = sum(all(row[key] == UNKNOWN for key in SUBGROUPS) for row in labels)
    if blank:
        out["note"] = (f"{blank} of {len(labels)} patients have no view position, sex or age: their DICOM "
                       "headers lack them, or their images were cached by a pneumodet that did not keep them "
                       "(delete the image cache folder to rebuild it with them)")
    for attribute, groups in SUBGROUPS.items():
        column = np.array([row[attribute] for row in labels], dtype=object)
        out[attribute] = {group: _group_entry(images, np.flatnonzero(column == group), resamples, seed,
                                              f"{attribute}={group}") for group in groups}
    return out


# ------------------------------------------------------------------------------------------ all of it
def reader_metrics(
    ground_truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    *,
    threshold: float,
    true_class: np.ndarray,
    class_probs: np.ndarray,
    positive: int,
    fields: Sequence[Mapping[str, Any]] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """The ``froc``, ``coco``, ``image_roc``, ``calibration`` and ``subgroups`` sections of ``metrics.json``.

    Args:
        ground_truth: as for :func:`pneumodet.metrics.rsna_map`; its order is the order of the per-image
            arguments below.
        predictions: every box proposed (not cut at ``threshold``): FROC, ROC and COCO AP sweep the
            confidence themselves; the RSNA mAP of the groups keeps boxes with confidence >= ``threshold``.
        threshold: the run's confidence threshold (chosen on validation).
        true_class: ``[I]`` class index of each image; class_probs: ``[I, C]`` the global head's probabilities.
        positive: the pneumonia class index.
        fields: per image, the header fields of :func:`subgroup_labels` (``None``: all unknown).

    Raises:
        ValueError: as :func:`pneumodet.metrics.rsna_map`; per-image arguments of the wrong length.
    """
    n = len(ground_truth)
    true = np.asarray(true_class, dtype=np.int64).reshape(-1)
    probs = np.asarray(class_probs, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, positive + 1))
    fields = [{}] * n if fields is None else list(fields)
    if len(true) != n or len(fields) != n:
        raise ValueError(f"{n} images but {len(true)} classes and {len(fields)} header records")
    lesions = _lesion_table(ground_truth, predictions)
    kept = {pid: rows[rows[:, 0] >= threshold]
            for pid, rows in ((p, np.asarray(r, np.float64).reshape(-1, 5)) for p, r in predictions.items())}
    per_image = rsna_map(ground_truth, kept).per_image
    image_ap = np.array([per_image[pid] if per_image[pid] is not None else 0.0 for pid in ground_truth])
    images = _Images(image_ap=image_ap, included=np.array([per_image[pid] is not None for pid in ground_truth]),
                     positive=true == positive, best_score=best_box_scores(ground_truth, predictions),
                     lesions=lesions)
    label = "image of the pneumonia class (RSNA Target 1)"
    return {
        "froc": _froc_of(lesions, FROC_FP_RATES).to_dict(),
        "coco": coco_ap(ground_truth, predictions).to_dict(),
        "image_roc": {
            "label": label,
            "best_box_score": _roc_entry(images.positive, images.best_score, images.best_score >= threshold,
                                         f"a box with confidence >= the run's threshold {threshold:.4g}"),
            "global_head": _roc_entry(images.positive, probs[:, positive] if n else np.zeros(0),
                                      probs.argmax(axis=1) == positive if n else np.zeros(0, bool),
                                      "the global head's most probable class is pneumonia"),
        },
        "calibration": calibration(probs, true, positive=positive),
        "subgroups": subgroup_results(images, [subgroup_labels(f) for f in fields], resamples=resamples,
                                      seed=seed),
    }
