"""Checkpoints: tensors + model config + versions in one safetensors file; loading never runs code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pneumodet.errors import CheckpointError, ConfigError
from pneumodet.model.config import ModelConfig

FORMAT = "pneumodet-checkpoint"
FORMAT_VERSION = 1
#: Prefix of the tensors of ``extra`` (everything else in ``extra`` is stored as JSON).
_EXTRA_PREFIX = "__extra__."


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    from pneumodet import __version__

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # disk full: the previous file stays as it was
        raise CheckpointError(f"{path}: cannot write the checkpoint ({getattr(err, 'strerror', None) or err}); "
                              "a previous one is kept") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a pneumodet checkpoint, or :class:`CheckpointError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a pneumodet checkpoint (expected a safetensors file; pickled files are "
            f"refused because loading them can run code): {err}"
        ) from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: safetensors file without pneumodet metadata (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {metadata.get('format_version')} (this pneumodet reads {FORMAT_VERSION})"
        )
    return tensors, metadata


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`.

    Returns:
        (model in eval mode on ``map_location``, ``extra`` as saved, plus ``versions``).
    """
    from pneumodet.model.retinanet import build_model

    tensors, metadata = read_checkpoint(path)
    try:
        config_dict = json.loads(metadata["config"])
        # The weights are in the file: never download or read encoder weights again.
        config = ModelConfig.from_dict({**config_dict, "pretrained": False, "weights": None})
    except (KeyError, json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"{path}: model config unreadable: {err}") from err
    model = build_model(config)
    state = {k: v for k, v in tensors.items() if not k.startswith(_EXTRA_PREFIX)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    extra = json.loads(metadata.get("extra", "{}"))
    extra.update({k.removeprefix(_EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)})
    extra["versions"] = json.loads(metadata.get("versions", "{}"))
    model.config.pretrained = config_dict.get("pretrained", False)
    model.config.weights = config_dict.get("weights")
    return model.to(map_location).eval(), extra
