"""Concept utility of a mitigation (Finding Dori, Appendix H, Table 12): does removing a memorized image also
damage the concepts in it?

For each memorized item, generations from paraphrases of its prompt (the paper: 10 paraphrases by an LLM,
100 images per item)::

    A_Concept(item) = mean over paraphrases q and generations g of cos(CLIP_image(g), CLIP_text(q))
    FID_Concept     = FID(Inception features of all paraphrase generations after the mitigation,
                          the same generations, same seeds, before it)

A_Concept is aggregated over items as median ± MAD (the paper's "x ± y"); FID_Concept is one number per
mitigation (the paper computes it on 10,000 images per set; here on what the run generates, stated with it).

Paraphrase sets are data: a user file (``{"item id": ["paraphrase", ...]}`` as JSON, or JSON lines
``{"id": ..., "paraphrases": [...]}``), or, on the miniworld, :func:`world_paraphrases`, which the world's
own caption grammar produces.

Seeds: paraphrase j of the item at position ``index`` of its set, generation k, uses
``seed + CONCEPT_SEED_BASE + SEED_STRIDE * index + n_gens * j + k``, the same before and after the mitigation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.evaluation import SEED_STRIDE, EvalConfig, MitigationContext, embed, to_uint8
from dori.metrics import functions as M
from dori.metrics.features import Backends
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors

CONCEPT_SEED_BASE = 20_000_000


def load_paraphrases(path: str | Path) -> dict[str, list[str]]:
    """Item id -> paraphrases from a JSON object or JSON lines file (see module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DoriError(f"paraphrase file {p} not found")
    text = p.read_text()
    try:
        if text.lstrip().startswith("{") and p.suffix != ".jsonl":
            data = json.loads(text)
        else:
            data = {}
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "id" not in rec or "paraphrases" not in rec:
                        raise DoriError(f"{p}:{n}: each line needs 'id' and 'paraphrases'")
                    data[str(rec["id"])] = rec["paraphrases"]
    except json.JSONDecodeError as err:
        raise DoriError(f"{p}: not JSON or JSON lines ({err})") from err
    if not isinstance(data, dict):
        raise DoriError(f"{p}: expected an object item id -> list of paraphrases")
    out = {}
    for key, value in data.items():
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise DoriError(f"{p}: paraphrases of {key!r} must be a non-empty list of strings")
        out[str(key)] = list(value)
    return out


def world_paraphrases(items: Sequence[Item], n: int = 5) -> dict[str, list[str]]:
    """Paraphrases of miniworld vm/tm titles (``"<word> <word> <kind>"``) that its caption grammar produces:
    the two title words (the item's keywords) with each other kind word of the item's family, then the
    words swapped with the item's own kind; the first ``n`` of them."""
    from dori.miniworld.generator import TM_KINDS, VM_KINDS

    out = {}
    for it in items:
        kinds = VM_KINDS if it.kind == "vm" else TM_KINDS if it.kind == "tm" else None
        words = it.prompt.split(" ", 2)
        own = next((k for k in (kinds or ()) if it.prompt.endswith(" " + k)), None)
        if own is None or len(words) < 3:
            raise DoriError(f"item {it.id}: world paraphrases need a vm/tm title, got {it.prompt!r}")
        w1, w2 = words[0], words[1]
        cands = [f"{w1} {w2} {k}" for k in kinds if k != own] + [f"{w2} {w1} {own}"]
        out[it.id] = cands[:n]
    return out


def _generate(model, prompts, seeds, config, backends, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
    with ctx:
        images = model.sample(model.encode_text(list(prompts)), seeds, config.sampling)
    imgs = list(to_uint8(images).float() / 255)
    clip = embed(backends.aligner.image_features, imgs, config.feature_batch)
    feats = embed(backends.features, imgs, config.feature_batch) if backends.features is not None else None
    return clip, feats


def concept_utility(
    model: T2IModel,
    items: Sequence[Item],
    indices: Sequence[int],
    paraphrases: dict[str, list[str]],
    backends: Backends,
    run: RunDir,
    tag: str,
    config: EvalConfig,
    mitigation: MitigationContext | None = None,
    per_item: bool = False,
    reference: str | None = None,
) -> dict:
    """A_Concept of one model state (``tag``) and, with ``reference`` (the unmitigated tag, computed
    first), FID_Concept against it. Resumable: per item, the features are saved as artifacts.

    Returns ``{"a_concept": {median, mad}, "fid_concept": float | None, "n_items", "n_paraphrases",
    "n_generations"}``; per item ``a_concept`` is stored under ``concept.<tag>.<item>``.
    """
    if backends.aligner is None:
        raise DoriError("A_Concept needs a CLIP model (the aligner backend)")
    missing = [it.id for it in items if it.id not in paraphrases]
    if missing:
        raise DoriError(f"no paraphrases for items {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    n = config.n_gens
    for it, index in zip(items, indices, strict=True):
        key = f"concept.{tag}.{it.id}"
        if run.has(key):
            continue
        phr = paraphrases[it.id]
        prompts = [q for q in phr for _ in range(n)]
        seeds = [config.seed + CONCEPT_SEED_BASE + SEED_STRIDE * index + j for j in range(len(prompts))]
        ctx = (
            mitigation([it.id] if per_item else None) if mitigation is not None else contextlib.nullcontext()
        )
        clip, feats = _generate(model, prompts, seeds, config, backends, ctx)
        text = backends.aligner.text_features(list(phr)).float().cpu()
        cos = M.cosine_matrix(clip, text)  # (generations, paraphrases)
        scores = cos[torch.arange(len(prompts)), torch.arange(len(prompts)) // n]
        tensors = {"clip_scores": scores}
        if feats is not None:
            tensors["features"] = feats
        atomic_save_tensors(run.artifact(f"concept.{tag}.{it.id}.safetensors"), tensors)
        run.put(key, {"item": it.id, "a_concept": float(scores.mean()), "paraphrases": phr, "seeds": seeds})
    per = [run.get(f"concept.{tag}.{it.id}")["a_concept"] for it in items]
    result = {
        "a_concept": M.median_mad(per),
        "fid_concept": None,
        "n_items": len(items),
        "n_paraphrases": sum(len(paraphrases[it.id]) for it in items),
        "n_generations": sum(len(paraphrases[it.id]) for it in items) * n,
    }
    if reference is not None and backends.features is not None:
        after = torch.cat(
            [load_tensors(run.artifact(f"concept.{tag}.{it.id}.safetensors"))["features"] for it in items]
        )
        before = torch.cat(
            [
                load_tensors(run.artifact(f"concept.{reference}.{it.id}.safetensors"))["features"]
                for it in items
            ]
        )
        result["fid_concept"] = M.fid(after, before)
        result["fid_concept_reference"] = (
            f"{reference}: {before.shape[0]} generations from the same paraphrases"
        )
    return result
