"""``pneumodet.boxes``: the one home of box formats and frames, for numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumodet.boxes import boxes_to_input, boxes_to_original, hflip, kaggle_rows, xywh_to_xyxy, xyxy_to_xywh

XYXY = [[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 0.0, 5.0]]
XYWH = [[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 5.0]]


def test_xyxy_and_xywh_are_inverse_for_numpy_and_torch():
    np.testing.assert_array_equal(xyxy_to_xywh(np.array(XYXY)), XYWH)
    np.testing.assert_array_equal(xywh_to_xyxy(np.array(XYWH)), XYXY)
    assert xyxy_to_xywh(np.array(XYXY, np.float32)).dtype == np.float64  # the metric's precision
    t = torch.tensor(XYXY, dtype=torch.float32)
    assert xyxy_to_xywh(t).dtype == torch.float32
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(t)), t)
    assert xyxy_to_xywh(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("original_size, image_size", [((1024, 1024), 512), ((300, 200), 96), ((333, 517), 64)])
def test_input_and_original_frames_are_inverse(original_size, image_size):
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(0, 200, (5, 2, 2)), axis=1).reshape(5, 4)[:, [0, 2, 1, 3]].astype(np.float32)
    there = boxes_to_input(boxes, original_size, image_size)
    assert there.dtype == np.float32
    height, width = original_size
    np.testing.assert_allclose(there[:, [0, 2]], boxes[:, [0, 2]] * image_size / width, rtol=1e-6)
    np.testing.assert_allclose(there[:, [1, 3]], boxes[:, [1, 3]] * image_size / height, rtol=1e-6)
    np.testing.assert_allclose(boxes_to_original(there, original_size, image_size), boxes, rtol=1e-5)
    back_t = boxes_to_original(torch.from_numpy(there), original_size, image_size)
    assert isinstance(back_t, torch.Tensor)
    np.testing.assert_allclose(back_t.numpy(), boxes, rtol=1e-5)


def test_hflip_mirrors_and_is_its_own_inverse_for_numpy_and_torch():
    boxes = np.array([[10.0, 20.0, 40.0, 60.0]])
    np.testing.assert_array_equal(hflip(boxes, 100.0), [[60.0, 20.0, 90.0, 60.0]])
    np.testing.assert_array_equal(hflip(hflip(boxes, 100.0), 100.0), boxes)
    torch.testing.assert_close(hflip(torch.from_numpy(boxes), 100.0), torch.from_numpy(hflip(boxes, 100.0)))


def test_kaggle_rows_sort_by_confidence_keep_ties_in_order_and_match_float32_arithmetic():
    boxes = torch.tensor([[0, 0, 10, 20], [5, 6, 7, 9], [1, 1, 2, 2], [100.25, 3.5, 731.3, 512.7]])
    scores = torch.tensor([0.2, 0.9, 0.2, 0.5])
    rows = kaggle_rows(boxes, scores)
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows[:, 0], np.float32([0.9, 0.5, 0.2, 0.2]))
    np.testing.assert_array_equal(rows[2:, 1], [0, 1])  # the two 0.2 scores: input order kept
    # as float32 the rows equal those computed in float32 throughout (ImagePrediction's rows)
    order = torch.argsort(scores, descending=True, stable=True)
    b, s = boxes[order], scores[order]
    in_float32 = torch.stack((s, b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), dim=1).numpy()
    np.testing.assert_array_equal(rows.astype(np.float32), in_float32)
    np.testing.assert_array_equal(kaggle_rows(boxes.numpy(), scores.numpy()), rows)  # numpy in, same rows
    assert kaggle_rows(torch.zeros(0, 4), torch.zeros(0)).shape == (0, 5)
