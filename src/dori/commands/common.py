"""Options shared by subcommands: model, device, dtype, seed, out, json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dori.errors import DoriError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


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


def resolve_device(name: str | None) -> str:
    from dori import distributed

    if distributed.launched() and name in (None, "cuda"):  # torchrun: this rank's device
        return str(distributed.current().device)
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DoriError(f"--device {name} asked for but no CUDA device is available")
    return name


def load_model_from_args(args: argparse.Namespace):
    from dori.models.loading import load_model

    return load_model(
        args.model,
        device=resolve_device(args.device),
        dtype=DTYPES[args.dtype],
        allow_pickle=args.allow_pickle,
        allow_download=args.download,
    )


def write_json(path: str | None, obj: dict) -> None:
    if path:
        from dori.runs import atomic_write_text

        atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str))
