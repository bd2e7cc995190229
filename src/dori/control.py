"""A Dori audit's false-positive rate: the control set and the step budget it calibrates.

Dori can make a model reproduce images it never memorized if it searches long enough (the embedding then
travels far; Finding Dori, Fig. 7). A Dori MR therefore means "memorized" only beside a **control**: the same
search, at the same step snapshots, on items the model did not memorize (a world's ``heldout`` set; the paper's
non-memorized prompts with their images on SD v1.4). Its replication rate is the audit's false-positive rate.

:func:`calibrated_budget` picks the largest step budget at which the control rate *stays* at or under a level
(default 5%): every evaluated budget up to it is under the level, so a budget past a first exceedance is never
chosen even if the control rate dips again later. :func:`control_report` lays the memorized set's MR and the
control rate side by side per budget and reads the MR at the calibrated budget. Both are pure functions of
the audit rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dori.errors import DoriError

DEFAULT_LEVEL = 0.05


def calibrated_budget(control: Mapping[int, float], level: float = DEFAULT_LEVEL) -> int | None:
    """The largest step budget whose control rate, and that of every smaller evaluated budget, is <= ``level``.

    Args:
        control: step budget (0 = the prompt itself, no search) -> control replication rate in [0, 1].
        level: the tolerated false-positive rate.

    Returns:
        The budget, or None when already the smallest evaluated budget exceeds the level.
    """
    if not control:
        raise DoriError("calibrated_budget needs at least one (budget, control rate)")
    if not 0.0 <= level <= 1.0:
        raise DoriError(f"the control level must be in [0, 1], got {level}")
    best = None
    for steps in sorted(control):
        if control[steps] > level + 1e-12:
            break
        best = steps
    return best


def control_report(
    memorized_rows: Sequence[dict], control_rows: Sequence[dict], level: float = DEFAULT_LEVEL
) -> dict:
    """MR and control rate per step budget, and the calibrated budget.

    Args:
        memorized_rows / control_rows: audit rows of the memorized and the control set (dicts with ``mr``,
            ``dori_steps`` for Dori rows, ``attack``, ``set``; optional ``dori_norm_ratio``). The last row
            without an attack (the mitigated model, if any) counts as budget 0; other attacks and per-kind rows
            are left out.
        level: the tolerated control rate.

    Returns:
        ``{"level", "curve": [{"steps", "mr", "control_rate", "norm_ratio", "control_norm_ratio"}], "budget",
        "mr_at_budget", "control_rate_at_budget"}`` (budget None: no budget keeps the control under the level).
    """

    def by_budget(rows: Sequence[dict]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        main = rows[0].get("set") if rows else None
        for r in rows:
            if r.get("set") != main:  # per-kind rows of a mixed set ("memorized/vm")
                continue
            if r.get("attack", "none") == "none":
                out[0] = r  # the last one: the mitigated model when there is a mitigation
            elif r.get("attack") == "dori" and r.get("dori_steps"):
                out[int(r["dori_steps"])] = r
        return out

    mem, ctl = by_budget(memorized_rows), by_budget(control_rows)
    common = sorted(set(mem) & set(ctl))
    if not common:
        raise DoriError("the memorized and the control audit share no step budget")
    curve = []
    for s in common:
        curve.append(
            {
                "steps": s,
                "mr": mem[s]["mr"],
                "control_rate": ctl[s]["mr"],
                "norm_ratio": _median(mem[s].get("dori_norm_ratio")),
                "control_norm_ratio": _median(ctl[s].get("dori_norm_ratio")),
            }
        )
    budget = calibrated_budget({c["steps"]: c["control_rate"] for c in curve}, level)
    at = next((c for c in curve if c["steps"] == budget), None)
    return {
        "level": level,
        "curve": curve,
        "budget": budget,
        "mr_at_budget": at["mr"] if at else None,
        "control_rate_at_budget": at["control_rate"] if at else None,
    }


def _median(stat) -> float | None:
    if stat is None:
        return None
    return float(stat["median"]) if isinstance(stat, dict) else float(stat)


def format_control(report: dict) -> str:
    """Plain-text table of :func:`control_report`."""
    lines = [f"{'Dori steps':>10} {'MR':>6} {'control':>8} {'norm':>6} {'ctl norm':>8}"]
    for c in report["curve"]:
        nr = "" if c["norm_ratio"] is None else f"{c['norm_ratio']:.2f}"
        cr = "" if c["control_norm_ratio"] is None else f"{c['control_norm_ratio']:.2f}"
        lines.append(f"{c['steps']:>10} {c['mr']:>6.3f} {c['control_rate']:>8.3f} {nr:>6} {cr:>8}")
    if report["budget"] is None:
        lines.append(f"no step budget keeps the control rate <= {report['level']:.0%}")
    else:
        lines.append(
            f"calibrated budget: {report['budget']} Dori steps (control {report['control_rate_at_budget']:.3f} "
            f"<= {report['level']:.0%}); MR there {report['mr_at_budget']:.3f}"
        )
    return "\n".join(lines)
