"""Finding Dori, Tables 3 and 5 (Section 4.4, Appendix G.2, I.5, I.7): adversarial fine-tuning against ESD,
Concept Ablation, SISS and the LoRA variant, audited with Dori, on a world.

Command that reproduces the committed result (``docs/results/tables3-5.md``; world v2, one H200)::

    python experiments/tables3_5_finetuning.py --device cuda --out runs/gpu/table5 --limit 16 --epochs 5 \
        --n-utility 200 --n-heldout 50

Stages, each resumable (run the command again after a kill; finished work is skipped):

1. NeMo fitted on SET: the mitigation the surrogate images are generated under (:func:`dori.fitting.fit_nemo`).
2. Adversarial fine-tuning, EPOCHS epochs, surrogates under NeMo (:class:`AdversarialFineTuning`), with the
   Appendix I.7 check on CHECK_UTILITY utility pairs; then the LoRA variant on the same surrogates.
3. The baselines: ESD-x, Concept Ablation (anchors from the world's caption grammar), SISS per item
   (keep set = the same surrogates, forget set = the training image).
4. The audit, with :mod:`dori.evaluation` on the same items and seeds for every model: each model from the
   memorized prompts and with Dori (DORI_STEPS steps, prompt and random init), SSCD_gen against the
   unmitigated model's generations, FID/KID on UTILITY_SET, A_CLIP on HELDOUT rows.
5. ``OUT/table5.json`` (the audit schema: ``rows`` with ``key`` ``none``, ``none+dori``, ``esd``, ``esd+dori``,
   ``ca``, ``ca+dori``, ``siss``, ``siss+dori``, ``advft``, ``advft+dori``, ``advft-lora``, ``advft-lora+dori``,
   the ``-random`` rows for random init, ``heldout.*`` rows; ``paper``; ``cost``; ``provenance``) and
   ``OUT/TABLE5.md`` with the paper's numbers beside the measured ones.

Every config value below can be edited in place; the common ones are also options
(``--limit K --epochs E --out DIR --device cuda``). A changed setting needs a new OUT.

On the shipped world NeMo leaves 7 of the 40 vm items replicating, so they get no surrogates and are not
fine-tuned away. ``--surrogate-model DIR`` fills the gap: DIR is a world that never saw these items, e.g. one
made by ``dori miniworld train --seed 1 --out DIR``. The defaults (lr 4e-5, 12 epochs) met every bound with it
on 5 of 5 seeds on world v1 (docs/adversarial_ft.md).
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
from dori.fitting import fit_nemo
from dori.metrics.backends import load_backends
from dori.metrics.replication import copy_similarity
from dori.mitigations import load_mitigation
from dori.mitigations.adversarial_ft import AdversarialFineTuning
from dori.mitigations.concept_ablation import ConceptAblation, miniworld_anchors
from dori.mitigations.esd import ESD
from dori.mitigations.nemo import NeMo
from dori.mitigations.siss import SISS
from dori.mitigations.surrogate_policy import SurrogatePolicy, utility_memorization_check
from dori.models.loading import load_model
from dori.models.pipeline import SamplingConfig
from dori.report.tables import format_table
from dori.runs import RunDir, atomic_write_text

# ---------------------------------------------------------------- config
MODEL = "miniworld"
SET = "vm"  # the memorized items to remove
LIMIT = None  # first K items of SET (None: all)
UTILITY_TRAIN = "unique"  # non-memorized pairs for L_DM (the paper: LAION pairs)
N_UTILITY_TRAIN = 2000
UTILITY_SET = "heldout"  # FID/KID prompts and reference images; also the A_CLIP rows
N_UTILITY = 500
N_HELDOUT = 100  # heldout items for the A_CLIP rows
SEED = 0
OUT = Path("runs/table5-miniworld")
NEMO: dict = {}  # NeMo settings (default: the reference's)
SURROGATES = {"per_item": 4, "sample_steps": 50, "guidance": 7.0}  # SurrogatePolicy
# adversarial fine-tuning (lr, batches and embeddings per item are chosen on the miniworld: docs/adversarial_ft.md)
EPOCHS = 12
LR = 4e-5
ADV = {
    **{"noise_draws": 8, "utility_batch": 64, "utility_weight": 10.0},
    **{"steps_per_embedding": 3, "embeddings_per_item": 1, "dori_steps": 50},
}
LORA = {"lora_rank": 128}  # add "lora_convs": True for the paper's second LoRA variant
CHECK_UTILITY = 100  # Appendix I.7: utility pairs checked for new memorization
_cli = argparse.ArgumentParser(description="Tables 3 and 5 of Finding Dori on a world (resumable)")
_cli.add_argument("--model", default=MODEL)
_cli.add_argument("--limit", type=int, default=LIMIT, help="first K items of the set (default: all)")
_cli.add_argument("--epochs", type=int, default=EPOCHS)
_cli.add_argument("--out", type=Path, default=OUT)
_cli.add_argument("--device", default=None, help="e.g. cuda (default: the models' default device)")
_cli.add_argument("--n-utility", type=int, default=N_UTILITY, help="FID/KID prompts")
_cli.add_argument("--n-heldout", type=int, default=N_HELDOUT, help="heldout items for the A_CLIP rows")
_cli.add_argument("--check-utility", type=int, default=CHECK_UTILITY, help="Appendix I.7 pairs")
_cli.add_argument("--esd-per-item", type=int, default=90, help="ESD iterations per memorized item")
_cli.add_argument("--ca-per-item", type=int, default=107, help="Concept Ablation steps per memorized item")
_cli.add_argument(
    "--only",
    default=None,
    help="comma list of fit stages to run, then stop (nemo, advft, advft-lora, esd, ca, siss): lets "
    "independent stages run as parallel processes; a final call without it runs the rest and the audit",
)
_cli.add_argument(
    "--surrogate-model",
    default=None,
    help="another model (App. I.1) that makes the surrogates of the items NeMo leaves replicating (default: "
    "none; those items are skipped)",
)
_cli.add_argument(
    "--lr", type=float, default=LR, help=f"adversarial fine-tuning learning rate (default {LR})"
)
_cli.add_argument(
    "--variants",
    default="advft,advft-lora",
    help="comma list of the adversarial fine-tuning rows to fit and audit (default advft,advft-lora; empty: "
    "baselines only)",
)
_cli.add_argument(
    "--baselines",
    default="esd,ca,siss",
    help="comma list of the baselines to fit and audit (default esd,ca,siss); the rest are left out",
)
_opts = _cli.parse_args()
MODEL, LIMIT, EPOCHS, OUT = _opts.model, _opts.limit, _opts.epochs, _opts.out
N_UTILITY, N_HELDOUT, CHECK_UTILITY = _opts.n_utility, _opts.n_heldout, _opts.check_utility
DEVICE = _opts.device or "cpu"
# baselines (reference settings; the Dori paper ran ESD ~90 and CA ~107 steps per memorized prompt)
ESD_PER_ITEM = _opts.esd_per_item
CA_PER_ITEM = _opts.ca_per_item
ONLY = set(_opts.only.split(",")) if _opts.only else None
BASELINES = [b for b in ("esd", "ca", "siss") if b in _opts.baselines.split(",")]
VARIANTS = [v for v in ("advft", "advft-lora") if v in _opts.variants.split(",")]
if "advft-lora" in VARIANTS and "advft" not in VARIANTS:
    _cli.error("--variants advft-lora needs advft (it reuses advft's surrogates)")
LR = _opts.lr
CA_ANCHOR_IMAGES = 64  # reference: 1000 per prompt
SISS_SCALING = None  # reference 750 is SD v1.4's scale; None (auto) = 10% of the keep gradient norm
# audit
DORI_STEPS = 50
INITS = ("prompt", "random")
N_GENS = 10
SAMPLE_STEPS = 50
GUIDANCE = 7.0

# the paper's numbers (SD v1.4, VM; Tables 3 and 5): sscd_orig, sscd_gen, a_clip, mr, fid
PAPER = {
    "none": (0.90, None, 0.33, 0.98, 14.44),
    "esd": (0.24, 0.27, 0.34, 0.11, 13.45),
    "esd+dori": (0.90, 0.97, 0.33, 0.98, None),
    "ca": (0.39, 0.49, 0.34, 0.29, 16.03),
    "ca+dori": (0.91, 0.96, 0.32, 0.97, None),
    "siss+dori": (0.60, None, None, 0.39, None),
    "advft": (0.15, 0.15, 0.33, 0.00, 13.61),
    "advft+dori": (0.36, 0.54, 0.30, 0.02, None),
}
COST = OUT / "cost"  # one file per stage: parallel processes (--only) never overwrite each other's


def load_cost() -> dict:
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(COST.glob("*.json"))}


def timed(name: str, done: Path, fit) -> None:
    """Run one fit stage unless ``done`` exists (or ``--only`` leaves it out); record its wall time."""
    if done.exists() or (ONLY is not None and name not in ONLY):
        return
    if name in ("esd", "ca", "siss") and name not in BASELINES:
        return
    if name in ("advft", "advft-lora") and name not in VARIANTS:
        return
    print(f"stage {name}", flush=True)
    start = time.perf_counter()
    fit()
    spent(name, start)


def spent(name: str, start: float) -> None:
    """Add the wall time since ``start`` to stage ``name``'s cost (summed over reruns, OUT/cost/NAME.json)."""
    seconds = round(load_cost().get(name, 0.0) + time.perf_counter() - start, 1)
    atomic_write_text(COST / f"{name}.json", json.dumps({"seconds": seconds}))


# ---------------------------------------------------------------- 1-3: fit and fine-tune
model = load_model(MODEL, device=DEVICE)
items = load_set(SET, model, limit=LIMIT)
n = len(items)
nemo = OUT / "nemo"
surr = OUT / "advft" / "surrogates"
utility_train = load_set(UTILITY_TRAIN, model, limit=N_UTILITY_TRAIN)


def copy_check():
    b = load_backends(model)
    return copy_similarity(b.copy_detector), b.threshold, b.copy_detector.name


def surrogates(out: Path, folder: Path | None = None):
    """Surrogates generated under NeMo (and by --surrogate-model for what NeMo leaves replicating), or ``folder``."""
    policy = SurrogatePolicy(folder=folder, seed=SEED, **SURROGATES)
    if folder is not None or (out / "surrogates" / "surrogates.json").exists():
        return policy.surrogates(model, items, out, copy_check)
    other = load_model(_opts.surrogate_model, device=DEVICE) if _opts.surrogate_model else None
    return policy.surrogates(model, items, out, copy_check, load_mitigation(f"nemo:{nemo}"), other)


def fit_advft(lora: bool) -> None:
    out = OUT / ("advft-lora" if lora else "advft")
    ft = AdversarialFineTuning(epochs=EPOCHS, lr=LR, seed=SEED, **ADV, **(LORA if lora else {}))
    keep = surrogates(out, surr if lora else None)
    tuned = ft(model, items, out, surrogates=keep, utility=utility_train)  # writes out/finetune.json
    if not lora and CHECK_UTILITY > 0:  # Appendix I.7, written to out/utility_memorization.json
        sim, thr, _ = copy_check()
        utility_memorization_check(
            model, tuned, utility_train[:CHECK_UTILITY], sim, thr, SEED, SamplingConfig(), out
        )


def fit_esd() -> None:
    esd = ESD(iterations=ESD_PER_ITEM * n, seed=SEED, resolution=None, dtype="float32")
    esd(model, items, OUT / "esd")


def fit_ca() -> None:
    sim, _, _ = copy_check()  # anchors kept at <= 0.5, the reference's rule
    avoid = [it.prompt for name in ("vm", "tm") for it in load_set(name, model)]
    anchors = {it.id: miniworld_anchors(it.prompt, 8, avoid, SEED) for it in items}
    ca = ConceptAblation(steps=CA_PER_ITEM * n, anchor_images=CA_ANCHOR_IMAGES, seed=SEED)
    ca(model, items, OUT / "ca", anchors=anchors, similarity=sim)


def fit_siss() -> None:
    # SISS's keep set: adversarial FT's surrogates, or (baselines only) the same kind generated under NeMo
    keep = surrogates(OUT / "siss", surr if "advft" in VARIANTS else None)
    siss = SISS(scaling_norm=SISS_SCALING, seed=SEED, variant="surrogates")
    folders = siss(model, items, OUT / "siss", keep=keep)
    models = {k: str(v) for k, v in folders.items()}
    atomic_write_text(
        OUT / "siss.json", json.dumps({"settings": siss.settings(), "models": models}, indent=1)
    )


timed("nemo", nemo / "nemo.json", lambda: fit_nemo(model, items, nemo, NeMo(**NEMO), run_config={"set": SET}))
timed("advft", OUT / "advft" / "finetune.json", lambda: fit_advft(lora=False))
timed("advft-lora", OUT / "advft-lora" / "finetune.json", lambda: fit_advft(lora=True))
timed("esd", OUT / "esd" / "finetune.json", fit_esd)
timed("ca", OUT / "ca" / "finetune.json", fit_ca)
timed("siss", OUT / "siss.json", fit_siss)

if ONLY is not None:
    sys.exit(0)

# ---------------------------------------------------------------- 4: audit
backends = load_backends(model)
config = EvalConfig(n_gens=N_GENS, sampling=SamplingConfig(steps=SAMPLE_STEPS, guidance=GUIDANCE), seed=SEED)
run = RunDir(
    OUT / "audit", {"model": MODEL, "set": SET, "limit": LIMIT, "dori_steps": DORI_STEPS, "seed": SEED}
)
indices = list(range(n))
util_items = load_set(UTILITY_SET, model, limit=N_UTILITY)
util_prompts = [it.prompt for it in util_items]
heldout = load_set(UTILITY_SET, model, limit=N_HELDOUT)  # A_CLIP rows on captions never trained on
rows: list[dict] = []


def settings_of(key: str, ref: str | None) -> list[Setting]:
    """The rows of one model state: from the prompts, then with Dori from each init."""
    out = [Setting(key, key, reference=ref)]
    for init in INITS:
        dk = f"{key}+dori" + ("" if init == "prompt" else "-random")
        out.append(Setting(dk, dk, attack="dori", dori_steps=DORI_STEPS, init=init, reference=ref))
    return out


def evaluate(m, key: str, setting: Setting, sub: list, idx: list[int]) -> list[dict]:
    """Generate and score one setting (a Dori search first, for attack rows) on items ``sub``."""
    emb = None
    if setting.attack == "dori":
        attack = Dori(steps=DORI_STEPS, init=setting.init)
        emb = run_attack(m, sub, idx, attack, run, config, [DORI_STEPS], tag=f"{key}.{setting.init}")[
            DORI_STEPS
        ]
    return evaluate_items(m, sub, idx, backends, run, setting, config, embeddings=emb)


def audit(key: str, m) -> None:
    """Rows ``key``, ``key+dori``, ``key+dori-random`` on SET, FID/KID, and ``heldout.key`` (A_CLIP)."""
    start = time.perf_counter()
    ref = None if key == "none" else "none"
    extra = {}
    if backends.features is not None:
        util = utility_scores(
            m, util_prompts, lambda: [it.image for it in util_items], backends, run, key, config
        )
        extra = {"fid": util["fid"], "kid": util["kid"], "utility_set": UTILITY_SET}
    for setting in settings_of(key, ref):
        rows.append(
            dict(summarize(evaluate(m, key, setting, items, indices), setting, SET, backends.threshold))
        )
        rows[-1].update(extra)
    held = Setting(f"heldout.{key}", f"heldout.{key}")
    records = evaluate_items(m, heldout, list(range(len(heldout))), backends, run, held, config)
    rows.append(summarize(records, held, UTILITY_SET, backends.threshold))
    spent(f"audit.{key}", start)


# ---------------------------------------------------------------- 5: write


def write(final: bool) -> None:
    """``OUT/table5.json`` and ``OUT/TABLE5.md`` from the rows so far (rewritten after every model)."""
    log = OUT / "advft" / "losses.jsonl"
    advft_log = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    epochs = [r for r in advft_log if r.get("kind") == "epoch"]
    i7 = OUT / "advft" / "utility_memorization.json"
    paper = {
        k: dict(zip(("sscd_orig", "sscd_gen", "a_clip", "mr", "fid"), v, strict=True))
        for k, v in PAPER.items()
    }
    result = {
        "model": MODEL,
        "set": SET,
        "complete": final,
        "rows": rows,
        "paper": paper,
        "utility_memorization": json.loads(i7.read_text()) if i7.exists() else None,
        "cost_seconds": load_cost(),  # wall time per stage, summed over (re)runs; a finished stage adds nothing
        "advft_epochs": epochs,  # per epoch: losses, Dori and update seconds
        "provenance": run.provenance,
    }
    atomic_write_text(OUT / "table5.json", json.dumps(result, indent=2, default=str))
    lines = [
        f"# Tables 3 and 5 on {MODEL} (`{SET}`, {n} items)",
        "",
        f"Command: `python experiments/tables3_5_finetuning.py {' '.join(sys.argv[1:])}`",
        "",
        *([] if final else ["**Partial**: the audit has not reached every model yet.", ""]),
    ]
    lines += [format_table(rows, fmt="markdown"), "", "Paper (SD v1.4, VM):", ""]
    lines += [
        f"- {k}: " + ", ".join(f"{m} {v}" for m, v in p.items() if v is not None) for k, p in paper.items()
    ]
    atomic_write_text(OUT / "TABLE5.md", "\n".join(lines) + "\n")
    print(format_table(rows))
    print(f"written: {OUT / 'table5.json'}, {OUT / 'TABLE5.md'}")


audit("none", model)
write(final=False)
for key in [b for b in BASELINES if b != "siss"] + VARIANTS:
    audit(key, load_model(str(OUT / key), device=DEVICE))
    write(final=False)

# SISS: one model per item (each started from the original model), each audited on its own item only; no
# FID or heldout rows (they would mix models)
if "siss" in BASELINES:
    start = time.perf_counter()
    siss_models = json.loads((OUT / "siss.json").read_text())["models"]
    siss_items = [(j, it) for j, it in enumerate(items) if it.id in siss_models]
    for j, it in siss_items:
        m = load_model(siss_models[it.id], device=DEVICE)
        for setting in settings_of("siss", "none"):
            evaluate(m, "siss", setting, [it], [j])
    for setting in settings_of("siss", "none"):
        records = [run.get(f"item.{setting.key}.{it.id}") for _, it in siss_items]
        rows.append(dict(summarize(records, setting, SET, backends.threshold), n_models=len(siss_items)))
    spent("audit.siss", start)

write(final=True)
