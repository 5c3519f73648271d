"""How this process was launched, and the launcher's chatter: the one owner of both for ``train`` and ``predict``.

Lightning (or SLURM through it, or ``torchrun``) starts every process of a multi-process command but the first
with a rank variable above 0; :func:`is_first_process` is how a command knows it may check and write its
outputs. :func:`library_output` silences what Lightning says while it sets processes up and trains.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator

#: The variables a launcher sets in every process it starts but the first (Lightning, SLURM via Lightning,
#: torchrun); the first process of the first node has none of them above 0.
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK")

#: Loggers whose info lines are library chatter (GPU/TPU availability, tips, settings notes, DDP set-up).
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
#: Library warnings a pneumodet user can do nothing about (matched at the start of the message).
LIBRARY_WARNINGS = (
    # Lightning's own pytree helper on a newer torch: a deprecation inside Lightning
    re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
    # log_every_n_steps is set to at most the epoch's batches; a last short epoch (max_steps) may still warn
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # the number of loading processes is --num-workers, documented; Lightning's advice names its own API
    r"The '\w+_dataloader' does not have many workers which may be a bottleneck",
)


def is_first_process() -> bool:
    """Whether this process is the first of a command run over several processes (the one that checks and
    writes the outputs); true in a process no launcher started."""
    return not any(int(os.environ.get(name) or 0) > 0 for name in RANK_VARIABLES)


@contextlib.contextmanager
def library_output(verbose: bool = False) -> Iterator[None]:
    """Lightning's info lines (GPU/TPU availability, tips, settings notes, distributed set-up) and the known
    library warnings of :data:`LIBRARY_WARNINGS` silenced, unless ``verbose``. Logger levels and warning
    filters are restored afterwards. Warnings and errors of any other kind still show: they may be the
    user's business."""
    if verbose:
        yield
        return
    with warnings.catch_warnings(), quiet_loggers(LIBRARY_LOGGERS, logging.WARNING):
        for pattern in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str], level: int) -> Iterator[None]:
    """The loggers ``names`` (``""``: the root logger) raised to at least ``level`` for the block, and put
    back as they were after it: the one place a library's logging is turned down."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, level))
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)
