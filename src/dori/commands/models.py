"""``dori models``: list built-in models and known hub ids, and whether their weights are here."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list available models")
    p.set_defaults(func=run)


def run(args) -> int:
    from dori.models.loading import list_models

    for row in list_models():
        mark = "yes" if row["available"] else "no (weights not in the local cache)"
        print(f"{row['name']:40s} {row['kind']:9s} available: {mark}")
    return 0
