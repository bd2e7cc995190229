"""Dori: adversarial text-embedding search for memorized images (Finding Dori, Section 3.1, Algorithm 1).

Given a (possibly mitigated) model and a known memorized image x_mem, optimize the conditional text
embedding y (tokens x dim, the text encoder's output) with the diffusion training loss::

    y_adv <- y_mem                                   (or y ~ N(0, I), or another prompt's embedding)
    for i in 1..N:                                   (N = 50)
        eps ~ N(0, I); t ~ U{1..T}                   (B = 8 fresh draws per step, T = training schedule)
        loss = mean_b || target(x_mem, eps_b, t_b) - f_theta(x_t_b, t_b, y_adv) ||^2
        y_adv <- Adam(lr = 0.1) step on loss
        optionally project y_adv onto the L2 ball ||y|| <= r     (Appendix F.3)

The unconditional embedding is not touched (it stays the null prompt at sampling time). Several images
are searched in one batch: each item has its own embedding, its own (noise, t) stream drawn from its own
seed, and the summed loss gives each embedding exactly its own gradient, so Adam (elementwise) makes
the same updates as searching the items one at a time.

Settings go to the constructor; the model is passed at call time, so one configured attack runs against
every mitigated model (``with nemo.applied(model): dori(model, ...)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from dori.attacks.base import AttackResult, Success
from dori.errors import DoriError
from dori.models.pipeline import T2IModel


@dataclass
class DoriResult:
    """Output of a search.

    Attributes:
        embeddings: final y_adv (N, tokens, dim), float32 on the CPU.
        losses: mean diffusion loss per item and step (N, steps).
        snapshots: step -> y_adv (N, tokens, dim) after that many steps (for step sweeps).
        norms: L2 norm of each y_adv per step (N, steps) (Fig. 7, right).
    """

    embeddings: torch.Tensor
    losses: torch.Tensor
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: torch.Tensor | None = None


@dataclass
class Dori:
    """The Dori search (see module docstring).

    Args:
        steps: optimization steps N (paper: 50).
        lr: Adam learning rate eta (paper: 0.1).
        batch_size: (noise, timestep) draws per step (paper: 8).
        norm_ball: radius r of an optional L2-norm projection of each whole embedding (Appendix F.3).
        snapshot_steps: steps after which y_adv is recorded (e.g. (1, 10, 25, 50)).
        max_micro_batch: most UNet samples per forward pass (memory bound); gradients are accumulated.
        autocast_dtype: optional autocast dtype for the UNet (the fast path: torch.bfloat16 on GPU).
        init: what :meth:`run` starts from: ``prompt`` (the paper's default), ``random`` or ``other`` (the
            embedding of another prompt per target, see :func:`initial_embeddings`).
    """

    name = "dori"
    key = "dori"
    label = "dori"

    steps: int = 50
    lr: float = 0.1
    batch_size: int = 8
    norm_ball: float | None = None
    snapshot_steps: Sequence[int] = ()
    max_micro_batch: int = 256
    autocast_dtype: torch.dtype | None = None
    init: str = "prompt"

    def settings(self) -> dict:
        d = asdict(self)
        d["autocast_dtype"] = str(self.autocast_dtype) if self.autocast_dtype else None
        d["snapshot_steps"] = list(self.snapshot_steps)
        return d

    # ------------------------------------------------------------------ the Attack interface
    def row_steps(self, snapshots: Sequence[int]) -> list[int | None]:
        """The snapshot steps below ``steps`` and the last step, ascending."""
        return sorted({s for s in snapshots if 0 < s < self.steps} | {self.steps})

    def recording(self, steps: Sequence[int | None]) -> Dori:
        """A copy that keeps the embeddings after each of ``steps``."""
        return replace(self, snapshot_steps=tuple(s for s in steps if s is not None))

    def rowwise_items(self, max_items: int) -> int:
        """Items per call such that all rows of a call fit one UNet batch (``max_micro_batch``)."""
        return max(1, min(max_items, self.max_micro_batch // self.batch_size))

    def row_ids(self, ids: Sequence[str]) -> list[str]:
        """Item i fills ``batch_size`` consecutive rows of each UNet batch."""
        return [i for i in ids for _ in range(self.batch_size)]

    def target(self, image: torch.Tensor, size: int) -> torch.Tensor:
        """The training image resized (bicubic, antialiased) to the model's size."""
        from dori.data.images import resize_to

        return resize_to(image, size)

    def run(
        self,
        model: T2IModel,
        x0: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        init_prompts: Sequence[str] | None = None,
        success: Success | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> AttackResult:
        """Search from ``init`` (``init_prompts``: the other prompts for init ``other``); ``success`` is not
        used (Dori always runs its ``steps``). Each item's artifact keeps its init and norm curve."""
        if self.init == "other":
            if init_prompts is None:
                raise DoriError("init 'other' needs other prompts")
            y0 = initial_embeddings(model, prompts, "other", other_prompts=init_prompts)
        else:
            y0 = initial_embeddings(model, prompts, self.init, seeds=seeds)
        res = self(model, x0, y0, seeds, progress=progress)
        norms = res.norms if res.norms is not None else torch.zeros(len(seeds), self.steps)
        return AttackResult(
            res.embeddings, res.losses, res.snapshots, tensors={"init": y0.float(), "norms": norms}
        )

    def __call__(
        self,
        model: T2IModel,
        x0: torch.Tensor,
        init: torch.Tensor,
        seeds: Sequence[int],
        progress: Callable[[int], None] | None = None,
    ) -> DoriResult:
        """Search one adversarial embedding per target.

        Args:
            model: the (possibly mitigated) model; its weights are not changed.
            x0: targets in the model's space (N, C, H, W) (``model.encode_images(images)``).
            init: initial embeddings (N, tokens, dim) (see :func:`initial_embeddings`).
            seeds: one seed per target; it fixes that target's (noise, t) draws.
            progress: optional callable ``progress(step)``.
        """
        n = x0.shape[0]
        if init.shape[0] != n or len(seeds) != n:
            raise DoriError(
                f"Dori needs as many inits ({init.shape[0]}) and seeds ({len(seeds)}) as targets ({n})"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise DoriError("Dori needs steps >= 1 and batch_size >= 1")
        device = model.device
        # x0, the noise and x_t stay float32; the UNet casts its inputs to its weights' dtype (bf16 on the
        # fast path), so only the network runs in low precision
        x0 = x0.to(device, torch.float32)
        y = init.detach().to(device, torch.float32).clone().requires_grad_(True)
        opt = torch.optim.Adam([y], lr=self.lr)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        losses = torch.zeros(n, self.steps)
        norms = torch.zeros(n, self.steps)
        snapshots: dict[int, torch.Tensor] = {}
        b = self.batch_size
        T = model.num_train_timesteps
        ctx = (
            torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        items_per_chunk = max(1, self.max_micro_batch // b)
        params_frozen = [p.requires_grad for p in model.unet.parameters()]
        model.unet.requires_grad_(False)
        try:
            for step in range(self.steps):
                noise = torch.stack([torch.randn((b, *x0.shape[1:]), generator=g) for g in gens]).to(
                    device, torch.float32
                )
                t = torch.stack([torch.randint(0, T, (b,), generator=g) for g in gens]).to(device)
                opt.zero_grad(set_to_none=True)
                for lo in range(0, n, items_per_chunk):
                    hi = min(n, lo + items_per_chunk)
                    k = hi - lo
                    xb = x0[lo:hi].unsqueeze(1).expand(k, b, *x0.shape[1:]).reshape(k * b, *x0.shape[1:])
                    eb = y[lo:hi].unsqueeze(1).expand(k, b, *y.shape[1:]).reshape(k * b, *y.shape[1:])
                    with ctx:
                        per = model.training_loss(
                            xb,
                            eb,
                            t[lo:hi].reshape(-1),
                            noise[lo:hi].reshape(k * b, *x0.shape[1:]),
                        )
                    per_item = per.float().view(k, b).mean(1)
                    per_item.sum().backward()
                    losses[lo:hi, step] = per_item.detach().cpu()
                opt.step()
                if self.norm_ball is not None:
                    with torch.no_grad():
                        norm = y.flatten(1).norm(dim=1).clamp_min(1e-12)
                        scale = (self.norm_ball / norm).clamp(max=1.0)
                        y.mul_(scale.view(-1, 1, 1))
                with torch.no_grad():
                    norms[:, step] = y.flatten(1).norm(dim=1).cpu()
                if step + 1 in self.snapshot_steps:
                    snapshots[step + 1] = y.detach().float().cpu().clone()
                if progress is not None:
                    progress(step + 1)
        finally:
            for p, flag in zip(model.unet.parameters(), params_frozen, strict=True):
                p.requires_grad_(flag)
        return DoriResult(
            embeddings=y.detach().float().cpu(), losses=losses, snapshots=snapshots, norms=norms
        )


def initial_embeddings(
    model: T2IModel,
    prompts: Sequence[str],
    init: str = "prompt",
    seeds: Sequence[int] | None = None,
    other_prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Initial y_adv^(0) for each target.

    Args:
        init: ``prompt`` (the memorized prompt's embedding, the paper's default), ``random`` (N(0, I),
            one draw per seed) or ``other`` (the embedding of ``other_prompts[i]``, e.g. non-memorized prompts).
    """
    n = len(prompts)
    if init == "prompt":
        return model.encode_text(list(prompts)).float().cpu()
    if init == "random":
        if seeds is None or len(seeds) != n:
            raise DoriError("random init needs one seed per target")
        shape = model.null_embedding().shape[1:]
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + int(s))) for s in seeds]
        )
    if init == "other":
        if other_prompts is None or len(other_prompts) != n:
            raise DoriError("init 'other' needs one other prompt per target")
        return model.encode_text(list(other_prompts)).float().cpu()
    raise DoriError(f"unknown init {init!r}: use prompt, random or prompt-of:SET")
