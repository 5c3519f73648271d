"""``predict`` over several processes: Lightning's DDP launch, each process's share of the files, and the
merge of every share on the first process, in file order.

``predict --devices N [--num-nodes M]`` starts its processes the way ``train --devices N`` does: Lightning
(:class:`lightning.fabric.Fabric`, strategy ``ddp``) re-runs the same command once per extra process of a
node, with ``LOCAL_RANK`` set. Several nodes each run the command themselves, with ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, or under SLURM or ``torchrun``, which Lightning detects. The
processes talk through :mod:`torch.distributed`: gloo on the CPU, NCCL on GPUs (one GPU per process,
``cuda:LOCAL_RANK``); the Python objects merged here always travel through a gloo group.

Sharding is by batch, round robin: the files are cut into batches of ``batch_size`` in file order and batch
``b`` goes to process ``b % P`` (``P`` processes in all). A *round* is ``P`` consecutive batches, one per
process: a contiguous run of files. After each round the first process gathers the round's outcomes, so it
sees every file in file order, exactly as a single process would, and decides what only the whole list can
decide (duplicates, the submission row of a patient) the same way. Each batch holds the same files whatever
``P`` is, so the network computes the same numbers: the merged result does not depend on ``P``. Only the
first process writes files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import torch

from pneumodet.errors import ConfigError
from pneumodet.launch import library_output

T = TypeVar("T")

#: Most processes per node or nodes one prediction accepts (a typo guard, far above any machine).
MAX_PROCESSES = 1024

def check_processes(devices: int, num_nodes: int, device: torch.device) -> None:
    """:class:`ConfigError` for a process count no prediction can use, checked before anything is loaded.

    ``devices`` processes per node on ``num_nodes`` nodes; on a GPU each process takes one of the node's
    GPUs (``cuda:0`` to ``cuda:devices-1``), so a single named GPU (``cuda:1``) cannot be shared out.
    """
    for name, value in (("devices", devices), ("num nodes", num_nodes)):
        if not (isinstance(value, int) and 1 <= value <= MAX_PROCESSES):
            raise ConfigError(f"{name} must be a whole number from 1 to {MAX_PROCESSES}, got {value}")
    if devices * num_nodes == 1 or device.type != "cuda":
        return
    if device.index is not None:
        raise ConfigError(f"--devices {devices} gives each process one GPU of its node (cuda:0 to "
                          f"cuda:{devices - 1}); pass --device cuda (or auto), not {device}")
    if devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices} asks for {devices} GPUs per node, but this machine has "
                          f"{torch.cuda.device_count()}")


@dataclass
class Processes:
    """This process's place among the processes of one prediction; one process by default.

    ``device``: where this process predicts (its own GPU under NCCL). ``group``: the gloo process group
    Python objects travel through, ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: Any = None

    @property
    def first(self) -> bool:
        """The process that merges every share and writes the outputs."""
        return self.rank == 0

    def batches(self, count: int, batch_size: int) -> range:
        """This process's batches (their numbers in file order) of ``count`` files: every ``world_size``-th
        from its rank."""
        return range(self.rank, -(-count // batch_size), self.world_size)

    def rounds(self, count: int, batch_size: int) -> int:
        """How many rounds ``count`` files take: every process takes part in each, possibly with nothing."""
        return -(-count // (batch_size * self.world_size))

    def own_files(self, files: Sequence[T], batch_size: int) -> list[T]:
        """This process's share of ``files``: its batches, concatenated. A ``DataLoader`` with the same
        ``batch_size`` over them gives back exactly these batches (only the last batch of all is short)."""
        return [f for b in self.batches(len(files), batch_size) for f in files[b * batch_size:(b + 1) * batch_size]]

    def broadcast(self, value: T) -> T:
        """The first process's ``value``, in every process (e.g. the file list, so that every process shares
        out the same files even if a folder changes while the processes start)."""
        if self.group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def in_file_order(self, batches: Iterable[list[T]], rounds: int) -> Iterator[list[T]]:
        """Per round, the outcomes of every process's batch of that round, in file order, in the first
        process; an empty list in the others. ``batches``: this process's results, one list per batch of
        :meth:`own_files`, in order (each process takes part in every round, with nothing once its batches
        are done). One process: ``batches`` as they are."""
        if self.group is None:
            yield from batches
            return
        import torch.distributed as dist

        mine = iter(batches)
        for _ in range(rounds):
            outcomes = next(mine, [])
            gathered: list[list[T]] | None = [[] for _ in range(self.world_size)] if self.first else None
            dist.gather_object(outcomes, gathered, dst=0, group=self.group)
            # the round's batch of rank r is the round's r-th batch in file order
            yield list(chain.from_iterable(gathered)) if gathered is not None else []

    def close(self) -> None:
        """Leave the process group (nothing for a single process)."""
        if self.group is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.group = None


def launch_processes(devices: int, num_nodes: int, device: torch.device) -> Processes:
    """Start (in the first process) or join (in the others) the processes of a prediction.

    The first process re-runs its command for each further process of its node (Lightning's
    ``_SubprocessScriptLauncher``, as ``train --devices``), then all join one process group. Call it after
    every check and load a user can get wrong, so that an error is reported once, by the first process,
    before any other exists. ``devices * num_nodes == 1``: this process alone, nothing started.
    """
    check_processes(devices, num_nodes, device)
    if devices * num_nodes == 1:
        return Processes(device=device)
    import torch.distributed as dist
    from lightning.fabric import Fabric

    with library_output():  # Lightning's set-up lines are not the user's business
        fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=devices,
                        num_nodes=num_nodes, strategy="ddp", precision="32-true")
        fabric.launch()
    # Python objects go through gloo: NCCL would need them copied to a GPU and back
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Processes(fabric.global_rank, fabric.world_size, fabric.device, group)
