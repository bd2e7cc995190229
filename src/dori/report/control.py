"""The control section of an audit report: the control set's replication rate beside the MR per Dori step
budget, and the calibrated budget (:mod:`dori.control`). Reads ``audit.json``'s ``control`` entry only."""

from __future__ import annotations

import html

from dori.report.page import _figure_uri, _img


def control_plot_uri(curve: list[dict], level: float, budget: int | None) -> str:
    """MR (memorized set) and control rate against the step budget, with the level and the budget marked."""

    def draw(ax):
        xs = [c["steps"] for c in curve]
        ax.plot(xs, [c["mr"] for c in curve], "o-", color="#b00", label="MR (memorized)")
        ax.plot(xs, [c["control_rate"] for c in curve], "s--", color="#06c", label="control rate")
        ax.axhline(level, color="#888", lw=0.8, ls=":", label=f"level {level:.0%}")
        if budget is not None:
            ax.axvline(budget, color="#080", lw=1.0, label=f"budget {budget}")
        ax.set_xticks(xs)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("Dori steps (0: the prompt)")
        ax.legend(fontsize=7)

    return _figure_uri(draw)


def control_section_html(control: dict) -> str:
    """Table, plot and calibrated budget of one audit's control entry."""
    level, budget = control["level"], control["budget"]
    head = "<tr><th>Dori steps</th><th>MR</th><th>control rate</th><th>norm ratio</th><th>control norm ratio</th></tr>"

    def fmt(v):
        return "" if v is None else f"{v:.3f}"

    rows = "".join(
        f"<tr><td>{c['steps']}</td><td>{fmt(c['mr'])}</td><td>{fmt(c['control_rate'])}</td>"
        f"<td>{fmt(c['norm_ratio'])}</td><td>{fmt(c['control_norm_ratio'])}</td></tr>"
        for c in control["curve"]
    )
    if budget is None:
        verdict = f"No evaluated step budget keeps the control rate at or under {level:.0%}."
    else:
        verdict = (
            f"Calibrated budget: <b>{budget}</b> Dori steps (control rate {control['control_rate_at_budget']:.3f} "
            f"&le; {level:.0%} at every budget up to it); MR at that budget: <b>{control['mr_at_budget']:.3f}</b>."
        )
    n = control.get("n_items")
    return (
        f"<h2>Control: Dori on {html.escape(str(control['set']))} (not memorized"
        f"{'' if n is None else f', {n} items'})</h2><p>{verdict}</p>"
        f'<table class="results">{head}{rows}</table>'
        + _img(control_plot_uri(control["curve"], level, budget), "MR and control rate against Dori steps")
    )
