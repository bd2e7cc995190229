"""``dori report RUN``: (re)build the self-contained HTML report of an audit run from its files."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild the HTML report of an audit run directory")
    p.add_argument("run", help="run directory of `dori audit --out`")
    p.add_argument("--max-items", type=int, default=50, help="items shown with their images (default 50)")
    p.add_argument("--out", default=None, help="write the HTML here (default: RUN/report.html)")
    p.add_argument(
        "--detection", default=None, help="a `dori detect` run directory on the same model to join"
    )
    p.add_argument("--markdown", action="store_true", help="also print the result table as Markdown")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from dori.report.html import build_report
    from dori.report.tables import format_table

    path = build_report(args.run, max_items=args.max_items, out=args.out, detection=args.detection)
    if args.markdown:
        rows = json.loads((Path(args.run) / "audit.json").read_text())["rows"]
        print(format_table(rows, fmt="markdown"))
    print(path)
    return 0
