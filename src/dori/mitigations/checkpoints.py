"""Per-epoch checkpoints, resume and the loss log of a fine-tuning run (used by adversarial fine-tuning).

Layout of a run folder ``out``::

    finetune_config.json          what binds the run: method settings (except ``epochs``) and data ids
    provenance.json               git hash, versions, start time
    losses.jsonl                  one JSON record per update step / epoch
    checkpoints/epoch-NNNN/       the model after epoch NNNN, a diffusers folder (safetensors) that loads
                                  with ``--model``; the newest one also holds train_state.pt (epoch,
                                  optimizer, random generator) and, for LoRA, lora.safetensors

``train_state.pt`` is written last and atomically, so a checkpoint without it is incomplete and ignored; it
holds only tensors and plain containers and is read with ``torch.load(weights_only=True)``. Only the newest
optimizer state is kept (it is as large as the model twice over); every epoch's model stays, since the
paper evaluates models after 1 to 50 epochs (Tables 14-16).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.mitigations import lora as lora_mod
from dori.mitigations.training import finish, save_finetuned, trainable_copy
from dori.models.identity import check_not_source
from dori.models.pipeline import T2IModel
from dori.runs import atomic_write_text
from dori.safeload import load_state

STATE = "train_state.pt"
CONFIG = "finetune_config.json"
_LOCKS: dict = {}  # fine-tuning folders this process writes (dori.runlock), held for the process's life


def check_output(out: Path, sources: Sequence[str | Path] = ()) -> None:
    """Refuse an output folder that would overwrite an input model or something this run did not write.

    Args:
        out: the folder a fine-tuned model (and its checkpoints) will be written to.
        sources: folders of the input models (:func:`dori.models.identity.model_sources`).

    Raises:
        DoriError: ``out`` is an input model's folder or inside one, is a file, or holds a model or run that
            no fine-tuning run recorded (no ``finetune_config.json``).
    """
    out = Path(out)
    check_not_source(out, sources)
    if out.exists() and not out.is_dir():
        raise DoriError(f"--out {out} is a file, not a folder")
    if (out / CONFIG).exists():
        return  # a fine-tuning run's folder: check_config compares its settings
    for marker, what in (("model_index.json", "a model"), ("finetune.json", "a fine-tuned model"),
                         ("config.json", "a dori run folder")):  # fmt: skip
        if (out / marker).exists():
            raise DoriError(
                f"--out {out} already holds {what} ({marker}) that no fine-tuning run of these settings wrote; "
                "dori does not overwrite it: use a new --out or delete it"
            )


def check_config(out: Path, binding: dict, sources: Sequence[str | Path] = ()) -> None:
    """Write ``finetune_config.json`` (and provenance) on the first call; refuse a different one later.

    Also refuses an ``out`` that is an input model's folder or holds another model (:func:`check_output`).
    """
    from dori.runlock import RunLock

    out = Path(out)
    check_output(out, sources)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DoriError(f"cannot use --out {out}: {err.strerror or err}") from err
    _LOCKS.setdefault(str(out.resolve()), RunLock(out))  # one writing process per folder, held until exit
    cfg_file = out / CONFIG
    binding = json.loads(json.dumps(binding, default=str))
    if cfg_file.exists():
        try:
            old = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise DoriError(f"{cfg_file} is corrupt ({err}); delete {out} to start over") from err
        if old != binding:
            changed = sorted(k for k in set(old) | set(binding) if old.get(k) != binding.get(k))
            raise DoriError(
                f"{out} holds a fine-tuning run with other settings or data ({', '.join(changed)}); "
                "use a new --out or delete it"
            )
        return
    from dori.runs import provenance

    atomic_write_text(cfg_file, json.dumps(binding, indent=2))
    atomic_write_text(out / "provenance.json", json.dumps(provenance(), indent=2))


def claim_output(out: str | Path, model: T2IModel, method: str, settings: dict, items: Sequence[str]) -> None:
    """:func:`check_config` for a method without checkpoints: binds ``out`` to the method, its settings, the
    items and the input model's weights, so a rerun of the same settings may write again and nothing else may."""
    from dori.models.identity import model_sources, weights_fingerprint

    binding = {
        "method": method,
        "settings": settings,
        "items": list(items),
        "model": weights_fingerprint(model),
    }
    check_config(Path(out), binding, model_sources(model))


def save_checkpoint(
    out: Path,
    model: T2IModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    record: dict,
    extra: dict | None = None,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` for a model in training (LoRA adapters are merged into a copy).

    ``extra``: further training state (tensors or plain values) kept in ``train_state.pt``; read back by
    :func:`resume_extra`.
    """
    folder = out / "checkpoints" / f"epoch-{epoch:04d}"
    if folder.exists():
        shutil.rmtree(folder)
    method = dict(record, epochs_done=epoch)
    adapters = lora_mod.lora_state_dict(model.unet)
    if adapters:
        from safetensors.torch import save_file

        merged = trainable_copy(model)
        lora_mod.merge_lora(merged.unet)
        save_finetuned(finish(merged), folder, method, link_world=True)
        save_file(adapters, str(folder / "lora.safetensors"))
    else:
        save_finetuned(model, folder, method, link_world=True)
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "rng": generator.get_state()}
    if extra:
        state["extra"] = extra
    tmp = folder / f".{STATE}.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / STATE)
    for old in (out / "checkpoints").glob(f"epoch-*/{STATE}"):
        if old.parent != folder:
            old.unlink()
    return folder


def resume(out: Path, model: T2IModel, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Load the newest complete checkpoint into model/optimizer/generator; return the first epoch to run.

    The model must be set up as when the checkpoint was written (same LoRA adapters, if any).
    """
    states = sorted((out / "checkpoints").glob(f"epoch-*/{STATE}"))
    if not states:
        return 1
    folder = states[-1].parent
    state = load_state(states[-1])
    if lora_mod.lora_modules(model.unet):
        from safetensors.torch import load_file

        lora_mod.load_lora_state_dict(model.unet, load_file(str(folder / "lora.safetensors")))
    else:
        from diffusers import UNet2DConditionModel

        saved = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        model.unet.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"])
    return int(state["epoch"]) + 1


def resume_extra(out: Path) -> dict:
    """The ``extra`` state of the newest complete checkpoint ({} when there is none)."""
    states = sorted((out / "checkpoints").glob(f"epoch-*/{STATE}"))
    return dict(load_state(states[-1]).get("extra") or {}) if states else {}


class LossLog:
    """Appends records to ``out/losses.jsonl`` and passes them to ``sink``.

    Opening it for a run that resumes at epoch ``start`` drops the records of epochs >= ``start`` (what a
    killed run wrote of its unfinished epoch).
    """

    def __init__(self, out: Path | None, start: int, sink: Callable[[dict], None] | None = None):
        self.path = None if out is None else out / "losses.jsonl"
        self.sink = sink
        if self.path is not None and self.path.exists():
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) < start
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def __call__(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink(record)
