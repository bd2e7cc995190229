"""``dori demo``: the main job. Runs Table 1 of Finding Dori on the shipped miniworld (CPU, minutes) and
writes the HTML report; run it again to resume after a kill."""

from __future__ import annotations

import sys
import time

from dori.errors import DoriError

DEMO_ITEMS = 12  # a third of the vm set: the full recipe takes 25-30 min on 2 CPU cores
DEMO_UTILITY = 100
DEMO_SNAPSHOTS = "10,25"  # MR against Dori steps: 10, 25 and the final 50


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="reproduce Table 1 on the shipped miniworld and write the HTML report")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--model", default="miniworld")
    p.add_argument(
        "--limit",
        type=int,
        default=DEMO_ITEMS,
        help=f"first K items of the memorized and non-memorized sets (default {DEMO_ITEMS}, which keeps the "
        "demo near 10 minutes on 2 CPU cores; 0: all 40 vm items and the first 40 unique ones)",
    )
    p.add_argument(
        "--n-utility", type=int, default=DEMO_UTILITY, help=f"FID/KID prompts (default {DEMO_UTILITY})"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from dori.recipes.table1 import Table1Config, run_table1
    from dori.report.html import build_report
    from dori.report.tables import format_table

    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 0:
        raise DoriError(f"--limit takes a number of items >= 0, got {args.limit}")
    limit = args.limit or None
    cfg = Table1Config(
        model=args.model,
        limit=limit,
        n_utility=args.n_utility,
        snapshots=DEMO_SNAPSHOTS,
        device=args.device,
        progress=args.progress,
    )
    scope = f"first {limit} items of each set" if limit else "all items"
    print(f"dori demo: Table 1 on {args.model} ({scope}) into {args.out} (resumable)", file=sys.stderr)
    table = run_table1(args.out, cfg)
    print(format_table(table["rows"]))
    out = Path(args.out)
    intro = (
        "<p>Table 1 of <i>Finding Dori</i> reproduced on this world (settings none, nonmem, nonmem+dori, nemo, "
        "nemo+dori, wanda, wanda+dori); below: MR against Dori steps and, per item, the NeMo audit. The Wanda "
        "and non-memorized audits have their own reports in <code>audit-wanda/</code> and "
        "<code>audit-nonmem/</code>.</p>"
    )
    report = build_report(
        out / "audit-nemo",
        out=out / "report.html",
        rows=table["rows"] + table["steps_rows"],
        title=f"dori demo: Table 1 on {args.model}",
        intro_html=intro,
    )
    print(
        f"table: {out / 'TABLE1.md'}\nreport: {report}\ntook {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0
