"""Checkpoints: tensors + model config + versions in one safetensors file; loading never runs code."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pneumodet import __version__
from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.fieldtypes import is_finite
from pneumodet.model.config import MAX_IMAGE_SIZE, ModelConfig
from pneumodet.model.retinanet import build_model
from pneumodet.safeio import atomic_path

FORMAT = "pneumodet-checkpoint"
FORMAT_VERSION = 1
#: Prefix of the tensors of ``extra`` (everything else in ``extra`` is stored as JSON).
_EXTRA_PREFIX = "__extra__."


def _versions() -> dict[str, str]:
    import timm
    import torchvision


    return {"pneumodet": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and config (and ``extra``) to ``path`` atomically.

    ``model`` is a :class:`~pneumodet.model.retinanet.PneumoRetinaNet` (or a ``torch.compile``
    wrapper of one). ``extra`` values are tensors or JSON-able data (epoch, metrics, ...).
    The file is a safetensors file; the config, versions and JSON extras live in its metadata.
    """
    path = Path(path)
    net = getattr(model, "_orig_mod", model)
    config = getattr(net, "config", None)
    if not isinstance(config, ModelConfig):
        raise CheckpointError(f"{path}: model has no ModelConfig; only PneumoRetinaNet can be saved")
    extra = dict(extra or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({_EXTRA_PREFIX + k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, Tensor)})
    json_extra = {k: v for k, v in extra.items() if not isinstance(v, Tensor)}
    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(config.to_dict()),
            "versions": json.dumps(_versions()),
            "extra": json.dumps(json_extra),
        }
    except TypeError as err:
        raise CheckpointError(f"{path}: extra must hold tensors or JSON-able values ({err})") from err
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as err:  # disk full: the previous file stays as it was
        raise CheckpointError(f"{path}: cannot write the checkpoint ({getattr(err, 'strerror', None) or err}); "
                              "a previous one is kept") from err
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a pneumodet checkpoint, or :class:`CheckpointError` naming the problem.

    The header is checked (format, version, metadata sizes) before any tensor is read.
    """
    path = Path(path)
    header = _read_header(path)
    return _read_tensors(path), header.metadata


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`.

    The file is untrusted: everything is checked before anything is built, in order of cost. First the
    safetensors header (format, version, metadata sizes, JSON depth), then the model config (types,
    ranges) and the known ``extra`` values, then every tensor name, shape and dtype against the model the
    config describes, built on the ``meta`` device (no memory, no weights), and the total tensor bytes
    against the file's size. Only a file that passes all of this costs a real model. Any failure is one
    :class:`CheckpointError` naming the file.

    Returns:
        (model in eval mode on ``map_location``, ``extra`` as saved, plus ``versions``).
    """

    path = Path(path)
    header = _read_header(path)
    stored, config, extra, versions = _parse_metadata(path, header.metadata)
    _check_tensors(path, header, _expected_specs(path, config), config)
    model = build_model(config)
    tensors = _read_tensors(path)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_EXTRA_PREFIX)}, strict=True)
    extra.update({k.removeprefix(_EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)})
    extra["versions"] = versions
    # what the saved model started from (the weights themselves are in the file, never fetched again)
    model.config.pretrained = stored.pretrained
    model.config.weights = stored.weights
    return model.to(map_location).eval(), extra


# ------------------------------------------------------------------------------ checks of an untrusted file
#: Longest metadata value read (a real config is ~1 KB, extra ~200 B, versions ~100 B).
_MAX_METADATA_CHARS = 64 * 1024
#: Most ``extra`` tensors a checkpoint may carry (pneumodet itself saves none).
_MAX_EXTRA_TENSORS = 64
#: safetensors dtype names -> torch dtypes (names torch does not know are refused).
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64, "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None), "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}
#: What the known ``extra`` keys must hold (their readers convert them with ``float()``/``int()``).
_EXTRA_CHECKS: dict[str, tuple[Any, str]] = {
    "threshold": (lambda v: _is_number(v) and is_finite(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "val_map": (lambda v: _is_number(v) and (v != v or 0.0 <= v <= 1.0), "a number in [0, 1] or NaN"),
    "image_size": (lambda v: _is_int(v) and 32 <= v <= MAX_IMAGE_SIZE, f"a whole number in [32, {MAX_IMAGE_SIZE}]"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "encoder": (lambda v: isinstance(v, str), "text"),
}


@dataclass(frozen=True)
class _Header:
    """A safetensors header: the metadata strings and each tensor's (dtype name, shape), no data."""

    metadata: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    data_bytes: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """``repr`` of a value from the file, cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_header(path: Path) -> _Header:
    """The header of safetensors file ``path`` with pneumodet's format and version, without its tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            specs = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_slice(name)
                specs[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
        with open(path, "rb") as raw:
            header_bytes = int.from_bytes(raw.read(8), "little")
        data_bytes = path.stat().st_size - 8 - header_bytes
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: not a pneumodet checkpoint (expected a safetensors file; pickled files are "
            f"refused because loading them can run code): {' '.join(str(err).split())[:200]}"
        ) from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: safetensors file without pneumodet metadata "
                              f"(format={_short(metadata.get('format'))})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {_short(metadata.get('format_version'))} "
                              f"(this pneumodet reads {FORMAT_VERSION})")
    return _Header(metadata, specs, data_bytes)


def _json_field(path: Path, metadata: dict[str, str], key: str, default: str | None = None) -> dict[str, Any]:
    """Metadata ``key`` parsed as a JSON object of bounded size and depth."""
    text = metadata.get(key, default)
    if text is None:
        raise CheckpointError(f"{path}: checkpoint metadata has no {key!r}")
    if len(text) > _MAX_METADATA_CHARS:
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is {len(text)} characters "
                              f"(at most {_MAX_METADATA_CHARS} expected)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is not JSON ({err.msg} at {err.pos})") from None
    except ValueError as err:  # a number of more digits than Python converts
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is not usable JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} must be a JSON object, "
                              f"not {type(value).__name__}")
    return value


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[ModelConfig, ModelConfig, dict[str, Any],
                                                                      dict[str, str]]:
    """(config as stored, config to build: no weights fetched, extra, versions), every value checked."""
    config_dict = _json_field(path, metadata, "config")
    try:
        stored = ModelConfig.from_dict(config_dict)
        # The weights are in the file: never download or read encoder weights again.
        config = ModelConfig.from_dict({**config_dict, "pretrained": False, "weights": None})
    except ConfigError as err:
        raise CheckpointError(f"{path}: model config unusable: {err}") from None
    extra = _json_field(path, metadata, "extra", "{}")
    for key, (valid, expected) in _EXTRA_CHECKS.items():
        if key in extra and not valid(extra[key]):
            raise CheckpointError(f"{path}: checkpoint {key} must be {expected}, got {_short(extra[key])}")
    versions = _json_field(path, metadata, "versions", "{}")
    if not all(isinstance(v, str) for v in versions.values()):
        raise CheckpointError(f"{path}: checkpoint metadata 'versions' must map names to version text")
    return stored, config, extra, versions


def _expected_specs(path: Path, config: ModelConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of the state dict of the model ``config`` describes, built on the ``meta``
    device: no memory is allocated and no weights initialised, whatever encoder the file names."""

    try:
        with torch.device("meta"):
            model = build_model(config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: model config unusable: {err}") from None
    except Exception as err:  # noqa: BLE001 - the file chose the encoder; whatever its constructor raises
        raise CheckpointError(f"{path}: cannot rebuild encoder {config.encoder!r} to check the weights against "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}


def _check_tensors(path: Path, header: _Header, expected: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   config: ModelConfig) -> None:
    """Refuse unless the file's model tensors are exactly those of ``expected`` (names, shapes, dtype kinds)
    and all tensors together fill the file's data section, byte for byte."""
    extras = [k for k in header.specs if k.startswith(_EXTRA_PREFIX)]
    if len(extras) > _MAX_EXTRA_TENSORS:
        raise CheckpointError(f"{path}: {len(extras)} extra tensors (at most {_MAX_EXTRA_TENSORS} expected)")
    unknown_dtypes = sorted({dtype for dtype, _ in header.specs.values() if dtype not in _DTYPES})
    if unknown_dtypes:
        raise CheckpointError(f"{path}: tensors of unsupported dtype {', '.join(map(_short, unknown_dtypes))}")
    found = {k: v for k, v in header.specs.items() if not k.startswith(_EXTRA_PREFIX)}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = []
    for name in expected.keys() & found.keys():
        dtype_name, shape = found[name]
        want_dtype, want_shape = expected[name]
        dtype = _DTYPES[dtype_name]
        same_kind = dtype == want_dtype or (dtype.is_floating_point and want_dtype.is_floating_point)
        if shape != want_shape or not same_kind:
            wrong.append(f"{_short(name)} {dtype_name}{list(shape)} vs {str(want_dtype).removeprefix('torch.')}"
                         f"{list(want_shape)}")
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {', '.join(_short(k) for k in missing[:2])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(_short(k) for k in unexpected[:2])})"
                 if unexpected else "",
                 f"{len(wrong)} of another shape or dtype (e.g. {'; '.join(sorted(wrong)[:2])})" if wrong else ""]
        raise CheckpointError(f"{path}: weights do not match the model config (encoder {config.encoder!r}): "
                              f"{'; '.join(p for p in parts if p)}")
    tensor_bytes = sum(math.prod(shape) * _DTYPES[dtype].itemsize for dtype, shape in header.specs.values())
    if tensor_bytes != header.data_bytes:
        raise CheckpointError(f"{path}: the tensors take {tensor_bytes} bytes but the file holds "
                              f"{header.data_bytes} bytes of data (damaged or altered file)")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors: {' '.join(str(err).split())[:200]}") from err
