"""The ``dori`` command: a thin layer over the library. Each subcommand lives in ``dori.commands.<name>``
and provides ``add_parser(subparsers)``; the parser's ``func`` runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

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
        return int(args.func(args) or 0)
    except DoriError as err:
        print(f"dori: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dori: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
