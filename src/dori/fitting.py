"""Fitting the inference-time mitigations into resumable folders: NeMo, iterative NeMo, Wanda.

Each function takes a loaded model, the items and a configured method object, writes a run directory
(config, provenance, one result per finished item or group) that also holds the fitted mitigation
(``nemo.json`` or ``wanda.json`` + ``masks/``), and returns the fitted object. Calling it again on the same
folder skips finished work, so a killed fit resumes. ``dori mitigate nemo|wanda`` and the recipes call these;
``load_mitigation("nemo:DIR")`` loads the result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from dori import distributed
from dori.data.sets import Item, load_set
from dori.errors import DoriError
from dori.mitigations.nemo import NeMo, NeMoItem, NeMoResult
from dori.mitigations.nemo_calibration import Calibration, default_calibration_prompts, laion_holdout_prompts
from dori.mitigations.nemo_iterative import NeMoRound, iterative_nemo, make_dori_search
from dori.mitigations.nemo_result import neuron_count
from dori.mitigations.wanda import Wanda, WandaResult, make_groups, write_group_masks, write_index
from dori.models.pipeline import T2IModel
from dori.runs import RunDir, atomic_save_tensors, load_tensors

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)


def calibration_prompts(name: str, model: T2IModel) -> list[str]:
    """The prompts of a calibration set: ``laion-holdout-500`` or any set :func:`load_set` knows."""
    if name == "laion-holdout-500":
        return list(laion_holdout_prompts())
    return [it.prompt for it in load_set(name, model=model)]


def nemo_calibration(
    nemo: NeMo, model: T2IModel, run: RunDir, calibration_set: str | None = None, log: Log = _stderr
) -> Calibration:
    """Load ``run/calibration.safetensors`` or compute and save it (held-out prompts: ``calibration_set``,
    default the model's own held-out set)."""
    calib_file = run.path / "calibration.safetensors"
    if calib_file.exists():
        calib = Calibration.load(calib_file)
    else:
        if calibration_set is None:
            name, prompts = default_calibration_prompts(model)
        else:
            name, prompts = calibration_set, calibration_prompts(calibration_set, model)
        log(f"NeMo calibration for {model.name} (held-out prompts: {name})")
        calib = nemo.calibrate(model, prompts, prompt_set=name)
        calib.save(calib_file)
    source = calib.info.get("source", "computed")
    count = f", {calib.info['prompts']} prompts" if "prompts" in calib.info else ""
    log(f"tau_mem = {nemo.threshold(calib):.4f} ({source}{count})")
    return calib


def _nemo_run(nemo: NeMo, out: str | Path, run_config: dict | None, calibration_set, extra: dict) -> RunDir:
    settings = {k: v for k, v in nemo.settings().items() if k not in ("batch_size", "cache_dir")}
    return RunDir(out, {**(run_config or {}), **settings, "calibration_set": calibration_set, **extra})


def fit_nemo(
    model: T2IModel,
    items: Sequence[Item],
    out: str | Path,
    nemo: NeMo,
    calibration_set: str | None = None,
    chunk: int = 8,
    run_config: dict | None = None,
    progress: bool = True,
    log: Log = _stderr,
) -> NeMoResult:
    """NeMo per item into ``out`` (resumable; ``chunk`` items are searched together, then saved).

    Args:
        run_config: extra settings recorded in ``out/config.json`` (a rerun with other settings is refused).
    """
    if not items:
        raise DoriError("NeMo needs at least one item")
    with distributed.main_first():  # under torchrun: rank 0 creates the run and calibrates, the others load
        run = _nemo_run(nemo, out, run_config, calibration_set, {})
        calib = nemo_calibration(nemo, model, run, calibration_set, log)
    settings = {k: v for k, v in nemo.settings().items() if k not in ("batch_size", "cache_dir")}
    todo = [it for it in items if not run.has(f"item.{it.id}")]
    bar = _bar(len(items), "nemo", progress)
    bar.update(len(items) - len(todo))
    todo = distributed.my_share(todo)  # this rank's items (all of them in one process)
    step = max(1, chunk)
    for lo in range(0, len(todo), step):
        part = todo[lo : lo + step]
        found = nemo.detect(
            model, model.encode_text([it.prompt for it in part]), calib, [it.id for it in part]
        )
        for it in found:
            run.put(f"item.{it.id}", asdict(it))
        bar.update(len(part))
    bar.close()
    distributed.sync()
    result = NeMoResult(
        {it.id: NeMoItem(**run.get(f"item.{it.id}")) for it in items},
        [*calib.means],
        config=settings,
        calibration=dict(calib.info, tau=nemo.threshold(calib)),
        provenance=run.provenance,
    )
    if distributed.is_main():  # the ranks of a torchrun job share one folder: rank 0 writes it
        result.save(run.path)
    return result


def fit_nemo_iterative(
    model: T2IModel,
    items: Sequence[Item],
    out: str | Path,
    nemo: NeMo,
    rounds: int,
    dori_steps: int = 50,
    calibration_set: str | None = None,
    run_config: dict | None = None,
    progress: bool = True,
    log: Log = _stderr,
) -> list[NeMoRound]:
    """Iterative NeMo (Finding Dori, Appendix H.6) into ``out``: ``round-1`` .. ``round-R`` (each loadable as
    ``nemo:OUT/round-r``) and the last round as ``out`` itself; finished rounds are reused when resumed."""
    from dori.attacks.dori import Dori
    from dori.data.images import resize_to
    from dori.evaluation import dori_seed

    if rounds < 1 or dori_steps < 1:
        raise DoriError("iterative NeMo needs rounds >= 1 and dori_steps >= 1")
    missing = [it.id for it in items if it.image is None]
    if missing:
        raise DoriError(
            f"iterative NeMo searches Dori embeddings for the training images; {len(missing)} item(s) have "
            f"none ({', '.join(missing[:5])}): give the set's images or drop those items"
        )
    extra = {"iterative": True, "dori_steps": dori_steps}
    with distributed.main_first():
        run = _nemo_run(nemo, out, run_config, calibration_set, extra)
        calib = nemo_calibration(nemo, model, run, calibration_set, log)
    ids = [it.id for it in items]
    done = []
    for r in range(1, rounds + 1):
        folder = run.path / f"round-{r}"
        if not (folder / "nemo.json").exists() or not (folder / "embeddings.safetensors").exists():
            break
        done.append(NeMoRound(NeMoResult.load(folder), load_tensors(folder / "embeddings.safetensors")["y"]))
    if done:
        log(f"iterative NeMo: resuming after round {len(done)}")
    images = torch.stack([resize_to(it.image, model.image_size) for it in items])
    x0 = model.encode_images(images)
    prompts = model.encode_text([it.prompt for it in items])
    seeds = [dori_seed(0, i) for i in range(len(items))]
    search = make_dori_search(Dori(steps=dori_steps), model, x0, prompts, seeds)

    def save(rnd: NeMoRound) -> None:
        if not distributed.is_main():  # every rank holds the round (gathered); rank 0 writes it
            return
        r = rnd.result.config["round"]
        folder = run.path / f"round-{r}"
        folder.mkdir(exist_ok=True)
        atomic_save_tensors(folder / "embeddings.safetensors", {"y": rnd.embeddings})
        rnd.result.provenance = run.provenance
        rnd.result.save(folder)
        n_mem = sum(v.memorized for v in rnd.result.items.values())
        log(f"round {r}: {n_mem}/{len(ids)} items flagged, {neuron_count(rnd.result)} neurons in all")

    bar = _bar(rounds, "iterative nemo", progress)
    bar.update(len(done))
    out_rounds = iterative_nemo(
        nemo, model, ids, prompts, search, rounds=rounds, calibration=calib,
        progress=lambda r: bar.update(r - bar.n), done=done, on_round=save,
    )  # fmt: skip
    bar.close()
    final = out_rounds[-1].result
    final.provenance = run.provenance
    if distributed.is_main():
        final.save(run.path)
    return out_rounds


def fit_wanda(
    model: T2IModel,
    items: Sequence[Item],
    out: str | Path,
    wanda: Wanda,
    group: str | int = "all",
    run_config: dict | None = None,
    progress: bool = True,
) -> WandaResult:
    """Wanda masks per group of items into ``out`` (resumable, one saved mask file per finished group).

    Args:
        group: ``all`` (one mask), ``prompt`` (one per item) or N (consecutive groups of N items).
    """
    if not items:
        raise DoriError("Wanda needs at least one item")
    settings = {k: v for k, v in wanda.settings().items() if k != "batch_size"}
    with distributed.main_first():
        run = RunDir(out, {**(run_config or {}), **settings, "group": group})
    groups = make_groups([it.id for it in items], group)
    prompts = {it.id: it.prompt for it in items}
    todo = [(n, g) for n, g in enumerate(groups) if not run.has(f"group.{n:05d}")]
    bar = _bar(len(groups), "wanda", progress)
    bar.update(len(groups) - len(todo))
    todo = distributed.my_share(todo)  # this rank's groups (all of them in one process)
    null = wanda.null_norms(model) if todo else None
    while todo:  # sample the members of several small groups together, then save group by group
        batch, size = [], 0
        while todo and (not batch or size + len(groups[todo[0][1]]) <= wanda.batch_size):
            batch.append(todo.pop(0))
            size += len(groups[batch[-1][1]])
        members = [m for _, gid in batch for m in groups[gid]]
        sq = wanda.squared_norms(model, model.encode_text([prompts[m] for m in members]))
        lo = 0
        for n, gid in batch:
            k = len(groups[gid])
            summed = {name: v[:, lo : lo + k].sum(1) for name, v in sq.items()}
            masks = wanda.masks_from_norms(model, summed, null, k)
            run.put(f"group.{n:05d}", {"group": gid, **write_group_masks(run.path, n, masks)})
            lo += k
            bar.update(1)
        del sq
    bar.close()
    distributed.sync()
    if distributed.is_main():
        entries = {gid: run.get(f"group.{n:05d}") for n, gid in enumerate(groups)}
        write_index(run.path, groups, entries, {**settings, "group": str(group)}, run.provenance)
    distributed.sync()  # the other ranks read the index rank 0 wrote
    return WandaResult.load(run.path)
