"""Prompt/image item sets: the shipped SD v1.4 prompt lists, a world's own sets, and user files.

An :class:`Item` is one memorized (or control) training example: an id, its caption and, where known,
its training image. Sets are resolved by name:

* SD v1.4 (NeMo's CSV, 500 prompts of Wen et al. / Webster): ``vm`` (112), ``tm`` (388), ``memorized`` (500);
  ``nonmem`` (500 non-memorized LAION captions), ``coco`` (10k COCO-2014 val captions), ``sd2`` (219 SD 2
  prompts), ``nomem500`` (Ren et al.'s 500 synthetic prompts).
* A miniworld's sets: ``vm``, ``tm``, ``unique``, ``heldout`` (their images ship with the world).
* A user file: ``path.jsonl`` or ``path.csv`` with ``prompt``, ``image`` (path) and optional ``id``, ``type``.

Training images of SD prompts are not shipped: they come from a local folder of files named by LAION
index (``--images DIR``), or are fetched from their URL with ``--fetch`` (cached, timed out, size-capped,
checked to decode). A missing image marks the item skipped with its reason; the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from dori.data.items import Item, load_image_file
from dori.errors import DoriError
from dori.world import world_of

__all__ = ["Item", "load_image_file", "load_set", "sd_set", "user_set"]

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SD_SETS = ("vm", "tm", "memorized", "nonmem", "coco", "sd2", "nomem500")


def _read_nemo_csv(name: str) -> list[dict]:
    path = PROMPT_DIR / name
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def sd_set(
    name: str,
    images_dir: str | Path | None = None,
    fetch: bool = False,
    image_size: int = 512,
    cache_dir: str | Path | None = None,
) -> list[Item]:
    """A shipped SD prompt set by name (see module docstring)."""
    if name in ("vm", "tm", "memorized"):
        rows = _read_nemo_csv("memorized_laion_prompts.csv")
        items = [
            Item(
                id=f"laion-{r['Index']}",
                prompt=r["Caption"],
                kind=r["type"].lower(),
                image_ref=r["URL"],
                meta={"laion_index": r["Index"], "row": int(r[""]), "max_sscd": r["max_sscd"]},
            )
            for r in rows
            if name == "memorized" or r["type"].lower() == name
        ]
    elif name == "nonmem":
        rows = _read_nemo_csv("unmemorized_laion_prompts.csv")
        items = [
            Item(
                id=f"laion-{r['Index']}",
                prompt=r["Caption"],
                kind="nonmem",
                image_ref=r["URL"],
                meta={"laion_index": r["Index"]},
            )
            for r in rows
        ]
    elif name == "coco":
        rows = _read_nemo_csv("coco2014_val_10000.csv")
        items = [Item(id=f"coco-{r['Index']}", prompt=r["Caption"], kind="coco") for r in rows]
    elif name in ("sd2", "nomem500"):
        fname = "sd2_mem219.txt" if name == "sd2" else "group_nomem500.txt"
        lines = (PROMPT_DIR / fname).read_text(encoding="utf-8").splitlines()
        items = [
            Item(id=f"{name}-{i}", prompt=p.strip(), kind=name) for i, p in enumerate(lines) if p.strip()
        ]
    else:
        raise DoriError(f"unknown SD prompt set {name!r}; known: {', '.join(SD_SETS)}")
    if images_dir is not None or fetch:
        from dori.data.images import ImageStore

        store = ImageStore(images_dir=images_dir, fetch=fetch, cache_dir=cache_dir, size=image_size)
        for it in items:
            it._loader = store.load
    return items


def user_set(path: str | Path, image_size: int | None = None) -> list[Item]:
    """Items from a JSONL or CSV file with fields ``prompt``, ``image`` and optional ``id``, ``type``.

    Relative image paths are resolved against the file's folder. A bad file raises a DoriError naming
    the line; a missing image only skips its item.
    """
    path = Path(path)
    if not path.exists():
        raise DoriError(f"item file {path} does not exist")
    rows: list[dict] = []
    try:  # UTF-8, with or without a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DoriError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r}); "
            "save it as UTF-8"
        ) from err
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DoriError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DoriError(f"{path}:{n}: expected an object with 'prompt' and 'image'")
            rows.append(row)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        raise DoriError(f"item file {path} must end in .jsonl or .csv")
    items = []
    for n, row in enumerate(rows, 1):
        if not row.get("prompt"):
            columns = ", ".join(repr(k) for k in row) or "none"
            raise DoriError(f"{path}: row {n} has no 'prompt' (its fields: {columns})")
        img = row.get("image")
        ref = str((path.parent / img).resolve()) if img else None
        item = Item(
            id=str(row.get("id") or f"item-{n - 1}"),
            prompt=str(row["prompt"]),
            kind=str(row.get("type") or "user").lower(),
            image_ref=ref,
        )
        if ref is not None:
            item._loader = lambda it, s=image_size: _load_ref(it, s)
        else:
            item.skip_reason = "no image given"
        items.append(item)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DoriError(f"{path}: item ids are not unique")
    return items


def _load_ref(item: Item, size: int | None) -> torch.Tensor:
    if not item.image_ref or not Path(item.image_ref).exists():
        raise DoriError(f"image file {item.image_ref} not found")
    return load_image_file(item.image_ref, size)


def load_set(
    name: str, model=None, images_dir: str | Path | None = None, fetch: bool = False, limit: int | None = None
) -> list[Item]:
    """Resolve a set name for a model: the model's own world sets first, then SD sets, then a file."""
    items: list[Item] | None = None
    world = world_of(model)
    if world is not None:
        items = world.items(name)
    if items is None:
        if name in SD_SETS:
            size = getattr(model, "image_size", 512) if model is not None else 512
            items = sd_set(name, images_dir=images_dir, fetch=fetch, image_size=size)
        elif Path(name).suffix in (".jsonl", ".csv"):
            items = user_set(
                name, image_size=getattr(model, "image_size", None) if model is not None else None
            )
        else:
            raise DoriError(
                f"unknown set {name!r}: not a set of this model's world, not one of {SD_SETS}, not a .jsonl/.csv file"
            )
    if limit is not None and limit < 0:
        raise DoriError(f"limit must be >= 0 (0 or None: all items), got {limit}")
    return items[:limit] if limit else items
