"""Iterative NeMo (Finding Dori, Appendix H.6): prune, search new triggers against the pruned model, prune again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dori import distributed
from dori.errors import DoriError
from dori.mitigations.nemo import NeMo
from dori.mitigations.nemo_calibration import Calibration
from dori.mitigations.nemo_noise import merge_blockings
from dori.mitigations.nemo_result import NeMoResult
from dori.models.hooks import row_multipliers, rowwise_scale_output_channels
from dori.models.pipeline import T2IModel


@dataclass
class NeMoRound:
    """One round of iterative NeMo: the cumulative neuron sets and the embeddings searched against them."""

    result: NeMoResult
    embeddings: torch.Tensor


def iterative_nemo(
    nemo: NeMo,
    model: T2IModel,
    ids: Sequence[str],
    cond: torch.Tensor,
    search: Callable[[int, list[dict[str, list[int]]]], torch.Tensor],
    rounds: int = 5,
    calibration: Calibration | None = None,
    progress: Callable[[int], None] | None = None,
    done: Sequence[NeMoRound] = (),
    on_round: Callable[[NeMoRound], None] | None = None,
) -> list[NeMoRound]:
    """Iterative NeMo (Finding Dori, Appendix H.6): prune, search new triggers, prune again.

    Round r: NeMo runs on the current embeddings with every neuron found so far already blocked (per
    item); its new neurons join the item's set; then ``search(r, blocked)`` returns new adversarial
    embeddings (N, tokens, dim) found against the model with ``blocked[i]`` blocked for item i (e.g. Dori
    from the prompt embedding, see :func:`make_dori_search`). Round 1 starts from ``cond`` (the prompts).

    Args:
        done: rounds finished earlier (a resumed run): their neuron sets and last embeddings are the state
            the next round starts from, and they are returned first.
        on_round: called with each new round when it is finished (to save it).

    Returns:
        One :class:`NeMoRound` per round: cumulative neuron sets (NeMoResult) and that round's embeddings.
    """
    ids = [str(i) for i in ids]
    calib = calibration or nemo.calibrate(model)
    blocked: list[dict[str, list[int]]] = [{} for _ in ids]
    emb = cond
    out = list(done)
    if done:
        last = done[-1]
        if sorted(last.result.items) != sorted(ids) or last.embeddings.shape[0] != len(ids):
            raise DoriError("the finished rounds of iterative NeMo are for other items")
        blocked = [{k: list(v) for k, v in last.result.items[i].refined.items()} for i in ids]
        emb = last.embeddings
    for r in range(len(done), rounds):
        # per item, so sharded over the ranks of a torchrun job (one call per rank; all ranks get every item)
        found = distributed.map_sharded(
            lambda idx, e=emb, bl=blocked: nemo.detect(
                model, e[idx], calib, [ids[i] for i in idx], base_blockings=[bl[i] for i in idx]
            ),
            list(range(len(ids))),
            batch_size=len(ids),
        )
        blocked = [merge_blockings(b, item.refined) for b, item in zip(blocked, found, strict=True)]
        for item, b in zip(found, blocked, strict=True):
            item.refined = {k: sorted(v) for k, v in b.items()}
        emb = search(r, blocked).detach().float().cpu()
        if emb.shape[0] != len(ids):
            raise DoriError(f"the search returned {emb.shape[0]} embeddings for {len(ids)} items")
        result = NeMoResult(
            {it.id: it for it in found}, list(found[0].refined) if found else [],
            config={**nemo.settings(), "round": r + 1}, calibration=dict(calib.info, tau=nemo.threshold(calib)),
        )  # fmt: skip
        out.append(NeMoRound(result, emb))
        if on_round is not None:
            on_round(out[-1])
        if progress is not None:
            progress(r + 1)
    return out


def make_dori_search(
    dori: Callable, model: T2IModel, x0: torch.Tensor, init: torch.Tensor, seeds: Sequence[int]
) -> Callable[[int, list[dict[str, list[int]]]], torch.Tensor]:
    """A ``search`` for :func:`iterative_nemo`: run ``dori`` (a :class:`dori.attacks.dori.Dori`) for every item,
    from ``init[i]``, against the model with that item's neurons blocked; round r uses seed ``seeds[i] + r``.

    Items are searched together, as many as one of Dori's UNet batches holds (``max_micro_batch //
    batch_size``), each row of the batch with its own item's neurons blocked
    (:func:`rowwise_scale_output_channels`). Dori's items do not interact, so this gives the embeddings of
    searching them one at a time.
    """

    def search(r: int, blocked: list[dict[str, list[int]]]) -> torch.Tensor:
        b = dori.batch_size
        per_call = max(1, dori.max_micro_batch // b)
        groups = [
            list(range(lo, min(len(blocked), lo + per_call))) for lo in range(0, len(blocked), per_call)
        ]

        def run(batch: list[list[int]]) -> list[torch.Tensor]:
            (group,) = batch
            mults = row_multipliers(model.unet, [blocked[i] for i in group for _ in range(b)])
            with rowwise_scale_output_channels(model.unet, mults):
                res = dori(model, x0[group], init[group], [int(seeds[i]) + r for i in group])
            return [res.embeddings]

        # the groups are sharded over the ranks of a torchrun job; every rank gets all embeddings
        return torch.cat(distributed.map_sharded(run, groups))

    return search
