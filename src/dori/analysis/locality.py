"""The three locality analyses of Finding Dori (Section 4.1-4.3) for one memorized item, resumable.

:func:`run_locality` runs, in a :class:`~dori.runs.RunDir`:

1. ``dispersion`` (Section 4.1, App. J.1): K Dori searches from N(0, I) and K from non-memorized
   prompts' embeddings, each kind as one batched search (timed), an optional replication check, t-SNE and
   L2 distances (:mod:`dori.analysis.embedding_dispersion`).
2. ``activations`` (Section 4.2): discrepancy of Y_adv (the triggers from N(0, I) that replicate; all of
   them when no check ran) against Y_mem (prompts of K different memorized items)
   (:mod:`dori.analysis.activation_discrepancy`).
3. ``agreement`` (Section 4.3, App. J.4): NeMo's and Wanda's selections for Y_adv and Y_mem, their
   agreement per layer, and the selections of every memorized prompt given (Fig. 13)
   (:mod:`dori.analysis.weight_agreement`).

Every unit of work is saved as soon as it is done (``results/<unit>.json``, tensors under
``artifacts/``); a rerun skips finished units. The model, scorer and mitigations are passed in, so the
command and tests choose them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dori.analysis import activation_discrepancy as AD
from dori.analysis import embedding_dispersion as ED
from dori.analysis import weight_agreement as WA
from dori.attacks.dori import Dori, initial_embeddings
from dori.data.sets import Item
from dori.errors import DoriError
from dori.models.layers import ffn_layers, value_layers
from dori.models.pipeline import SamplingConfig, T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors

ANALYSES = ("dispersion", "activations", "agreement")
INITS = ("random", "nonmem")


@dataclass
class LocalityConfig:
    """Settings of the analyses (defaults: the paper's).

    Attributes:
        k: Dori runs per init kind, and the size of Y_mem (100).
        steps: Dori steps per run (50).
        lr: Dori learning rate (0.1).
        dori_batch: (noise, t) draws per Dori step (8).
        seed: base seed; run k of the search uses ``seed + k``, the fixed noise of Sec. 4.2 ``seed``.
        generation_seeds: seeds of the generations that check each trigger replicates.
        sampling: DDIM settings of those generations (50 steps, guidance 7).
        layer_types: layer types for Fig. 12 (None: all of ``LAYER_TYPES``).
        activation_batch: embeddings per UNet call in Sec. 4.2.
    """

    k: int = 100
    steps: int = 50
    lr: float = 0.1
    dori_batch: int = 8
    seed: int = 0
    generation_seeds: tuple[int, ...] = (0,)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    layer_types: tuple[str, ...] | None = None
    activation_batch: int = 16

    def describe(self) -> dict:
        return {
            "k": self.k,
            "steps": self.steps,
            "lr": self.lr,
            "dori_batch": self.dori_batch,
            "seed": self.seed,
            "generation_seeds": list(self.generation_seeds),
            "sampling": {"steps": self.sampling.steps, "guidance": self.sampling.guidance},
            "layer_types": None if self.layer_types is None else list(self.layer_types),
        }


def pick(n: int, k: int, seed: int) -> list[int]:
    """A seeded random choice of min(k, n) distinct positions out of n, in a fixed order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[: min(k, n)]


def _search(
    model: T2IModel, run: RunDir, item: Item, kind: str, nonmem: Sequence[str], cfg: LocalityConfig, log
):
    """The batched Dori search of one init kind (saved; loaded back on a rerun)."""
    key, art = f"search.{kind}", run.artifact(f"search.{kind}.safetensors")
    if run.has(key) and art.exists():
        return run.get(key), load_tensors(art)
    if item.image is None:
        raise DoriError(f"item {item.id} has no training image ({item.skip_reason})")
    prompts = (
        [nonmem[i] for i in pick(len(nonmem), cfg.k, cfg.seed)] if kind == "nonmem" else [item.prompt] * cfg.k
    )
    seeds = [cfg.seed + i for i in range(len(prompts))]
    init = initial_embeddings(
        model, prompts, init="random" if kind == "random" else "other", seeds=seeds, other_prompts=prompts
    )
    x0 = model.encode_images(item.image.unsqueeze(0))
    dori = Dori(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.dori_batch)
    log(f"dispersion: {len(seeds)} Dori runs from {kind} inits, {cfg.steps} steps, one batched search")
    result, seconds = ED.timed_search(dori, model, x0, init, seeds)
    tensors = {"init": init, "adv": result.embeddings, "losses": result.losses}
    atomic_save_tensors(art, tensors)
    record = {
        "init": kind,
        "k": len(seeds),
        "steps": cfg.steps,
        "seeds": seeds,
        "init_prompts": prompts if kind == "nonmem" else None,
        "seconds": seconds,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "final_loss": result.losses[:, -1].tolist(),
        "dori": dori.settings(),
    }
    run.put(key, record)
    log(f"dispersion: {kind} search took {seconds:.1f} s on {model.device}")
    return record, tensors


def _replication(model, run: RunDir, item: Item, kind: str, adv: torch.Tensor, scorer, threshold, cfg, log):
    key = f"replication.{kind}"
    if run.has(key):
        return run.get(key)
    if scorer is None:
        return {"skipped": "no copy detector"}
    log(f"dispersion: replication check of {adv.shape[0]} {kind} triggers")
    scores = ED.replication_scores(model, adv, item.image, scorer, cfg.generation_seeds, cfg.sampling)
    record = ED.replication_summary(scores, threshold)
    record["scores"] = scores.tolist()
    run.put(key, record)
    return record


def dispersion(model, run: RunDir, item, nonmem, cfg, scorer=None, threshold=None, log=print) -> dict:
    """Section 4.1 / App. J.1 for one item (see module docstring); saved as ``dispersion``."""
    if run.has("dispersion"):
        return run.get("dispersion")
    out: dict = {"item": item.id, "prompt": item.prompt}
    for kind in INITS:
        record, tensors = _search(model, run, item, kind, nonmem, cfg, log)
        numbers = ED.dispersion_numbers(tensors["init"], tensors["adv"], seed=cfg.seed)
        numbers.update(
            search={k: record[k] for k in ("k", "steps", "seconds", "device", "torch_threads", "final_loss")},
            replication=_replication(model, run, item, kind, tensors["adv"], scorer, threshold, cfg, log),
        )
        out[kind] = numbers
    out["reference_nonmem_pairwise"] = out["nonmem"]["summary"]["pairwise_init"]
    run.put("dispersion", out)
    return out


def adv_triggers(model, run: RunDir, item, nonmem, cfg, scorer=None, threshold=None, log=print):
    """Y_adv: the random-init triggers that replicate (all of them if not checked or < 2 replicate)."""
    _, tensors = _search(model, run, item, "random", nonmem, cfg, log)
    rep = _replication(model, run, item, "random", tensors["adv"], scorer, threshold, cfg, log)
    adv = tensors["adv"]
    keep = list(range(adv.shape[0]))
    if "replicated" in rep and sum(rep["replicated"]) >= 2:
        keep = [i for i, ok in enumerate(rep["replicated"]) if ok]
    return adv[keep], keep


def activations(model, run: RunDir, item, nonmem, mem, cfg, scorer=None, threshold=None, log=print) -> dict:
    """Section 4.2 (Fig. 4 and 12): discrepancy of Y_adv vs Y_mem; saved as ``activations``."""
    if run.has("activations"):
        return run.get("activations")
    y_adv, used = adv_triggers(model, run, item, nonmem, cfg, scorer, threshold, log)
    mem_prompts = [mem[i] for i in pick(len(mem), cfg.k, cfg.seed)]
    y_mem = model.encode_text(mem_prompts).float().cpu()
    log(f"activations: {y_adv.shape[0]} triggers vs {y_mem.shape[0]} memorized prompts")
    start = time.perf_counter()
    res = AD.adv_vs_mem(
        model, y_adv, y_mem, seed=cfg.seed, layer_types=cfg.layer_types, batch_size=cfg.activation_batch
    ).to_dict()
    res.update(item=item.id, adv_used=used, mem_prompts=mem_prompts, seconds=time.perf_counter() - start)
    run.put("activations", res)
    return res


def _selections(run: RunDir, key: str, compute: Callable[[], list[dict[str, np.ndarray]]], layers):
    """Per-embedding selections, cached as an artifact (flat indices per layer plus offsets)."""
    path = run.artifact(f"{key}.safetensors")
    if path.exists():
        t = load_tensors(path)
        n = int(t["n"][0])
        return [
            {
                layer: t[layer][int(t[layer + "#off"][i]) : int(t[layer + "#off"][i + 1])].numpy()
                for layer in layers
            }
            for i in range(n)
        ]
    sel = compute()
    tensors: dict[str, torch.Tensor] = {"n": torch.tensor([len(sel)])}
    for layer in layers:
        parts = [
            torch.from_numpy(np.asarray(s.get(layer, np.zeros(0, np.int64)), dtype=np.int64)) for s in sel
        ]
        sizes = torch.tensor([0] + [p.numel() for p in parts])
        tensors[layer] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        tensors[layer + "#off"] = sizes.cumsum(0)
    atomic_save_tensors(path, tensors)
    return sel


def agreement(
    model, run: RunDir, item, nonmem, mem, cfg, nemo=None, wanda=None, scorer=None, threshold=None, log=print
) -> dict:
    """Section 4.3 and App. J.4 (Fig. 5 and 13); each method saved as ``agreement.<method>``."""
    out: dict = {"item": item.id}
    methods = {
        "nemo": (nemo, value_layers(model.unet), WA.nemo_selections),
        "wanda": (wanda, ffn_layers(model.unet), WA.wanda_selections),
    }
    for name, (method, layers, select) in methods.items():
        key = f"agreement.{name}"
        if run.has(key):
            out[name] = run.get(key)
            continue
        if method is None:
            out[name] = {"skipped": f"{name} not available"}
            continue
        y_adv, used = adv_triggers(model, run, item, nonmem, cfg, scorer, threshold, log)
        y_all = model.encode_text(list(mem)).float().cpu()
        log(
            f"agreement: {name} selections for {y_adv.shape[0]} triggers and {y_all.shape[0]} memorized prompts"
        )
        start = time.perf_counter()
        adv_sel = _selections(
            run, f"sel.{name}.adv", lambda m=method, s=select, y=y_adv: s(m, model, y), layers
        )
        all_sel = _selections(
            run, f"sel.{name}.mem", lambda m=method, s=select, y=y_all: s(m, model, y), layers
        )
        mem_sel = [all_sel[i] for i in pick(len(mem), cfg.k, cfg.seed)]
        table = WA.agreement_table(adv_sel, mem_sel, layers)
        table.update(
            adv_used=used, n_adv=len(adv_sel), n_mem=len(mem_sel), seconds=time.perf_counter() - start
        )
        table["count_all_mem"] = WA.layer_counts(all_sel, layers)  # Fig. 13: every memorized prompt
        table["unit"] = "neurons" if name == "nemo" else "weights"
        table["settings"] = method.settings() if hasattr(method, "settings") else None
        run.put(key, table)
        out[name] = table
    return out


def run_locality(
    model: T2IModel,
    run: RunDir,
    item: Item,
    nonmem_prompts: Sequence[str],
    mem_prompts: Sequence[str],
    config: LocalityConfig | None = None,
    analyses: Sequence[str] = ANALYSES,
    scorer: ED.Scorer | None = None,
    threshold: float | None = None,
    nemo: WA.NeuronSelector | None = None,
    wanda: WA.MaskSelector | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the chosen analyses for one memorized item (see module docstring).

    Args:
        item: the memorized item (with its training image).
        nonmem_prompts: prompts of non-memorized items (the first K of a seeded shuffle are the inits).
        mem_prompts: prompts of memorized items: K of them (seeded) form Y_mem; all of them feed Fig. 13.
        scorer, threshold: copy-detector :data:`~dori.analysis.embedding_dispersion.Scorer` and its
            replication threshold; None skips the replication check.
        nemo, wanda: the mitigations whose selections ``agreement`` compares; None skips a method.

    Returns:
        ``{analysis: results}`` for the analyses run.
    """
    cfg = config or LocalityConfig()
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise DoriError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    if cfg.k < 2:
        raise DoriError("the locality analyses need k >= 2")
    if "dispersion" in analyses and len(nonmem_prompts) < 2:
        raise DoriError("the dispersion analysis needs at least 2 non-memorized prompts")
    if set(analyses) & {"activations", "agreement"} and len(mem_prompts) < 2:
        raise DoriError("Y_mem needs at least 2 memorized prompts")
    common = dict(scorer=scorer, threshold=threshold, log=log)
    out = {}
    if "dispersion" in analyses:
        out["dispersion"] = dispersion(model, run, item, nonmem_prompts, cfg, **common)
    if "activations" in analyses:
        out["activations"] = activations(model, run, item, nonmem_prompts, mem_prompts, cfg, **common)
    if "agreement" in analyses:
        out["agreement"] = agreement(
            model, run, item, nonmem_prompts, mem_prompts, cfg, nemo=nemo, wanda=wanda, **common
        )
    return out
