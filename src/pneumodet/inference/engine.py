"""The prediction engine: a loaded model and the options it runs with, from input images to raw boxes.

:func:`load_for_inference` loads a run's best model (or a checkpoint file); :class:`Predictor` runs
batches of model inputs (``[B, 1, S, S]`` in ``[0, 1]``, :func:`pneumodet.data.preprocess.prepare_image`)
through it with the precision, TTA and gating of :class:`~pneumodet.inference.options.PredictOptions`,
and returns :class:`RawPrediction` per image: boxes in input pixels, before the threshold. ``predict``
(DICOM files) and ``evaluate`` (a run's split) are both built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumodet.boxes import boxes_to_original, hflip
from pneumodet.data.records import gate_scores
from pneumodet.errors import CheckpointError, ConfigError, RunError
from pneumodet.hardware import parse_precision, resolve_precision
from pneumodet.inference.options import (
    DEVICE_CHOICES,
    PredictOptions,
    TtaMerge,
    check_postprocess_options,
    check_precision_device,
    check_tta,
)
from pneumodet.inference.results import xyxy_to_kaggle
from pneumodet.inference.tta import merge_views
from pneumodet.model import Detections, HeadOutputs, fusion
from pneumodet.model.checkpoint import load_checkpoint
from pneumodet.rundir import CvDir, RunDir
from pneumodet.textsafe import display_path


# ---------------------------------------------------------------- model loading
def resolve_checkpoint(model_source: Path | str) -> Path:
    """A run directory means its best model (:attr:`RunDir.best_model`); a file is taken as the checkpoint."""
    path = Path(model_source)
    if path.is_dir() and CvDir(path).is_cv():
        raise CheckpointError(f"{display_path(model_source)}: a cross-validation folder is an ensemble of its "
                              f"fold runs, which predict and evaluate take; give one fold's run here, e.g. "
                              f"{display_path(CvDir(path).fold(1).root)}")
    if path.is_dir():
        path = RunDir(path).best_model
        if not path.is_file():
            raise CheckpointError(f"{display_path(model_source)}: a run directory needs {path.name}, "
                                  "which is missing")
    elif not path.is_file():
        raise CheckpointError(f"{display_path(model_source)}: no such checkpoint file or run directory")
    return path


def load_for_inference(model_source: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint (``weights_only``) and put the model in eval mode; returns ``(model, extra)``."""
    model, extra = load_checkpoint(resolve_checkpoint(model_source))
    return model.eval(), dict(extra or {})


#: Where a run's own threshold comes from (recorded by ``evaluate`` and said by ``predict``).
RUN_THRESHOLD_SOURCE = "chosen on the validation set during training"
#: The same for the threshold of gated scores (``--gate``), chosen on the same validation pass.
RUN_GATE_THRESHOLD_SOURCE = "chosen on the validation set during training, for gated scores"


def expand_cv_folders(sources: Sequence[Path | str]) -> tuple[list[Path], dict[str, Any] | None]:
    """Each source, with a cross-validation folder (:class:`~pneumodet.rundir.CvDir`) replaced by its fold runs;
    and that folder's ``cv.json`` when the sources are exactly one CV folder (its out-of-fold threshold is
    then the ensemble's).

    Raises:
        ConfigError: no source, or the same model given twice (it would count double in the fusion).
        RunError: a CV folder whose ``cv.json`` is damaged or whose folds are not all trained.
    """
    if not sources:
        raise ConfigError("no model given")
    expanded: list[Path] = []
    summary = None
    for source in sources:
        cv = CvDir(Path(source))
        if not cv.is_cv():
            expanded.append(Path(source))
            continue
        summary = cv.read_summary()
        runs = [cv.fold(k) for k in range(1, summary["folds"] + 1)]
        missing = [r.root.name for r in runs if not r.has_model()]
        if missing:
            raise RunError(f"{display_path(cv.root)}: the cross-validation is not complete ({', '.join(missing)} "
                           f"without {runs[0].best_model.name}); run `pneumodet cv --out {display_path(cv.root)}` "
                           "again to finish it")
        expanded.extend(r.root for r in runs)
    seen: dict[Path, Path] = {}
    for path in expanded:
        # the checkpoint a source means, without requiring it to exist: the loaders say what is missing, in
        # the words of what was given (evaluate: "not a finished training run")
        key = (RunDir(path).best_model if path.is_dir() else path).resolve()
        if key in seen:
            raise ConfigError(f"{display_path(path)}: the same model as {display_path(seen[key])}; an ensemble "
                              "takes each model once")
        seen[key] = path
    return expanded, summary if len(sources) == 1 else None


@dataclass(frozen=True)
class LoadedModels:
    """The models of ``predict`` / ``evaluate``: one, or an ensemble's members (CV folders expanded).

    ``threshold`` is the one recorded for them, ``None`` when there is none: a single model's validation
    threshold, a CV folder's out-of-fold one; an ensemble of separate runs records none (``evaluate``
    chooses it on validation: :func:`pneumodet.evaluation.validation_threshold`). ``gate_threshold`` is
    the one recorded, by the same validation, for gated scores (``--gate``); ``None`` for runs trained
    before it was recorded.
    """

    sources: list[Path]
    models: list[nn.Module]
    extras: list[dict[str, Any]]
    image_size: int
    threshold: float | None
    threshold_source: str
    gate_threshold: float | None = None
    gate_threshold_source: str = ""

    @property
    def is_ensemble(self) -> bool:
        return len(self.models) > 1

    def threshold_for(self, gate: bool) -> tuple[float | None, str]:
        """The recorded threshold for plain or gated scores, and where it comes from (``None``: none)."""
        return (self.gate_threshold, self.gate_threshold_source) if gate else (self.threshold, self.threshold_source)


def load_models(sources: Path | str | Sequence[Path | str]) -> LoadedModels:
    """Load one model (run folder or checkpoint) or an ensemble (several, or a CV folder), eval mode.

    Raises:
        ConfigError: as :func:`expand_cv_folders`, or members taking different input sizes (one input
            stream feeds them all), named in one line.
        CheckpointError, RunError: a source that is not a model, as :func:`resolve_checkpoint`; a CV folder
            whose ``cv.json`` records no usable out-of-fold threshold (a fold failed, or it is damaged).
    """
    given = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    paths, cv_summary = expand_cv_folders(given)
    models, extras = [], []
    for path in paths:
        model, extra = load_for_inference(path)
        models.append(model)
        extras.append(extra)
    sizes = {path: model_image_size(model) for path, model in zip(paths, models, strict=True)}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{display_path(p)} {s} px" for p, s in sizes.items())
        raise ConfigError(f"the ensemble's models take different input sizes ({listing}); fuse models trained "
                          "at one image size")
    threshold, threshold_source, gated, gated_source = None, "", None, ""
    if cv_summary is not None:
        summary_file = display_path(CvDir(given[0]).summary)
        oof = cv_summary.get("oof") if isinstance(cv_summary.get("oof"), dict) else {}
        threshold = _unit_value(oof.get("threshold"))
        if threshold is None:
            raise RunError(f"{summary_file}: records no usable out-of-fold threshold ({oof.get('threshold')!r}); "
                           f"run `pneumodet cv --out {display_path(given[0])}` again to finish the cross-validation")
        threshold_source = (f"chosen on the out-of-fold validation predictions of the {len(paths)} folds "
                            f"({summary_file})")
        gated = _unit_value(oof.get("gate_threshold"))
        gated_source = (f"chosen on the out-of-fold validation predictions of the {len(paths)} folds, for gated "
                        f"scores ({summary_file})")
    elif len(paths) == 1 and "threshold" in extras[0]:
        threshold, threshold_source = float(extras[0]["threshold"]), RUN_THRESHOLD_SOURCE
        gated, gated_source = _unit_value(extras[0].get("gate_threshold")), RUN_GATE_THRESHOLD_SOURCE
    return LoadedModels(paths, models, extras, next(iter(sizes.values())), threshold, threshold_source,
                        gated, gated_source if gated is not None else "")


def _unit_value(value: Any) -> float | None:
    """``value`` as a float when it is a number in [0, 1] (a recorded threshold), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return float(value)


def model_image_size(model: nn.Module) -> int:
    """The square input side the model was trained at: its config's ``image_size``, where it is stored once."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    if not size:
        raise CheckpointError("the checkpoint's model configuration records no image_size; cannot prepare "
                              "inputs for it")
    return int(size)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to predict on: ``"auto"`` (or ``None``) is the first CUDA GPU when this machine has a
    usable one, else the CPU; ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are checked against the machine.

    Raises:
        ConfigError: an unknown device, or a GPU this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {device!r}; choose {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return dev


def check_options(options: PredictOptions) -> torch.device:
    """Every check of ``options`` (:meth:`PredictOptions.check`, then the device against this machine, and
    the precision against the device), made before anything is loaded; returns the device."""
    options.check()
    device = resolve_device(options.device)
    check_precision_device(options.precision, str(device), chosen=options.device in (None, "auto"))
    return device


# ---------------------------------------------------------------- the engine
@dataclass(frozen=True)
class RawPrediction:
    """Boxes in model-input pixels before the threshold: xyxy ``[N, 4]``, scores ``[N]``, probs ``[C]``."""

    boxes: torch.Tensor
    scores: torch.Tensor
    class_probs: torch.Tensor

    def kaggle_rows(self, threshold: float, original_size: tuple[int, int], image_size: int) -> np.ndarray:
        """The boxes scoring at least ``threshold`` in the ``(H, W)`` original image's pixels, as
        :attr:`~pneumodet.inference.results.ImagePrediction.boxes` (float32 ``conf, x, y, w, h``, by score)."""
        keep = self.scores >= threshold
        return xyxy_to_kaggle(boxes_to_original(self.boxes[keep], original_size, image_size), self.scores[keep])


class Predictor:
    """A loaded model plus the prediction options; turns a batch of input images into raw predictions."""

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        tta: str | None = None,
        tta_merge: TtaMerge = "wbf",
        tta_iou: float = 0.55,
        gate: bool = False,
        device: str | torch.device | None = "cpu",
        precision: str | None = None,
        compile: bool = False,
        fold_batchnorm: bool = True,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        min_score: float | None = None,
        network: nn.Module | None = None,
    ) -> None:
        """Takes over ``model``: it is put in eval mode on ``device``, channels_last, and (unless
        ``fold_batchnorm`` is false) its encoder's batch norms are folded into the convolutions.
        ``nms_iou``, ``max_detections``, ``min_score`` replace the model configuration's post-processing
        values (``nms_thresh``, ``max_detections``, ``score_thresh``); ``None`` keeps the model's.

        ``network``: runs instead of the model's own network, taking the same images and returning the
        model's :class:`HeadOutputs` (a run's int8 graph in ONNX Runtime,
        :class:`~pneumodet.inference.quantize.OrtNetwork`); ``precision`` names what it computes in
        (``"int8"``, which needs one). The model then only decodes: nothing is autocast, compiled or folded.
        """
        check_tta(tta, tta_merge)
        check_postprocess_options(nms_iou=nms_iou, max_detections=max_detections, min_score=min_score)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "int8" and network is None:
            raise ConfigError("int8 prediction runs a run's int8 graph (`pneumodet quantize RUN`), given as the "
                              "predictor's network: see pneumodet.inference.engine.make_predictor")
        if fold_batchnorm and network is None:
            model = fusion.fold_batchnorm(model, inplace=True)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self._external = network is not None
        # Compiling costs about 8 s per batch shape for ResNet50 on a 2-core CPU, then each batch runs
        # about 1.4x faster (docs/BENCHMARKS.md): worth it for large jobs only.
        self._compiling = compile and network is None
        self.network = network if network is not None else (
            fusion.compile_for_inference(self.model) if self._compiling else self.model)
        self._compiled_batch: int | None = None  # the batch shape compiled first; smaller ones are padded
        #: what the caller should tell the user about how this predictor was chosen (an int8 graph not used)
        self.notes: list[str] = []
        self.image_size = image_size
        self.tta, self.tta_merge, self.tta_iou, self.gate = tta, tta_merge, tta_iou, gate
        config = getattr(model, "config", None)
        # Resolved once, so what is recorded (evaluate's metrics.json) is what every batch used; a model
        # without a configuration leaves ``None``: its detect() then uses its own values.
        self.postprocess: dict[str, float | int | None] = {
            "nms_iou": nms_iou if nms_iou is not None else getattr(config, "nms_thresh", None),
            "max_detections": max_detections if max_detections is not None else getattr(config, "max_detections",
                                                                                         None),
            "min_score": min_score if min_score is not None else getattr(config, "score_thresh", None),
        }

    @classmethod
    def from_options(cls, model: nn.Module, image_size: int, options: PredictOptions, *,
                     num_images: int, network: nn.Module | None = None) -> Predictor:
        """A predictor with ``options``' TTA, gating, device and precision; ``compile=None`` compiles when
        :func:`pneumodet.model.fusion.compile_pays_off` for ``num_images`` images on that device.
        ``network``: the run's int8 graph (:func:`make_predictor` finds it), which makes the precision
        int8."""
        device = resolve_device(options.device)
        compile = options.compile if options.compile is not None else fusion.compile_pays_off(num_images, device)
        return cls(model, image_size, tta=options.tta, tta_merge=options.tta_merge, gate=options.gate,
                   device=device, precision="int8" if network is not None else options.precision,
                   compile=compile, nms_iou=options.nms_iou, max_detections=options.max_detections,
                   min_score=options.min_score, network=network)

    @property
    def compiled(self) -> bool:
        """Whether batches run through the compiled network (false again after a failed compilation)."""
        return self._compiling and self.network is not self.model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16" and not self._external:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _detect(self, images: torch.Tensor) -> list[Detections]:
        images = images.to(self.device, memory_format=torch.channels_last)
        with self._autocast():
            outputs = self._forward(images)
        post = self.postprocess  # decodes in fp32 whatever the head's dtype
        return self.model.detect(outputs, score_thresh=post["min_score"], nms_thresh=post["nms_iou"],
                                 max_detections=post["max_detections"])

    def _forward(self, images: torch.Tensor) -> HeadOutputs:
        if not self.compiled:  # the model itself, or a network of its own shapes (an int8 graph takes any batch)
            return self.network(images)
        batch = images.shape[0]
        if self._compiled_batch is None:
            self._compiled_batch = batch
        missing = self._compiled_batch - batch
        if missing > 0:  # a zero-padded batch costs less than compiling for a new shape
            images = torch.cat((images, images.new_zeros((missing, *images.shape[1:]))))
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            outputs = self.network(images)
        except Exception as err:  # noqa: BLE001 - Inductor raises many kinds (no compiler, lowering bugs)
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                          "predicting without compilation", stacklevel=4)
            self.network = self.model
            return self.model(images[:batch])
        if missing > 0:
            outputs = outputs._replace(cls_logits=outputs.cls_logits[:batch], box_deltas=outputs.box_deltas[:batch],
                                       global_logits=outputs.global_logits[:batch])
        return outputs

    def views(self, images: torch.Tensor) -> list[Views]:
        """images: float ``[B, 1, S, S]`` in ``[0, 1]`` -> ``B`` sets of views (the image, and its mirror with
        TTA, mapped back), not yet merged: what an ensemble pools across models before fusing."""
        batch = images.shape[0]
        if self.tta == "hflip":
            dets = self._detect(torch.cat((images, images.flip(-1))))
            plain, flipped = dets[:batch], dets[batch:]
        else:
            plain, flipped = self._detect(images), [None] * batch
        out = []
        for det, det_flip in zip(plain, flipped, strict=True):
            views = Views([det.boxes.float().cpu()], [det.scores.float().cpu()], [det.class_probs.float().cpu()])
            if det_flip is not None:
                views.boxes.append(hflip(det_flip.boxes.float().cpu(), float(self.image_size)))
                views.scores.append(det_flip.scores.float().cpu())
                views.probs.append(det_flip.class_probs.float().cpu())
            out.append(views)
        return out

    def __call__(self, images: torch.Tensor) -> list[RawPrediction]:
        """images: float ``[B, 1, S, S]`` in ``[0, 1]`` -> ``B`` raw predictions in input pixels."""
        return [fuse_views(v, method=self.tta_merge, iou_thresh=self.tta_iou, gate=self.gate,
                           max_detections=self.postprocess["max_detections"]) for v in self.views(images)]


@dataclass(frozen=True)
class Views:
    """One image's predictions from each of its views (TTA mirrors, ensemble members), in input pixels:
    xyxy boxes ``[N_v, 4]``, scores ``[N_v]`` and class probabilities ``[C]`` per view."""

    boxes: list[torch.Tensor]
    scores: list[torch.Tensor]
    probs: list[torch.Tensor]

    def __add__(self, other: Views) -> Views:
        return Views(self.boxes + other.boxes, self.scores + other.scores, self.probs + other.probs)


def fuse_views(views: Views, *, method: TtaMerge, iou_thresh: float, gate: bool,
               max_detections: int | None) -> RawPrediction:
    """The views of one image merged into one prediction: a single view is kept as it is; several are merged
    by ``method`` (:func:`~pneumodet.inference.tta.merge_views`, all views at once: an ensemble of M models
    with TTA fuses M x 2 views) and cut to ``max_detections`` (per image, not per view: the merge may add
    boxes). Class probabilities are the mean over the views; with ``gate`` the scores are then multiplied
    by the Lung-Opacity probability."""
    boxes, scores = views.boxes[0], views.scores[0]
    if len(views.boxes) > 1:
        boxes, scores = merge_views(views.boxes, views.scores, method=method, iou_thresh=iou_thresh)
        if max_detections is not None:
            boxes, scores = boxes[:max_detections], scores[:max_detections]  # merge_views sorts by score
    probs = views.probs[0] if len(views.probs) == 1 else torch.stack(views.probs).mean(dim=0)
    if gate:
        scores = gate_scores(scores, probs)
    return RawPrediction(boxes.reshape(-1, 4), scores.reshape(-1), probs)


class EnsemblePredictor:
    """Several models as one predictor: every member's views of an image (TTA included) fused at once by
    weighted box fusion (``options.tta_merge``), class probabilities averaged, gating applied to the fused
    scores. The members run the same options on the same inputs, so they must share one input size.

    Has the :class:`Predictor` attributes its callers read (``image_size``, ``device``, ``precision``,
    ``compiled``, ``postprocess``); ``postprocess`` is the members' common values, or, where they differ,
    a list per member under ``"members"``.
    """

    def __init__(self, members: Sequence[Predictor], *, merge: TtaMerge = "wbf", iou_thresh: float = 0.55,
                 gate: bool = False) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one model")
        sizes = {m.image_size for m in members}
        if len(sizes) > 1:
            raise ConfigError(f"the ensemble's models take different input sizes ({', '.join(map(str, sorted(sizes)))}"
                              " px); fuse models trained at one image size")
        check_tta(None, merge)
        self.members = list(members)
        self.image_size, self.device, self.precision = members[0].image_size, members[0].device, members[0].precision
        self.tta_merge, self.tta_iou, self.gate = merge, iou_thresh, gate
        posts = [m.postprocess for m in members]
        self.postprocess: dict[str, Any] = dict(posts[0]) if all(p == posts[0] for p in posts) else {
            "members": [dict(p) for p in posts]}
        caps = [p["max_detections"] for p in posts]
        self._cap = None if any(c is None for c in caps) else max(caps)
        self.notes: list[str] = []

    @classmethod
    def from_options(cls, models: Sequence[nn.Module], image_size: int, options: PredictOptions, *,
                     num_images: int, networks: Sequence[nn.Module] | None = None) -> EnsemblePredictor:
        """Members built by :meth:`Predictor.from_options` (ungated: the ensemble gates the fused scores);
        ``networks``: each member's int8 graph, in the order of ``models``."""
        member_networks = list(networks) if networks is not None else [None] * len(models)
        if len(member_networks) != len(models):
            raise ValueError(f"{len(member_networks)} networks for {len(models)} models")
        members = [Predictor.from_options(m, image_size, dataclasses.replace(options, gate=False),
                                          num_images=num_images, network=network)
                   for m, network in zip(models, member_networks, strict=True)]
        return cls(members, merge=options.tta_merge, gate=options.gate)

    @property
    def compiled(self) -> bool:
        return all(m.compiled for m in self.members)

    def __call__(self, images: torch.Tensor) -> list[RawPrediction]:
        """images: float ``[B, 1, S, S]`` in ``[0, 1]`` -> ``B`` fused raw predictions in input pixels."""
        per_member = [m.views(images) for m in self.members]
        return [fuse_views(functools.reduce(operator.add, views), method=self.tta_merge, iou_thresh=self.tta_iou,
                           gate=self.gate, max_detections=self._cap) for views in zip(*per_member, strict=True)]


def make_predictor(models: Sequence[nn.Module], image_size: int, options: PredictOptions, *,
                   num_images: int, sources: Sequence[Path | str] | None = None) -> Predictor | EnsemblePredictor:
    """A :class:`Predictor` for one model, an :class:`EnsemblePredictor` for several.

    ``sources``: where each model was loaded from (run folders or checkpoint files, in the order of
    ``models``): where its int8 graph is (``pneumodet quantize``). ``options.precision``:

    * ``"int8"``: every model runs its run's int8 graph (CPU only); a source without a current one (none,
      stale: made from another ``best_model.pt``, damaged), a checkpoint file, or no ONNX Runtime is one
      error naming it (:func:`pneumodet.inference.quantize.int8_graphs`);
    * ``"auto"`` (or ``None``): on the CPU, int8 when every source holds a current int8 graph whose validation
      mAP was within 0.01 of the float network's (recorded by ``pneumodet quantize``) and ONNX Runtime is
      installed; otherwise bf16 where the device computes it natively, else fp32
      (:func:`~pneumodet.hardware.resolve_precision`). An int8 graph passed over (stale, damaged, off on
      validation, no ONNX Runtime) is said in the predictor's ``notes``;
    * ``"bf16"``, ``"fp32"``: as asked.
    """
    networks, notes = _int8_networks(sources, options, len(models))
    predictor: Predictor | EnsemblePredictor
    if len(models) == 1:
        predictor = Predictor.from_options(models[0], image_size, options, num_images=num_images,
                                           network=networks[0] if networks else None)
    else:
        predictor = EnsemblePredictor.from_options(models, image_size, options, num_images=num_images,
                                                   networks=networks)
    predictor.notes.extend(notes)
    return predictor


def _int8_networks(sources: Sequence[Path | str] | None, options: PredictOptions,
                   count: int) -> tuple[list[nn.Module] | None, list[str]]:
    """Each model's int8 graph in ONNX Runtime when ``options`` make the precision int8 (see
    :func:`make_predictor`), else ``None``; and the notes on graphs passed over."""
    requested = parse_precision(options.precision)
    device = resolve_device(options.device)
    check_precision_device(options.precision, str(device), chosen=options.device in (None, "auto"))
    if requested not in (None, "int8") or device.type != "cpu":
        return None, []
    if requested is None and not any(RunDir(Path(s)).int8_model.is_file() for s in sources or ()):
        return None, []  # auto, and no int8 graph anywhere: nothing to check
    # here, not at the top: the quantisation module is loaded only where an int8 graph may run
    from pneumodet.inference.quantize import OrtNetwork, int8_graphs

    graphs, notes = int8_graphs(sources, required=requested == "int8")
    if graphs is None:
        return None, notes
    if len(graphs) != count:
        raise ValueError(f"{len(graphs)} int8 graphs for {count} models: give one source per model")
    # the same threads as the PyTorch path (one process of `predict --devices N` shares the cores)
    return [OrtNetwork(graph, threads=torch.get_num_threads()) for graph in graphs], notes
