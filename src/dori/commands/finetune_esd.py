"""``dori finetune esd``: ESD erasing each memorized prompt (:class:`dori.mitigations.esd.ESD`).

Every option defaults to the method's own default, which is the reference's setting (``--variant reference``:
200 iterations, PNDM, 1024 px, bfloat16); ``--variant paper`` is Finding Dori's 10,000 iterations, the rest as
the reference. An option given on the command line overrides the variant's value; nothing else is changed.
"""

from __future__ import annotations

import argparse

from dori.commands.common import load_model_from_args
from dori.commands.finetune_common import add_common, finish, given, load_items
from dori.errors import DoriError
from dori.mitigations.esd import DTYPES, ESD, PARAMETER_SETS, SCHEDULERS, VARIANTS


def _resolution(value: str) -> int | None:
    if value == "model":
        return None
    try:
        side = int(value)
    except ValueError:
        side = 0
    if side < 8:
        raise DoriError(f"--resolution must be 'model' or a side of at least 8 pixels, got {value!r}")
    return side


def add_method(methods) -> None:
    e = methods.add_parser("esd", help="ESD: erase each memorized prompt (Gandikota et al.)")
    add_common(e)
    e.set_defaults(seed=None, func=run_esd)  # seed: the method's default (0)
    g = e.add_argument_group("ESD (defaults: the method's, i.e. the reference's esd_sd.py)")
    g.add_argument("--variant", default="reference", choices=sorted(VARIANTS), help="reference or paper")
    g.add_argument("--iterations", type=int, default=None, help=f"default: the variant's {VARIANTS}")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate ({ESD.lr})")
    g.add_argument("--negative-guidance", type=float, default=None, help=f"eta ({ESD.negative_guidance})")
    g.add_argument(
        "--sample-guidance",
        type=float,
        default=None,
        help=f"guidance when sampling x_t ({ESD.sample_guidance})",
    )
    g.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help=f"scheduler steps of the x_t sampling ({ESD.sample_steps})",
    )
    g.add_argument(
        "--scheduler", default=None, choices=sorted(SCHEDULERS), help=f"x_t sampler ({ESD.scheduler})"
    )
    g.add_argument(
        "--resolution", default=None,
        help=f"side in pixels of the x_t samples ({ESD.resolution}), or 'model' for the model's own size",
    )  # fmt: skip
    g.add_argument(
        "--train-dtype", default=None, choices=sorted(DTYPES), help=f"training dtype ({ESD.dtype})"
    )
    g.add_argument(
        "--parameters", default=None, choices=PARAMETER_SETS, help=f"parameter set ({ESD.parameters})"
    )


def build_esd(args: argparse.Namespace) -> ESD:
    """The :class:`ESD` the options describe (method defaults for every option not given)."""
    kw = given(args, "iterations", "lr", "negative_guidance", "sample_guidance", "sample_steps", "scheduler",
               "parameters", "seed")  # fmt: skip
    if args.resolution is not None:
        kw["resolution"] = _resolution(args.resolution)
    if args.train_dtype is not None:
        kw["dtype"] = args.train_dtype
    if kw.get("sample_steps", 1) < 1:
        raise DoriError(f"--sample-steps must be at least 1, got {kw['sample_steps']}")
    return ESD(variant=args.variant, **kw)


def run_esd(args: argparse.Namespace) -> int:
    esd = build_esd(args)
    model = load_model_from_args(args)
    items = load_items(args, model)
    esd(model, items, args.out)
    return finish(args, {"settings": esd.settings()})
