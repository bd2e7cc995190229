"""Options and helpers shared by the ``dori finetune`` sub-commands (items, surrogates, the copy check)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dori.commands.common import add_model_args, add_run_args, write_json
from dori.errors import DoriError


def add_common(p: argparse.ArgumentParser) -> None:
    """Model, run and item options every fine-tuning method takes."""
    add_model_args(p)
    add_run_args(p)
    g = p.add_argument_group("items")
    g.add_argument("--set", required=True, help="memorized items: a world set (vm), an SD set, or a file")
    g.add_argument("--images", default=None, help="folder of SD training images named by LAION index")
    g.add_argument("--limit", type=int, default=None, help="only the first K items")
    g.add_argument("--sscd", default=None, help="copy detector file (default: the miniworld's stand-in)")


SURROGATE_OPTIONS = ("surrogates", "surrogate_mitigation", "surrogate_model")


def given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` given on the command line (not None), as keyword arguments; the rest
    are left to the method's own defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_surrogate_args(p: argparse.ArgumentParser, note: str = "") -> None:
    title = "surrogates (dori.mitigations.surrogate_policy)"
    g = p.add_argument_group(f"{title}; {note}" if note else title)
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


def load_items(args, model):
    from dori.data.sets import load_set
    from dori.mitigations.checkpoints import check_output
    from dori.models.identity import model_sources

    items = load_set(args.set, model, images_dir=args.images, limit=args.limit)
    if not items:
        raise DoriError(f"set {args.set!r} has no items")
    check_output(
        Path(args.out), model_sources(model)
    )  # before any work: never over the input model or another run
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return items


def copy_check(args, model):
    """The copy detector's similarity, its replication threshold and its name."""
    from dori.metrics.backends import load_backends
    from dori.metrics.replication import copy_similarity

    backends = load_backends(model, sscd=args.sscd)
    return copy_similarity(backends.copy_detector), backends.threshold, backends.copy_detector.name


def surrogates(args, model, items):
    """The surrogate set of the surrogate options (loaded or generated and saved to OUT/surrogates)."""
    from dori.mitigations import load_mitigation
    from dori.mitigations.surrogate_policy import SurrogatePolicy

    policy = SurrogatePolicy(
        folder=args.surrogates, per_item=args.surrogates_per_item, rounds=args.surrogate_rounds,
        sample_steps=args.sample_steps, guidance=args.guidance, seed=args.seed,
    )  # fmt: skip
    needs = not args.surrogates and not (Path(args.out) / "surrogates" / "surrogates.json").exists()
    mitigation = load_mitigation(args.surrogate_mitigation) if needs and args.surrogate_mitigation else None
    other = None
    if needs and args.surrogate_model is not None:
        from dori.models.loading import load_model

        other = load_model(args.surrogate_model, device=model.device, allow_download=args.download)

    def aligner():
        from dori.metrics.backends import load_backends

        return load_backends(model, sscd=args.sscd).aligner

    return policy.surrogates(
        model, items, args.out, lambda: copy_check(args, model), mitigation, other, aligner=aligner
    )


def finish(args, summary: dict) -> int:
    write_json(
        args.json, {"method": args.method, "model": args.model, "set": args.set, "out": args.out, **summary}
    )
    note = " (one folder per item)" if args.method == "siss" else ""
    print(f"dori finetune {args.method}: model written to {args.out}{note}")
    return 0


def log_to_stderr(args):
    def emit(record: dict) -> None:
        if args.progress and record.get("kind") in ("start", "epoch", "check"):
            print(json.dumps(record), file=sys.stderr)

    return emit
