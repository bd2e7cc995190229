"""UnlearnDiffAtk (Zhang et al., ECCV 2024) as a discrete-prompt attack on memorization (Finding Dori, Appendix
G.1 and I.6), following the reference code (OPTML-Group/Diffusion-MU-Attack @ 5a3e5d3, ``text_grad``).

It searches *token sequences*, not embeddings: ``k`` adversarial tokens are put in front of the memorized
prompt and chosen to minimize the diffusion loss of the memorized image (the model used as its own
classifier)::

    p_j = uniform 1/|V| over the whole vocabulary (special tokens included), j = 1..k
    for t in range(T/n/2, T, T/n) (n timesteps, in order):          the reference's ``sequential`` path
        repeat `iterations` times:
            tok_j ~ p_j; forward with the one-hot of tok_j; backward: the gradient with respect to the
                one-hot, clipped to [-1, 1] (hardtanh), is p_j's gradient (straight-through)
            y = text_encoder([BOS, tok_1..tok_k, prompt tokens, EOS, EOS...])
            loss = || eps - f(sqrt(a_t) x_mem + sqrt(1 - a_t) eps, t, y) ||^2 (mean)
            Adam (lr 0.01, weight decay 0.1) step on p; project each p_j onto the simplex by bisection
        decode the argmax tokens and the prompt to a string, tokenize it again, and ask ``success`` with
        that prompt's embedding; stop the items that replicate

The search starts only if the unattacked prompt does not already succeed (then the prompt is kept).

Reference settings: k = 3 prefix tokens (``attack.py``; the nudity, violence and illegal configs use 5),
Adam lr 0.01, weight decay 0.1, 40 iterations per timestep, 50 timesteps. The reference's ``sequential``
defaults to False in ``attack.py``, but then ``text_grad_.py`` raises ``NotImplementedError`` (234-237): the
only path that runs is the configs' ``sequential: true``, which is what this implements. The Dori paper calls
the method "UnlearnDiffAtk (GCG)"; neither the reference nor dori implements GCG.

Random draws. Each item has its own CPU generator seeded with its seed. The reference draws from the global
generator, which its evaluation re-seeds with the evaluation seed after every timestep (and which then draws
the evaluation's starting latent); dori does the same per item: at the start of every timestep the
generator is re-seeded and one latent-shaped draw is skipped, so a run on a CPU repeats the reference's
token samples and noise draws (on a GPU the reference's draws come from the CUDA generator instead).

Named options (reference behaviour by default): ``init="onehot"`` (a random token, dori's earlier start),
``clip_grad=False``, ``vocabulary="no-special"``, ``projection="exact"`` (sort-based Euclidean projection;
the reference's bisection stops at a tolerance of 1e-5 on the threshold, so its rows sum to about 0.95 on a
49,408-token vocabulary), ``judge="exact"`` (judge the exact token ids instead of the re-tokenized string).

Deviations from the reference:

* success is a generation with the audit's sampler (DDIM, guidance 7, the item's first evaluation seed)
  passing the replication threshold of the copy detector; the reference samples with LMS, guidance 7.5,
  seed 0 and asks a concept classifier;
* items run batched, each with its own generator, and a stopped item's distribution is frozen while the
  others continue (the reference attacks one prompt per process);
* prompts longer than the room left by the k tokens are truncated; the reference skips prompts of more
  than 60 tokens (``datasets.py``), and fails on longer ones;
* the target image is resized on its shorter side and centre-cropped (:func:`resize_center_crop`) with
  antialiased bicubic interpolation on tensors; the reference uses torchvision on PIL images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dori.attacks.base import AttackResult, Success
from dori.attacks.simplex import project_bisection, project_simplex
from dori.errors import DoriError
from dori.models.pipeline import T2IModel

INITS = ("uniform", "onehot")
VOCABULARIES = ("full", "no-special")
PROJECTIONS = ("bisection", "exact")
JUDGES = ("retokenize", "exact")


@dataclass
class UnlearnDiffAtkResult:
    """Output of a search.

    Attributes:
        prompts: the adversarial prompts as strings (the argmax tokens and the prompt, decoded).
        token_ids: the k adversarial token ids per item (N, k); -1 where the unattacked prompt succeeded.
        embeddings: embeddings of the prompts as judged (``judge``), (N, tokens, dim), float32 on the CPU.
        losses: diffusion loss per item and iteration (N, timesteps * iterations).
        stopped_at: per item the timestep stage (1-based) at which ``success`` stopped it, 0 if the
            unattacked prompt already succeeded, None if it never did.
    """

    prompts: list[str]
    token_ids: torch.Tensor
    embeddings: torch.Tensor
    losses: torch.Tensor
    stopped_at: list[int | None] = field(default_factory=list)


class _StraightThrough(torch.autograd.Function):
    """Forward: the sampled one-hot; backward: the one-hot's gradient (hardtanh-clipped if asked) to p."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, hard: torch.Tensor, clip: bool) -> torch.Tensor:
        ctx.clip = clip
        return hard.to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (F.hardtanh(grad) if ctx.clip else grad), None, None


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """A (3, H, W) image in [0, 1]: shorter side resized to ``size`` (bicubic, antialiased), centre crop of
    size x size (the reference's target transform, ``datasets.py`` 23-31)."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, int(size if h <= w else h * scale)), max(size, int(size if w <= h else w * scale))
    out = F.interpolate(
        image[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
    )
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return out[0, :, top : top + size, left : left + size].clamp(0, 1)


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
        init: ``uniform`` (reference) or ``onehot`` (a random token).
        clip_grad: hardtanh on the straight-through gradient (reference: True).
        vocabulary: ``full`` (reference, special tokens included) or ``no-special``.
        projection: ``bisection`` (reference, tolerance 1e-5) or ``exact``.
        judge: ``retokenize`` (reference: decode, tokenize again) or ``exact`` (the token ids found).
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
    init: str = "uniform"
    clip_grad: bool = True
    vocabulary: str = "full"
    projection: str = "bisection"
    judge: str = "retokenize"

    def __post_init__(self) -> None:
        for name, allowed in (("init", INITS), ("vocabulary", VOCABULARIES), ("projection", PROJECTIONS),
                              ("judge", JUDGES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise DoriError(
                    f"UnlearnDiffAtk {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.k < 1 or self.iterations < 1 or self.timesteps < 1 or self.batch_size < 1:
            raise DoriError("UnlearnDiffAtk needs k, iterations, timesteps and batch_size >= 1")

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

    def target(self, image: torch.Tensor, size: int) -> torch.Tensor:
        """Shorter side resized and centre-cropped to ``size``, as the reference's dataset does."""
        return resize_center_crop(image, size)

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

    # ------------------------------------------------------------------ the pieces, one iteration at a time
    def initial(self, model: T2IModel, n: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """Token distributions (n, k, |V|) at the start, projected as the reference does."""
        v = len(self.allowed_ids(model))
        if self.init == "uniform":
            p = torch.zeros(n, self.k, v).fill_(1 / v)
        else:
            p = F.one_hot(torch.stack([torch.randint(0, v, (self.k,), generator=g) for g in gens]), v).float()
        return self.project(p)

    def project(self, p: torch.Tensor) -> torch.Tensor:
        if self.projection == "exact":
            return project_simplex(p)
        return torch.stack([torch.stack([project_bisection(row) for row in item]) for item in p])

    def sample(self, p: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """One token per distribution (n, k), drawn on the CPU with each item's generator."""
        return torch.stack(
            [torch.multinomial(p[i].detach().cpu(), 1, generator=g)[:, 0] for i, g in enumerate(gens)]
        )

    def loss(
        self, model: T2IModel, p: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor, x0: torch.Tensor,
        t: int, noise: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Per-item diffusion loss (n,) with the sampled ``tokens`` (n, k) in the prefix; differentiable in
        ``p`` through the straight-through one-hot. ``noise``: (n, batch_size, C, H, W)."""
        allowed = self.allowed_ids(model).to(p.device)
        hard = F.one_hot(tokens.to(p.device), p.shape[-1])
        onehot = _StraightThrough.apply(p, hard, self.clip_grad)
        emb = self._encode(model, ids, onehot, allowed)
        n, b = x0.shape[0], noise.shape[1]
        tt = torch.full((n * b,), t, device=x0.device, dtype=torch.long)
        per = model.training_loss(
            x0.repeat_interleave(b, 0), emb.repeat_interleave(b, 0), tt, noise.flatten(0, 1)
        )
        return per.float().view(n, b).mean(1)

    # ------------------------------------------------------------------ the search
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
            seeds: one per target; fixes its token draws and noise.
            success: optional ``success(indices, embeddings) -> [bool]``, asked first with the unattacked
                prompts and then after each timestep with the still-running items and the embeddings of
                their current prompts; True stops an item.
            progress: optional ``progress(stage)`` after each timestep.
        """
        n = x0.shape[0]
        if len(prompts) != n or len(seeds) != n:
            raise DoriError(f"UnlearnDiffAtk needs one prompt and seed per target ({n})")
        device = model.device
        allowed = self.allowed_ids(model)
        ids = self.token_ids(model, prompts).to(device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x0 = x0.to(device, torch.float32)
        active = torch.ones(n, dtype=torch.bool)
        stopped: list[int | None] = [None] * n
        if success is not None:  # the reference first evaluates the unattacked prompt
            with torch.no_grad():
                plain = model.encode_text(list(prompts)).float().cpu()
            for i, ok in enumerate(success(list(range(n)), plain)):
                if ok:
                    active[i], stopped[i] = False, 0
        p = self.initial(model, n, gens).to(device).requires_grad_(True)
        opt = torch.optim.Adam([p], lr=self.lr, weight_decay=self.weight_decay)
        schedule = self.schedule(model)
        losses = torch.zeros(n, len(schedule) * self.iterations)
        frozen = [q.requires_grad for q in model.unet.parameters()]
        model.unet.requires_grad_(False)
        shape = (self.batch_size, *x0.shape[1:])
        try:
            for stage, t_val in enumerate(schedule, 1):
                if not active.any():
                    break
                for i, g in enumerate(gens):  # the reference's evaluation re-seeds and draws a latent
                    g.manual_seed(int(seeds[i]))
                    torch.randn((1, *x0.shape[1:]), generator=g)
                for it in range(self.iterations):
                    tokens = self.sample(p, gens)
                    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                    per_item = self.loss(model, p, ids, tokens, x0, t_val, noise)
                    opt.zero_grad(set_to_none=True)
                    (per_item * active.to(device)).sum().backward()
                    saved = p.detach().clone()
                    opt.step()
                    with torch.no_grad():
                        p.copy_(self.project(p))
                        p[~active.to(device)] = saved[~active.to(device)]  # stopped items stay as they were
                    losses[:, (stage - 1) * self.iterations + it] = per_item.detach().cpu()
                if success is not None:
                    idx = active.nonzero().flatten().tolist()
                    texts, _ = self.current_prompts(model, ids, p.detach(), allowed)
                    cur = self.judged_embeddings(model, ids, p.detach(), allowed, texts)
                    for i, ok in zip(idx, success(idx, cur[idx]), strict=True):
                        if ok:
                            active[i], stopped[i] = False, stage
                if progress is not None:
                    progress(stage)
        finally:
            for q, flag in zip(model.unet.parameters(), frozen, strict=True):
                q.requires_grad_(flag)
        texts, adv = self.current_prompts(model, ids, p.detach(), allowed)
        final = self.judged_embeddings(model, ids, p.detach(), allowed, texts)
        for i in range(n):
            if stopped[i] == 0:  # the unattacked prompt succeeded: keep it
                texts[i], adv[i] = prompts[i], -1
                final[i] = plain[i]
        return UnlearnDiffAtkResult(texts, adv.cpu(), final, losses, stopped)

    # ------------------------------------------------------------------ text side
    def token_ids(self, model: T2IModel, prompts: Sequence[str]) -> torch.Tensor:
        """[BOS, k placeholders, prompt tokens (truncated), EOS, EOS...] per prompt (N, max_tokens); the
        reference pads with EOS whatever the tokenizer's pad token."""
        tok = model.tokenizer
        length = model.max_tokens
        room = length - 2 - self.k
        if room < 0:
            raise DoriError(f"k={self.k} prefix tokens do not fit in {length} tokens")
        rows = []
        for prompt in prompts:
            content = tok(prompt, add_special_tokens=False).input_ids[:room]
            row = [tok.bos_token_id] + [tok.bos_token_id] * self.k + content + [tok.eos_token_id]
            rows.append(row + [tok.eos_token_id] * (length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def allowed_ids(self, model: T2IModel) -> torch.Tensor:
        """The token ids the search draws from (the distributions' support)."""
        vocab = model.text_encoder.get_input_embeddings().weight.shape[0]
        if self.vocabulary == "full":
            return torch.arange(vocab)
        special = set(model.tokenizer.all_special_ids)
        return torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)

    def current_prompts(
        self, model: T2IModel, ids: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[list[str], torch.Tensor]:
        """The argmax tokens in place and the sequence decoded as the reference does (BOS and every EOS
        dropped, the rest decoded together); returns the strings and the tokens (N, k)."""
        adv = allowed[p.argmax(-1).cpu()]
        full = ids.cpu().clone()
        full[:, 1 : 1 + self.k] = adv
        eos = model.tokenizer.eos_token_id
        texts = [model.tokenizer.decode([i for i in row[1:].tolist() if i != eos]) for row in full]
        return texts, adv

    def judged_embeddings(
        self, model: T2IModel, ids: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        """Embeddings (N, tokens, dim) the success test and the result use: the decoded strings tokenized
        again (``retokenize``) or the exact argmax tokens (``exact``)."""
        with torch.no_grad():
            if self.judge == "retokenize":
                return model.encode_text(texts).float().cpu()
            hard = F.one_hot(p.argmax(-1), p.shape[-1]).float()
            return self._encode(model, ids, hard, allowed).float().cpu()

    def _encode(
        self, model: T2IModel, ids: torch.Tensor, onehot: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Text encoder output with the prefix positions' token embeddings set to ``onehot @ W[allowed]``."""
        table = model.text_encoder.get_input_embeddings()
        prefix = onehot @ table.weight[allowed.to(table.weight.device)].float()  # (N, k, dim)

        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, 1 : 1 + self.k] = prefix.to(out.dtype)
            return out

        handle = table.register_forward_hook(hook)
        try:
            return model.text_encoder(ids)[0]
        finally:
            handle.remove()
