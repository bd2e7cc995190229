"""The ``dori`` command: a thin layer over the library. Each subcommand lives in ``dori.commands.<name>``
and provides ``add_parser(subparsers)``; the parser's ``func`` runs it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from dori.commands.validate import validate_args
from dori.errors import DoriError

COMMANDS = [
    "models",
    "data",
    "miniworld",
    "analyze",
    "audit",
    "detect",
    "report",
    "mitigate",
    "finetune",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dori",
        description="Find and remove memorized training images in text-to-image diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dori.commands.{name}").add_parser(sub)
    return parser


# `dori mitigate <method>` for the weight-changing mitigations: the same command as `dori finetune <method>`
FINETUNE_ALIASES = {
    "adversarial-ft": "adversarial",
    "advft": "adversarial",
    "esd": "esd",
    "ca": "ca",
    "siss": "siss",
}


def _aliased(argv: list[str]) -> list[str]:
    if len(argv) >= 2 and argv[0] == "mitigate" and argv[1] in FINETUNE_ALIASES:
        return ["finetune", FINETUNE_ALIASES[argv[1]], *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_aliased(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        validate_args(args)  # the one check of command-line numbers, before any work
        with _ranks(args):
            return int(args.func(args) or 0)
    except DoriError as err:
        print(f"dori: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dori: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


# commands whose per-item work is sharded over the processes of a torchrun job (see dori.distributed)
SHARDED = ("audit", "detect", "mitigate")


@contextlib.contextmanager
def _ranks(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun (``torchrun --nproc_per_node N -m dori COMMAND ...``): join the process group, one
    device per rank (``cuda:LOCAL_RANK``, or the CPU with ``--device cpu``); ranks other than 0 print
    nothing to stdout and show no progress bars. A single process is left as it is."""
    from dori import distributed

    if not distributed.launched():
        yield
        return
    if args.command not in SHARDED:
        raise DoriError(
            f"dori {args.command} runs as one process; under torchrun only {', '.join(SHARDED)} share their "
            "items between processes (start it without torchrun)"
        )
    device = getattr(args, "device", None)
    ctx = distributed.init(device="cpu" if device == "cpu" else None)
    if not ctx.is_main:
        if hasattr(args, "progress"):
            args.progress = False
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            yield
    else:
        yield
    distributed.shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
