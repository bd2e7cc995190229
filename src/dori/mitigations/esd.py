"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023), used to erase memorized prompts (Finding Dori,
Appendix G.2, Table 5).

ESD fine-tunes a copy theta of the model so that its prediction for the concept c follows negative guidance
away from it, computed with the frozen original theta*::

    for i in 1..iterations:
        c <- the next memorized prompt (cycled in order)
        x_t <- DDIM from x_T ~ N(0, I) with theta, prompt c, guidance 3, stopped at a random one of 50 steps
        target = eps_theta*(x_t, t, "") - eta * (eps_theta*(x_t, t, c) - eps_theta*(x_t, t, ""))
        loss = || eps_theta(x_t, t, c) - target ||^2          Adam step on the chosen parameters

The memorized prompt is the concept (METHODS.md §8: "erase the memorized prompt as the concept"), and all
memorized prompts are erased into one model, as Finding Dori evaluates one ESD model on all VM items.

Parameter sets (the reference code's ``train_method``): ``esd-x`` (default: the cross-attention layers
``attn2``), ``esd-u`` (everything except ``attn2``), ``esd-all`` (the whole UNet), ``esd-x-strict`` (only
``attn2.to_k`` and ``attn2.to_v``).

Reference settings (rohitgandikota/erasing, ``esd_sd.py``): 200 iterations, Adam lr 5e-5, negative guidance
eta = 2, guidance 3 for sampling x_t, 50 DDIM steps. Finding Dori ran ESD about 10x longer than the ESD
paper (10k steps for 112 prompts, about 90 per prompt) until its effect plateaued. The defaults here are the
reference ones; the miniworld recipe (``experiments/table5_adversarial_ft.py``) sets iterations per item the
way the Dori paper did and records what it used.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.checkpoints import claim_output
from dori.mitigations.training import (
    finish,
    make_trainable,
    save_finetuned,
    select_parameters,
    trainable_copy,
)
from dori.models.pipeline import T2IModel

PARAMETER_SETS: dict[str, tuple[str | None, str | None]] = {
    "esd-x": (r"\.attn2\.", None),
    "esd-u": (None, r"\.attn2\."),
    "esd-all": (None, None),
    "esd-x-strict": (r"\.attn2\.to_[kv]\.", None),
}


@dataclass
class ESD:
    """ESD (see module docstring).

    Args:
        iterations: optimizer steps in total (prompts are cycled).
        lr: Adam learning rate.
        negative_guidance: eta.
        sample_guidance: classifier-free guidance when sampling x_t.
        ddim_steps: DDIM steps of the x_t sampling schedule (the stop step is uniform over them).
        parameters: ``esd-x``, ``esd-u``, ``esd-all`` or ``esd-x-strict``.
        seed: seeds x_T, the stop steps and Python's ``random`` use here.
    """

    name: ClassVar[str] = "esd"

    iterations: int = 200
    lr: float = 5e-5
    negative_guidance: float = 2.0
    sample_guidance: float = 3.0
    ddim_steps: int = 50
    parameters: str = "esd-x"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parameters not in PARAMETER_SETS:
            raise DoriError(
                f"unknown ESD parameter set {self.parameters!r}; use one of {sorted(PARAMETER_SETS)}"
            )

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        out: str | Path | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> T2IModel:
        """Erase the items' prompts from a copy of ``model``; only their prompts are used."""
        if not items:
            raise DoriError("ESD needs at least one prompt to erase")
        if out is not None:  # before any work: never over the input model or a run of other settings
            claim_output(out, model, self.name, self.settings(), [it.id for it in items])
        esd = trainable_copy(model)
        include, exclude = PARAMETER_SETS[self.parameters]
        params = make_trainable(esd.unet, select_parameters(esd.unet, include, exclude))
        opt = torch.optim.Adam(params, lr=self.lr)
        frozen = model.unet
        cond = esd.encode_text([it.prompt for it in items])
        null = esd.null_embedding()
        rng = random.Random(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        sched = esd.ddim_scheduler(self.ddim_steps)
        esd.unet.train()
        for i in range(self.iterations):
            j = i % len(items)
            c = cond[j : j + 1]
            stop = rng.randrange(self.ddim_steps)
            x_t, t = self._sample_until(esd, c, null, sched, stop, gen)
            with torch.no_grad():
                both = frozen(
                    torch.cat([x_t, x_t]), t.repeat(2), encoder_hidden_states=torch.cat([null, c])
                ).sample
                e_null, e_concept = both.float().chunk(2)
            target = e_null - self.negative_guidance * (e_concept - e_null)
            opt.zero_grad(set_to_none=True)
            pred = esd.unet(x_t, t, encoder_hidden_states=c).sample.float()
            loss = (pred - target).pow(2).mean()
            loss.backward()
            opt.step()
            if log is not None:
                log(
                    {
                        "kind": "step",
                        "iteration": i + 1,
                        "item": items[j].id,
                        "t": int(t),
                        "loss": float(loss.detach()),
                    }
                )
        finish(esd)
        if out is not None:
            save_finetuned(
                esd, out, {"method": self.name, "settings": self.settings(), "items": [it.id for it in items]}
            )
        return esd

    @torch.no_grad()
    def _sample_until(
        self,
        model: T2IModel,
        cond: torch.Tensor,
        null: torch.Tensor,
        sched: Any,
        stop: int,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM with guidance from fresh noise through ``stop`` steps; returns x_t and the next timestep t."""
        x = torch.randn((1, *model.sample_shape), generator=gen).to(model.device, model.dtype)
        x = x * sched.init_noise_sigma
        timesteps = sched.timesteps
        for step_t in timesteps[:stop]:
            eps = model.predict_noise(
                sched.scale_model_input(x, step_t), step_t.to(model.device), cond, null, self.sample_guidance
            )
            x = sched.step(eps, step_t, x).prev_sample
        return x, timesteps[stop].reshape(1).to(model.device)
