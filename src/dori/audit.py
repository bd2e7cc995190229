"""The audit a model publisher runs before release (Finding Dori, Sections 3.2-3.3): can some text
embedding still make the (possibly mitigated) model reproduce its known memorized images?

Rows of one audit, all scored with :mod:`dori.evaluation` on the same items and seeds:

1. ``none``: the unmitigated model from each item's prompt (also the reference of SSCD_gen);
2. the mitigated model from the prompts (when a mitigation is given);
3. with an attack (:class:`dori.attacks.base.Attack`: Dori, UnlearnDiffAtk): the (mitigated) model from the
   attack's embeddings searched against that same model, one row per evaluated step (Dori: snapshots,
   e.g. 1, 10, 25 and the final step, so MR can be read against steps, Tables 6-7).

The attack runs batched over items (one seed per item); with a per-item mitigation each UNet row carries
its own item's mitigation (``applied_rows``) when the attack supports it, else items run one at a time.
Each item's result (embeddings, losses, snapshots, the attack's own tensors) is one artifact
``{attack.key}.{mitigation}.{item}.safetensors``, so a rerun skips finished searches.
FID/KID (when a utility prompt set is given) are properties of the model state, so Dori rows repeat the
values of their mitigation's row, as the paper's tables do. A set mixing kinds of items (``memorized`` =
VM + TM) gets, after each setting's row, one row per kind (``set`` = ``memorized/vm``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dori import distributed
from dori.attacks.base import Attack, Success
from dori.data.images import resize_to
from dori.data.sets import Item
from dori.errors import DoriError
from dori.evaluation import (
    EvalConfig,
    Setting,
    dori_seed,
    embed,
    evaluate_items,
    generation_seeds,
    summarize,
    to_uint8,
    utility_scores,
)
from dori.metrics import functions as M
from dori.metrics.features import Backends
from dori.metrics.replication import replicated
from dori.mitigations.base import Mitigation, spec
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors

__all__ = [
    "Utility",
    "attack_artifact",
    "audit_settings",
    "norm_ratios",
    "run_attack",
    "run_audit",
    "resize_to",
]


@dataclass
class Utility:
    """A utility prompt set for FID/KID: prompts and a loader of the reference images."""

    name: str
    prompts: Sequence[str]
    reference: Callable[[], Sequence[torch.Tensor]]


def attack_artifact(attack_key: str, mitigation_key: str, item_id: str) -> str:
    """The artifact of one item's search: ``{attack}.{mitigation}.{item}.safetensors``."""
    return f"{attack_key}.{mitigation_key}.{item_id}.safetensors"


def norm_ratios(run: RunDir, mitigation_key: str, item_id: str, attack_key: str = "dori") -> torch.Tensor:
    """||y_adv|| / ||y_init|| of one item after each Dori step (Finding Dori, Fig. 7, right: reaching a
    non-memorized image takes a large rise of the embedding's norm, a memorized one does not)."""
    saved = load_tensors(run.artifact(attack_artifact(attack_key, mitigation_key, item_id)))
    return saved["norms"].float() / saved["init"].float().norm().clamp_min(1e-12)


def _key(mitigation: Mitigation | None) -> str:
    return "none" if mitigation is None else mitigation.name


def audit_settings(
    mitigation: Mitigation | None, attack: Attack | None, snapshots: Sequence[int] = ()
) -> list[Setting]:
    """The settings (rows) of one audit, in the order they are evaluated."""
    mkey, mspec = _key(mitigation), spec(mitigation)
    rows = [Setting("none", "no mitigation")]
    ref = None
    if mkey != "none":
        rows.append(Setting(mkey, mkey, mitigation=mspec, reference="none"))
        ref = "none"
    if attack is not None:
        base = "no mitigation" if mkey == "none" else mkey
        init = attack.settings().get("init")
        last = attack.row_steps(snapshots)[-1]
        for k in attack.row_steps(snapshots):
            if k is None:
                key, label = f"{mkey}+{attack.key}", f"{base} + {attack.label}"
            else:
                key = f"{mkey}+{attack.key}-{k}"
                label = f"{base} + {attack.label}" + ("" if k == last else f" @{k}")
            rows.append(Setting(key, label, mspec, attack.name, dori_steps=k, init=init, reference=ref))
    return rows


def replication_check(
    model: T2IModel,
    images: Sequence[torch.Tensor],
    seeds: Sequence[int],
    backends: Backends,
    config: EvalConfig,
) -> Success:
    """An attack's stop test (UnlearnDiffAtk's early stop for memorization): one generation from the current
    conditioning (``seeds``: the items' first evaluation seeds; the protocol's sampler) replicates the
    training image. Called inside the attack, so a mitigation applied around it applies here too."""

    def success(idx: list[int], embeddings: torch.Tensor) -> list[bool]:
        with torch.no_grad():  # scored as evaluate_items scores a generation: uint8, training image as given
            gens = to_uint8(model.sample(embeddings, [int(seeds[i]) for i in idx], config.sampling))
            feats = embed(backends.copy_detector, list(gens.float() / 255), config.feature_batch)
            train = embed(
                backends.copy_detector, [to_uint8(images[i]).float() / 255 for i in idx], config.feature_batch
            )
        return [
            replicated(M.sscd_orig(f[None], t)["max"], backends.threshold)
            for f, t in zip(feats, train, strict=True)
        ]

    return success


def run_attack(
    model: T2IModel,
    items: Sequence[Item],
    indices: Sequence[int],
    attack: Attack,
    run: RunDir,
    config: EvalConfig,
    steps: Sequence[int | None],
    mitigation: Mitigation | None = None,
    backends: Backends | None = None,
    init_prompts: Sequence[str] | None = None,
    max_items: int = 32,
    progress: bool = True,
    tag: str | None = None,
) -> dict[int | None, torch.Tensor]:
    """Search (or load) one conditioning per item; returns step -> embeddings (N, tokens, dim) for each of
    ``steps`` (None: the attack's final result; the attack must be ``recording`` the others).

    Args:
        indices: each item's position in its set (fixes its seed).
        mitigation: the model state the search runs against; a per-item one applies each item's own part.
        backends: when given, the attack gets a replication test as ``success`` (UnlearnDiffAtk stops early).
        init_prompts: one per item, for attacks that start from other prompts (Dori with init ``other``).
        max_items: most items searched in one call (bounds memory; the result does not depend on it).
        tag: the model state's name in the artifacts (default: the mitigation's name, ``none`` without one);
            several models audited into one run directory need one tag each.
    """
    mkey = tag or _key(mitigation)
    per_item = mitigation is not None and mitigation.per_item
    rowwise_items = attack.rowwise_items(max_items) if per_item else None
    per_call = rowwise_items or (1 if per_item else max_items)
    # sharded over the ranks of a torchrun job (a no-op in one process); every rank loads all results after
    todo = distributed.my_share(
        [
            j
            for j, it in enumerate(items)
            if not run.artifact(attack_artifact(attack.key, mkey, it.id)).exists()
        ]
    )
    bar = tqdm(
        total=len(todo) * attack.steps, desc=f"{attack.key} {mkey}", disable=not progress, file=sys.stderr,
        leave=False,
    )  # fmt: skip
    try:
        for lo in range(0, len(todo), per_call):
            group = todo[lo : lo + per_call]
            seeds = [dori_seed(config.seed, indices[j]) for j in group]
            prompts = [items[j].prompt for j in group]
            x0 = model.encode_images(
                torch.stack([attack.target(items[j].image, model.image_size) for j in group])
            )
            ids = [items[j].id for j in group]
            if mitigation is None:
                ctx = contextlib.nullcontext()
            elif rowwise_items:
                ctx = mitigation.applied_rows(model, attack.row_ids(ids))
            else:
                ctx = mitigation.applied(model, ids if per_item else None)
            success = None
            if backends is not None:
                first = [generation_seeds(config.seed, indices[j], 1)[0] for j in group]
                success = replication_check(model, [items[j].image for j in group], first, backends, config)
            others = None if init_prompts is None else [init_prompts[j] for j in group]
            done = bar.n
            with ctx:
                res = attack.run(
                    model, x0, prompts, seeds, init_prompts=others, success=success,
                    progress=lambda s, d=done, k=len(group): bar.update(d + s * k - bar.n),
                )  # fmt: skip
            for pos, j in enumerate(group):
                tensors = {"embedding": res.embeddings[pos], "losses": res.losses[pos]}
                tensors.update({k: v[pos] for k, v in res.tensors.items()})
                tensors.update({f"snap.{k}": v[pos] for k, v in res.snapshots.items()})
                atomic_save_tensors(run.artifact(attack_artifact(attack.key, mkey, items[j].id)), tensors)
                if res.records:
                    run.put(f"{attack.key}.{mkey}.{items[j].id}", res.records[pos])
    finally:
        bar.close()
    distributed.sync()
    loaded = [load_tensors(run.artifact(attack_artifact(attack.key, mkey, it.id))) for it in items]
    out: dict[int | None, torch.Tensor] = {}
    for k in steps:
        name = "embedding" if k is None or k == attack.steps else f"snap.{k}"
        out[k] = torch.stack([t[name] for t in loaded])
    return out


def run_audit(
    model: T2IModel,
    items: Sequence[Item],
    set_name: str,
    backends: Backends,
    run: RunDir,
    config: EvalConfig,
    mitigation: Mitigation | None = None,
    attack: Attack | None = None,
    init_prompts: Sequence[str] | None = None,
    snapshots: Sequence[int] = (1, 10, 25),
    utility: Utility | None = None,
    progress: bool = True,
    paraphrases: dict[str, list[str]] | None = None,
) -> dict:
    """Run (or resume) an audit and return ``{"rows", "skipped", "settings", "protocol", ...}``.

    Args:
        items: the set (after any limit); an item's position fixes its seeds. Items without a training
            image are skipped and listed with their reason.
        mitigation: a fitted inference-time mitigation (``dori.mitigations.load_mitigation("nemo:DIR")``), or
            None for the unmitigated model only.
        attack: None, or an attack (:class:`dori.attacks.dori.Dori`, whose ``init`` says where it starts;
            :class:`dori.attacks.unlearndiffatk.UnlearnDiffAtk`, the discrete-prompt baseline of App. G.1).
        init_prompts: for Dori with init ``other``, one prompt per item of ``items``.
        snapshots: attack steps evaluated besides the last (Dori).
        utility: prompts and reference images for FID/KID (needs ``backends.features``).
        paraphrases: item id -> paraphrases of its prompt: adds the concept utility of Table 12
            (``a_concept`` per model state, ``fid_concept`` of the mitigated state against the unmitigated
            one; :mod:`dori.concept_utility`).
    """
    if mitigation is not None and mitigation.name == "none":
        mitigation = None
    usable, indices, skipped = [], [], []
    for idx, item in enumerate(items):
        if item.skip_reason is None and item.image is not None:
            usable.append(item)
            indices.append(idx)
        else:
            skipped.append({"id": item.id, "reason": item.skip_reason or "no training image"})
    if not usable:
        raise DoriError(f"no item of set {set_name!r} has a training image ({len(skipped)} skipped)")
    mkey = _key(mitigation)
    per_item = mitigation is not None and mitigation.per_item
    ctx = None if mitigation is None else (lambda ids: mitigation.applied(model, ids))
    rows_ctx = (lambda row_ids: mitigation.applied_rows(model, row_ids)) if per_item else None  # noqa: E731
    settings = audit_settings(mitigation, attack, snapshots)
    searched: dict[int | None, torch.Tensor] = {}
    steps = [s.dori_steps for s in settings if attack is not None and s.attack == attack.name]
    if attack is not None:
        attack = attack.recording(steps)
    phases: list[dict] = []  # wall time of each phase of this call, and the items it had left to do

    def pending(exists: Callable[[Item], bool]) -> int:
        return sum(not exists(it) for it in usable)

    for setting in settings:
        is_mitigated = setting.mitigation != "none"
        embeddings = None
        if setting.attack != "none":
            if not searched:
                others = None if init_prompts is None else [init_prompts[i] for i in indices]
                todo = pending(lambda it: run.artifact(attack_artifact(attack.key, mkey, it.id)).exists())
                start = time.perf_counter()
                searched = run_attack(
                    model, usable, indices, attack, run, config, steps, mitigation, backends, others,
                    progress=progress,
                )  # fmt: skip
                phases.append(
                    {
                        "phase": f"{attack.key} search ({mkey})",
                        "seconds": time.perf_counter() - start,
                        "items": todo,
                    }
                )
            embeddings = searched[setting.dori_steps]
        todo, start = pending(lambda it, k=setting.key: run.has(f"item.{k}.{it.id}")), time.perf_counter()
        evaluate_items(
            model,
            usable,
            indices,
            backends,
            run,
            setting,
            config,
            embeddings=embeddings,
            mitigation=ctx if is_mitigated else None,
            per_item=per_item and is_mitigated,
            progress=progress,
            rows=rows_ctx if is_mitigated else None,
        )
        phases.append(
            {
                "phase": f"generate + score: {setting.key}",
                "seconds": time.perf_counter() - start,
                "items": todo,
            }
        )
    util = {}
    if utility is not None:
        for tag in dict.fromkeys(s.key if s.attack == "none" else mkey for s in settings):
            util[tag] = utility_scores(
                model, utility.prompts, utility.reference, backends, run, tag, config,
                mitigation=ctx if tag != "none" else None, progress=progress,
            )  # fmt: skip
    concept = {}
    if paraphrases is not None:
        from dori.concept_utility import concept_utility

        for tag in dict.fromkeys(s.key if s.attack == "none" else mkey for s in settings):
            mitigated = tag != "none"
            concept[tag] = concept_utility(
                model, usable, indices, paraphrases, backends, run, tag, config,
                mitigation=ctx if mitigated else None, per_item=per_item and mitigated,
                reference="none" if mitigated else None,
            )  # fmt: skip
    kinds = sorted({it.kind for it in usable})
    rows = []
    curves: dict[str, torch.Tensor] = {}  # item -> norm ratio per Dori step, read once for every Dori row
    for setting in settings:
        records = [run.get(f"item.{setting.key}.{it.id}") for it in usable]
        groups = [(set_name, records)]
        if len(kinds) > 1:  # a mixed set (e.g. memorized = VM + TM) also gets one row per kind
            groups += [(f"{set_name}/{k}", [r for r in records if r["kind"] == k]) for k in kinds]
        tag = setting.key if setting.attack == "none" else mkey
        for name, group in groups:
            row = summarize(group, setting, name, backends.threshold, config.a_clip)
            if setting.attack == "dori":
                for r in group:
                    if r["item"] not in curves:
                        curves[r["item"]] = norm_ratios(run, mkey, r["item"])
                ratios = [float(curves[r["item"]][setting.dori_steps - 1]) for r in group]
                row["dori_norm_ratio"] = M.median_mad(ratios)
            if tag in util:
                row.update(
                    fid=util[tag]["fid"], kid=util[tag]["kid"], a_clip_utility=util[tag].get("a_clip"),
                    utility_set=utility.name,
                    fid_reference=f"{utility.name}: {util[tag]['n_reference']} reference images, "
                    f"{util[tag]['n_generated']} generations",
                )  # fmt: skip
            if tag in concept:
                per = [run.get(f"concept.{tag}.{r['item']}")["a_concept"] for r in group]
                row.update(
                    a_concept=M.median_mad(per),
                    fid_concept=concept[tag]["fid_concept"] if name == set_name else None,
                    concept_generations=concept[tag]["n_generations"],
                )
            rows.append(row)
    return {
        "rows": rows,
        "skipped": skipped,
        "settings": [s.describe() for s in settings],
        "protocol": config.describe(),
        "dori": attack.settings() if attack is not None and attack.name == "dori" else None,
        "backends": backends.describe(),
        "timing": {"phases": phases, "items_done": max((p["items"] for p in phases), default=0)},
    }
