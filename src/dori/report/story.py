"""The opening sentences of the demo report, drawn from one run's numbers (never a fixed text).

:func:`story_sentences` reads the rows of Table 1 and of the adversarially fine-tuned model (each a dict with
``mr`` and ``n_items``, utility rows with ``a_clip`` / ``fid``) and says, per mitigation, whether it left
replication in place, hid it (the prompts no longer replicate but Dori finds the images) or removed it (neither
the prompts nor Dori bring the images back), and what Dori found. "No longer replicate" and "removed" use
``bound`` (default 0.1, the MR bound of adversarial fine-tuning's target).
"""

from __future__ import annotations

NAMES = {"nemo": "NeMo", "wanda": "Wanda", "advft": "adversarial fine-tuning"}


def _mr(row: dict | None) -> float | None:
    if row is None or row.get("mr") is None:
        return None
    return float(row["mr"])


def _count(row: dict) -> str:
    n = row.get("n_items")
    return f"{round(float(row['mr']) * n)} of {n}" if n else f"MR {float(row['mr']):.2f}"


def _median(value) -> float | None:
    if isinstance(value, dict):
        value = value.get("median")
    return None if value is None else float(value)


def verdict(prompts_mr: float, dori_mrs: list[float], bound: float = 0.1) -> str:
    """``kept`` (the prompts still replicate), ``hid`` (they do not, Dori does) or ``removed`` (neither)."""
    if prompts_mr > bound:
        return "kept"
    return "hid" if any(m > bound for m in dori_mrs) else "removed"


def story_sentences(rows: dict[str, dict], bound: float = 0.1) -> list[str]:
    """Plain sentences for the report's opening, from the rows of one run.

    Args:
        rows: setting -> row. Keys read: ``none``, ``nonmem+dori``, ``<m>``, ``<m>+dori`` and, for adversarial
            fine-tuning, ``advft+dori-random``, for m in nemo, wanda, advft; utility rows ``utility.none`` and
            ``utility.advft`` (``a_clip`` on held-out captions, ``fid``). Missing rows are left out.
        bound: MR at or under which a model counts as not replicating.
    """
    out = []
    none = rows.get("none")
    if _mr(none) is not None:
        out.append(
            f"Without a mitigation the model replicates {_count(none)} memorized training images from their "
            f"captions (MR {_mr(none):.2f})."
        )
    for key, name in NAMES.items():
        row = rows.get(key)
        if _mr(row) is None:
            continue
        dori = [
            (label, rows.get(k))
            for label, k in (
                ("from the captions' embeddings", f"{key}+dori"),
                ("from random embeddings", f"{key}+dori-random"),
            )
        ]
        dori = [(label, r) for label, r in dori if _mr(r) is not None]
        found = " and ".join(f"{_count(r)} {label}" for label, r in dori)
        kind = verdict(_mr(row), [_mr(r) for _, r in dori], bound)
        cap = name[0].upper() + name[1:]
        if kind == "kept":
            text = f"{cap} does not stop replication: the prompts still replicate {_count(row)} (MR {_mr(row):.2f})"
        elif kind == "hid":
            text = (
                f"{cap} hides the images rather than removing them: the prompts replicate {_count(row)} "
                f"(MR {_mr(row):.2f}), but with Dori they come back"
            )
        else:
            text = f"{cap} removes them: the prompts replicate {_count(row)} (MR {_mr(row):.2f}) and Dori brings back at most MR {bound:g}"
        out.append(text + (f"; Dori finds {found}." if found else "."))
    before, after = rows.get("utility.none"), rows.get("utility.advft")
    if before and after:
        parts = []
        a0, a1 = _median(before.get("a_clip")), _median(after.get("a_clip"))
        if a0 is not None and a1 is not None:
            parts.append(f"text alignment on held-out captions {a0:.3f} before, {a1:.3f} after")
        f0, f1 = before.get("fid"), after.get("fid")
        if f0 is not None and f1 is not None:
            parts.append(f"FID {float(f0):.2f} before, {float(f1):.2f} after")
        if parts:
            out.append("Utility of the fine-tuned model: " + "; ".join(parts) + ".")
    control = rows.get("nonmem+dori")
    if _mr(control) is not None:
        out.append(
            f"Dori also makes {_count(control)} never-memorized training images replicate (MR {_mr(control):.2f}), "
            "so an MR under Dori near that level is what any trained image gives, not proof of memorization."
        )
    return out
