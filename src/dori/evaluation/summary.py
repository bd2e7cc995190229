"""One table row (the audit schema) from the per-item records of one setting: median ± MAD across items."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dori.errors import DoriError
from dori.evaluation.protocol import Setting
from dori.metrics import functions as M


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
