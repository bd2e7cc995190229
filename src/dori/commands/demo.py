"""``dori demo``: the main job. Table 1 of Finding Dori on the shipped miniworld, then adversarial fine-tuning of
the same items (CPU, minutes), and the HTML report; run it again to resume after a kill
(:func:`dori.recipes.demo.run_demo`)."""

from __future__ import annotations

import sys
import time

from dori.errors import DoriError

DEMO_ITEMS = 4  # the first 4 vm items (and 4 non-memorized ones): Table 1 and adversarial FT within minutes on 2 CPU cores
DEMO_UTILITY = 100


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="Table 1 and adversarial fine-tuning on the shipped miniworld, with the HTML report"
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--model", default="miniworld")
    p.add_argument(
        "--limit",
        type=int,
        default=DEMO_ITEMS,
        help=f"first K items of the memorized and non-memorized sets (default {DEMO_ITEMS}; 0: all 40 vm items "
        "and the first 40 unique ones)",
    )
    p.add_argument(
        "--n-utility", type=int, default=DEMO_UTILITY, help=f"FID/KID prompts (default {DEMO_UTILITY})"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--no-advft",
        dest="advft",
        action="store_false",
        help="Table 1 only (no adversarial fine-tuning part)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    from dori.recipes.demo import DemoConfig, run_demo
    from dori.report.tables import format_table

    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 0:
        raise DoriError(f"--limit takes a number of items >= 0, got {args.limit}")
    limit = args.limit or None
    scope = f"first {limit} items of each set" if limit else "all items"
    part = "Table 1 and adversarial fine-tuning" if args.advft else "Table 1"
    print(f"dori demo: {part} on {args.model} ({scope}) into {args.out} (resumable)", file=sys.stderr)
    cfg = DemoConfig(args.model, limit, args.n_utility, args.advft, args.device, args.progress)
    result = run_demo(args.out, cfg)
    print(format_table(result["rows"]))
    print("\n".join(result["sentences"]))
    print(
        f"table: {result['table']}\nreport: {result['report']}\ntook {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0
