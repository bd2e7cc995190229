"""A self-contained HTML report of an audit, built only from what the run directory holds.

It reads ``audit.json`` (the rows), ``results/item.<setting>.<item>.json`` (per-item scores) and the
artifacts (``train.*``, ``gen.*`` and ``dori.*`` safetensors) and never loads a model. Images are inlined
as base64 PNG, plots are drawn with matplotlib (Agg), captions are HTML-escaped, so the one file can be
mailed or archived. A tiny inline script writes whether every image decoded and no script error
occurred into attributes of ``<html>`` (``data-status``, ``data-images``: what the browser test reads).

Contents: the result table; MR and SSCD_orig against Dori steps; per item (up to ``max_items``) the
training image, the generations from its prompt (per model state) and from its final Dori embedding
with their SSCD_orig scores, the Dori loss curve and the item's best score after each evaluated step.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from dori.errors import DoriError
from dori.metrics.replication import replicated
from dori.report.page import _STATUS_SCRIPT, _STYLE, THUMB, _figure_uri, _img, png_data_uri  # noqa: F401
from dori.report.tables import table_html
from dori.runs import atomic_write_text, load_tensors, safe_key


def loss_curve_uri(losses: torch.Tensor) -> str:
    """The Dori loss per step (raw and a 5-step moving average)."""
    y = losses.float().numpy()

    def draw(ax):
        steps = np.arange(1, len(y) + 1)
        ax.plot(steps, y, color="#999", lw=1, label="loss")
        if len(y) >= 5:
            ax.plot(
                steps[4:],
                np.convolve(y, np.ones(5) / 5, mode="valid"),
                color="#b00",
                lw=1.5,
                label="mean of 5",
            )
        ax.set_xlabel("Dori step")
        ax.set_ylabel("diffusion loss")
        ax.legend(fontsize=7)

    return _figure_uri(draw)


def norm_curve_uri(norms: torch.Tensor, init_norm: float) -> str:
    """||y_adv|| / ||y_init|| per Dori step (Fig. 7, right)."""
    y = norms.float().numpy() / max(init_norm, 1e-12)

    def draw(ax):
        ax.plot(np.arange(1, len(y) + 1), y, color="#06c", lw=1.5)
        ax.axhline(1.0, color="#888", lw=0.8, ls=":")
        ax.set_xlabel("Dori step")
        ax.set_ylabel("||y|| / ||y_init||")

    return _figure_uri(draw)


def steps_plot_uri(points: list[tuple[int, float, float]], threshold: float | None) -> str:
    """MR and median SSCD_orig against Dori steps: points (steps, mr, sscd median)."""

    def draw(ax):
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", color="#b00", label="MR")
        ax.plot(xs, [p[2] for p in points], "s--", color="#06c", label="SSCD_orig (median)")
        if threshold is not None:
            ax.axhline(threshold, color="#888", lw=0.8, ls=":", label="threshold")
        ax.set_xticks(xs)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("Dori steps")
        ax.legend(fontsize=7)

    return _figure_uri(draw)


def _artifact(run: Path, name: str) -> Path:
    return run / "artifacts" / safe_key(name)


def _gens_html(run: Path, record: dict, threshold: float | None) -> str:
    path = _artifact(run, record["artifact"])
    if not path.exists():
        return "<p>(generations not saved)</p>"
    images = load_tensors(path)["images"]
    figs = []
    for k, (img, score) in enumerate(zip(images, record["sscd_orig"]["scores"], strict=True)):
        hit = threshold is not None and replicated(score, threshold)
        cls = ' class="hit"' if hit else ""
        figs.append(
            f"<figure{cls}>{_img(png_data_uri(img), f'generation {k}')}"
            f"<figcaption>SSCD {score:.2f}</figcaption></figure>"
        )
    return '<div class="gens">' + "".join(figs) + "</div>"


def _item_html(run: Path, item_id: str, by_setting: dict[str, dict], audit: dict, threshold) -> str:
    first = next(iter(by_setting.values()))
    parts = [f'<section class="item"><h3>{html.escape(item_id)}</h3>']
    parts.append(f"<p>Caption: <q>{html.escape(first['prompt'])}</q></p>")
    train = _artifact(run, f"train.{item_id}.safetensors")
    if train.exists():
        uri = png_data_uri(load_tensors(train)["image"], max_size=2 * THUMB)
        parts.append(
            f'<figure class="train">{_img(uri, "training image")}<figcaption>training image</figcaption></figure>'
        )
    settings = audit.get("settings", [])
    shown = [s for s in settings if s["attack"] == "none"]
    final = [s for s in settings if s["attack"] != "none"]
    if final:
        shown.append(max(final, key=lambda s: s["dori_steps"] or 0))
    for s in shown:
        rec = by_setting.get(s["key"])
        if rec is None:
            continue
        mx = rec["sscd_orig"]["max"]
        gen = rec.get("sscd_gen")
        extra = "" if not gen else f", SSCD_gen max {gen['max']:.2f}"
        parts.append(f"<h4>{html.escape(s['label'])}: SSCD_orig max {mx:.2f}{html.escape(extra)}</h4>")
        parts.append(_gens_html(run, rec, threshold))
    plots = []
    for s in final[:1]:
        dori_file = _artifact(run, f"dori.{s['key'].split('+dori-')[0]}.{item_id}.safetensors")
        if dori_file.exists():
            saved = load_tensors(dori_file)
            plots.append(_img(loss_curve_uri(saved["losses"]), "Dori loss curve"))
            if "init" in saved and "norms" in saved:
                init_norm = float(saved["init"].float().norm())
                plots.append(_img(norm_curve_uri(saved["norms"], init_norm), "Dori embedding norm"))
    steps = sorted(
        (s["dori_steps"], by_setting[s["key"]]["sscd_orig"]["max"]) for s in final if s["key"] in by_setting
    )
    if steps:
        cells = "".join(f"<td>{k}: {v:.2f}</td>" for k, v in steps)
        plots.append(
            f'<table class="results"><tr><th>SSCD_orig max after Dori steps</th>{cells}</tr></table>'
        )
    if plots:
        parts.append('<div class="plots">' + "".join(plots) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def build_report(
    run_dir: str | Path,
    max_items: int = 50,
    out: str | Path | None = None,
    rows: list[dict] | None = None,
    title: str | None = None,
    intro_html: str = "",
    detection: str | Path | None = None,
) -> Path:
    """Write ``report.html`` into the run directory (or ``out``) from its results; return its path.

    ``rows``/``title``/``intro_html`` let a recipe show its own table (e.g. Table 1 over several audits)
    above this run's per-item section. ``detection`` (default: ``audit.json``'s ``detection`` entry) is a
    ``dori detect`` run directory whose scores join the report when it ran on the same model.
    """
    run = Path(run_dir)
    audit_file = run / "audit.json"
    if not audit_file.exists():
        raise DoriError(f"{run} holds no audit.json: run `dori audit --out {run}` first")
    audit = json.loads(audit_file.read_text())
    rows = audit.get("rows", []) if rows is None else rows
    threshold = audit.get("backends", {}).get("threshold")
    items: dict[str, dict[str, dict]] = {}
    for path in sorted((run / "results").glob("item.*.json")):
        rec = json.loads(path.read_text())
        items.setdefault(rec["item"], {})[rec["setting"]] = rec
    order = sorted(items, key=lambda i: min(r.get("index", 0) for r in items[i].values()))
    title = title or f"dori audit: {audit.get('model', '?')} on {audit.get('set', '?')}"
    body = [f"<h1>{html.escape(title)}</h1>", intro_html]
    body.append("<h2>Results</h2>" + table_html(rows))
    main_set = rows[0]["set"] if rows else None  # per-kind rows (set "memorized/vm") are left out
    dori_rows = sorted(
        (r for r in rows if r.get("dori_steps") and r["set"] == main_set), key=lambda r: r["dori_steps"]
    )
    if dori_rows:
        pts = [(r["dori_steps"], r["mr"], r["sscd_orig"]["median"]) for r in dori_rows]
        body.append(
            "<h2>MR against Dori steps</h2>" + _img(steps_plot_uri(pts, threshold), "MR against Dori steps")
        )
    if audit.get("control"):
        from dori.report.control import control_section_html

        body.append(control_section_html(audit["control"]))
    detection = detection if detection is not None else audit.get("detection")
    if detection:
        from dori.report.detection import joined_detection_html

        body.append(joined_detection_html(detection, audit))
    if audit.get("skipped"):
        lis = "".join(
            f"<li>{html.escape(s['id'])}: {html.escape(s['reason'])}</li>" for s in audit["skipped"]
        )
        body.append(f"<h2>Skipped items ({len(audit['skipped'])})</h2><ul>{lis}</ul>")
    body.append(f"<h2>Items ({min(len(order), max_items)} of {len(order)} shown)</h2>")
    body += [_item_html(run, item_id, items[item_id], audit, threshold) for item_id in order[:max_items]]
    prov = json.dumps({k: audit.get(k) for k in ("provenance", "protocol", "dori", "backends")}, indent=1)
    body.append(f"<h2>Provenance</h2><pre>{html.escape(prov)}</pre>")
    page = (
        '<!DOCTYPE html><html lang="en" data-status="pending"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{_STATUS_SCRIPT}</script></head><body>{''.join(body)}</body></html>"
    )
    target = Path(out) if out is not None else run / "report.html"
    atomic_write_text(target, page)
    return target
