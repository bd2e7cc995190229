"""The fast path: one switch for faster Dori searches, sampling and pruning statistics on a GPU.

What it does (``FastPath().apply(model)``; ``--fast`` on the command line):

* **bf16 weights** for the UNet and the VAE on CUDA (the text encoder stays float32: it runs once per
  prompt). The Dori embedding y, its Adam state, x0, the noise, x_t, the loss and the DDIM state stay
  float32; only the networks run in bf16 (see ``T2IModel.unet_forward``).
* **Flash attention** through ``torch.nn.functional.scaled_dot_product_attention``: diffusers' default
  ``AttnProcessor2_0`` already calls it; :func:`attention_processors` reports what the UNet uses.
* **channels_last** memory format for the convolutions: off by default, because on an H100 (torch 2.11,
  diffusers 0.42) the UNet ran 8% (Dori) to 13% (sampling) slower with it than contiguous
  (``benchmarks/results/``); ``channels_last=True`` turns it on.
* Optionally one scaled-dot-product-attention backend (``sdpa_backend``: ``flash``, ``cudnn``,
  ``efficient``); None leaves PyTorch's choice (cuDNN's flash kernel for bf16 on an H100). The
  alternatives have not been timed against it yet (``bench_sd.py --sdpa default flash``).
* **Batch sizes from free memory**: several images' Dori searches share one UNet batch
  (:meth:`FastPath.dori`), and generations run in batches (:meth:`FastPath.sampling`), sized by probing
  the memory one and two units take and extrapolating linearly, inside ``memory_budget_gib`` (default
  32 GiB, so the default audit also fits a 40 GB A100) and the free memory of the card.
* Optionally ``torch.compile`` of the UNet (``compile=True``, applied by :meth:`FastPath.prepare` after
  the batch sizes are probed). On an H100 it made the Dori loop 1.25x and sampling 1.31x faster but took
  190 s to compile the two graphs, so it pays from about 140 prompts on (the 500-prompt audit, not the
  112-VM one); hooks added after compiling (NeMo) cost a recompile. ``benchmarks/bench_sd.py --compile``
  measures both. Through ``dori audit --attack dori`` on an H200 it cost 273 s once (49 s with Inductor's
  on-disk cache warm) and took 8.79 s per item to 6.93: it pays from about 150 items, and the audit says so
  (:func:`compile_hint`); it stays off by default.

On the CPU the defaults are unchanged (float32, contiguous); only the batching applies. Results equal the
float32 ones within bf16 rounding; searches and generations of an item never depend on what else is in
its batch (each item draws its own noise from its own seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from dori.attacks.dori import Dori
from dori.errors import DoriError
from dori.models.pipeline import SamplingConfig, T2IModel

GIB = 1024**3
# `dori audit --attack dori` on one H200 (sd14-random, bf16, 2026-11-29, docs/performance.md): --compile costs
# about 273 s once with a cold Inductor cache (49 s warm) and saves 1.86 s per item (8.79 -> 6.93 s), so it pays
# from about 150 items on.
COMPILE_PAYS_FROM_ITEMS = 150


def compile_hint(n_items: int, device_type: str, compiling: bool) -> str | None:
    """The line an audit prints when ``--compile`` would pay for itself and is off (None otherwise)."""
    if compiling or device_type != "cuda" or n_items < COMPILE_PAYS_FROM_ITEMS:
        return None
    return (
        f"hint: {n_items} items: --compile pays from about {COMPILE_PAYS_FROM_ITEMS} on (measured on an H200: "
        "about 4.5 min once, then 21% less time per item; docs/performance.md)"
    )


def attention_processors(model: T2IModel) -> dict[str, int]:
    """Attention processor class name -> how many attention layers of the UNet use it."""
    counts: dict[str, int] = {}
    for proc in model.unet.attn_processors.values():
        name = type(proc).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def set_sdpa_backend(name: str | None) -> None:
    """Enable only one scaled-dot-product-attention backend process-wide (None: all, PyTorch's order)."""
    if name is not None and name not in SDPA_BACKENDS:
        raise DoriError(f"unknown SDPA backend {name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(name in (None, "flash"))
    cuda.enable_cudnn_sdp(name in (None, "cudnn"))
    cuda.enable_mem_efficient_sdp(name in (None, "efficient"))
    cuda.enable_math_sdp(name in (None, "math"))


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def units_that_fit(per_unit: float, fixed: float, available: float, lo: int = 1, hi: int = 1 << 20) -> int:
    """Largest n in [lo, hi] with fixed + n * per_unit <= available (at least lo)."""
    if per_unit <= 0:
        return hi
    return int(max(lo, min(hi, (available - fixed) // per_unit)))


@dataclass
class FastPath:
    """Settings of the fast path (see module docstring).

    Args:
        dtype: weights dtype of UNet and VAE; None = bf16 on CUDA, float32 on the CPU.
        channels_last: NHWC memory format for convolutions (CUDA only; measured slower, so off).
        sdpa_backend: force one SDPA backend for the whole process (None: PyTorch's choice).
        compile: ``torch.compile`` the UNet (after the batch sizes are probed).
        memory_budget_gib: most GPU memory a search or sampling batch may bring the process to
            (weights included); the free memory of the card bounds it too (None: only that).
        max_dori_items: most images searched in one batch.
        max_sampling_batch: most images generated in one batch.
        decode_batch_size: images per VAE decode call (the decoder's activations are large).
        headroom: safety factor on the probed per-unit memory.
    """

    dtype: torch.dtype | None = None
    channels_last: bool = False
    sdpa_backend: str | None = None
    compile: bool = False
    memory_budget_gib: float | None = 32.0
    max_dori_items: int = 8
    max_sampling_batch: int = 40
    decode_batch_size: int = 8
    headroom: float = 1.15
    _probes: dict = field(default_factory=dict, repr=False)

    def settings(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["dtype"] = str(self.dtype) if self.dtype is not None else None
        return d

    def weights_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    # ------------------------------------------------------------------ model
    def apply(self, model: T2IModel) -> T2IModel:
        """Cast and lay out the model for speed (in place) and return it."""
        device = model.device
        dtype = self.weights_dtype(device)
        for module in (model.unet, model.vae):
            if module is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        if self.channels_last and device.type == "cuda":
            model.unet.to(memory_format=torch.channels_last)
            if model.vae is not None:
                model.vae.to(memory_format=torch.channels_last)
        if self.sdpa_backend is not None:
            set_sdpa_backend(self.sdpa_backend)
        model._null = None
        model.info["fast_path"] = self.settings()
        model.info["attention"] = attention_processors(model)
        self._probes.clear()
        return model

    def compile_unet(self, model: T2IModel, mode: str | None = None) -> None:
        """``torch.compile`` the UNet in place (module names and hooks keep working)."""
        model.unet.compile(mode=mode)

    def prepare(
        self,
        model: T2IModel,
        sampling: SamplingConfig | None = None,
        n_items: int | None = None,
        **dori_settings,
    ) -> tuple[Dori, int, SamplingConfig]:
        """What an audit calls once after :meth:`apply`: the Dori search and items per batch, the sampling
        config, both sized from free memory; then, if ``compile``, the UNet is compiled (after the
        probes, whose batch shapes differ from the real ones)."""
        dori, items = self.dori(model, n_items, **dori_settings)
        config = self.sampling(model, sampling)
        if self.compile and model.device.type == "cuda":
            self.compile_unet(model)
        return dori, items, config

    def tune_audit(
        self, model: T2IModel, sampling: SamplingConfig, dori: Dori, n_items: int
    ) -> tuple[Dori, SamplingConfig, int]:
        """What an audit runs with on the fast path: ``dori`` with its UNet batch set to what fits, the
        sampling config with larger batches (never below the given ones) and the items searched per batch;
        compiles if ``compile`` (:meth:`warm_up` then pays the compilation once, at these shapes)."""
        fast_dori, k, tuned = self.prepare(
            model, sampling, n_items, steps=dori.steps, lr=dori.lr, batch_size=dori.batch_size
        )
        if model.device.type == "cuda":  # the probed items per UNet batch (Dori's 256 rows would not fit)
            dori = replace(dori, max_micro_batch=fast_dori.max_micro_batch)
        if tuned.batch_size > sampling.batch_size:
            sampling = tuned
        elif sampling.decode_batch_size is None:
            sampling = replace(sampling, decode_batch_size=tuned.decode_batch_size)
        return dori, sampling, k

    def warm_up(self, model: T2IModel, dori: Dori, items: int, config: SamplingConfig) -> float:
        """Run one Dori step on ``items`` targets and one sampling step of a full batch, so that a compiled
        UNet compiles here (the shapes of the audit) and not inside the first item; returns the seconds
        spent (the one-time cost of ``compile``)."""
        import time

        start = time.perf_counter()
        x0 = torch.randn(items, *model.sample_shape, generator=torch.Generator().manual_seed(0))
        init = model.null_embedding().float().cpu().expand(items, -1, -1).clone()
        short = Dori(steps=1, batch_size=dori.batch_size, max_micro_batch=dori.max_micro_batch)
        short(model, x0, init, list(range(items)))
        emb = model.null_embedding().expand(config.batch_size, -1, -1)
        one = SamplingConfig(1, config.guidance, config.batch_size, config.decode_batch_size)
        model.sample(emb, list(range(config.batch_size)), one)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ memory
    def available_bytes(self, device: torch.device) -> float:
        """Bytes a workload may bring the process to: min(budget, allocated now + free on the card)."""
        free, _total = torch.cuda.mem_get_info(device)
        # what this process reserved is reusable; keep 1 GiB spare for the CUDA context and fragmentation
        card = torch.cuda.memory_reserved(device) + free - GIB
        return card if self.memory_budget_gib is None else min(self.memory_budget_gib * GIB, card)

    def dori_items(self, model: T2IModel, dori: Dori, n_items: int | None = None) -> int:
        """How many images' searches fit in one batch (probed on the CUDA device; 4 on the CPU)."""
        cap = self.max_dori_items if n_items is None else max(1, min(self.max_dori_items, n_items))
        device = model.device
        if device.type != "cuda":
            return min(cap, 4)
        key = ("dori", dori.batch_size)
        if key not in self._probes:
            x0 = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
            init = model.null_embedding().float().cpu().expand(2, -1, -1).clone()
            probe = Dori(steps=1, batch_size=dori.batch_size, max_micro_batch=2 * dori.batch_size)
            probe(model, x0[:1], init[:1], [0])  # first call: library workspaces, not per item
            one = peak_extra_bytes(lambda: probe(model, x0[:1], init[:1], [0]), device)
            two = peak_extra_bytes(lambda: probe(model, x0, init, [0, 1]), device)
            per = max(two - one, 1)
            self._probes[key] = (per, max(one - per, 0))
        per, fixed = self._probes[key]
        available = self.available_bytes(device) - torch.cuda.memory_allocated(device)
        return units_that_fit(per * self.headroom, fixed, available, hi=cap)

    def dori(self, model: T2IModel, n_items: int | None = None, **settings) -> tuple[Dori, int]:
        """A Dori search configured for the fast path, and the number of items to give it per call.

        ``settings`` are Dori's own (steps, lr, batch_size, ...). The searches of the items in one call
        share each UNet batch; the results do not depend on the grouping.
        """
        dori = Dori(**settings)
        items = self.dori_items(model, dori, n_items)
        dori.max_micro_batch = items * dori.batch_size
        return dori, items

    def sampling(self, model: T2IModel, config: SamplingConfig | None = None) -> SamplingConfig:
        """The sampling config with the largest generation batch that fits (CPU: unchanged)."""
        config = config or SamplingConfig()
        device = model.device
        if device.type != "cuda":
            return config
        dbs = self.decode_batch_size
        key = ("sample", dbs, config.guidance != 1.0)
        if key not in self._probes:
            emb = model.null_embedding().expand(2 * dbs, -1, -1)
            seeds = list(range(2 * dbs))
            probe = SamplingConfig(
                steps=1, guidance=config.guidance, batch_size=2 * dbs, decode_batch_size=dbs
            )
            model.sample(emb[:dbs], seeds[:dbs], probe)  # first call: library workspaces
            one = peak_extra_bytes(lambda: model.sample(emb[:dbs], seeds[:dbs], probe), device)
            two = peak_extra_bytes(lambda: model.sample(emb, seeds, probe), device)
            per = max((two - one) / dbs, 1)
            self._probes[key] = (per, max(one - per * dbs, 0))
        per, fixed = self._probes[key]
        available = self.available_bytes(device) - torch.cuda.memory_allocated(device)
        batch = units_that_fit(per * self.headroom, fixed, available, hi=self.max_sampling_batch)
        return SamplingConfig(
            steps=config.steps, guidance=config.guidance, batch_size=batch, decode_batch_size=min(dbs, batch)
        )


def fast(model: T2IModel, **settings) -> FastPath:
    """Apply the fast path to ``model`` (in place) and return its settings object."""
    path = FastPath(**settings)
    path.apply(model)
    return path
