"""What training reads: the detection dataset over the image cache, its collate function, and the
Lightning data module that builds both from a split.

Frames: boxes are stored in original DICOM pixels (:class:`PatientRecord`), the cache holds
``C x C`` images and the model sees ``S x S`` images (``image_size``). Boxes go original -> S with
:func:`pneumodet.boxes.boxes_to_input` and come back with :func:`pneumodet.boxes.boxes_to_original`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumodet.boxes import boxes_to_input
from pneumodet.data.augment import build_augmentation
from pneumodet.data.cache import CacheReport, ImageCache, build_cache, default_cache_dir
from pneumodet.data.preprocess import resize_area
from pneumodet.data.records import PatientRecord
from pneumodet.data.split import read_split
from pneumodet.errors import CacheError, ConfigError

#: ``augment(image uint8 [C, C], boxes float32 [N, 4] xyxy, rng) -> (image uint8 [S, S], boxes [K, 4])``
Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys, shuffled per epoch when ``shuffle``.

    The epoch travels with each key because dataset copies in persistent workers never see a
    ``set_epoch`` call; Lightning calls :meth:`set_epoch` on the sampler, in the main process.
    Without that call, each pass over the sampler advances the epoch by one.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        return iter([(epoch, int(index)) for index in order])


class DetectionDataset(Dataset):
    """Cached images and their boxes at ``image_size`` pixels, optionally augmented.

    An item is a dict: ``image`` uint8 ``[1, S, S]``, ``boxes`` float32 ``[N, 4]`` xyxy in the S frame,
    ``class_index`` (``CLASS_NAMES`` order), ``patient_id``, ``orig_size`` ``(h, w)`` of the DICOM.
    A key is an index or an ``(epoch, index)`` pair (see :class:`EpochSampler`); the augmentation
    draws from a generator seeded by ``(seed, epoch, index)``, so every run repeats and no two
    workers share a stream. Records without a cached image are left out and counted in ``excluded``.
    """

    def __init__(
        self,
        records: Sequence[PatientRecord],
        cache: ImageCache,
        *,
        image_size: int,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        self.records = [record for record in records if record.patient_id in cache]
        self.excluded = [record.patient_id for record in records if record.patient_id not in cache]
        self.cache = cache
        self.image_size = image_size
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        orig_size = self.cache.original_size(record.patient_id)
        cached = self.cache.image(record.patient_id)
        if self.augment is None:
            image = resize_area(cached, self.image_size) if cached.shape[0] != self.image_size else cached
            boxes = boxes_to_input(record.boxes_array(), orig_size, self.image_size)
        else:
            boxes = boxes_to_input(record.boxes_array(), orig_size, self.cache.size)
            rng = np.random.default_rng([self.seed, epoch, index])
            image, boxes = self.augment(np.array(cached), boxes, rng)
            self._check_augmented(image, record.patient_id)
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            # A box pushed out of the frame by the augmentation has no pixels left to find.
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.uint8))[None],
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "class_index": record.class_index,
            "patient_id": record.patient_id,
            "orig_size": orig_size,
        }

    def _check_augmented(self, image: np.ndarray, patient_id: str) -> None:
        expected = (self.image_size, self.image_size)
        if image.shape != expected or image.dtype != np.uint8:
            raise ConfigError(f"augmentation returned {image.dtype} {image.shape} for {patient_id}, "
                              f"expected uint8 {expected}: build it with size={self.image_size}")


def collate_detection(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items; boxes are zero-padded to the most boxes in the batch (at least 1).

    Returns ``images`` uint8 ``[B, 1, S, S]``, ``boxes`` float32 ``[B, M, 4]`` (the first
    ``num_boxes[b]`` rows of image b are real, the rest all zeros), ``num_boxes`` long ``[B]``,
    ``classes`` long ``[B]``, ``patient_ids`` list of str, ``orig_sizes`` long ``[B, 2]`` (h, w).
    """
    counts = [len(item["boxes"]) for item in batch]
    boxes = torch.zeros(len(batch), max([1, *counts]), 4, dtype=torch.float32)
    for row, (item, count) in enumerate(zip(batch, counts, strict=True)):
        boxes[row, :count] = item["boxes"]
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "boxes": boxes,
        "num_boxes": torch.tensor(counts, dtype=torch.long),
        "classes": torch.tensor([item["class_index"] for item in batch], dtype=torch.long),
        "patient_ids": [item["patient_id"] for item in batch],
        "orig_sizes": torch.tensor([item["orig_size"] for item in batch], dtype=torch.long).reshape(-1, 2),
    }


def _accounted(record: PatientRecord, cache: ImageCache) -> bool:
    """Whether the cache already has an answer for ``record``: its image, its failure, or no file."""
    if record.patient_id in cache or record.patient_id in cache.failed:
        return True
    return record.image_path is None or not Path(record.image_path).exists()


class RsnaDataModule(L.LightningDataModule):
    """Train/val/test loaders for a split of the RSNA data, read from the image cache.

    The cache (``cache_dir``, default ``DATA_DIR/cache_<cache_size>``; ``cache_size`` defaults to
    ``image_size``) is built on first use, for the split's patients only. Training batches are
    shuffled and augmented at level ``aug`` (see :mod:`pneumodet.data.augment`); validation and test
    batches are in split order, resized only, and keep the last partial batch.
    """

    def __init__(
        self,
        data_dir: Path | str,
        split_dir: Path | str,
        *,
        cache_dir: Path | str | None = None,
        cache_size: int | None = None,
        image_size: int = 512,
        aug: str = "resize_only",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        cache_workers: int | None = None,
        progress: bool | str = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.data_dir = Path(data_dir)
        self.split_dir = Path(split_dir)
        self.cache_size = cache_size or image_size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir, self.cache_size)
        self.image_size = image_size
        self.aug = aug
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_workers = cache_workers
        self.progress = progress
        self.cache_report: CacheReport | None = None
        self.datasets: dict[str, DetectionDataset] = {}

    def _split(self) -> dict[str, list[PatientRecord]]:

        return read_split(self.split_dir)

    def prepare_data(self) -> None:
        """Decode the split's images into the cache (no work when they are all there)."""
        records = [record for part in self._split().values() for record in part]
        # verify=False: re-reading every row for its CRC at each run start costs minutes on the full
        # set; sizes, source stamps and truncation are still checked (`pneumodet cache` verifies all).
        self.cache_report = build_cache(records, self.cache_dir, size=self.cache_size, verify=False,
                                        workers=self.cache_workers, progress=self.progress)

    def setup(self, stage: str | None = None) -> None:

        split = self._split()
        train_augment = build_augmentation(self.aug, self.image_size)  # a bad level fails before any decoding
        cache = self._open_cache([record for part in split.values() for record in part])

        for name, records in split.items():
            augment = train_augment if name == "train" else None
            self.datasets[name] = DetectionDataset(records, cache, image_size=self.image_size,
                                                   augment=augment, seed=self.seed)

    def _open_cache(self, records: Sequence[PatientRecord]) -> ImageCache:
        """The cache, built first unless it already answers for every record (also on other ranks)."""
        try:
            cache = ImageCache.open(self.cache_dir)
        except CacheError:
            cache = None
        if cache is None or not all(_accounted(record, cache) for record in records):
            self.prepare_data()
            cache = ImageCache.open(self.cache_dir)
        return cache

    def summary(self) -> str:
        """Images per set and those left out for want of a cached image."""
        parts = [f"{name} {len(ds)} (+{len(ds.excluded)} without image)" for name, ds in self.datasets.items()]
        return "data: " + ", ".join(parts)

    def _loader(self, name: str, *, train: bool) -> DataLoader:
        if name not in self.datasets:
            raise ConfigError(f"no {name!r} set: call setup() first (sets ready: {sorted(self.datasets)})")
        dataset = self.datasets[name]
        sampler = EpochSampler(len(dataset), shuffle=train, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_detection,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
