"""Result rows (the audit schema) as text, Markdown or HTML tables in the paper's layout.

Columns come from the metric registry (:data:`dori.metrics.functions.METRICS`): each header carries the
metric's direction (↓ lower is better, ↑ higher is better), so no table special-cases a metric.
Aggregated cells print as ``median ± MAD``; a metric that was not computed prints ``N/A`` (as the paper
prints SSCD_gen of the unmitigated model); columns no row has are left out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from dori.metrics.functions import METRICS

METRIC_COLUMNS = ("sscd_orig", "sscd_gen", "d_sscd", "a_clip", "mr", "fid", "kid")
LEAD_COLUMNS = (("setting", "Setting"), ("set", "Set"), ("dori_steps", "Dori steps"), ("n_items", "n"))


def format_value(name: str, value: object) -> str:
    """One cell: ``0.90 ± 0.04`` for aggregated metrics, fixed decimals for scalars, ``N/A`` if missing."""
    if value is None:
        return "N/A"
    if isinstance(value, dict):
        med, dev = value.get("median"), value.get("mad")
        if med is None or (isinstance(med, float) and math.isnan(med)):
            return "N/A"
        return f"{med:.2f}" if dev is None else f"{med:.2f} ± {dev:.2f}"
    if isinstance(value, float):
        if math.isnan(value):
            return "N/A"
        digits = {"kid": 4, "fid": 2}.get(name, 2)
        return f"{value:.{digits}f}"
    return str(value)


def columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(key, header) of the columns to print: lead columns present in some row, then metrics."""
    cols = [(key, title) for key, title in LEAD_COLUMNS if any(row.get(key) is not None for row in rows)]
    for name in METRIC_COLUMNS:
        if name in ("sscd_orig", "mr") or any(row.get(name) is not None for row in rows):
            spec = METRICS[name]
            cols.append((name, f"{spec.arrow} {spec.label}"))
    return cols


def cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the rows."""
    cols = columns(rows)
    body = [
        [format_value(key, row.get(key)) if key in METRICS else _lead(row.get(key)) for key, _ in cols]
        for row in rows
    ]
    return [title for _, title in cols], body


def _lead(value: object) -> str:
    return "–" if value is None else str(value)


def format_table(rows: Sequence[dict], fmt: str = "text") -> str:
    """The rows as a ``text`` (aligned columns) or ``markdown`` table."""
    headers, body = cells(rows)
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
        return "\n".join(lines)
    if fmt != "text":
        raise ValueError(f"unknown table format {fmt!r}: use text or markdown")
    widths = [
        max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(out)


def table_html(rows: Sequence[dict]) -> str:
    """The rows as an HTML ``<table>``, every cell escaped."""
    headers, body = cells(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>'
