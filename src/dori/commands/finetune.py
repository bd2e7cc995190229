"""``dori finetune adversarial|esd|ca|siss``: weight-changing mitigations; the result loads with ``--model DIR``.

* ``adversarial``: adversarial fine-tuning (Finding Dori, Algorithm 2). Surrogate images come from
  ``--surrogates DIR`` (a folder, see :mod:`dori.mitigations.surrogates`), or are generated from the memorized
  prompts under ``--surrogate-mitigation nemo:DIR`` (the paper's way), or by ``--surrogate-model M`` (another
  model that never trained on the items, Appendix I.1). With both ``--surrogate-mitigation`` and
  ``--surrogate-model``, the other model serves only the items the mitigation leaves replicating (recorded as
  ``fallback_items`` in ``OUT/surrogates/surrogates.json``). One of the three is required: generating from the
  memorizing model without a mitigation gives replicas, which would teach the model its own memorized images.
  Generated surrogates are checked with the copy detector and saved to ``OUT/surrogates``.
* ``esd``: ESD-x erasing each memorized prompt. ``ca``: Concept Ablation onto anchor prompts (``--anchors
  FILE``, else the miniworld's caption grammar). ``siss``: SISS per item, keep set = surrogates (as above),
  forget set = the training image; writes one model per item under ``OUT/<item id>/``.

Defaults are the reference settings (METHODS.md; the classes' docstrings); the miniworld values used for the
paper's tables are in ``experiments/table5_adversarial_ft.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dori.commands.common import DTYPES, add_model_args, add_run_args, load_model_from_args, write_json
from dori.errors import DoriError

METHODS = ("adversarial", "esd", "ca", "siss")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model to remove memorized items (writes a model folder)")
    p.add_argument("method", choices=METHODS)
    add_model_args(p)
    add_run_args(p)
    g = p.add_argument_group("items")
    g.add_argument("--set", required=True, help="memorized items: a world set (vm), an SD set, or a file")
    g.add_argument("--images", default=None, help="folder of SD training images named by LAION index")
    g.add_argument("--limit", type=int, default=None, help="only the first K items")
    g.add_argument("--sscd", default=None, help="copy detector file (default: the miniworld's stand-in)")
    g = p.add_argument_group("surrogates (adversarial, siss)")
    g.add_argument("--surrogates", default=None, help="folder of surrogate images (<id>/*.png)")
    g.add_argument("--surrogate-mitigation", default=None, help="generate under this mitigation (nemo:DIR)")
    g.add_argument(
        "--surrogate-model",
        default=None,
        help="generate with this other model (App. I.1); with --surrogate-mitigation, only for the items the "
        "mitigation leaves replicating",
    )
    g.add_argument("--surrogates-per-item", type=int, default=4)
    g.add_argument("--surrogate-rounds", type=int, default=3, help="generation rounds at most per item")
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for generated images")
    g.add_argument("--guidance", type=float, default=7.0, help="guidance for generated images")
    g = p.add_argument_group("adversarial")
    g.add_argument("--epochs", type=int, default=None, help="E (default: the method's, 8; the paper: 5)")
    g.add_argument("--steps-per-embedding", type=int, default=3, help="S (Table 16 one step: 1)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--items-per-step", type=int, default=1)
    g.add_argument(
        "--embeddings-per-item",
        type=int,
        default=None,
        help="adversarial embeddings per item and epoch (default 2)",
    )
    g.add_argument("--utility-set", default="unique", help="non-memorized image-caption pairs")
    g.add_argument(
        "--n-utility",
        type=int,
        default=2000,
        help="first K utility pairs (default 2000, the recipes'; 0: all)",
    )
    g.add_argument(
        "--noise-draws",
        type=int,
        default=None,
        help="(surrogate, noise, t) draws per adversarial embedding per update (default 8; 1 = Algorithm 2 literally)",
    )
    g.add_argument(
        "--utility-batch",
        type=int,
        default=None,
        help="utility pairs per update (default 64; 0 = as many as adversarial samples, App. I.1)",
    )
    g.add_argument(
        "--utility-weight",
        type=float,
        default=None,
        help="lambda in L_adv + lambda * L_DM (default 10; 1 = Algorithm 2's plain sum)",
    )
    g.add_argument("--dori-steps", type=int, default=50, help="Dori steps per search (0: the init itself)")
    g.add_argument("--dori-lr", type=float, default=0.1)
    g.add_argument("--dori-batch", type=int, default=8)
    g.add_argument(
        "--init-schedule",
        default=None,
        choices=["alternate", "prompt", "random", "both"],
        help="Dori init per epoch (default both: one prompt-init and one random-init embedding per item; "
        "alternate = Algorithm 2)",
    )
    g.add_argument("--no-utility-loss", action="store_true", help="Table 16 ablation")
    g.add_argument("--no-mitigation-loss", action="store_true", help="Table 16 ablation")
    g.add_argument("--lora", action="store_true", help="LoRA rank 128 instead of full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=128)
    g.add_argument("--lora-convs", action="store_true", help="LoRA on convolutions too")
    g.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="autocast (GPU)")
    g.add_argument(
        "--stop-mr",
        type=float,
        default=None,
        help="stop once the epoch's own Dori embeddings replicate at most this share of items (default: off)",
    )
    g.add_argument("--stop-generations", type=int, default=4, help="generations per item for --stop-mr")
    g.add_argument("--check-utility", type=int, default=0, help="App. I.7 check on the first K utility pairs")
    g = p.add_argument_group("esd / ca / siss")
    g.add_argument("--iterations", type=int, default=None, help="ESD iterations / CA / SISS steps")
    g.add_argument("--negative-guidance", type=float, default=2.0, help="ESD eta")
    g.add_argument(
        "--parameters", default=None, help="esd-x|esd-u|esd-all|esd-x-strict; full-weight|cross-attn"
    )
    g.add_argument("--anchors", default=None, help="CA anchors: .jsonl {id, anchors} or .txt (one per line)")
    g.add_argument("--n-anchors", type=int, default=8, help="CA anchor prompts per item from the grammar")
    g.add_argument("--anchor-images", type=int, default=1000, help="CA anchor images per item")
    g.add_argument("--scaling-norm", default="750", help="SISS deletion gradient norm, or auto")
    p.set_defaults(func=run)


def _log(args):
    def emit(record: dict) -> None:
        if args.progress and record.get("kind") in ("start", "epoch", "check"):
            print(json.dumps(record), file=sys.stderr)

    return emit


def _backends(args, model):
    from dori.metrics.backends import load_backends

    return load_backends(model, sscd=args.sscd)


def _replica_check(args, model):
    """The copy detector's similarity and its replication threshold (the SSCD role)."""
    from dori.mitigations.surrogates import embedder_similarity

    backends = _backends(args, model)
    return embedder_similarity(backends.copy_detector), backends.threshold


def _surrogates(args, model, items, out: Path):
    """Load or make the surrogate set (saved to OUT/surrogates, reused when the command runs again)."""
    from dori.mitigations.surrogates import embedder_similarity, generate_surrogates, load_surrogates
    from dori.models.pipeline import SamplingConfig

    if args.surrogates:
        return load_surrogates(args.surrogates, items, size=model.image_size)
    folder = out / "surrogates"
    if (folder / "surrogates.json").exists():
        return load_surrogates(folder, items, size=model.image_size)
    backends = _backends(args, model)
    similarity, threshold = embedder_similarity(backends.copy_detector), backends.threshold
    if args.surrogate_mitigation is None and args.surrogate_model is None:
        from dori.mitigations.self_surrogates import SelfSurrogates, surrogate_summary

        policy = SelfSurrogates(
            per_item=args.surrogates_per_item, seed=args.seed, sample_steps=args.sample_steps,
            guidance=args.guidance,
        )  # fmt: skip
        surr = policy(model, items, similarity, threshold, aligner=backends.aligner)
        summary = surrogate_summary(surr, threshold)
        settings = {
            "policy": "self",
            "model": args.model,
            "threshold": threshold,
            "copy_detector": backends.copy_detector.name,
            "aligner": None if backends.aligner is None else backends.aligner.name,
            **policy.settings(),
            "summary": {k: v for k, v in summary.items() if k != "items"},
        }
        surr.save(folder, settings)
        return surr
    config = SamplingConfig(steps=args.sample_steps, guidance=args.guidance)
    other = None
    if args.surrogate_model is not None:
        from dori.models.loading import load_model

        other = load_model(args.surrogate_model, device=model.device, allow_download=args.download)

    def make(generator, wanted, mitigation=None):
        return generate_surrogates(
            generator, wanted, similarity, threshold, mitigation=mitigation, per_item=args.surrogates_per_item,
            max_rounds=args.surrogate_rounds, seed=args.seed, config=config,
        )  # fmt: skip

    fallback: list[str] = []
    if args.surrogate_mitigation is None:
        surr = make(other, items)  # Appendix I.1: another model that never trained on the items
    else:
        from dori.mitigations import load_mitigation

        surr = make(model, items, load_mitigation(args.surrogate_mitigation).applied)
        if other is not None and surr.failed:  # the mitigation left these replicating: ask the other model
            fallback = [it.id for it in items if it.id in surr.failed]
            surr.merge(make(other, [it for it in items if it.id in surr.failed]))
    settings = {
        "mitigation": args.surrogate_mitigation,
        "model": args.model if args.surrogate_mitigation else args.surrogate_model,
        "fallback_model": args.surrogate_model if args.surrogate_mitigation else None,
        "fallback_items": fallback,
        "threshold": backends.threshold,
        "copy_detector": backends.copy_detector.name,
        "per_item": args.surrogates_per_item,
        "seed": args.seed,
    }
    surr.save(folder, settings)
    return surr


def _anchors(args, model, items):
    from dori.mitigations.concept_ablation import miniworld_anchors

    if args.anchors:
        path = Path(args.anchors)
        if not path.exists():
            raise DoriError(f"--anchors file {path} does not exist")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return {str(r["id"]): list(r["anchors"]) for r in rows}
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if "world_dir" not in model.info:
        raise DoriError("ca needs --anchors FILE for a model that is not a miniworld")
    from dori.data.sets import load_set

    avoid = [it.prompt for name in ("vm", "tm") for it in load_set(name, model)]
    return {it.id: miniworld_anchors(it.prompt, args.n_anchors, avoid, args.seed) for it in items}


def run(args) -> int:
    from dori.data.sets import load_set

    model = load_model_from_args(args)
    items = load_set(args.set, model, images_dir=args.images, limit=args.limit)
    if not items:
        raise DoriError(f"set {args.set!r} has no items")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": args.method, "model": args.model, "set": args.set, "out": str(out)}
    if args.method == "adversarial":
        summary.update(_adversarial(args, model, items, out))
    elif args.method == "esd":
        from dori.mitigations.esd import ESD

        esd = ESD(
            iterations=args.iterations or 200, lr=args.lr or 5e-5, negative_guidance=args.negative_guidance,
            parameters=args.parameters or "esd-x", seed=args.seed,
        )  # fmt: skip
        esd(model, items, out)
        summary["settings"] = esd.settings()
    elif args.method == "ca":
        from dori.mitigations.concept_ablation import ConceptAblation

        similarity, threshold = _replica_check(args, model)
        ca = ConceptAblation(
            steps=args.iterations or 400, lr=args.lr or 5e-7, parameters=args.parameters or "full-weight",
            anchor_images=args.anchor_images, seed=args.seed,
        )  # fmt: skip
        ca(
            model,
            items,
            out,
            anchors=_anchors(args, model, items),
            similarity=similarity,
            threshold=threshold,
        )
        summary["settings"] = ca.settings()
    else:
        from dori.mitigations.siss import SISS

        scaling = None if args.scaling_norm == "auto" else float(args.scaling_norm)
        siss = SISS(steps=args.iterations or 35, lr=args.lr or 1e-5, scaling_norm=scaling, seed=args.seed)
        folders = siss(model, items, out, keep=_surrogates(args, model, items, out))
        summary["settings"] = siss.settings()
        summary["models"] = {k: str(v) for k, v in folders.items()}
    write_json(args.json, summary)
    print(
        f"dori finetune {args.method}: model written to {out}"
        + (" (one folder per item)" if args.method == "siss" else "")
    )
    return 0


def _adversarial(args, model, items, out: Path) -> dict:
    from dori.data.sets import load_set
    from dori.mitigations.adversarial_ft import AdversarialFineTuning

    defaults = AdversarialFineTuning()
    schedule = args.init_schedule or defaults.init_schedule
    per_item = args.embeddings_per_item or (defaults.embeddings_per_item if schedule == "both" else 1)
    ft = AdversarialFineTuning(
        epochs=args.epochs or defaults.epochs,
        steps_per_embedding=args.steps_per_embedding,
        lr=args.lr or defaults.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        items_per_step=args.items_per_step,
        embeddings_per_item=per_item,
        noise_draws=defaults.noise_draws if args.noise_draws is None else args.noise_draws,
        utility_batch=defaults.utility_batch if args.utility_batch is None else (args.utility_batch or None),
        dori_steps=args.dori_steps,
        dori_lr=args.dori_lr,
        dori_batch=args.dori_batch,
        init_schedule=schedule,
        utility_loss=not args.no_utility_loss,
        utility_weight=defaults.utility_weight if args.utility_weight is None else args.utility_weight,
        mitigation_loss=not args.no_mitigation_loss,
        lora_rank=args.lora_rank if (args.lora or args.lora_convs) else None,
        lora_convs=args.lora_convs,
        stop_mr=args.stop_mr,
        stop_generations=args.stop_generations,
        seed=args.seed,
        autocast_dtype=DTYPES[args.autocast] if args.autocast else None,
    )  # settings are checked here, before minutes of surrogate generation
    surr = None if args.no_mitigation_loss else _surrogates(args, model, items, out)
    utility = [] if args.no_utility_loss else load_set(args.utility_set, model, limit=args.n_utility or None)
    check = {}
    if args.stop_mr is not None:
        from dori.models.pipeline import SamplingConfig

        similarity, threshold = _replica_check(args, model)
        check = dict(
            similarity=similarity,
            threshold=threshold,
            sampling=SamplingConfig(steps=args.sample_steps, guidance=args.guidance),
        )
    tuned = ft(model, items, out, surrogates=surr, utility=utility, log=_log(args), **check)
    result = {"settings": ft.settings(), "skipped": {} if surr is None else surr.failed}
    if args.check_utility > 0 and utility:
        result["utility_memorization"] = _check_utility(
            args, model, tuned, utility[: args.check_utility], out
        )
    return result


def _check_utility(args, before, after, utility, out: Path) -> dict:
    from dori.mitigations.surrogates import compare_utility_memorization, utility_memorization
    from dori.models.pipeline import SamplingConfig
    from dori.runs import atomic_write_text

    sim, threshold = _replica_check(args, before)
    config = SamplingConfig(steps=args.sample_steps, guidance=args.guidance)
    runs = [
        utility_memorization(m, utility, sim, threshold, seed=args.seed, config=config)
        for m in (before, after)
    ]
    report = dict(compare_utility_memorization(*runs), before_detail=runs[0], after_detail=runs[1])
    atomic_write_text(out / "utility_memorization.json", json.dumps(report, indent=2))
    return {k: report[k] for k in ("before", "after", "newly_memorized", "passed")}
