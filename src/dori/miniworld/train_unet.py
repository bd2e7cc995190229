"""Diffusion training of the miniworld's UNet (Stable Diffusion's recipe, scaled down).

DDPM with T = 1000 (SD's scaled-linear betas 0.00085-0.012), epsilon prediction, t ~ U{0..T-1}, MSE on the
noise, the frozen text encoder's last hidden state as conditioning, caption dropout (the empty prompt) for
classifier-free guidance, AdamW with warm-up and cosine decay, bf16 autocast on GPU, and an exponential moving
average of the weights (what is saved), as SD's training did.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.miniworld.train_parts import Log, _autocast, _schedule, batches
from dori.models.pipeline import T2IModel
from dori.safeload import load_state, state_field


def train_unet(
    model: T2IModel,
    x0: torch.Tensor,
    emb: torch.Tensor,
    emb_index: torch.Tensor,
    x0_index: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    log: Log,
    lr: float = 3e-4,
    dropout: float = 0.1,
    ema_decay: float = 0.999,
    max_seconds: float | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 200,
) -> tuple[torch.nn.Module, int]:
    """Train ``model.unet`` on training examples ``(x0[x0_index[j]], emb[emb_index[j]])``.

    Args:
        model: the world's pipeline; its UNet is trained, its text encoder is not used (embeddings are given).
        x0: distinct training latents (already times ``scaling_factor``), (M, 4, 8, 8), on the device.
        emb: distinct caption embeddings (K, tokens, dim); row 0 must be the empty prompt's.
        emb_index, x0_index: one row per training example (duplicated items appear many times).
        steps, batch, seed: optimisation length, batch size, seed (noise, t, batches, dropout).
        log: progress sink.
        lr: peak learning rate.
        dropout: probability of replacing the caption by the empty prompt.
        ema_decay: decay of the weight average that is returned.
        max_seconds: wall time after which training pauses: with ``checkpoint`` it is saved there and the
            call returns fewer than ``steps`` steps done; without one it simply stops early (and says so).
        checkpoint: file for the training state (raw and EMA weights, optimizer, RNG states, step). Saved
            every ``checkpoint_every`` steps and at a pause, resumed from if present, deleted when training
            ends; a resumed run gives the same weights as an uninterrupted one.

    Returns:
        The EMA UNet (eval mode) and the number of steps done; ``model.unet`` holds the raw weights.
    """
    torch.manual_seed(seed)
    device = x0.device
    unet = model.unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    alphas = model.scheduler.alphas_cumprod.to(device)
    t0, running, start = time.time(), torch.zeros((), device=device), 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_state(checkpoint, map_location=device)  # tensors and plain containers only
        steps_, batch_, n_ = (state_field(state, k, checkpoint) for k in ("steps", "batch", "n"))
        if steps_ != steps or batch_ != batch or n_ != len(emb_index):
            raise DoriError(
                f"{checkpoint} belongs to another run (steps, batch or examples differ): delete it to start over"
            )
        try:
            unet.load_state_dict(state_field(state, "unet", checkpoint))
            ema.load_state_dict(state_field(state, "ema", checkpoint))
            opt.load_state_dict(state_field(state, "opt", checkpoint))
            start, running = (
                int(state_field(state, "step", checkpoint)),
                state_field(state, "running", checkpoint).to(device),
            )
            torch.set_rng_state(state_field(state, "rng_cpu", checkpoint).cpu())
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as err:
            raise DoriError(f"{checkpoint} does not fit this UNet ({err}); delete it to start over") from err
        log(f"unet: resumed from {checkpoint} at step {start}")

    def save(step: int) -> None:
        state = {
            "unet": unet.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "steps": steps,
            "batch": batch,
            "n": len(emb_index),
            "running": running,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        tmp = Path(checkpoint).with_name(f".{Path(checkpoint).name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    for step, idx in enumerate(batches(len(emb_index), batch, steps, seed + 5, device, start=start), start):
        _schedule(opt, step, steps, lr, warmup=min(500, steps // 10 + 1))
        x = x0[x0_index[idx]]
        e_idx = emb_index[idx]
        e_idx = torch.where(torch.rand(len(idx), device=device) < dropout, torch.zeros_like(e_idx), e_idx)
        noise = torch.randn_like(x)
        t = torch.randint(0, model.num_train_timesteps, (len(idx),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        with _autocast(device):
            pred = unet(x_t, t, encoder_hidden_states=emb[e_idx]).sample
        loss = (pred.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
            running = loss.detach() if step == 0 else 0.98 * running + 0.02 * loss.detach()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            rate = (step + 1 - start) * batch / (time.time() - t0)
            log(f"unet step {step}/{steps} loss {float(running):.4f} ({rate:.0f} samples/s)")
        if step + 1 == steps:
            break
        if max_seconds is not None and time.time() - t0 > max_seconds:
            if checkpoint is None:
                log(f"unet: stopped at step {step + 1} of {steps} by the {max_seconds:.0f}s cap")
            else:
                save(step + 1)
                log(f"unet: paused at step {step + 1} of {steps} after {max_seconds:.0f}s ({checkpoint})")
            return ema, step + 1
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            save(step + 1)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    unet.eval()
    return ema, steps
