"""Finding Dori, Tables 3 and 5: ESD, Concept Ablation and SISS, each with and without Dori, after the parity
fixes of issue 26 (each method follows its reference code; the paper's settings as the named variants).

Command (from the repository root)::

    . .venv/bin/activate && python experiments/tables3_5_baselines.py --limit 8 --device cuda --out runs/t35

Per method, on the first ``--limit`` vm items of the world (one model for all items; SISS one model per item):

* ESD ``variant="paper"`` (the paper's ~90 iterations per prompt: ``--esd-per-item``), reference settings
  otherwise (PNDM, eta 2, guidance 3, bfloat16) at the world's own image size;
* Concept Ablation ``variant="paper"`` (~107 steps per prompt: ``--ca-per-item``), reference settings
  otherwise (lr 2e-6 after --scale_lr, AdamW, resize augmentation, DPM-Solver anchors kept at <= 0.5),
  anchors from the world's caption grammar, ``--anchor-images`` per item (reference 1000);
* SISS ``variant="paper"`` (App. E.2: ``--siss-images`` generations of a random-token prompt, split by the copy
  detector), reference settings otherwise (t = 999, summed losses, 35 steps x 16), scaling norm "auto" (10%
  of the keep gradient; 750 is SD v1.4's scale).

``--first K`` starts at the K-th item (to split SISS's per-item models over processes); ``--fit-deadline S``
starts no fit after S seconds (SISS stops between items) and audits what was fitted (the GPU script
``experiments/tables3_5_gpu.sh`` uses both); ``--siss-steps`` and the per-item counts shrink a CPU trial.

Each model is audited with :mod:`dori.evaluation` on the same items and seeds: from the memorized prompts and
with Dori (``--dori-steps``, prompt and random init); SSCD_gen against the unmitigated model; FID/KID on
``--n-utility`` heldout pairs (not for SISS, whose models are per item). Writes ``OUT/table3_5.json`` and
``OUT/TABLE3_5.md`` after every stage (a killed run resumes: fitted models and audit records are reused).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit import run_attack
from dori.data.sets import load_set
from dori.evaluation import EvalConfig, Setting, evaluate_items, summarize, utility_scores
from dori.metrics.backends import load_backends
from dori.metrics.replication import copy_similarity
from dori.mitigations.concept_ablation import ConceptAblation, miniworld_anchors
from dori.mitigations.esd import ESD
from dori.mitigations.siss import SISS
from dori.models.loading import load_model
from dori.models.pipeline import SamplingConfig
from dori.report.tables import format_table
from dori.runs import RunDir, atomic_write_text, safe_key

cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
cli.add_argument("--model", default="miniworld")
cli.add_argument("--set", default="vm")
cli.add_argument("--limit", type=int, default=8)
cli.add_argument(
    "--first", type=int, default=0, help="index of the first item (to split items over processes)"
)
cli.add_argument("--device", default="cpu")
cli.add_argument("--out", type=Path, default=Path("runs/table3_5"))
cli.add_argument("--methods", default="siss,esd,ca", help="comma list, run in this order")
cli.add_argument("--esd-per-item", type=int, default=90)
cli.add_argument("--esd-dtype", default="bfloat16")
cli.add_argument("--ca-per-item", type=int, default=107)
cli.add_argument("--anchor-images", type=int, default=64)
cli.add_argument("--siss-images", type=int, default=128)
cli.add_argument("--siss-steps", type=int, default=35, help="optimizer steps per item (reference 35)")
cli.add_argument("--dori-steps", type=int, default=50)
cli.add_argument("--n-gens", type=int, default=10)
cli.add_argument("--sample-steps", type=int, default=50)
cli.add_argument("--n-utility", type=int, default=100)
cli.add_argument("--seed", type=int, default=0)
cli.add_argument(
    "--fit-deadline",
    type=float,
    default=None,
    help="seconds after the start: no fit starts later (SISS stops between items); fitted models are audited",
)
opts = cli.parse_args()
START = time.perf_counter()
OUT: Path = opts.out
OUT.mkdir(parents=True, exist_ok=True)
PAPER = {  # SD v1.4, VM (Tables 3 and 5): sscd_orig, sscd_gen, a_clip, mr, fid
    "none": (0.90, None, 0.33, 0.98, 14.44),
    "esd": (0.24, 0.27, 0.34, 0.11, 13.45),
    "esd+dori": (0.90, 0.97, 0.33, 0.98, None),
    "ca": (0.39, 0.49, 0.34, 0.29, 16.03),
    "ca+dori": (0.91, 0.96, 0.32, 0.97, None),
    "siss+dori": (0.60, None, None, 0.39, None),
}

model = load_model(opts.model, device=opts.device)
items = load_set(opts.set, model, limit=opts.first + opts.limit)[opts.first :]
n = len(items)
backends = load_backends(model)
similarity = copy_similarity(backends.copy_detector)
config = EvalConfig(
    n_gens=opts.n_gens, sampling=SamplingConfig(steps=opts.sample_steps, guidance=7.0), seed=opts.seed
)
run = RunDir(
    OUT / "audit",
    {"model": opts.model, "set": opts.set, "limit": opts.limit, "dori_steps": opts.dori_steps}
    | ({"first": opts.first} if opts.first else {}),
)
util_items = load_set("heldout", model, limit=opts.n_utility) if opts.n_utility else []
rows: list[dict] = []
cost: dict[str, float] = {}
settings: dict[str, dict] = {}


def settings_of(key: str) -> list[Setting]:
    ref = None if key == "none" else "none"
    out = [Setting(key, key, reference=ref)]
    for init in ("prompt", "random"):
        dk = f"{key}+dori" + ("" if init == "prompt" else "-random")
        out.append(Setting(dk, dk, attack="dori", dori_steps=opts.dori_steps, init=init, reference=ref))
    return out


def evaluate(m, key: str, setting: Setting, sub: list, idx: list[int]) -> list[dict]:
    emb = None
    if setting.attack == "dori":
        attack = Dori(steps=opts.dori_steps, init=setting.init)
        tag = f"{key}.{setting.init}"
        emb = run_attack(m, sub, idx, attack, run, config, [opts.dori_steps], tag=tag)[opts.dori_steps]
    return evaluate_items(m, sub, idx, backends, run, setting, config, embeddings=emb)


def audit(key: str, m) -> None:
    extra = {}
    if util_items and backends.features is not None:
        util = utility_scores(
            m,
            [it.prompt for it in util_items],
            lambda: [it.image for it in util_items],
            backends,
            run,
            key,
            config,
        )
        extra = {"fid": util["fid"], "kid": util["kid"], "utility_set": f"heldout ({len(util_items)})"}
    for setting in settings_of(key):
        rows.append(
            dict(
                summarize(
                    evaluate(m, key, setting, items, list(range(n))), setting, opts.set, backends.threshold
                )
            )
        )
        rows[-1].update(extra)


def write() -> None:
    paper = {
        k: dict(zip(("sscd_orig", "sscd_gen", "a_clip", "mr", "fid"), v, strict=True))
        for k, v in PAPER.items()
    }
    result = {
        "model": opts.model,
        "set": opts.set,
        "items": [it.id for it in items],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "settings": settings,
        "rows": rows,
        "paper": paper,
        "cost_seconds": cost,
        "provenance": run.provenance,
    }
    atomic_write_text(OUT / "table3_5.json", json.dumps(result, indent=2, default=str))
    lines = [f"# Tables 3 and 5 baselines on {opts.model} (`{opts.set}`, {n} items)", "",
             f"Command: `python experiments/tables3_5_baselines.py {' '.join(sys.argv[1:])}`", "",
             format_table(rows, fmt="markdown"), ""]  # fmt: skip
    atomic_write_text(OUT / "TABLE3_5.md", "\n".join(lines) + "\n")
    print(format_table(rows), flush=True)


def past_deadline(what: str) -> bool:
    late = opts.fit_deadline is not None and time.perf_counter() - START > opts.fit_deadline
    if late:
        settings.setdefault("not_fitted", []).append(what)
        print(f"--fit-deadline {opts.fit_deadline} s passed: {what} not fitted", flush=True)
    return late


def timed(name: str, fn) -> None:
    start = time.perf_counter()
    fn()
    cost[name] = round(cost.get(name, 0.0) + time.perf_counter() - start, 1)
    write()


def run_esd() -> None:
    esd = ESD(variant="paper", iterations=opts.esd_per_item * n, resolution=None, dtype=opts.esd_dtype)
    settings["esd"] = esd.settings()
    folder = OUT / "esd"
    if not (folder / "finetune.json").exists() and past_deadline("esd"):
        return
    timed("esd", lambda: None if (folder / "finetune.json").exists() else esd(model, items, folder))
    timed("audit.esd", lambda: audit("esd", load_model(str(folder), device=opts.device)))


def run_ca() -> None:
    ca = ConceptAblation(variant="paper", steps=opts.ca_per_item * n, anchor_images=opts.anchor_images)
    settings["ca"] = ca.settings()
    avoid = [it.prompt for name in ("vm", "tm") for it in load_set(name, model)]
    anchors = {it.id: miniworld_anchors(it.prompt, 8, avoid, opts.seed) for it in items}
    folder = OUT / "ca"
    if not (folder / "finetune.json").exists() and past_deadline("ca"):
        return

    def fit() -> None:
        if not (folder / "finetune.json").exists():
            ca(model, items, folder, anchors=anchors, similarity=similarity)

    timed("ca", fit)
    timed("audit.ca", lambda: audit("ca", load_model(str(folder), device=opts.device)))


def run_siss() -> None:
    siss = SISS(
        variant="paper", steps=opts.siss_steps, scaling_norm=None, n_images=opts.siss_images, seed=opts.seed
    )
    settings["siss"] = siss.settings()
    folders: dict = {}

    def fit() -> None:
        def log(record: dict) -> None:
            if record.get("kind") == "skipped":
                settings.setdefault("siss_skipped", {}).update(record["items"])

        for it in items:  # one folder per item (OUT/siss/<id>/<id>), so the deadline can stop between items
            folder = OUT / "siss" / safe_key(it.id)
            if not (folder / safe_key(it.id) / "finetune.json").exists() and past_deadline(f"siss {it.id}"):
                break
            kw = dict(similarity=similarity, threshold=backends.threshold, log=log)
            folders.update(siss(model, [it], folder, **kw))

    def audit_siss() -> None:
        done = [(j, it) for j, it in enumerate(items) if it.id in folders]
        for j, it in done:
            m = load_model(str(folders[it.id]), device=opts.device)
            for setting in settings_of("siss"):
                evaluate(m, "siss", setting, [it], [j])
        for setting in settings_of("siss"):
            records = [run.get(f"item.{setting.key}.{it.id}") for _, it in done]
            rows.append(dict(summarize(records, setting, opts.set, backends.threshold), n_models=len(done)))

    timed("siss", fit)
    settings["siss_items"] = sorted(folders)
    timed("audit.siss", audit_siss)


timed("audit.none", lambda: audit("none", model))
for method in opts.methods.split(","):
    {"esd": run_esd, "ca": run_ca, "siss": run_siss}[method]()
write()
