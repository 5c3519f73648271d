"""The training dataset: boxes follow the pixels from the DICOM to the model frame and back,
collate pads, augmentation streams repeat, and the data module serves a split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pneumodet.boxes import boxes_to_input, boxes_to_original
from pneumodet.data.augment import build_augmentation
from pneumodet.data.cache import ImageCache, build_cache
from pneumodet.data.dataset import DetectionDataset, EpochSampler, RsnaDataModule, collate_detection
from pneumodet.data.preprocess import resize_area
from pneumodet.data.records import CLASS_INDEX, PatientRecord
from pneumodet.errors import ConfigError


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed 8-bit MONOCHROME2 DICOM holding ``pixels`` (uint8 [H, W])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = path.stem
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def bright_box_case(tmp_path: Path, name: str, shape: tuple[int, int],
                    boxes: list[tuple[float, float, float, float]]) -> PatientRecord:
    """A dark image with bright rectangles exactly at ``boxes`` (original pixels)."""
    pixels = np.full(shape, 20, dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        pixels[int(y1):int(y2), int(x1):int(x2)] = 230
    path = write_dicom(tmp_path / f"{name}.dcm", pixels)
    label = "Lung Opacity" if boxes else "Normal"
    return PatientRecord(name, label, int(bool(boxes)), tuple(boxes), path)


@pytest.fixture(scope="module")
def box_cache(tmp_path_factory) -> tuple[list[PatientRecord], ImageCache]:
    """Non-square and square images with known bright boxes, one unreadable file, one without image."""
    root = tmp_path_factory.mktemp("boxes")
    records = [
        bright_box_case(root, "wide", (600, 800), [(100, 150, 300, 450), (500, 60, 760, 300)]),
        bright_box_case(root, "square", (512, 512), [(32, 64, 256, 320)]),
        bright_box_case(root, "empty", (400, 400), []),
    ]
    bad = root / "bad.dcm"
    bad.write_bytes(b"not a dicom")
    records.append(PatientRecord("bad", "Normal", 0, (), bad))
    records.append(PatientRecord("no_image", "Normal", 0, (), None))
    report = build_cache(records, root / "cache", size=128, workers=1, progress=False)
    assert report.cached == 3 and len(report.failed) == 1 and report.missing == 1, report.summary()
    return records, ImageCache.open(root / "cache")


# ------------------------------------------------------------------------------------------ frames
@pytest.mark.parametrize("orig_size", [(1024, 1024), (600, 800), (2500, 2048)])
@pytest.mark.parametrize("image_size", [512, 384, 333])
def test_boxes_round_trip_to_original_pixels(orig_size, image_size):
    rng = np.random.default_rng(image_size)
    h, w = orig_size
    xy1 = rng.uniform(0, [w - 50, h - 50], size=(20, 2))
    boxes = np.hstack([xy1, xy1 + rng.uniform(1, 50, size=(20, 2))]).astype(np.float32)
    scaled = boxes_to_input(boxes, orig_size, image_size)
    assert scaled[:, [0, 2]].max() <= image_size and scaled[:, [1, 3]].max() <= image_size
    np.testing.assert_allclose(scaled[:, 0], boxes[:, 0] * image_size / w, rtol=1e-6)
    np.testing.assert_allclose(scaled[:, 1], boxes[:, 1] * image_size / h, rtol=1e-6)
    back = boxes_to_original(scaled, orig_size, image_size)
    assert np.abs(back - boxes).max() < 1e-3
    back_t = boxes_to_original(torch.from_numpy(scaled), orig_size, image_size)
    assert isinstance(back_t, torch.Tensor)
    assert (back_t - torch.from_numpy(boxes)).abs().max() < 1e-3


def test_items_put_boxes_on_the_bright_pixels(box_cache):
    """Boxes in the item frame cover exactly the bright rectangles, for non-square originals too."""
    records, cache = box_cache
    dataset = DetectionDataset(records, cache, image_size=96)
    assert len(dataset) == 3 and sorted(dataset.excluded) == ["bad", "no_image"]
    for index, record in enumerate(dataset.records):
        item = dataset[index]
        image = item["image"]
        assert image.dtype == torch.uint8 and image.shape == (1, 96, 96)
        assert item["patient_id"] == record.patient_id
        assert item["class_index"] == CLASS_INDEX[record.label_class]
        assert item["orig_size"] == cache.original_size(record.patient_id)
        boxes = item["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(record.boxes), 4)
        back = boxes_to_original(boxes, item["orig_size"], 96)
        assert (back - torch.tensor(record.boxes_array())).abs().max() < 1e-3 if len(boxes) else True
        bright = image[0].numpy() > 125
        drawn = np.zeros_like(bright)
        for x1, y1, x2, y2 in boxes.numpy():
            drawn[int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)] = True
        # Inside each box (less the blurred 1-pixel edge) is bright; nothing bright outside the boxes.
        assert bright[drawn].all()
        grown = np.zeros_like(bright)
        for x1, y1, x2, y2 in boxes.numpy():
            grown[max(int(y1) - 1, 0):int(y2) + 2, max(int(x1) - 1, 0):int(x2) + 2] = True
        assert not bright[~grown].any()


def test_item_image_is_the_cache_image_at_cache_size(box_cache):
    records, cache = box_cache
    dataset = DetectionDataset(records, cache, image_size=cache.size)
    for index, record in enumerate(dataset.records):
        np.testing.assert_array_equal(dataset[index]["image"][0].numpy(), cache.image(record.patient_id))
    smaller = DetectionDataset(records, cache, image_size=64)
    np.testing.assert_array_equal(smaller[0]["image"][0].numpy(),
                                  resize_area(np.array(cache.image(smaller.records[0].patient_id)), 64))


def test_resize_only_augmentation_matches_the_plain_path(box_cache):
    records, cache = box_cache
    plain = DetectionDataset(records, cache, image_size=96)
    augmented = DetectionDataset(records, cache, image_size=96, augment=build_augmentation("resize_only", 96))
    for index in range(len(plain)):
        a, b = plain[index], augmented[(3, index)]
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        assert (a["image"].int() - b["image"].int()).abs().max() <= 1


def test_augmentation_streams_repeat_per_seed_epoch_and_index(box_cache):
    records, cache = box_cache
    make = lambda seed: DetectionDataset(records, cache, image_size=96, seed=seed,  # noqa: E731
                                         augment=build_augmentation("heavy", 96))
    first, again, other_seed = make(0), make(0), make(1)
    same = [torch.equal(first[(e, i)]["image"], again[(e, i)]["image"]) for e in range(2) for i in range(3)]
    assert all(same)
    # Another epoch, another index or another seed draws other parameters.
    assert not torch.equal(first[(0, 0)]["image"], first[(1, 0)]["image"])
    assert not torch.equal(first[(0, 0)]["image"], other_seed[(0, 0)]["image"])
    for index in range(3):
        item = first[(5, index)]
        boxes = item["boxes"]
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_augmentation_of_the_wrong_size_is_a_clear_error(box_cache):
    records, cache = box_cache
    dataset = DetectionDataset(records, cache, image_size=96, augment=build_augmentation("light", 64))
    with pytest.raises(ConfigError, match=r"size=96"):
        dataset[0]


# ------------------------------------------------------------------------------------------ collate
def _item(pid: str, boxes: list[list[float]], cls: int) -> dict:
    return {"image": torch.full((1, 8, 8), len(boxes), dtype=torch.uint8),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "class_index": cls, "patient_id": pid, "orig_size": (1024, 900)}


def test_collate_pads_boxes_with_zero_rows():
    batch = collate_detection([
        _item("a", [], 0),
        _item("b", [[1, 2, 3, 4], [5, 6, 7, 9]], 1),
        _item("c", [[0.5, 0.5, 2, 2]], 2),
    ])
    assert batch["images"].shape == (3, 1, 8, 8) and batch["images"].dtype == torch.uint8
    assert batch["images"][:, 0, 0, 0].tolist() == [0, 2, 1]
    assert batch["boxes"].shape == (3, 2, 4) and batch["boxes"].dtype == torch.float32
    assert batch["num_boxes"].tolist() == [0, 2, 1]
    assert batch["boxes"][1].tolist() == [[1, 2, 3, 4], [5, 6, 7, 9]]
    assert batch["boxes"][2, 0].tolist() == [0.5, 0.5, 2, 2]
    assert (batch["boxes"][0] == 0).all() and (batch["boxes"][2, 1] == 0).all()
    assert batch["classes"].tolist() == [0, 1, 2] and batch["classes"].dtype == torch.long
    assert batch["patient_ids"] == ["a", "b", "c"]
    assert batch["orig_sizes"].tolist() == [[1024, 900]] * 3


def test_collate_without_any_box_keeps_one_zero_row():
    batch = collate_detection([_item("a", [], 0), _item("b", [], 2)])
    assert batch["boxes"].shape == (2, 1, 4) and not batch["boxes"].any()
    assert batch["num_boxes"].tolist() == [0, 0]


# ------------------------------------------------------------------------------------------ sampler
def test_epoch_sampler_shuffles_per_epoch_reproducibly():
    sampler = EpochSampler(50, shuffle=True, seed=3)
    first, second = list(sampler), list(sampler)  # each pass advances the epoch
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in first) == list(range(50))
    assert [i for _, i in first] != [i for _, i in second]
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(EpochSampler(50, shuffle=True, seed=3)) == first
    assert [i for _, i in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ data module
@pytest.fixture(scope="module")
def real_split(real_sample, tmp_path_factory) -> Path:
    """A split of the 16 real patients that have an image, written by the real split code."""
    from pneumodet.data.rsna import load_rsna
    from pneumodet.data.split import split_patients, write_split

    data = load_rsna(real_sample)
    split = split_patients(data.records, val=0.25, test=0.25, seed=1)
    out = tmp_path_factory.mktemp("split")
    write_split(split, out, source=str(real_sample))
    return out


def test_data_module_serves_the_split(real_sample, real_split, tmp_path):
    from pneumodet.data.split import read_split

    sets = read_split(real_split)
    module = RsnaDataModule(real_sample, real_split, cache_dir=tmp_path / "cache", cache_size=128,
                            image_size=96, aug="light", batch_size=3, cache_workers=1, progress=False)
    module.prepare_data()
    assert module.cache_report is not None and module.cache_report.cached == 16
    module.setup("fit")
    assert "train" in module.summary()
    for name, records in sets.items():
        assert len(module.datasets[name]) == len(records) > 0
        assert module.datasets[name].excluded == []

    val = list(module.val_dataloader())
    assert [pid for batch in val for pid in batch["patient_ids"]] == [r.patient_id for r in sets["val"]]
    assert sum(len(batch["patient_ids"]) for batch in val) == len(sets["val"])  # last partial batch kept
    by_id = {r.patient_id: r for r in sets["val"]}
    for batch in val:
        assert batch["images"].shape[1:] == (1, 96, 96) and batch["images"].dtype == torch.uint8
        for row, pid in enumerate(batch["patient_ids"]):
            count = int(batch["num_boxes"][row])
            assert count == len(by_id[pid].boxes)
            back = boxes_to_original(batch["boxes"][row, :count], (1024, 1024), 96)
            assert (back - torch.tensor(by_id[pid].boxes_array())).abs().max() < 1e-3 if count else True
            assert batch["orig_sizes"][row].tolist() == [1024, 1024]

    loader = module.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
        epochs.append([pid for batch in loader for pid in batch["patient_ids"]])
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(r.patient_id for r in sets["train"])
    assert epochs[0] != epochs[1]

    # A second module on the same cache decodes nothing.
    again = RsnaDataModule(real_sample, real_split, cache_dir=tmp_path / "cache", cache_size=128,
                           image_size=96, batch_size=3, cache_workers=1, progress=False)
    again.prepare_data()
    assert again.cache_report.decoded == 0 and again.cache_report.reused == 16


def test_data_module_workers_repeat_the_augmentation(real_sample, real_split, tmp_path):
    """Augmented batches are the same with 0 and 2 loader workers (the epoch travels with the key)."""
    batches = {}
    for workers in (0, 2):
        module = RsnaDataModule(real_sample, real_split, cache_dir=tmp_path / "cache", cache_size=64,
                                image_size=64, aug="heavy", batch_size=4, num_workers=workers,
                                cache_workers=1, progress=False)
        module.setup("fit")
        loader = module.train_dataloader()
        assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
        batches[workers] = [torch.cat([b["images"] for b in loader]) for _ in range(2)]
    assert torch.equal(batches[0][0], batches[2][0]) and torch.equal(batches[0][1], batches[2][1])
    assert not torch.equal(batches[0][0], batches[0][1])


def test_data_module_rejects_an_unknown_augmentation_level(real_sample, real_split, tmp_path):
    module = RsnaDataModule(real_sample, real_split, cache_dir=tmp_path / "cache", aug="extreme",
                            progress=False)
    with pytest.raises(ConfigError, match="extreme"):
        module.setup("fit")
    assert not (tmp_path / "cache").exists()  # nothing decoded for a run that cannot start
