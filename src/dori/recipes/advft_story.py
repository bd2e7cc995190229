"""The demo's second half: adversarial fine-tuning (Algorithm 2) of Table 1's memorized items, audited the
way Table 1 audits the pruning mitigations, so that one report shows which mitigation hid the images and which
removed them.

Steps, linear, each resumable (run the same call again after a kill):

1. adversarial fine-tuning of the items with the library defaults (or ``finetune``'s settings over them: the
   demo's CPU budget), surrogates from the model alone (:mod:`dori.mitigations.self_surrogates`), into
   ``OUT/advft`` (checkpoints per epoch);
2. the fine-tuned model audited on the items: from the prompts and with Dori from the prompt
   (``OUT/audit-advft``, with its utility: one generation per held-out caption, FID/KID against the held-out
   images and A_CLIP against the captions) and with Dori from random embeddings (``OUT/audit-advft-random``);
3. the same utility of the unmitigated model: given by the caller (the demo passes Table 1's ``none`` row, whose
   audit generated it with the same prompts and seeds), else audited here (``OUT/audit-none``).

Rows (settings named as in Table 1's JSON): ``advft``, ``advft+dori``, ``advft+dori-random``, ``utility.none``,
``utility.advft`` (``a_clip``: median ± MAD, mean and n over the held-out captions; ``fid``, ``kid``). Written to
``OUT/advft_story.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit_run import AuditJob, run_audit_job
from dori.data.sets import load_set
from dori.metrics.backends import load_backends
from dori.metrics.replication import copy_similarity
from dori.mitigations.adversarial_ft import AdversarialFineTuning
from dori.mitigations.surrogate_policy import SurrogatePolicy
from dori.models.devices import open_model


@dataclass
class AdvFTStoryConfig:
    """Settings of the recipe (defaults: the demo's)."""

    model: str = "miniworld"
    mem_set: str = "vm"
    limit: int | None = 12
    utility_train: str = "unique"  # non-memorized pairs of the fine-tuning's utility loss
    n_utility_train: int = 2000
    utility_set: str = "heldout"  # FID/KID prompts, and the captions of the A_CLIP rows
    n_utility: int = 100
    n_gens: int = 10
    dori_steps: int = 50
    snapshots: tuple[int, ...] = ()  # Dori step counts also scored in the fine-tuned model's audits
    finetune: dict = field(default_factory=dict)  # AdversarialFineTuning settings over the library defaults
    device: str | None = None
    seed: int = 0
    progress: bool = True


def _pick(audit: dict, key: str, name: str) -> dict | None:
    for row in audit["rows"]:
        if row.get("key") == key and "/" not in str(row.get("set")):
            return dict(row, audit_label=row.get("setting"), setting=name)
    return None


def _utility_row(row: dict | None, name: str) -> dict | None:
    """The utility of an audit's ``none`` row (the model without mitigation) as a row of its own."""
    if row is None or row.get("fid") is None:
        return None
    return {
        "setting": name,
        "set": row.get("utility_set"),
        "n_items": (row.get("a_clip_utility") or {}).get("n"),
        "a_clip": row.get("a_clip_utility"),
        "fid": row.get("fid"),
        "kid": row.get("kid"),
        "fid_reference": row.get("fid_reference"),
    }


def run_advft_story(
    out: str | Path, cfg: AdvFTStoryConfig | None = None, unmitigated: dict | None = None
) -> dict:
    """Run (or resume) the recipe into ``out``; returns the rows (see module docstring).

    ``unmitigated``: an audit row of the unmitigated model with its utility on ``cfg``'s utility set and seed
    (``fid``, ``kid``, ``a_clip_utility``; Table 1's ``none`` row); without it the recipe audits that itself.
    """
    cfg = cfg or AdvFTStoryConfig()
    out = Path(out)
    timings: dict[str, float] = {}
    folder = out / "advft"
    t0 = time.perf_counter()
    if not (folder / "finetune.json").exists():
        model = open_model(cfg.model, cfg.device, "fp32")
        items = load_set(cfg.mem_set, model, limit=cfg.limit)
        backends = load_backends(model)
        surrogates = SurrogatePolicy(seed=cfg.seed).surrogates(
            model, items, folder,
            lambda: (copy_similarity(backends.copy_detector), backends.threshold, backends.copy_detector.name),
            aligner=lambda: backends.aligner,
        )  # fmt: skip
        utility = load_set(cfg.utility_train, model, limit=cfg.n_utility_train)
        method = AdversarialFineTuning(**{"seed": cfg.seed, **cfg.finetune})
        method(model, items, folder, surrogates=surrogates, utility=utility)
    timings["finetune"] = round(time.perf_counter() - t0, 1)

    common = dict(n_gens=cfg.n_gens, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    jobs = {
        "audit-advft": AuditJob(
            model=str(folder), set=cfg.mem_set, limit=cfg.limit, attack=Dori(steps=cfg.dori_steps),
            snapshots=cfg.snapshots, utility_set=cfg.utility_set, n_utility=cfg.n_utility, **common,
        ),
        "audit-advft-random": AuditJob(  # the prompt rows are the same generations: taken from audit-advft
            model=str(folder), set=cfg.mem_set, limit=cfg.limit, attack=Dori(steps=cfg.dori_steps, init="random"),
            snapshots=cfg.snapshots, share_from=str(out / "audit-advft"), share_rows_only=True, **common,
        ),
    }  # fmt: skip
    if _utility_row(unmitigated, "utility.none") is None:
        jobs["audit-none"] = AuditJob(
            model=cfg.model, set=cfg.mem_set, limit=cfg.limit, utility_set=cfg.utility_set,
            n_utility=cfg.n_utility, **common,
        )  # fmt: skip
    audits = {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        audits[name] = run_audit_job(out / name, job)
        timings[name] = round(time.perf_counter() - t0, 1)
    steps = f"none+dori-{cfg.dori_steps}"
    rows = {
        "advft": _pick(audits["audit-advft"], "none", "advft"),
        "advft+dori": _pick(audits["audit-advft"], steps, "advft+dori"),
        "advft+dori-random": _pick(audits["audit-advft-random"], steps, "advft+dori-random"),
        "utility.none": _utility_row(
            unmitigated if "audit-none" not in audits else _pick(audits["audit-none"], "none", "none"),
            "utility.none",
        ),
        "utility.advft": _utility_row(_pick(audits["audit-advft"], "none", "advft"), "utility.advft"),
    }
    surr = json.loads((folder / "surrogates" / "surrogates.json").read_text())
    story = {
        "recipe": "advft_story",
        "config": vars(cfg),
        "rows": {k: v for k, v in rows.items() if v is not None},
        "finetune": {
            k: v for k, v in json.loads((folder / "finetune.json").read_text()).items() if k != "utility"
        },
        "surrogates": surr.get("settings", {}).get("summary"),
        "timings_s": timings,
    }
    (out / "advft_story.json").write_text(json.dumps(story, indent=2, default=str))
    return story
