"""Finding Dori, Tables 14, 15 and 16 (Appendix I.3-I.4): adversarial fine-tuning variants evaluated after each
number of epochs; the same script sweeps the unpublished settings (learning rate, embeddings per item).

Command (from the repository root; run ``experiments/tables3_5_finetuning.py`` first, whose NeMo surrogates
every variant reuses)::

    python experiments/tables14_16_advft_variants.py --preset table16

For each variant of PRESET: adversarial fine-tuning for max(EVAL_EPOCHS) epochs (every epoch is
checkpointed), then every checkpoint in EVAL_EPOCHS is audited with :mod:`dori.evaluation` on SET, from the
prompts ("Adv. Steps" 0) and with Dori from each (init, steps) of EVAL, plus FID/KID on UTILITY_SET; SSCD_gen
against the unmitigated model. Resumable. Writes ``OUT/<PRESET>.json`` (rows in the audit schema, ``key`` =
``<variant>.e<epoch>.<init><steps>``) and ``OUT/<PRESET>.md``.
"""

import argparse
import json
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit import run_attack
from dori.data.sets import load_set
from dori.evaluation import EvalConfig, Setting, evaluate_items, summarize, utility_scores
from dori.metrics.backends import load_backends
from dori.mitigations.adversarial_ft import AdversarialFineTuning
from dori.mitigations.surrogates import load_surrogates
from dori.models.loading import load_model
from dori.models.pipeline import SamplingConfig
from dori.report.tables import format_table
from dori.runs import RunDir, atomic_write_text

# ---------------------------------------------------------------- config
MODEL = "miniworld"
SET = "vm"
SURROGATES = Path("runs/table5-miniworld/advft/surrogates")  # made by the Table 5 recipe (NeMo)
UTILITY_TRAIN, N_UTILITY_TRAIN = "unique", 2000
UTILITY_SET, N_UTILITY = "heldout", 500
SEED = 0
OUT = Path("runs/advft-variants-miniworld")
EVAL_EPOCHS = (1, 5, 10, 20, 30, 40, 50)  # paper: 1-50
N_GENS, SAMPLE_STEPS, GUIDANCE = 10, 50, 7.0
PRESET = "table16"
PRESETS = {
    # Table 14: Dori steps during training, prompt init; evaluated with the prompts and Dori 50 (prompt init)
    "table14": {
        "variants": {f"train{k}": {"dori_steps": k, "init_schedule": "prompt"} for k in (25, 50, 100)},
        "eval": [("prompt", 0), ("prompt", 50)],
    },
    # Table 15: the same from random init; evaluated with Dori 50 and 100 from random init
    "table15": {
        "variants": {f"train{k}": {"dori_steps": k, "init_schedule": "random"} for k in (25, 50, 100)},
        "eval": [("random", 50), ("random", 100)],
    },
    # Table 16: ablations of the default (S = 3, both losses)
    "table16": {
        "variants": {
            "default": {},
            "one-step": {"steps_per_embedding": 1},
            "no-utility": {"utility_loss": False},
            "no-mitigation": {"mitigation_loss": False},
        },
        "eval": [("prompt", 0), ("prompt", 50)],
    },
    # the unpublished settings (docs/adversarial_ft.md): learning rate x noise draws x utility batch x
    # utility weight (utility batch 0 = as many as adversarial samples); tools/gpu_run.sh runs the
    # same on a GPU
    "defaults": {
        "variants": {
            f"lr{lr}-d{d}-u{u}-w{w}": {
                "lr": float(lr),
                "noise_draws": d,
                "utility_batch": u or None,
                "utility_weight": float(w),
            }
            for lr in ("1e-5", "2e-5", "3e-5", "4e-5")
            for d, u in ((1, 0), (8, 64))
            for w in (1, 3, 10)
        },
        "eval": [("prompt", 0), ("prompt", 50), ("random", 50)],
    },
}

parser = argparse.ArgumentParser(description="Tables 14-16 of Finding Dori on a world (resumable)")
parser.add_argument("--preset", default=PRESET, choices=sorted(PRESETS))
parser.add_argument("--out", type=Path, default=OUT)
parser.add_argument("--surrogates", type=Path, default=SURROGATES)
parser.add_argument("--device", default=None)
args = parser.parse_args()
PRESET, OUT = args.preset, args.out

# ---------------------------------------------------------------- fine-tune every variant
preset = PRESETS[PRESET]
epochs = max(EVAL_EPOCHS)
model = load_model(MODEL, device=args.device or "cpu")
items = load_set(SET, model)
for name, settings in preset["variants"].items():
    folder = OUT / name
    if (folder / "finetune.json").exists():
        continue
    ft = AdversarialFineTuning(epochs=epochs, seed=SEED, **settings)
    print(f"adversarial fine-tuning {name}: {settings}", flush=True)
    ft(
        model, items, folder,
        surrogates=None if not ft.mitigation_loss else load_surrogates(args.surrogates, items, model.image_size),
        utility=load_set(UTILITY_TRAIN, model, limit=N_UTILITY_TRAIN) if ft.utility_loss else [],
    )  # fmt: skip

# ---------------------------------------------------------------- audit every checkpoint
indices = list(range(len(items)))
backends = load_backends(model)
config = EvalConfig(n_gens=N_GENS, sampling=SamplingConfig(steps=SAMPLE_STEPS, guidance=GUIDANCE), seed=SEED)
run = RunDir(OUT / f"audit-{PRESET}", {"model": MODEL, "set": SET, "seed": SEED, "preset": PRESET})
util_items = load_set(UTILITY_SET, model, limit=N_UTILITY)
util_prompts = [it.prompt for it in util_items]
rows = []


def audit(key: str, m, ref: str | None) -> None:
    extra = {}
    if backends.features is not None:
        util = utility_scores(
            m, util_prompts, lambda: [it.image for it in util_items], backends, run, key, config
        )
        extra = {"fid": util["fid"], "kid": util["kid"], "utility_set": UTILITY_SET}
    evals = list(dict.fromkeys([("prompt", 0), *preset["eval"]])) if key == "none" else preset["eval"]
    for init, steps in evals:
        if steps == 0:
            setting = Setting(key, key, reference=ref)
            records = evaluate_items(m, items, indices, backends, run, setting, config)
        else:
            dk = f"{key}.{init}{steps}"
            setting = Setting(dk, dk, attack="dori", dori_steps=steps, init=init, reference=ref)
            search = Dori(steps=steps, init=init)
            emb = run_attack(m, items, indices, search, run, config, [steps], progress=False, tag=dk)[steps]
            records = evaluate_items(m, items, indices, backends, run, setting, config, embeddings=emb)
        rows.append(dict(summarize(records, setting, SET, backends.threshold), **extra))


audit("none", model, None)
for name in preset["variants"]:
    for e in EVAL_EPOCHS:
        audit(
            f"{name}.e{e}",
            load_model(str(OUT / name / "checkpoints" / f"epoch-{e:04d}"), device=model.device),
            "none",
        )

result = {"model": MODEL, "set": SET, "preset": PRESET, "rows": rows, "provenance": run.provenance}
atomic_write_text(OUT / f"{PRESET}.json", json.dumps(result, indent=2, default=str))
md = [f"# Adversarial fine-tuning variants `{PRESET}` on {MODEL} (`{SET}`)", ""]
md += [f"Command: `python experiments/tables14_16_advft_variants.py --preset {PRESET}`", ""]
md += [format_table(rows, fmt="markdown")]
atomic_write_text(OUT / f"{PRESET}.md", "\n".join(md) + "\n")
print(format_table(rows))
