"""The HTML report of ``dori detect``, built only from ``detection.json`` (never loads a model): the AUC /
TPR@FPR table beside the published SD v1.4 numbers, ROC curves (one plot per pair of sets, one line per
detector), score distributions and the per-prompt scores. :func:`detection_section_html` is also what an
audit report shows when detection ran on the same model."""

from __future__ import annotations

import html
import json
from pathlib import Path

from dori.errors import DoriError
from dori.report.page import _STATUS_SCRIPT, _STYLE, _figure_uri, _img
from dori.runs import atomic_write_text

COLORS = {"wen": "#b00", "nemo": "#06c", "trajectory": "#080"}


def roc_plot_uri(pairs: list[dict], title: str) -> str:
    """ROC curves of the given pair summaries (same sets, different detectors) on linear axes."""

    def draw(ax):
        for p in pairs:
            roc = p["roc"]
            ax.step(roc["fpr"], roc["tpr"], where="post", color=COLORS.get(p["detector"]), lw=1.5,
                    label=f"{p['detector']} (AUC {p['auc']:.3f})")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
        for x in (0.01, 0.03):
            ax.axvline(x, color="#ccc", lw=0.6)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")

    return _figure_uri(draw, size=(4.0, 3.6))


def score_plot_uri(by_set: dict[str, list[dict]], detector: str) -> str:
    """Each set's scores of one detector as a strip (one row per set)."""

    def draw(ax):
        names = list(by_set)
        for row, name in enumerate(names):
            xs = [r["score"] for r in by_set[name]]
            ax.plot(xs, [row] * len(xs), "|", ms=12, color="#333", alpha=0.6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_xlabel(f"{detector} score")

    return _figure_uri(draw, size=(4.0, 0.6 + 0.45 * len(by_set)))


def pairs_table_html(pairs: list[dict], published: dict | None = None) -> str:
    head = "<tr><th>detector</th><th>memorized</th><th>negatives</th><th>n</th><th>AUC</th><th>TPR@1%FPR</th><th>TPR@3%FPR</th></tr>"
    rows = [
        f"<tr><td>{html.escape(p['detector'])}</td><td>{html.escape(p['positive'])}</td>"
        f"<td>{html.escape(p['negative'])}</td><td>{p['n_pos']} / {p['n_neg']}</td><td>{p['auc']:.3f}</td>"
        f"<td>{p['tpr@1%fpr']:.3f}</td><td>{p['tpr@3%fpr']:.3f}</td></tr>"
        for p in pairs
    ]
    for name, pub in (published or {}).items():
        rows.append(
            f"<tr><td>{html.escape(name)} (published, {html.escape(pub['model'])})</td><td colspan=2>"
            f"{html.escape(pub['pair'])}</td><td></td><td>{pub['auc']:.3f}</td><td>{pub['tpr@1%fpr']:.3f}</td>"
            "<td></td></tr>"
        )
    return f'<table class="results">{head}{"".join(rows)}</table>'


def detection_section_html(detection: dict, max_prompts: int = 200) -> str:
    """Table, ROC curves, score strips and per-prompt scores of one ``detection.json``."""
    parts = [
        "<h2>Detection of memorized prompts</h2>",
        pairs_table_html(detection["pairs"], detection.get("published")),
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in detection["pairs"]:
        groups.setdefault((p["positive"], p["negative"]), []).append(p)
    plots = [
        _img(roc_plot_uri(ps, f"{pos} vs {neg}"), f"ROC {pos} vs {neg}") for (pos, neg), ps in groups.items()
    ]
    plots += [
        _img(score_plot_uri(by_set, det), f"{det} scores") for det, by_set in detection["scores"].items()
    ]
    parts.append('<div class="plots">' + "".join(plots) + "</div>")
    settings = json.dumps(detection.get("detectors", {}), indent=1)
    parts.append(f"<h3>Detector settings</h3><pre>{html.escape(settings)}</pre>")
    dets = list(detection["scores"])
    rows = {}
    for det in dets:
        for set_name, recs in detection["scores"][det].items():
            for r in recs:
                rows.setdefault((set_name, r["item"]), {"prompt": r["prompt"]})[det] = r["score"]
    head = (
        "<tr><th>set</th><th>item</th><th>prompt</th>"
        + "".join(f"<th>{html.escape(d)}</th>" for d in dets)
        + "</tr>"
    )
    body = []
    for (set_name, item), row in list(rows.items())[:max_prompts]:
        cells = "".join(f"<td>{row[d]:.4f}</td>" if d in row else "<td></td>" for d in dets)
        body.append(
            f"<tr><td>{html.escape(set_name)}</td><td>{html.escape(item)}</td>"
            f"<td style='text-align:left'>{html.escape(row['prompt'])}</td>{cells}</tr>"
        )
    parts.append(f"<h3>Per-prompt scores ({min(len(rows), max_prompts)} of {len(rows)} shown)</h3>")
    parts.append(f'<table class="results">{head}{"".join(body)}</table>')
    return "".join(parts)


def joined_detection_html(detection_dir: str | Path, audit: dict) -> str:
    """The detection section of an audit report: the scores of ``detection_dir`` when its model is the audit's
    (same ``--model`` and the same model name in provenance), else a line saying why they are not shown."""
    path = Path(detection_dir) / "detection.json"
    if not path.exists():
        return f"<h2>Detection of memorized prompts</h2><p>{html.escape(str(path))} does not exist.</p>"
    detection = json.loads(path.read_text())
    ours = (audit.get("model"), (audit.get("provenance") or {}).get("model"))
    theirs = (detection.get("model"), (detection.get("provenance") or {}).get("model"))
    if ours != theirs:
        return (
            "<h2>Detection of memorized prompts</h2><p>Not joined: the detection in "
            f"{html.escape(str(detection_dir))} ran on {html.escape(str(theirs))}, this audit on "
            f"{html.escape(str(ours))}.</p>"
        )
    return detection_section_html(detection)


def build_detection_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` of a ``dori detect`` run directory from its ``detection.json``."""
    run = Path(run_dir)
    path = run / "detection.json"
    if not path.exists():
        raise DoriError(f"{run} holds no detection.json: run `dori detect --out {run}` first")
    detection = json.loads(path.read_text())
    title = f"dori detect: {detection.get('model', '?')}"
    prov = json.dumps(detection.get("provenance", {}), indent=1)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        detection_section_html(detection),
        f"<h2>Provenance</h2><pre>{html.escape(prov)}</pre>",
    ]
    page = (
        '<!DOCTYPE html><html lang="en" data-status="pending"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{_STATUS_SCRIPT}</script></head><body>{''.join(body)}</body></html>"
    )
    target = Path(out) if out is not None else run / "report.html"
    atomic_write_text(target, page)
    return target
