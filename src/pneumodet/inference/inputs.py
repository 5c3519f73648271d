"""What prediction reads: the DICOM files under the inputs, and the stream that decodes them for the model.

:func:`find_dicom_files` lists the files (links and loops handled, nothing fatal); a
:class:`DicomImageStream` decodes one file per item and prepares it exactly as the training cache does
(:func:`pneumodet.data.preprocess.prepare_image`); a file that fails becomes an item with its cause.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumodet.data.dicom import read_dicom
from pneumodet.data.preprocess import prepare_image
from pneumodet.errors import DicomReadError
from pneumodet.inference.results import UnreadableInput


@dataclass
class FileSearch:
    """The DICOM files found under the inputs, in a stable order, and what was left out."""

    files: list[Path] = field(default_factory=list)
    missing: list[UnreadableInput] = field(default_factory=list)
    skipped_links: list[Path] = field(default_factory=list)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def find_dicom_files(inputs: Sequence[Path | str], *, follow_symlinks: bool = False) -> FileSearch:
    """Files named on the command line, and ``*.dcm`` files found recursively under folders.

    A symbolic link under a folder is followed only when its target stays inside that folder, unless
    ``follow_symlinks`` is set; links that are not followed are listed in ``skipped_links``. A folder
    is entered once per input however many links lead to it, so link loops end. Broken links and
    inputs that do not exist are listed in ``missing`` (never fatal).
    """
    search = FileSearch()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            root = path.resolve()
            _walk(path, root, set(), search, follow_symlinks)
        elif path.is_file():
            search.files.append(path)
        elif path.is_symlink():
            search.missing.append(UnreadableInput(path, "broken symbolic link"))
        else:
            search.missing.append(UnreadableInput(path, "no such file or folder"))
    return search


def _walk(folder: Path, root: Path, seen: set[Path], search: FileSearch, follow_symlinks: bool) -> None:
    real = folder.resolve()
    if real in seen:  # a link back to a folder already walked: a loop or a second route in
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        search.missing.append(UnreadableInput(folder, f"cannot list folder: {exc.strerror or exc}"))
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            try:
                target = path.resolve()
            except (OSError, RuntimeError):  # a cycle of links (a -> b -> a) has no target
                search.missing.append(UnreadableInput(path, "symbolic link loop"))
                continue
            if not target.exists():
                search.missing.append(UnreadableInput(path, "broken symbolic link"))
                continue
            if not follow_symlinks and not _is_within(target, root):
                search.skipped_links.append(path)
                continue
        if entry.is_dir():
            _walk(path, root, seen, search, follow_symlinks)
        elif entry.is_file() and path.suffix.lower() == ".dcm":
            search.files.append(path)


@dataclass
class StreamItem:
    """One file of a :class:`DicomImageStream`: its model input and what the results need, or ``error``."""

    index: int
    path: Path
    image: torch.Tensor | None = None  # [1, S, S]
    original_size: tuple[int, int] = (0, 0)
    dicom_patient_id: str | None = None
    pixels: np.ndarray | None = None  # the original uint8 [H, W], only when overlays are drawn
    error: str | None = None
    uids: tuple[str | None, str | None, str | None] = (None, None, None)  # SOP instance, study, series


class DicomImageStream(Dataset):
    """Decodes and resizes the files one at a time; a file that fails becomes an item with ``error``."""

    def __init__(self, files: Sequence[Path], image_size: int, *, keep_pixels: bool = False) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.keep_pixels = keep_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> StreamItem:
        path = self.files[index]
        try:
            pixels, meta = read_dicom(path)
            image = prepare_image(pixels, self.image_size)
        except DicomReadError as exc:
            return StreamItem(index, path, error=exc.cause)
        except Exception as exc:  # one bad file must never end the run: its cause is listed instead
            return StreamItem(index, path, error=f"{type(exc).__name__}: {exc}")
        pid = meta.get("patient_id")
        uids = (meta.get("sop_instance_uid"), meta.get("study_instance_uid"), meta.get("series_instance_uid"))
        return StreamItem(index, path, image, (int(pixels.shape[0]), int(pixels.shape[1])),
                     str(pid).strip() if pid else None, pixels if self.keep_pixels else None, uids=uids)


def collate_items(items: list[StreamItem]) -> list[StreamItem]:
    """A batch of a ``DataLoader`` over a :class:`DicomImageStream`: the items as they are (files that failed
    stay in it, to be listed)."""
    return items
