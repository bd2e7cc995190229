"""``dori finetune adversarial|esd|ca|siss``: weight-changing mitigations; the result loads with ``--model DIR``.

One sub-command per method, each with only its own options (``dori finetune esd --help``):

* ``adversarial``: adversarial fine-tuning (Finding Dori, Algorithm 2), :mod:`dori.commands.finetune_adversarial`.
* ``esd``: ESD-x erasing each memorized prompt. ``ca``: Concept Ablation onto anchor prompts (``--anchors
  FILE``, else the miniworld's caption grammar). ``siss``: SISS per item, keep set = surrogates, forget set =
  the training image; writes one model per item under ``OUT/<item id>/``.

Surrogates (adversarial, siss) follow :mod:`dori.mitigations.surrogate_policy`. Defaults are the reference
settings (METHODS.md; the classes' docstrings); the miniworld values of the paper's tables are in
``experiments/tables3_5_finetuning.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dori.commands import finetune_adversarial
from dori.commands.common import load_model_from_args
from dori.commands.finetune_common import (
    add_common,
    add_surrogate_args,
    copy_check,
    finish,
    load_items,
    surrogates,
)
from dori.errors import DoriError


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model to remove memorized items (writes a model folder)")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    finetune_adversarial.add_method(methods)
    e = methods.add_parser("esd", help="ESD: erase each memorized prompt (Gandikota et al.)")
    add_common(e)
    g = e.add_argument_group("ESD")
    g.add_argument("--iterations", type=int, default=200)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--negative-guidance", type=float, default=2.0, help="eta")
    g.add_argument("--parameters", default="esd-x", help="esd-x, esd-u, esd-all or esd-x-strict")
    e.set_defaults(func=run_esd)
    c = methods.add_parser("ca", help="Concept Ablation onto anchor prompts (Kumari et al.)")
    add_common(c)
    g = c.add_argument_group("Concept Ablation")
    g.add_argument("--iterations", type=int, default=400, help="steps")
    g.add_argument("--lr", type=float, default=5e-7)
    g.add_argument("--parameters", default="full-weight", help="full-weight or cross-attn")
    g.add_argument("--anchors", default=None, help="anchors: .jsonl {id, anchors} or .txt (one per line)")
    g.add_argument("--n-anchors", type=int, default=8, help="anchor prompts per item from the grammar")
    g.add_argument("--anchor-images", type=int, default=1000, help="anchor images per item")
    c.set_defaults(func=run_ca)
    s = methods.add_parser("siss", help="SISS per item: keep = surrogates, forget = the training image")
    add_common(s)
    add_surrogate_args(s)
    g = s.add_argument_group("SISS")
    g.add_argument("--iterations", type=int, default=35, help="steps")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--scaling-norm", default="750", help="deletion gradient norm, or auto")
    s.set_defaults(func=run_siss)


def run_esd(args) -> int:
    from dori.mitigations.esd import ESD

    model = load_model_from_args(args)
    items = load_items(args, model)
    esd = ESD(
        iterations=args.iterations, lr=args.lr, negative_guidance=args.negative_guidance,
        parameters=args.parameters, seed=args.seed,
        resolution=None, dtype="float32",  # the model's own size in float32
    )  # fmt: skip
    esd(model, items, args.out)
    return finish(args, {"settings": esd.settings()})


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
    from dori.miniworld.world import world_of

    if world_of(model) is None:
        raise DoriError("ca needs --anchors FILE for a model that is not a miniworld")
    from dori.data.sets import load_set

    avoid = [it.prompt for name in ("vm", "tm") for it in load_set(name, model)]
    return {it.id: miniworld_anchors(it.prompt, args.n_anchors, avoid, args.seed) for it in items}


def run_ca(args) -> int:
    from dori.mitigations.concept_ablation import ConceptAblation

    model = load_model_from_args(args)
    items = load_items(args, model)
    similarity, _, _ = copy_check(args, model)  # anchors kept at <= 0.5, the reference's rule
    ca = ConceptAblation(
        steps=args.iterations, lr=args.lr, parameters=args.parameters, anchor_images=args.anchor_images,
        seed=args.seed,
    )  # fmt: skip
    anchors = _anchors(args, model, items)
    ca(model, items, args.out, anchors=anchors, similarity=similarity)
    return finish(args, {"settings": ca.settings()})


def run_siss(args) -> int:
    from dori.mitigations.siss import SISS

    model = load_model_from_args(args)
    items = load_items(args, model)
    scaling = None if args.scaling_norm == "auto" else float(args.scaling_norm)
    siss = SISS(steps=args.iterations, lr=args.lr, scaling_norm=scaling, seed=args.seed, variant="surrogates")
    folders = siss(model, items, args.out, keep=surrogates(args, model, items))
    return finish(args, {"settings": siss.settings(), "models": {k: str(v) for k, v in folders.items()}})
