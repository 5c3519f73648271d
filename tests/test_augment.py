"""Augmentation levels: boxes follow the image, parameters are random per image, errors are clear."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumodet.data.augment import (
    LEVEL_SPECS,
    LEVELS,
    AffineParams,
    Augmentation,
    PhotometricParams,
    adjust_gamma,
    affine_matrix,
    build_augmentation,
    transform_boxes,
    warp_image,
)
from pneumodet.data.records import CLASS_NAMES, PatientRecord
from pneumodet.errors import ConfigError, DicomReadError
from pneumodet.reports.augment_preview import PreviewSample, preview_figure, preview_samples

SIZE = 128
FAST = settings(max_examples=40, deadline=None)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _mask_box(image: np.ndarray) -> np.ndarray:
    """The xyxy box around the pixels brighter than mid-grey (continuous pixel edges)."""
    ys, xs = np.nonzero(image > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _geometry_only(size: int) -> Augmentation:
    return Augmentation("resize_only", size, min_visibility=0.0)


boxes_in_image = st.tuples(
    st.floats(4, 30), st.floats(4, 30), st.floats(24, 50), st.floats(1 / 1.5, 1.5)
).map(lambda t: np.array([[t[0], t[1], t[0] + t[2], t[1] + t[2] * t[3]]], np.float32))

#: Up to about one standard deviation of the strongest level's rotation and shear: a rectangle's
#: own outline under rotation IS the rotated-corners box, which the 8 edge points deliberately
#: undercut, so only moderate angles keep the two within IoU 0.8 (the ellipse test goes further).
affine_params = st.builds(
    AffineParams,
    scale_x=st.floats(0.8, 1.25), scale_y=st.floats(0.8, 1.25),
    rotation=st.floats(-5, 5), shear=st.floats(-3, 3),
    shift_x=st.floats(-6, 6), shift_y=st.floats(-6, 6), flip=st.booleans(),
)


# ---------------------------------------------------------------- levels and errors
def test_levels_are_the_four_named_ones():
    assert LEVELS == ("resize_only", "light", "heavy", "heavy_with_rotations")
    assert LEVEL_SPECS["heavy_with_rotations"].rotation_std == 6.0
    assert LEVEL_SPECS["heavy"].rotation_std == 0.0


def test_unknown_level_is_a_config_error_listing_the_valid_levels():
    with pytest.raises(ConfigError) as err:
        build_augmentation("medium", 512)
    for name in LEVELS:
        assert name in str(err.value)
    assert "'medium'" in str(err.value)


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": 64, "min_visibility": 1.5}])
def test_bad_size_or_visibility_is_a_config_error(kwargs):
    size = kwargs.pop("size")
    with pytest.raises(ConfigError):
        build_augmentation("light", size, **kwargs)


def test_bad_image_or_box_is_named():
    aug = build_augmentation("light", 64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="uint8"):
        aug(np.zeros((32, 32), np.float32), np.zeros((0, 4)), rng)
    with pytest.raises(ValueError, match="box 1 "):
        aug(np.zeros((32, 32), np.uint8), np.array([[1, 1, 5, 5], [9, 2, 3, 8]], np.float32), rng)


# ---------------------------------------------------------------- geometry
@FAST
@given(boxes=boxes_in_image)
def test_flip_twice_is_identity(boxes):
    flip = affine_matrix(AffineParams(flip=True), (SIZE, SIZE), SIZE)
    once, _ = transform_boxes(boxes, flip, SIZE, 0.0)
    twice, _ = transform_boxes(once, flip, SIZE, 0.0)
    np.testing.assert_allclose(twice, boxes, atol=1e-4)
    assert not np.allclose(once, boxes)  # the flip did move the box (none is centred in x here)


def test_flip_mirrors_the_image_exactly():
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    aug, rng = _geometry_only(SIZE), np.random.default_rng(0)
    box = np.array([[10, 20, 40, 60]], np.float32)
    flipped, fbox = aug.apply(image, box, AffineParams(flip=True), PhotometricParams(), rng)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_allclose(fbox, [[SIZE - 40, 20, SIZE - 10, 60]], atol=1e-4)


@FAST
@given(boxes=boxes_in_image, params=affine_params, offset=st.integers(0, 20))
def test_filled_rectangle_follows_its_box(boxes, params, offset):
    """The transformed box matches where the drawn rectangle actually ends up (wrong matrices fail)."""
    boxes = boxes + offset  # anywhere in the central part of the image
    image = np.zeros((SIZE, SIZE), np.uint8)
    x0, y0, x1, y1 = np.rint(boxes[0]).astype(int)
    image[y0:y1, x0:x1] = 255
    drawn = np.array([[x0, y0, x1, y1]], np.float32)
    out, out_boxes = _geometry_only(SIZE).apply(image, drawn, params, PhotometricParams(),
                                                 np.random.default_rng(0))
    assert len(out_boxes) == 1
    truth = _mask_box(out)
    assert _iou(out_boxes[0], truth) >= 0.8
    # never larger than the object itself (1 px for interpolation at the rim)
    assert (out_boxes[0, :2] >= truth[:2] - 1).all() and (out_boxes[0, 2:] <= truth[2:] + 1).all()


@FAST
@given(rotation=st.floats(-25, 25), shear=st.floats(-12, 12), w=st.integers(30, 60), h=st.integers(30, 60))
def test_rotated_box_does_not_inflate(rotation, shear, w, h):
    """An opacity is roundish: its box must stay tight under rotation/shear, unlike a corners box."""
    image = np.zeros((SIZE, SIZE), np.uint8)
    cx, cy = SIZE // 2, SIZE // 2
    cv2.ellipse(image, (cx, cy), (w // 2, h // 2), 0, 0, 360, 255, thickness=-1)
    ellipse_box = _mask_box(image)
    params = AffineParams(rotation=rotation, shear=shear)
    out, out_boxes = _geometry_only(SIZE).apply(image, ellipse_box[None], params, PhotometricParams(),
                                                 np.random.default_rng(0))
    assert _iou(out_boxes[0], _mask_box(out)) >= 0.8


def test_corners_box_would_fail_the_inflation_check():
    """The check above is discriminating: the 4-corner box of a 25-degree rotation fails it."""
    image = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(image, (SIZE // 2, SIZE // 2), 25, 255, thickness=-1)
    box = _mask_box(image)
    matrix = affine_matrix(AffineParams(rotation=25.0), (SIZE, SIZE), SIZE)
    corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    corner_box = np.concatenate([mapped.min(0), mapped.max(0)])
    out, out_boxes = _geometry_only(SIZE).apply(image, box[None], AffineParams(rotation=25.0),
                                                 PhotometricParams(), np.random.default_rng(0))
    truth = _mask_box(out)
    assert _iou(corner_box, truth) < 0.8 <= _iou(out_boxes[0], truth)


@FAST
@given(level=st.sampled_from(LEVELS), seed=st.integers(0, 2**32 - 1),
       boxes=st.lists(st.tuples(st.floats(-20, 140), st.floats(-20, 140), st.floats(1, 90), st.floats(1, 90)),
                      max_size=4))
def test_boxes_stay_within_the_image(level, seed, boxes):
    arr = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32).reshape(-1, 4)
    image = np.full((96, 96), 100, np.uint8)
    out, out_boxes = build_augmentation(level, 64)(image, arr, np.random.default_rng(seed))
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out_boxes.dtype == np.float32 and out_boxes.shape[1] == 4 and len(out_boxes) <= len(arr)
    assert (out_boxes >= 0).all() and (out_boxes <= 64).all()
    assert (out_boxes[:, 2:] > out_boxes[:, :2]).all()


@pytest.mark.parametrize("level", LEVELS)
def test_images_without_boxes_pass_through(level):
    image = np.full((200, 160), 90, np.uint8)
    for empty in (np.zeros((0, 4), np.float32), np.zeros((0,))):
        out, boxes = build_augmentation(level, 64)(image, empty, np.random.default_rng(3))
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_resize_only_is_deterministic_and_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    boxes = np.array([[100.0, 212.0, 333.0, 500.0], [0.0, 0.0, 1024.0, 1024.0]], np.float32)
    aug = build_augmentation("resize_only", 512)
    out_a, boxes_a = aug(image, boxes, np.random.default_rng(1))
    out_b, boxes_b = aug(image, boxes, np.random.default_rng(2))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(boxes_a, boxes / 2)
    np.testing.assert_array_equal(boxes_b, boxes / 2)
    # area averaging: each output pixel is the mean of its 2x2 source block
    expected = image.reshape(512, 2, 512, 2).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out_a - expected).max() <= 1.0
    # non-square input: each axis scales on its own
    _, wide = aug(np.zeros((256, 1024), np.uint8), np.array([[64, 32, 128, 64]], np.float32), rng)
    np.testing.assert_allclose(wide, [[32, 64, 64, 128]])
    # at the training size the image passes through untouched
    same, _ = aug(out_a, boxes_a, rng)
    np.testing.assert_array_equal(same, out_a)


def test_warp_agrees_with_resize_convention():
    """A 2x downscale through the warp lands a block exactly where the boxes say it is."""
    image = np.zeros((128, 128), np.uint8)
    image[40:80, 20:60] = 255
    matrix = affine_matrix(AffineParams(), (128, 128), 64)
    out = warp_image(image, matrix, 64)
    boxes, _ = transform_boxes(np.array([[20, 40, 60, 80]], np.float32), matrix, 64)
    np.testing.assert_allclose(boxes, [[10, 20, 30, 40]], atol=1e-5)
    np.testing.assert_array_equal(_mask_box(out), [10, 20, 30, 40])


def test_dropping_rule_uses_the_visible_fraction():
    """A 100x100 box shifted 60 px left keeps 40% of its area inside the image."""
    boxes = np.array([[0, 0, 100, 100], [300, 300, 400, 400]], np.float32)
    matrix = affine_matrix(AffineParams(shift_x=-60.0), (512, 512), 512)
    kept, keep = transform_boxes(boxes, matrix, 512, min_visibility=0.4)
    np.testing.assert_array_equal(keep, [True, True])
    np.testing.assert_allclose(kept[0], [0, 0, 40, 100])
    _, keep = transform_boxes(boxes, matrix, 512, min_visibility=0.41)
    np.testing.assert_array_equal(keep, [False, True])
    # a box pushed entirely out of the image is dropped even with min_visibility=0
    out = affine_matrix(AffineParams(shift_x=-200.0), (512, 512), 512)
    _, keep = transform_boxes(boxes[:1], out, 512, min_visibility=0.0)
    assert not keep.any()


# ---------------------------------------------------------------- randomness
@pytest.mark.parametrize("level", LEVELS[1:])
def test_same_seed_same_output_different_seed_differs(level):
    image = np.random.default_rng(5).integers(0, 256, (96, 96), dtype=np.uint8)
    boxes = np.array([[20, 20, 60, 70]], np.float32)
    aug = build_augmentation(level, 64)
    a = aug(image, boxes, np.random.default_rng(11))
    b = aug(image, boxes, np.random.default_rng(11))
    c = aug(image, boxes, np.random.default_rng(12))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_augmentation_survives_pickling_for_loader_workers():
    import pickle

    image = np.random.default_rng(5).integers(0, 256, (96, 96), dtype=np.uint8)
    boxes = np.array([[20, 20, 60, 70]], np.float32)
    aug = build_augmentation("heavy_with_rotations", 64, min_visibility=0.5)
    copy = pickle.loads(pickle.dumps(aug))
    assert repr(copy) == "Augmentation('heavy_with_rotations', size=64, min_visibility=0.5)"
    for x, y in zip(aug(image, boxes, np.random.default_rng(4)), copy(image, boxes, np.random.default_rng(4)),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def _draws(level: str, n: int = 4000):
    aug, rng = build_augmentation(level, 512), np.random.default_rng(0)
    return [aug.sample(rng) for _ in range(n)]


def test_heavy_parameters_are_drawn_per_image():
    draws = _draws("heavy")
    affine = [a for a, _ in draws]
    photo = [p for _, p in draws]
    log2_scale = np.log2([a.scale_x for a in affine] + [a.scale_y for a in affine])
    assert abs(log2_scale.std() - 0.15) < 0.01 and abs(log2_scale.mean()) < 0.01
    assert abs(np.std([a.shear for a in affine]) - 4.0) < 0.2
    assert all(a.rotation == 0.0 for a in affine)
    assert abs(np.mean([a.flip for a in affine]) - 0.5) < 0.03
    shift = np.array([[a.shift_x, a.shift_y] for a in affine])
    assert np.abs(shift).max() <= 0.06 * 512 and shift.std() > 0.03 * 512 * 0.9  # uniform: std = max/sqrt(3)
    assert abs(np.log2([p.gamma for p in photo]).std() - 0.25) < 0.015
    assert abs(np.mean([p.salt_pepper_grid > 0 for p in photo]) - 0.1) < 0.02
    assert abs(np.mean([p.blur_sigma > 0 for p in photo]) - 0.5) < 0.03
    assert abs(np.mean([p.noise_sigma > 0 for p in photo]) - 0.5) < 0.03
    assert max(p.blur_sigma for p in photo) <= 2.0 and max(p.noise_sigma for p in photo) <= 0.04 * 255


def test_light_and_rotation_parameters_are_drawn_per_image():
    light = [a for a, _ in _draws("light")]
    assert abs(np.log2([a.scale_x for a in light]).std() - 0.1) < 0.01
    assert abs(np.std([a.rotation for a in light]) - 5.0) < 0.25
    assert abs(np.std([a.shear for a in light]) - 2.5) < 0.15
    assert not any(a.flip for a in light)
    assert all(p == PhotometricParams(gamma=p.gamma) for _, p in _draws("light", 200))
    rotations = [a.rotation for a, _ in _draws("heavy_with_rotations")]
    assert abs(np.std(rotations) - 6.0) < 0.3


# ---------------------------------------------------------------- photometric
def test_gamma_lut_matches_the_formula():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for gamma in (0.5, 1.0, 1.7):
        expected = np.rint(255 * (image / 255.0) ** gamma)
        np.testing.assert_array_equal(adjust_gamma(image, gamma), expected)


def test_noise_salt_pepper_and_blur_do_what_they_say():
    grey = np.full((256, 256), 128, np.uint8)
    aug, rng = Augmentation("heavy", 256), np.random.default_rng(0)
    noisy, _ = aug.apply(grey, np.zeros((0, 4)), AffineParams(), PhotometricParams(noise_sigma=8.0), rng)
    assert abs(noisy.astype(float).std() - 8.0) < 0.2 and abs(noisy.mean() - 128) < 0.2

    speckled, _ = aug.apply(grey, np.zeros((0, 4)), AffineParams(), PhotometricParams(salt_pepper_grid=64), rng)
    changed = speckled != 128
    assert set(np.unique(speckled[changed])) == {0, 255}
    assert 0.002 < changed.mean() < 0.03  # about 1% of the cells, in 4x4-pixel blocks
    assert changed.reshape(64, 4, 64, 4).any(axis=(1, 3)).sum() * 16 >= changed.sum()  # whole cells

    step = np.zeros((64, 64), np.uint8)
    step[:, 32:] = 255
    blurred, _ = Augmentation("heavy", 64).apply(step, np.zeros((0, 4)), AffineParams(),
                                                 PhotometricParams(blur_sigma=2.0), rng)
    assert 0 < blurred[0, 31] < 255 and 0 < blurred[0, 32] < 255 and blurred[0, 0] == 0


# ---------------------------------------------------------------- preview
def _record(pid: str, boxes=(), path: str | None = "x.dcm") -> PatientRecord:
    target = int(bool(boxes))
    return PatientRecord(pid, CLASS_NAMES[1] if target else CLASS_NAMES[0], target, tuple(boxes),
                         Path(f"/data/{pid}.dcm") if path else None)


def _fake_read(path: Path):
    if "broken" in path.name:
        raise DicomReadError(path, "not a DICOM file")
    return np.full((256, 256), 100, np.uint8), None


def test_preview_samples_prefer_boxes_and_skip_unreadable_images():
    records = [_record("n1"), _record("b1", [(10.0, 10.0, 50.0, 60.0)]), _record("n2"),
               _record("broken", [(1.0, 1.0, 9.0, 9.0)]), _record("b2", [(5.0, 5.0, 30.0, 40.0)]),
               _record("noimage", [(1.0, 1.0, 9.0, 9.0)], path=None)]
    samples, skipped = preview_samples(records, 3, seed=0, read=_fake_read)
    names = [s.name for s in samples]
    assert set(names[:2]) == {"b1", "b2"} and names[2] in {"n1", "n2"}
    assert len(skipped) == 1 and "broken.dcm: not a DICOM file" in skipped[0]
    b1 = samples[names.index("b1")]
    np.testing.assert_array_equal(b1.boxes, [[10, 10, 50, 60]])
    assert [s.name for s in preview_samples(records, 3, seed=0, read=_fake_read)[0]] == names


def test_preview_samples_errors_are_clear():
    with pytest.raises(ConfigError, match="n=0"):
        preview_samples([_record("a")], 0, read=_fake_read)
    with pytest.raises(DicomReadError, match="none of the 1 patients has an image"):
        preview_samples([_record("a", path=None)], 2, read=_fake_read)
    with pytest.raises(DicomReadError, match="none of the 1 images could be read"):
        preview_samples([_record("broken")], 2, read=_fake_read)


def test_preview_figure_shows_every_level_with_its_boxes():
    image = np.zeros((200, 200), np.uint8)
    image[50:120, 40:100] = 200
    samples = [PreviewSample("p1", image, np.array([[40, 50, 100, 120]], np.float32))]
    fig = preview_figure(samples, LEVELS, 64, seed=1)
    axes = fig.axes
    assert len(axes) == 1 + len(LEVELS)
    assert "original 200x200, 1 box(es)" in axes[0].get_title()
    for ax, level in zip(axes[1:], LEVELS, strict=True):
        assert ax.get_title().startswith(f"{level}, 1 box(es)")
        (rect,) = ax.patches  # the box, drawn where the augmentation put it
        assert rect.get_edgecolor()[:3] == (0.0, 1.0, 0.0)
    np.testing.assert_allclose(axes[1].patches[0].get_bbox().bounds, (12.8, 16.0, 19.2, 22.4), atol=1e-4)
    assert "all levels at 64 px, seed 1" in fig._suptitle.get_text()
    again = preview_figure(samples, LEVELS, 64, seed=1)
    for a, b in zip(fig.axes, again.axes, strict=True):
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
    three = preview_figure(samples, ["heavy"], 64, seed=1, draws=3)
    assert [ax.get_title().split(",")[0] for ax in three.axes[1:]] == ["heavy #1", "heavy #2", "heavy #3"]
    assert len(preview_figure(samples, ["resize_only"], 64, draws=3).axes) == 2  # deterministic: one panel


# ---------------------------------------------------------------- CLI
def _preview(data_dir: Path, out: Path, *extra: str) -> int:
    from pneumodet.cli import main

    return main(["augment-preview", str(data_dir), "--n", "2", "--size", "96", "--out", str(out), *extra])


def test_augment_preview_command_draws_every_level(synth_dataset, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "sub" / "all.png"
    assert _preview(synth_dataset, out, "--level", "all", "--seed", "3") == 0
    assert "wrote" in capsys.readouterr().out
    picture = matplotlib.image.imread(out)
    assert picture.shape[1] > 4 * picture.shape[0] / 2  # 2 rows of 5 panels
    green = (picture[..., 1] > 0.9) & (picture[..., 0] < 0.2) & (picture[..., 2] < 0.2)
    assert green.sum() > 100  # the boxes are drawn

    one = tmp_path / "heavy.png"
    assert _preview(synth_dataset, one, "--level", "heavy", "--draws", "2") == 0
    assert matplotlib.image.imread(one).shape[1] < picture.shape[1]  # original + 2 draws


def test_augment_preview_command_errors_and_skips(synth_dataset, tmp_path, capsys):
    import shutil

    assert _preview(synth_dataset, tmp_path / "x.png", "--level", "medium") == 2
    err = capsys.readouterr().err
    assert "unknown augmentation level 'medium'" in err and "heavy_with_rotations" in err
    assert not (tmp_path / "x.png").exists()

    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    dicoms = sorted((data / "stage_2_train_images").glob("*.dcm"))
    for broken in dicoms[:-1]:
        broken.write_bytes(b"not a dicom")
    out = tmp_path / "one.png"
    assert _preview(data, out, "--level", "light") == 0
    captured = capsys.readouterr()
    assert f"skipped unreadable image {dicoms[0]}" in captured.err
    assert "1 patient(s) x light" in captured.out and out.exists()
