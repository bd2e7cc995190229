"""Per-figure notes comparing measured locality results with Finding Dori's (Figures 3-5, 10-13).

Each note is written from the numbers in the results JSON and says whether the paper's pattern holds.
The tests of "holds" are stated in each note; where the paper says "comparable" we call a ratio
Y_adv / Y_mem of at least :data:`COMPARABLE` comparable (Y_adv not much less discrepant than Y_mem; a
ratio above 1, triggers of one image more discrepant than different images, refutes locality as well).
"""

from __future__ import annotations

import statistics

COMPARABLE = 0.5
"""Y_adv / Y_mem ratio from which a discrepancy counts as comparable (the paper gives no number)."""


def _yes(flag: bool) -> str:
    return "holds" if flag else "does NOT hold"


def _replication_text(part: dict) -> str:
    rep = part.get("replication", {})
    if "rate" not in rep:
        return "replication not checked"
    n = len(rep["replicated"])
    return f"{sum(rep['replicated'])}/{n} triggers replicate (threshold {rep['threshold']:.2f})"


def note_tsne(dispersion: dict, kind: str) -> str:
    """Fig. 3 (random init) / Fig. 10 (non-memorized init)."""
    part = dispersion[kind]
    s = part["summary"]
    ratio = s["pairwise_adv"]["median"] / max(s["pairwise_init"]["median"], 1e-12)
    fig, init = (3, "N(0, I)") if kind == "random" else (10, "non-memorized prompt")
    rep = part.get("replication", {})
    checked = "rate" in rep
    holds = ratio >= 0.9 and (not checked or rep["rate"] >= 0.9)
    return (
        f"Fig. {fig} ({init} init, K = {part['search']['k']}, {part['search']['steps']} steps, one batched search "
        f"of {part['search']['seconds']:.1f} s on {part['search']['device']} with {part['search']['torch_threads']} "
        f"threads): {_replication_text(part)}; median pairwise L2 distance of the triggers / of their inits = "
        f"{s['pairwise_adv']['median']:.3g} / {s['pairwise_init']['median']:.3g} = {ratio:.2f}. Paper: every "
        f"trigger replicates (SSCD > 0.7) and the triggers stay as scattered as their inits. Pattern "
        f"{_yes(holds)} (test: >= 90% replicate and ratio >= 0.9"
        f"{'' if checked else '; replication not checked, so only the spread is tested'})."
    )


def note_distances(dispersion: dict) -> str:
    """Fig. 11: spread after vs before, distance travelled, reference distance between prompts."""
    r, n = dispersion["random"]["summary"], dispersion["nonmem"]["summary"]
    ref = dispersion["reference_nonmem_pairwise"]["median"]
    spread_r = r["pairwise_adv"]["median"] > r["pairwise_init"]["median"]
    spread_n = n["pairwise_adv"]["median"] > n["pairwise_init"]["median"]
    farther = n["init_to_adv"]["median"] > r["init_to_adv"]["median"]
    above_ref = r["pairwise_adv"]["median"] > ref
    return (
        f"Fig. 11: median pairwise L2 within N(0, I) inits {r['pairwise_init']['median']:.3g} -> their triggers "
        f"{r['pairwise_adv']['median']:.3g}; within non-memorized prompt embeddings {n['pairwise_init']['median']:.3g} "
        f"-> their triggers {n['pairwise_adv']['median']:.3g}. Median distance travelled: from N(0, I) "
        f"{r['init_to_adv']['median']:.3g}, from prompts {n['init_to_adv']['median']:.3g}. Paper: triggers more "
        f"spread out than their inits (here: {_yes(spread_r)} for N(0, I), {_yes(spread_n)} for prompts); "
        f"prompt inits travel farther than N(0, I) inits ({_yes(farther)}); triggers farther apart than "
        f"different non-memorized prompts (reference {ref:.3g}: {_yes(above_ref)})."
    )


def _ratios(table: dict) -> list[float]:
    """Y_adv / Y_mem per layer; layers where Y_mem is 0 (e.g. before any text enters) are left out."""
    return [a / m for a, m in zip(table["adv"], table["mem"], strict=True) if m > 0]


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def note_discrepancy(activations: dict) -> str:
    """Fig. 4: Y_adv vs Y_mem in NeMo's and Wanda's layers."""
    parts = []
    verdicts = []
    for name, label in (("nemo", "NeMo value layers"), ("wanda", "Wanda FFN layers")):
        ratios = _ratios(activations[name])
        if not ratios:
            parts.append(f"{label}: none in this model")
            continue
        comparable = sum(r >= COMPARABLE for r in ratios)
        verdicts.append(comparable > len(ratios) / 2)
        parts.append(
            f"{label}: Y_adv / Y_mem discrepancy per layer = {_fmt(ratios)} (comparable in {comparable}/{len(ratios)})"
        )
    return (
        f"Fig. 4 (|Y_adv| = {activations['n_adv']}, |Y_mem| = {activations['n_mem']}): "
        + "; ".join(parts)
        + ". "
        f"Paper: Y_adv comparable to Y_mem (Wanda slightly lower). Pattern {_yes(bool(verdicts) and all(verdicts))} "
        f"(test: ratio >= {COMPARABLE} in most layers of both)."
    )


def note_discrepancy_all(activations: dict) -> str:
    """Fig. 12: every layer type."""
    ratios = {ty: _ratios(t) for ty, t in activations["layer_types"].items()}
    per_type = {ty: statistics.median(r) for ty, r in ratios.items() if r}
    comparable = [ty for ty, r in per_type.items() if r >= COMPARABLE]
    text = "; ".join(f"{ty} {r:.2f}" for ty, r in per_type.items())
    return (
        f"Fig. 12: median Y_adv / Y_mem discrepancy ratio per layer type: {text}. Paper: high discrepancy for "
        f"Y_adv in every layer type (Y_mem higher in layers that see image features, e.g. self-attention Q). "
        f"Comparable (ratio >= {COMPARABLE}) in {len(comparable)}/{len(per_type)} layer types: pattern "
        f"{_yes(len(comparable) > len(per_type) / 2)}."
    )


def note_agreement(agreement: dict) -> str:
    """Fig. 5: Wanda agreement below 0.6 in most layers; NeMo high but low in its main layer."""
    parts = []
    for name in ("nemo", "wanda"):
        t = agreement.get(name, {"skipped": "not run"})
        if "skipped" in t:
            parts.append(f"{name}: {t['skipped']}")
            continue
        below = sum(a < 0.6 for a in t["adv"])
        empty = [i + 1 for i, c in enumerate(t["count_adv"]) if not any(c)]
        if name == "wanda":
            verdict = f"Wanda below 0.6 in most layers: {_yes(below > len(t['adv']) / 2)}"
        else:
            main = max(range(len(t["adv"])), key=lambda i: sum(t["count_adv"][i]))
            verdict = (
                f"NeMo layers with no selection (IoU 1 by definition): {empty or 'none'}; in its busiest layer "
                f"{main + 1} agreement {t['adv'][main]:.2f} (paper: ~0.6 in layer 1)"
            )
        parts.append(
            f"{name}: agreement Y_adv per layer = {_fmt(t['adv'])}, Y_mem = {_fmt(t['mem'])} "
            f"(|Y_adv| = {t['n_adv']}, |Y_mem| = {t['n_mem']}); {verdict}"
        )
    return (
        "Fig. 5: "
        + "; ".join(parts)
        + ". Paper: Wanda < 0.6 in most layers; NeMo > 0.8 except layer 1 (~0.6), "
        "high only where it selects nothing; Y_adv comparable to Y_mem."
    )


def note_weights(agreement: dict) -> str:
    """Fig. 13: where NeMo and Wanda find memorization weights."""
    parts = []
    for name in ("nemo", "wanda"):
        t = agreement.get(name, {"skipped": "not run"})
        if "skipped" in t:
            parts.append(f"{name}: {t['skipped']}")
            continue
        means = [statistics.fmean(c) if c else 0.0 for c in t["count_all_mem"]]
        none = [i + 1 for i, c in enumerate(t["count_all_mem"]) if not any(c)]
        third = max(1, len(means) // 3)
        deeper = statistics.fmean(means[-third:]) > statistics.fmean(means[:third])
        parts.append(
            f"{name}: mean {t['unit']} per layer = {_fmt(means)}; layers never selected: {none or 'none'}; "
            f"deeper layers select more: {'yes' if deeper else 'no'}"
        )
    return (
        "Fig. 13: " + "; ".join(parts) + ". Paper: NeMo selects nothing in layers 2, 6 and 7; Wanda selects "
        "more in deeper layers (5-7), where its agreement drops."
    )


def locality_notes(results: dict) -> dict[str, str]:
    """``{figure: note}`` for every figure whose results are present."""
    notes = {}
    if "dispersion" in results:
        d = results["dispersion"]
        notes.update(fig3=note_tsne(d, "random"), fig10=note_tsne(d, "nonmem"), fig11=note_distances(d))
    if "activations" in results:
        a = results["activations"]
        notes.update(fig4=note_discrepancy(a), fig12=note_discrepancy_all(a))
    if "agreement" in results:
        g = results["agreement"]
        notes.update(fig5=note_agreement(g), fig13=note_weights(g))
    return notes
