"""Table 1 of Finding Dori: pruning-based mitigations conceal memorization; Dori brings it back.

Rows (settings named as in the audit schema):

    none         memorized (vm) prompts, no mitigation
    nonmem       non-memorized training prompts (the world's ``unique`` set; SD: ``nonmem``)
    nonmem+dori  Dori (50 steps, prompt init) on the non-memorized images
    nemo         NeMo per-prompt neuron sets, original prompts
    nemo+dori    NeMo + Dori (searched against the pruned model)
    wanda        Wanda (1% sparsity, masks per prompt), original prompts
    wanda+dori   Wanda + Dori

Steps, linear: fit NeMo and Wanda on the memorized set (:mod:`dori.fitting`, resumable folders), run three
audits, one folder each (the Wanda audit reuses the NeMo audit's unmitigated rows and utility, which do not
depend on the mitigation: :func:`dori.audit_run.share_unmitigated`), rename the rows, attach the
paper's numbers, write ``table1.json`` (audit schema), ``TABLE1.md`` and the HTML report. FID/KID are
computed on the utility set with each mitigation applied for all items at once (as the paper, App. H.1).
Every step resumes: run the same call again after a kill.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit_run import audit_to_folder, utility_set, window
from dori.data.sets import load_set
from dori.evaluation import EvalConfig
from dori.fitting import fit_nemo, fit_wanda
from dori.metrics.backends import load_backends
from dori.mitigations import load_mitigation
from dori.mitigations.nemo import NeMo
from dori.mitigations.wanda import Wanda
from dori.models.devices import open_model
from dori.models.pipeline import SamplingConfig

# Table 1 of the paper (SD v1.4, 112 VM prompts): SSCD_orig, SSCD_gen, A_CLIP as median ± MAD; MR; FID.
PAPER_TABLE1 = {
    "none": {"sscd_orig": (0.90, 0.04), "sscd_gen": None, "a_clip": (0.33, 0.01), "mr": 0.98, "fid": 14.44},
    "nonmem": {"sscd_orig": (0.17, 0.05), "sscd_gen": None, "a_clip": (0.35, 0.02), "mr": 0.00, "fid": 14.44},
    "nonmem+dori": {
        "sscd_orig": (0.48, 0.06),
        "sscd_gen": None,
        "a_clip": (0.32, 0.02),
        "mr": 0.00,
        "fid": None,
    },
    "nemo": {
        "sscd_orig": (0.33, 0.18),
        "sscd_gen": (0.40, 0.21),
        "a_clip": (0.34, 0.02),
        "mr": 0.20,
        "fid": 15.16,
    },
    "nemo+dori": {
        "sscd_orig": (0.91, 0.03),
        "sscd_gen": (0.97, 0.02),
        "a_clip": (0.33, 0.02),
        "mr": 0.99,
        "fid": None,
    },
    "wanda": {
        "sscd_orig": (0.20, 0.08),
        "sscd_gen": (0.21, 0.09),
        "a_clip": (0.34, 0.02),
        "mr": 0.00,
        "fid": 16.86,
    },
    "wanda+dori": {
        "sscd_orig": (0.76, 0.05),
        "sscd_gen": (0.82, 0.05),
        "a_clip": (0.32, 0.01),
        "mr": 0.72,
        "fid": None,
    },
}
ORDER = ["none", "nonmem", "nonmem+dori", "nemo", "nemo+dori", "wanda", "wanda+dori"]


@dataclass
class Table1Config:
    """Settings of the recipe (defaults: the paper's protocol on the shipped miniworld)."""

    model: str = "miniworld"
    mem_set: str = "vm"
    nonmem_set: str = "unique"
    utility_set: str = "heldout"
    n_utility: int = 200
    limit: int | None = None
    nonmem_limit: int = 40  # items of the non-memorized set when ``limit`` is None (a world has 40,000)
    n_gens: int = 10
    dori_steps: int = 50
    snapshots: str = "1,10,25"
    wanda_sparsity: float = 0.01
    wanda_group: str = "prompt"
    device: str | None = None
    dtype: str = "fp32"
    batch_size: int = 64  # images per UNet batch when sampling (results do not depend on it)
    fast: bool = False  # the audits on the fast path (bf16 weights on CUDA, batches from free memory)
    seed: int = 0
    progress: bool = True


def _model(cfg: Table1Config):
    return open_model(cfg.model, cfg.device, cfg.dtype)


def run_table1(out: str | Path, cfg: Table1Config | None = None) -> dict:
    """Run (or resume) Table 1 into ``out``; returns the table JSON (audit schema + paper numbers)."""
    cfg = cfg or Table1Config()
    out = Path(out)
    timings: dict[str, float] = {}
    fit_config = {"model": cfg.model, "set": cfg.mem_set, "limit": cfg.limit, "dtype": cfg.dtype}
    t0 = time.perf_counter()
    model = _model(cfg)
    mem = load_set(cfg.mem_set, model=model, limit=cfg.limit)
    fit_nemo(
        model,
        mem,
        out / "nemo",
        NeMo(seed=1),
        run_config={"method": "nemo", **fit_config},
        progress=cfg.progress,
    )
    timings["fit_nemo"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    model = _model(cfg)
    mem = load_set(cfg.mem_set, model=model, limit=cfg.limit)
    wanda = Wanda(sparsity=cfg.wanda_sparsity, seed=0)
    fit_wanda(
        model, mem, out / "wanda", wanda, cfg.wanda_group, {"method": "wanda", **fit_config}, cfg.progress
    )
    timings["fit_wanda"] = round(time.perf_counter() - t0, 1)
    parts = {
        "nemo": (cfg.mem_set, f"nemo:{out / 'nemo'}", cfg.limit),
        "wanda": (cfg.mem_set, f"wanda:{out / 'wanda'}", cfg.limit),
        "nonmem": (cfg.nonmem_set, "none", cfg.limit or cfg.nonmem_limit),
    }
    results = {}
    for name, (set_name, mitigation, limit) in parts.items():
        t0 = time.perf_counter()
        model = _model(cfg)
        items = window(load_set(set_name, model), 0, limit)
        config = EvalConfig(
            n_gens=cfg.n_gens, sampling=SamplingConfig(batch_size=cfg.batch_size), seed=cfg.seed
        )
        attack = Dori(steps=cfg.dori_steps)
        if cfg.fast:
            from dori.fast import fast

            attack, config.sampling, _ = fast(model).tune_audit(model, config.sampling, attack, len(items))
        results[name] = audit_to_folder(
            out / f"audit-{name}", model, items, set_name, load_backends(model), config,
            mitigation=None if mitigation == "none" else load_mitigation(mitigation), attack=attack,
            snapshots=_snapshots(cfg.snapshots),
            utility=utility_set(cfg.utility_set, model, cfg.n_utility) if mitigation != "none" else None,
            model_label=cfg.model, progress=cfg.progress,
            share_from=out / "audit-nemo" if name == "wanda" else None,
        )  # fmt: skip
        timings[f"audit_{name}"] = round(time.perf_counter() - t0, 1)
    rows = collect_rows(results, cfg.dori_steps)
    table = {
        "recipe": "table1",
        "config": vars(cfg),
        "rows": [rows[k] for k in ORDER if k in rows],
        "steps_rows": [r for res in results.values() for r in res["rows"] if r.get("dori_steps")],
        "paper": PAPER_TABLE1,
        "timings_s": timings,
        "provenance": results["nemo"]["provenance"],
    }
    (out / "table1.json").write_text(json.dumps(table, indent=2, default=str))
    (out / "TABLE1.md").write_text(markdown(table))
    return table


def _snapshots(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(s) for s in text.split(",") if s.strip()}))


def collect_rows(results: dict[str, dict], steps: int) -> dict[str, dict]:
    """Pick and rename the rows of the three audits into the seven settings of Table 1."""

    def find(res: dict, key: str) -> dict | None:
        for row in res["rows"]:
            if row.get("key") == key and "/" not in str(row.get("set")):
                return dict(row)
        return None

    picks = {
        "none": find(results["nemo"], "none"),
        "nonmem": find(results["nonmem"], "none"),
        "nonmem+dori": find(results["nonmem"], f"none+dori-{steps}"),
        "nemo": find(results["nemo"], "nemo"),
        "nemo+dori": find(results["nemo"], f"nemo+dori-{steps}"),
        "wanda": find(results["wanda"], "wanda"),
        "wanda+dori": find(results["wanda"], f"wanda+dori-{steps}"),
    }
    if picks["nonmem"] is not None and picks["none"] is not None:  # same model state as "none"
        picks["nonmem"].update(fid=picks["none"].get("fid"), kid=picks["none"].get("kid"))
    rows = {}
    for key, row in picks.items():
        if row is None:
            continue
        row["audit_label"] = row.get("setting")
        row["setting"] = key
        rows[key] = row
    return rows


def _cell(value) -> str:
    if value is None:
        return "N/A"
    if isinstance(value, dict):
        med = value.get("median")
        return "N/A" if med is None else f"{med:.2f} ± {value.get('mad', 0.0):.2f}"
    if isinstance(value, tuple | list):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


def markdown(table: dict) -> str:
    """Table 1 in the paper's layout, each cell ``world (paper)``."""
    metrics = [
        ("sscd_orig", "↓ SSCD_orig"),
        ("sscd_gen", "↓ SSCD_gen"),
        ("a_clip", "↑ A_CLIP"),
        ("mr", "↓ MR"),
        ("fid", "↓ FID"),
    ]
    lines = [
        f"# Table 1 on {table['config']['model']} (paper: SD v1.4, 112 VM prompts)",
        "",
        "Each cell: this world (paper). FID of the world is on its utility set, not COCO; compare trends only.",
        "",
        "| Setting | n | " + " | ".join(h for _, h in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for row in table["rows"]:
        paper = table["paper"].get(row["setting"], {})
        cells = [f"{_cell(row.get(k))} ({_cell(paper.get(k))})" for k, _ in metrics]
        lines.append(f"| {row['setting']} | {row.get('n_items')} | " + " | ".join(cells) + " |")
    lines += ["", "MR against Dori steps:", "", "| audit row | steps | MR | SSCD_orig |", "|---|---|---|---|"]
    for row in table["steps_rows"]:
        lines.append(
            f"| {row.get('setting')} | {row.get('dori_steps')} | {_cell(row.get('mr'))} | {_cell(row.get('sscd_orig'))} |"
        )
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in table["timings_s"].items())]
    return "\n".join(lines) + "\n"
