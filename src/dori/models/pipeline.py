"""The one text-to-image model wrapper every dori method uses.

It holds the components of a Stable-Diffusion-family pipeline (UNet, frozen text encoder and tokenizer,
optional VAE, training noise schedule) and exposes the operations the paper's methods are written in:

* ``encode_text``: prompts -> conditional text embeddings ``y`` of shape (batch, tokens, dim), the
  text encoder's last hidden state (what Dori optimizes, Section 3.1);
* ``encode_images`` / ``decode``: images in [0, 1] <-> the model's space ``x0`` (VAE latents times the
  scaling factor, or pixels in [-1, 1] for a pixel-space model such as the miniworld);
* ``training_loss``: the diffusion loss of Eq. (3), per sample, for the scheduler's ``prediction_type``;
* ``predict_noise``: the UNet with classifier-free guidance;
* ``sample``: DDIM sampling from embeddings (not only prompts), one seed per image, batched.

Nothing here changes the weights; interventions live in :mod:`dori.models.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dori.errors import DoriError
from dori.world import World


@dataclass
class SamplingConfig:
    """The paper's evaluation protocol (NeMo's): DDIM 50 steps, guidance 7, eta 0."""

    steps: int = 50
    guidance: float = 7.0
    batch_size: int = 64
    decode_batch_size: int | None = None  # images per VAE decode call (None: the whole batch at once)


@dataclass
class T2IModel:
    """A text-to-image diffusion model: UNet + frozen text encoder (+ VAE) + noise schedule.

    Attributes:
        unet: a ``diffusers.UNet2DConditionModel``.
        text_encoder: a ``transformers`` text model whose last hidden state conditions the UNet.
        tokenizer: the matching tokenizer (padding to ``model_max_length``).
        scheduler: the *training* noise schedule (DDPM, T steps) with its ``prediction_type``.
        vae: a ``diffusers.AutoencoderKL`` or ``None`` for a pixel-space model.
        name: where the model came from (hub id, folder, built-in name).
        info: free-form facts about the model (world metadata, thresholds), recorded in provenance.
        world: the miniworld the model was trained on (:class:`dori.world.World`), or None.
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: DDPMScheduler
    vae: torch.nn.Module | None = None
    name: str = "unnamed"
    info: dict = field(default_factory=dict)
    world: World | None = None
    _null: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape (channels, height, width) of one sample in the model's space."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(size[0]), int(size[1]))

    @property
    def image_size(self) -> int:
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.sample_shape[1] * factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> T2IModel:
        """Move every component (in place) and return self."""
        for module in self.modules().values():
            current = next(module.parameters()).dtype
            module.to(device=device, dtype=None if dtype == current else dtype)
        self._null = None
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def eval(self) -> T2IModel:
        for module in self.modules().values():
            module.eval()
            module.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ text
    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (batch, max_tokens), padded and truncated as SD does."""
        if isinstance(prompts, str):
            raise DoriError("tokenize expects a list of prompts, not one string")
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Prompts -> text embeddings y (batch, tokens, dim): the text encoder's last hidden state."""
        outs = []
        for i in range(0, len(prompts), batch_size):
            ids = self.tokenize(prompts[i : i + batch_size])
            outs.append(self.text_encoder(ids)[0].to(self.dtype))
        if not outs:
            raise DoriError("encode_text got no prompts")
        return torch.cat(outs)

    def null_embedding(self) -> torch.Tensor:
        """The embedding of the empty prompt "" (1, tokens, dim): the unconditional branch of CFG."""
        if self._null is None or self._null.device != self.device or self._null.dtype != self.dtype:
            self._null = self.encode_text([""])
        return self._null

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> x0 in the model's space.

        Latent models use the mean of the VAE posterior times the scaling factor (deterministic, as
        UnlearnDiffAtk's ``img2latent``); pixel-space models map to [-1, 1].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise DoriError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x
        latents = self.vae.encode(x).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in the model's space -> images (B, 3, H, W) in [0, 1], float32 on the CPU."""
        if self.vae is not None:
            x0 = self.vae.decode(x0.to(self.dtype) / self.vae.config.scaling_factor).sample
        return ((x0.float() + 1) / 2).clamp(0, 1).cpu()

    # ------------------------------------------------------------------ diffusion
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0) of the training schedule."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict, following ``prediction_type``."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t.to(x0.device))
        if kind == "sample":
            return x0
        raise DoriError(f"unsupported prediction_type {kind!r}")

    def unet_forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The UNet on inputs cast to its weights' dtype (the fast path keeps x_t and y in float32 and the
        weights in bf16; for a float32 model the casts do nothing)."""
        dtype = self.dtype
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample

    def training_loss(
        self, x0: torch.Tensor, emb: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The diffusion loss ||target - f(x_t, t, y)||^2, averaged over dimensions, one value per sample.

        Args:
            x0: clean samples in the model's space (B, C, H, W).
            emb: conditioning embeddings (B, tokens, dim); gradients flow into it if it requires grad.
            t: integer timesteps (B,) in [0, T).
            noise: Gaussian noise like x0.
        """
        x_t = self.add_noise(x0, noise, t)
        pred = self.unet_forward(x_t, t, emb)
        return (pred.float() - self.target(x0, noise, t).float()).pow(2).flatten(1).mean(1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{0, ..., T-1} (the paper's U(1, T) in 1-based notation), on the model's device."""
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t.to(self.device)

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """UNet output with classifier-free guidance: u + g (c - u); g = 1 or no ``uncond`` means no guidance."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x_t.device)
        if uncond is None or guidance == 1.0:
            return self.unet_forward(x_t, t.expand(x_t.shape[0]) if t.ndim == 0 else t, cond).float()
        if uncond.shape[0] == 1:
            uncond = uncond.expand(cond.shape[0], -1, -1)
        both = self.unet_forward(
            torch.cat([x_t, x_t]),
            (t.expand(x_t.shape[0]) if t.ndim == 0 else t).repeat(2),
            torch.cat([uncond, cond]),
        )
        u, c = both.float().chunk(2)
        return u + guidance * (c - u)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed, drawn on the CPU so results do not depend on device or batching."""
        shape = self.sample_shape
        xs = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(xs)

    def ddim_scheduler(self, steps: int) -> DDIMScheduler:
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        return sched

    @torch.no_grad()
    def sample(
        self,
        embeddings: torch.Tensor,
        seeds: Sequence[int],
        config: SamplingConfig | None = None,
        uncond: torch.Tensor | None = None,
        progress: Any = None,
    ) -> torch.Tensor:
        """Generate one image per (embedding, seed) pair with DDIM and classifier-free guidance.

        Args:
            embeddings: (N, tokens, dim) conditioning, one row per image to generate (repeat rows to get
                several images of one embedding).
            seeds: N seeds; image i starts from ``initial_noise([seeds[i]])``, so an image does not
                depend on what else is in the batch.
            config: steps, guidance and batch size (default: the paper's DDIM 50, guidance 7).
            uncond: the unconditional embedding (default: the null prompt).
            progress: optional callable ``progress(n_done)`` after each batch.

        Returns:
            Images (N, 3, H, W) in [0, 1], float32, on the CPU.
        """
        config = config or SamplingConfig()
        if embeddings.ndim != 3:
            raise DoriError(f"embeddings must be (N, tokens, dim), got {tuple(embeddings.shape)}")
        if len(seeds) != embeddings.shape[0]:
            raise DoriError(f"got {embeddings.shape[0]} embeddings but {len(seeds)} seeds")
        uncond = self.null_embedding() if uncond is None else uncond
        out = []
        for i in range(0, len(seeds), config.batch_size):
            emb = embeddings[i : i + config.batch_size].to(self.device, self.dtype)
            # the DDIM state stays float32 whatever the weights' dtype (only the UNet input is cast)
            x = self.initial_noise(seeds[i : i + config.batch_size]).to(self.device, torch.float32)
            sched = self.ddim_scheduler(config.steps)
            x = x * sched.init_noise_sigma
            for t in sched.timesteps:
                eps = self.predict_noise(
                    sched.scale_model_input(x, t), t.to(self.device), emb, uncond, config.guidance
                )
                x = sched.step(eps, t, x).prev_sample
            step = config.decode_batch_size or x.shape[0]
            out.extend(self.decode(x[j : j + step]) for j in range(0, x.shape[0], step))
            if progress is not None:
                progress(min(i + config.batch_size, len(seeds)))
        return torch.cat(out)

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], config: SamplingConfig | None = None
    ) -> torch.Tensor:
        """Convenience: encode prompts (one per seed) and sample."""
        return self.sample(self.encode_text(prompts), seeds, config)
