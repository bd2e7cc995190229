"""The paper's evaluation protocol: one implementation that every experiment uses.

For each item (a training image and its caption) and one conditioning (the caption's embedding, or a
given embedding such as a Dori result), generate ``n_gens`` images (10) with DDIM (50 steps, guidance 7,
the null prompt as unconditional branch), score them with :mod:`dori.metrics.functions`, and aggregate
over items as median ± MAD (NeMo's protocol, Finding Dori Section 3.2).

Seeds. Generation k of the item at position ``index`` of its set uses seed
``base + SEED_STRIDE * index + k`` (``SEED_STRIDE = 1000``), whatever the setting, so SSCD_gen compares a
mitigated generation with the unmitigated one from the same initial noise, and ``--limit`` does not
change any seed. The Dori search of that item uses ``base + SEED_STRIDE * index + DORI_SEED_OFFSET``;
utility prompt i uses ``base + UTILITY_SEED_BASE + i``.

Batching. Items are generated together (one ``model.sample`` call over several items), unless the
mitigation is per item (NeMo/Wanda neuron sets differ per item), in which case each item runs in its
own mitigation context. Feature extraction runs in batches.

Reference: NeMo's scripts (ml-research/localizing_memorization_in_diffusion_models @ f952ede). A_CLIP is
aggregated as ``metrics/compute_prompt_alignment.py`` does (per item the ``torch.median`` of the generations'
cosines, then median ± deviation across items with ``torch.median``; ``a_clip="mean"`` is the named
alternative); ``jpeg=75`` scores generations after the JPEG save NeMo stores them with. FID/KID rows name
their reference set and its size. Deviations from the reference: SSCD_gen (max over generations) and D_SSCD
(mean pairwise cosine) follow the paper's text, not NeMo's scripts (medians); the other columns take the
midpoint median across items where NeMo's scripts take ``torch.median`` (the lower middle value for an even
count); seeds are one per generation (below), where NeMo uses seed 2 and the same 10 latents for every prompt;
generations are scored as uint8 in memory unless ``jpeg`` is set; the paper's FID uses 30k COCO prompts, the
shipped ``coco`` set holds 10k.

Resume. Each finished (setting, item) writes ``results/item.<setting>.<item>.json`` and the artifact
``artifacts/gen.<setting>.<item>.safetensors`` (uint8 images and copy-detector features, read by the
report and by SSCD_gen); a rerun skips finished items. Utility (FID/KID) features are saved per chunk.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from dori import distributed
from dori.data.sets import Item
from dori.errors import DoriError
from dori.metrics import functions as M
from dori.metrics.features import Backends
from dori.metrics.replication import replicated
from dori.models.pipeline import SamplingConfig, T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors

SEED_STRIDE = 1000
DORI_SEED_OFFSET = 999
UTILITY_SEED_BASE = 10_000_000
UTILITY_CHUNK = 256

MitigationContext = Callable[[Sequence[str] | None], AbstractContextManager]
"""``context(item_ids)``: a mitigation bound to the model under evaluation (``lambda ids: m.applied(model, ids)``
or, per UNet row, ``lambda rows: m.applied_rows(model, rows)``); the only such type in dori."""


@dataclass
class EvalConfig:
    """Settings of the protocol (defaults: the paper's).

    Attributes:
        n_gens: generations per item and conditioning (10).
        sampling: DDIM steps, guidance and UNet batch size (50, 7.0).
        seed: the base seed (see module docstring).
        feature_batch: images per feature-model call.
        jpeg: score generations after a JPEG round trip at this quality (NeMo saves its generations as
            JPEG, PIL's default quality 75), or None to score the uint8 images as generated.
        a_clip: per-item aggregation of A_CLIP in the rows: ``median`` (NeMo's script, with its
            lower-middle median across items too) or ``mean`` (mean per item, midpoint median across items).
    """

    n_gens: int = 10
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    feature_batch: int = 64
    jpeg: int | None = None
    a_clip: str = "median"

    def __post_init__(self) -> None:
        if not 1 <= self.n_gens < DORI_SEED_OFFSET:
            raise DoriError(f"n_gens must be in [1, {DORI_SEED_OFFSET - 1}], got {self.n_gens}")
        if self.jpeg is not None and not 1 <= self.jpeg <= 95:
            raise DoriError(f"jpeg quality must be in [1, 95], got {self.jpeg}")
        if self.a_clip not in ("median", "mean"):
            raise DoriError(f"a_clip aggregation must be median or mean, got {self.a_clip!r}")

    def describe(self) -> dict:
        return {
            "n_gens": self.n_gens,
            "sampler": "DDIM",
            "steps": self.sampling.steps,
            "guidance": self.sampling.guidance,
            "uncond": "null prompt",
            "scored_as": "uint8" if self.jpeg is None else f"JPEG quality {self.jpeg} (PIL), as NeMo",
            "a_clip": "per-item median, median across items (NeMo's compute_prompt_alignment.py)"
            if self.a_clip == "median"
            else "per-item mean, median across items",
            "seed": self.seed,
            "seeds": f"seed + {SEED_STRIDE} * item_index + k (k < n_gens); "
            f"Dori: seed + {SEED_STRIDE} * item_index + {DORI_SEED_OFFSET}; "
            f"utility prompt i: seed + {UTILITY_SEED_BASE} + i",
        }


@dataclass
class Setting:
    """One row of an audit: a model state (mitigation) and a conditioning (prompt or attack).

    Attributes:
        key: file-safe name (``none``, ``nemo``, ``nemo+dori-10``).
        label: what tables print.
        mitigation: ``none`` or the mitigation spec.
        attack: ``none`` or ``dori``.
        dori_steps: Dori steps behind the embeddings (None without attack).
        init: Dori initialization.
        reference: key of the setting SSCD_gen compares with (the unmitigated prompt), or None.
    """

    key: str
    label: str
    mitigation: str = "none"
    attack: str = "none"
    dori_steps: int | None = None
    init: str | None = None
    reference: str | None = None

    def describe(self) -> dict:
        return asdict(self)


def generation_seeds(base: int, index: int, n: int) -> list[int]:
    """Seeds of the ``n`` generations of the item at ``index`` of its set."""
    return [base + SEED_STRIDE * index + k for k in range(n)]


def dori_seed(base: int, index: int) -> int:
    """Seed of the Dori search of the item at ``index`` of its set."""
    return base + SEED_STRIDE * index + DORI_SEED_OFFSET


def item_key(setting: str, item_id: str) -> str:
    return f"item.{setting}.{item_id}"


def generation_artifact(setting: str, item_id: str) -> str:
    return f"gen.{setting}.{item_id}.safetensors"


def train_artifact(item_id: str) -> str:
    return f"train.{item_id}.safetensors"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 (rounded), the form generations are stored and scored in."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def embed(
    fn: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor], batch: int
) -> torch.Tensor:
    """Features of images (each (3, H, W) in [0, 1]) in batches of equal-size images, on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for idx in by_shape.values():
        for lo in range(0, len(idx), batch):
            chunk = idx[lo : lo + batch]
            feats = fn(torch.stack([images[i].float() for i in chunk])).float().cpu()
            for i, f in zip(chunk, feats, strict=True):
                out[i] = f
    if not out:
        raise DoriError("no images to embed")
    return torch.stack(out)  # type: ignore[arg-type]


def require_finite(values: torch.Tensor, what: str, setting: str, ids: Sequence[str]) -> None:
    """Refuse non-finite values (one block per item along dim 0): a NaN image decodes black and scores as
    "not memorized", so reporting it would be a false all-clear. The error names the setting and the items.

    Raises:
        DoriError: some item's values hold NaN or inf.
    """
    flat = values.detach().reshape(len(ids), -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        names = [i for i, b in zip(ids, bad.tolist(), strict=True) if b]
        raise DoriError(
            f"setting {setting!r}: the {what} of {len(names)} item(s) ({', '.join(names[:5])}) are not finite "
            "(NaN or inf), so this setting was not measured and no result is reported for it; check its numbers "
            "(Dori learning rate, guidance, norm ball, dtype)"
        )


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


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
    bar = _progress_bar(len(todo) * n, setting.label, progress)
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


def summarize(
    records: Sequence[dict], setting: Setting, set_name: str, threshold: float, a_clip: str = "median"
) -> dict:
    """One table row (the audit schema) from per-item records: median ± MAD across items.

    ``a_clip``: ``median`` = NeMo's script (per-item median, lower-middle median ± deviation across
    items); ``mean`` = per-item mean, midpoint median ± MAD across items. The row names the one used.
    """
    maxes = [r["sscd_orig"]["max"] for r in records]
    bad = [r.get("item", "?") for r in records if not math.isfinite(float(r["sscd_orig"]["max"]))]
    if bad:  # a record from an older run or a tampered file: never summarized into a clean rate
        raise DoriError(
            f"setting {setting.key!r}: the results of {len(bad)} item(s) ({', '.join(map(str, bad[:5]))}) hold "
            "non-finite scores, so no rate is reported for it; delete those result files to recompute them"
        )
    gen = [r["sscd_gen"]["max"] for r in records if r.get("sscd_gen")]
    with_clip = [r["a_clip"] for r in records if r.get("a_clip")]
    if a_clip == "median":
        clip_row = M.lower_median_mad([c.get("median", c["mean"]) for c in with_clip]) if with_clip else None
    else:
        clip_row = M.median_mad([c["mean"] for c in with_clip]) if with_clip else None
    return {
        "setting": setting.label,
        "key": setting.key,
        "set": set_name,
        "mitigation": setting.mitigation,
        "attack": setting.attack,
        "dori_steps": setting.dori_steps,
        "init": setting.init,
        "n_items": len(records),
        "mr": M.memorization_rate(maxes, threshold),
        "sscd_orig": M.median_mad(maxes),
        "sscd_orig_item_median": M.median_mad([r["sscd_orig"]["median"] for r in records]),
        "sscd_gen": M.median_mad(gen) if gen else None,
        "d_sscd": M.median_mad([r["d_sscd"]["mean"] for r in records]),
        "a_clip": clip_row,
        "a_clip_aggregation": a_clip,
        "fid": None,
        "kid": None,
    }


def utility_scores(
    model: T2IModel,
    prompts: Sequence[str],
    reference: Callable[[], Sequence[torch.Tensor]],
    backends: Backends,
    run: RunDir,
    tag: str,
    config: EvalConfig,
    mitigation: MitigationContext | None = None,
    progress: bool = True,
) -> dict:
    """FID and KID of one generation per utility prompt against reference images (Inception features).

    Args:
        prompts: the utility prompts (COCO captions, or a world's held-out captions).
        reference: returns the reference images (3, H, W) in [0, 1]; called only if their features are
            not cached in the run yet.
        tag: file-safe name of the model state (``none``, ``nemo``); generation runs in
            ``mitigation(None)`` (all items' interventions at once, as the paper computes FID).
    """
    if backends.features is None:
        raise DoriError("FID/KID need an Inception feature model (pass --inception PATH)")
    key = f"utility.{tag}"
    if run.has(key):
        return run.get(key)
    ref_path = run.artifact("utility.reference.safetensors")
    if not ref_path.exists():
        atomic_save_tensors(
            ref_path, {"features": embed(backends.features, reference(), config.feature_batch)}
        )
    ref = load_tensors(ref_path)["features"]
    starts = range(0, len(prompts), UTILITY_CHUNK)
    mine = distributed.my_share([lo for lo in starts if not _chunk_path(run, tag, lo).exists()])
    bar = _progress_bar(len(prompts), f"utility {tag}", progress)
    try:
        for lo in starts:
            part = prompts[lo : lo + UTILITY_CHUNK]
            path = _chunk_path(run, tag, lo)
            if lo in mine:
                seeds = [config.seed + UTILITY_SEED_BASE + lo + i for i in range(len(part))]
                ctx = mitigation(None) if mitigation is not None else contextlib.nullcontext()
                done = bar.n
                with ctx:
                    images = model.sample(
                        model.encode_text(list(part)),
                        seeds,
                        config.sampling,
                        progress=lambda k, d=done: bar.update(d + k - bar.n),
                    )
                require_finite(
                    images.float().reshape(1, -1), "FID generations", tag, [f"utility prompts {lo}+"]
                )
                feats = embed(backends.features, list(to_uint8(images).float() / 255), config.feature_batch)
                atomic_save_tensors(path, {"features": feats})
            else:
                bar.update(len(part))
    finally:
        bar.close()
    distributed.sync()
    gen = torch.cat([load_tensors(_chunk_path(run, tag, lo))["features"] for lo in starts])
    result = {
        "tag": tag,
        "n_generated": int(gen.shape[0]),
        "n_reference": int(ref.shape[0]),
        "fid": M.fid(gen, ref),
        "kid": M.kid(gen, ref, seed=config.seed),
    }
    if distributed.is_main():
        run.put(key, result)
    return result


def _chunk_path(run: RunDir, tag: str, lo: int):
    return run.artifact(f"utility.{tag}.{lo:07d}.safetensors")
