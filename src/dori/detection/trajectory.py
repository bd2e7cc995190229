"""The trajectory score of *How Diffusion Models Memorize* (Kim, Kim, Lee; arXiv 2509.25705, 2025).

The paper (abstract, ``shared/paper/how-diffusion-models-memorize-abstract.md``): memorization is early
overestimation; memorized prompts inject the training image into the noise predictions, the initial randomness
is suppressed within a few steps, and "a decomposition of intermediate latents ... with deviations from the
theoretical denoising schedule correlating almost perfectly with memorization severity".

**What is implemented, and where the definition comes from.** The decomposition follows the authors' public
code (``yupeeee/How-Diffusion-Models-Memorize``, an early version of its latent-decomposition script, found
through the code search of this project; the paper's full text was not available here): for one generation
(DDIM, guidance 7.5, 50 steps, SD v1.4 in the paper) with initial latent ``x_T`` and final latent ``x_0``, every
intermediate latent ``x_{t_k}`` (after update ``k = 1..steps``) is fitted by least squares as

    x_{t_k} ~ w_0(k) * x_0 + w_T(k) * x_T          (over all latent dimensions)

and compared with the theoretical schedule ``w_0 = sqrt(abar_{t_k})``, ``w_T = sqrt(1 - abar_{t_k})`` (the
forward marginal with the trajectory's own noise and endpoint). That script stores the coefficients; the
single number the paper correlates with memorization severity is not in it. The score here is the closest
sound reading of the abstract: the **excess of the endpoint coefficient over the schedule in the first
``first`` updates**, averaged over generations::

    score = mean_gens mean_{k=1..first} ( w_0(k) - sqrt(abar_{t_k}) )

Early overestimation makes a trajectory reach its (memorized) endpoint too soon, so ``w_0`` runs ahead of
``sqrt(abar)`` and the score is large; a generalizing trajectory follows the schedule (score near 0). The
deviation of ``w_T`` (initial randomness suppressed: ``w_T`` below ``sqrt(1 - abar)``) and the fit residual
are recorded per prompt as well. Generations use seeds ``0..n_gens-1`` for every prompt (the authors' script
evaluates seeds ``0..N-1``; the paper uses N = 10, the default here is 4 for cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from dori.detection.base import check_batch, register
from dori.errors import DoriError
from dori.models.pipeline import T2IModel


def schedule_coefficients(model: T2IModel, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Theoretical (w_0, w_T) of the latent after each of the ``steps`` DDIM updates, float64 (steps,)."""
    sched = model.ddim_scheduler(steps)
    ratio = model.num_train_timesteps // steps
    abar = []
    for t in sched.timesteps.tolist():
        prev = t - ratio
        abar.append(float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod))
    a = torch.tensor(abar, dtype=torch.float64)
    return a.sqrt(), (1 - a).sqrt()


def decompose(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``x_k ~ w_0 x_0 + w_T x_T`` for each state after the first.

    Args:
        states: (R, steps + 1, D) latents of R trajectories: ``states[:, 0]`` = x_T, ``states[:, -1]`` = x_0.

    Returns:
        w_0, w_T, rms residual, each (R, steps), float64.
    """
    s = states.double()
    x_t, x_0, xs = s[:, 0], s[:, -1], s[:, 1:]
    basis = torch.stack([x_0, x_t], dim=2)  # (R, D, 2)
    gram = basis.transpose(1, 2) @ basis  # (R, 2, 2)
    rhs = basis.transpose(1, 2) @ xs.transpose(1, 2)  # (R, 2, steps)
    w = torch.linalg.solve(gram, rhs)  # (R, 2, steps)
    fit = basis @ w  # (R, D, steps)
    rms = (xs.transpose(1, 2) - fit).pow(2).mean(1).sqrt()
    return w[:, 0], w[:, 1], rms


@register("trajectory")
@dataclass
class TrajectoryScore:
    """Deviation of the intermediate latents from the theoretical schedule (see module docstring).

    Args:
        steps: DDIM steps (50); guidance: classifier-free guidance (7.5).
        n_gens: generations per prompt, seeds ``0..n_gens-1`` (4; the paper: 10).
        first: updates the score averages over (10 of 50: timesteps 961 to 781 on SD).
        max_rows: most UNet rows per forward pass (two per generation).
    """

    steps: int = 50
    guidance: float = 7.5
    n_gens: int = 4
    first: int = 10
    max_rows: int = 64
    name: str = "trajectory"

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.steps:
            raise DoriError(f"trajectory score: need 1 <= first <= steps, got {self.first}, {self.steps}")
        if self.n_gens < 1:
            raise DoriError("trajectory score: n_gens must be >= 1")

    def settings(self) -> dict:
        return {
            **asdict(self),
            "statistic": "mean over generations and updates 1..first of w_0(k) - sqrt(abar_k), "
            "x_k ~ w_0 x_0 + w_T x_T by least squares",
            "sampler": "DDIM, eta 0, seeds 0..n_gens-1 (model.initial_noise)",
            "source": "Kim, Kim, Lee 2025 (arXiv 2509.25705) abstract; decomposition as in "
            "yupeeee/How-Diffusion-Models-Memorize (early latent-decomposition script)",
        }

    @torch.no_grad()
    def trajectories(self, model: T2IModel, prompts: Sequence[str]) -> torch.Tensor:
        """All DDIM states of each prompt and generation: (P, n_gens, steps + 1, D), float32 on the CPU."""
        per_call = max(1, self.max_rows // (2 * self.n_gens))
        out = []
        for lo in range(0, len(prompts), per_call):
            group = list(prompts[lo : lo + per_call])
            emb = model.encode_text(group).repeat_interleave(self.n_gens, dim=0)
            uncond = model.null_embedding()
            x = model.initial_noise(list(range(self.n_gens))).repeat(len(group), 1, 1, 1)
            sched = model.ddim_scheduler(self.steps)
            x = x.to(model.device, torch.float32) * sched.init_noise_sigma
            states = [x.flatten(1).cpu()]
            for t in sched.timesteps:
                eps = model.predict_noise(
                    sched.scale_model_input(x, t), t.to(model.device), emb, uncond, self.guidance
                )
                x = sched.step(eps, t, x).prev_sample
                states.append(x.flatten(1).cpu())
            out.append(torch.stack(states, 1).view(len(group), self.n_gens, self.steps + 1, -1))
        return torch.cat(out)

    def score(self, model: T2IModel, prompts: Sequence[str], indices: Sequence[int]) -> list[dict]:
        """Per prompt: ``score``, ``w0_excess`` / ``wT_deficit`` per update (mean over generations), ``residual``."""
        check_batch(prompts, indices)
        theory_0, theory_t = schedule_coefficients(model, self.steps)
        out = []
        for traj in self.trajectories(model, prompts):
            w0, wt, rms = decompose(traj)  # (n_gens, steps)
            excess = (w0 - theory_0).mean(0)
            deficit = (theory_t - wt).mean(0)
            out.append(
                {
                    "score": float(excess[: self.first].mean()),
                    "wT_deficit": float(deficit[: self.first].mean()),
                    "w0_excess_per_step": excess.tolist(),
                    "wT_deficit_per_step": deficit.tolist(),
                    "residual_rms_first": float(rms[:, : self.first].mean()),
                }
            )
        return out
