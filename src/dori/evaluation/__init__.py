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

Modules: :mod:`~dori.evaluation.protocol` (the settings, seeds, artifact names and the image/feature helpers
every part shares), :mod:`~dori.evaluation.items` (generate and score the items of one setting),
:mod:`~dori.evaluation.summary` (per-item records -> one table row), :mod:`~dori.evaluation.utility`
(FID/KID of a model state). Import from ``dori.evaluation``: the names below are its public API.
"""

from dori.evaluation.items import evaluate_items, score_item
from dori.evaluation.protocol import (
    DORI_SEED_OFFSET,
    SEED_STRIDE,
    UTILITY_CHUNK,
    UTILITY_SEED_BASE,
    EvalConfig,
    MitigationContext,
    Setting,
    dori_seed,
    embed,
    generation_artifact,
    generation_seeds,
    item_key,
    require_finite,
    to_uint8,
    train_artifact,
)
from dori.evaluation.summary import summarize
from dori.evaluation.utility import utility_scores

__all__ = [
    "DORI_SEED_OFFSET",
    "SEED_STRIDE",
    "UTILITY_CHUNK",
    "UTILITY_SEED_BASE",
    "EvalConfig",
    "MitigationContext",
    "Setting",
    "dori_seed",
    "embed",
    "evaluate_items",
    "generation_artifact",
    "generation_seeds",
    "item_key",
    "require_finite",
    "score_item",
    "summarize",
    "to_uint8",
    "train_artifact",
    "utility_scores",
]
