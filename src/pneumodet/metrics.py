"""The RSNA Pneumonia Detection Challenge metric, and the confidence-threshold sweep built on it.

The competition score is a mean over images of an image AP::

    AP(image) = mean over t in {0.40, 0.45, ..., 0.75} of TP(t) / (TP(t) + FP(t) + FN(t))

Boxes are ``(x, y, width, height)`` in original image pixels (top-left corner, as in the labels
CSV and the submission file). The rules pinned here:

* **Image set.** The images scored are exactly the keys of ``ground_truth`` (a patient without
  boxes maps to an empty ``[0, 4]`` array). A patient missing from ``predictions`` has no
  predictions. Predictions for a patient that is not in ``ground_truth`` raise ``ValueError``:
  dropping them silently would hide a mismatch between the two files.
* **Empty images.** No ground truth and no prediction: the image is left out of the mean
  (``per_image`` is ``None``). No ground truth and any prediction: the image scores 0.
  Ground truth and no prediction: 0.
* **Threshold comparison.** A prediction can match a ground-truth box when IoU **>=** t. Kaggle's
  page says "above" the threshold, but the public ``map_iou`` (a Kaggle kernel, copied into the
  tatigabru and pdima solution code) uses ``>=``; taking the same rule keeps pneumodet's numbers
  comparable with the scores those solutions report. A tie needs the IoU to hit a threshold
  exactly, which only boxes on a coarse grid do with any frequency (labels are whole pixels,
  submissions carry one decimal); thresholds are exact decimal literals so such ties are exact.
* **Limits.** A coordinate beyond +-:data:`MAX_ABS_COORDINATE` px, more than
  :data:`MAX_GROUND_TRUTH_BOXES` ground-truth boxes or more than :data:`MAX_PREDICTED_BOXES`
  predictions for one image raise ``ValueError``: no X-ray is that large or that crowded (RSNA: 1024 px,
  at most 4 boxes), and the limits bound the cost, which grows with predictions x boxes per image
  (memory is further bounded by matching images in batches of at most :data:`_PAIRS_PER_BATCH` pairs).
* **Matching.** Prediction-centric greedy matching, as in Kaggle's description: predictions are
  taken in descending confidence (ties keep their input order), and each takes the still
  unmatched ground-truth box with the highest IoU >= t (IoU ties: the first box). The matching is
  redone at every threshold. ``map_iou`` instead loops over ground-truth boxes and gives each the
  most confident unmatched prediction with IoU >= t; the two differ only when a prediction
  overlaps several boxes above the threshold (``tests/test_metrics.py`` pins a case).

Prediction-centric matching has a useful property: the decision for a prediction depends only on
the predictions more confident than it. So one matching pass per image gives TP for *every*
confidence cut-off at once (a cumulative sum), which is how :func:`sweep_thresholds` evaluates
dozens of cut-offs for the price of one metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: IoU thresholds of the competition, 0.40 to 0.75 in steps of 0.05 (exact decimal literals, so an
#: IoU computed as an exact ratio such as 45/100 compares equal to 0.45).
RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)

#: Confidence cut-offs always tried by :func:`sweep_thresholds` (besides confidence quantiles).
DEFAULT_SWEEP_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))

#: Largest |coordinate| in pixels a box may have, ground truth or prediction: a thousand times an RSNA
#: image, yet far from where sums and areas of float64 coordinates overflow.
MAX_ABS_COORDINATE = 1e6
#: Most ground-truth boxes one image may have (RSNA has at most 4).
MAX_GROUND_TRUTH_BOXES = 100
#: Most predictions one image may have (a RetinaNet keeps 100 by default). With the ground-truth limit it
#: bounds the (prediction, box) pairs of one image to a million.
MAX_PREDICTED_BOXES = 10_000
#: Images are matched in batches holding at most this many (prediction, box) pairs (one image above it
#: forms a batch of its own), which bounds the memory of a metric call whatever the number of images.
_PAIRS_PER_BATCH = 1 << 20


# ------------------------------------------------------------------ IoU (box formats: pneumodet.boxes)
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable ``[..., 4]`` xywh boxes -> ``[...]``; 0 where the union has no area."""
    lo = np.maximum(a[..., :2], b[..., :2])
    hi = np.minimum(a[..., :2] + a[..., 2:], b[..., :2] + b[..., 2:])
    wh = np.clip(hi - lo, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou_xywh(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[M, 4]`` and ``[N, 4]`` xywh boxes -> ``[M, N]`` float64.

    A pair whose union has zero area (two degenerate boxes) has IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return _iou(a[:, None, :], b[None, :, :])


# ------------------------------------------------------------------ input checks
def check_boxes(patient_id: str, boxes: np.ndarray, columns: int, what: str) -> np.ndarray:
    """``boxes`` as float64 ``[K, columns]``; ``ValueError`` naming the patient if unusable.

    The metric's input rules for one image: ``columns`` is 4 for ground truth (``x, y, w, h``) and 5 for
    predictions (``confidence, x, y, w, h``, as the submission file holds them); ``K`` is at most
    :data:`MAX_GROUND_TRUTH_BOXES` or :data:`MAX_PREDICTED_BOXES`; every value is finite, coordinates
    within :data:`MAX_ABS_COORDINATE`, widths and heights not negative.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, columns)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise ValueError(f"{what} for patient {patient_id!r}: expected shape [K, {columns}], got {arr.shape}")
    if len(arr) > _max_boxes(columns):
        raise ValueError(f"{what} for patient {patient_id!r}: {len(arr)} boxes, more than the "
                         f"{_max_boxes(columns)} one image may have")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} for patient {patient_id!r}: NaN or infinite value")
    if (np.abs(arr[:, -4:]) > MAX_ABS_COORDINATE).any():
        raise ValueError(f"{what} for patient {patient_id!r}: a coordinate beyond "
                         f"+-{MAX_ABS_COORDINATE:g} px")
    if (arr[:, -2:] < 0).any():
        raise ValueError(f"{what} for patient {patient_id!r}: negative width or height")
    return arr


def _max_boxes(columns: int) -> int:
    """The most rows one image may have: predictions have 5 columns, ground truth 4."""
    return MAX_PREDICTED_BOXES if columns == 5 else MAX_GROUND_TRUTH_BOXES


def _flatten(
    boxes: Mapping[str, np.ndarray], ids: list[str], columns: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Every image's array stacked -> ``[K, columns]`` float64 and ``[I]`` counts, checked as a whole."""
    arrays = [np.asarray(boxes.get(pid, ()), dtype=np.float64) for pid in ids]
    for pid, arr in zip(ids, arrays, strict=True):
        if arr.size and (arr.ndim != 2 or arr.shape[1] != columns):
            check_boxes(pid, arr, columns, what)  # raises, naming the patient
    arrays = [arr.reshape(-1, columns) for arr in arrays]
    counts = np.array([len(arr) for arr in arrays], dtype=np.int64)
    crowded = np.flatnonzero(counts > _max_boxes(columns))
    if len(crowded):
        check_boxes(ids[crowded[0]], arrays[crowded[0]], columns, what)  # raises, naming the patient
    flat = np.concatenate(arrays) if arrays else np.zeros((0, columns))
    with np.errstate(invalid="ignore"):  # NaN is reported below, by name
        bad = (~np.isfinite(flat).all(axis=1) | (np.abs(flat[:, -4:]) > MAX_ABS_COORDINATE).any(axis=1)
               | (flat[:, -2:] < 0).any(axis=1))
    if bad.any():
        image = int(np.searchsorted(np.cumsum(counts), np.flatnonzero(bad)[0], side="right"))
        check_boxes(ids[image], arrays[image], columns, what)  # raises, naming the patient
    return flat, counts


# ------------------------------------------------------------------ matching
def greedy_matches(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Which predictions of one image are true positives at each IoU threshold.

    Args:
        iou: ``[M, N]`` IoU of M predictions, **sorted by descending confidence**, with N
            ground-truth boxes.
        thresholds: ``[T]`` IoU thresholds.

    Returns:
        ``[M, T]`` bool: prediction ``i`` matched a ground-truth box at threshold ``t``.
    """
    m, n = iou.shape
    t = len(thresholds)
    tp = np.zeros((m, t), dtype=bool)
    if m == 0 or n == 0:
        return tp
    hits = iou[:, None, :] >= thresholds[None, :, None]  # [M, T, N]
    matched = np.zeros((t, n), dtype=bool)
    rows = np.arange(t)
    # A prediction that reaches no box at any threshold is a false positive and changes nothing.
    for i in np.flatnonzero(hits.any(axis=(1, 2))):
        free = hits[i] & ~matched  # [T, N]
        best = np.where(free, iou[i][None, :], -1.0).argmax(axis=1)  # [T]
        ok = free[rows, best]
        matched[rows[ok], best[ok]] = True
        tp[i] = ok
    return tp


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


@dataclass(frozen=True)
class _MatchTable:
    """Every image's matching, laid out flat so that any confidence cut-off is a few numpy ops.

    Predictions are stacked image after image, each image's sorted by descending confidence
    (ties in input order); image ``i`` owns rows ``pred_start[i] : pred_start[i] + M_i``. Row ``j``
    of ``tp_cumsum`` counts, per IoU threshold, the true positives among stacked predictions
    ``0 .. j-1``, so an image keeping its ``k`` most confident predictions has
    ``tp_cumsum[pred_start + k] - tp_cumsum[pred_start]`` true positives.
    """

    patient_ids: list[str]
    n_gt: np.ndarray  # [I]
    confidence: np.ndarray  # [P]
    pred_image: np.ndarray  # [P] image index of each prediction
    pred_start: np.ndarray  # [I]
    tp_cumsum: np.ndarray  # [P + 1, T]

    @classmethod
    def build(
        cls,
        ground_truth: Mapping[str, np.ndarray],
        predictions: Mapping[str, np.ndarray],
        thresholds: np.ndarray,
    ) -> _MatchTable:
        unknown = [pid for pid in predictions if pid not in ground_truth]
        if unknown:
            raise ValueError(
                f"predictions for {len(unknown)} patient(s) not in the ground truth, "
                f"e.g. {', '.join(map(repr, unknown[:3]))}"
            )
        if thresholds.ndim != 1 or len(thresholds) == 0:
            raise ValueError(f"IoU thresholds must be a non-empty list, got {thresholds.tolist()}")
        ids = list(ground_truth)
        gt, n_gt = _flatten(ground_truth, ids, 4, "ground-truth boxes")
        pred, n_pred = _flatten(predictions, ids, 5, "predictions")
        pred_image = np.repeat(np.arange(len(ids)), n_pred)
        pred = pred[np.lexsort((-pred[:, 0], pred_image))]  # stable: ties keep input order
        pred_start = _segment_starts(n_pred)
        tp = _match_in_batches(pred[:, 1:], n_pred, gt, n_gt, thresholds)
        tp_cumsum = np.zeros((len(pred) + 1, len(thresholds)), dtype=np.int64)
        np.cumsum(tp, axis=0, out=tp_cumsum[1:])
        return cls(ids, n_gt, pred[:, 0], pred_image, pred_start, tp_cumsum)

    def precision(self, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep predictions with confidence >= ``min_confidence``.

        Returns:
            ``[I, T]`` float precision TP / (TP + FP + FN) per image and threshold, and ``[I]`` bool
            ``included`` (False for an image with neither ground truth nor kept prediction; its
            precision row is 0 and must be ignored).
        """
        kept = np.bincount(self.pred_image[self.confidence >= min_confidence], minlength=len(self.n_gt))
        tp = self.tp_cumsum[self.pred_start + kept] - self.tp_cumsum[self.pred_start]  # [I, T]
        denom = kept[:, None] + self.n_gt[:, None] - tp  # TP + FP + FN
        prec = np.divide(tp, denom, out=np.zeros(tp.shape), where=denom > 0)
        return prec, (kept + self.n_gt) > 0


def _match_in_batches(pred: np.ndarray, n_pred: np.ndarray, gt: np.ndarray, n_gt: np.ndarray,
                      thresholds: np.ndarray) -> np.ndarray:
    """:func:`_match_all` over runs of consecutive images holding at most :data:`_PAIRS_PER_BATCH` pairs."""
    tp = np.zeros((len(pred), len(thresholds)), dtype=bool)
    pred_start, gt_start = _segment_starts(n_pred), _segment_starts(n_gt)
    pairs = np.cumsum(n_pred * n_gt)
    first = 0
    while first < len(n_pred):
        done = pairs[first - 1] if first else 0
        # at least one image per batch, then as many more as fit
        last = max(first + 1, int(np.searchsorted(pairs, done + _PAIRS_PER_BATCH, side="right")))
        p0, p1 = pred_start[first], pred_start[last - 1] + n_pred[last - 1]
        g0, g1 = gt_start[first], gt_start[last - 1] + n_gt[last - 1]
        counts_p, counts_g = n_pred[first:last], n_gt[first:last]
        tp[p0:p1] = _match_all(pred[p0:p1], _segment_starts(counts_p), counts_p, gt[g0:g1],
                               _segment_starts(counts_g), counts_g, thresholds)
        first = last
    return tp


def _match_all(
    pred: np.ndarray,
    pred_start: np.ndarray,
    n_pred: np.ndarray,
    gt: np.ndarray,
    gt_start: np.ndarray,
    n_gt: np.ndarray,
    thresholds: np.ndarray,
) -> np.ndarray:
    """:func:`greedy_matches` for every image at once -> ``[P, T]`` bool.

    ``pred`` ``[P, 4]`` and ``gt`` ``[G, 4]`` are xywh boxes stacked per image (predictions sorted
    by descending confidence within each image). The IoU of every (prediction, box) pair of the
    same image is computed in one vectorised call. A pair that is the only one above the lowest
    threshold for both its prediction and its box is a match exactly when IoU >= t, whatever the
    order; only images with competing pairs run the greedy loop.
    """
    tp = np.zeros((len(pred), len(thresholds)), dtype=bool)
    n_pairs = n_pred * n_gt
    pair_image = np.repeat(np.arange(len(n_pairs)), n_pairs)
    offset = np.arange(n_pairs.sum()) - np.repeat(_segment_starts(n_pairs), n_pairs)
    per_row = n_gt[pair_image]  # pairs are laid out [M_i, N_i] row-major per image
    pi = pred_start[pair_image] + offset // per_row
    gi = gt_start[pair_image] + offset % per_row
    iou = _iou(pred[pi], gt[gi])
    cand = iou >= thresholds.min()
    pred_rivals = np.bincount(pi[cand], minlength=len(pred))[pi]
    gt_rivals = np.bincount(gi[cand], minlength=len(gt))[gi]
    shared = (pred_rivals > 1) | (gt_rivals > 1)
    alone = cand & ~shared
    tp[pi[alone]] = iou[alone, None] >= thresholds[None, :]
    pair_start = _segment_starts(n_pairs)
    for i in np.unique(pair_image[cand & shared]):
        block = iou[pair_start[i] : pair_start[i] + n_pairs[i]].reshape(n_pred[i], n_gt[i])
        tp[pred_start[i] : pred_start[i] + n_pred[i]] = greedy_matches(block, thresholds)
    return tp


# ------------------------------------------------------------------ results
def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


@dataclass(frozen=True)
class MapResult:
    """The RSNA score of a set of predictions.

    ``score`` is NaN when no image is included (no ground-truth box and no prediction anywhere).
    """

    score: float
    per_threshold: dict[float, float]
    per_image: dict[str, float | None]
    n_images: int
    n_excluded: int

    def summary(self) -> str:
        lines = [
            f"RSNA mAP {self.score:.4f} over {self.n_images} image(s) "
            f"({self.n_excluded} excluded: no ground truth and no prediction)",
            "  IoU threshold  precision",
        ]
        lines += [f"  {t:>13.2f}  {p:.4f}" for t, p in self.per_threshold.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form (``per_threshold`` keys as strings; excluded images and NaN as ``None``)."""
        return {
            "score": _finite_or_none(self.score),
            "per_threshold": {f"{t:.2f}": _finite_or_none(p) for t, p in self.per_threshold.items()},
            "n_images": self.n_images,
            "n_excluded": self.n_excluded,
            "per_image": self.per_image,
        }


@dataclass(frozen=True)
class SweepResult:
    """The confidence cut-off that maximises the RSNA score; ``table`` holds every cut-off tried."""

    best_threshold: float
    best_score: float
    table: list[tuple[float, float]]

    def summary(self) -> str:
        return f"best confidence threshold {self.best_threshold:.4g}: RSNA mAP {self.best_score:.4f}"


def _mean_over_included(prec: np.ndarray, included: np.ndarray) -> np.ndarray:
    """``[T]`` mean precision over the included images (NaN when none is)."""
    if not included.any():
        return np.full(prec.shape[1], np.nan)
    return prec[included].mean(axis=0)


# ------------------------------------------------------------------ public API
def rsna_map(
    ground_truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    *,
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> MapResult:
    """The competition metric (see the module docstring for every rule).

    Args:
        ground_truth: patient id -> ``[N, 4]`` boxes ``(x, y, w, h)``; ``[0, 4]`` for no box.
            Its keys are the images scored.
        predictions: patient id -> ``[M, 5]`` rows ``(confidence, x, y, w, h)``; a missing
            patient has no prediction. Every key must be in ``ground_truth``.
        thresholds: IoU thresholds to average over.

    Raises:
        ValueError: a prediction for an unknown patient, or a malformed box array.
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    table = _MatchTable.build(ground_truth, predictions, thr)
    prec, included = table.precision(-np.inf)
    per_t = _mean_over_included(prec, included)
    image_ap = prec.mean(axis=1)
    return MapResult(
        score=float(per_t.mean()),
        per_threshold={float(t): float(p) for t, p in zip(thresholds, per_t, strict=True)},
        per_image={
            pid: float(ap) if inc else None
            for pid, ap, inc in zip(table.patient_ids, image_ap, included, strict=True)
        },
        n_images=int(included.sum()),
        n_excluded=int((~included).sum()),
    )


def default_confidence_grid(confidences: np.ndarray) -> np.ndarray:
    """Cut-offs 0.05, 0.10, ..., 0.95 plus the 0 %, 5 %, ..., 100 % quantiles of ``confidences``."""
    grid = np.asarray(DEFAULT_SWEEP_GRID, dtype=np.float64)
    if len(confidences):
        grid = np.concatenate([grid, np.quantile(confidences, np.linspace(0.0, 1.0, 21))])
    return np.unique(grid)


def sweep_thresholds(
    ground_truth: Mapping[str, np.ndarray],
    scored_predictions: Mapping[str, np.ndarray],
    thresholds: Sequence[float] | None = None,
    *,
    iou_thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> SweepResult:
    """The confidence cut-off (keep boxes with confidence >= it) that maximises :func:`rsna_map`.

    Matching runs once; each cut-off then costs O(images + predictions) numpy work. Every score in
    the table equals ``rsna_map`` on the predictions filtered at that cut-off.

    Args:
        ground_truth: as for :func:`rsna_map` (typically the validation set).
        scored_predictions: as for :func:`rsna_map`, with all boxes the model proposes.
        thresholds: confidence cut-offs to try; default :func:`default_confidence_grid`.
        iou_thresholds: as ``thresholds`` of :func:`rsna_map`.

    Returns:
        The best cut-off (the lowest one on a tie), its score and the ``(cut-off, score)`` table in
        ascending cut-off order (NaN where a cut-off leaves no image to score).

    Raises:
        ValueError: as :func:`rsna_map`; also when no cut-off leaves an image to score (no
            ground-truth box at all and no prediction above any cut-off).
    """
    table = _MatchTable.build(ground_truth, scored_predictions, np.asarray(iou_thresholds, np.float64))
    grid = default_confidence_grid(table.confidence) if thresholds is None else np.unique(thresholds)
    if len(grid) == 0:
        raise ValueError("no confidence cut-off to try")
    scores = np.array([_mean_over_included(*table.precision(c)).mean() for c in grid])
    if np.isnan(scores).all():
        raise ValueError("no image can be scored at any cut-off: no ground-truth box and no prediction")
    best = int(np.nanargmax(scores))
    return SweepResult(
        best_threshold=float(grid[best]),
        best_score=float(scores[best]),
        table=[(float(c), float(s)) for c, s in zip(grid, scores, strict=True)],
    )


@dataclass(frozen=True)
class PredictionMatches:
    """Every prediction of a set of images, matched to the ground truth by :func:`rsna_map`'s rules.

    Predictions are stacked image after image (images in ``ground_truth`` order), each image's sorted by
    descending confidence (ties in input order); ``tp[j, t]`` says whether prediction ``j`` matched a
    ground-truth box at IoU threshold ``t``. Prediction-centric greedy matching makes a prediction's
    decision depend only on its image's more confident predictions, so any confidence cut-off, or keeping
    an image's ``k`` most confident predictions, leaves the other rows' decisions unchanged.
    """

    patient_ids: list[str]
    n_gt: np.ndarray  # [I] ground-truth boxes per image
    confidence: np.ndarray  # [P]
    image: np.ndarray  # [P] index into patient_ids
    rank: np.ndarray  # [P] position within its image (0: the most confident)
    tp: np.ndarray  # [P, T] bool


def match_predictions(
    ground_truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    iou_thresholds: Sequence[float],
) -> PredictionMatches:
    """Match every prediction once (the inputs and their checks as for :func:`rsna_map`).

    Raises:
        ValueError: as :func:`rsna_map`.
    """
    table = _MatchTable.build(ground_truth, predictions, np.asarray(iou_thresholds, dtype=np.float64))
    tp = np.diff(table.tp_cumsum, axis=0) > 0
    rank = np.arange(len(table.pred_image)) - table.pred_start[table.pred_image]
    return PredictionMatches(table.patient_ids, table.n_gt, table.confidence, table.pred_image, rank, tp)
