"""The RSNA metric on hand-worked examples, against a plain re-implementation, and the sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumodet import metrics
from pneumodet.boxes import xywh_to_xyxy, xyxy_to_xywh
from pneumodet.metrics import RSNA_IOU_THRESHOLDS, box_iou_xywh, greedy_matches, rsna_map, sweep_thresholds

BOX = [0.0, 0.0, 100.0, 100.0]  # x, y, w, h
NO_BOX = np.zeros((0, 4))


def pred(*rows: tuple[float, ...]) -> np.ndarray:
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def gt(*boxes: list[float]) -> np.ndarray:
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def image_ap(truth: np.ndarray, predictions: np.ndarray) -> float | None:
    return rsna_map({"p": truth}, {"p": predictions}).per_image["p"]


# ------------------------------------------------------------------ an independent, plain re-implementation
def plain_iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = min(ax2, bx2) - max(a[0], b[0])
    ih = min(ay2, by2) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def plain_map_iou(boxes_true, boxes_pred, scores, thresholds=RSNA_IOU_THRESHOLDS):
    """The public ``map_iou`` loop: ground-truth-centric, each GT takes the first unmatched prediction."""
    if len(boxes_true) == 0 and len(boxes_pred) == 0:
        return None
    if len(boxes_true) == 0:
        return 0.0
    order = sorted(range(len(boxes_pred)), key=lambda i: -scores[i])
    boxes_pred = [boxes_pred[i] for i in order]
    total = 0.0
    for t in thresholds:
        matched = set()
        tp = 0
        for g in boxes_true:
            for j, p in enumerate(boxes_pred):
                if j not in matched and plain_iou(g, p) >= t:
                    matched.add(j)
                    tp += 1
                    break
        fp = len(boxes_pred) - tp
        fn = len(boxes_true) - tp
        total += tp / (tp + fp + fn)
    return total / len(thresholds)


def plain_prediction_centric_ap(boxes_true, boxes_pred, scores, thresholds=RSNA_IOU_THRESHOLDS):
    """Kaggle's description, looped: each prediction, most confident first, takes its best free box."""
    if len(boxes_true) == 0 and len(boxes_pred) == 0:
        return None
    order = sorted(range(len(boxes_pred)), key=lambda i: -scores[i])  # stable: ties in input order
    total = 0.0
    for t in thresholds:
        free = list(range(len(boxes_true)))
        tp = 0
        for i in order:
            ious = [(plain_iou(boxes_pred[i], boxes_true[g]), -g) for g in free]
            best = max(ious, default=(0.0, 0))
            if ious and best[0] >= t:
                free.remove(-best[1])
                tp += 1
        total += tp / (len(boxes_true) + len(boxes_pred) - tp)
    return total / len(thresholds)


def plain_dataset_score(truth, predictions):
    scores = []
    for pid, boxes in truth.items():
        p = predictions.get(pid, np.zeros((0, 5)))
        s = plain_map_iou([list(b) for b in boxes], [list(r[1:]) for r in p], list(p[:, 0]))
        if s is not None:
            scores.append(s)
    return float(np.mean(scores))


# ------------------------------------------------------------------ box helpers
def test_box_format_round_trip_and_values():
    xywh = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 5.0]])
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[10, 20, 40, 60], [0, 0, 0, 5]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)


def test_iou_known_values_and_degenerate_boxes():
    iou = box_iou_xywh(gt([0, 0, 100, 60], [50, 0, 100, 100], [300, 300, 10, 10], [0, 0, 0, 0]), gt(BOX))
    # 6000 / 10000; 5000 / 15000; disjoint; zero-area box against a real one
    np.testing.assert_allclose(iou[:, 0], [0.6, 1 / 3, 0.0, 0.0])
    with np.errstate(all="raise"):  # two zero-area boxes: IoU 0, no division warning
        assert box_iou_xywh(gt([5, 5, 0, 0]), gt([5, 5, 0, 0]))[0, 0] == 0.0
    assert box_iou_xywh(NO_BOX, gt(BOX)).shape == (0, 1)


# ------------------------------------------------------------------ hand-worked images
def test_no_ground_truth_and_no_prediction_is_excluded():
    result = rsna_map({"empty": NO_BOX, "hit": gt(BOX)}, {"hit": pred((0.9, *BOX))})
    assert result.per_image == {"empty": None, "hit": 1.0}
    assert (result.n_images, result.n_excluded) == (1, 1)
    assert result.score == 1.0  # not pulled down to 0.5 by the excluded image


def test_only_excluded_images_give_nan():
    result = rsna_map({"a": NO_BOX}, {})
    assert math.isnan(result.score) and result.n_images == 0
    assert result.to_dict()["score"] is None


def test_no_ground_truth_with_predictions_scores_zero_and_counts():
    result = rsna_map({"fp": NO_BOX, "hit": gt(BOX)}, {"fp": pred((0.1, 5, 5, 10, 10)), "hit": pred((0.9, *BOX))})
    assert result.per_image == {"fp": 0.0, "hit": 1.0}
    assert result.score == 0.5


def test_ground_truth_without_predictions_scores_zero():
    assert image_ap(gt(BOX, [500, 500, 50, 50]), pred()) == 0.0
    result = rsna_map({"p": gt(BOX)}, {})  # patient absent from predictions = no prediction
    assert result.per_image == {"p": 0.0} and result.n_images == 1


def test_perfect_predictions_score_one():
    truth = {"a": gt(BOX, [400, 400, 120, 80]), "b": gt([10.5, 20.25, 33.0, 44.0]), "c": NO_BOX}
    preds = {pid: np.column_stack([np.full(len(b), 0.7), b]) for pid, b in truth.items()}
    result = rsna_map(truth, preds)
    assert result.score == 1.0
    assert all(p == 1.0 for p in result.per_threshold.values())
    assert result.per_image["c"] is None


def test_two_predictions_on_one_box_are_tp_plus_fp_at_every_threshold():
    result = rsna_map({"p": gt(BOX)}, {"p": pred((0.9, *BOX), (0.8, *BOX))})
    assert all(v == 0.5 for v in result.per_threshold.values())  # 1 / (1 + 1 + 0)
    assert result.score == 0.5


def test_one_prediction_over_two_boxes_matches_only_one():
    # The prediction covers both boxes exactly: IoU 0.5 with each.
    truth = gt(BOX, [100, 0, 100, 100])
    result = rsna_map({"p": truth}, {"p": pred((0.9, 0, 0, 200, 100))})
    expected = {t: (0.5 if t <= 0.5 else 0.0) for t in RSNA_IOU_THRESHOLDS}  # TP1 FN1 / TP0 FP1 FN2
    assert result.per_threshold == pytest.approx(expected)
    assert result.score == pytest.approx(3 * 0.5 / 8)


@pytest.mark.parametrize("height", [40, 45, 50, 55, 60, 65, 70, 75])
def test_iou_exactly_at_a_threshold_counts_as_a_match(height):
    # A 100 x height box inside the 100 x 100 box: IoU is exactly height / 100.
    p = pred((0.9, 0, 0, 100, height))
    assert box_iou_xywh(p[:, 1:], gt(BOX))[0, 0] == height / 100
    result = rsna_map({"p": gt(BOX)}, {"p": p})
    n_hits = (height - 40) // 5 + 1  # thresholds 0.40 ... height/100, all inclusive
    assert [v for v in result.per_threshold.values()] == [1.0] * n_hits + [0.0] * (8 - n_hits)
    assert result.score == pytest.approx(n_hits / 8)


def test_hand_computed_multi_threshold_example():
    # IoU 0.6: TP at 0.40-0.60 (precision 1), FP + FN above (0) -> 5/8.
    assert image_ap(gt(BOX), pred((0.5, 0, 0, 100, 60))) == pytest.approx(5 / 8)
    # Add a miss and a false positive: at 0.40-0.60 TP1 FP1 FN1 (1/3), above TP0 FP2 FN2 (0).
    truth = gt(BOX, [500, 500, 100, 100])
    assert image_ap(truth, pred((0.5, 0, 0, 100, 60), (0.4, 800, 800, 50, 50))) == pytest.approx(5 / 8 / 3)


# Two adjacent boxes A, B and a prediction P1 = [0,0,190,100] straddling them:
# IoU(P1, A) = 10000 / 19000 = 0.526, IoU(P1, B) = 9000 / 20000 = 0.45. P2 = A exactly.
A, B = [0.0, 0.0, 100.0, 100.0], [100.0, 0.0, 100.0, 100.0]
STRADDLE_A = [0.0, 0.0, 190.0, 100.0]


def test_confidence_order_decides_which_prediction_matches():
    truth = gt(A, B)
    # P1 first: it takes A (its best box) at 0.40-0.50, so P2 (= A) finds nothing: 1/3 everywhere.
    assert image_ap(truth, pred((0.9, *STRADDLE_A), (0.3, *A))) == pytest.approx(1 / 3)
    # P2 first: P2 takes A, P1 then takes B at 0.40 and 0.45 (precision 1); 1/3 at 0.50-0.75.
    assert image_ap(truth, pred((0.3, *STRADDLE_A), (0.9, *A))) == pytest.approx((2 * 1 + 6 / 3) / 8)
    # Input order does not matter, only confidence.
    assert image_ap(truth, pred((0.9, *A), (0.3, *STRADDLE_A))) == pytest.approx(0.5)


def test_prediction_centric_matching_differs_from_ground_truth_centric_in_multi_overlap():
    # P1 = [10,0,190,100]: IoU with A 9000/20000 = 0.45, with B 10000/19000 = 0.526; P2 = A.
    truth, p1 = gt(A, B), [10.0, 0.0, 190.0, 100.0]
    preds = pred((0.9, *p1), (0.3, *A))
    # Prediction-centric (ours, Kaggle's description): P1 takes B (its best box), P2 takes A:
    # precision 1 at 0.40-0.50, 1/3 at 0.55-0.75 -> (3 + 5/3) / 8 = 7/12.
    assert image_ap(truth, preds) == pytest.approx(7 / 12)
    # Ground-truth-centric (map_iou): A, listed first, grabs P1 at 0.40 and 0.45 and B is missed:
    # (1/3 + 1/3 + 1 + 5/3) / 8 = 5/12.
    assert plain_map_iou(truth.tolist(), [p1, A], [0.9, 0.3]) == pytest.approx(5 / 12)


def test_equal_iou_with_two_boxes_takes_the_first_box():
    iou = np.array([[0.5, 0.5], [0.5, 0.0]])
    tp = greedy_matches(iou, np.array([0.4]))
    assert tp[:, 0].tolist() == [True, False]  # the first prediction took box 0, the second has none


# ------------------------------------------------------------------ cross-check on random data
def separated_dataset(rng: np.random.Generator, n_images: int):
    """Random images where no prediction can reach IoU 0.4 with two boxes, so both matchings agree.

    Ground-truth boxes sit in distinct 250-px columns and are at most 100 px wide: a box touching
    two of them has at least a third of its area in the gap, so its IoUs with both cannot both
    reach 0.4.
    """
    truth, preds = {}, {}
    for i in range(n_images):
        cols = rng.permutation(4)[: rng.integers(0, 4)]
        boxes = [[250 * c + rng.uniform(0, 40), rng.uniform(0, 800), rng.uniform(20, 100), rng.uniform(20, 200)]
                 for c in cols]
        rows = []
        for b in boxes:
            for _ in range(rng.integers(0, 3)):  # 0-2 jittered guesses per box
                rows.append([rng.random(), *(np.array(b) + rng.normal(0, [8, 8, 10, 15]).clip(-15, 15))])
        for _ in range(rng.integers(0, 3)):  # false positives anywhere
            rows.append([rng.random(), *rng.uniform(0, 900, 2), *rng.uniform(10, 250, 2)])
        rows = np.array(rows).reshape(-1, 5)
        rows[:, 3:] = rows[:, 3:].clip(1, None)
        truth[f"p{i}"] = np.array(boxes).reshape(-1, 4)
        if len(rows) or rng.random() < 0.5:
            preds[f"p{i}"] = rows
    return truth, preds


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_plain_ground_truth_centric_loop(seed):
    truth, preds = separated_dataset(np.random.default_rng(seed), 300)
    result = rsna_map(truth, preds)
    assert 0.0 < result.score < 1.0  # a non-trivial mix of hits, misses and false positives
    assert result.score == pytest.approx(plain_dataset_score(truth, preds), abs=1e-12)
    for pid, ap in result.per_image.items():
        p = preds.get(pid, np.zeros((0, 5)))
        expected = plain_map_iou(truth[pid].tolist(), p[:, 1:].tolist(), p[:, 0].tolist())
        assert ap == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_whole_dataset_matching_equals_the_per_image_greedy_loop_on_crowded_images(monkeypatch):
    # Boxes crowded into a 160-px square: predictions compete for several boxes, so both the
    # vectorised shortcut (lone pairs) and the greedy loop (competing pairs) run.
    rng = np.random.default_rng(11)
    thresholds = np.asarray(RSNA_IOU_THRESHOLDS)
    truth, preds, expected = {}, {}, {}
    for i in range(150):
        n_gt, n_pred = rng.integers(0, 5), rng.integers(0, 8)
        g = np.column_stack([rng.uniform(0, 80, (n_gt, 2)), rng.uniform(50, 80, (n_gt, 2))])
        p = np.column_stack([rng.choice([0.2, 0.5, 0.9], n_pred), rng.uniform(0, 80, (n_pred, 2)),
                             rng.uniform(50, 80, (n_pred, 2))])
        truth[f"p{i}"], preds[f"p{i}"] = g, p
        if n_gt == 0 and n_pred == 0:
            expected[f"p{i}"] = None
            continue
        order = np.argsort(-p[:, 0], kind="stable")  # tied confidences: input order
        tp = greedy_matches(box_iou_xywh(p[order, 1:], g), thresholds).sum(axis=0)
        expected[f"p{i}"] = float(np.mean(tp / (n_pred + n_gt - tp)))

    looped = []
    monkeypatch.setattr(metrics, "greedy_matches", lambda iou, t: looped.append(iou.shape) or greedy_matches(iou, t))
    per_image = rsna_map(truth, preds).per_image
    assert 20 < len(looped) < 100  # some images need the loop, many do not
    assert sum(v is not None and 0 < v < 1 for v in per_image.values()) > 50
    for pid, value in expected.items():
        assert per_image[pid] == (None if value is None else pytest.approx(value, abs=1e-12))


def test_ground_truth_and_prediction_order_do_not_matter():
    truth, preds = separated_dataset(np.random.default_rng(7), 100)
    base = rsna_map(truth, preds).score
    rng = np.random.default_rng(8)
    shuffled_truth = {pid: b[rng.permutation(len(b))] for pid, b in reversed(truth.items())}
    shuffled_preds = {pid: p[rng.permutation(len(p))] for pid, p in preds.items()}
    assert rsna_map(shuffled_truth, shuffled_preds).score == pytest.approx(base, abs=1e-12)


# ------------------------------------------------------------------ bad input
def test_predictions_for_unknown_patient_are_an_error():
    with pytest.raises(ValueError, match="not in the ground truth.*'ghost'"):
        rsna_map({"p": gt(BOX)}, {"p": pred(), "ghost": pred((0.5, *BOX))})


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        (np.array([[0.5, 1, 2, 3]]), r"shape \[K, 5\]"),
        (np.array([[0.5, 1, 2, np.nan, 3]]), "NaN or infinite"),
        (np.array([[0.5, 1, 2, 3, -1]]), "negative width or height"),
    ],
)
def test_malformed_prediction_arrays_name_the_patient(boxes, message):
    with pytest.raises(ValueError, match=f"patient 'p'.*{message}"):
        rsna_map({"p": gt(BOX)}, {"p": boxes})


def test_malformed_ground_truth_names_the_patient():
    with pytest.raises(ValueError, match="ground-truth boxes for patient 'q'.*negative"):
        rsna_map({"p": gt(BOX), "q": gt([0, 0, -5, 10])}, {})


@pytest.mark.parametrize(("truth", "predictions", "message"), [
    (gt([0, 0, 1e300, 10]), pred(), r"ground-truth boxes for patient 'p': a coordinate beyond \+-1e\+06 px"),
    (gt(BOX), pred((0.5, -2e6, 0, 10, 10)), r"predictions for patient 'p': a coordinate beyond"),
    (gt(*[BOX] * 101), pred(), r"ground-truth boxes for patient 'p': 101 boxes, more than the 100"),
    (gt(BOX), pred(*[(0.5, *BOX)] * 10_001),
     r"predictions for patient 'p': 10001 boxes, more than the 10000"),
])
def test_boxes_no_image_can_have_are_refused(truth, predictions, message):
    """Absurd coordinates (overflow in areas) and crowded images (cost grows with boxes x boxes) are
    errors naming the patient; the limits themselves are accepted."""
    with pytest.raises(ValueError, match=message):
        rsna_map({"o": gt(BOX), "p": truth}, {"p": predictions})
    assert rsna_map({"p": gt(*[BOX] * 100)}, {"p": pred(*[(0.5, *BOX)] * 10_000)}).score == pytest.approx(
        100 / 10_000)


def test_matching_in_batches_changes_no_score(monkeypatch):
    """Images are matched in batches bounded by their (prediction, box) pairs; any batch size, down to
    one image per batch, gives the same per-image scores."""
    rng = np.random.default_rng(5)
    truth, preds = {}, {}
    for i in range(60):
        n_gt, n_pred = rng.integers(0, 4), rng.integers(0, 7)
        truth[f"p{i}"] = np.column_stack([rng.uniform(0, 80, (n_gt, 2)), rng.uniform(50, 80, (n_gt, 2))])
        preds[f"p{i}"] = np.column_stack([rng.choice([0.2, 0.5, 0.9], n_pred),
                                          rng.uniform(0, 80, (n_pred, 2)), rng.uniform(50, 80, (n_pred, 2))])
    whole, whole_sweep = rsna_map(truth, preds), sweep_thresholds(truth, preds).table
    assert sum(len(p) * len(truth[pid]) for pid, p in preds.items()) > 100  # several batches of 40 below
    for pairs in (1, 7, 40):
        monkeypatch.setattr(metrics, "_PAIRS_PER_BATCH", pairs)
        batched = rsna_map(truth, preds)
        assert batched.per_image == whole.per_image and batched.score == whole.score
        assert sweep_thresholds(truth, preds).table == whole_sweep


# ------------------------------------------------------------------ sweep
def test_sweep_table_equals_metric_on_filtered_predictions():
    truth, preds = separated_dataset(np.random.default_rng(3), 200)
    sweep = sweep_thresholds(truth, preds)
    assert len(sweep.table) >= 19
    cutoffs = [c for c, _ in sweep.table]
    assert cutoffs == sorted(cutoffs) and 0.05 in cutoffs and 0.95 in cutoffs
    for cutoff, score in sweep.table:
        kept = {pid: p[p[:, 0] >= cutoff] for pid, p in preds.items()}
        assert score == pytest.approx(rsna_map(truth, kept).score, abs=1e-12)
    assert sweep.best_score == max(s for _, s in sweep.table)
    assert (sweep.best_threshold, sweep.best_score) in sweep.table


def test_sweep_finds_the_cutoff_that_separates_hits_from_false_positives():
    # Every image: its true box at confidence 0.8 and a false positive at 0.3 (plus empty images
    # with a 0.3 false positive). Any cut-off in (0.3, 0.8] is perfect.
    truth = {f"p{i}": gt([10 * i, 0, 100, 100]) for i in range(5)} | {f"n{i}": NO_BOX for i in range(5)}
    preds = {f"p{i}": pred((0.8, 10 * i, 0, 100, 100), (0.3, 700, 700, 50, 50)) for i in range(5)}
    preds |= {f"n{i}": pred((0.3, 10, 10, 80, 80)) for i in range(5)}
    sweep = sweep_thresholds(truth, preds)
    assert sweep.best_score == 1.0
    assert 0.3 < sweep.best_threshold <= 0.8
    assert sweep.best_threshold == min(c for c, s in sweep.table if s == 1.0)  # lowest on a tie
    assert dict(sweep.table)[0.05] == pytest.approx(rsna_map(truth, preds).score)  # keeps all: 0.25
    assert dict(sweep.table)[0.05] == pytest.approx(0.25)


def test_sweep_with_given_cutoffs():
    truth = {"p": gt(BOX)}
    preds = {"p": pred((0.9, *BOX), (0.2, 500, 500, 10, 10))}
    sweep = sweep_thresholds(truth, preds, thresholds=[0.5, 0.1, 0.95])
    assert sweep.table == [(0.1, 0.5), (0.5, 1.0), (0.95, 0.0)]
    assert (sweep.best_threshold, sweep.best_score) == (0.5, 1.0)


def test_sweep_with_nothing_to_score_is_an_error():
    with pytest.raises(ValueError, match="no image can be scored"):
        sweep_thresholds({"a": NO_BOX}, {}, thresholds=[0.5])


def test_empty_threshold_lists_are_an_error():
    with pytest.raises(ValueError, match="IoU thresholds must be a non-empty list"):
        rsna_map({"p": gt(BOX)}, {}, thresholds=())
    with pytest.raises(ValueError, match="no confidence cut-off"):
        sweep_thresholds({"p": gt(BOX)}, {}, thresholds=[])


# Boxes on a 5-px grid in a 60-px square, so IoUs often tie exactly with thresholds and each other.
_coord, _side = st.integers(0, 6).map(lambda v: 5.0 * v), st.integers(1, 6).map(lambda v: 5.0 * v)
_box = st.tuples(_coord, _coord, _side, _side)
_image = st.tuples(st.lists(_box, max_size=4),
                   st.lists(st.tuples(st.sampled_from([0.3, 0.6, 0.9]), _box), max_size=6))


@settings(max_examples=150, deadline=None)
@given(st.lists(_image, min_size=1, max_size=6))
def test_agrees_with_plain_prediction_centric_loop_on_any_crowded_images(images):
    truth = {f"p{i}": gt(*[list(b) for b in g]) for i, (g, _) in enumerate(images)}
    preds = {f"p{i}": pred(*[(c, *b) for c, b in p]) for i, (_, p) in enumerate(images)}
    result = rsna_map(truth, preds)
    for i, (g, p) in enumerate(images):
        expected = plain_prediction_centric_ap([list(b) for b in g], [list(b) for _, b in p], [c for c, _ in p])
        got = result.per_image[f"p{i}"]
        assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))
