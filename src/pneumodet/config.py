"""Run configuration: one dataclass, a YAML round trip, and the named training recipes.

A run's ``config.yaml`` is enough to reproduce it: ``pneumodet train --config RUN/config.yaml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumodet.data.levels import LEVELS
from pneumodet.errors import ConfigError
from pneumodet.fieldtypes import check_field_types, check_range, show_key
from pneumodet.model.config import LOSS_NORMALIZERS, MAX_IMAGE_SIZE, ModelConfig
from pneumodet.safeio import load_yaml, write_text

#: Named optimisation recipes. ``default`` trains well from random init and from ImageNet weights
#: (AdamW, linear warm-up over 10 % of the steps but at least 200 (at most half the run), cosine decay, the
#: focal loss divided by a running mean of positive anchors); ``reference`` is the RSNA paper's (Adam 1e-5,
#: plateau x0.2 after 4 epochs, gradient-norm clipping 0.05, global-loss weight 0.1 and dropout 0.5 (the
#: recipe's model settings)); ``baseline-v1`` is
#: ``default`` as it was before the first-steps fix (warm-up 10 % of the steps only, each batch's loss divided
#: by its own positive count), kept so that benchmarks can compare the two.
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(optimizer="adamw", lr=3e-4, weight_decay=1e-4, scheduler="cosine", warmup_fraction=0.1,
                    warmup_steps=200, grad_clip=1.0, plateau_patience=4, plateau_factor=0.2,
                    loss_normalizer="ema"),
    "reference": dict(optimizer="adam", lr=1e-5, weight_decay=0.0, scheduler="plateau", warmup_fraction=0.0,
                      warmup_steps=0, grad_clip=0.05, plateau_patience=4, plateau_factor=0.2,
                      loss_normalizer="ema", model=dict(global_loss_weight=0.1, global_dropout=0.5)),
    "baseline-v1": dict(optimizer="adamw", lr=3e-4, weight_decay=1e-4, scheduler="cosine", warmup_fraction=0.1,
                        warmup_steps=0, grad_clip=1.0, plateau_patience=4, plateau_factor=0.2,
                        loss_normalizer="batch"),
}

#: Largest step/batch count a config may name (a bound, so that a typo cannot mean "forever").
_MAX_COUNT = 10**9
#: (field, lowest, highest) of the whole-number fields; the seed range is what Lightning accepts.
_INT_RANGES = (("epochs", 1, 100_000), ("batch_size", 1, 4096), ("devices", 1, 1024), ("num_nodes", 1, 1024),
               ("num_workers", 0, 256), ("seed", 0, 2**32 - 1), ("plateau_patience", 0, 100_000),
               ("checkpoint_every_n_steps", 0, _MAX_COUNT), ("warmup_steps", 0, _MAX_COUNT))

#: Fields added after runs were first written, with the value every run written before them trained with: a
#: run's stored config without such a field resumes (and is reported) as it started, not with today's default.
BEFORE_FIELD_EXISTED: dict[str, Any] = {"warmup_steps": 0, "loss_normalizer": "batch"}

#: What ``train --resume`` may change: how long to go on and how to feed it, not what is learned.
RESUME_CHANGEABLE = frozenset({"epochs", "max_steps", "num_workers", "checkpoint_every_n_steps"})
#: Fields holding paths (``weights`` is the model's): compared as resolved paths, stored absolute by ``train``.
PATH_FIELDS = ("data_dir", "split_dir", "cache_dir", "out_dir", "weights")
#: The model's settings, which a flat mapping (command-line options, config files of pneumodet 0.1) may name
#: at the top level: ``encoder: resnet18`` means ``model: {encoder: resnet18}``.
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def _same_setting(key: str, stored: Any, given: Any) -> bool:
    if key in PATH_FIELDS and stored and given:
        return Path(stored).absolute() == Path(given).absolute()
    return stored == given


def nest_model_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every top-level model setting moved into its ``model`` mapping (the flat name wins
    over the same name inside ``model``: it is the later, more specific layer)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(values).__name__}")
    out = {k: v for k, v in values.items() if k not in MODEL_KEYS}
    flat = {k: v for k, v in values.items() if k in MODEL_KEYS}
    model = values.get("model", {})
    if isinstance(model, ModelConfig):
        model = model.to_dict()
    if flat or "model" in values:
        if not isinstance(model, Mapping):
            raise ConfigError(f"config model must be a mapping of model settings, got {type(model).__name__}")
        out["model"] = {**model, **flat}
    return out


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers over earlier ones; the ``model`` mappings are merged key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = nest_model_keys(layer)
        model = {**merged.get("model", {}), **layer.get("model", {})}
        merged.update(layer)
        if model:
            merged["model"] = model
    return merged


def _without_recipe_settings(base: Mapping[str, Any], recipe: str) -> dict[str, Any]:
    """``base`` (nested) less every setting ``recipe`` sets, its model settings included, so that a recipe
    named on the command line replaces those of a config file and nothing else."""
    settings = nest_model_keys(RECIPES[recipe])
    out = {k: v for k, v in base.items() if k not in settings or k == "model"}
    if isinstance(base.get("model"), Mapping):
        out["model"] = {k: v for k, v in base["model"].items() if k not in settings.get("model", {})}
    return out


@dataclass
class TrainConfig:
    """Everything a training run depends on: the data, the network (:class:`ModelConfig`, nested as
    ``model:`` in YAML), the optimisation recipe and the hardware. Paths are stored as strings so the YAML
    stays plain."""

    data_dir: str = ""
    split_dir: str = ""
    out_dir: str = ""
    cache_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: str = "heavy"
    epochs: int = 8
    batch_size: int = 8
    recipe: str = "default"
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_fraction: float = 0.1
    #: the shortest warm-up in optimiser steps (capped at half the run); the longer of it and
    #: ``warmup_fraction`` of the steps applies (cosine schedule only)
    warmup_steps: int = 200
    grad_clip: float = 1.0
    plateau_patience: int = 4
    plateau_factor: float = 0.2
    #: how the summed focal and box losses are divided (:data:`pneumodet.model.config.LOSS_NORMALIZERS`)
    loss_normalizer: str = "ema"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 2
    seed: int = 42
    checkpoint_every_n_steps: int = 200
    max_steps: int = -1
    limit_val_batches: float | int = 1.0
    #: set by ``train``: SHA-256 of the split's set files; ``evaluate`` and ``--resume`` check it
    split_fingerprint: str | None = None

    @property
    def image_size(self) -> int:
        """The training (and prediction) input side: the model's, stored once."""
        return self.model.image_size

    @classmethod
    def with_recipe(cls, recipe: str, **overrides: Any) -> TrainConfig:
        """A config whose optimisation fields come from ``RECIPES[recipe]``, then ``overrides``."""
        return cls.layered(recipe=recipe, overrides=overrides)

    @classmethod
    def layered(cls, *, recipe: str | None = None, base: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The config of ``recipe``'s defaults, then ``base`` (a config file's values), then ``overrides``
        (command-line options; model settings may be named flat, e.g. ``encoder``). A ``recipe`` named here
        replaces the optimisation settings of ``base``; without one, ``base``'s recipe (else ``default``)
        applies."""
        base = nest_model_keys(base or {})
        overrides = nest_model_keys(overrides or {})
        name = recipe or overrides.pop("recipe", None) or base.get("recipe") or "default"
        overrides.pop("recipe", None)
        if not isinstance(name, str) or name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        if recipe and recipe != base.get("recipe", recipe):
            base = _without_recipe_settings(base, recipe)
        return cls.from_dict(merge_layers(RECIPES[name], base, overrides, {"recipe": name}))

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with every path made absolute (what ``train`` records: a run is read from
        anywhere, and a relative path would silently mean another folder from another directory)."""
        values = self.to_dict()
        for layer in (values, values["model"]):
            for key in PATH_FIELDS:
                if layer.get(key):
                    layer[key] = str(Path(layer[key]).absolute())
        return TrainConfig.from_dict(values)

    def resumed_with(self, requested: Mapping[str, Any], run_dir: Path) -> tuple[TrainConfig, list[str]]:
        """This stored run config continued in ``run_dir`` with the ``requested`` values.

        ``run_dir`` is the run (a moved run folder resumes where it now is). Only the fields in
        :data:`RESUME_CHANGEABLE` may change; any other requested value that differs from the stored one
        (model settings included) is refused with :class:`ConfigError` naming each. Returns the config and
        one note per change.
        """
        stored = self.to_dict()
        requested = nest_model_keys(requested)
        notes, refused = [], []
        pairs = [(k, stored, v) for k, v in requested.items() if k != "model"]
        pairs += [(k, stored["model"], v) for k, v in requested.get("model", {}).items()]
        for key, layer, value in pairs:
            if key in ("out_dir", "split_fingerprint") or key not in layer:
                continue
            if _same_setting(key, layer[key], value):
                continue
            if key in RESUME_CHANGEABLE and layer is stored:
                notes.append(f"{key}: {layer[key]} -> {value}")
                layer[key] = value
            else:
                refused.append(f"{key} (run: {layer[key]}, given: {value})")
        if refused:
            raise ConfigError(f"{run_dir}: cannot change {', '.join(refused)} when resuming; only "
                              f"{', '.join(sorted(RESUME_CHANGEABLE))} can change (start a new run with another --out)")
        stored["out_dir"] = str(Path(run_dir).absolute())
        return TrainConfig.from_dict(stored), notes

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The config of ``values`` (missing keys keep their defaults; paths may be ``Path`` objects; model
        settings nested under ``model`` or named flat), validated.

        Anything else than a mapping of known keys to values of the right types and ranges raises
        :class:`ConfigError` naming the first problem: ``values`` may come straight from a file.
        """
        values = nest_model_keys(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(show_key(k) for k in values if k not in known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown[:5])}")
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
        if "model" in values:
            model = {k: (str(v) if isinstance(v, Path) else v) for k, v in values["model"].items()}
            values["model"] = ModelConfig.from_dict(model)  # its errors say "model config ..."
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the model nested as a mapping, tuples as lists): what ``config.yaml`` holds."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = self.model.to_dict()
        return values

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field of a wrong type (checked first: a value from a
        file may be anything), out of its range, or not one of its choices. The model's own fields were
        checked when it was built; here only what training adds (a size the encoder's strides divide)."""
        check_field_types(type(self), {k: v for k, v in vars(self).items() if k != "model"}, what="config")
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"config model must be a mapping of model settings, got {type(self.model).__name__}")
        for name, low, high in _INT_RANGES:
            check_range(name, getattr(self, name), low, high)
        if self.max_steps != -1:
            check_range("max_steps (-1: no limit)", self.max_steps, 1, _MAX_COUNT)
        if not (64 <= self.image_size <= MAX_IMAGE_SIZE and self.image_size % 32 == 0):
            raise ConfigError(f"image_size must be a multiple of 32 in [64, {MAX_IMAGE_SIZE}], got {self.image_size}")
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0, high_open=True)
        check_range("plateau_factor", self.plateau_factor, 0.0, 1.0, low_open=True, high_open=True)
        for name in ("weight_decay", "grad_clip"):
            check_range(name, getattr(self, name), 0.0)
        if isinstance(self.limit_val_batches, float):  # a fraction of the batches; an int counts batches
            check_range("limit_val_batches", self.limit_val_batches, 0.0, 1.0, low_open=True)
        else:
            check_range("limit_val_batches", self.limit_val_batches, 1, _MAX_COUNT)
        choices = {"aug": LEVELS, "recipe": tuple(RECIPES), "optimizer": ("adam", "adamw", "sgd"),
                   "scheduler": ("cosine", "plateau", "none"), "loss_normalizer": LOSS_NORMALIZERS,
                   "precision": ("auto", "bf16-mixed", "16-mixed", "32-true", "32"),
                   "accelerator": ("auto", "cpu", "gpu", "cuda", "mps")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def to_yaml(self, path: Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path, *, stored_run: bool = False) -> TrainConfig:
        """The config in YAML file ``path``; every problem is one :class:`ConfigError` naming the file.

        Read with :func:`pneumodet.safeio.load_yaml` (bounded size, UTF-8, safe types, no aliases: a
        "billion laughs" file is refused, not expanded), then checked field by field (:meth:`validate`).
        ``stored_run``: ``path`` is a run's own ``config.yaml``, so a field it lacks because it was written
        before the field existed takes the value the run trained with (:data:`BEFORE_FIELD_EXISTED`).
        """
        values = load_yaml(path)
        if values is None:  # an empty file: every default
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: config must be a mapping of keys to values, not {type(values).__name__}")
        if stored_run:
            values = {**BEFORE_FIELD_EXISTED, **values}
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
