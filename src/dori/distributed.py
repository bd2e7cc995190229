"""Per-item work over several processes (GPUs) started by ``torchrun``: items sharded, one run directory.

Every command whose work is per item (``dori audit``, ``dori mitigate nemo|wanda``, the Dori searches of
iterative NeMo, surrogate generation) runs the same way on one process or on N::

    dori audit --model sd14-random --set vm --attack dori --out runs/a
    torchrun --standalone --nproc_per_node 2 -m dori audit --model sd14-random --set vm --attack dori --out runs/a

Across machines, start ``torchrun --nnodes M --node_rank R --rdzv-endpoint HOST:PORT ...`` on each with the run
directory on a shared file system. :func:`current` joins the process group that torchrun set up (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``; NCCL on GPUs, gloo on CPUs) once per process and picks this rank's device
(``cuda:LOCAL_RANK``); without torchrun it is a single process and every helper below is a no-op, so the
library code is the same for both.

Two patterns, both giving the results of one process (an item's result never depends on its rank or on
what else is in its batch: every item draws its own noise from its own seed):

* Resumable loops over items that write one result file per item into the run directory::

      todo = [it for it in items if not run.has(key(it))]     # every rank lists the same pending items
      for batch in chunks(distributed.my_share(todo), k):     # barrier, then items r, r + W, r + 2W, ...
          ...write each item's result...
      distributed.sync()                                       # every rank waits; then all read all results

  A killed run resumes per item. Rule that keeps the ranks in step: a decision that decides whether a rank
  reaches a barrier is read from files before any rank writes again (listing happens before the barrier of
  :func:`my_share`, writing after it).
* In-memory work: :func:`map_sharded` runs ``fn`` on this rank's share and all-gathers the results in item
  order on every rank (e.g. one round of iterative NeMo's Dori searches).

Merged outputs (the audit's JSON and report) are written by rank 0 alone (:func:`is_main`); the other ranks'
stdout is silenced by the CLI.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
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
    global _CONTEXT
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    return _CONTEXT


def shutdown(ctx: DistContext | None = None) -> None:
    """Leave the process group (call once at the end of the job)."""
    global _CONTEXT
    ctx = ctx or _CONTEXT
    if ctx is not None and ctx.distributed:
        dist.destroy_process_group()
    _CONTEXT = None


# ---------------------------------------------------------------- the process-wide context
_CONTEXT: DistContext | None = None


def launched() -> bool:
    """Whether this process is one of several that torchrun (or accelerate, or any launcher that sets
    ``WORLD_SIZE``) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> DistContext:
    """This process's context: under torchrun it joins the group on the first call (:func:`init` with its
    defaults, unless :func:`init` was called already); otherwise a single process on no particular device."""
    if _CONTEXT is not None:
        return _CONTEXT
    if launched():
        return init()
    return DistContext()


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes merged outputs and prints."""
    return current().is_main


def sync() -> None:
    """Barrier over every rank (a no-op in a single process)."""
    current().barrier()


def my_share(todo: Sequence[T]) -> list[T]:
    """This rank's share of ``todo``, a list every rank computed the same way (e.g. the pending items).

    Waits for every rank first, so nobody writes a result before every rank has listed ``todo``; end the
    loop over the share with :func:`sync`.
    """
    ctx = current()
    ctx.barrier()
    return ctx.shard(todo)


def map_sharded(fn: Callable[[list[T]], list[Any]], items: Sequence[T], batch_size: int = 1) -> list[Any]:
    """``fn`` over ``items`` in batches, the items sharded across ranks; every rank gets all results in order.

    Args:
        fn: a batch of items -> one picklable result per item.
        items: the same sequence on every rank.
        batch_size: items per ``fn`` call (within one rank's share).
    """
    ctx = current()
    positions = ctx.shard(range(len(items)))
    mine: list[tuple[int, Any]] = []
    step = max(1, batch_size)
    for lo in range(0, len(positions), step):
        pos = positions[lo : lo + step]
        out = fn([items[p] for p in pos])
        if len(out) != len(pos):
            raise ValueError(f"fn returned {len(out)} results for {len(pos)} items")
        mine.extend(zip(pos, out, strict=True))
    if not ctx.distributed:
        return [r for _, r in mine]
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    merged = dict(pair for part in parts for pair in part)
    return [merged[p] for p in range(len(items))]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it finished (e.g. create a run directory, or
    compute and save a file the others then load)."""
    ctx = current()
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()


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
