"""``dori analyze locality``: the locality analyses of Finding Dori (Section 4.1-4.3) for one item.

Writes into the run directory the results of each analysis as soon as it is done (resumable), the
figures (``figures/fig*.png``), ``locality.json`` with every number, the per-figure notes and provenance
(the same JSON at ``--json``), and ``locality.html``: the figures with their notes in one file.
"""

from __future__ import annotations

import sys

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
    from dori.locality_run import copy_check

    return copy_check(model, args.sscd) if args.check else (None, None, None)


def make_mitigations(model, args) -> dict:
    """NeMo and Wanda with their default (reference) settings."""
    from dori.locality_run import default_mitigations

    return default_mitigations()


def run(args) -> int:
    from dori.analysis.locality import LocalityConfig
    from dori.commands.common import load_model_from_args, write_json
    from dori.data.sets import load_set
    from dori.locality_run import find_item, locality_to_folder
    from dori.models.pipeline import SamplingConfig

    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    if args.k < 2 or args.steps < 1 or args.gens < 1:
        raise DoriError("need --k >= 2, --steps >= 1, --gens >= 1")
    model = load_model_from_args(args)
    item = find_item(load_set(args.set, model, images_dir=args.images), args.item, args.set)
    nonmem_name = args.nonmem_set or ("unique" if model.world is not None else "nonmem")
    cfg = LocalityConfig(
        k=args.k,
        steps=args.steps,
        seed=args.seed,
        generation_seeds=tuple(range(args.seed, args.seed + args.gens)),
        sampling=SamplingConfig(steps=args.sampling_steps, guidance=args.guidance),
    )
    log = (lambda msg: print(f"[analyze] {msg}", file=sys.stderr, flush=True)) if args.progress else None
    settings = {
        "command": "analyze locality",
        "model": args.model,
        "dtype": args.dtype,
        "set": args.set,
        "nonmem_set": nonmem_name,
    }
    out = locality_to_folder(
        args.out, model, item, [it.prompt for it in load_set(nonmem_name, model)],
        [it.prompt for it in load_set(args.set, model, images_dir=args.images)], cfg, analyses,
        *make_scorer(model, args), mitigations=make_mitigations(model, args) if "agreement" in analyses else {},
        settings=settings,
        title=f"Locality of item {item.id} on {args.model}", log=log or (lambda msg: None),
    )  # fmt: skip
    write_json(args.json, out)
    for fig, note in out["notes"].items():
        print(f"{fig}: {note}\n")
    print(f"figures and locality.json in {args.out}")
    return 0
