"""Figures 3, 4, 5, 10, 11, 12 and 13 of Finding Dori from the locality results (PNG, matplotlib Agg).

Every function takes the JSON-able results of :func:`dori.analysis.locality.run_locality` (the
``dispersion``, ``activations`` or ``agreement`` part) and a path; nothing here loads a model.
:func:`write_figures` draws every figure whose results exist.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

INIT_COLOR, ADV_COLOR = "tab:blue", "tab:orange"
INIT_LABEL = {"random": r"$\mathcal{N}(0, I)$ init", "nonmem": r"$y_{nonmem}$ init"}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig_tsne(dispersion: dict, kind: str, path: str | Path) -> Path:
    """Fig. 3 (``kind="random"``) or Fig. 10 (``kind="nonmem"``): t-SNE of inits and triggers.

    Triggers that failed the replication check (where it ran) are drawn hollow.
    """
    part = dispersion[kind]
    xi = [p[0] for p in part["tsne"]["init"]], [p[1] for p in part["tsne"]["init"]]
    xa = [p[0] for p in part["tsne"]["adv"]], [p[1] for p in part["tsne"]["adv"]]
    ok = part.get("replication", {}).get("replicated") or [True] * len(xa[0])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(*xi, s=14, color=INIT_COLOR, label=INIT_LABEL[kind])
    ax.scatter(
        [x for x, o in zip(xa[0], ok, strict=True) if o],
        [y for y, o in zip(xa[1], ok, strict=True) if o],
        s=14,
        color=ADV_COLOR,
        label=r"$y_{adv}$ (replicates)" if not all(ok) else r"$y_{adv}$",
    )
    if not all(ok):
        ax.scatter(
            [x for x, o in zip(xa[0], ok, strict=True) if not o],
            [y for y, o in zip(xa[1], ok, strict=True) if not o],
            s=14,
            facecolors="none",
            edgecolors=ADV_COLOR,
            label=r"$y_{adv}$ (does not replicate)",
        )
    fig_no = 3 if kind == "random" else 10
    ax.set_title(f"Fig. {fig_no}: t-SNE, item {dispersion['item']}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_distances(dispersion: dict, path: str | Path) -> Path:
    """Fig. 11: pairwise L2 distances within inits and triggers (left), init-to-trigger distances (right)."""
    r, n = dispersion["random"], dispersion["nonmem"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [2, 1]})
    left.boxplot(
        [r["pairwise_init"], r["pairwise_adv"], n["pairwise_init"], n["pairwise_adv"]],
        tick_labels=[
            r"$\mathcal{N}(0,I)$",
            r"$y_{adv}$ from $\mathcal{N}$",
            r"$y_{nonmem}$",
            r"$y_{adv}$ from nonmem",
        ],
        showfliers=False,
    )
    left.set_ylabel("pairwise L2 distance")
    left.set_title("within each set", fontsize=10)
    right.boxplot(
        [r["init_to_adv"], n["init_to_adv"]],
        tick_labels=[r"$\mathcal{N}(0,I)$", r"$y_{nonmem}$"],
        showfliers=False,
    )
    right.set_ylabel(r"L2 distance init $\to$ $y_{adv}$")
    right.set_title("distance travelled", fontsize=10)
    fig.suptitle(f"Fig. 11: L2 distances of embeddings, item {dispersion['item']}", fontsize=11)
    return _save(fig, path)


def _bars(ax, table: dict, ylabel: str, ylim: tuple[float, float] | None = None) -> None:
    idx = list(range(1, len(table["layers"]) + 1))
    w = 0.38
    ax.bar([i - w / 2 for i in idx], table["adv"], w, color=ADV_COLOR, label=r"$Y_{adv}$")
    ax.bar([i + w / 2 for i in idx], table["mem"], w, color=INIT_COLOR, label=r"$Y_{mem}$")
    ax.set_xticks(idx)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_discrepancy(activations: dict, path: str | Path) -> Path:
    """Fig. 4: MeanDiscrepancy of Y_adv and Y_mem in NeMo's value layers and Wanda's FFN layers."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in (
        (axes[0], "nemo", "NeMo: attn2.to_v output"),
        (axes[1], "wanda", "Wanda: ff.net.2 input"),
    ):
        if activations[name]["layers"]:
            _bars(ax, activations[name], "mean pairwise squared L2")
        else:
            _empty(ax, "no such layers")
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"Fig. 4: activation discrepancy (|Y_adv| = {activations['n_adv']}, |Y_mem| = {activations['n_mem']})"
    )
    return _save(fig, path)


def fig_discrepancy_all(activations: dict, path: str | Path) -> Path:
    """Fig. 12: MeanDiscrepancy of Y_adv and Y_mem per layer type, layers in UNet order."""
    types = list(activations["layer_types"])
    cols = 4
    rows = max(1, -(-len(types) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, ty in zip(axes.flat, types, strict=False):
        t = activations["layer_types"][ty]
        idx = list(range(1, len(t["layers"]) + 1))
        ax.plot(idx, t["adv"], "o-", color=ADV_COLOR, ms=3, label=r"$Y_{adv}$")
        ax.plot(idx, t["mem"], "s-", color=INIT_COLOR, ms=3, label=r"$Y_{mem}$")
        ax.set_title(ty, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (down -> mid -> up)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(types) :]:
        ax.axis("off")
    if types:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Fig. 12: activation discrepancy in every layer type of the UNet")
    return _save(fig, path)


def fig_agreement(agreement: dict, path: str | Path) -> Path:
    """Fig. 5: MeanAgreement (IoU) of the weights NeMo and Wanda select for Y_adv and Y_mem."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("nemo", "wanda"), strict=True):
        table = agreement.get(name, {"skipped": "not run"})
        if "skipped" in table:
            _empty(ax, table["skipped"])
        else:
            _bars(ax, table, "weight agreement (IoU)", (0, 1.05))
        ax.set_title("NeMo" if name == "nemo" else "Wanda", fontsize=10)
    fig.suptitle("Fig. 5: weight agreement")
    return _save(fig, path)


def fig_weights_per_layer(agreement: dict, path: str | Path) -> Path:
    """Fig. 13: number of neurons (NeMo) / weights (Wanda) selected per layer over all memorized prompts."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("nemo", "wanda"), strict=True):
        table = agreement.get(name, {"skipped": "not run"})
        if "skipped" in table:
            _empty(ax, table["skipped"])
        else:
            counts = table["count_all_mem"]
            ax.boxplot(counts, tick_labels=[str(i) for i in range(1, len(counts) + 1)], showfliers=True)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"selected {table['unit']} per memorized prompt")
        ax.set_title("NeMo" if name == "nemo" else "Wanda", fontsize=10)
    fig.suptitle("Fig. 13: memorization weights per layer")
    return _save(fig, path)


def write_figures(results: dict, folder: str | Path) -> dict[str, str]:
    """Draw every figure whose results are present; returns ``{figure: path}``."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    if "dispersion" in results:
        d = results["dispersion"]
        out["fig3"] = fig_tsne(d, "random", folder / "fig3_tsne_random_init.png")
        out["fig10"] = fig_tsne(d, "nonmem", folder / "fig10_tsne_nonmem_init.png")
        out["fig11"] = fig_distances(d, folder / "fig11_l2_distances.png")
    if "activations" in results:
        a = results["activations"]
        out["fig4"] = fig_discrepancy(a, folder / "fig4_discrepancy_nemo_wanda.png")
        out["fig12"] = fig_discrepancy_all(a, folder / "fig12_discrepancy_all_layers.png")
    if "agreement" in results:
        g = results["agreement"]
        out["fig5"] = fig_agreement(g, folder / "fig5_weight_agreement.png")
        out["fig13"] = fig_weights_per_layer(g, folder / "fig13_weights_per_layer.png")
    return {k: str(v) for k, v in out.items()}


TITLES = {
    "fig3": "Fig. 3: triggers from N(0, I) inits (t-SNE)",
    "fig10": "Fig. 10: triggers from non-memorized prompts (t-SNE)",
    "fig11": "Fig. 11: L2 distances of embeddings",
    "fig4": "Fig. 4: activation discrepancy in NeMo's and Wanda's layers",
    "fig12": "Fig. 12: activation discrepancy in every layer type",
    "fig5": "Fig. 5: weight agreement",
    "fig13": "Fig. 13: weights selected per layer",
}


def write_html(
    run_dir: str | Path,
    figures: dict[str, str],
    notes: dict[str, str],
    title: str,
    verdict: dict | None = None,
) -> Path:
    """A self-contained ``locality.html`` in the run directory: the verdict record (one row per check), then
    each figure (inlined PNG) with its note."""
    import base64
    import html

    from dori.runs import atomic_write_text

    run_dir = Path(run_dir)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}img{max-width:100%}</style>"
    )
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if verdict is not None:
        o = verdict["overall"]
        parts.append(
            f"<p>Overall: <b>{html.escape(o['verdict'])}</b>, {o['holding']} of {o['checks']} checks hold.</p>"
        )
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                c["figure"], c["claim"], c["quantity"], f"{c['value']:.3g}",
                f"{c['op']} {c['threshold']:.3g} ({c['threshold_is']})", "yes" if c["holds"] else "no",
            )) + "</tr>"
            for c in verdict["checks"]
        )  # fmt: skip
        head = "".join(
            f"<th>{h}</th>" for h in ("figure", "paper's pattern", "measured", "value", "criterion", "holds")
        )
        parts.append(f"<table><tr>{head}</tr>{rows}</table>")
    for fig, heading in TITLES.items():
        if fig not in figures:
            continue
        path = Path(figures[fig])
        data = base64.b64encode((path if path.is_absolute() else run_dir / path).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{fig}' src='data:image/png;base64,{data}'>")
        parts.append(f"<p>{html.escape(notes.get(fig, ''))}</p>")
    out = run_dir / "locality.html"
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
