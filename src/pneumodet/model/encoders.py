"""timm encoders for one-channel chest X-rays, with offline weight files."""

from __future__ import annotations

import math
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

from pneumodet.errors import CheckpointError, ConfigError

#: Short names used by the RSNA reference code -> timm model names.
ENCODER_ALIASES: dict[str, str] = {
    "se_resnext50": "seresnext50_32x4d",
    "legacy_se_resnext50": "legacy_seresnext50_32x4d",
    "pnasnet5": "pnasnet5large",
}
#: Prefixes timm's feature wrappers put in front of the classification model's parameter names.
_WRAPPER_PREFIXES = ("body.",)
#: Keys under which training scripts commonly nest a state dict.
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def timm_name(name: str) -> str:
    return ENCODER_ALIASES.get(name, name)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` weights file, read without running code.

    ``.pth`` files are loaded with ``weights_only=True``; a nested ``state_dict``/``model`` entry
    and a DataParallel ``module.`` prefix are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is the file's fault
        raise CheckpointError(f"{path}: cannot be read as weights ({type(err).__name__}: {err})") from err
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


class Encoder(nn.Module):
    """A timm backbone in ``features_only`` mode taking one-channel images in [0, 1].

    The pretrained configuration's mean/std (averaged over RGB) normalise the input inside the
    module, so callers never need to know which encoder is used.

    Attributes:
        levels: pyramid level (log2 stride) of each returned feature map.
        channels: channels of each returned feature map.
    """

    def __init__(self, name: str, *, pretrained: bool = False, weights: str | Path | None = None) -> None:
        super().__init__()
        self.name = timm_name(name)
        self.body = _create(self.name, pretrained=pretrained and weights is None)
        if weights is not None:
            load_encoder_weights(self.body, weights)
        cfg = self.body.pretrained_cfg
        mean = sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,)))
        std = sum(cfg.get("std", (0.5,))) / len(cfg.get("std", (0.5,)))
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 1, 1, 1), persistent=False)
        self.levels = tuple(round(math.log2(r)) for r in self.body.feature_info.reduction())
        self.channels = tuple(self.body.feature_info.channels())

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: Tensor[B, 1, H, W] in [0, 1] -> one Tensor[B, C_l, H / 2**l, W / 2**l] per level."""
        return self.body((images - self.mean) / self.std)


def _create(name: str, *, pretrained: bool) -> nn.Module:
    """The ``features_only`` one-channel timm body; with ``pretrained``, its ImageNet weights or a
    :class:`ConfigError` saying why not (never a silent fall-back to random weights)."""
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"unknown encoder {name!r}: not a timm model name or one of {sorted(ENCODER_ALIASES)}")
    overlay = _pretrained_file(name) if pretrained else None
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=1,
                                 **({"pretrained_cfg_overlay": {"file": overlay}} if overlay else {}))
    except Exception as err:  # noqa: BLE001 - with pretrained: hub, download and file errors of the weights
        if pretrained:
            raise _weights_unavailable(name, f"{type(err).__name__}: {err}") from err
        if isinstance(err, RuntimeError):
            raise ConfigError(f"encoder {name!r} has no feature-extraction support in timm: {err}") from err
        raise


# ------------------------------------------------------------------------------------- ImageNet weights
#: Seconds to wait for a TCP connection to the weights' host before calling it unreachable (the hub
#: client's own retries take about a minute to give up).
PROBE_TIMEOUT_S = 3.0


def _weights_unavailable(name: str, reason: str) -> ConfigError:
    reason = " ".join(reason.split())
    return ConfigError(f"pretrained (ImageNet) weights for encoder {name!r} unavailable: {reason[:300]}; "
                       "pass a local weights file instead (--weights FILE, .pth or .safetensors)")


def _pretrained_file(name: str) -> str | None:
    """A local file with ``name``'s pretrained weights (the hub or torch cache), or ``None`` when they must
    be downloaded and the weights' host answers. Raises :class:`ConfigError` at once when there are none
    to get: no published weights, ``HF_HUB_OFFLINE`` set, or the host unreachable."""
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise _weights_unavailable(name, "timm publishes none for it")
    if cfg.file:
        return None
    for candidate in _cached_candidates(cfg):
        if candidate is not None:
            return candidate
    if cfg.hf_hub_id:
        if constants.HF_HUB_OFFLINE:
            raise _weights_unavailable(name, f"{cfg.hf_hub_id} is not in the local Hugging Face cache and "
                                             "HF_HUB_OFFLINE is set")
        url = constants.ENDPOINT
    else:
        url = cfg.url
    problem = unreachable(url)
    if problem:
        raise _weights_unavailable(name, f"not in the local cache, and {problem}")
    return None


def _cached_candidates(cfg: object) -> list[str | None]:
    """Paths where ``cfg``'s weights would be if downloaded before (``None`` where they are not)."""
    from huggingface_hub import try_to_load_from_cache

    found: list[str | None] = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id and not getattr(cfg, "custom_load", False):
        repo, _, revision = hub_id.partition("@")
        filename = getattr(cfg, "hf_hub_filename", None)
        names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        if filename and filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")] + ".safetensors")
        for file_name in names:
            cached = try_to_load_from_cache(repo, file_name, revision=revision or None)
            found.append(cached if isinstance(cached, str) else None)  # also a "known absent" marker
    url = getattr(cfg, "url", None)
    if url and not hub_id:
        cached_url = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
        found.append(str(cached_url) if cached_url.is_file() else None)
    return found


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to ``url``'s host (or the proxy for it) opens within ``timeout``
    seconds, else a short reason. The name lookup is bounded too (it runs in a thread)."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    target = urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(parts.hostname or "") else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"{host} cannot be reached ({err.strerror or type(err).__name__})")

    thread = threading.Thread(target=connect, name="pneumodet-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"{host} did not answer within {timeout:.0f} s"


def load_encoder_weights(body: nn.Module, path: str | Path) -> None:
    """Load a classification checkpoint (timm/torchvision names) into a ``features_only`` body.

    The classifier and any layers the body does not have are dropped; a 3-channel first conv is
    summed to one channel (timm's ``adapt_input_conv``). Every parameter of the body must be in
    the file with a matching shape, otherwise :class:`CheckpointError` names what is missing.
    """
    state = read_state_dict(path)
    own = body.state_dict()
    loaded: dict[str, Tensor] = {}
    missing, mismatched = [], []
    for key, param in own.items():
        source = _source_key(key, state)
        if source is None:
            missing.append(key)
            continue
        value = state[source]
        if value.ndim == 4 and param.ndim == 4 and param.shape[1] == 1 and value.shape[1] == 3:
            value = adapt_input_conv(1, value)  # the RGB stem: sum to one channel
        if value.shape != param.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(param.shape)}")
            continue
        loaded[key] = value
    if missing or mismatched:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(mismatched)} of another shape (e.g. {', '.join(mismatched[:2])})" if mismatched else "",
            )
            if part
        )
        raise CheckpointError(f"{path}: weights do not fit the encoder: {detail}")
    body.load_state_dict(loaded, strict=True)


def _source_key(key: str, state: dict[str, Tensor]) -> str | None:
    if key in state:
        return key
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix) and key.removeprefix(prefix) in state:
            return key.removeprefix(prefix)
    return None
