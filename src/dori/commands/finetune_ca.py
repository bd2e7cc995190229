"""``dori finetune ca``: Concept Ablation onto anchor prompts (:class:`dori.mitigations.concept_ablation`).

Every option defaults to the method's own default, the reference's memorization setting (``--variant
reference``: 400 steps, lr 5e-7 scaled to 2e-6, AdamW, resize augmentation, 1000 DPM-Solver anchors per item
kept at similarity <= 0.5); ``--variant paper`` is Finding Dori's 12,000 steps, the rest as the reference.
Anchor prompts come from ``--anchors FILE``, else from the miniworld's caption grammar.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dori.commands.common import load_model_from_args
from dori.commands.finetune_common import add_common, copy_check, finish, given, load_items
from dori.errors import DoriError
from dori.mitigations.concept_ablation import PARAMETER_SETS, VARIANTS, ConceptAblation


def add_method(methods) -> None:
    c = methods.add_parser("ca", help="Concept Ablation onto anchor prompts (Kumari et al.)")
    add_common(c)
    c.set_defaults(seed=None, func=run_ca)  # seed: the method's default (42)
    g = c.add_argument_group("Concept Ablation (defaults: the method's, i.e. the reference's train.py)")
    g.add_argument("--variant", default="reference", choices=sorted(VARIANTS), help="reference or paper")
    g.add_argument(
        "--steps", "--iterations", dest="steps", type=int, default=None,
        help=f"optimizer steps, all items together (default: the variant's {VARIANTS})",
    )  # fmt: skip
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"base learning rate ({ConceptAblation.lr}; x batch x 2 when scaled)",
    )
    g.add_argument("--no-scale-lr", dest="scale_lr", action="store_const", const=False, default=None,
                   help="use --lr as given (the reference scales it: --scale_lr)")  # fmt: skip
    g.add_argument(
        "--batch-size", type=int, default=None, help=f"anchor pairs per step ({ConceptAblation.batch_size})"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"AdamW weight decay ({ConceptAblation.weight_decay})",
    )
    g.add_argument(
        "--parameters",
        default=None,
        choices=sorted(PARAMETER_SETS),
        help=f"parameter set ({ConceptAblation.parameters})",
    )
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="no resize augmentation (and no loss mask, no prompt prefixes)")  # fmt: skip
    g.add_argument(
        "--anchor-images",
        type=int,
        default=None,
        help=f"anchor images per item ({ConceptAblation.anchor_images})",
    )
    g.add_argument(
        "--anchor-steps",
        type=int,
        default=None,
        help=f"DPM-Solver steps of the anchors ({ConceptAblation.anchor_steps})",
    )
    g.add_argument(
        "--anchor-guidance",
        type=float,
        default=None,
        help=f"guidance of the anchors ({ConceptAblation.anchor_guidance})",
    )
    g.add_argument(
        "--anchor-threshold",
        type=float,
        default=None,
        help=f"keep anchors at <= this ({ConceptAblation.anchor_threshold})",
    )
    g.add_argument(
        "--anchors", default=None, help="anchor prompts: .jsonl {id, anchors} or .txt (one per line)"
    )
    g.add_argument(
        "--n-anchors", type=int, default=8, help="anchor prompts per item from the world's grammar"
    )


def build_ca(args: argparse.Namespace) -> ConceptAblation:
    """The :class:`ConceptAblation` the options describe (method defaults for every option not given)."""
    kw = given(args, "steps", "lr", "scale_lr", "batch_size", "weight_decay", "parameters", "augment",
               "anchor_images", "anchor_steps", "anchor_guidance", "anchor_threshold", "seed")  # fmt: skip
    if kw.get("anchor_steps", 1) < 1:
        raise DoriError(f"--anchor-steps must be at least 1, got {kw['anchor_steps']}")
    return ConceptAblation(variant=args.variant, **kw)


def anchors_from_args(args: argparse.Namespace, model, items, seed: int):
    """Anchor prompts: the ``--anchors`` file, else the miniworld's caption grammar."""
    from dori.mitigations.concept_ablation import miniworld_anchors

    if args.anchors:
        path = Path(args.anchors)
        if not path.exists():
            raise DoriError(f"--anchors file {path} does not exist")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return {str(r["id"]): list(r["anchors"]) for r in rows}
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    from dori.miniworld.world import world_of

    if world_of(model) is None:
        raise DoriError("ca needs --anchors FILE for a model that is not a miniworld")
    from dori.data.sets import load_set

    avoid = [it.prompt for name in ("vm", "tm") for it in load_set(name, model)]
    return {it.id: miniworld_anchors(it.prompt, args.n_anchors, avoid, seed) for it in items}


def run_ca(args: argparse.Namespace) -> int:
    ca = build_ca(args)
    model = load_model_from_args(args)
    items = load_items(args, model)
    similarity, _, _ = copy_check(args, model)  # anchors kept at <= anchor_threshold, the reference's rule
    anchors = anchors_from_args(args, model, items, ca.seed)
    ca(model, items, args.out, anchors=anchors, similarity=similarity)
    return finish(args, {"settings": ca.settings()})
