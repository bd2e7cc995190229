"""``dori detect``: per-prompt memorization scores (Wen et al., NeMo, trajectory deviation) on item sets, and
with ``--negatives`` the AUC and TPR at 1% / 3% FPR of each detector. Writes ``detection.json`` and
``report.html`` (ROC curves) into the run directory; resumable per prompt."""

from __future__ import annotations

import sys

from dori.commands.common import add_model_args, add_run_args, load_model_from_args, write_json
from dori.errors import DoriError


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="score prompts for memorization (Wen et al., NeMo, trajectory)")
    add_model_args(p)
    add_run_args(p, out_default="runs/detect")
    p.add_argument("--set", required=True, help="memorized set(s), comma list: vm, tm, memorized, a file ...")
    p.add_argument(
        "--negatives", default=None, help="non-memorized set(s), comma list: unique, heldout, nonmem ..."
    )
    p.add_argument(
        "--also", default=None, help="further sets scored and reported without a pair (comma list)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first K items of each set")
    p.add_argument("--detectors", default="wen,nemo,trajectory", help="comma list (default: all three)")
    p.add_argument("--prompts-per-call", type=int, default=16, help="prompts per detector call")
    p.add_argument("--max-rows", type=int, default=64, help="UNet rows per forward pass")
    g = p.add_argument_group("Wen et al. (reference defaults)")
    g.add_argument("--wen-gens", type=int, default=4, help="generations per prompt (4)")
    g.add_argument("--wen-steps", type=int, default=50, help="DDIM steps of the schedule (50)")
    g.add_argument("--wen-guidance", type=float, default=7.5, help="guidance (7.5)")
    g.add_argument("--wen-end", type=int, default=1, help="average steps [0, END) (1: the first step)")
    g.add_argument(
        "--wen-gen-seed", type=int, default=0, help="gen_seed: latents of item i use seed i + this (0)"
    )
    g = p.add_argument_group("NeMo's score")
    g.add_argument("--nemo-variant", default="reference", choices=["reference", "paper"])
    g.add_argument("--nemo-seeds", type=int, default=10, help="seeds per prompt (10)")
    g = p.add_argument_group("trajectory deviation (How Diffusion Models Memorize)")
    g.add_argument("--traj-gens", type=int, default=4, help="generations per prompt (4; the paper: 10)")
    g.add_argument("--traj-steps", type=int, default=50, help="DDIM steps (50)")
    g.add_argument("--traj-guidance", type=float, default=7.5, help="guidance (7.5)")
    g.add_argument("--traj-first", type=int, default=10, help="updates the score averages over (10)")
    p.set_defaults(func=run)


def _names(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def detectors_from_args(args) -> list:
    from dori.detection import build_detector

    kwargs = {
        "wen": dict(steps=args.wen_steps, guidance=args.wen_guidance, n_gens=args.wen_gens, end=args.wen_end,
                    gen_seed=args.wen_gen_seed, max_rows=args.max_rows),
        "nemo": dict(variant=args.nemo_variant, n_seeds=args.nemo_seeds, max_rows=args.max_rows),
        "trajectory": dict(steps=args.traj_steps, guidance=args.traj_guidance, n_gens=args.traj_gens,
                           first=args.traj_first, max_rows=args.max_rows),
    }  # fmt: skip
    names = _names(args.detectors)
    if not names:
        raise DoriError("--detectors is empty")
    return [build_detector(n, **kwargs.get(n, {})) for n in names]


def run(args) -> int:
    from dori import distributed
    from dori.data.sets import load_set
    from dori.detection.run import format_pairs, run_detection
    from dori.report.detection import build_detection_report
    from dori.runs import RunDir

    positives, negatives, also = _names(args.set), _names(args.negatives), _names(args.also)
    if not positives:
        raise DoriError("--set is empty")
    detectors = detectors_from_args(args)
    model = load_model_from_args(args)
    sets = {
        name: load_set(name, model, limit=args.limit)
        for name in dict.fromkeys([*positives, *negatives, *also])
    }
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    with distributed.main_first():  # under torchrun: rank 0 creates the run directory, the others join it
        run_dir = RunDir(
            args.out,
            settings,
            extra_provenance={"command": "detect", "model": model.name, "device": str(model.device),
                              "dtype": str(model.dtype)},
        )  # fmt: skip
    result = run_detection(
        model, sets, positives, negatives, detectors, run_dir,
        prompts_per_call=args.prompts_per_call, progress=args.progress and distributed.is_main(),
    )  # fmt: skip
    if not distributed.is_main():  # the ranks of a torchrun job share one run: rank 0 writes the outputs
        return 0
    out = {
        "model": args.model,
        "model_info": {"name": model.name},
        **result,
        "provenance": run_dir.provenance,
    }
    write_json(str(run_dir.path / "detection.json"), out)
    write_json(args.json, out)
    if result["pairs"]:
        print(format_pairs(result["pairs"]))
    else:
        for det, by_set in result["scores"].items():
            for set_name, recs in by_set.items():
                mean = sum(r["score"] for r in recs) / len(recs)
                print(f"{det:<11} {set_name:<10} n={len(recs)} mean score {mean:.4f}")
    print(f"report: {build_detection_report(run_dir.path)}", file=sys.stderr)
    return 0
