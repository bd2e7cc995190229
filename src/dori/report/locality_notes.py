"""Per-figure notes and the verdict table of the locality analyses (Figures 3-5, 10-13), rendered from
``locality.json``: the measured numbers from ``results``, whether the paper's pattern holds from the verdict
record (``verdict``, computed by :func:`dori.analysis.locality_verdict.locality_verdict`). Nothing here decides
a verdict; it prints the one recorded.
"""

from __future__ import annotations

import statistics


def _yes(flag: bool) -> str:
    return "holds" if flag else "does NOT hold"


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _ratios(table: dict) -> list[float]:
    return [a / m for a, m in zip(table["adv"], table["mem"], strict=True) if m > 0]


def _checks(verdict: dict, figure: str) -> list[dict]:
    return [c for c in verdict["checks"] if c["figure"] == figure]


def check_text(c: dict) -> str:
    """``quantity = value op threshold (what the threshold is): holds`` for one recorded check."""
    return f"{c['quantity']} = {c['value']:.3g} {c['op']} {c['threshold']:.3g} ({c['threshold_is']}): {_yes(c['holds'])}"


def _pattern(verdict: dict, figure: str) -> str:
    checks = _checks(verdict, figure)
    if not checks:
        return "Not checked on this model."
    return f"Pattern {_yes(verdict['figures'][figure])} (" + "; ".join(check_text(c) for c in checks) + ")."


def _replication_text(part: dict) -> str:
    rep = part.get("replication", {})
    if "rate" not in rep:
        return "replication not checked"
    return f"{sum(rep['replicated'])}/{len(rep['replicated'])} triggers replicate (threshold {rep['threshold']:.2f})"


def note_tsne(dispersion: dict, kind: str, verdict: dict) -> str:
    """Fig. 3 (random init) / Fig. 10 (non-memorized init)."""
    part, s = dispersion[kind], dispersion[kind]["summary"]
    fig, init = ("fig3", "N(0, I)") if kind == "random" else ("fig10", "non-memorized prompt")
    search = part["search"]
    return (
        f"Fig. {fig[3:]} ({init} init, K = {search['k']}, {search['steps']} steps, one batched search of "
        f"{search['seconds']:.1f} s on {search['device']} with {search['torch_threads']} threads): "
        f"{_replication_text(part)}; median pairwise L2 distance of the triggers / of their inits = "
        f"{s['pairwise_adv']['median']:.3g} / {s['pairwise_init']['median']:.3g}. Paper: every trigger replicates "
        f"(SSCD > 0.7) and the triggers stay as scattered as their inits. " + _pattern(verdict, fig)
    )


def note_distances(dispersion: dict, verdict: dict) -> str:
    """Fig. 11: spread after vs before, distance travelled, reference distance between prompts."""
    r, n = dispersion["random"]["summary"], dispersion["nonmem"]["summary"]
    return (
        f"Fig. 11: median pairwise L2 within N(0, I) inits {r['pairwise_init']['median']:.3g} -> their triggers "
        f"{r['pairwise_adv']['median']:.3g}; within non-memorized prompt embeddings {n['pairwise_init']['median']:.3g}"
        f" -> their triggers {n['pairwise_adv']['median']:.3g}. Median distance travelled: from N(0, I) "
        f"{r['init_to_adv']['median']:.3g}, from prompts {n['init_to_adv']['median']:.3g}. Paper: triggers more "
        "spread out than their inits, prompt inits travel farther, triggers farther apart than different "
        "non-memorized prompts. " + _pattern(verdict, "fig11")
    )


def note_discrepancy(activations: dict, verdict: dict) -> str:
    """Fig. 4: Y_adv vs Y_mem in NeMo's and Wanda's layers."""
    parts = []
    for name, label in (("nemo", "NeMo value layers"), ("wanda", "Wanda FFN layers")):
        ratios = _ratios(activations[name])
        parts.append(
            f"{label}: Y_adv / Y_mem discrepancy per layer = {_fmt(ratios)}" if ratios else f"{label}: none"
        )
    return (
        f"Fig. 4 (|Y_adv| = {activations['n_adv']}, |Y_mem| = {activations['n_mem']}): "
        + "; ".join(parts)
        + ". "
        "Paper: Y_adv comparable to Y_mem (Wanda slightly lower). " + _pattern(verdict, "fig4")
    )


def note_discrepancy_all(activations: dict, verdict: dict) -> str:
    """Fig. 12: every layer type."""
    per_type = {ty: statistics.median(r) for ty, t in activations["layer_types"].items() if (r := _ratios(t))}
    text = "; ".join(f"{ty} {r:.2f}" for ty, r in per_type.items())
    return (
        f"Fig. 12: median Y_adv / Y_mem discrepancy ratio per layer type: {text}. Paper: high discrepancy for "
        "Y_adv in every layer type (Y_mem higher in layers that see image features, e.g. self-attention Q). "
        + _pattern(verdict, "fig12")
    )


def note_agreement(agreement: dict, verdict: dict) -> str:
    """Fig. 5: Wanda agreement below 0.6 in most layers; NeMo high but low in its main layer (shown)."""
    parts = []
    for name in ("nemo", "wanda"):
        t = agreement.get(name, {"skipped": "not run"})
        if "skipped" in t:
            parts.append(f"{name}: {t['skipped']}")
            continue
        text = (
            f"{name}: agreement Y_adv per layer = {_fmt(t['adv'])}, Y_mem = {_fmt(t['mem'])} "
            f"(|Y_adv| = {t['n_adv']}, |Y_mem| = {t['n_mem']})"
        )
        if name == "nemo":
            empty = [i + 1 for i, c in enumerate(t["count_adv"]) if not any(c)]
            main = max(range(len(t["adv"])), key=lambda i: sum(t["count_adv"][i]))
            text += (
                f"; layers with no selection (IoU 1 by definition): {empty or 'none'}; in its busiest layer "
                f"{main + 1} agreement {t['adv'][main]:.2f} (paper: ~0.6 in layer 1; not checked)"
            )
        parts.append(text)
    return (
        "Fig. 5: "
        + "; ".join(parts)
        + ". Paper: Wanda < 0.6 in most layers; NeMo > 0.8 except layer 1 (~0.6), "
        "high only where it selects nothing; Y_adv comparable to Y_mem. " + _pattern(verdict, "fig5")
    )


def note_weights(agreement: dict, verdict: dict) -> str:
    """Fig. 13: where NeMo and Wanda find memorization weights."""
    parts = []
    for name in ("nemo", "wanda"):
        t = agreement.get(name, {"skipped": "not run"})
        if "skipped" in t:
            parts.append(f"{name}: {t['skipped']}")
            continue
        means = [statistics.fmean(c) if c else 0.0 for c in t["count_all_mem"]]
        none = [i + 1 for i, c in enumerate(t["count_all_mem"]) if not any(c)]
        parts.append(
            f"{name}: mean {t['unit']} per layer = {_fmt(means)}; layers never selected: {none or 'none'}"
        )
    return (
        "Fig. 13: "
        + "; ".join(parts)
        + ". Paper: NeMo selects nothing in layers 2, 6 and 7 (SD v1.4's layers; "
        "not checked); Wanda selects more in deeper layers (5-7), where its agreement drops. "
        + _pattern(verdict, "fig13")
    )


def locality_notes(results: dict, verdict: dict) -> dict[str, str]:
    """``{figure: note}`` for every figure whose results are present."""
    notes = {}
    if "dispersion" in results:
        d = results["dispersion"]
        notes.update(
            fig3=note_tsne(d, "random", verdict), fig10=note_tsne(d, "nonmem", verdict),
            fig11=note_distances(d, verdict),
        )  # fmt: skip
    if "activations" in results:
        a = results["activations"]
        notes.update(fig4=note_discrepancy(a, verdict), fig12=note_discrepancy_all(a, verdict))
    if "agreement" in results:
        g = results["agreement"]
        notes.update(fig5=note_agreement(g, verdict), fig13=note_weights(g, verdict))
    return notes


def verdict_markdown(verdict: dict) -> str:
    """The verdict record as a Markdown table (one row per check) and the overall line."""
    o = verdict["overall"]
    lines = [
        f"Overall: **{o['verdict']}**, {o['holding']} of {o['checks']} checks hold.",
        "",
        "| figure | paper's pattern | measured quantity | value | criterion | holds |",
        "|---|---|---|---|---|---|",
    ]
    for c in verdict["checks"]:
        lines.append(
            f"| {c['figure']} | {c['claim']} | {c['quantity']} | {c['value']:.3g} | {c['op']} {c['threshold']:.3g} "
            f"({c['threshold_is']}) | {'yes' if c['holds'] else 'no'} |"
        )
    return "\n".join(lines)


def locality_markdown(data: dict, command: str, titles: dict[str, str], wall_s: float | None = None) -> str:
    """``LOCALITY.md`` of a run from its ``locality.json`` content: the command, the timings, the verdict
    table, then per figure (``titles``: figure -> heading, in page order) the PNG and its note."""
    cfg, res = data["config"], data["results"]
    lines = [
        f"# Locality on {cfg['model']}: item {cfg['item']} of `{cfg['set']}`",
        "",
        f"Command: `{command}`, K = {cfg['k']}, {cfg['steps']} Dori steps, seed {cfg['seed']}, "
        f"git {data['provenance'].get('git', '?')[:10]}.",
    ]
    if wall_s is not None:
        lines.append(f"Wall time of this invocation: {wall_s:.0f} s (a rerun skips finished units).")
    for kind in ("random", "nonmem"):
        if "dispersion" in res:
            s = res["dispersion"][kind]["search"]
            lines.append(
                f"- Batched Dori search from {kind} inits: {s['k']} runs x {s['steps']} steps in {s['seconds']:.1f} s "
                f"on {s['device']} ({s['torch_threads']} threads)."
            )
    if "seconds" in res.get("activations", {}):
        a = res["activations"]
        lines.append(
            f"- Activation discrepancy of {a['n_adv']} + {a['n_mem']} embeddings: {a['seconds']:.1f} s."
        )
    for name, table in res.get("agreement", {}).items():
        if isinstance(table, dict) and "seconds" in table:
            lines.append(
                f"- {name} selections for {table['n_adv']} triggers and Fig. 13: {table['seconds']:.1f} s."
            )
    lines += ["", "## Verdict", "", "Computed from the numbers below (`verdict` in `locality.json`).", ""]
    lines.append(verdict_markdown(data["verdict"]))
    for fig, title in titles.items():
        if fig in data["figures"]:
            lines += ["", f"## {title}", "", f"![{fig}]({data['figures'][fig]})", "", data["notes"][fig]]
    return "\n".join(lines) + "\n"
