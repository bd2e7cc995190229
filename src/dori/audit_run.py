"""An audit written to a folder: what ``dori audit``, the Table 1 recipe and the experiments all call.

:func:`audit_to_folder` opens (or resumes) the run directory, runs :func:`dori.audit.run_audit` with the given
attack and mitigation objects, writes ``audit.json`` (rows, settings, protocol, provenance) and the HTML
report. The helpers build its inputs from plain settings: :func:`window` (a slice of a set),
:func:`utility_set` (FID/KID prompts and reference images). :func:`share_unmitigated` lets audits of several
mitigations of one model (Table 1's NeMo and Wanda) generate the unmitigated model's rows once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dori import distributed
from dori.attacks.base import Attack
from dori.audit import Utility, run_audit
from dori.control import DEFAULT_LEVEL, control_report
from dori.data.images import EXTENSIONS
from dori.data.sets import Item, load_image_file, load_set
from dori.errors import DoriError
from dori.evaluation import EvalConfig
from dori.metrics.features import Backends
from dori.mitigations.base import Mitigation
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_write_text


def window(items: Sequence[Item], skip: int = 0, limit: int | None = None) -> list[Item]:
    """items[skip : skip + limit], refusing a window that leaves nothing."""
    if skip < 0:
        raise DoriError(f"skip must be >= 0, got {skip}")
    out = list(items[skip : skip + limit] if limit else items[skip:])
    if not out:
        raise DoriError(f"no items left: the set has {len(items)}, skipping {skip}")
    return out


# what an audit stores about the unmitigated model: its rows' records and generations, its utility (FID/KID and
# A_CLIP on the utility set) and the utility reference features, and its concept utility
_UNMITIGATED_RESULTS = ("item.none.", "utility.none", "concept.none.")
_UNMITIGATED_ARTIFACTS = ("gen.none.", "utility.none.", "utility.reference.", "concept.none.")


def share_unmitigated(src: str | Path, run: RunDir, rows_only: bool = False) -> int:
    """Copy the unmitigated model's records of the audit folder ``src`` into ``run`` where ``run`` lacks them.

    The rows of the model without mitigation (``none``) and its utility depend on the model, the items, the
    protocol (seeds, generations, sampling), the attack settings' folder-wide record and the utility set, not on
    the mitigation; so they are copied only when the two folders' settings (``config.json``) agree on
    everything but ``mitigation``. With ``rows_only`` only the ``none`` rows' records and generations are
    copied (they are generations from the prompts: the attack and the utility set do not enter them), and the
    settings may also differ in ``attack`` and ``utility`` (the demo's audit of Dori from random init takes the
    prompt rows of its audit from the prompt). Otherwise nothing is copied and ``run`` computes its own. Returns
    the number of files copied (0 when nothing could be shared).
    """
    src = Path(src)
    try:
        theirs = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    free = {"mitigation", "attack", "utility"} if rows_only else {"mitigation"}
    if {k: v for k, v in theirs.items() if k not in free} != {
        k: v for k, v in run.config.items() if k not in free
    }:
        return 0
    kinds = (
        (("results", ("item.none.",)), ("artifacts", ("gen.none.",)))
        if rows_only
        else (("results", _UNMITIGATED_RESULTS), ("artifacts", _UNMITIGATED_ARTIFACTS))
    )
    copied = 0
    for kind, prefixes in kinds:
        for f in sorted((src / kind).glob("*")):
            dest = run.path / kind / f.name
            if not f.name.startswith(prefixes) or dest.exists() or f.name.endswith((".tmp", ".corrupt")):
                continue
            tmp = dest.with_name(f".{dest.name}.copy")
            shutil.copyfile(f, tmp)
            tmp.replace(dest)
            copied += 1
    return copied


def utility_set(
    name: str,
    model: T2IModel,
    limit: int | None = None,
    skip: int = 0,
    reference_images: str | Path | None = None,
) -> Utility:
    """The FID/KID prompts of set ``name`` (``skip``/``limit`` a window) and their reference images: the
    set's own images, or the images in the folder ``reference_images``."""
    items = window(load_set(name, model), skip, limit)
    if reference_images:
        folder = Path(reference_images)
        if not folder.is_dir():
            raise DoriError(f"reference images folder {folder} does not exist")
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in EXTENSIONS)
        if len(files) < 2:
            raise DoriError(f"reference images folder {folder} holds fewer than two images")

        def reference():
            return [load_image_file(f) for f in files]
    else:

        def reference():
            images = [it.image for it in items if it.image is not None]
            if len(images) < 2:
                raise DoriError(
                    f"utility set {name!r} has no reference images: give a reference images folder"
                )
            return images

    return Utility(name, [it.prompt for it in items], reference)


def audit_to_folder(
    out: str | Path,
    model: T2IModel,
    items: Sequence[Item],
    set_name: str,
    backends: Backends,
    config: EvalConfig,
    mitigation: Mitigation | None = None,
    attack: Attack | None = None,
    snapshots: Sequence[int] = (1, 10, 25),
    utility: Utility | None = None,
    init_prompts: Sequence[str] | None = None,
    settings: dict | None = None,
    model_label: str | None = None,
    progress: bool = True,
    report: bool = True,
    paraphrases: dict[str, list[str]] | None = None,
    control: Sequence[Item] | None = None,
    control_name: str | None = None,
    control_level: float = DEFAULT_LEVEL,
    detection: str | Path | None = None,
    startup_s: float | None = None,
    compile_s: float | None = None,
    share_from: str | Path | None = None,
    share_rows_only: bool = False,
) -> dict:
    """Run (or resume) an audit into ``out``; returns the ``audit.json`` content.

    Args:
        settings: the settings recorded in ``out/config.json`` (a rerun with other settings is refused);
            default: the attack's and mitigation's settings and the protocol.
        model_label: the model's name in the JSON (default ``model.name``).
        report: also write ``out/report.html``.
        paraphrases: item id -> paraphrases of its prompt: adds Table 12's concept utility (see ``run_audit``).
        control / control_name: items the model did not memorize (a world's ``heldout``). The same audit
            (attack, mitigation, snapshots, seeds) runs on them into ``out/control``; ``audit.json["control"]``
            holds their rows and :func:`dori.control.control_report`: the control's replication rate beside
            the MR per step budget, and the largest budget whose control rate stays <= ``control_level``.
        detection: a ``dori detect`` run directory whose scores the report joins (same model only).
        startup_s / compile_s: seconds spent before the audit (loading, probes) and compiling, for the timing.
        share_from: a finished audit folder of the same model, items and protocol under another mitigation:
            its unmitigated rows and utility are reused, not generated again (:func:`share_unmitigated`);
            with ``share_rows_only`` only the unmitigated rows, from an audit that may differ in attack and utility.
    """
    from dori.mitigations.base import spec

    label = model_label or model.name
    if settings is None:
        settings = {
            "model": label,
            "set": set_name,
            "n_items": len(items),
            "mitigation": spec(mitigation),
            "attack": None if attack is None else {"name": attack.name, **attack.settings()},
            "snapshots": list(snapshots),
            "protocol": config.describe(),
            "utility": None if utility is None else {"name": utility.name, "n": len(utility.prompts)},
        }
    with distributed.main_first():  # under torchrun: rank 0 creates the run directory, the others join it
        run = RunDir(
            out,
            settings,
            extra_provenance={
                "command": "audit",
                "model": model.name,
                "model_info": model.info,
                "world": None if model.world is None else str(model.world.folder),
                "device": str(model.device),
                "dtype": str(model.dtype),
                "seed": config.seed,
                "backends": backends.describe(),
                "protocol": config.describe(),
            },
        )
        if share_from is not None and distributed.is_main():
            share_unmitigated(share_from, run, rows_only=share_rows_only)
    result = run_audit(
        model, items, set_name, backends, run, config, mitigation=mitigation, attack=attack,
        init_prompts=init_prompts, snapshots=snapshots, utility=utility, progress=progress,
        paraphrases=paraphrases,
    )  # fmt: skip
    timing = audit_timing(result.pop("timing"), startup_s, compile_s, model.device)
    data = {"model": label, "set": set_name, **result, "timing": timing, "provenance": run.provenance}
    if control is not None:
        control_settings = None
        if settings is not None:
            control_settings = {**settings, "role": "control", "control_items": [it.id for it in control]}
        ctl = audit_to_folder(
            Path(out) / "control", model, control, control_name or "control", backends, config,
            mitigation=mitigation, attack=attack, snapshots=snapshots, settings=control_settings,
            model_label=model_label, progress=progress, report=False,
        )  # fmt: skip
        data["control"] = {
            "set": control_name or "control",
            "n_items": len(control) - len(ctl["skipped"]),
            "rows": ctl["rows"],
            "skipped": ctl["skipped"],
            **control_report(result["rows"], ctl["rows"], control_level),
        }
    if detection is not None:
        data["detection"] = str(detection)
    if not distributed.is_main():  # the ranks of a torchrun job share one run: rank 0 writes its outputs
        return data
    atomic_write_text(run.path / "audit.json", json.dumps(data, indent=2, default=str))
    if report:
        from dori.report.html import build_report

        build_report(run.path)
    return data


@dataclass
class AuditJob:
    """An audit described by plain settings (what the experiments write down); :func:`run_audit_job` runs it.

    The mitigation and the attack are objects (``load_mitigation("nemo:DIR")``, ``Dori(steps=50)``); the rest
    names a model, a window of a set, the protocol and an optional utility set for FID/KID.
    """

    model: str = "miniworld"
    set: str = "vm"
    limit: int | None = None
    skip: int = 0
    mitigation: Mitigation | None = None
    attack: Attack | None = None
    snapshots: tuple[int, ...] = ()
    n_gens: int = 10
    sample_steps: int = 50
    guidance: float = 7.0
    batch_size: int = 64
    seed: int = 0
    utility_set: str | None = None
    n_utility: int | None = None
    utility_skip: int = 0
    device: str | None = None
    dtype: str = "fp32"
    progress: bool = True
    share_from: str | None = None  # see audit_to_folder
    share_rows_only: bool = False


def run_audit_job(out: str | Path, job: AuditJob) -> dict:
    """Open the model and the sets of ``job`` and audit into ``out`` (resumable); returns ``audit.json``."""
    from dori.metrics.backends import load_backends
    from dori.models.devices import open_model
    from dori.models.pipeline import SamplingConfig

    model = open_model(job.model, job.device, job.dtype)
    items = window(load_set(job.set, model), job.skip, job.limit)
    config = EvalConfig(
        n_gens=job.n_gens,
        sampling=SamplingConfig(steps=job.sample_steps, guidance=job.guidance, batch_size=job.batch_size),
        seed=job.seed,
    )
    utility = None
    if job.utility_set is not None:
        utility = utility_set(job.utility_set, model, job.n_utility, job.utility_skip)
    return audit_to_folder(
        out, model, items, job.set, load_backends(model), config, mitigation=job.mitigation, attack=job.attack,
        snapshots=job.snapshots, utility=utility, model_label=job.model, progress=job.progress,
        share_from=job.share_from, share_rows_only=job.share_rows_only,
    )  # fmt: skip


def audit_timing(phases: dict, startup_s: float | None, compile_s: float | None, device) -> dict:
    """Wall times of this invocation (resumed work not counted): start-up (model, probes, compiling), each
    phase of the audit, seconds per item of the new work, and rank 0's peak GPU memory."""
    import torch

    work = sum(p["seconds"] for p in phases["phases"])
    done = phases["items_done"]
    out = {
        **phases,
        "startup_s": startup_s,
        "compile_s": compile_s,
        "work_s": work,
        "s_per_item": work / done if done else None,
        "world_size": distributed.current().world_size,
        "device": str(device),
    }
    if getattr(device, "type", None) == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 1024**3
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
