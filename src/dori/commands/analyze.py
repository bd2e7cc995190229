"""``dori analyze locality``: the locality analyses of Finding Dori (Section 4.1-4.3) for one item.

Writes into the run directory the results of each analysis as soon as it is done (resumable), the
figures (``figures/fig*.png``), ``locality.json`` with every number, the per-figure notes and provenance
(the same JSON at ``--json``), and ``locality.html``: the figures with their notes in one file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dori.errors import DoriError


def add_parser(sub) -> None:
    from dori.commands.common import add_model_args, add_run_args

    p = sub.add_parser("analyze", help="locality analyses (embedding dispersion, activations, weights)")
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    loc = kinds.add_parser("locality", help="Sections 4.1-4.3 for one memorized item: Fig. 3, 4, 5, 10-13")
    add_model_args(loc)
    add_run_args(loc)
    loc.add_argument("--item", default=None, help="item id (default: the first item of --set with an image)")
    loc.add_argument(
        "--set", default="vm", help="set holding the item; its prompts also form Y_mem (default vm)"
    )
    loc.add_argument(
        "--nonmem-set",
        default=None,
        help="non-memorized prompts for inits (default: unique on a world, else nonmem)",
    )
    loc.add_argument("--k", type=int, default=100, help="Dori runs per init and size of Y_mem (default 100)")
    loc.add_argument("--steps", type=int, default=50, help="Dori steps per run (default 50)")
    loc.add_argument(
        "--analyses",
        default="dispersion,activations,agreement",
        help="comma-separated subset of dispersion,activations,agreement",
    )
    loc.add_argument("--gens", type=int, default=1, help="generations per trigger for the replication check")
    loc.add_argument(
        "--sampling-steps", type=int, default=50, help="DDIM steps of those generations (default 50)"
    )
    loc.add_argument("--guidance", type=float, default=7.0, help="guidance of those generations (default 7)")
    loc.add_argument("--no-check", dest="check", action="store_false", help="skip the replication check")
    loc.add_argument(
        "--sscd", default=None, help="SSCD TorchScript file (real models; a world uses its stand-in)"
    )
    loc.add_argument("--images", default=None, help="folder of training images for SD prompt sets")
    loc.set_defaults(func=run)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def make_scorer(model, args):
    """(scorer, threshold, name) of the copy detector, or (None, None, None) without a check."""
    if not args.check:
        return None, None, None
    from dori.analysis.embedding_dispersion import copy_detector_scorer
    from dori.metrics.backends import load_backends

    backends = load_backends(model, sscd=args.sscd)
    return copy_detector_scorer(backends.copy_detector), backends.threshold, backends.copy_detector.name


def make_mitigations(model, args) -> dict:
    """NeMo and Wanda with their default (reference) settings; a method whose module is missing is None
    (its agreement is then reported as skipped)."""
    import importlib

    out = {}
    for name, cls_name in (("nemo", "NeMo"), ("wanda", "Wanda")):
        try:
            out[name] = getattr(importlib.import_module(f"dori.mitigations.{name}"), cls_name)()
        except (ImportError, AttributeError):
            out[name] = None
    return out


def _log(enabled: bool):
    return (
        (lambda msg: print(f"[analyze] {msg}", file=sys.stderr, flush=True))
        if enabled
        else (lambda msg: None)
    )


def run(args) -> int:
    from dori.analysis.locality import ANALYSES, LocalityConfig, run_locality
    from dori.commands.common import load_model_from_args, write_json
    from dori.data.sets import load_set
    from dori.models.pipeline import SamplingConfig
    from dori.report.figures_locality import write_figures, write_html
    from dori.report.locality_notes import locality_notes
    from dori.runs import RunDir, atomic_write_text

    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bad = sorted(set(analyses) - set(ANALYSES))
    if bad or not analyses:
        raise DoriError(
            f"--analyses takes a comma-separated subset of {', '.join(ANALYSES)}; got {args.analyses!r}"
        )
    if args.k < 2 or args.steps < 1 or args.gens < 1:
        raise DoriError("need --k >= 2, --steps >= 1, --gens >= 1")
    log = _log(args.progress)
    model = load_model_from_args(args)
    items = load_set(args.set, model, images_dir=args.images)
    item = _find_item(items, args.item, args.set)
    nonmem_name = args.nonmem_set or ("unique" if model.info.get("world_dir") else "nonmem")
    nonmem = [it.prompt for it in load_set(nonmem_name, model)]
    mem = [it.prompt for it in items]
    scorer, threshold, detector = make_scorer(model, args)
    cfg = LocalityConfig(
        k=args.k,
        steps=args.steps,
        seed=args.seed,
        generation_seeds=tuple(range(args.seed, args.seed + args.gens)),
        sampling=SamplingConfig(steps=args.sampling_steps, guidance=args.guidance),
    )
    config = {
        "command": "analyze locality",
        "model": args.model,
        "dtype": args.dtype,
        "item": item.id,
        "set": args.set,
        "nonmem_set": nonmem_name,
        "detector": detector,
        **cfg.describe(),
    }
    run_dir = RunDir(args.out, config, extra_provenance={"model_info": model.info})
    mitigations = make_mitigations(model, args) if "agreement" in analyses else {}
    results = run_locality(
        model,
        run_dir,
        item,
        nonmem,
        mem,
        cfg,
        analyses,
        scorer=scorer,
        threshold=threshold,
        nemo=mitigations.get("nemo"),
        wanda=mitigations.get("wanda"),
        log=log,
    )
    figures = write_figures(results, run_dir.path / "figures")
    notes = locality_notes(results)
    out = {
        "config": run_dir.config,
        "results": results,
        "figures": {k: str(Path(v).relative_to(run_dir.path)) for k, v in figures.items()},
        "notes": notes,
        "provenance": run_dir.provenance,
    }
    import json

    atomic_write_text(run_dir.path / "locality.json", json.dumps(out, indent=1, default=str))
    write_json(args.json, out)
    write_html(run_dir.path, out["figures"], notes, f"Locality of item {item.id} on {args.model}")
    for fig, note in notes.items():
        print(f"{fig}: {note}\n")
    print(f"figures and locality.json in {run_dir.path}")
    return 0


def _find_item(items, item_id: str | None, set_name: str):
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
