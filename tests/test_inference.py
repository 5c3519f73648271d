"""Prediction: file search, box mapping, TTA merge (WBF), gating, outputs, the ``predict`` command."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumodet.inference import (
    find_dicom_files,
    hflip_boxes,
    merge_views,
    prepare_image,
    safe_filename,
    weighted_boxes_fusion,
    xyxy_to_kaggle,
)


# ---------------------------------------------------------------- WBF and box helpers
def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_wbf_identical_boxes_fuse_to_the_box_with_the_mean_score():
    boxes, scores = weighted_boxes_fusion([_t([[10, 20, 50, 80]]), _t([[10, 20, 50, 80]])],
                                          [torch.tensor([0.8]), torch.tensor([0.6])])
    torch.testing.assert_close(boxes, _t([[10, 20, 50, 80]]))
    torch.testing.assert_close(scores, torch.tensor([0.7]))


def test_wbf_averages_coordinates_weighted_by_score():
    boxes, scores = weighted_boxes_fusion([_t([[0, 0, 10, 10]]), _t([[1, 0, 11, 10]])],
                                          [torch.tensor([0.9]), torch.tensor([0.3])], iou_thresh=0.55)
    # x1 = (0.9 * 0 + 0.3 * 1) / 1.2 = 0.25; IoU of the two boxes is 9/11 > 0.55
    torch.testing.assert_close(boxes, _t([[0.25, 0, 10.25, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.6]))


def test_wbf_box_seen_in_one_view_keeps_half_its_score_and_clusters_stay_apart():
    boxes, scores = weighted_boxes_fusion(
        [_t([[0, 0, 10, 10], [100, 100, 140, 150]]), _t([[0, 0, 10, 10]])],
        [torch.tensor([0.5, 0.9]), torch.tensor([0.7])],
    )
    torch.testing.assert_close(boxes, _t([[0, 0, 10, 10], [100, 100, 140, 150]]))
    torch.testing.assert_close(scores, torch.tensor([0.6, 0.45]))  # sorted by fused score


def test_wbf_below_iou_threshold_does_not_merge():
    boxes, scores = weighted_boxes_fusion([_t([[0, 0, 10, 10]]), _t([[5, 0, 15, 10]])],  # IoU 1/3
                                          [torch.tensor([0.8]), torch.tensor([0.4])], iou_thresh=0.55)
    torch.testing.assert_close(boxes, _t([[0, 0, 10, 10], [5, 0, 15, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.4, 0.2]))


def test_wbf_of_nothing_is_empty():
    boxes, scores = weighted_boxes_fusion([_t([]), _t([])], [torch.zeros(0), torch.zeros(0)])
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_nms_merge_keeps_the_best_of_overlapping_views():
    boxes, scores = merge_views([_t([[0, 0, 10, 10]]), _t([[1, 0, 11, 10]])],
                                [torch.tensor([0.3]), torch.tensor([0.9])], method="nms", iou_thresh=0.5)
    torch.testing.assert_close(boxes, _t([[1, 0, 11, 10]]))
    torch.testing.assert_close(scores, torch.tensor([0.9]))


def test_hflip_boxes_matches_flipping_the_image_and_is_its_own_inverse():
    image = torch.zeros(64, 100)
    box = _t([[10, 20, 30, 40]])
    image[20:40, 10:30] = 1
    flipped = image.flip(-1)
    ys, xs = torch.nonzero(flipped, as_tuple=True)
    expected = _t([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    torch.testing.assert_close(hflip_boxes(box, 100.0), expected)
    torch.testing.assert_close(hflip_boxes(hflip_boxes(box, 100.0), 100.0), box)


def test_xyxy_to_kaggle_sorts_by_confidence_and_uses_width_height():
    out = xyxy_to_kaggle(_t([[0, 0, 10, 20], [5, 6, 7, 9]]), torch.tensor([0.2, 0.9]))
    np.testing.assert_allclose(out, [[0.9, 5, 6, 2, 3], [0.2, 0, 0, 10, 20]])


def test_prepare_image_area_resizes_and_scales_to_unit_range():
    pixels = np.zeros((8, 8), np.uint8)
    pixels[:4, :4] = 255  # top-left quarter white
    pixels[4:, 4:] = 51
    out = prepare_image(pixels, 2)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0], [0.0, 0.2]]]))
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(pixels.astype(np.uint16), 2)


def test_safe_filename_cannot_escape_the_overlay_folder():
    assert safe_filename("../../etc/passwd") == "_.._etc_passwd"
    assert safe_filename("abc-1.2_x") == "abc-1.2_x"
    assert "/" not in safe_filename("a/b") and safe_filename("") == "_"


# ---------------------------------------------------------------- finding files
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_dicom_files_recurses_and_does_not_follow_links_out_of_the_folder(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    a = _touch(root / "a.dcm")
    b = _touch(root / "sub" / "b.DCM")
    _touch(root / "notes.txt")
    _touch(outside / "c.dcm")
    os.symlink(outside, root / "link_out")
    os.symlink(outside / "c.dcm", root / "file_out.dcm")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the input folder
    os.symlink(tmp_path / "gone.dcm", root / "broken.dcm")

    found = find_dicom_files([root, tmp_path / "missing.dcm"])
    assert found.files == [a, b]
    assert sorted(found.skipped_links) == [root / "file_out.dcm", root / "link_out"]
    assert {(u.path, u.cause) for u in found.missing} == {
        (root / "broken.dcm", "broken symbolic link"),
        (tmp_path / "missing.dcm", "no such file or folder"),
    }

    followed = find_dicom_files([root], follow_symlinks=True)
    assert sorted(followed.files) == sorted([a, b, root / "file_out.dcm", root / "link_out" / "c.dcm"])
    assert followed.skipped_links == []


def test_find_dicom_files_takes_named_files_whatever_their_suffix(tmp_path):
    f = _touch(tmp_path / "image.dicom")
    assert find_dicom_files([f]).files == [f]
