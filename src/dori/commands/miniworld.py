"""``dori miniworld``: train a miniworld (``train``), describe one (``info``), measure it (``check``)."""

from __future__ import annotations

import json
from pathlib import Path

from dori.errors import DoriError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "miniworld", help="train, describe or check a miniworld (dori's small text-to-image world)"
    )
    msub = p.add_subparsers(dest="miniworld_command", metavar="ACTION")

    t = msub.add_parser("train", help="train a whole miniworld from a seed (resumable)")
    t.add_argument("--seed", type=int, default=0, help="world seed (data, every model)")
    t.add_argument("--out", required=True, help="folder to write (loadable with --model OUT)")
    t.add_argument(
        "--tiny", action="store_true", help="a small world that trains on a CPU in minutes (tests)"
    )
    t.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    t.add_argument("--workers", type=int, default=1, help="processes rendering the data")
    t.add_argument(
        "--stop-before-unet",
        action="store_true",
        help="train the other components and stop (a second call trains the UNet and writes the world)",
    )
    t.add_argument(
        "--duplicates",
        type=int,
        default=None,
        help="training copies of each vm item and images of each tm caption (default 50)",
    )
    t.add_argument(
        "--detail",
        type=int,
        default=None,
        choices=(0, 1),
        help="scene detail: 1 (default, the shipped world: finer field, uncaptioned dots) or 0 (plainer)",
    )
    t.add_argument(
        "--latent-channels",
        type=int,
        default=None,
        help="latent channels of the VAE and the UNet (default 4, as SD v1; more keep more detail)",
    )
    t.add_argument(
        "--unet-channels",
        default=None,
        metavar="W0,W1,W2",
        help="the UNet's three block widths (default 32,64,128)",
    )
    t.add_argument(
        "--pause-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="checkpoint the UNet after this many seconds of training and stop; run again to resume",
    )
    t.set_defaults(func=run_train)

    i = msub.add_parser("info", help="what a world holds: sets, model sizes, threshold, provenance")
    i.add_argument("--model", default="miniworld", help="miniworld (shipped) or a folder")
    i.add_argument("--json", action="store_true", help="print dori_world.json instead of a summary")
    i.set_defaults(func=run_info)

    c = msub.add_parser("check", help="MR per set, A_CLIP and FID on heldout (10 generations, DDIM 50, g 7)")
    c.add_argument("--model", default="miniworld", help="miniworld (shipped) or a folder")
    c.add_argument("--sets", default="vm,tm,unique,heldout", help="comma-separated world sets")
    c.add_argument("--limit", type=int, default=None, help="items per set (default: vm/tm all, others 100)")
    c.add_argument("--n-gen", type=int, default=10, help="generations per item")
    c.add_argument("--device", default=None)
    c.add_argument("--out", default=None, help="write the results as JSON here")
    c.add_argument("--plot", default=None, help="also write the calibration plot (PNG) here")
    c.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def run_train(args) -> int:
    from dori.commands.common import resolve_device
    from dori.miniworld.train import train_world

    train_world(
        args.out,
        seed=args.seed,
        preset="tiny" if args.tiny else "full",
        device=resolve_device(args.device),
        workers=args.workers,
        stop_before_unet=args.stop_before_unet,
        duplicates=args.duplicates,
        detail=args.detail,
        pause_after=args.pause_after,
        latent_channels=args.latent_channels,
        unet_channels=_widths(args.unet_channels),
    )
    return 0


def _widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise DoriError(f"--unet-channels takes comma-separated integers, got {text!r}") from None


def _world_dir(spec: str) -> Path:
    from dori.models.loading import resolve

    where = resolve(spec)
    if not isinstance(where, Path) or not (where / "dori_world.json").exists():
        raise DoriError(f"{spec} is not a miniworld (no dori_world.json)")
    return where


def run_info(args) -> int:
    world = _world_dir(args.model)
    info = json.loads((world / "dori_world.json").read_text())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cd, tr = info["copy_detector"], info["training"]
    print(f"miniworld {world}")
    detail = info.get("spec", {}).get("detail", 0)  # worlds written before detail levels are level 0
    size = info["image_size"]
    latent = info["training"]["config"].get("latent_channels", 4)
    print(
        f"  seed {info['seed']} ({info['preset']}), scene detail {detail}, images {size}x{size} RGB, "
        f"{latent} latent channels"
    )
    for name, s in info["sets"].items():
        print(f"  set {name:8s} {s['n']:6d} items, {s['duplicates']} training copies each")
    print("  parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in info["params"].items()))
    print(
        f"  replication threshold {cd['threshold']} ({cd['rule']}); replica recall {cd['replica_recall']:.3f}, "
        f"same-caption false positives {cd['same_caption_false_positive']:.3f}"
    )
    print(
        f"  trained on {tr['device']} in {tr['total_s']:.0f}s: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in tr["timings_s"].items())
    )
    prov = info.get("provenance", {})
    print(
        f"  provenance: dori {prov.get('dori')} git {str(prov.get('git'))[:10]} torch {prov.get('torch')} "
        f"diffusers {prov.get('diffusers')} on {prov.get('cuda') or prov.get('host')}"
    )
    return 0


def run_check(args) -> int:
    from dori.commands.common import resolve_device, write_json
    from dori.data.world_sets import world_set
    from dori.miniworld.check import check_world, plot_calibration
    from dori.miniworld.standins import load_standins
    from dori.models.loading import load_model

    world = _world_dir(args.model)
    device = resolve_device(args.device)
    model = load_model(str(world), device=device)
    sets = {}
    for name in args.sets.split(","):
        items = world_set(world, name)
        if items is None:
            raise DoriError(f"{name!r} is not a world set")
        limit = args.limit or (None if name in ("vm", "tm") else 100)
        sets[name] = items[:limit] if limit else items
    result = check_world(model, load_standins(world, device), sets, args.n_gen)
    write_json(args.out, result)
    if args.plot:
        plot_calibration(world, args.plot)
    return 0
