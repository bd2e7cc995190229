"""Generate and score the items of one setting: ``n_gens`` generations per item (seeded per item, batched over
items unless the mitigation is per item), each item's record (SSCD_orig, replication, SSCD_gen, D_SSCD,
A_CLIP) and its artifact, written as it finishes so a killed run resumes (see :mod:`dori.evaluation`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from dori import distributed
from dori.data.sets import Item
from dori.errors import DoriError
from dori.evaluation.protocol import (
    EvalConfig,
    MitigationContext,
    Setting,
    embed,
    generation_artifact,
    generation_seeds,
    item_key,
    progress_bar,
    require_finite,
    to_uint8,
    train_artifact,
)
from dori.metrics import functions as M
from dori.metrics.features import Backends
from dori.metrics.replication import replicated
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors


def evaluate_items(
    model: T2IModel,
    items: Sequence[Item],
    indices: Sequence[int],
    backends: Backends,
    run: RunDir,
    setting: Setting,
    config: EvalConfig,
    embeddings: torch.Tensor | None = None,
    mitigation: MitigationContext | None = None,
    per_item: bool = False,
    progress: bool = True,
    rows: MitigationContext | None = None,
) -> list[dict]:
    """Generate and score every unfinished item of one setting; returns the per-item records.

    Args:
        items: items with training images, in any order.
        indices: each item's position in its set (fixes its seeds).
        embeddings: conditionings (N, tokens, dim) aligned with ``items``; None = encode the captions.
        mitigation: ``mitigation(item_ids)`` returns the context the model runs in; None = unmitigated.
        per_item: one mitigation context per item (per-item neuron sets); else one for all (item_ids None).
        rows: for per-item mitigations that support it, ``rows(row_item_ids)`` applies each row's own
            item's intervention inside one shared UNet batch (same result, no loop over items).
    """
    if len(indices) != len(items) or (embeddings is not None and embeddings.shape[0] != len(items)):
        raise DoriError("evaluate_items needs one index (and one embedding) per item")
    n = config.n_gens
    # sharded over the ranks of a torchrun job (a no-op in one process); every rank reads all records after
    todo = distributed.my_share(
        [j for j, it in enumerate(items) if not run.has(item_key(setting.key, it.id))]
    )
    rowwise = per_item and rows is not None
    per_call = 1 if per_item and not rowwise else max(1, config.sampling.batch_size // n)
    groups = [todo[i : i + per_call] for i in range(0, len(todo), per_call)]
    bar = progress_bar(len(todo) * n, setting.label, progress)
    try:
        for group in groups:
            ids = [items[j].id for j in group]
            if rowwise:  # per-item interventions, all items of the group in one UNet batch
                ctx = rows([i for i in ids for _ in range(n)])
            elif mitigation is not None:
                ctx = mitigation(ids if per_item else None)
            else:
                ctx = contextlib.nullcontext()
            seeds = [s for j in group for s in generation_seeds(config.seed, indices[j], n)]
            done = bar.n
            with ctx:
                if embeddings is None:
                    cond = model.encode_text([items[j].prompt for j in group])
                else:
                    cond = embeddings[group]
                require_finite(cond.float(), "conditioning embeddings", setting.key, ids)
                images = model.sample(
                    cond.repeat_interleave(n, dim=0),
                    seeds,
                    config.sampling,
                    progress=lambda k, d=done: bar.update(d + k - bar.n),
                )
            require_finite(images.float(), "generated images", setting.key, ids)
            gens = to_uint8(images)
            if config.jpeg is not None:
                gens = M.jpeg_roundtrip(gens, config.jpeg)
            imgs = list(gens.float() / 255)
            feats = embed(backends.copy_detector, imgs, config.feature_batch)
            require_finite(feats, "copy-detector features of the generations", setting.key, ids)
            trains = [_training_image(items[j], run) for j in group]
            train_feats = embed(
                backends.copy_detector, [t.float() / 255 for t in trains], config.feature_batch
            )
            require_finite(train_feats, "copy-detector features of the training images", setting.key, ids)
            clip_img = clip_txt = None
            if backends.aligner is not None:
                clip_img = embed(backends.aligner.image_features, imgs, config.feature_batch)
                clip_txt = backends.aligner.text_features([items[j].prompt for j in group]).float().cpu()
                require_finite(clip_img, "CLIP features", setting.key, ids)
            for pos, j in enumerate(group):
                sl = slice(pos * n, (pos + 1) * n)
                record = score_item(
                    items[j],
                    feats[sl],
                    train_feats[pos],
                    backends.threshold,
                    run,
                    setting,
                    None if clip_img is None else (clip_img[sl], clip_txt[pos]),
                )
                atomic_save_tensors(run.artifact(record["artifact"]), {"images": gens[sl], "sscd": feats[sl]})
                record.update(index=indices[j], seeds=seeds[sl], rank=distributed.current().rank)
                run.put(item_key(setting.key, items[j].id), record)
    finally:
        bar.close()
    distributed.sync()
    return [run.get(item_key(setting.key, it.id)) for it in items]


def _training_image(item: Item, run: RunDir) -> torch.Tensor:
    """The item's training image as uint8, saved once as an artifact for the report."""
    path = run.artifact(train_artifact(item.id))
    if path.exists():
        return load_tensors(path)["image"]
    if item.image is None:
        raise DoriError(f"item {item.id} has no training image ({item.skip_reason})")
    image = to_uint8(item.image)
    atomic_save_tensors(path, {"image": image})
    return image


def score_item(
    item: Item,
    feats: torch.Tensor,
    train_feat: torch.Tensor,
    threshold: float,
    run: RunDir,
    setting: Setting,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """The record of one item from its generations' copy-detector features (n, D).

    Args:
        train_feat: copy-detector features of the training image (D,).
        threshold: the replication threshold of the copy detector.
        run: where the reference setting's features are read (SSCD_gen).
        clip: CLIP features of the generations (n, D') and of the caption (D'), or None.
    """
    orig = M.sscd_orig(feats, train_feat)
    record: dict = {
        "setting": setting.key,
        "item": item.id,
        "prompt": item.prompt,
        "kind": item.kind,
        "conditioning": "prompt" if setting.attack == "none" else setting.attack,
        "sscd_orig": orig,
        "replicated": replicated(orig["max"], threshold),
        "sscd_gen": None,
        "d_sscd": M.d_sscd(feats),
        "a_clip": None if clip is None else M.a_clip(*clip),
        "artifact": generation_artifact(setting.key, item.id),
    }
    if setting.reference is not None:
        ref_path = run.artifact(generation_artifact(setting.reference, item.id))
        if not ref_path.exists():
            raise DoriError(f"SSCD_gen needs the {setting.reference!r} generations of {item.id} first")
        record["sscd_gen"] = M.sscd_gen(feats, load_tensors(ref_path)["sscd"])
    return record
