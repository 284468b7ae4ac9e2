"""Benchmark sweeps on ``torch.distributed``: ``torchrun --nproc-per-node N`` or
``accelerate launch --num_processes N`` around ``tokenmerge bench``.

Every rank loads the model and takes a deterministic share of the work, by round robin over
a list the ranks build alike (:meth:`Group.mine`): the batches of each pass over the data, and
the rows to time. What each rank measured is gathered (:meth:`Group.gather`) and put back in
the order one process would have produced it, so every rank holds the whole result and every
number other than a timing equals the single-process run's; rank 0 alone writes the report.
A timing is measured on one rank, against that rank's own unpatched model, and the row names
the rank; the report lists every rank's machine.

The results travel on a gloo group (CPU objects, whatever device the models run on): a
launcher's environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...) starts one; a process
group the caller already started (``Accelerator()``) gets a gloo subgroup beside it.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: how long a rank waits for the others at a gather: a rank may wait out another's whole
#: share (an autotune search, the LLM bench's timings on rank 0), far past gloo's 30 minutes;
#: a rank that fails stops the others through the launcher, not through this timeout
WAIT = timedelta(hours=12)


@dataclass(frozen=True)
class Group:
    """This process's place among the bench's ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    #: the gloo process group results travel on (``None`` in one process)
    pg: Any = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that reports and writes."""
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that does item ``index`` of a shared list (round robin)."""
        return index % self.world

    def mine(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's share of ``items``, each with its index in the list."""
        return [(i, x) for i, x in enumerate(items) if self.owner(i) == self.rank]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def merge(self, done: dict[int, T]) -> dict[int, T]:
        """Every rank's ``{index: result}`` of a shared list, as one dict in index order."""
        return dict(sorted((k, v) for part in self.gather(done) for k, v in part.items()))


def launched() -> bool:
    """True under a launcher that started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def group() -> Iterator[Group]:
    """The bench's :class:`Group`: one process unless a launcher started several, in which
    case a gloo process group joins them (and is taken down on exit if this started it)."""
    if not launched():
        yield Group()
        return
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="gloo", timeout=WAIT)
    pg = dist.new_group(backend="gloo", timeout=WAIT) if dist.get_backend() != "gloo" else None
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), pg)
        # no rank tears the group down while another still talks on it (gloo aborts the
        # process when a peer leaves mid-collective); after an error the launcher stops them
        dist.barrier(group=pg)
    finally:
        if started:
            dist.destroy_process_group()


def machine(grp: Group) -> dict[str, Any]:
    """This rank's machine, for the report: host, cores it may use, torch threads, device."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "rank": grp.rank,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "local_rank": int(os.environ.get("LOCAL_RANK", grp.rank)),
    }
