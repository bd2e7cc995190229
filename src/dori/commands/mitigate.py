"""``dori mitigate nemo|wanda``: fit a pruning mitigation on an item set and write it to ``--out``.

The folder is a run directory (config, provenance, one result per finished item or group, resumable)
that also holds the fitted mitigation (``nemo.json`` or ``wanda.json`` + ``masks/``), which
``dori audit --mitigation nemo:DIR`` (or ``wanda:DIR``) loads.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from dori import distributed
from dori.commands.common import add_model_args, add_run_args, load_model_from_args, write_json
from dori.errors import DoriError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mitigate",
        help="fit NeMo or Wanda on an item set (writes neuron sets / masks); adversarial-ft, esd, ca, siss: "
        "fine-tune (the same as `dori finetune`)",
        epilog="`dori mitigate adversarial-ft|esd|ca|siss ...` runs `dori finetune adversarial|esd|ca|siss ...` "
        "(see `dori finetune --help`).",
    )
    p.add_argument("method", choices=["nemo", "wanda"], help="the pruning mitigation")
    add_model_args(p)
    add_run_args(p)
    p.set_defaults(seed=None)
    g = p.add_argument_group("items")
    g.add_argument(
        "--set", required=True, help="item set: a world set (vm, tm), an SD set (vm, tm), or a file"
    )
    g.add_argument("--limit", type=int, default=None, help="only the first K items of the set")
    g.add_argument(
        "--batch-size", type=int, default=None, help="UNet rows (NeMo) / prompts (Wanda) per batch"
    )
    g = p.add_argument_group("NeMo (seed default 1)")
    g.add_argument("--variant", default="reference", choices=["reference", "paper"])
    g.add_argument("--strong", action="store_true", help="strong NeMo: tau = mean - 1 std")
    g.add_argument("--tau", type=float, default=None, help="override tau_mem (default: calibrated per model)")
    g.add_argument("--n-seeds", type=int, default=10, help="seeds per prompt (reference: 10)")
    g.add_argument("--theta-start", type=float, default=5.0)
    g.add_argument("--theta-step", type=float, default=0.25)
    g.add_argument("--theta-min", type=float, default=1.0)
    g.add_argument("--statistics", default="auto", choices=["auto", "reference", "compute"])
    g.add_argument(
        "--calibration-set", default=None, help="held-out prompts (default: heldout / LAION sample)"
    )
    g.add_argument("--calibration-limit", type=int, default=None, help="first K calibration prompts")
    g.add_argument("--chunk", type=int, default=8, help="items searched together (then saved)")
    g.add_argument(
        "--iterative", type=int, default=1, metavar="R",
        help="iterative NeMo (Finding Dori, Appendix H.6; the paper runs 5): R rounds of prune, search new Dori "
        "embeddings against the pruned model, prune again; writes round-1 .. round-R (each loadable as "
        "nemo:DIR/round-r) and the last round as DIR",
    )  # fmt: skip
    g.add_argument("--dori-steps", type=int, default=50, help="Dori steps per round of --iterative")
    g = p.add_argument_group("Wanda (seed default 0)")
    g.add_argument("--sparsity", type=float, default=0.01, help="top share per row (0.01; 0.02-0.10)")
    g.add_argument("--timesteps", type=int, default=10, help="union over the first N UNet calls")
    g.add_argument("--group", default="all", help="all (one mask), prompt (one per item) or N (groups of N)")
    g.add_argument("--guidance", type=float, default=7.5, help="CFG of the sampling (reference 7.5)")
    p.set_defaults(func=run)


def _progress(args, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not args.progress, file=sys.stderr, leave=False)


def run(args) -> int:
    from dori.data.sets import load_set
    from dori.runs import RunDir

    model = load_model_from_args(args)
    items = load_set(args.set, model=model, limit=args.limit)
    if not items:
        raise DoriError(f"set {args.set!r} has no items")
    from dori.models.identity import weights_fingerprint

    common = {
        "method": args.method,
        "model": args.model,
        "set": args.set,
        "limit": args.limit,
        "dtype": args.dtype,
        "model_sha": weights_fingerprint(model, coarse=True),  # ties the fit to these weights (any dtype)
    }
    if args.method == "nemo":
        return _run_nemo(args, model, items, common, RunDir)
    return _run_wanda(args, model, items, common, RunDir)


def _run_nemo(args, model, items, common, RunDir) -> int:
    from dori.mitigations.nemo import NeMo, NeMoItem, NeMoResult
    from dori.mitigations.nemo_calibration import Calibration, default_calibration_prompts

    nemo = NeMo(
        variant=args.variant, strong=args.strong, tau=args.tau, n_seeds=args.n_seeds,
        seed=1 if args.seed is None else args.seed, theta_start=args.theta_start, theta_step=args.theta_step,
        theta_min=args.theta_min, statistics=args.statistics, calibration_limit=args.calibration_limit,
        batch_size=args.batch_size or 64,
    )  # fmt: skip
    settings = {k: v for k, v in nemo.settings().items() if k not in ("batch_size", "cache_dir")}
    iterative = {"iterative": True, "dori_steps": args.dori_steps} if args.iterative > 1 else {}
    with distributed.main_first():  # under torchrun: rank 0 creates the run and calibrates, the others load
        run = RunDir(args.out, {**common, **settings, "calibration_set": args.calibration_set, **iterative})
        calib_file = run.path / "calibration.safetensors"
        if calib_file.exists():
            calib = Calibration.load(calib_file)
        else:
            if args.calibration_set is None:
                name, prompts = default_calibration_prompts(model)
            else:
                name = args.calibration_set
                prompts = [it.prompt for it in load_set_prompts(args.calibration_set, model)]
            print(f"NeMo calibration for {args.model} (held-out prompts: {name})", file=sys.stderr)
            calib = nemo.calibrate(model, prompts, prompt_set=name)
            calib.save(calib_file)
    source = calib.info.get("source", "computed")
    count = f", {calib.info['prompts']} prompts" if "prompts" in calib.info else ""
    print(f"tau_mem = {nemo.threshold(calib):.4f} ({source}{count})", file=sys.stderr)
    if args.iterative > 1:
        return _run_iterative(args, model, items, nemo, calib, settings, run)
    todo = [it for it in items if not run.has(f"item.{it.id}")]
    bar = _progress(args, len(items), "nemo")
    bar.update(len(items) - len(todo))
    todo = distributed.my_share(todo)  # this rank's items (all of them in one process)
    for lo in range(0, len(todo), max(1, args.chunk)):
        chunk = todo[lo : lo + max(1, args.chunk)]
        found = nemo.detect(
            model, model.encode_text([it.prompt for it in chunk]), calib, [it.id for it in chunk]
        )
        for it in found:
            run.put(f"item.{it.id}", asdict(it))
        bar.update(len(chunk))
    bar.close()
    distributed.sync()
    if not distributed.is_main():
        return 0
    result = NeMoResult(
        {it.id: NeMoItem(**run.get(f"item.{it.id}")) for it in items},
        [*calib.means],
        config=settings,
        calibration=dict(calib.info, tau=nemo.threshold(calib)),
        provenance=run.provenance,
    )
    result.save(run.path)
    summary = {
        "method": "nemo",
        "out": str(run.path),
        "tau": nemo.threshold(calib),
        "items": {
            k: {"memorized": v.memorized, "neurons": sum(map(len, v.refined.values()))}
            for k, v in result.items.items()
        },
    }
    n_mem = sum(v.memorized for v in result.items.values())
    total = sum(s["neurons"] for s in summary["items"].values())
    print(f"NeMo: {n_mem}/{len(items)} items memorized, {total} neurons in all; written to {run.path}")
    write_json(args.json, summary)
    return 0


def _run_iterative(args, model, items, nemo, calib, settings, run) -> int:
    """Iterative NeMo, one round at a time; finished rounds (``round-r/``) are reused when resumed."""
    import torch

    from dori.attacks.dori import Dori
    from dori.audit import resize_to
    from dori.evaluation import dori_seed
    from dori.mitigations.nemo_result import (
        NeMoResult,
        NeMoRound,
        iterative_nemo,
        make_dori_search,
        neuron_count,
    )
    from dori.runs import atomic_save_tensors, load_tensors

    if args.iterative < 1 or args.dori_steps < 1:
        raise DoriError("--iterative and --dori-steps must be at least 1")
    missing = [it.id for it in items if it.image is None]
    if missing:
        raise DoriError(
            f"iterative NeMo searches Dori embeddings for the training images; {len(missing)} item(s) have "
            f"none ({', '.join(missing[:5])}): give the set's images or drop those items"
        )
    ids = [it.id for it in items]
    done = []
    for r in range(1, args.iterative + 1):
        folder = run.path / f"round-{r}"
        if not (folder / "nemo.json").exists() or not (folder / "embeddings.safetensors").exists():
            break
        done.append(NeMoRound(NeMoResult.load(folder), load_tensors(folder / "embeddings.safetensors")["y"]))
    if done:
        print(f"iterative NeMo: resuming after round {len(done)}", file=sys.stderr)
    images = torch.stack([resize_to(it.image, model.image_size) for it in items])
    x0 = model.encode_images(images)
    prompts = model.encode_text([it.prompt for it in items])
    seeds = [dori_seed(0, i) for i in range(len(items))]
    search = make_dori_search(Dori(steps=args.dori_steps), model, x0, prompts, seeds)

    def save(rnd: NeMoRound) -> None:
        if not distributed.is_main():  # every rank holds the round (gathered); rank 0 writes it
            return
        r = rnd.result.config["round"]
        folder = run.path / f"round-{r}"
        folder.mkdir(exist_ok=True)
        atomic_save_tensors(folder / "embeddings.safetensors", {"y": rnd.embeddings})
        rnd.result.provenance = run.provenance
        rnd.result.save(folder)
        n_mem = sum(v.memorized for v in rnd.result.items.values())
        print(
            f"round {r}: {n_mem}/{len(ids)} items flagged, {neuron_count(rnd.result)} neurons in all",
            file=sys.stderr,
        )

    bar = _progress(args, args.iterative, "iterative nemo")
    bar.update(len(done))
    rounds = iterative_nemo(
        nemo, model, ids, prompts, search, rounds=args.iterative, calibration=calib,
        progress=lambda r: bar.update(r - bar.n), done=done, on_round=save,
    )  # fmt: skip
    bar.close()
    if not distributed.is_main():
        return 0
    final = rounds[-1].result
    final.provenance = run.provenance
    final.save(run.path)
    per_round = [
        {
            "round": r + 1,
            "flagged": sum(v.memorized for v in rnd.result.items.values()),
            "neurons": neuron_count(rnd.result),
        }
        for r, rnd in enumerate(rounds)
    ]
    print(f"iterative NeMo: {args.iterative} rounds; the last round's neurons written to {run.path}")
    write_json(args.json, {"method": "nemo", "out": str(run.path), "iterative": per_round, **settings})
    return 0


def load_set_prompts(name: str, model):
    from dori.data.sets import load_set
    from dori.mitigations.nemo_calibration import laion_holdout_prompts

    if name == "laion-holdout-500":
        from dori.data.sets import Item

        return [Item(id=str(i), prompt=p) for i, p in enumerate(laion_holdout_prompts())]
    return load_set(name, model=model)


def _run_wanda(args, model, items, common, RunDir) -> int:
    from dori.mitigations.wanda import Wanda, WandaResult, make_groups, write_group_masks, write_index

    wanda = Wanda(
        sparsity=args.sparsity, timesteps=args.timesteps, guidance=args.guidance,
        seed=0 if args.seed is None else args.seed, batch_size=args.batch_size or 8,
    )  # fmt: skip
    settings = {k: v for k, v in wanda.settings().items() if k != "batch_size"}
    with distributed.main_first():
        run = RunDir(args.out, {**common, **settings, "group": args.group})
    groups = make_groups([it.id for it in items], args.group)
    prompts = {it.id: it.prompt for it in items}
    todo = [(n, g) for n, g in enumerate(groups) if not run.has(f"group.{n:05d}")]
    bar = _progress(args, len(groups), "wanda")
    bar.update(len(groups) - len(todo))
    todo = distributed.my_share(todo)  # this rank's groups (all of them in one process)
    null = wanda.null_norms(model) if todo else None
    while todo:  # sample the members of several small groups together, then save group by group
        batch, size = [], 0
        while todo and (not batch or size + len(groups[todo[0][1]]) <= wanda.batch_size):
            batch.append(todo.pop(0))
            size += len(groups[batch[-1][1]])
        members = [m for _, gid in batch for m in groups[gid]]
        sq = wanda.squared_norms(model, model.encode_text([prompts[m] for m in members]))
        lo = 0
        for n, gid in batch:
            k = len(groups[gid])
            summed = {name: v[:, lo : lo + k].sum(1) for name, v in sq.items()}
            masks = wanda.masks_from_norms(model, summed, null, k)
            run.put(f"group.{n:05d}", {"group": gid, **write_group_masks(run.path, n, masks)})
            lo += k
            bar.update(1)
        del sq
    bar.close()
    distributed.sync()
    if not distributed.is_main():
        return 0
    entries = {gid: run.get(f"group.{n:05d}") for n, gid in enumerate(groups)}
    write_index(run.path, groups, entries, {**settings, "group": str(args.group)}, run.provenance)
    result = WandaResult.load(run.path)
    counts = {gid: sum(m.count().values()) for gid, m in result.masks.items()}
    print(
        f"Wanda: {len(groups)} mask(s), {sum(counts.values())} weights pruned in all; written to {run.path}"
    )
    write_json(args.json, {"method": "wanda", "out": str(run.path), "groups": groups, "pruned": counts})
    return 0
