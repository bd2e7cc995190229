"""Does the paper's locality pattern hold here? A verdict computed from the numbers of the locality analyses.

Each of Finding Dori's findings (Figures 3-5, 10-13) becomes one or more checks: a measured quantity, the
criterion it must meet (a comparison with a fixed threshold or with another measured quantity) and the
boolean outcome. A figure's pattern holds when all its checks hold; the overall verdict counts the checks
that hold. The record (:func:`locality_verdict`) is stored in ``locality.json`` under ``"verdict"``; the
notes, the HTML page and ``docs/locality/LOCALITY.md`` render it and never decide anything themselves.

Thresholds where the paper gives words, not numbers (our reading, stated in every check):

* "every trigger replicates": at least :data:`REPLICATE` of them;
* "as scattered as their inits": median pairwise L2 of the triggers / of their inits at least :data:`SPREAD`;
* "comparable" discrepancy: Y_adv / Y_mem at least :data:`COMPARABLE` (Y_adv not much less discrepant;
  a ratio above 1 refutes locality as well), in more than half (:data:`MOST`) of the layers;
* Wanda's agreement "below 0.6 in most layers": below :data:`WANDA_AGREEMENT` in more than half of them.
"""

from __future__ import annotations

import operator
import statistics
from dataclasses import asdict, dataclass

COMPARABLE = 0.5
"""Y_adv / Y_mem ratio from which a discrepancy counts as comparable (the paper gives no number)."""
REPLICATE = 0.9
"""Share of the triggers that must replicate (paper: every one)."""
SPREAD = 0.9
"""Median pairwise L2 of the triggers / of their inits that counts as "as scattered"."""
WANDA_AGREEMENT = 0.6
"""Fig. 5: Wanda's agreement is below this in most layers."""
MOST = 0.5
""""Most" layers: a share above this."""

OPS = {">=": operator.ge, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class Check:
    """One measured quantity against its criterion.

    Attributes:
        figure: the paper's figure (``fig3`` .. ``fig13``).
        claim: the paper's pattern this check tests, in words.
        quantity: what ``value`` measures.
        value: the measured number.
        op: ``>=``, ``>`` or ``<``: holds when ``value op threshold``.
        threshold: the number it is compared with (fixed, or another measured quantity).
        threshold_is: what ``threshold`` is.
        holds: ``value op threshold``.
    """

    figure: str
    claim: str
    quantity: str
    value: float
    op: str
    threshold: float
    threshold_is: str
    holds: bool


def check(figure: str, claim: str, quantity: str, value: float, op: str, threshold: float, threshold_is: str):
    """A :class:`Check` with its outcome computed."""
    value, threshold = float(value), float(threshold)
    return Check(figure, claim, quantity, value, op, threshold, threshold_is, bool(OPS[op](value, threshold)))


def _ratios(table: dict) -> list[float]:
    """Y_adv / Y_mem per layer; layers where Y_mem is 0 (e.g. before any text enters) are left out."""
    return [a / m for a, m in zip(table["adv"], table["mem"], strict=True) if m > 0]


def dispersion_checks(dispersion: dict) -> list[Check]:
    """Fig. 3 / 10 (triggers replicate and stay scattered) and Fig. 11 (distances)."""
    out = []
    for kind, fig, init in (("random", "fig3", "N(0, I)"), ("nonmem", "fig10", "non-memorized prompt")):
        part = dispersion[kind]
        rep = part.get("replication", {})
        if "rate" in rep:
            out.append(
                check(fig, "every trigger replicates", f"share of the triggers from {init} inits that replicate "
                      f"(threshold {rep['threshold']:.2f})", rep["rate"], ">=", REPLICATE, "dori's reading of 'every'")
            )  # fmt: skip
        s = part["summary"]
        ratio = s["pairwise_adv"]["median"] / max(s["pairwise_init"]["median"], 1e-12)
        out.append(
            check(fig, "the triggers stay as scattered as their inits", f"median pairwise L2 of the triggers / of "
                  f"their {init} inits", ratio, ">=", SPREAD, "dori's reading of 'as scattered'")
        )  # fmt: skip
    r, n = dispersion["random"]["summary"], dispersion["nonmem"]["summary"]
    ref = dispersion["reference_nonmem_pairwise"]["median"]
    for s, init in ((r, "N(0, I)"), (n, "non-memorized prompt")):
        out.append(
            check("fig11", "triggers are more spread out than their inits", f"median pairwise L2 of the triggers "
                  f"from {init} inits", s["pairwise_adv"]["median"], ">", s["pairwise_init"]["median"],
                  "the same of their inits")
        )  # fmt: skip
    out.append(
        check("fig11", "prompt inits travel farther than N(0, I) inits", "median L2 from a non-memorized prompt "
              "init to its trigger", n["init_to_adv"]["median"], ">", r["init_to_adv"]["median"],
              "the same from N(0, I) inits")
    )  # fmt: skip
    out.append(
        check("fig11", "triggers are farther apart than different non-memorized prompts", "median pairwise L2 of "
              "the triggers from N(0, I) inits", r["pairwise_adv"]["median"], ">", ref,
              "median pairwise L2 of non-memorized prompt embeddings")
    )  # fmt: skip
    return out


def discrepancy_checks(activations: dict) -> list[Check]:
    """Fig. 4 (NeMo's and Wanda's layers) and Fig. 12 (every layer type): Y_adv comparable to Y_mem."""
    out = []
    for name, label in (("nemo", "NeMo value layers"), ("wanda", "Wanda FFN layers")):
        ratios = _ratios(activations[name])
        if ratios:  # a model without such layers has nothing to check
            share = sum(r >= COMPARABLE for r in ratios) / len(ratios)
            out.append(
                check("fig4", "Y_adv's discrepancy is comparable to Y_mem's", f"share of the {label} with "
                      f"Y_adv / Y_mem >= {COMPARABLE}", share, ">", MOST, "'most' layers")
            )  # fmt: skip
    per_type = [statistics.median(r) for t in activations["layer_types"].values() if (r := _ratios(t))]
    if per_type:
        share = sum(r >= COMPARABLE for r in per_type) / len(per_type)
        out.append(
            check("fig12", "Y_adv's discrepancy is high in every layer type", f"share of the layer types whose "
                  f"median Y_adv / Y_mem >= {COMPARABLE}", share, ">", MOST, "'most' layer types")
        )  # fmt: skip
    return out


def agreement_checks(agreement: dict) -> list[Check]:
    """Fig. 5 (Wanda's agreement is low) and Fig. 13 (Wanda selects more in deeper layers). NeMo's patterns
    there name SD v1.4's layers (layer 1, layers 2, 6, 7), so on other models they are shown, not checked."""
    t = agreement.get("wanda", {"skipped": "not run"})
    if "skipped" in t or not t["adv"]:
        return []
    share = sum(a < WANDA_AGREEMENT for a in t["adv"]) / len(t["adv"])
    means = [statistics.fmean(c) if c else 0.0 for c in t["count_all_mem"]]
    third = max(1, len(means) // 3)
    return [
        check("fig5", "Wanda's agreement is below 0.6 in most layers", f"share of Wanda's layers with agreement "
              f"of Y_adv < {WANDA_AGREEMENT}", share, ">", MOST, "'most' layers"),
        check("fig13", "Wanda selects more weights in deeper layers", "mean weights selected per memorized prompt "
              "in the deepest third of the layers", statistics.fmean(means[-third:]), ">",
              statistics.fmean(means[:third]), "the same in the first third"),
    ]  # fmt: skip


def locality_verdict(results: dict) -> dict:
    """The verdict record of the analyses present in ``results`` (what :func:`run_locality` returns).

    Returns:
        ``{"checks": [Check as dict, ...], "figures": {figure: all its checks hold}, "overall": {"checks": n,
        "holding": m, "verdict": "reproduced" | "partly reproduced" | "not reproduced" | "nothing checked"}}``.
    """
    checks: list[Check] = []
    if "dispersion" in results:
        checks += dispersion_checks(results["dispersion"])
    if "activations" in results:
        checks += discrepancy_checks(results["activations"])
    if "agreement" in results:
        checks += agreement_checks(results["agreement"])
    figures: dict[str, bool] = {}
    for c in checks:
        figures[c.figure] = figures.get(c.figure, True) and c.holds
    holding = sum(c.holds for c in checks)
    if not checks:
        verdict = "nothing checked"
    else:
        verdict = (
            "reproduced" if holding == len(checks) else "partly reproduced" if holding else "not reproduced"
        )
    return {
        "checks": [asdict(c) for c in checks],
        "figures": figures,
        "overall": {"checks": len(checks), "holding": holding, "verdict": verdict},
    }
