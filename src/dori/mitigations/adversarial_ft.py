"""Adversarial fine-tuning: remove memorized images for good (Finding Dori, Section 4.4, Algorithm 2, App. I).

Given memorized items (x_mem, p_mem), surrogate images x_surr per item (:mod:`dori.mitigations.surrogates`:
generations under a pruning mitigation that are not replicas) and non-memorized image-caption pairs::

    for epoch in 1..E:
        y_adv[i] <- Dori(x_mem[i], init)  for every item i, against the current model, in one batched search
                    init = p_mem's embedding on odd epochs, N(0, I) on even epochs      (Algorithm 2)
        for each item i (shuffled):
            repeat S times:                                      (S = 3, the paper's default, App. I.4)
                x_surr ~ surrogates of i;  (x, p) ~ non-memorized pairs
                L = ||eps - f(x_surr_t, t, y_adv[i])||^2 + ||eps' - f(x_t', t', enc(p))||^2
                    (both halves in one concatenated forward pass, App. I.1)
                AdamW step on the whole UNet (text encoder frozen), gradients clipped

The Dori searches of an epoch run together at the start of the epoch (one batched call, against the model
as it is then); Algorithm 2 searches item i after the updates for items < i of the same epoch. With
``items_per_step=1`` and ``embeddings_per_item=1`` every update is Algorithm 2's.

Options cover Appendix I: the ablations of Table 16 (``steps_per_embedding=1``, ``utility_loss=False``,
``mitigation_loss=False``), the Dori steps and init variants of Tables 14-15 (``dori_steps``,
``init_schedule``), and LoRA adapters instead of full fine-tuning (``lora_rank``, ``lora_convs``; App. I.5).

The learning rate, batch sizes and number of adversarial embeddings per image are not published. The
defaults here are chosen by experiment on the miniworld; ``docs/adversarial_ft.md`` records the world-v1 sweep
(noise draws, utility batch and weight) and ``docs/results/adversarial_ft.md`` the 40-item runs behind the rest.
Deviations from Algorithm 2 by default, each measured there: 12 epochs (paper 5); L_adv only at timesteps
t >= 250 (``adv_min_timestep``; Algorithm 2 draws t from all of [0, T)); the utility loss distils the
unmitigated model's predictions (``utility_target``) instead of L_DM's noise target; 4 searches per item and epoch,
two fresh (prompt and random init) and two ``persistent`` ones that continue the previous epoch's search (the
paper: one fresh search, the init alternating); caption dropout in the utility loss (``uncond_share``).

With ``out``, every finished epoch is written to ``out/checkpoints/epoch-NNNN/`` as a diffusers folder
(safetensors) plus ``train_state.pt`` (epoch, optimizer, random generator; the LoRA adapters in
``lora.safetensors``), losses go to ``out/losses.jsonl``, and the final model to ``out`` itself. Calling
again with the same settings resumes after the last finished epoch and gives the same model as a run that
was never interrupted; a larger ``epochs`` continues a finished run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dori.attacks.dori import Dori, initial_embeddings
from dori.data.sets import Item
from dori.errors import DoriError
from dori.metrics.replication import replication_rate
from dori.mitigations import lora as lora_mod
from dori.mitigations.checkpoints import LossLog, check_config, resume, resume_extra, save_checkpoint
from dori.mitigations.surrogates import Similarity, SurrogateSet
from dori.mitigations.training import encode_in_batches, finish, item_images, save_finetuned, trainable_copy
from dori.models.identity import model_sources, weights_fingerprint
from dori.models.pipeline import SamplingConfig, T2IModel

INIT_SCHEDULES = ("alternate", "prompt", "random", "both")
LR_SCHEDULES = ("constant", "cosine")
UTILITY_TARGETS = ("data", "teacher", "guided")


@dataclass
class AdversarialFineTuning:
    """Algorithm 2 (see module docstring).

    Args:
        epochs: E, passes over the memorized items (paper: 5).
        steps_per_embedding: S, update steps per adversarial embedding (paper default 3; Table 16 "One Step": 1).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm (None: no clipping).
        items_per_step: memorized items in one update (1 = Algorithm 2).
        embeddings_per_item: adversarial embeddings searched per item and epoch; each pairs with its own
            surrogate draw in every update of that item.
        noise_draws: (surrogate, noise, t) draws per adversarial embedding in each update (1 = Algorithm 2
            read literally; the default 8 lowers the variance of L_adv's gradient, docs/adversarial_ft.md).
        utility_batch: non-memorized pairs per update (None: as many as adversarial samples, App. I.1; the
            default 64 keeps utility on the miniworld, docs/adversarial_ft.md).
        dori_steps: Dori steps per search (paper 50; Tables 14-15: 25, 50, 100; 0 = the init itself).
        dori_lr: Dori's Adam learning rate (paper 0.1).
        dori_batch: Dori's (noise, t) draws per step (paper 8).
        init_schedule: ``alternate`` (prompt init on odd epochs, random on even: Algorithm 2), ``prompt``
            (Table 14), ``random`` (Table 15) or ``both`` (every epoch, each item's embeddings alternate between
            the two inits: with ``embeddings_per_item=2`` one from the prompt and one from N(0, I)).
        persistent: of the ``embeddings_per_item`` embeddings of an item, the last ``persistent`` do not start
            afresh each epoch: from epoch 2 on their search continues from where the previous epoch's ended
            (persistent adversarial examples, as in "free" adversarial training), so the model also trains
            against searches of epochs x ``dori_steps`` steps at no extra search cost. 0: every search starts
            from its init (Algorithm 2). The fresh ones keep training against the attack as audited.
        uncond_share: share of the utility pairs whose caption is replaced by the empty prompt (caption
            dropout, as SD and the miniworld were trained): keeps the unconditional branch of classifier-free
            guidance, which every generation uses, where it was. 0: Algorithm 2's utility loss.
        utility_loss: include L_DM on non-memorized pairs (Table 16 "No Utility Loss": False).
        utility_weight: lambda in L_adv + lambda * L_DM (Algorithm 2 sums them: 1; the default 10 keeps
            utility on all 40 miniworld items, docs/adversarial_ft.md).
        utility_target: what the utility loss compares the prediction with: ``data`` (the drawn noise, L_DM of
            Algorithm 2), ``guided`` (see ``utility_guidance``) or ``teacher`` (the unmitigated model's prediction
            for the same x_t, t and caption:
            distillation, which keeps the model's outputs on non-memorized data, and so its sample distribution,
            where they were; a deviation from Algorithm 2, the default: on all 40 miniworld items after 10 epochs,
            training seeds 0 and 1, FID 4.1 / 4.8 against 4.9 / 5.7 with ``data`` and Dori 50 MR at most 0.1
            from both inits against up to 0.175; docs/results/adversarial_ft.md).
        utility_guidance: with ``utility_target="guided"``, the student and the unmitigated model both predict
            each utility pair twice, with its caption (c) and the empty prompt (u), and the loss is the teacher
            target's plus a guided term, ``|d_c|^2 + |d_g / w|^2``, with d the prediction differences and
            ``d_g = d_u + w (d_c - d_u)`` the difference of the classifier-free-guided predictions at this
            guidance w (the protocol's 7). Generation uses the guided prediction, which amplifies differences
            between d_c and d_u w-fold; the teacher target weighs that direction no more than any other.
            Measured (all 40 miniworld vm items, seed 0, 10 epochs): 22-30% less guided drift than the teacher
            target but FID 4.15 (teacher 3.89-4.88) and Dori 50 MR 0.10 / 0.125 from the prompt / random init
            (teacher 0.025-0.075 / 0.05-0.10): an option, not the default (docs/results/adversarial_ft.md).
        adv_min_timestep: L_adv's timesteps are drawn from [adv_min_timestep, T) instead of [0, T) (0: Algorithm
            2). Replication is decided in the first, noisiest steps of generation (the early overestimation of
            "How Diffusion Models Memorize"); at small t the prediction denoises details that every image shares,
            and training it there on a few surrogate images per item moves the textures of every generation
            (FID) without steering trajectories away from the memorized image. Measured on all 40 miniworld vm
            items (seed 0, teacher target; unmitigated FID 3.08): 250 and 12 epochs (the defaults) FID 2.98 and
            Dori 50 MR 0.025 from both inits; 250 and 10 epochs 2.94, 0.10 / 0.15; 150 and 10 epochs 3.16,
            0.075 / 0.125; 0 (every t) and 10 epochs 3.9-4.9, 0.025-0.075 / 0.05-0.10 (four runs)
            (docs/results/adversarial_ft.md).
        mitigation_loss: include L_adv on surrogates (Table 16 "No Mitigation Loss": False; no Dori runs).
        lora_rank: train LoRA adapters of this rank instead of the whole UNet (App. I.5: 128); None = full.
        lora_convs: with ``lora_rank``, also adapt convolutions (App. I.5 variant 2).
        stop_mr: stop early once the epoch's own Dori embeddings replicate at most this share of the items
            (checked from epoch 2 on, after the epoch's search and before its updates, with
            ``stop_generations`` images per item; the model kept is the one after the previous epoch). None:
            always run ``epochs`` epochs (Algorithm 2).
        stop_generations: generations per item for that check (seeds 0..n-1).
        ema: decay of an exponential moving average of the trained weights, updated after every step; the
            model returned (and saved in ``out``) is the average. None: the weights of the last step.
            Checkpoints hold the training weights, the average travels in their state.
        lr_schedule: ``constant`` (Algorithm 2) or ``cosine`` (epoch e of E trains at
            lr * (1 + cos(pi (e - 1) / E)) / 2, so the last epochs move the weights least).
        seed: seeds every random draw of the run (item order, surrogate and utility draws, noise, t, Dori).
        autocast_dtype: optional autocast dtype for forward passes (torch.bfloat16 on GPU).
        max_micro_batch: Dori's micro-batch bound (memory).
    """

    name: ClassVar[str] = "advft"

    epochs: int = 12
    steps_per_embedding: int = 3
    lr: float = 8e-5
    weight_decay: float = 1e-2
    grad_clip: float | None = 1.0
    items_per_step: int = 1
    embeddings_per_item: int = 4
    noise_draws: int = 8
    utility_batch: int | None = 64
    dori_steps: int = 50
    dori_lr: float = 0.1
    dori_batch: int = 8
    init_schedule: str = "both"
    persistent: int = 2
    uncond_share: float = 0.1
    utility_loss: bool = True
    utility_weight: float = 10.0
    utility_target: str = "teacher"
    utility_guidance: float = 7.0
    adv_min_timestep: int = 250
    mitigation_loss: bool = True
    lora_rank: int | None = None
    lora_convs: bool = False
    stop_mr: float | None = None
    stop_generations: int = 4
    ema: float | None = None
    lr_schedule: str = "constant"
    seed: int = 0
    autocast_dtype: torch.dtype | None = None
    max_micro_batch: int = 256

    def __post_init__(self) -> None:
        if self.init_schedule not in INIT_SCHEDULES:
            raise DoriError(f"init_schedule must be one of {INIT_SCHEDULES}, got {self.init_schedule!r}")
        if not (self.utility_loss or self.mitigation_loss):
            raise DoriError("at least one of utility_loss and mitigation_loss must be on")
        if (
            min(
                self.epochs,
                self.steps_per_embedding,
                self.items_per_step,
                self.embeddings_per_item,
                self.noise_draws,
            )
            < 1
        ):
            raise DoriError(
                "epochs, steps_per_embedding, items_per_step, embeddings_per_item and noise_draws must be >= 1"
            )
        if self.init_schedule == "both" and self.embeddings_per_item < 2:
            raise DoriError("init_schedule 'both' needs embeddings_per_item >= 2 (one per init)")
        fresh = self.embeddings_per_item - self.persistent
        if self.persistent < 0 or fresh < (2 if self.init_schedule == "both" else 1):
            raise DoriError(
                f"persistent must leave fresh searches: {self.embeddings_per_item} embeddings per item, "
                f"{self.persistent} persistent (init_schedule {self.init_schedule!r} needs "
                f"{2 if self.init_schedule == 'both' else 1} fresh)"
            )
        if not 0.0 <= self.uncond_share < 1.0:
            raise DoriError(f"uncond_share must be in [0, 1), got {self.uncond_share}")
        if self.dori_steps < 0:
            raise DoriError("dori_steps must be >= 0")
        if self.stop_mr is not None and not (0 <= self.stop_mr < 1 and self.stop_generations >= 1):
            raise DoriError("stop_mr must be in [0, 1) and stop_generations >= 1")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise DoriError(f"ema must be in (0, 1), got {self.ema}")
        if self.utility_target not in UTILITY_TARGETS:
            raise DoriError(f"utility_target must be one of {UTILITY_TARGETS}, got {self.utility_target!r}")
        if not self.utility_guidance >= 1.0:
            raise DoriError(f"utility_guidance must be >= 1, got {self.utility_guidance}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DoriError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.adv_min_timestep < 0:
            raise DoriError(f"adv_min_timestep must be >= 0, got {self.adv_min_timestep}")
        if not self.utility_weight > 0:
            raise DoriError(f"utility_weight must be > 0, got {self.utility_weight}")

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["autocast_dtype"] = str(self.autocast_dtype) if self.autocast_dtype else None
        return d

    def lr_for_epoch(self, epoch: int) -> float:
        """The learning rate of a 1-based epoch under ``lr_schedule``."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        return self.lr

    def init_for_epoch(self, epoch: int) -> str:
        """``prompt`` or ``random`` for a 1-based epoch (Algorithm 2: odd epochs start from the prompt);
        ``both`` for the schedule that uses both inits every epoch."""
        if self.init_schedule == "alternate":
            return "prompt" if epoch % 2 == 1 else "random"
        return self.init_schedule

    # ------------------------------------------------------------------ run
    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        out: str | Path | None = None,
        *,
        surrogates: SurrogateSet | None = None,
        utility: Sequence[Item] = (),
        log: Callable[[dict], None] | None = None,
        similarity: Similarity | None = None,
        threshold: float | None = None,
        sampling: SamplingConfig | None = None,
    ) -> T2IModel:
        """Fine-tune a copy of ``model`` so that Dori can no longer bring the items back.

        Args:
            model: the memorizing model (not changed).
            items: memorized items with training images; items without an image or surrogates are skipped
                (listed in ``out/finetune.json`` and in the first log record).
            out: run folder for checkpoints, the loss log and the final model (None: keep nothing on disk).
            surrogates: surrogate images per item (not needed with ``mitigation_loss=False``).
            utility: non-memorized image-caption pairs for L_DM (the miniworld's ``unique`` set).
            log: optional callable receiving every log record (dicts with ``kind`` "step", "epoch" or, with
                ``stop_mr``, "check").
            similarity, threshold: copy-detector similarity and replication threshold for ``stop_mr``.
            sampling: sampling settings of that check (default: DDIM 50, guidance 7).

        Returns:
            The fine-tuned model (a copy), in eval mode.
        """
        if self.stop_mr is not None and (similarity is None or threshold is None):
            raise DoriError("stop_mr needs a copy-detector similarity and its replication threshold")
        if self.adv_min_timestep >= model.num_train_timesteps:
            raise DoriError(
                f"adv_min_timestep {self.adv_min_timestep} leaves no timestep: the model has "
                f"{model.num_train_timesteps}"
            )
        surrogates = surrogates if surrogates is not None else SurrogateSet()
        skipped: dict[str, str] = {}
        usable = []
        for it in items:
            if it.image is None:
                skipped[it.id] = f"no training image ({it.skip_reason or 'none given'})"
            elif self.mitigation_loss and it.id not in surrogates.images:
                skipped[it.id] = surrogates.failed.get(it.id, "no surrogate images")
            else:
                usable.append(it)
        if not usable:
            raise DoriError(f"no item can be fine-tuned away (items without surrogates or images: {skipped})")
        utility = [it for it in utility if it.image is not None]
        if self.utility_loss and not utility:
            raise DoriError("utility_loss is on but no non-memorized image-caption pairs were given")
        ft = trainable_copy(model)
        if self.lora_rank is not None:
            lora_mod.add_lora(ft.unet, rank=self.lora_rank, convs=self.lora_convs)
            params = lora_mod.lora_parameters(ft.unet)
        else:
            ft.unet.requires_grad_(True)
            params = list(ft.unet.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)

        data = _Data.build(ft, usable, surrogates, utility)
        record = {
            "method": self.name,
            "settings": self.settings(),
            "items": [it.id for it in usable],
            "skipped": skipped,
            "n_surrogates": {k: int(v.shape[0]) for k, v in data.surr.items()},
            "utility": [it.id for it in utility],
        }
        start = 1
        carried: torch.Tensor | None = None  # the previous epoch's final embeddings (``persistent``)
        ema = [p.detach().clone() for p in params] if self.ema is not None else None
        if out is not None:
            out = Path(out)
            free = ("epochs", "stop_mr", "stop_generations")  # a run may be continued with other values
            binding = dict(record, settings={k: v for k, v in record["settings"].items() if k not in free})
            binding["model"] = weights_fingerprint(model)
            check_config(out, binding, model_sources(model))
            start = resume(out, ft, opt, gen)
            state = resume_extra(out)
            carried = state.get("y_adv")
            if self.ema is not None and "ema" in state:
                ema = [e.to(p.device, p.dtype) for e, p in zip(state["ema"], params, strict=True)]
        emit = LossLog(out, start, log)
        if start == 1:
            emit({"kind": "start", "items": len(usable), "skipped": skipped, "utility": len(utility)})

        done = self.epochs
        for epoch in range(start, self.epochs + 1):
            t0 = time.perf_counter()
            y_adv, dori_loss = self._search(ft, data, epoch, gen, carried)
            if self.stop_mr is not None and epoch > 1 and y_adv is not None:
                mr = self._replication(ft, usable, y_adv, similarity, threshold, sampling)
                emit({"kind": "check", "epoch": epoch, "init": self.init_for_epoch(epoch), "mr": mr})
                if mr <= self.stop_mr:
                    done = epoch - 1  # the model after the previous epoch resists this epoch's Dori
                    break
            t1 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = self.lr_for_epoch(epoch)
            teacher = model if self.utility_target != "data" else None
            sums = self._epoch_updates(ft, data, y_adv, params, opt, gen, epoch, emit, ema, teacher)
            t2 = time.perf_counter()
            emit(
                {
                    "kind": "epoch",
                    "epoch": epoch,
                    "init": self.init_for_epoch(epoch),
                    "dori_final_loss": dori_loss,
                    "l_adv": sums["l_adv"],
                    "l_util": sums["l_util"],
                    "steps": sums["steps"],
                    "dori_seconds": round(t1 - t0, 3),
                    "update_seconds": round(t2 - t1, 3),
                }
            )
            carried = y_adv.detach().cpu() if self.persistent and y_adv is not None else None
            if out is not None:
                extra = {"y_adv": carried} if carried is not None else {}
                if ema is not None:
                    extra["ema"] = [e.detach().cpu() for e in ema]
                save_checkpoint(out, ft, opt, gen, epoch, record, extra or None)
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(params, ema, strict=True):
                    p.copy_(e)
        if self.lora_rank is not None:
            lora_mod.merge_lora(ft.unet)
        finish(ft)
        if out is not None:
            save_finetuned(ft, out, dict(record, epochs_done=done, stopped_early=done < self.epochs))
        return ft

    # ------------------------------------------------------------------ parts
    def _search(
        self,
        ft: T2IModel,
        data: _Data,
        epoch: int,
        gen: torch.Generator,
        carried: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, float | None]:
        """Adversarial embeddings for every (item, k) against the current model, in one batched call: fresh
        from their inits, except the ``persistent`` ones, which continue from ``carried`` (the previous
        epoch's final embeddings) when given."""
        if not self.mitigation_loss:
            return None, None
        n, k = len(data.items), self.embeddings_per_item
        seeds = torch.randint(0, 2**31 - 1, (n * k,), generator=gen).tolist()
        kind = self.init_for_epoch(epoch)
        prompts = [it.prompt for it in data.items for _ in range(k)]
        if kind == "both":  # embedding j of an item: from the prompt for even j, from N(0, I) for odd j
            init = initial_embeddings(ft, prompts, init="random", seeds=seeds)
            even = torch.arange(n * k) % k % 2 == 0
            from_prompt = [p for p, e in zip(prompts, even.tolist(), strict=True) if e]
            init[even] = initial_embeddings(ft, from_prompt, init="prompt")
        else:
            init = initial_embeddings(ft, prompts, init=kind, seeds=seeds)
        if self.persistent and carried is not None:
            if carried.shape != init.shape:
                raise DoriError(
                    f"the checkpoint's persistent embeddings have shape {tuple(carried.shape)}, "
                    f"this run needs {tuple(init.shape)}: delete the run folder to start over"
                )
            keep = torch.arange(n * k) % k >= k - self.persistent
            init[keep] = carried[keep].to(init.device, init.dtype)
        if self.dori_steps == 0:
            return init, None
        dori = Dori(
            steps=self.dori_steps,
            lr=self.dori_lr,
            batch_size=self.dori_batch,
            max_micro_batch=self.max_micro_batch,
            autocast_dtype=self.autocast_dtype,
        )
        was_training = ft.unet.training
        ft.unet.eval()
        try:
            res = dori(ft, data.x_mem.repeat_interleave(k, dim=0), init, seeds)
        finally:
            ft.unet.train(was_training)
        return res.embeddings, float(res.losses[:, -1].mean())

    def _replication(
        self,
        ft: T2IModel,
        items: Sequence[Item],
        y_adv: torch.Tensor,
        similarity: Similarity,
        threshold: float,
        sampling: SamplingConfig | None,
    ) -> float:
        """Share of items whose first adversarial embedding of this epoch still generates a replica."""
        k, g = self.embeddings_per_item, self.stop_generations
        emb = y_adv[::k].repeat_interleave(g, dim=0)
        was_training = ft.unet.training
        ft.unet.eval()
        try:
            images = ft.sample(emb, list(range(g)) * len(items), sampling)
        finally:
            ft.unet.train(was_training)
        refs = torch.stack([it.image for it in items]).repeat_interleave(g, dim=0)
        best = similarity(images, refs).float().view(len(items), g).amax(dim=1)
        return replication_rate(best, threshold)

    def _epoch_updates(
        self,
        ft: T2IModel,
        data: _Data,
        y_adv: torch.Tensor | None,
        params: list[torch.nn.Parameter],
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        epoch: int,
        emit: Callable[[dict], None],
        ema: list[torch.Tensor] | None = None,
        teacher: T2IModel | None = None,
    ) -> dict:
        ft.unet.train()
        device, k, d = ft.device, self.embeddings_per_item, self.noise_draws
        order = torch.randperm(len(data.items), generator=gen).tolist()
        groups = [order[i : i + self.items_per_step] for i in range(0, len(order), self.items_per_step)]
        ctx = (
            torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        totals = {"l_adv": 0.0, "l_util": 0.0, "steps": 0}
        for group in groups:
            for s in range(self.steps_per_embedding):
                x0_parts, emb_parts = [], []
                n_adv = 0
                if self.mitigation_loss:
                    for i in group:
                        surr = data.surr[data.items[i].id]
                        pick = torch.randint(0, surr.shape[0], (k * d,), generator=gen)
                        x0_parts.append(surr[pick.to(surr.device)])
                        emb_parts.append(y_adv[i * k : (i + 1) * k].repeat(d, 1, 1))
                    n_adv = len(group) * k * d
                n_util = 0
                if self.utility_loss:
                    n_util = self.utility_batch or len(group) * k * d
                    pick = torch.randint(0, data.util_x0.shape[0], (n_util,), generator=gen)
                    x0_parts.append(data.util_x0[pick.to(device)])
                    util_emb = data.util_emb[pick.to(device)]
                    if self.uncond_share > 0:  # caption dropout: the empty prompt's embedding instead
                        drop = (torch.rand(n_util, generator=gen) < self.uncond_share).to(device)
                        util_emb = torch.where(drop[:, None, None], data.null.to(util_emb), util_emb)
                    emb_parts.append(util_emb)
                x0 = torch.cat(x0_parts).to(device, torch.float32)
                emb = torch.cat([e.to(device, torch.float32) for e in emb_parts])
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, ft.num_train_timesteps, (x0.shape[0],), generator=gen)
                if self.adv_min_timestep and n_adv:
                    t[:n_adv] = torch.randint(
                        self.adv_min_timestep, ft.num_train_timesteps, (n_adv,), generator=gen
                    )
                t = t.to(device)
                opt.zero_grad(set_to_none=True)
                with ctx:
                    if teacher is None or not n_util:
                        per = ft.training_loss(x0, emb, t, noise).float()
                    else:  # utility rows: the unmitigated model's prediction is the target (utility_target)
                        x_t = ft.add_noise(x0, noise, t)
                        target = ft.target(x0[:n_adv], noise[:n_adv], t[:n_adv]).float()
                        if self.utility_target == "guided":  # the utility rows again, with the empty prompt
                            x_t = torch.cat([x_t, x_t[n_adv:]])
                            t = torch.cat([t, t[n_adv:]])
                            emb = torch.cat([emb, data.null.to(emb).expand(n_util, -1, -1)])
                        pred = ft.unet_forward(x_t, t, emb).float()
                        with torch.no_grad():
                            teach = teacher.unet_forward(x_t[n_adv:], t[n_adv:], emb[n_adv:]).float()
                        per_adv = (pred[:n_adv] - target).pow(2).flatten(1).mean(1)
                        if self.utility_target == "guided":
                            per_util = guided_distillation(
                                pred[n_adv:] - teach, n_util, self.utility_guidance
                            )
                        else:
                            per_util = (pred[n_adv:] - teach).pow(2).flatten(1).mean(1)
                        per = torch.cat([per_adv, per_util])
                l_adv = per[:n_adv].mean() if n_adv else per.new_zeros(())
                l_util = per[n_adv:].mean() if n_util else per.new_zeros(())
                (l_adv + self.utility_weight * l_util).backward()
                clip = self.grad_clip if self.grad_clip is not None else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        for e, p in zip(ema, params, strict=True):
                            e.lerp_(p.detach(), 1.0 - self.ema)
                totals["l_adv"] += float(l_adv.detach())
                totals["l_util"] += float(l_util.detach())
                totals["steps"] += 1
                emit(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "items": [data.items[i].id for i in group],
                        "s": s + 1,
                        "l_adv": float(l_adv.detach()) if n_adv else None,
                        "l_util": float(l_util.detach()) if n_util else None,
                        "grad_norm": float(gnorm),
                    }
                )
        steps = max(totals["steps"], 1)
        return {
            "l_adv": totals["l_adv"] / steps if self.mitigation_loss else None,
            "l_util": totals["l_util"] / steps if self.utility_loss else None,
            "steps": totals["steps"],
        }


def guided_distillation(diff: torch.Tensor, n: int, w: float) -> torch.Tensor:
    """Per pair, ``|d_c|^2 + |d_g / w|^2`` (means over elements) from the student-minus-teacher prediction
    differences of ``n`` pairs with their captions (rows ``:n``) and with the empty prompt (rows ``n:``), where
    ``d_g = d_u + w (d_c - d_u)`` is the difference of the classifier-free-guided predictions at guidance w."""
    d_c, d_u = diff[:n], diff[n:]
    d_g = d_u + w * (d_c - d_u)
    return d_c.pow(2).flatten(1).mean(1) + (d_g / w).pow(2).flatten(1).mean(1)


@dataclass
class _Data:
    """Everything the loop reads, encoded once: x_mem, surrogate x0 per item, utility x0 and embeddings."""

    items: list[Item]
    x_mem: torch.Tensor
    surr: dict[str, torch.Tensor]
    util_x0: torch.Tensor
    util_emb: torch.Tensor
    null: torch.Tensor

    @classmethod
    def build(
        cls, model: T2IModel, items: list[Item], surrogates: SurrogateSet, utility: list[Item]
    ) -> _Data:
        x_mem = encode_in_batches(model, item_images(items)).float()
        surr = {
            it.id: encode_in_batches(model, surrogates.images[it.id]).float()
            for it in items
            if it.id in surrogates.images
        }
        if utility:
            util_x0 = encode_in_batches(model, item_images(utility)).float()
            util_emb = model.encode_text([it.prompt for it in utility]).float()
        else:
            util_x0 = util_emb = torch.empty(0)
        null = model.null_embedding().float()
        return cls(list(items), x_mem, surr, util_x0, util_emb, null)
