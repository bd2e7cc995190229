"""The locality analyses of one item written to a folder: what ``dori analyze locality`` and
``experiments/locality_figures.py`` call.

:func:`locality_to_folder` runs :func:`dori.analysis.locality.run_locality` (resumable: each analysis is saved
when done), then writes the figures (``figures/fig*.png``), ``locality.json`` (config, every number, the verdict record of
:func:`dori.analysis.locality_verdict.locality_verdict`, the per-figure notes rendered from it, provenance)
and ``locality.html``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from dori.analysis.embedding_dispersion import Scorer, copy_detector_scorer
from dori.analysis.locality import ANALYSES, LocalityConfig, run_locality
from dori.analysis.locality_verdict import locality_verdict
from dori.data.sets import Item
from dori.errors import DoriError
from dori.metrics.backends import load_backends
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_write_text


def find_item(items: Sequence[Item], item_id: str | None, set_name: str) -> Item:
    """Item ``item_id`` of the set (None: the first with a training image); refused without an image."""
    if item_id is None:
        for it in items:
            if it.image is not None:
                return it
        raise DoriError(f"no item of set {set_name!r} has a training image")
    for it in items:
        if it.id == item_id:
            if it.image is None:
                raise DoriError(f"item {item_id} has no training image ({it.skip_reason})")
            return it
    raise DoriError(f"no item {item_id!r} in set {set_name!r}")


def copy_check(model: T2IModel, sscd: str | None = None) -> tuple[Scorer, float, str]:
    """(scorer, replication threshold, name) of the copy detector (``sscd``, or the world's stand-in)."""
    backends = load_backends(model, sscd=sscd)
    return copy_detector_scorer(backends.copy_detector), backends.threshold, backends.copy_detector.name


def default_mitigations() -> dict:
    """NeMo and Wanda with their default (reference) settings, for the weight-agreement analysis."""
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.wanda import Wanda

    return {"nemo": NeMo(), "wanda": Wanda()}


def locality_to_folder(
    out: str | Path,
    model: T2IModel,
    item: Item,
    nonmem: Sequence[str],
    mem: Sequence[str],
    cfg: LocalityConfig,
    analyses: Sequence[str] = ANALYSES,
    scorer: Scorer | None = None,
    threshold: float | None = None,
    detector: str | None = None,
    mitigations: dict | None = None,
    settings: dict | None = None,
    title: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Run (or resume) the locality analyses of ``item`` into ``out``; returns the ``locality.json`` content.

    Args:
        nonmem: non-memorized prompts (inits of the dispersion analysis).
        mem: the memorized prompts (Y_mem, Fig. 13).
        scorer / threshold / detector: the replication check of the found triggers (:func:`copy_check`;
            None: no check).
        mitigations: ``{"nemo": NeMo(), "wanda": Wanda()}`` for the agreement analysis (default:
            :func:`default_mitigations`).
        settings: extra settings recorded in ``out/config.json`` (a rerun with other settings is refused).
    """
    from dori.report.figures_locality import write_figures, write_html
    from dori.report.locality_notes import locality_notes

    bad = sorted(set(analyses) - set(ANALYSES))
    if bad or not analyses:
        raise DoriError(f"analyses are a subset of {', '.join(ANALYSES)}; got {list(analyses)}")
    config = {**(settings or {}), "item": item.id, "detector": detector, **cfg.describe()}
    run_dir = RunDir(out, config, extra_provenance={"model_info": model.info})
    if mitigations is None:
        mitigations = default_mitigations() if "agreement" in analyses else {}
    results = run_locality(
        model, run_dir, item, nonmem, mem, cfg, list(analyses), scorer=scorer, threshold=threshold,
        nemo=mitigations.get("nemo"), wanda=mitigations.get("wanda"), log=log,
    )  # fmt: skip
    figures = write_figures(results, run_dir.path / "figures")
    verdict = locality_verdict(results)
    data = {
        "config": run_dir.config,
        "results": results,
        "verdict": verdict,
        "figures": {k: str(Path(v).relative_to(run_dir.path)) for k, v in figures.items()},
        "notes": locality_notes(results, verdict),
        "provenance": run_dir.provenance,
    }
    atomic_write_text(run_dir.path / "locality.json", json.dumps(data, indent=1, default=str))
    write_html(
        run_dir.path, data["figures"], data["notes"], title or f"Locality of item {item.id} on {model.name}",
        verdict=verdict,
    )  # fmt: skip
    return data
