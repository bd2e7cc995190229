"""Summarize an adversarial fine-tuning sweep (tools/gpu_advft_sweep.sh, tools/cpu_advft_lr.sh): one row per
(configuration, epoch) with vm MR and SSCD_orig under Dori from the prompt and from N(0, I), and heldout A_CLIP and
FID against the unmitigated model (``util-base.json``, or ``--base FILE``). Where the sweep ran with CONFIRM=1,
the check on prompts the selection never saw (``util2-*``: A_CLIP on heldout 500-549, FID on heldout 200-999)
follows in its own columns; "meets" reads the selection set, "confirmed" the check set.

    python tools/advft_sweep_table.py DIR [--base FILE] [--json OUT]
"""

import argparse
import json
import re
from pathlib import Path


def last_row(path: Path) -> dict:
    return json.loads(path.read_text())["rows"][-1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--base", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    base = last_row(a.base or a.dir / "util-base.json")
    base2 = last_row(a.dir / "util2-base.json") if (a.dir / "util2-base.json").exists() else None
    rows = []
    for util in sorted(a.dir.glob("util-*-e*.json")):
        m = re.fullmatch(r"util-(.+)-e(\d+)\.json", util.name)
        name, epoch = m.group(1), int(m.group(2))
        row = {"config": name, "epoch": epoch}
        for init in ("prompt", "random"):
            f = a.dir / f"audit-{name}-e{epoch}-{init}.json"
            if f.exists():
                r = last_row(f)
                row[f"mr_{init}"] = r["mr"]
                row[f"sscd_{init}"] = round(r["sscd_orig"]["median"], 3)
        u = last_row(util)
        row["a_clip"] = round(u["a_clip"]["median"], 3)
        row["d_a_clip"] = round(u["a_clip"]["median"] - base["a_clip"]["median"], 3)
        row["fid"] = round(u["fid"], 2)
        row["fid_ratio"] = round(u["fid"] / base["fid"], 3)
        row["meets"] = (
            max(row.get("mr_prompt", 1), row.get("mr_random", 1)) <= 0.1
            and row["d_a_clip"] >= -0.02
            and row["fid_ratio"] <= 1.1
        )
        check = a.dir / f"util2-{name}-e{epoch}.json"
        if base2 is not None and check.exists():
            u2 = last_row(check)
            row["check_d_a_clip"] = round(u2["a_clip"]["median"] - base2["a_clip"]["median"], 3)
            row["check_fid_ratio"] = round(u2["fid"] / base2["fid"], 3)
            row["confirmed"] = (
                max(row.get("mr_prompt", 1), row.get("mr_random", 1)) <= 0.1
                and row["check_d_a_clip"] >= -0.02
                and row["check_fid_ratio"] <= 1.1
            )
        rows.append(row)
    rows.sort(key=lambda r: (r["config"], r["epoch"]))
    base_s = f"unmitigated: A_CLIP {base['a_clip']['median']:.3f}, FID {base['fid']:.2f}"
    if base2 is not None:
        base_s += f"; check set: A_CLIP {base2['a_clip']['median']:.3f}, FID {base2['fid']:.2f}"
    print(base_s)
    check = base2 is not None
    head = "| config | epoch | MR Dori prompt / random | SSCD_orig prompt / random | A_CLIP (Δ) | FID (ratio) | meets |"
    print(head + (" check ΔA_CLIP | check FID ratio | confirmed |" if check else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if check else ""))
    for r in rows:
        line = (
            f"| {r['config']} | {r['epoch']} | {r.get('mr_prompt', '–')} / {r.get('mr_random', '–')} | "
            f"{r.get('sscd_prompt', '–')} / {r.get('sscd_random', '–')} | {r['a_clip']} ({r['d_a_clip']:+.3f}) | "
            f"{r['fid']} ({r['fid_ratio']:.2f}) | {'yes' if r['meets'] else 'no'} |"
        )
        if check:
            if "confirmed" in r:
                yes = "yes" if r["confirmed"] else "no"
                line += f" {r['check_d_a_clip']:+.3f} | {r['check_fid_ratio']:.2f} | {yes} |"
            else:
                line += " – | – | – |"
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"base": base_s, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
