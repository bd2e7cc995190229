"""``dori data``: list the prompt sets and their sizes."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="list prompt/item sets")
    p.add_argument("--model", default=None, help="also list the sets of this model's world (e.g. miniworld)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dori.data.sets import SD_SETS, sd_set

    for name in SD_SETS:
        print(f"{name:10s} {len(sd_set(name)):6d} prompts (SD v1.4 lists, images not shipped)")
    if args.model:
        from pathlib import Path

        from dori.data.world_sets import WORLD_SETS, world_set
        from dori.models.loading import resolve

        folder = resolve(args.model)
        if isinstance(folder, Path):
            for name in WORLD_SETS:
                items = world_set(folder, name)
                if items is not None:
                    print(f"{name:10s} {len(items):6d} items ({args.model} world, with images)")
    return 0
