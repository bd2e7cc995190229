"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023), used to erase memorized prompts (Finding Dori,
Appendix G.2, Table 5).

ESD fine-tunes a copy theta of the model so that its prediction for the concept c follows negative guidance
away from it, computed with the frozen original theta* (``esd_sd.py`` of the reference, in its order of
random draws)::

    for i in 1..iterations:
        c <- the next memorized prompt (cycled in order)
        k <- randint(0, steps - 1); s <- randint(0, 2^15)            (Python's random, seeded)
        x_t <- the frozen theta*'s pipeline from x_T ~ N(0, I) (generator seeded s), prompt c, guidance 3,
               stopped after k of 50 scheduler steps; t = the scheduler's k-th timestep
        target = eps_theta*(x_t, t, c) - eta * (eps_theta*(x_t, t, c) - eps_theta*(x_t, t, ""))
        loss = mean (eps_theta(x_t, t, c) - target)^2                 Adam step on the chosen parameters

The memorized prompt is the concept (METHODS.md §8: "erase the memorized prompt as the concept").

Parameter sets (the reference's ``train_method``; only the weights of Linear and Conv2d modules):
``esd-x`` (default: modules under ``attn2``), ``esd-u`` (every other Linear/Conv2d), ``esd-all`` (every
Linear/Conv2d), ``esd-x-strict`` (``attn2.to_k`` and ``attn2.to_v``). Normalization layers are never trained.

Reference settings (rohitgandikota/erasing @ 25613d2, ``esd_sd.py``): 200 iterations, Adam lr 5e-5, negative
guidance eta = 2, guidance 3 for sampling x_t, 50 steps of the pipeline's scheduler (PNDM for SD v1.4),
1024 x 1024 pixels, both UNets, the text encoder and the optimizer in bfloat16. These are the defaults
(``variant="reference"``). ``variant="paper"``: Finding Dori ran ESD 10k iterations for its 112 prompts
(about 90 per prompt; "10 times longer than in their paper"); it is the default iteration count of that
variant, everything else as the reference. ``tests/test_parity_esd.py`` checks targets, losses and the
trained weights against numbers from the reference code.

Deviations from the reference:

* one model erases all memorized prompts (cycled in order), as Finding Dori evaluates one ESD model on all
  VM items; the reference erases one concept per run;
* the trained UNet is returned (and saved) in the input model's dtype after training in ``dtype``;
* ``resolution`` is the reference's 1024 px by default; the miniworld recipe uses the world's own size
  (32 px; 1024 px is 32x its side);
* the ``ddim`` scheduler (dori's earlier choice) is available as ``scheduler="ddim"``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, PNDMScheduler

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.checkpoints import claim_output
from dori.mitigations.training import finish, make_trainable, save_finetuned, trainable_copy
from dori.models.pipeline import T2IModel

PARAMETER_SETS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")
VARIANTS = {"reference": 200, "paper": 10_000}  # default iterations
SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_TRAINABLE_MODULES = ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")


def esd_parameter_names(unet: torch.nn.Module, method: str) -> list[str]:
    """Names of the parameters the reference trains for ``method`` (Linear/Conv2d modules only)."""
    if method not in PARAMETER_SETS:
        raise DoriError(f"unknown ESD parameter set {method!r}; use one of {list(PARAMETER_SETS)}")
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in _TRAINABLE_MODULES:
            continue
        strict = "attn2.to_k" in name or "attn2.to_v" in name
        take = {
            "esd-x": "attn2" in name,
            "esd-u": "attn2" not in name,
            "esd-all": True,
            "esd-x-strict": strict,
        }[method]
        if take:
            names += [f"{name}.{n}" for n, _ in module.named_parameters()]
    if not names:
        raise DoriError(f"ESD parameter set {method!r} selects nothing in this UNet")
    return names


@dataclass
class ESD:
    """ESD (see module docstring).

    Args:
        iterations: optimizer steps in total (prompts are cycled); None: the variant's (reference 200,
            paper 10,000).
        lr: Adam learning rate.
        negative_guidance: eta.
        sample_guidance: classifier-free guidance when sampling x_t.
        sample_steps: scheduler steps of the x_t sampling run (the stop step is uniform over them).
        scheduler: ``pndm`` (the reference pipeline's, SD v1.4) or ``ddim``.
        resolution: image side in pixels of the x_t samples; None: the model's own size.
        dtype: ``bfloat16`` (reference) or ``float32``: UNets, text encoder and optimizer during training.
        parameters: ``esd-x``, ``esd-u``, ``esd-all`` or ``esd-x-strict``.
        variant: ``reference`` or ``paper`` (module docstring).
        seed: seeds Python's ``random`` that draws the stop steps and the noise seeds.
    """

    name: ClassVar[str] = "esd"

    iterations: int | None = None
    lr: float = 5e-5
    negative_guidance: float = 2.0
    sample_guidance: float = 3.0
    sample_steps: int = 50
    scheduler: str = "pndm"
    resolution: int | None = 1024
    dtype: str = "bfloat16"
    parameters: str = "esd-x"
    variant: str = "reference"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parameters not in PARAMETER_SETS:
            raise DoriError(
                f"unknown ESD parameter set {self.parameters!r}; use one of {sorted(PARAMETER_SETS)}"
            )
        for value, allowed, what in (
            (self.variant, VARIANTS, "variant"),
            (self.scheduler, SCHEDULERS, "scheduler"),
            (self.dtype, DTYPES, "dtype"),
        ):
            if value not in allowed:
                raise DoriError(f"unknown ESD {what} {value!r}; use one of {sorted(allowed)}")
        if self.iterations is None:
            self.iterations = VARIANTS[self.variant]

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
        dtype = DTYPES[self.dtype]
        esd = trainable_copy(model)
        out_dtype = esd.dtype
        torch.nn.Module.to(esd.unet, dtype)  # (diffusers' own .to warns about dtype casts)
        params = make_trainable(esd.unet, esd_parameter_names(esd.unet, self.parameters))
        opt = torch.optim.Adam(params, lr=self.lr)
        frozen = model.unet if model.dtype == dtype else torch.nn.Module.to(copy.deepcopy(model.unet), dtype)
        text = model.text_encoder
        if next(text.parameters()).dtype != dtype:  # the reference encodes with the pipeline's dtype
            text = copy.deepcopy(text).to(dtype)
        with torch.no_grad():
            cond = torch.cat([text(model.tokenize([it.prompt]))[0] for it in items]).to(dtype)
            null = text(model.tokenize([""]))[0].to(dtype)
        del text
        rng = random.Random(self.seed)
        esd.unet.train()
        for i in range(self.iterations):
            j = i % len(items)
            c = cond[j : j + 1]
            stop = rng.randint(0, self.sample_steps - 1)
            seed = rng.randint(0, 2**15)
            x_t, t = self.sample_until(model, frozen, c, null, stop, seed, dtype)
            with torch.no_grad():
                e_concept = frozen(x_t, t, encoder_hidden_states=c).sample
                e_null = frozen(x_t, t, encoder_hidden_states=null).sample
            target = e_concept - self.negative_guidance * (e_concept - e_null)
            opt.zero_grad(set_to_none=True)
            pred = esd.unet(x_t, t, encoder_hidden_states=c).sample
            loss = torch.nn.functional.mse_loss(pred, target)
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
                        "target_norm": float(target.float().norm()),
                    }
                )
        torch.nn.Module.to(esd.unet, out_dtype)
        finish(esd)
        if out is not None:
            save_finetuned(
                esd, out, {"method": self.name, "settings": self.settings(), "items": [it.id for it in items]}
            )
        return esd

    def make_scheduler(self, model: T2IModel) -> Any:
        """The x_t sampling scheduler from the model's training schedule, set to ``sample_steps``."""
        config = dict(model.scheduler.config)
        if self.scheduler == "pndm":
            config["skip_prk_steps"] = True  # as SD v1.4's scheduler folder
        sched = SCHEDULERS[self.scheduler].from_config(config)
        sched.set_timesteps(self.sample_steps)
        return sched

    @torch.no_grad()
    def sample_until(
        self,
        model: T2IModel,
        unet: torch.nn.Module,
        cond: torch.Tensor,
        null: torch.Tensor,
        stop: int,
        seed: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's sampling with ``unet`` (guidance, ``dtype``) through ``stop`` steps: x_t and t."""
        sched = self.make_scheduler(model)
        c, h, w = model.sample_shape
        if self.resolution is not None:
            factor = model.image_size // h
            h = w = self.resolution // factor
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((1, c, h, w), generator=gen, dtype=dtype).to(model.device)
        x = x * sched.init_noise_sigma
        emb = torch.cat([null, cond])
        for step_t in sched.timesteps[:stop]:
            inp = sched.scale_model_input(torch.cat([x, x]), step_t)
            u, ct = unet(inp, step_t, encoder_hidden_states=emb).sample.chunk(2)
            x = sched.step(u + self.sample_guidance * (ct - u), step_t, x).prev_sample
        return x, sched.timesteps[stop].to(model.device)
