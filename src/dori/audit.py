"""The audit a model publisher runs before release (Finding Dori, Sections 3.2-3.3): can some text
embedding still make the (possibly mitigated) model reproduce its known memorized images?

Rows of one audit, all scored with :mod:`dori.evaluation` on the same items and seeds:

1. ``none``: the unmitigated model from each item's prompt (also the reference of SSCD_gen);
2. the mitigated model from the prompts (when a mitigation is given);
3. with ``attack="dori"``: the (mitigated) model from Dori embeddings searched against that same model,
   one row per evaluated number of Dori steps (snapshots, e.g. 1, 10, 25 and the final step), so MR can
   be read against steps (Tables 6-7).

Dori runs batched over items (one seed per item) unless the mitigation is per item; its embeddings,
loss and norm curves and snapshots are saved per item as artifacts, so a rerun skips finished searches.
FID/KID (when a utility prompt set is given) are properties of the model state, so Dori rows repeat the
values of their mitigation's row, as the paper's tables do. A set mixing kinds of items (``memorized`` =
VM + TM) gets, after each setting's row, one row per kind (``set`` = ``memorized/vm``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dori import distributed
from dori.attacks.dori import Dori, initial_embeddings
from dori.attacks.unlearndiffatk import resize_center_crop
from dori.data.sets import Item
from dori.errors import DoriError
from dori.evaluation import (
    EvalConfig,
    MitigationContext,
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
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors


@dataclass
class Utility:
    """A utility prompt set for FID/KID: prompts and a loader of the reference images."""

    name: str
    prompts: Sequence[str]
    reference: Callable[[], Sequence[torch.Tensor]]


def dori_artifact(mitigation_key: str, item_id: str) -> str:
    return f"dori.{mitigation_key}.{item_id}.safetensors"


def norm_ratios(run: RunDir, mitigation_key: str, item_id: str) -> torch.Tensor:
    """||y_adv|| / ||y_init|| of one item after each Dori step (Finding Dori, Fig. 7, right: reaching a
    non-memorized image takes a large rise of the embedding's norm, a memorized one does not)."""
    saved = load_tensors(run.artifact(dori_artifact(mitigation_key, item_id)))
    return saved["norms"].float() / saved["init"].float().norm().clamp_min(1e-12)


def resolve_mitigation(spec: str) -> tuple[str, object | None]:
    """``none`` -> (``none``, None); ``nemo:DIR`` -> (``nemo``, fitted mitigation) via
    :func:`dori.mitigations.load_mitigation`."""
    if spec in ("none", "", None):
        return "none", None
    from dori import mitigations

    load = getattr(mitigations, "load_mitigation", None)
    if load is None:
        raise DoriError("this dori has no mitigation loader (dori.mitigations.load_mitigation)")
    return spec.split(":", 1)[0], load(spec)


def audit_settings(mitigation: str, mkey: str, attack: str, steps: int, snapshots: Sequence[int], init: str):
    """The settings (rows) of one audit, in the order they are evaluated."""
    rows = [Setting("none", "no mitigation")]
    ref = None
    if mkey != "none":
        rows.append(Setting(mkey, mkey, mitigation=mitigation, reference="none"))
        ref = "none"
    if attack == "dori":
        for k in sorted({s for s in snapshots if 0 < s < steps} | {steps}):
            base = "no mitigation" if mkey == "none" else mkey
            label = f"{base} + dori" + ("" if k == steps else f" @{k}")
            rows.append(
                Setting(f"{mkey}+dori-{k}", label, mitigation, "dori", dori_steps=k, init=init, reference=ref)
            )
    elif attack == "unlearndiffatk":
        base = "no mitigation" if mkey == "none" else mkey
        rows.append(
            Setting(f"{mkey}+uda", f"{base} + UnlearnDiffAtk", mitigation, "unlearndiffatk", reference=ref)
        )
    elif attack != "none":
        raise DoriError(f"unknown attack {attack!r}: use none, dori or unlearndiffatk")
    return rows


def uda_artifact(mitigation_key: str, item_id: str) -> str:
    return f"uda.{mitigation_key}.{item_id}.safetensors"


def run_unlearndiffatk(
    model: T2IModel,
    items: Sequence[Item],
    indices: Sequence[int],
    attack,
    run: RunDir,
    mkey: str,
    config: EvalConfig,
    mitigation: MitigationContext | None = None,
    per_item: bool = False,
    max_items: int = 32,
    backends: Backends | None = None,
) -> torch.Tensor:
    """UnlearnDiffAtk prompts (Appendix G.1) per item against the (mitigated) model, saved per item like Dori's
    embeddings; returns the embeddings of the found discrete prompts (N, tokens, dim).

    With ``backends``, an item stops at the first timestep whose current prompt already replicates (the
    reference's early stop, :func:`uda_success`), so the prompt kept is the first one that succeeded; an item
    whose unattacked prompt already replicates keeps that prompt (``stopped_at`` 0), as in the reference.
    Targets are resized on their shorter side and centre-cropped, as the reference's dataset does.
    """
    todo = distributed.my_share(
        [j for j, it in enumerate(items) if not run.artifact(uda_artifact(mkey, it.id)).exists()]
    )
    per_call = 1 if per_item else max_items
    for lo in range(0, len(todo), per_call):
        group = todo[lo : lo + per_call]
        seeds = [dori_seed(config.seed, indices[j]) for j in group]
        x0 = model.encode_images(
            torch.stack([resize_center_crop(items[j].image, model.image_size) for j in group])
        )
        ids = [items[j].id for j in group]
        ctx = mitigation(ids if per_item else None) if mitigation is not None else contextlib.nullcontext()
        success = None
        if backends is not None:
            first = [generation_seeds(config.seed, indices[j], 1)[0] for j in group]
            success = uda_success(model, [items[j].image for j in group], first, backends, config)
        with ctx:
            res = attack(model, x0, [items[j].prompt for j in group], seeds, success=success)
        for pos, j in enumerate(group):
            atomic_save_tensors(
                run.artifact(uda_artifact(mkey, items[j].id)),
                {
                    "embedding": res.embeddings[pos],
                    "token_ids": res.token_ids[pos],
                    "losses": res.losses[pos],
                },
            )
            stopped = res.stopped_at[pos] if res.stopped_at else None
            run.put(f"uda.{mkey}.{items[j].id}", {"prompt": res.prompts[pos], "stopped_at": stopped})
    distributed.sync()
    return torch.stack([load_tensors(run.artifact(uda_artifact(mkey, it.id)))["embedding"] for it in items])


def uda_success(
    model: T2IModel,
    images: Sequence[torch.Tensor],
    seeds: Sequence[int],
    backends: Backends,
    config: EvalConfig,
) -> Callable[[list[int], torch.Tensor], list[bool]]:
    """UnlearnDiffAtk's stop test for memorization: one generation from the current prompt (``seeds``: the
    items' first evaluation seeds; the protocol's sampler) passes the replication threshold against the
    training image.
    Called inside the attack, so a mitigation applied around it applies here too."""

    def success(idx: list[int], embeddings: torch.Tensor) -> list[bool]:
        with torch.no_grad():  # scored as evaluate_items scores a generation: uint8, training image as given
            gens = to_uint8(model.sample(embeddings, [int(seeds[i]) for i in idx], config.sampling))
            feats = embed(backends.copy_detector, list(gens.float() / 255), config.feature_batch)
            train = embed(
                backends.copy_detector, [to_uint8(images[i]).float() / 255 for i in idx], config.feature_batch
            )
        return [
            M.sscd_orig(f[None], t)["max"] >= backends.threshold for f, t in zip(feats, train, strict=True)
        ]

    return success


def run_dori(
    model: T2IModel,
    items: Sequence[Item],
    indices: Sequence[int],
    dori: Dori,
    run: RunDir,
    mkey: str,
    config: EvalConfig,
    init: str = "prompt",
    other_prompts: Sequence[str] | None = None,
    mitigation: MitigationContext | None = None,
    per_item: bool = False,
    max_items: int = 32,
    progress: bool = True,
    rows: MitigationContext | None = None,
) -> dict[int, torch.Tensor]:
    """Search (or load) one Dori embedding per item; returns snapshot step -> embeddings (N, tokens, dim).

    Args:
        init: ``prompt``, ``random`` or ``other`` (``other_prompts[i]`` for item i).
        mitigation / per_item: the model state the search runs against (as in :func:`evaluate_items`).
        max_items: most items searched in one batch (bounds memory; the result does not depend on it).
    """
    # sharded over the ranks of a torchrun job (a no-op in one process); every rank loads all results after
    todo = distributed.my_share(
        [j for j, it in enumerate(items) if not run.artifact(dori_artifact(mkey, it.id)).exists()]
    )
    rowwise = per_item and rows is not None
    if rowwise:  # one chunk of the search = all items of a call, so each UNet batch has a known layout
        per_call = max(1, min(max_items, dori.max_micro_batch // dori.batch_size))
    else:
        per_call = 1 if per_item else max_items
    bar = tqdm(
        total=len(todo) * dori.steps, desc=f"dori {mkey}", disable=not progress, file=sys.stderr, leave=False
    )
    try:
        for lo in range(0, len(todo), per_call):
            group = todo[lo : lo + per_call]
            seeds = [dori_seed(config.seed, indices[j]) for j in group]
            prompts = [items[j].prompt for j in group]
            if init == "other":
                if other_prompts is None:
                    raise DoriError("init 'other' needs other prompts")
                y0 = initial_embeddings(
                    model, prompts, "other", other_prompts=[other_prompts[j] for j in group]
                )
            else:
                y0 = initial_embeddings(model, prompts, init, seeds=seeds)
            images = torch.stack([resize_to(items[j].image, model.image_size) for j in group])
            x0 = model.encode_images(images)
            ids = [items[j].id for j in group]
            if rowwise:
                ctx = rows([i for i in ids for _ in range(dori.batch_size)])
            elif mitigation is not None:
                ctx = mitigation(ids if per_item else None)
            else:
                ctx = contextlib.nullcontext()
            done = bar.n
            with ctx:
                res = dori(
                    model,
                    x0,
                    y0,
                    seeds,
                    progress=lambda s, d=done, k=len(group): bar.update(d + s * k - bar.n),
                )
            for pos, j in enumerate(group):
                tensors = {
                    "embedding": res.embeddings[pos],
                    "init": y0[pos].float(),
                    "losses": res.losses[pos],
                    "norms": res.norms[pos] if res.norms is not None else torch.zeros(dori.steps),
                }
                tensors.update({f"snap.{k}": v[pos] for k, v in res.snapshots.items()})
                atomic_save_tensors(run.artifact(dori_artifact(mkey, items[j].id)), tensors)
    finally:
        bar.close()
    distributed.sync()
    loaded = [load_tensors(run.artifact(dori_artifact(mkey, it.id))) for it in items]
    out = {k: torch.stack([t[f"snap.{k}"] for t in loaded]) for k in dori.snapshot_steps}
    out[dori.steps] = torch.stack([t["embedding"] for t in loaded])
    return out


def run_audit(
    model: T2IModel,
    items: Sequence[Item],
    set_name: str,
    backends: Backends,
    run: RunDir,
    config: EvalConfig,
    mitigation: str = "none",
    attack: str = "none",
    dori: Dori | None = None,
    init: str = "prompt",
    other_prompts: Sequence[str] | None = None,
    snapshots: Sequence[int] = (1, 10, 25),
    utility: Utility | None = None,
    progress: bool = True,
    uda=None,
    paraphrases: dict[str, list[str]] | None = None,
) -> dict:
    """Run (or resume) an audit and return ``{"rows", "skipped", "settings", "protocol"}``.

    Args:
        items: the set (after any limit); an item's position fixes its seeds. Items without a training
            image are skipped and listed with their reason.
        mitigation: ``none`` or a spec for :func:`dori.mitigations.load_mitigation` (``nemo:DIR``).
        attack: ``none``, ``dori`` (then ``dori`` holds the search settings; default: the paper's) or
            ``unlearndiffatk`` (the discrete-prompt baseline of Appendix G.1; ``uda`` holds its settings).
        init: Dori initialization ``prompt``, ``random`` or ``other`` (with ``other_prompts``, one per
            item of ``items``).
        snapshots: Dori steps evaluated besides the last.
        utility: prompts and reference images for FID/KID (needs ``backends.features``).
        paraphrases: item id -> paraphrases of its prompt: adds the concept utility of Table 12
            (``a_concept`` per model state, ``fid_concept`` of the mitigated state against the unmitigated
            one; :mod:`dori.concept_utility`).
    """
    usable, indices, skipped = [], [], []
    for idx, item in enumerate(items):
        if item.skip_reason is None and item.image is not None:
            usable.append(item)
            indices.append(idx)
        else:
            skipped.append({"id": item.id, "reason": item.skip_reason or "no training image"})
    if not usable:
        raise DoriError(f"no item of set {set_name!r} has a training image ({len(skipped)} skipped)")
    mkey, fitted = resolve_mitigation(mitigation)
    ctx = None if fitted is None else (lambda ids: fitted.applied(model, ids))
    per_item = bool(getattr(fitted, "per_item", True)) if fitted is not None else False
    rows_ctx = None
    if per_item and hasattr(fitted, "applied_rows"):
        rows_ctx = lambda row_ids: fitted.applied_rows(model, row_ids)  # noqa: E731
    dori = dori or Dori()
    settings = audit_settings(mitigation, mkey, attack, dori.steps, snapshots, init)
    searched: dict[int, torch.Tensor] = {}
    uda_embeddings: torch.Tensor | None = None
    if attack == "dori":
        steps_needed = tuple(s.dori_steps for s in settings if s.attack == "dori")
        dori = dataclasses.replace(dori, snapshot_steps=steps_needed)
    phases: list[dict] = []  # wall time of each phase of this call, and the items it had left to do

    def pending(exists: Callable[[Item], bool]) -> int:
        return sum(not exists(it) for it in usable)

    for setting in settings:
        is_mitigated = setting.mitigation != "none"
        if setting.attack == "dori" and not searched:
            others = None if other_prompts is None else [other_prompts[i] for i in indices]
            todo, start = (
                pending(lambda it: run.artifact(dori_artifact(mkey, it.id)).exists()),
                time.perf_counter(),
            )
            searched = run_dori(
                model, usable, indices, dori, run, mkey, config, init, others,
                ctx, per_item, progress=progress, rows=rows_ctx,
            )  # fmt: skip
            phases.append(
                {"phase": f"dori search ({mkey})", "seconds": time.perf_counter() - start, "items": todo}
            )
        if setting.attack == "unlearndiffatk" and uda_embeddings is None:
            from dori.attacks.unlearndiffatk import UnlearnDiffAtk

            uda_embeddings = run_unlearndiffatk(
                model, usable, indices, uda or UnlearnDiffAtk(), run, mkey, config, ctx, per_item,
                backends=backends,
            )  # fmt: skip
        todo, start = pending(lambda it, k=setting.key: run.has(f"item.{k}.{it.id}")), time.perf_counter()
        embeddings = None
        if setting.attack == "dori":
            embeddings = searched.get(setting.dori_steps)
        elif setting.attack == "unlearndiffatk":
            embeddings = uda_embeddings
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
                    fid=util[tag]["fid"], kid=util[tag]["kid"], utility_set=utility.name,
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
        "dori": dori.settings() if attack == "dori" else None,
        "backends": backends.describe(),
        "timing": {"phases": phases, "items_done": max((p["items"] for p in phases), default=0)},
    }


def resize_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] resized (bicubic, antialiased) to size x size, if needed."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(
        image[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp(0, 1)
