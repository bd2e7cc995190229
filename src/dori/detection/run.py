"""``dori detect`` as a library function: per-prompt scores of each detector on each set, written one file per
prompt into a :class:`dori.runs.RunDir` (so a killed run resumes and a list of prompts can be split across
workers), then AUC / TPR@FPR / ROC of every (positive set, negative set) pair.

Result keys: ``detect.<detector>.<set>.<item id>``. A prompt's score depends only on the prompt, its position
in its set and the detector's settings, never on the batch it was computed in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from dori import distributed
from dori.data.sets import Item
from dori.detection.base import Detector
from dori.detection.metrics import summarize
from dori.errors import DoriError
from dori.models.pipeline import T2IModel
from dori.runs import RunDir

PUBLISHED = {
    "wen": {
        "model": "CompVis/stable-diffusion-v1-4",
        "pair": "500 memorized vs 2,000 non-memorized prompts",
        "auc": 0.960,
        "tpr@1%fpr": 0.760,
        "source": "Wen et al., ICLR 2024 (first step, one generation)",
    }
}


def result_key(detector: str, set_name: str, item_id: str) -> str:
    return f"detect.{detector}.{set_name}.{item_id}"


def score_items(
    model: T2IModel,
    detector: Detector,
    set_name: str,
    items: Sequence[Item],
    positions: Sequence[int],
    run: RunDir,
    prompts_per_call: int = 16,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Score the items not yet in ``run`` and write one result per item. Under ``torchrun`` each rank scores
    its share of the pending items (:func:`dori.distributed.my_share`); all ranks return once every item is
    written.

    Args:
        positions: each item's position in its full set (fixes its random draws).
        prompts_per_call: prompts handed to the detector at once (it batches its UNet calls within).
        progress: called with the number of items finished in this call.
    """
    todo = [j for j, it in enumerate(items) if not run.has(result_key(detector.name, set_name, it.id))]
    todo = distributed.my_share(todo)
    for lo in range(0, len(todo), prompts_per_call):
        group = todo[lo : lo + prompts_per_call]
        scored = detector.score(model, [items[j].prompt for j in group], [positions[j] for j in group])
        for j, rec in zip(group, scored, strict=True):
            it = items[j]
            run.put(
                result_key(detector.name, set_name, it.id),
                {
                    "item": it.id,
                    "set": set_name,
                    "kind": it.kind,
                    "index": positions[j],
                    "prompt": it.prompt,
                    **rec,
                },
            )
        if progress is not None:
            progress(len(group))
    distributed.sync()


def run_detection(
    model: T2IModel,
    sets: dict[str, Sequence[Item]],
    positives: Sequence[str],
    negatives: Sequence[str],
    detectors: Sequence[Detector],
    run: RunDir,
    targets: Sequence[float] = (0.01, 0.03),
    prompts_per_call: int = 16,
    progress: bool = True,
) -> dict:
    """Run (or resume) every detector on every set and summarize each (positive, negative) pair.

    Args:
        sets: set name -> items (after any limit; an item's position in this list fixes its seeds).
        positives / negatives: names in ``sets``; every positive set is paired with every negative set.

    Returns:
        ``{"detectors", "sets", "scores", "pairs", "published", "timing"}``: settings, set sizes, per-prompt
        records (detector -> set -> list), one summary per detector and pair (AUC, TPR@FPR, ROC curve), and
        the seconds each detector spent in this call (model loading excluded; resumed prompts not counted).
    """
    for name in [*positives, *negatives]:
        if name not in sets or not sets[name]:
            raise DoriError(f"set {name!r} has no items")
    total = sum(len(sets[s]) for s in sets) * len(detectors)
    scores: dict[str, dict[str, list[dict]]] = {}
    timing: dict[str, dict] = {}
    with tqdm(total=total, desc="detect", disable=not progress, file=sys.stderr) as bar:
        for det in detectors:
            scores[det.name] = {}
            start, scored = time.perf_counter(), 0
            for set_name, items in sets.items():
                done = sum(run.has(result_key(det.name, set_name, it.id)) for it in items)
                bar.update(done)
                scored += len(items) - done
                score_items(model, det, set_name, items, range(len(items)), run, prompts_per_call, bar.update)
                scores[det.name][set_name] = [run.get(result_key(det.name, set_name, it.id)) for it in items]
            _sync(model)
            timing[det.name] = {"seconds": time.perf_counter() - start, "prompts_scored": scored}
    pairs = []
    for det in detectors:
        for pos in positives:
            for neg in negatives:
                p = [r["score"] for r in scores[det.name][pos]]
                n = [r["score"] for r in scores[det.name][neg]]
                pairs.append(
                    {"detector": det.name, "positive": pos, "negative": neg, **summarize(p, n, targets)}
                )
    return {
        "detectors": {det.name: det.settings() for det in detectors},
        "sets": {
            name: {"n": len(items), "role": _role(name, positives, negatives)} for name, items in sets.items()
        },
        "scores": scores,
        "pairs": pairs,
        "published": PUBLISHED,
        "timing": timing,
    }


def _sync(model: T2IModel) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _role(name: str, positives: Sequence[str], negatives: Sequence[str]) -> str:
    if name in positives:
        return "memorized"
    return "not memorized" if name in negatives else "reported"


def format_pairs(pairs: Sequence[dict]) -> str:
    """A plain-text table of the pair summaries."""
    lines = [f"{'detector':<11} {'memorized':<10} {'negatives':<10} {'AUC':>6} {'TPR@1%':>7} {'TPR@3%':>7}"]
    for p in pairs:
        lines.append(
            f"{p['detector']:<11} {p['positive']:<10} {p['negative']:<10} {p['auc']:>6.3f} "
            f"{p['tpr@1%fpr']:>7.3f} {p['tpr@3%fpr']:>7.3f}"
        )
    return "\n".join(lines)
