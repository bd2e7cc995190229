"""``dori mitigate nemo|wanda``: fit a pruning mitigation on an item set and write it to ``--out``.

One sub-command per method, each with only its own options. The folder is a run directory (config,
provenance, one result per finished item or group, resumable) that also holds the fitted mitigation
(``nemo.json`` or ``wanda.json`` + ``masks/``), which ``dori audit --mitigation nemo:DIR`` (or ``wanda:DIR``)
loads. The fitting itself is :mod:`dori.fitting`. ``dori mitigate adversarial-ft|esd|ca|siss`` is
``dori finetune adversarial|esd|ca|siss``.
"""

from __future__ import annotations

import argparse

from dori import distributed
from dori.commands.common import add_model_args, add_run_args, load_model_from_args, write_json
from dori.errors import DoriError


def _common(p: argparse.ArgumentParser, batch_help: str) -> argparse._ArgumentGroup:
    add_model_args(p)
    add_run_args(p)
    p.set_defaults(seed=None)
    g = p.add_argument_group("items")
    g.add_argument(
        "--set", required=True, help="item set: a world set (vm, tm), an SD set (vm, tm), or a file"
    )
    g.add_argument("--limit", type=int, default=None, help="only the first K items of the set")
    g.add_argument("--batch-size", type=int, default=None, help=batch_help)
    return g


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mitigate",
        help="fit NeMo or Wanda on an item set (writes neuron sets / masks); adversarial-ft, esd, ca, siss: "
        "fine-tune (the same as `dori finetune`)",
        epilog="`dori mitigate adversarial-ft|esd|ca|siss ...` runs `dori finetune adversarial|esd|ca|siss ...` "
        "(see `dori finetune --help`).",
    )
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    n = methods.add_parser("nemo", help="NeMo: per-item memorization neurons (seed default 1)")
    _common(n, "UNet rows per batch (default 64)")
    g = n.add_argument_group("NeMo")
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
    n.set_defaults(func=run_nemo)
    w = methods.add_parser("wanda", help="Wanda: pruning masks per group of items (seed default 0)")
    _common(w, "prompts per batch (default 8)")
    g = w.add_argument_group("Wanda")
    g.add_argument("--sparsity", type=float, default=0.01, help="top share per row (0.01; 0.02-0.10)")
    g.add_argument("--timesteps", type=int, default=10, help="union over the first N UNet calls")
    g.add_argument("--group", default="all", help="all (one mask), prompt (one per item) or N (groups of N)")
    g.add_argument("--guidance", type=float, default=7.5, help="CFG of the sampling (reference 7.5)")
    w.set_defaults(func=run_wanda)


def _items(args, model):
    from dori.data.sets import load_set

    items = load_set(args.set, model=model, limit=args.limit)
    if not items:
        raise DoriError(f"set {args.set!r} has no items")
    return items


def _run_config(args, model) -> dict:
    from dori.models.identity import weights_fingerprint

    return {
        "method": args.method,
        "model": args.model,
        "set": args.set,
        "limit": args.limit,
        "dtype": args.dtype,
        "model_sha": weights_fingerprint(model, coarse=True),  # ties the fit to these weights (any dtype)
    }


def run_nemo(args) -> int:
    from dori.fitting import fit_nemo, fit_nemo_iterative
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.nemo_result import neuron_count

    model = load_model_from_args(args)
    items = _items(args, model)
    nemo = NeMo(
        variant=args.variant, strong=args.strong, tau=args.tau, n_seeds=args.n_seeds,
        seed=1 if args.seed is None else args.seed, theta_start=args.theta_start, theta_step=args.theta_step,
        theta_min=args.theta_min, statistics=args.statistics, calibration_limit=args.calibration_limit,
        batch_size=args.batch_size or 64,
    )  # fmt: skip
    if args.iterative > 1:
        rounds = fit_nemo_iterative(
            model, items, args.out, nemo, args.iterative, args.dori_steps, args.calibration_set,
            run_config=_run_config(args, model), progress=args.progress,
        )  # fmt: skip
        if not distributed.is_main():
            return 0
        per_round = [
            {
                "round": r + 1,
                "flagged": sum(v.memorized for v in rnd.result.items.values()),
                "neurons": neuron_count(rnd.result),
            }
            for r, rnd in enumerate(rounds)
        ]
        print(f"iterative NeMo: {args.iterative} rounds; the last round's neurons written to {args.out}")
        write_json(args.json, {"method": "nemo", "out": args.out, "iterative": per_round, **nemo.settings()})
        return 0
    result = fit_nemo(
        model, items, args.out, nemo, args.calibration_set, args.chunk, run_config=_run_config(args, model),
        progress=args.progress,
    )  # fmt: skip
    if not distributed.is_main():
        return 0
    counts = {k: sum(map(len, v.refined.values())) for k, v in result.items.items()}
    n_mem = sum(v.memorized for v in result.items.values())
    print(
        f"NeMo: {n_mem}/{len(items)} items memorized, {sum(counts.values())} neurons in all; written to {args.out}"
    )
    write_json(
        args.json,
        {
            "method": "nemo",
            "out": args.out,
            "tau": result.calibration.get("tau"),
            "items": {k: {"memorized": v.memorized, "neurons": counts[k]} for k, v in result.items.items()},
        },
    )
    return 0


def run_wanda(args) -> int:
    from dori.fitting import fit_wanda
    from dori.mitigations.wanda import Wanda

    model = load_model_from_args(args)
    items = _items(args, model)
    wanda = Wanda(
        sparsity=args.sparsity, timesteps=args.timesteps, guidance=args.guidance,
        seed=0 if args.seed is None else args.seed, batch_size=args.batch_size or 8,
    )  # fmt: skip
    result = fit_wanda(
        model, items, args.out, wanda, args.group, _run_config(args, model), progress=args.progress
    )
    if not distributed.is_main():
        return 0
    counts = {gid: sum(m.count().values()) for gid, m in result.masks.items()}
    print(
        f"Wanda: {len(result.groups)} mask(s), {sum(counts.values())} weights pruned in all; written to {args.out}"
    )
    write_json(args.json, {"method": "wanda", "out": args.out, "groups": result.groups, "pruned": counts})
    return 0
