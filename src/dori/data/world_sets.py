"""A miniworld's own item sets: ``vm``, ``tm``, ``unique``, ``heldout`` (see :mod:`dori.miniworld.generator`).

vm and tm images ship with the world (``sets/*.safetensors``, uint8); unique and heldout images are rendered
on first access from the world's seed (they are a pure function of it), so a world stays small.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dori.data.items import Item
from dori.errors import DoriError

WORLD_SETS = ("vm", "tm", "unique", "heldout")


def _info(world_dir: Path) -> dict:
    path = Path(world_dir) / "dori_world.json"
    if not path.exists():
        raise DoriError(f"{world_dir} is not a miniworld (no dori_world.json)")
    return json.loads(path.read_text())


def _render(kind: str, spec, index: int, item: Item) -> torch.Tensor:
    from dori.miniworld import generator as gen

    scene = gen.unique_scene(spec, index) if kind == "unique" else gen.heldout_scene(spec, index)
    return torch.from_numpy(gen.render(scene).astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def world_set(world_dir: Path, name: str) -> list[Item] | None:
    """The items of world set ``name`` of the miniworld in ``world_dir``; None if ``name`` is not a world set.

    Ids are stable (``vm-000``, ``tm-003``, ``unique-01234``, ``heldout-0042``); images are (3, 32, 32) float
    in [0, 1]; ``meta`` holds the number of training duplicates.
    """
    if name not in WORLD_SETS:
        return None
    from safetensors.torch import load_file

    from dori.miniworld import generator as gen

    info = _info(world_dir)
    sets = info["sets"]
    if name in ("vm", "tm"):
        prompts = sets[name]["prompts"]
        images = load_file(str(Path(world_dir) / sets[name]["file"]))["images"]
        if len(images) != len(prompts):
            raise DoriError(f"{world_dir}: {len(prompts)} {name} prompts but {len(images)} images")
        return [
            Item(
                id=f"{name}-{i:03d}",
                prompt=p,
                kind=name,
                image_ref=f"{world_dir}/{sets[name]['file']}#{i}",
                meta={"duplicates": sets[name]["duplicates"], "index": i},
            ).with_image(images[i].float() / 255.0)
            for i, p in enumerate(prompts)
        ]
    spec = gen.WorldSpec(**{"detail": 0, **info["spec"]})  # worlds written before detail levels: 0
    if name == "unique":
        indices, scene_of = list(range(spec.n_unique)), gen.unique_scene
    else:
        indices, scene_of = sets["heldout"]["indices"], gen.heldout_scene
    width = len(str(max(len(indices) - 1, 1)))
    items = []
    for n, index in enumerate(indices):
        item = Item(
            id=f"{name}-{n:0{width}d}",
            prompt=gen.caption(scene_of(spec, index)),
            kind=name,
            image_ref=f"generated:{name}:{index}",
            meta={"duplicates": sets[name]["duplicates"], "stream_index": index},
        )
        item._loader = partial(_render, name, spec, index)
        items.append(item)
    return items
