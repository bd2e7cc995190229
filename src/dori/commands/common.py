"""Options shared by subcommands: model, device, dtype, seed, out, json, the fast path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dori.errors import DoriError
from dori.models.devices import DTYPES, resolve_device  # noqa: F401  (re-exported for the commands)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="miniworld",
        help="built-in name (miniworld, tiny-random, sd14-random, sd2-random), local diffusers folder or hub id",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (default fp32)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .bin/.ckpt pickle checkpoints (trusted sources only)",
    )
    p.add_argument(
        "--download", action="store_true", help="allow fetching a hub model (default: local cache only)"
    )


def add_run_args(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument(
        "--out", default=out_default, required=out_default is None, help="run directory (resumable)"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def load_model_from_args(args: argparse.Namespace):
    from dori.models.devices import open_model

    return open_model(args.model, args.device, args.dtype, args.allow_pickle, args.download)


def write_json(path: str | None, obj: dict) -> None:
    if path:
        from dori.runs import atomic_write_text

        atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str))


def add_fast_args(parser: argparse.ArgumentParser) -> None:
    """``--fast/--no-fast``, ``--compile`` and ``--memory-budget-gib`` for commands that run searches or
    sampling. The fast path is the default on CUDA (docs/performance.md: bf16 gives float32's results within
    bf16 rounding at 5-8x the speed); ``--no-fast`` (or ``--dtype`` other than fp32) runs plain float32."""
    parser.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 UNet/VAE weights and flash attention on CUDA, batches sized from free memory "
        "(default: on with CUDA and --dtype fp32; --no-fast: plain float32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with the fast path: torch.compile the UNet (compiled once at the start, its time printed; "
        "pays on long audits, e.g. 500 prompts)",
    )
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="most GPU memory the fast path's batches may use (default: the card's free memory)",
    )


def fast_path_from_args(args: argparse.Namespace, model):
    """Apply the fast path if ``--fast`` was given, or by default on CUDA with ``--dtype fp32``; return it
    (or None). ``args.fast`` is set to the choice made, so the run's config records it."""
    fp32 = getattr(args, "dtype", "fp32") in ("fp32", "float32")
    choice = getattr(args, "fast", None)
    if choice is None:
        choice = fp32 and model.device.type == "cuda"
    args.fast = bool(choice)
    if not args.fast:
        return None
    if not fp32:
        raise DoriError("--fast chooses the dtype itself (bf16 on CUDA); drop --dtype")
    from dori.fast import fast

    return fast(model, memory_budget_gib=args.memory_budget_gib, compile=getattr(args, "compile", False))
