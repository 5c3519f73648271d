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

from pneumodet.errors import ConfigError

#: Named optimisation recipes. ``default`` trains well from random init and from ImageNet weights
#: (AdamW, linear warm-up, cosine decay); ``reference`` is the RSNA paper's (Adam 1e-5, plateau x0.2
#: after 4 epochs, gradient-norm clipping 0.05, global-loss weight 0.1).
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(optimizer="adamw", lr=3e-4, weight_decay=1e-4, scheduler="cosine", warmup_fraction=0.1,
                    grad_clip=1.0, plateau_patience=4, plateau_factor=0.2),
    "reference": dict(optimizer="adam", lr=1e-5, weight_decay=0.0, scheduler="plateau", warmup_fraction=0.0,
                      grad_clip=0.05, plateau_patience=4, plateau_factor=0.2),
}

#: What ``train --resume`` may change: how long to go on and how to feed it, not what is learned.
RESUME_CHANGEABLE = frozenset({"epochs", "max_steps", "num_workers", "checkpoint_every_n_steps"})
#: Fields holding paths: compared as resolved paths, stored absolute by ``train``.
PATH_FIELDS = ("data_dir", "split_dir", "cache_dir", "out_dir", "weights")


def _same_setting(key: str, stored: Any, given: Any) -> bool:
    if key in PATH_FIELDS and stored and given:
        return Path(stored).absolute() == Path(given).absolute()
    return stored == given


@dataclass
class TrainConfig:
    """Everything a training run depends on. Paths are stored as strings so the YAML stays plain."""

    data_dir: str = ""
    split_dir: str = ""
    out_dir: str = ""
    cache_dir: str | None = None
    encoder: str = "resnet50"
    aug: str = "heavy"
    epochs: int = 8
    batch_size: int = 8
    image_size: int = 512
    recipe: str = "default"
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    plateau_patience: int = 4
    plateau_factor: float = 0.2
    global_loss_weight: float = 0.1
    box_loss: str = "smooth_l1"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 2
    seed: int = 42
    pretrained: bool = False
    weights: str | None = None
    checkpoint_every_n_steps: int = 200
    max_steps: int = -1
    limit_val_batches: float | int = 1.0
    model: dict[str, Any] = field(default_factory=dict)
    #: set by ``train``: SHA-256 of the split's set files; ``evaluate`` and ``--resume`` check it
    split_fingerprint: str | None = None

    @classmethod
    def with_recipe(cls, recipe: str, **overrides: Any) -> TrainConfig:
        """A config whose optimisation fields come from ``RECIPES[recipe]``, then ``overrides``."""
        return cls.layered(recipe=recipe, overrides=overrides)

    @classmethod
    def layered(cls, *, recipe: str | None = None, base: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The config of ``recipe``'s defaults, then ``base`` (a config file's values), then ``overrides``
        (command-line options). A ``recipe`` named here replaces the optimisation settings of ``base``;
        without one, ``base``'s recipe (else ``default``) applies."""
        base = dict(base or {})
        overrides = dict(overrides or {})
        name = recipe or overrides.pop("recipe", None) or base.get("recipe") or "default"
        overrides.pop("recipe", None)
        if not isinstance(name, str) or name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        if recipe and recipe != base.get("recipe", recipe):
            base = {k: v for k, v in base.items() if k not in RECIPES[recipe]}
        return cls.from_dict({**RECIPES[name], **base, **overrides, "recipe": name})

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with every path made absolute (what ``train`` records: a run is read from
        anywhere, and a relative path would silently mean another folder from another directory)."""
        values = self.to_dict()
        for key in PATH_FIELDS:
            if values.get(key):
                values[key] = str(Path(values[key]).absolute())
        return TrainConfig.from_dict(values)

    def resumed_with(self, requested: Mapping[str, Any], run_dir: Path) -> tuple[TrainConfig, list[str]]:
        """This stored run config continued in ``run_dir`` with the ``requested`` values.

        ``run_dir`` is the run (a moved run folder resumes where it now is). Only the fields in
        :data:`RESUME_CHANGEABLE` may change; any other requested value that differs from the stored one
        is refused with :class:`ConfigError` naming each. Returns the config and one note per change.
        """
        stored = self.to_dict()
        notes, refused = [], []
        for key, value in requested.items():
            if key in ("out_dir", "split_fingerprint") or key not in stored:
                continue
            if _same_setting(key, stored[key], value):
                continue
            if key in RESUME_CHANGEABLE:
                notes.append(f"{key}: {stored[key]} -> {value}")
                stored[key] = value
            else:
                refused.append(f"{key} (run: {stored[key]}, given: {value})")
        if refused:
            raise ConfigError(f"{run_dir}: cannot change {', '.join(refused)} when resuming; only "
                              f"{', '.join(sorted(RESUME_CHANGEABLE))} can change (start a new run with another --out)")
        stored["out_dir"] = str(Path(run_dir).absolute())
        return TrainConfig.from_dict(stored), notes

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        config = cls(**{k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.image_size >= 64 and self.image_size % 32 == 0, "image_size must be a multiple of 32, >= 64"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("adam", "adamw", "sgd"), "optimizer must be adam, adamw or sgd"),
            (self.scheduler in ("cosine", "plateau", "none"), "scheduler must be cosine, plateau or none"),
            (self.precision in ("auto", "bf16-mixed", "16-mixed", "32-true", "32"),
             "precision must be auto, bf16-mixed, 16-mixed or 32-true"),
            (self.box_loss in ("smooth_l1", "giou"), "box_loss must be smooth_l1 or giou"),
            (self.devices >= 1 and self.num_nodes >= 1, "devices and num_nodes must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_yaml(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: config must be a mapping of keys to values")
        return cls.from_dict(values)
