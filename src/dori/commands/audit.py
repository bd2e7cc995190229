"""``dori audit``: evaluate a (possibly mitigated) model on memorized items, optionally under Dori.

Prints the result table, writes ``audit.json`` and ``report.html`` into the run directory (and the JSON
to ``--json``). Resumable: run the same command again to continue an interrupted audit.
"""

from __future__ import annotations

import sys
import time

from dori import distributed
from dori.commands.common import (
    add_fast_args,
    add_model_args,
    add_run_args,
    fast_path_from_args,
    load_model_from_args,
    write_json,
)
from dori.errors import DoriError


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="measure memorization of a model, with or without Dori")
    add_model_args(p)
    add_run_args(p)
    g = p.add_argument_group("items")
    g.add_argument(
        "--set", required=True, help="item set: a world set (vm, unique, heldout), vm/tm, or a file"
    )
    g.add_argument("--images", default=None, help="folder of SD training images named by LAION index")
    g.add_argument("--fetch", action="store_true", help="download missing SD training images (cached)")
    g.add_argument("--limit", type=int, default=None, help="only the first K items of the set")
    g.add_argument(
        "--skip", type=int, default=0, help="leave out the first K items of the set (before --limit)"
    )
    g = p.add_argument_group("model state and attack")
    g.add_argument("--mitigation", default="none", help="none, nemo:DIR or wanda:DIR (a fitted mitigation)")
    g.add_argument("--attack", default="none", choices=["none", "dori", "unlearndiffatk"])
    g.add_argument("--uda-timesteps", type=int, default=50, help="UnlearnDiffAtk timesteps (reference: 50)")
    g.add_argument("--uda-iterations", type=int, default=40, help="UnlearnDiffAtk steps per timestep (40)")
    g.add_argument("--steps", type=int, default=50, help="Dori steps (paper: 50)")
    g.add_argument("--lr", type=float, default=0.1, help="Dori Adam learning rate (paper: 0.1)")
    g.add_argument("--dori-batch", type=int, default=8, help="(noise, t) draws per Dori step (paper: 8)")
    g.add_argument(
        "--norm-ball", type=float, default=None, metavar="R",
        help="project each Dori embedding onto the L2 ball ||y|| <= R after every step (Appendix F.3; SD v1.4: "
        "280 = the largest norm a prompt reaches, 220 = the smallest); default: unconstrained",
    )  # fmt: skip
    g.add_argument("--init", default="prompt", help="Dori init: prompt, random or prompt-of:SET")
    g.add_argument(
        "--snapshots", default="1,10,25", help="Dori steps evaluated besides the last (comma list, or none)"
    )
    g = p.add_argument_group("control (the audit's false-positive rate)")
    g.add_argument(
        "--control", default=None, metavar="SET",
        help="also run Dori on SET, items the model did not memorize (world: heldout; SD v1.4: nonmem with "
        "--images), at the same snapshots, into OUT/control; reports the control's replication rate per budget",
    )  # fmt: skip
    g.add_argument(
        "--control-limit", type=int, default=None, help="first K control items (default: as many as audited)"
    )
    g.add_argument(
        "--control-level", type=float, default=0.05,
        help="tolerated control rate: the report names the largest step budget under it (default 0.05)",
    )  # fmt: skip
    g.add_argument(
        "--detection", default=None, metavar="DIR", help="a `dori detect` run on this model to join"
    )
    g = p.add_argument_group("protocol")
    g.add_argument("--n-gens", type=int, default=10, help="generations per item (paper: 10)")
    g.add_argument(
        "--jpeg", type=int, nargs="?", const=75, default=None, metavar="QUALITY",
        help="score generations after a JPEG round trip, as NeMo saves them (PIL default quality 75)",
    )  # fmt: skip
    g.add_argument(
        "--paraphrases", default=None, metavar="FILE|world",
        help="concept utility (Table 12): paraphrases per item id (JSON / JSON lines), or 'world' on the miniworld",
    )  # fmt: skip
    g.add_argument("--paraphrases-n", type=int, default=5, help="world paraphrases per item (5)")
    g.add_argument(
        "--a-clip", choices=["median", "mean"], default="median",
        help="A_CLIP per item: median (NeMo's compute_prompt_alignment.py) or mean",
    )  # fmt: skip
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (paper: 50)")
    g.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance (paper: 7)")
    g.add_argument("--batch-size", type=int, default=64, help="images per UNet batch when sampling")
    add_fast_args(p)
    g.add_argument("--utility-set", default=None, help="prompt set for FID/KID (heldout, coco, a file)")
    g.add_argument("--n-utility", type=int, default=None, help="first K prompts of the utility set")
    g.add_argument(
        "--utility-skip",
        type=int,
        default=0,
        help="leave out the first K utility prompts (a disjoint check set)",
    )
    g.add_argument("--reference-images", default=None, help="folder of FID/KID reference images")
    g = p.add_argument_group("feature models (default: the miniworld's stand-ins)")
    g.add_argument("--sscd", default=None, help="sscd_disc_mixup.torchscript.pt")
    g.add_argument("--clip", default=None, help="CLIP ViT-B/32 folder or hub id in the local cache")
    g.add_argument("--inception", default=None, help="clean-fid inception-2015-12-05.pt")
    p.set_defaults(func=run)


def _snapshots(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError as err:
        raise DoriError(f"--snapshots takes a comma list of steps, got {text!r}") from err


def _init(spec: str, model, n: int) -> tuple[str, list[str] | None]:
    if spec in ("prompt", "random"):
        return spec, None
    if spec.startswith("prompt-of:"):
        from dori.data.sets import load_set

        other = [it.prompt for it in load_set(spec.split(":", 1)[1], model, limit=None)]
        if not other:
            raise DoriError(f"--init {spec}: the set has no prompts")
        return "other", [other[i % len(other)] for i in range(n)]
    raise DoriError(f"unknown --init {spec!r}: use prompt, random or prompt-of:SET")


def _attack(args, init: str, model, n_items: int, config):
    """The attack object of ``--attack`` (None for ``none``) and the seconds ``--compile`` took (or None); on
    the fast path Dori's batches are tuned."""
    from dori.attacks.dori import Dori
    from dori.attacks.unlearndiffatk import UnlearnDiffAtk

    if args.norm_ball is not None and args.norm_ball <= 0:
        raise DoriError(f"--norm-ball must be positive, got {args.norm_ball}")
    dori = Dori(steps=args.steps, lr=args.lr, batch_size=args.dori_batch, norm_ball=args.norm_ball, init=init)
    fast = fast_path_from_args(args, model)  # the default on CUDA (bf16 weights); --no-fast: float32
    compile_s = None
    if fast is not None:  # batches sized from free memory; generation batches never below --batch-size
        from dori.fast import compile_hint

        dori, config.sampling, k = fast.tune_audit(model, config.sampling, dori, n_items)
        hint = compile_hint(n_items, model.device.type, fast.compile)
        if hint and args.attack == "dori":
            print(hint, file=sys.stderr)
        if fast.compile and model.device.type == "cuda":
            compile_s = fast.warm_up(model, dori, k, config.sampling)
            print(
                f"torch.compile: {compile_s:.1f} s once (UNet compiled for this audit's batches)",
                file=sys.stderr,
            )
    if args.attack == "dori":
        return dori, compile_s
    if args.attack == "unlearndiffatk":
        return UnlearnDiffAtk(timesteps=args.uda_timesteps, iterations=args.uda_iterations), compile_s
    return None, compile_s


def run(args) -> int:
    from dori.audit_run import audit_to_folder, utility_set, window
    from dori.data.sets import load_set
    from dori.evaluation import EvalConfig
    from dori.fingerprint import run_inputs
    from dori.metrics.backends import load_backends
    from dori.mitigations import load_mitigation
    from dori.models.pipeline import SamplingConfig
    from dori.report.tables import format_table

    start = time.perf_counter()
    start = time.perf_counter()
    snapshots = _snapshots(args.snapshots)
    model = load_model_from_args(args)
    items = window(load_set(args.set, model, images_dir=args.images, fetch=args.fetch), args.skip, args.limit)
    init, other = _init(args.init, model, len(items))
    inputs = run_inputs(items, model, args.mitigation)  # before the fast path casts the weights
    backends = load_backends(model, sscd=args.sscd, clip=args.clip, inception=args.inception)
    config = EvalConfig(
        n_gens=args.n_gens,
        sampling=SamplingConfig(steps=args.sample_steps, guidance=args.guidance, batch_size=args.batch_size),
        seed=args.seed,
        jpeg=args.jpeg,
        a_clip=args.a_clip,
    )
    mitigation = None if args.mitigation == "none" else load_mitigation(args.mitigation)
    attack, compile_s = _attack(args, init, model, len(items), config)
    ready = time.perf_counter()
    utility = None
    if args.utility_set is not None:
        utility = utility_set(
            args.utility_set, model, args.n_utility, args.utility_skip, args.reference_images
        )
    control = None
    if args.control is not None:  # refuse before any work
        if args.attack != "dori":
            raise DoriError("--control calibrates Dori's step budget: use it with --attack dori")
        if init == "other":
            raise DoriError(
                "--control with --init prompt-of:SET is not supported (the control items need their own)"
            )
        if not 0.0 <= args.control_level <= 1.0:
            raise DoriError(f"--control-level must be in [0, 1], got {args.control_level}")
        control = window(
            load_set(args.control, model, images_dir=args.images, fetch=args.fetch),
            0,
            args.control_limit or len(items),
        )
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(inputs)  # resume only on the same items, mitigation files and weights
    result = audit_to_folder(
        args.out, model, items, args.set, backends, config, mitigation=mitigation, attack=attack,
        snapshots=snapshots, utility=utility, init_prompts=other, settings=settings, model_label=args.model,
        progress=args.progress, startup_s=ready - start, compile_s=compile_s, paraphrases=_paraphrases(args.paraphrases, args.paraphrases_n, items),
        control=control, control_name=args.control, control_level=args.control_level, detection=args.detection,
    )  # fmt: skip
    if not distributed.is_main():  # the ranks of a torchrun job share one run: rank 0 writes its outputs
        return 0
    write_json(args.json, result)
    print(format_table(result["rows"]))
    if result.get("control"):
        from dori.control import format_control

        print(f"control: {args.control} ({result['control']['n_items']} items)")
        print(format_control(result["control"]))
    if result["skipped"]:
        print(f"{len(result['skipped'])} items skipped (no training image); see the JSON", file=sys.stderr)
    print(f"report: {args.out}/report.html", file=sys.stderr)
    timing = result.get("timing") or {}
    if timing.get("items_done"):
        line = f"{timing['items_done']} items in {timing['work_s']:.1f} s ({timing['s_per_item']:.2f} s/item"
        line += f" on {timing['world_size']} process(es)); start-up {timing['startup_s']:.1f} s"
        if timing.get("peak_allocated_gib") is not None:
            line += f"; peak GPU memory {timing['peak_allocated_gib']:.1f} GiB (rank 0)"
        print(line, file=sys.stderr)
    return 0


def _paraphrases(spec: str | None, n: int, items) -> dict | None:
    """``--paraphrases``: None, ``world`` (the miniworld's grammar) or a file (item id -> paraphrases)."""
    from dori.concept_utility import load_paraphrases, world_paraphrases

    if spec is None:
        return None
    if spec == "world":
        return world_paraphrases([it for it in items if it.skip_reason is None], n)
    return load_paraphrases(spec)
