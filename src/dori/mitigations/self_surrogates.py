"""Surrogate images from the memorizing model alone (the default source of adversarial fine-tuning).

Algorithm 2 needs, per memorized item, images that follow the item's caption but are not replicas of its
training image ("images generated with active mitigation", Appendix I.1). The paper makes them under NeMo, or
with a second model that never saw the items. Neither is always at hand: NeMo must be fitted first and leaves
some items replicating (11 of the 40 vm items of the shipped world), and a second model rarely exists. This
module makes them from the model itself, with the inference-time input changes that Somepalli et al. (2023,
"Understanding and mitigating copying in diffusion models") showed to break replication, and a check on
every candidate:

* ``prompt``: the caption itself at other seeds. A memorizing model does not replicate from every seed; a
  seed whose image the copy detector does not call a replica is the model's own reading of the caption.
* ``drop-word``: the caption with one word left out (one candidate per word, cycling). Memorization is tied
  to the exact token sequence of the caption; the rest of the caption still says what the image shows.
* ``noise``: Gaussian noise on the text embedding (Somepalli et al.'s GNI), with a standard deviation of
  ``scale`` times the embedding's own; the scale grows each round (``noise_scales``), so an item that keeps
  replicating under small changes gets larger ones.
* an inference-time mitigation (e.g. a fitted NeMo), optionally (``mitigation``): the paper's source.

Every candidate is scored with the copy detector against the item's training image and, where an aligner
(the CLIP role) is given, with the cosine of its image features to the caption's text features. Only
candidates under the replication threshold are kept; among those, the ones at least ``margin`` under the
threshold come first (a surrogate just under the threshold would teach a near-replica), then the best
aligned with the caption. Rounds run until every item has ``per_item`` surrogates in the safe band or
``rounds`` rounds are done; a last round with ``escape_scale`` noise serves items that still have none.
Per item the set records each surrogate's copy similarity, alignment and source.

Why each source is sound: the copy detector is the same judge the audit uses, so no kept image counts as a
replica by the measure the mitigation is judged on; the caption (or all but one of its words) conditions the
generation, so the content follows the caption, and the alignment score says how well; the images come from
the model's own unpruned weights, so they carry its image quality (NeMo's pruned generations triple FID on the
shipped world, docs/miniworld.md), which the fine-tuning would otherwise learn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.metrics.features import TextImageAligner
from dori.mitigations.surrogates import ApplyMitigation, Similarity, SurrogateSet
from dori.models.pipeline import SamplingConfig, T2IModel

SOURCES = ("prompt", "drop-word", "noise")


@dataclass
class _Candidate:
    image: torch.Tensor
    similarity: float
    alignment: float | None
    source: str


@dataclass
class SelfSurrogates:
    """Surrogates from the memorizing model alone (see module docstring).

    Args:
        per_item: surrogates wanted per item.
        candidates: candidates per source, item and round.
        rounds: rounds at most (the noise scale of round r is ``noise_scales[min(r, len - 1)]``).
        noise_scales: standard deviation of the text-embedding noise, relative to the embedding's own.
        escape_scale: noise scale of the last round for items that still have no surrogate.
        margin: candidates at least this far under the replication threshold are preferred.
        sources: which of ``prompt``, ``drop-word``, ``noise`` to use.
        seed: base seed (candidate seeds and noise).
        sample_steps, guidance: the sampler (default: the paper's DDIM 50, guidance 7).
        batch_size: images per sampling batch.
    """

    per_item: int = 4
    candidates: int = 4
    rounds: int = 3
    noise_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    escape_scale: float = 4.0
    margin: float = 0.1
    sources: tuple[str, ...] = SOURCES
    seed: int = 0
    sample_steps: int = 50
    guidance: float = 7.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if min(self.per_item, self.candidates, self.rounds) < 1:
            raise DoriError("per_item, candidates and rounds must be >= 1")
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise DoriError(f"sources must be a non-empty subset of {SOURCES}, got {self.sources}")
        if not self.noise_scales or min(self.noise_scales) <= 0 or self.escape_scale <= 0:
            raise DoriError("noise scales must be > 0")
        if self.margin < 0:
            raise DoriError(f"margin must be >= 0, got {self.margin}")

    def settings(self) -> dict:
        d = asdict(self)
        d["noise_scales"] = list(self.noise_scales)
        d["sources"] = list(self.sources)
        return d

    @torch.no_grad()
    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        similarity: Similarity,
        threshold: float,
        aligner: TextImageAligner | None = None,
        mitigation: ApplyMitigation | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SurrogateSet:
        """Surrogates for every item with a training image.

        Args:
            model: the memorizing model (not changed).
            items: memorized items (caption + training image); items without an image are listed in ``failed``.
            similarity: the copy detector's similarity (see :data:`dori.mitigations.surrogates.Similarity`).
            threshold: the replication threshold; candidates at or above it are never kept.
            aligner: the CLIP role, to rank candidates by alignment with the caption (None: by similarity).
            mitigation: an optional inference-time mitigation per item (NeMo's ``applied``), one more source.
            progress: optional ``progress(rounds_done)``.

        Returns:
            The :class:`SurrogateSet`, with ``similarity``, ``alignment`` and ``source`` per kept image.
        """
        config = SamplingConfig(steps=self.sample_steps, guidance=self.guidance, batch_size=self.batch_size)
        out = SurrogateSet()
        todo = []
        for it in items:
            if it.image is None:
                out.failed[it.id] = f"no training image ({it.skip_reason or 'none given'})"
            else:
                todo.append(it)
        pools: dict[str, list[_Candidate]] = {it.id: [] for it in todo}
        text = _text_features(aligner, todo)
        for r in range(self.rounds + 1):
            escape = r == self.rounds
            wanted = [it for it in todo if not self._done(pools[it.id], threshold, escape)]
            if not wanted:
                break
            scale = self.escape_scale if escape else self.noise_scales[min(r, len(self.noise_scales) - 1)]
            sources = ("noise",) if escape else self.sources
            self._round(model, wanted, r, scale, sources, config, similarity, text, aligner, pools)
            if mitigation is not None and not escape:
                self._mitigated(model, wanted, r, config, mitigation, similarity, text, aligner, pools)
            if progress is not None:
                progress(r + 1)
        for it in todo:
            keep = self._select(pools[it.id], threshold)
            if not keep:
                out.failed[it.id] = (
                    f"every candidate ({len(pools[it.id])}, up to noise scale {self.escape_scale}) is a replica "
                    f"(similarity >= {threshold})"
                )
                continue
            out.images[it.id] = torch.stack([c.image for c in keep])
            out.similarity[it.id] = [c.similarity for c in keep]
            out.alignment[it.id] = [c.alignment for c in keep]
            out.source[it.id] = [c.source for c in keep]
        return out

    # ------------------------------------------------------------------ parts
    def _done(self, pool: list[_Candidate], threshold: float, escape: bool) -> bool:
        if escape:  # the last round only serves items with no surrogate at all
            return any(c.similarity < threshold for c in pool)
        safe = [c for c in pool if c.similarity < threshold - self.margin]
        return len(safe) >= self.per_item

    def _select(self, pool: list[_Candidate], threshold: float) -> list[_Candidate]:
        ok = [c for c in pool if c.similarity < threshold]

        def key(c: _Candidate) -> tuple:
            risky = c.similarity >= threshold - self.margin
            align = c.alignment if c.alignment is not None else 0.0
            return (risky, -align, c.similarity)

        return sorted(ok, key=key)[: self.per_item]

    def _conditioning(
        self, model: T2IModel, items: Sequence[Item], r: int, scale: float, sources: Sequence[str]
    ) -> tuple[torch.Tensor, list[int], list[int], list[str]]:
        """Embeddings, seeds, item index and source name of every candidate of one round."""
        k = self.candidates
        prompts, owners, names, noisy = [], [], [], []
        for i, it in enumerate(items):
            words = it.prompt.split()
            for src in sources:
                if src == "drop-word" and len(words) < 2:
                    continue
                for j in range(k):
                    if src == "drop-word":
                        drop = (r * k + j) % len(words)
                        prompts.append(" ".join(w for n, w in enumerate(words) if n != drop))
                    else:
                        prompts.append(it.prompt)
                    owners.append(i)
                    names.append(src if src != "noise" else f"noise-{scale:g}")
                    noisy.append(src == "noise")
        emb = model.encode_text(prompts).float()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        noise = torch.randn(emb.shape, generator=gen).to(emb.device)
        std = emb.flatten(1).std(dim=1).view(-1, 1, 1)
        mask = torch.tensor(noisy, device=emb.device).view(-1, 1, 1)
        emb = torch.where(mask, emb + scale * std * noise, emb)
        seeds = [self.seed + 100_000 * (r + 1) + n for n in range(len(owners))]
        return emb, seeds, owners, names

    def _round(self, model, items, r, scale, sources, config, similarity, text, aligner, pools) -> None:
        emb, seeds, owners, names = self._conditioning(model, items, r, scale, sources)
        images = model.sample(emb, seeds, config)
        self._score(items, images, owners, names, similarity, text, aligner, pools)

    def _mitigated(self, model, items, r, config, mitigation, similarity, text, aligner, pools) -> None:
        k = self.candidates
        for it in items:
            seeds = [self.seed + 20_000 * (r + 1) + j for j in range(k)]
            ctx = mitigation(model, [it.id]) if mitigation is not None else contextlib.nullcontext()
            with ctx:
                images = model.generate([it.prompt] * k, seeds, config)
            self._score([it], images, [0] * k, ["mitigation"] * k, similarity, text, aligner, pools)

    def _score(self, items, images, owners, names, similarity, text, aligner, pools) -> None:
        refs = torch.stack([items[o].image for o in owners])
        sims = similarity(images, refs).float().cpu().tolist()
        aligns: list[float | None] = [None] * len(owners)
        if aligner is not None:
            feats = aligner.image_features(images).float().cpu()
            rows = torch.stack([text[items[o].id] for o in owners])
            aligns = (feats * rows).sum(-1).tolist()
        for n, o in enumerate(owners):
            pools[items[o].id].append(_Candidate(images[n], float(sims[n]), aligns[n], names[n]))


def _text_features(aligner: TextImageAligner | None, items: Sequence[Item]) -> dict[str, torch.Tensor]:
    if aligner is None or not items:
        return {}
    feats = aligner.text_features([it.prompt for it in items]).float().cpu()
    return {it.id: feats[i] for i, it in enumerate(items)}


def surrogate_summary(surrogates: SurrogateSet, threshold: float) -> dict:
    """Per-item and overall copy similarity and alignment of a surrogate set (for logs and docs)."""
    items = {}
    for item_id, sims in surrogates.similarity.items():
        aligns = [a for a in surrogates.alignment.get(item_id, []) if a is not None]
        items[item_id] = {
            "n": len(sims),
            "max_similarity": max(sims) if sims else None,
            "mean_alignment": sum(aligns) / len(aligns) if aligns else None,
            "sources": surrogates.source.get(item_id, []),
        }
    all_sims = [s for v in surrogates.similarity.values() for s in v]
    return {
        "threshold": threshold,
        "n_items": len(surrogates.images),
        "failed": dict(surrogates.failed),
        "max_similarity": max(all_sims) if all_sims else None,
        "all_under_threshold": all(s < threshold for s in all_sims),
        "items": items,
    }
