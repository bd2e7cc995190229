"""Print Table 12's rows (markdown) from the world audits of tools/cpu_table12.sh (reads JSON only)."""

import json
import sys

PAPER = {  # Finding Dori, Table 12 (SD v1.4): SSCD_orig, A_Concepts, FID_Concepts, MR
    "none": ("0.90 ± 0.04", "0.37 ± 0.02", "N/A", "1.00"),
    "wanda 10%": ("0.40 ± 0.13 (+ Dori)", "0.33 ± 0.02", "80.70", "0.01 (+ Dori)"),
}


def fmt(v):
    return "–" if v is None else f"{v['median']:.3f} ± {v['mad']:.3f}"


for path in sys.argv[1:]:
    d = json.load(open(path))
    for r in d["rows"]:
        fid = r.get("fid_concept")
        print(f"| {path} | {r['setting']} | {r['n_items']} | {fmt(r['sscd_orig'])} | {r['mr']:.2f} | "
              f"{fmt(r.get('a_concept'))} | {'–' if fid is None else f'{fid:.2f}'} | {r.get('concept_generations')} |")
