"""Audits over several GPUs: one process per GPU started by ``torchrun``, items sharded, one run directory.

Launch any audit script with torch's own launcher, e.g.::

    torchrun --standalone --nproc_per_node 2 -m dori.cli audit ...

Inside, :func:`init` reads the ranks torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the
process group (NCCL on GPUs, gloo on CPUs) and picks this rank's device; without torchrun it is a
single process and nothing is initialized. :func:`run_sharded` then

1. lists the items whose result file is missing from the run directory (every rank sees the same list:
   nobody writes before the first barrier),
2. gives rank r the pending items r, r + world, r + 2 world, ... (items cost about the same),
3. runs ``work`` on this rank's items in batches and writes one result file per item atomically
   (:class:`dori.runs.RunDir`), so ranks never write the same file and a killed run resumes per item,
4. waits for every rank and returns all items' results, merged from the one run directory.

A single process gives the same results: an item's result never depends on its rank or batch (every item
draws its own noise from its own seed).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dori.runs import RunDir

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in the job: rank, number of processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if not self.distributed:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: positions rank, rank + world_size, ..."""
        return shard(items, self.rank, self.world_size)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items rank, rank + world_size, rank + 2 world_size, ... of ``items`` (strided: balanced)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return list(items[rank::world_size])


def init(backend: str | None = None, device: str | None = None, timeout_hours: float = 12.0) -> DistContext:
    """Join the process group torchrun set up (if any) and choose this rank's device.

    Args:
        backend: ``nccl`` or ``gloo``; default NCCL when CUDA is available, else gloo.
        device: force ``cpu``; default ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
        timeout_hours: how long a rank may wait at a barrier for the others (audits are long).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            timeout=datetime.timedelta(hours=timeout_hours),
            device_id=dev if use_cuda else None,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (call once at the end of the job)."""
    if ctx.distributed:
        dist.destroy_process_group()


def open_run(ctx: DistContext, path: str | Path, config: dict | None = None, **kwargs: Any) -> RunDir:
    """Open (or create) the shared run directory: rank 0 first, the others once it exists."""
    run = RunDir(path, config, **kwargs) if ctx.is_main else None
    ctx.barrier()
    return run if run is not None else RunDir(path, config, **kwargs)


def run_sharded(
    ctx: DistContext,
    run: RunDir,
    items: Sequence[T],
    key: Callable[[T], str],
    work: Callable[[list[T]], list[dict]],
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Run ``work`` over the pending items, sharded across ranks; return every item's result.

    Args:
        ctx: from :func:`init`.
        run: the shared run directory (:func:`open_run`).
        items: every item of the audit, in the same order on every rank.
        key: item -> result key (unique).
        work: a batch of items -> one JSON-able result dict per item (e.g. one batched Dori search and
            the generations of its embeddings).
        batch_size: items per ``work`` call.
        progress: optional callable ``progress(n_done_on_this_rank)``.

    Returns:
        key -> result for all ``items`` (read back from the run directory after every rank finished).
    """
    keys = [key(it) for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("item keys must be unique")
    pending = [it for it, k in zip(items, keys, strict=True) if not run.has(k)]
    ctx.barrier()  # everyone has listed the pending items before anyone writes a result
    mine = ctx.shard(pending)
    for lo in range(0, len(mine), max(1, batch_size)):
        batch = mine[lo : lo + max(1, batch_size)]
        results = work(batch)
        if len(results) != len(batch):
            raise ValueError(f"work returned {len(results)} results for {len(batch)} items")
        for it, res in zip(batch, results, strict=True):
            run.put(key(it), res)
        if progress is not None:
            progress(lo + len(batch))
    ctx.barrier()
    return {k: run.get(k) for k in keys}
