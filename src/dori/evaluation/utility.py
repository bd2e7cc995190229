"""Utility of a model state: FID and KID of one generation per utility prompt against reference images
(Inception features), and the generations' CLIP alignment with their prompts (A_CLIP on the utility set),
generated in resumable chunks (see :mod:`dori.evaluation` for the seeds)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from dori import distributed
from dori.errors import DoriError
from dori.evaluation.protocol import (
    UTILITY_CHUNK,
    UTILITY_SEED_BASE,
    EvalConfig,
    MitigationContext,
    embed,
    progress_bar,
    require_finite,
    to_uint8,
)
from dori.metrics import functions as M
from dori.metrics.features import Backends
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors


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
    """FID and KID of one generation per utility prompt against reference images (Inception features), and
    ``a_clip``: the cosine of CLIP image and text features of each generation and its prompt (median ± MAD, mean
    and n over the prompts; None without a CLIP model or for chunks written before it was recorded).

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
    bar = progress_bar(len(prompts), f"utility {tag}", progress)
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
                imgs = list(to_uint8(images).float() / 255)
                tensors = {"features": embed(backends.features, imgs, config.feature_batch)}
                if backends.aligner is not None:
                    img = embed(backends.aligner.image_features, imgs, config.feature_batch)
                    txt = backends.aligner.text_features(list(part)).float().cpu()
                    tensors["a_clip"] = M.paired_cosine(img, txt)
                atomic_save_tensors(path, tensors)
            else:
                bar.update(len(part))
    finally:
        bar.close()
    distributed.sync()
    chunks = [load_tensors(_chunk_path(run, tag, lo)) for lo in starts]
    gen = torch.cat([c["features"] for c in chunks])
    a_clip = None
    if all("a_clip" in c for c in chunks):
        scores = torch.cat([c["a_clip"] for c in chunks])
        a_clip = {**M.median_mad(scores.numpy()), "mean": float(scores.mean()), "n": int(scores.numel())}
    result = {
        "tag": tag,
        "n_generated": int(gen.shape[0]),
        "n_reference": int(ref.shape[0]),
        "fid": M.fid(gen, ref),
        "kid": M.kid(gen, ref, seed=config.seed),
        "a_clip": a_clip,
    }
    if distributed.is_main():
        run.put(key, result)
    return result


def _chunk_path(run: RunDir, tag: str, lo: int):
    return run.artifact(f"utility.{tag}.{lo:07d}.safetensors")
