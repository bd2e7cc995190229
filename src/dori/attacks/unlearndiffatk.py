"""UnlearnDiffAtk (Zhang et al., ECCV 2024) as a discrete-prompt attack on memorization (Finding Dori, Appendix
G.1 and I.6).

It searches *token sequences*, not embeddings: ``k`` adversarial tokens are put in front of the memorized
prompt and chosen to minimize the diffusion loss of the memorized image (the model used as its own
classifier)::

    p_j in simplex over the vocabulary, j = 1..k            (init: one-hot of a random token)
    for t in timesteps (n of them, range(T/n/2, T, T/n) in order):
        repeat `iterations` times:
            tok_j ~ p_j  (straight-through: forward with the sampled one-hot, gradient to p_j)
            y = text_encoder([BOS, tok_1..tok_k, prompt tokens, EOS, pad...])
            loss = mean over draws || eps - f(sqrt(a_t) x_mem + sqrt(1 - a_t) eps, t, y) ||^2
            Adam (lr 0.01, weight decay 0.1) step on p; project each p_j back onto the simplex
        optionally: decode argmax tokens, ask ``success`` and stop the items that replicate

Reference settings (OPTML-Group/Diffusion-MU-Attack, ``text_grad``): k = 3 prefix tokens, Adam lr 0.01,
weight decay 0.1, 40 iterations per timestep, 50 timesteps; the reference stops an item at the first timestep
whose decoded prompt succeeds (for memorization: a generation passes the replication threshold). The Dori
paper calls it "UnlearnDiffAtk (GCG)"; the reference code is this projected-gradient search.

Same call style as :class:`dori.attacks.dori.Dori`: settings in the constructor, the model at call time. The
result holds the prompt strings and the text embeddings of the exact token ids found (decoding tokens to a
string and tokenizing again need not give back the same tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from dori.attacks.base import AttackResult, Success
from dori.errors import DoriError
from dori.models.pipeline import T2IModel


@dataclass
class UnlearnDiffAtkResult:
    """Output of a search.

    Attributes:
        prompts: the adversarial prompts, ``"<tok_1> .. <tok_k> <memorized prompt>"``.
        token_ids: the k adversarial token ids per item (N, k).
        embeddings: text embeddings of the exact token sequences (N, tokens, dim), float32 on the CPU.
        losses: diffusion loss per item and iteration (N, timesteps * iterations).
        stopped_at: per item the timestep stage (1-based) at which ``success`` stopped it, or None.
    """

    prompts: list[str]
    token_ids: torch.Tensor
    embeddings: torch.Tensor
    losses: torch.Tensor
    stopped_at: list[int | None] = field(default_factory=list)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dim) onto the probability simplex (sort-based, exact)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / j) > 0).to(v.dtype).mul(j).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


@dataclass
class UnlearnDiffAtk:
    """UnlearnDiffAtk (see module docstring).

    Args:
        k: adversarial prefix tokens.
        lr: Adam learning rate on the token distributions.
        weight_decay: Adam weight decay.
        iterations: optimization steps per timestep.
        timesteps: number of timesteps visited, ``range(T // n // 2, T, T // n)``.
        batch_size: noise draws per step (the reference uses 1).
    """

    name = "unlearndiffatk"
    key = "uda"
    label = "UnlearnDiffAtk"

    k: int = 3
    lr: float = 0.01
    weight_decay: float = 0.1
    iterations: int = 40
    timesteps: int = 50
    batch_size: int = 1

    def settings(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ the Attack interface
    @property
    def steps(self) -> int:
        """Timestep stages (progress is reported per stage)."""
        return self.timesteps

    def row_steps(self, snapshots: Sequence[int]) -> list[int | None]:
        return [None]

    def recording(self, steps: Sequence[int | None]) -> UnlearnDiffAtk:
        return self

    def rowwise_items(self, max_items: int) -> None:
        return None  # its text-encoder hook holds one prefix per item; per-item mitigations run item by item

    def row_ids(self, ids: Sequence[str]) -> list[str]:
        raise DoriError("UnlearnDiffAtk does not run with row-wise mitigations")

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
        """The search of :meth:`__call__`; each item's record keeps its prompt and the stage it stopped at."""
        res = self(model, x0, prompts, seeds, success=success, progress=progress)
        stopped = res.stopped_at or [None] * len(prompts)
        return AttackResult(
            res.embeddings,
            res.losses,
            tensors={"token_ids": res.token_ids},
            records=[{"prompt": p, "stopped_at": s} for p, s in zip(res.prompts, stopped, strict=True)],
        )

    def schedule(self, model: T2IModel) -> list[int]:
        T = model.num_train_timesteps
        step = max(T // self.timesteps, 1)
        return list(range(step // 2, T, step))[: self.timesteps]

    def __call__(
        self,
        model: T2IModel,
        x0: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        success: Callable[[list[int], torch.Tensor], list[bool]] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> UnlearnDiffAtkResult:
        """Search k prefix tokens per target.

        Args:
            model: the (possibly mitigated) model; not changed.
            x0: targets in the model's space (N, C, H, W).
            prompts: the memorized prompts (the text after the prefix).
            seeds: one per target; fixes its token init, token draws and noise.
            success: optional ``success(indices, embeddings) -> [bool]``, called after each timestep with the
                still-running items and the embeddings of their current argmax prompts; True stops an item.
            progress: optional ``progress(stage)`` after each timestep.
        """
        n = x0.shape[0]
        if len(prompts) != n or len(seeds) != n:
            raise DoriError(f"UnlearnDiffAtk needs one prompt and seed per target ({n})")
        if self.k < 1 or self.iterations < 1 or self.timesteps < 1:
            raise DoriError("UnlearnDiffAtk needs k, iterations and timesteps >= 1")
        device = model.device
        allowed = self._allowed_ids(model).to(device)
        ids = self.token_ids(model, prompts).to(device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        init = torch.stack([torch.randint(0, len(allowed), (self.k,), generator=g) for g in gens]).to(device)
        p = torch.nn.functional.one_hot(init, len(allowed)).float().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=self.lr, weight_decay=self.weight_decay)
        x0 = x0.to(device, torch.float32)
        active = torch.ones(n, dtype=torch.bool)
        stopped: list[int | None] = [None] * n
        schedule = self.schedule(model)
        losses = torch.zeros(n, len(schedule) * self.iterations)
        frozen = [q.requires_grad for q in model.unet.parameters()]
        model.unet.requires_grad_(False)
        try:
            for stage, t_val in enumerate(schedule, 1):
                for it in range(self.iterations):
                    onehot = torch.stack(
                        [
                            torch.multinomial(
                                p[i].detach().cpu().clamp_min(0) + 1e-12, 1, generator=g
                            ).squeeze(-1)
                            for i, g in enumerate(gens)
                        ]
                    ).to(device)
                    hard = torch.nn.functional.one_hot(onehot, len(allowed)).float()
                    ste = hard + p - p.detach()
                    emb = self._encode(model, ids, ste, allowed)
                    b = self.batch_size
                    noise = torch.stack([torch.randn((b, *x0.shape[1:]), generator=g) for g in gens]).to(
                        device
                    )
                    t = torch.full((n * b,), t_val, device=device, dtype=torch.long)
                    per = model.training_loss(
                        x0.repeat_interleave(b, 0), emb.repeat_interleave(b, 0), t, noise.flatten(0, 1)
                    )
                    per_item = per.float().view(n, b).mean(1)
                    opt.zero_grad(set_to_none=True)
                    (per_item * active.to(device)).sum().backward()
                    saved = p.detach().clone()
                    opt.step()
                    with torch.no_grad():
                        p.copy_(project_simplex(p))
                        p[~active.to(device)] = saved[~active.to(device)]  # stopped items stay as they were
                    losses[:, (stage - 1) * self.iterations + it] = per_item.detach().cpu()
                if success is not None and active.any():
                    idx = active.nonzero().flatten().tolist()
                    with torch.no_grad():
                        cur = self._encode(model, ids, self._hard(p), allowed).float().cpu()
                    for i, ok in zip(idx, success(idx, cur[idx]), strict=True):
                        if ok:
                            active[i] = False
                            stopped[i] = stage
                if progress is not None:
                    progress(stage)
                if not active.any():
                    break
        finally:
            for q, flag in zip(model.unet.parameters(), frozen, strict=True):
                q.requires_grad_(flag)
        with torch.no_grad():
            adv = allowed[p.argmax(-1)]
            final = self._encode(model, ids, self._hard(p), allowed).float().cpu()
        texts = [
            f"{model.tokenizer.decode(row.tolist()).strip()} {prompt}"
            for row, prompt in zip(adv.cpu(), prompts, strict=True)
        ]
        return UnlearnDiffAtkResult(texts, adv.cpu(), final, losses, stopped)

    # ------------------------------------------------------------------ text side
    def token_ids(self, model: T2IModel, prompts: Sequence[str]) -> torch.Tensor:
        """[BOS, k placeholders, prompt tokens (truncated), EOS, pad...] per prompt (N, max_tokens)."""
        tok = model.tokenizer
        length = model.max_tokens
        room = length - 2 - self.k
        if room < 0:
            raise DoriError(f"k={self.k} prefix tokens do not fit in {length} tokens")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = []
        for prompt in prompts:
            content = tok(prompt, add_special_tokens=False).input_ids[:room]
            row = [tok.bos_token_id] + [tok.bos_token_id] * self.k + content + [tok.eos_token_id]
            rows.append(row + [pad] * (length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def _allowed_ids(self, model: T2IModel) -> torch.Tensor:
        vocab = model.text_encoder.get_input_embeddings().weight.shape[0]
        special = set(model.tokenizer.all_special_ids)
        return torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)

    def _hard(self, p: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float()

    def _encode(
        self, model: T2IModel, ids: torch.Tensor, onehot: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Text encoder output with the prefix positions' token embeddings set to ``onehot @ W[allowed]``."""
        table = model.text_encoder.get_input_embeddings()
        prefix = onehot @ table.weight[allowed].float()  # (N, k, dim)

        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, 1 : 1 + self.k] = prefix.to(out.dtype)
            return out

        handle = table.register_forward_hook(hook)
        try:
            return model.text_encoder(ids)[0]
        finally:
            handle.remove()
