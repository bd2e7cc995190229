"""``dori finetune siss``: SISS per memorized item (:class:`dori.mitigations.siss.SISS`); one model per item
under ``OUT/<item id>/``.

Every option defaults to the method's own default, the reference's (``--variant reference``: generations of
a random-token prompt split by 2-means, t = 999, summed losses, 35 steps x 16, scaling norm 750). The data
recipe is the variant: ``paper`` (Finding Dori App. E.2: 128 generations split by the copy detector) or
``surrogates`` (keep = surrogate images, forget = the training image; the surrogate options apply only there).
"""

from __future__ import annotations

import argparse
import math

from dori.commands.common import load_model_from_args
from dori.commands.finetune_common import (
    SURROGATE_OPTIONS,
    add_common,
    add_surrogate_args,
    copy_check,
    finish,
    given,
    load_items,
    surrogates,
)
from dori.errors import DoriError
from dori.mitigations.siss import SISS, VARIANTS


def _scaling(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise DoriError(f"--scaling-norm must be a positive number or auto, got {value!r}")
    return number


def _timestep(value: str) -> int | None:
    if value == "uniform":
        return None
    try:
        t = int(value)
    except ValueError:
        t = -1
    if t < 0:
        raise DoriError(f"--timestep must be a timestep >= 0 or uniform, got {value!r}")
    return t


def add_method(methods) -> None:
    s = methods.add_parser("siss", help="SISS per item (Alberti et al.), one model per item")
    add_common(s)
    add_surrogate_args(s, note="only with --variant surrogates")
    s.set_defaults(seed=None, func=run_siss)  # seed: the method's default (42)
    g = s.add_argument_group("SISS (defaults: the method's, i.e. the reference's delete_sd.yaml)")
    g.add_argument("--variant", default="reference", choices=VARIANTS, help=f"data recipe ({SISS.variant})")
    g.add_argument(
        "--steps", "--iterations", dest="steps", type=int, default=None, help=f"steps per item ({SISS.steps})"
    )
    g.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({SISS.lr})")
    g.add_argument("--grad-accum", type=int, default=None, help=f"micro-batches per step ({SISS.grad_accum})")
    g.add_argument("--lam", type=float, default=None, help=f"mixture weight lambda ({SISS.lam})")
    g.add_argument(
        "--scaling-norm", default=None,
        help=f"deletion gradient norm ({SISS.scaling_norm}, SD v1.4's scale), or auto: 10%% of the first keep "
        "gradient norm",
    )  # fmt: skip
    g.add_argument("--timestep", default=None, help=f"t of every sample ({SISS.timestep}), or uniform")
    g.add_argument(
        "--n-images",
        type=int,
        default=None,
        help=f"generations per item, variants reference and paper ({SISS.n_images})",
    )


def build_siss(args: argparse.Namespace) -> SISS:
    """The :class:`SISS` the options describe (method defaults for every option not given)."""
    kw = given(args, "steps", "lr", "grad_accum", "lam", "n_images", "seed")
    for name in ("grad_accum", "n_images"):
        if kw.get(name, 1) < 1:
            raise DoriError(f"--{name.replace('_', '-')} must be at least 1, got {kw[name]}")
    if args.scaling_norm is not None:
        kw["scaling_norm"] = _scaling(args.scaling_norm)
    if args.timestep is not None:
        kw["timestep"] = _timestep(args.timestep)
    if args.variant != "surrogates":
        extra = [f"--{o.replace('_', '-')}" for o in SURROGATE_OPTIONS if getattr(args, o, None) is not None]
        if extra:
            raise DoriError(f"{', '.join(extra)} only apply to --variant surrogates (got {args.variant!r})")
    return SISS(variant=args.variant, **kw)


def run_siss(args: argparse.Namespace) -> int:
    siss = build_siss(args)
    model = load_model_from_args(args)
    items = load_items(args, model)
    if siss.variant == "surrogates":
        kw = {"keep": surrogates(args, model, items)}
    else:
        similarity, threshold, _ = copy_check(args, model)
        kw = {"similarity": similarity, "threshold": threshold}
    skipped: dict[str, str] = {}

    def log(record: dict) -> None:
        if record.get("kind") == "skipped":
            skipped.update(record["items"])

    folders = siss(model, items, args.out, log=log, **kw)
    for item_id, why in skipped.items():
        print(f"dori finetune siss: {item_id} has no model: {why}")
    models = {k: str(v) for k, v in folders.items()}
    return finish(args, {"settings": siss.settings(), "models": models, "skipped": skipped})
