"""Reference loop vs dori's fast path, side by side in one run (issue 6).

On a GPU it builds the Stable Diffusion v1.4 architecture with random weights (timing does not depend on
weight values) and measures, for each workload, the reference loop (float32, one image at a time,
diffusers defaults) and the fast path (:mod:`dori.fast`):

* ``dori``: one image's Dori search (50 steps, batch 8 (noise, t) draws, Adam lr 0.1);
* ``gen10``: 10 generations of one prompt (DDIM 50, guidance 7, VAE decode);
* ``nemo``: NeMo's detection screening for one prompt, through the library's ``NeMo.detect`` (the noise
  differences of 10 seeds at the second DDIM timestep without guidance, and the token-reduced value-layer
  activations; with ``tau`` above any MS-SSIM no prompt is flagged, so the data-dependent neuron search,
  whose length depends on the weights, is left out); the reference is the same computation written as a
  plain loop, one seed at a time, with a hook on the 7 cross-attention value layers;
* ``wanda``: Wanda's statistics for one prompt through the library's ``Wanda.squared_norms`` (10 UNet calls
  with guidance, input-norm hooks on the 16 ``ff.net.2`` layers); the reference is a plain loop doing the
  same, one prompt at a time;
* ``finetune``: one full fine-tuning step (AdamW on the UNet, 8 + 8 samples).

It prints per-item seconds, throughput, achieved TFLOP/s (FLOPs counted once per workload with
``torch.utils.flop_counter.FlopCounterMode``), the share of the bf16 matmul peak measured in the same run
(an 8192^3 product), peak memory, fast/reference ratios, and the projected time of the 500-prompt and
112-VM audits. Times are medians of repeats timed with CUDA events after warm-up. The JSON goes to
``--out`` (rewritten after every section, so a run cut short keeps what it measured).

    python benchmarks/bench_sd.py --out benchmarks/results/sd14-h100.json [--compile]
    python benchmarks/bench_sd.py --device cpu --model miniworld --out /tmp/miniworld-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dori.attacks.dori import Dori, initial_embeddings
from dori.fast import GIB, FastPath, attention_processors
from dori.models.hooks import record_activations
from dori.models.layers import ffn_layers, get_module, value_layers
from dori.models.pipeline import SamplingConfig, T2IModel

PROMPTS = [
    "a painting of a lighthouse at dusk",
    "portrait of a woman in a red coat",
    "the living room of a modern house",
    "a cat sleeping on a wooden chair",
    "mountains over a lake, oil on canvas",
    "a vintage poster of a bicycle",
    "close-up of a sunflower in the rain",
    "an old map of a harbour town",
]
UNITS = {
    "dori": "searches/s",
    "gen10": "prompts/s",
    "nemo": "prompts/s",
    "wanda": "prompts/s",
    "finetune": "steps/s",
}


# ---------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: Callable[[], object] | None):
    """Median wall time of ``fn`` over ``repeats`` after one warm-up call; peak memory of the repeats."""
    (warmup or fn)()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # peak reserved then belongs to this workload, not to earlier ones
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times]}
    if device.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return out


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, n: int = 0, repeats: int = 20) -> dict:
    """Measured matmul rate: 8192^3 bf16 on CUDA (rotating 3 random input pairs), 2048^3 float32 on CPU."""
    if device.type == "cuda":
        n, dtype = n or 8192, torch.bfloat16
    else:
        n, dtype, repeats = n or 2048, torch.float32, 5
    pairs = [
        (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
        for _ in range(3)
    ]
    for a, b in pairs:
        a @ b
    state = {"i": 0}

    def one():
        a, b = pairs[state["i"] % 3]
        state["i"] += 1
        return a @ b

    res = timed(one, device, repeats, None)
    return {
        "n": n,
        "dtype": str(dtype),
        "median_s": res["median_s"],
        "tflops": 2 * n**3 / res["median_s"] / 1e12,
    }


def attention_kernels(model: T2IModel) -> list[str]:
    """Names of the CUDA kernels of one UNet call that look like attention (which SDPA backend ran)."""
    x = torch.randn(2, *model.sample_shape, device=model.device)
    emb = model.null_embedding().expand(2, -1, -1)
    t = torch.tensor([500, 500], device=model.device)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.unet_forward(x, t, emb)
        torch.cuda.synchronize(model.device)
    words = ("flash", "fmha", "attention", "attn", "softmax")
    names = {e.name for e in prof.events() if any(w in e.name.lower() for w in words)}
    return sorted(n[:120] for n in names)


# ---------------------------------------------------------------------- the model
def build(spec: str, device: torch.device) -> T2IModel:
    if spec in ("sd14-random", "sd2-random"):
        from diffusers import DDPMScheduler

        from dori.models.builders import build_sd_random

        version = {"sd14-random": "1.4", "sd2-random": "2-base"}[spec]
        # initialise the weights directly on the device (fast); keep the schedule's tensors on the CPU
        with torch.device(device):
            model = build_sd_random(version)
        model.scheduler = DDPMScheduler.from_config(model.scheduler.config)
        return model.to(device).eval()
    from dori.models.loading import load_model

    return load_model(spec, device=device)


# ---------------------------------------------------------------------- workloads
def targets(model: T2IModel, k: int, seed: int = 0) -> torch.Tensor:
    """k random x0 in the model's space (random weights: the values do not matter for timing)."""
    return torch.randn(k, *model.sample_shape, generator=torch.Generator().manual_seed(seed))


def dori_work(model: T2IModel, dori: Dori, k: int) -> Callable[[], object]:
    x0 = targets(model, k)
    init = initial_embeddings(model, (PROMPTS * k)[:k])
    seeds = list(range(k))
    return lambda: dori(model, x0, init, seeds)


def gen_work(model: T2IModel, prompts: int, per_prompt: int, config: SamplingConfig) -> Callable[[], object]:
    emb = model.encode_text((PROMPTS * prompts)[:prompts]).repeat_interleave(per_prompt, 0)
    seeds = list(range(prompts * per_prompt))
    return lambda: model.sample(emb, seeds, config)


def nemo_reference_work(model: T2IModel, seeds: int) -> Callable[[], object]:
    """NeMo's screening of one prompt as a plain loop, one seed at a time: the UNet's noise prediction at the
    second DDIM timestep (no guidance) with the value-layer activations (mean |a| over tokens) recorded."""
    layers = value_layers(model.unet)
    emb = model.encode_text(PROMPTS[:1])
    noise = torch.randn((seeds, *model.sample_shape), generator=torch.Generator().manual_seed(1))
    sched = model.ddim_scheduler(50)
    t = sched.timesteps[1].to(model.device)

    def reduce(a: torch.Tensor) -> torch.Tensor:
        return a.float().abs().mean(1)

    def run():
        out = []
        for s in range(seeds):
            x = noise[s : s + 1].to(model.device) * sched.init_noise_sigma
            with record_activations(model.unet, layers, reduce=reduce) as acts:
                eps = model.predict_noise(x, t, emb)
            out.append(((eps.float() - x).cpu(), acts))
        return out

    return run


def nemo_library_work(model: T2IModel, prompts: int, seeds: int) -> Callable[[], object]:
    """``NeMo.detect`` on ``prompts`` prompts in one call (rows batched by the library): the screening only,
    since ``tau`` = 2 lies above any MS-SSIM, so no prompt is flagged (see module docstring)."""
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.nemo_calibration import Calibration

    layers = value_layers(model.unet)
    dims = {name: get_module(model.unet, name).out_features for name in layers}
    calib = Calibration(
        {k: torch.zeros(d) for k, d in dims.items()}, {k: torch.ones(d) for k, d in dims.items()}, 0.0, 0.0
    )
    nemo = NeMo(tau=2.0, n_seeds=seeds, batch_size=prompts * seeds)
    emb = model.encode_text((PROMPTS * prompts)[:prompts])

    def run():
        found = nemo.detect(model, emb, calib)
        if any(item.memorized for item in found):
            raise RuntimeError("NeMo flagged a prompt at tau 2: the screening-only timing would be wrong")
        return found

    return run


def wanda_reference_work(model: T2IModel, calls: int) -> Callable[[], object]:
    """Wanda's statistics of one prompt as a plain loop: per-input-feature ||X_j||^2 of every ff.net.2 (rows
    normalized) over the first DDIM calls, with CFG (uncond and cond rows in one UNet batch)."""
    layers = ffn_layers(model.unet)
    cond = model.encode_text(PROMPTS[:1])
    noise = model.initial_noise([0])

    def reduce(a: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(a.float().reshape(a.shape[0], -1, a.shape[-1]), dim=-1)
        return a.pow(2).sum(1)

    def run():
        sched = model.ddim_scheduler(50)
        x = noise.to(model.device) * sched.init_noise_sigma
        acc: dict[str, torch.Tensor] = {}
        for t in sched.timesteps[:calls]:
            with record_activations(model.unet, layers, inputs=True, reduce=reduce) as acts:
                x_in = sched.scale_model_input(x, t)
                eps = model.predict_noise(x_in, t.to(model.device), cond, model.null_embedding(), 7.5)
            for name, vals in acts.items():
                acc[name] = acc.get(name, 0) + vals[0].sum(0).cpu()
            x = sched.step(eps.float(), t, x).prev_sample
        return acc

    return run


def wanda_library_work(model: T2IModel, prompts: int, calls: int) -> Callable[[], object]:
    """``Wanda.squared_norms`` on ``prompts`` prompts in one batch (the library's statistics)."""
    from dori.mitigations.wanda import Wanda

    wanda = Wanda(timesteps=calls, batch_size=prompts)
    cond = model.encode_text((PROMPTS * prompts)[:prompts])
    return lambda: wanda.squared_norms(model, cond)


def finetune_work(
    model: T2IModel, micro_batches: list[int], autocast: torch.dtype | None, fused: bool
) -> tuple[Callable[[], object], Callable[[], None]]:
    """One AdamW step on the UNet over 8 + 8 samples (adversarial embeddings + retain prompts).

    Returns the step and a cleanup that drops the optimizer and freezes the UNet again.
    """
    unet = model.unet
    unet.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=fused or None)
    g = torch.Generator().manual_seed(0)
    n = sum(micro_batches)
    x0 = torch.randn(n, *model.sample_shape, generator=g).to(model.device)
    emb_adv = torch.randn(n // 2, model.max_tokens, model.null_embedding().shape[-1], generator=g)
    emb = torch.cat([emb_adv.to(model.device), model.encode_text((PROMPTS * n)[: n - n // 2]).float()])
    noise = torch.randn(x0.shape, generator=g).to(model.device)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g).to(model.device)
    ctx = (
        (lambda: torch.autocast(model.device.type, dtype=autocast))
        if autocast is not None
        else contextlib.nullcontext
    )

    def step():
        opt.zero_grad(set_to_none=True)
        lo = 0
        for mb in micro_batches:
            sl = slice(lo, lo + mb)
            with ctx():
                loss = model.training_loss(x0[sl], emb[sl], t[sl], noise[sl]).mean() * (mb / n)
            loss.backward()
            lo += mb
        opt.step()

    def cleanup():
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        unet.eval()
        unet.requires_grad_(False)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()

    return step, cleanup


# ---------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.time()
        self.out = Path(args.out) if args.out else None
        self.data: dict = {"workloads": {}, "ablations": [], "notes": []}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.out)

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def record(
        self, workload: str, variant: str, res: dict, items: int, settings: dict | None = None
    ) -> dict:
        res = dict(res, items_per_call=items, per_item_s=res["median_s"] / items, settings=settings or {})
        res["throughput"] = items / res["median_s"]
        res["unit"] = UNITS[workload]
        self.data["workloads"].setdefault(workload, {})[variant] = res
        self.fill_rates(workload)
        self.save()
        self.log(f"{workload:9s} {variant:13s} {res['per_item_s']:.4f} s/item ({items} per call)")
        return res

    def fill_rates(self, workload: str) -> None:
        w = self.data["workloads"].get(workload, {})
        flops = w.get("flops_per_item")
        peak = self.data.get("peak", {}).get("tflops")
        for name, v in w.items():
            if not isinstance(v, dict) or "per_item_s" not in v:
                continue
            if flops:
                v["tflops"] = flops / v["per_item_s"] / 1e12
                if peak:
                    v["share_of_peak"] = v["tflops"] / peak
            if name != "reference" and "reference" in w:
                v["ratio_to_reference"] = v["per_item_s"] / w["reference"]["per_item_s"]

    def guard(self, name: str, fn: Callable[[], object]) -> object:
        """Run an optional section; on an error note it and go on with the rest."""
        try:
            return fn()
        except Exception as err:
            import traceback

            self.data["notes"].append(f"{name} failed: {type(err).__name__}: {err}"[:1500])
            self.data["notes"].append(traceback.format_exc()[-3000:])
            self.log(f"{name} failed: {type(err).__name__}: {str(err)[:300]}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()
            return None

    def flops(self, workload: str, fn: Callable[[], object], items: int, scale: int = 1) -> None:
        self.set_flops(workload, count_flops(fn) * scale / items)

    def set_flops(self, workload: str, per_item: float) -> None:
        self.data["workloads"].setdefault(workload, {})["flops_per_item"] = per_item
        self.fill_rates(workload)
        self.save()


def machine_info(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {
        "device": str(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            gpu_memory_gib=p.total_memory / GIB,
            multiprocessors=p.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            gpus_visible=torch.cuda.device_count(),
        )
    return info


def run_reference(b: Bench, model: T2IModel) -> None:
    a, dev = b.args, b.device
    b.log("reference (float32, one image at a time, diffusers defaults)")
    dori = Dori(steps=a.steps, batch_size=8)
    res = timed(dori_work(model, dori, 1), dev, a.ref_repeats, dori_work(model, Dori(steps=2), 1))
    b.record("dori", "reference", res, 1, {"steps": a.steps, "batch_size": 8})
    one = SamplingConfig(steps=a.sample_steps, guidance=7.0, batch_size=1)
    warm = gen_work(model, 1, 1, SamplingConfig(steps=2, batch_size=1))
    res = timed(gen_work(model, 1, a.gens, one), dev, a.ref_repeats, warm)
    b.record("gen10", "reference", res, 1, {"images": a.gens, "batch_size": 1, "steps": a.sample_steps})
    run_hooks_reference(b, model)
    step, cleanup = finetune_work(model, [8, 8], None, False)
    res = timed(step, dev, a.ref_repeats, None)
    b.record(
        "finetune", "reference", res, 1, {"micro_batches": [8, 8], "dtype": "float32", "adamw": "foreach"}
    )
    cleanup()


def run_fast(b: Bench, model: T2IModel, fp: FastPath, variant: str = "fast") -> dict:
    """The fast path on a model that ``fp.apply`` prepared. Returns the batch sizes it chose."""
    a, dev = b.args, b.device
    dori, k = fp.dori(model, n_items=a.items or None, steps=a.steps, batch_size=8)
    if a.items:
        k, dori.max_micro_batch = a.items, a.items * 8
    work = dori_work(model, dori, k)
    warm = dori_work(model, Dori(steps=2, batch_size=8, max_micro_batch=k * 8), k)
    res = timed(work, dev, a.fast_repeats, warm)
    b.record("dori", variant, res, k, {"items_per_batch": k, "steps": a.steps, **fp.settings()})
    if "flops_per_item" not in b.data["workloads"]["dori"]:
        # every step does the same work: count one step and scale (exact)
        b.flops("dori", dori_work(model, Dori(steps=1, batch_size=8, max_micro_batch=k * 8), k), k, a.steps)

    cfg = fp.sampling(model, SamplingConfig(steps=a.sample_steps, guidance=7.0))
    if a.gen_batch:
        cfg.batch_size = a.gen_batch
    prompts = max(1, cfg.batch_size // a.gens)
    cfg.batch_size = min(cfg.batch_size, prompts * a.gens)
    work = gen_work(model, prompts, a.gens, cfg)
    warm = gen_work(model, prompts, a.gens, SamplingConfig(2, 7.0, cfg.batch_size, cfg.decode_batch_size))
    res = timed(work, dev, a.fast_repeats, warm)
    b.record(
        "gen10",
        variant,
        res,
        prompts,
        {"batch_size": cfg.batch_size, "decode_batch_size": cfg.decode_batch_size},
    )
    if "flops_per_item" not in b.data["workloads"]["gen10"]:
        # F(steps) = F(1) + (steps - 1) (F(2) - F(1)): every DDIM step does the same work (exact)
        one = count_flops(
            gen_work(model, prompts, a.gens, SamplingConfig(1, 7.0, cfg.batch_size, cfg.decode_batch_size))
        )
        two = count_flops(
            gen_work(model, prompts, a.gens, SamplingConfig(2, 7.0, cfg.batch_size, cfg.decode_batch_size))
        )
        b.set_flops("gen10", (one + (a.sample_steps - 1) * (two - one)) / prompts)
    return {"dori_items": k, "gen_batch": cfg.batch_size, "gen_prompts": prompts}


def run_hooks_reference(b: Bench, model: T2IModel) -> None:
    """float32: the plain loops (one seed / one prompt at a time) and the library's NeMo and Wanda on one
    prompt, side by side on the same model."""
    a, dev = b.args, b.device
    res = timed(nemo_reference_work(model, a.nemo_seeds), dev, a.fast_repeats, None)
    b.record("nemo", "reference", res, 1, {"seeds": a.nemo_seeds, "batch_size": 1, "code": "plain loop"})
    work = nemo_library_work(model, 1, a.nemo_seeds)
    res = timed(work, dev, a.fast_repeats, None)
    b.record("nemo", "library-fp32", res, 1, {"seeds": a.nemo_seeds, "code": "NeMo.detect"})
    b.flops("nemo", work, 1)
    res = timed(wanda_reference_work(model, a.wanda_calls), dev, a.fast_repeats, None)
    b.record("wanda", "reference", res, 1, {"calls": a.wanda_calls, "batch_size": 2, "code": "plain loop"})
    work = wanda_library_work(model, 1, a.wanda_calls)
    res = timed(work, dev, a.fast_repeats, None)
    b.record("wanda", "library-fp32", res, 1, {"calls": a.wanda_calls, "code": "Wanda.squared_norms"})
    b.flops("wanda", work, 1)


def run_hooks_only(b: Bench, model: T2IModel) -> int:
    """``--hooks-only``: NeMo and Wanda, float32 (plain loop and library) then the library on the fast path."""
    run_hooks_reference(b, model)
    fp = FastPath(memory_budget_gib=b.args.memory_budget_gib)
    fp.apply(model)
    b.data["fast_path"] = fp.settings()
    gen_batch = b.args.gen_batch or fp.sampling(model, SamplingConfig(steps=b.args.sample_steps)).batch_size
    if b.device.type != "cuda" and not b.args.gen_batch:
        gen_batch = 40  # the CPU has no memory probe; the H100 probe's choice
    b.data["chosen"] = {"gen_batch": gen_batch}
    run_fast_hooks(b, model, gen_batch)
    b.data["wall_s"] = b.elapsed()
    b.save()
    print_table(b)
    return 0


def run_fast_hooks(b: Bench, model: T2IModel, gen_batch: int) -> None:
    """The library's NeMo and Wanda on the fast path, several prompts per batch (as many UNet rows as a
    generation batch)."""
    a, dev = b.args, b.device
    prompts = max(1, 2 * gen_batch // a.nemo_seeds)
    work = nemo_library_work(model, prompts, a.nemo_seeds)
    settings = {"prompts_per_batch": prompts, "code": "NeMo.detect"}
    b.record("nemo", "fast", timed(work, dev, a.fast_repeats, None), prompts, settings)
    if "flops_per_item" not in b.data["workloads"]["nemo"]:
        b.flops("nemo", work, prompts)
    prompts = max(1, gen_batch)
    work = wanda_library_work(model, prompts, a.wanda_calls)
    settings = {"prompts_per_batch": prompts, "code": "Wanda.squared_norms"}
    b.record("wanda", "fast", timed(work, dev, a.fast_repeats, None), prompts, settings)
    if "flops_per_item" not in b.data["workloads"]["wanda"]:
        b.flops("wanda", work, prompts)


def run_ablations(b: Bench, model: T2IModel, fp: FastPath) -> None:
    """Short runs (10 steps) of the choices the fast path makes: items per batch, generation batch size,
    channels_last and cuDNN autotuning. Per-step rates scale to the 50-step workloads."""
    a, dev = b.args, b.device
    steps = min(10, a.steps)

    def add(what: str, value, res: dict, per: int, unit_steps: int):
        row = {
            "what": what,
            "value": value,
            "median_s": res["median_s"],
            "per_item_per_step_s": res["median_s"] / per / unit_steps,
            "peak_alloc_gib": res.get("peak_alloc_gib"),
        }
        b.data["ablations"].append(row)
        b.save()
        b.log(f"ablation {what}={value}: {row['per_item_per_step_s'] * 1e3:.2f} ms per item-step")

    free = torch.cuda.mem_get_info(dev)[0] / GIB if dev.type == "cuda" else 1e9
    per_item = fp._probes.get(("dori", 8), (0, 0))[0] / GIB
    for k in a.ablate_items:
        if per_item and k * per_item * 1.2 > free:
            b.data["notes"].append(f"ablation dori items={k} skipped: would not fit")
            continue
        d = Dori(steps=steps, batch_size=8, max_micro_batch=k * 8)
        add("dori_items", k, timed(dori_work(model, d, k), dev, 2, None), k, steps)
    for bs in a.ablate_gen_batch:
        cfg = SamplingConfig(steps=steps, guidance=7.0, batch_size=bs, decode_batch_size=fp.decode_batch_size)
        add("gen_batch", bs, timed(gen_work(model, bs, 1, cfg), dev, 2, None), bs, steps)
    if dev.type == "cuda":
        k = b.data["chosen"]["dori_items"]
        bs = b.data["chosen"]["gen_batch"]
        d = Dori(steps=steps, batch_size=8, max_micro_batch=k * 8)
        cfg = SamplingConfig(steps=steps, guidance=7.0, batch_size=bs, decode_batch_size=fp.decode_batch_size)
        combos = [
            (torch.contiguous_format, False),
            (torch.channels_last, False),
            (torch.channels_last, True),
        ]
        for fmt, bench_mode in combos:
            torch.backends.cudnn.benchmark = bench_mode
            model.unet.to(memory_format=fmt)
            if model.vae is not None:
                model.vae.to(memory_format=fmt)
            layout = "channels_last" if fmt == torch.channels_last else "contiguous"
            tag = f"{layout}+cudnn_benchmark={bench_mode}"
            add("dori_layout", tag, timed(dori_work(model, d, k), dev, 2, None), k, steps)
            add("gen_layout", tag, timed(gen_work(model, bs, 1, cfg), dev, 2, None), bs, steps)
        torch.backends.cudnn.benchmark = False
        if model.vae is not None:
            model.vae.to(memory_format=torch.channels_last if fp.channels_last else torch.contiguous_format)
        model.unet.to(memory_format=torch.channels_last if fp.channels_last else torch.contiguous_format)


def run_sdpa(b: Bench, model: T2IModel, fp: FastPath, backends: list[str]) -> None:
    """Short runs (10 steps) of the Dori and sampling loops under each SDPA backend (sampling without the VAE
    decode, whose 512-dim attention head some backends do not take)."""
    from dori.fast import set_sdpa_backend

    dev, steps = b.device, min(10, b.args.steps)
    k, bs = b.data["chosen"]["dori_items"], b.data["chosen"]["gen_batch"]
    d = Dori(steps=steps, batch_size=8, max_micro_batch=k * 8)
    cfg = SamplingConfig(steps=steps, guidance=7.0, batch_size=bs, decode_batch_size=fp.decode_batch_size)
    try:
        # the works encode their prompts now, with every backend on (the float32 text encoder needs one)
        works = (("dori_sdpa", dori_work(model, d, k), k), ("gen_sdpa", gen_work(model, bs, 1, cfg), bs))
        model.null_embedding()  # cached now: the sampler would otherwise encode "" under the one backend
        model.decode = lambda x0: x0
        for name in backends:
            set_sdpa_backend(None if name == "default" else name)
            for what, work, per in works:
                res = timed(work, dev, 2, None)
                row = {"what": what, "value": name, "median_s": res["median_s"]}
                row["per_item_per_step_s"] = res["median_s"] / per / steps
                b.data["ablations"].append(row)
                b.save()
                b.log(f"ablation {what}={name}: {row['per_item_per_step_s'] * 1e3:.2f} ms per item-step")
    finally:
        set_sdpa_backend(fp.sdpa_backend)
        model.__dict__.pop("decode", None)


KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad", "fprop")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_", "sm80_")),
    ("normalization", ("norm", "welford")),
    ("layout/copy", ("copy", "transpose", "nchw", "nhwc", "cat", "memcpy", "memset", "fill")),
    ("fused (triton)", ("triton",)),
    ("elementwise/reduction", ("elementwise", "vectorized", "reduce", "unrolled", "activation")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def run_profile(b: Bench, model: T2IModel, label: str) -> None:
    """CUDA kernel time of a few Dori and sampling steps by kind (attention, GEMM, convolution, ...)."""
    from torch.profiler import ProfilerActivity, profile

    chosen, dev = b.data["chosen"], b.device
    k, bs = chosen["dori_items"], chosen["gen_batch"]
    works = {
        "dori": dori_work(model, Dori(steps=3, batch_size=8, max_micro_batch=k * 8), k),
        "gen10": gen_work(model, max(1, bs // 10), 10, SamplingConfig(3, 7.0, bs, 8)),
    }
    out = b.data.setdefault("profile", {})
    for what, work in works.items():
        work()  # warm
        sync(dev)
        model.decode = lambda x0: x0  # the UNet loop only: 3 steps would be dominated by the VAE decode
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                work()
                sync(dev)
        finally:
            del model.decode
        per_kernel: dict[str, float] = {}
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if t > 0:
                per_kernel[ev.key] = per_kernel.get(ev.key, 0.0) + t / 1e6
        total = sum(per_kernel.values()) or 1.0
        kinds: dict[str, float] = {}
        for name, t in per_kernel.items():
            kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + t
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
        out[f"{what}/{label}"] = {
            "kernel_s": total,
            "share_by_kind": {kk: v / total for kk, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "s": t, "share": t / total} for n, t in top],
        }
        b.save()
        shares = ", ".join(f"{kk} {v:.0%}" for kk, v in out[f"{what}/{label}"]["share_by_kind"].items())
        b.log(f"profile {what} ({label}): kernel time {total:.3f} s; {shares}")


def run_compiled(b: Bench, model: T2IModel, fp: FastPath) -> None:
    """torch.compile of the UNet: one-off compile time and steady state, for the Dori and sampling loops."""
    a, dev = b.args, b.device
    chosen = b.data["chosen"]
    k, bs = chosen["dori_items"], chosen["gen_batch"]
    if a.compile_sdpa == "best":  # the fastest Dori loop of the --sdpa ablation
        rows = [r for r in b.data["ablations"] if r["what"] == "dori_sdpa"]
        a.compile_sdpa = min(rows, key=lambda r: r["per_item_per_step_s"])["value"] if rows else "default"
    if a.compile_sdpa:
        fp.sdpa_backend = None if a.compile_sdpa == "default" else a.compile_sdpa
        from dori.fast import set_sdpa_backend

        set_sdpa_backend(fp.sdpa_backend)
    if a.compile_channels_last:
        fp.channels_last = True
        for module in (model.unet, model.vae):
            module.to(memory_format=torch.channels_last)
    fp.compile_unet(model, mode=a.compile_mode)
    comp: dict = {}
    b.data["compile_settings"] = {
        "sdpa_backend": a.compile_sdpa or "default",
        "mode": a.compile_mode or "default",
        "channels_last": bool(a.compile_channels_last),
    }
    dori = Dori(steps=a.steps, batch_size=8, max_micro_batch=k * 8)
    t0 = time.time()
    dori_work(model, Dori(steps=1, batch_size=8, max_micro_batch=k * 8), k)()
    sync(dev)
    comp["dori_first_call_s"] = time.time() - t0
    b.data["compile"] = comp
    b.save()
    b.log(f"compiled Dori graph in {comp['dori_first_call_s']:.1f} s")
    warm = dori_work(model, Dori(steps=2, batch_size=8, max_micro_batch=k * 8), k)
    res = timed(dori_work(model, dori, k), dev, a.fast_repeats, warm)
    b.record("dori", "fast+compile", res, k, {"items_per_batch": k})
    prompts = max(1, bs // a.gens)
    cfg = SamplingConfig(a.sample_steps, 7.0, prompts * a.gens, min(fp.decode_batch_size, prompts * a.gens))
    t0 = time.time()
    gen_work(model, prompts, a.gens, SamplingConfig(1, 7.0, cfg.batch_size, cfg.decode_batch_size))()
    sync(dev)
    comp["sampling_first_call_s"] = time.time() - t0
    b.save()
    b.log(f"compiled sampling graph in {comp['sampling_first_call_s']:.1f} s")
    warm = gen_work(model, prompts, a.gens, SamplingConfig(2, 7.0, cfg.batch_size, cfg.decode_batch_size))
    res = timed(gen_work(model, prompts, a.gens, cfg), dev, a.fast_repeats, warm)
    b.record("gen10", "fast+compile", res, prompts, {"batch_size": cfg.batch_size})


def projections(b: Bench) -> None:
    w = b.data["workloads"]
    proj: dict = {}
    for variant in ("reference", "fast", "fast+compile"):
        if variant not in w.get("dori", {}) or variant not in w.get("gen10", {}):
            continue
        d, g = w["dori"][variant]["per_item_s"], w["gen10"][variant]["per_item_s"]
        per = {"dori+gen10": d + g, "dori+gen10+prompt_gen10": d + 2 * g}
        proj[variant] = {
            f"{n}_prompts_{kind}_min": n * s / 60 for n in b.args.audit_sizes for kind, s in per.items()
        }
        if variant == "fast+compile":
            one_off = sum(b.data.get("compile", {}).values()) / 60
            for key in list(proj[variant]):
                proj[variant][key] += one_off
    b.data["projections"] = proj


def check_targets(b: Bench) -> None:
    """Issue 6's targets (H100, SD v1.4 architecture): only meaningful on a GPU."""
    if b.device.type != "cuda":
        return
    w, p = b.data["workloads"], b.data.get("projections", {})
    best = "fast+compile" if "fast+compile" in w.get("dori", {}) else "fast"
    if best not in w.get("dori", {}) or best not in w.get("gen10", {}):
        return
    dori, gen = w["dori"][best], w["gen10"][best]
    mem = max(w["dori"]["fast"].get("peak_reserved_gib", 0), w["gen10"]["fast"].get("peak_reserved_gib", 0))
    b.data["targets"] = {
        "variant": best,
        "dori_s_per_image<=1.7": [dori["per_item_s"], dori["per_item_s"] <= 1.7],
        "gen10_s<=2.0": [gen["per_item_s"], gen["per_item_s"] <= 2.0],
        "audit500_min<=30": [
            p[best]["500_prompts_dori+gen10_min"],
            p[best]["500_prompts_dori+gen10_min"] <= 30,
        ],
        "dori_share_of_peak>=0.40": [dori.get("share_of_peak"), (dori.get("share_of_peak") or 0) >= 0.4],
        "gen10_share_of_peak>=0.40": [gen.get("share_of_peak"), (gen.get("share_of_peak") or 0) >= 0.4],
        "default_audit_peak_GB<38": [mem * GIB / 1e9, mem * GIB / 1e9 < 38],
    }


def print_table(b: Bench) -> None:
    w = b.data["workloads"]
    print("\nworkload  variant        s/item   throughput        TFLOP/s  %peak  peak GiB  fast/ref")
    for name in ("dori", "gen10", "nemo", "wanda", "finetune"):
        for variant, v in w.get(name, {}).items():
            if not isinstance(v, dict):
                continue
            tf = v.get("tflops")
            share = v.get("share_of_peak")
            print(
                f"{name:9s} {variant:13s} {v['per_item_s']:8.3f}  {v['throughput']:8.3f} {v['unit']:10s}"
                f" {tf if tf is not None else float('nan'):7.3g}  {100 * (share or float('nan')):5.1f}"
                f"  {v.get('peak_alloc_gib', float('nan')):8.2f}  {v.get('ratio_to_reference', float('nan')):.3f}"
            )
    for variant, proj in b.data.get("projections", {}).items():
        print(f"projected audit ({variant}): " + ", ".join(f"{k} {v:.1f}" for k, v in proj.items()))
    if "peak" in b.data:
        pk = b.data["peak"]
        print(f"measured matmul peak: {pk['tflops']:.4g} TFLOP/s ({pk['n']}^3 {pk['dtype']})")
    for k, v in b.data.get("targets", {}).items():
        print(f"target {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="default: sd14-random on CUDA, miniworld on the CPU")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--steps", type=int, default=50, help="Dori steps")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--gens", type=int, default=10, help="generations per prompt")
    p.add_argument("--nemo-seeds", type=int, default=10)
    p.add_argument("--wanda-calls", type=int, default=10)
    p.add_argument("--ref-repeats", type=int, default=3)
    p.add_argument("--fast-repeats", type=int, default=5)
    p.add_argument("--items", type=int, default=0, help="Dori items per batch (0: from free memory)")
    p.add_argument("--gen-batch", type=int, default=0, help="generation batch (0: from free memory)")
    p.add_argument("--memory-budget-gib", type=float, default=32.0)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument(
        "--hooks-only", action="store_true", help="only the NeMo and Wanda rows (plain loops and the library)"
    )
    p.add_argument("--ablations", action="store_true", help="short runs of each fast-path choice")
    p.add_argument("--ablate-items", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--ablate-gen-batch", type=int, nargs="*", default=[10, 20, 40, 80])
    p.add_argument("--sdpa", nargs="*", default=[], help="SDPA backends to compare (default, flash, ...)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: Inductor's default)")
    p.add_argument(
        "--compile-sdpa",
        default=None,
        help="SDPA backend while compiled (default, flash, ..., best: fastest Dori of --sdpa)",
    )
    p.add_argument("--compile-channels-last", action="store_true", help="channels_last while compiled")
    p.add_argument("--profile", action="store_true", help="CUDA kernel time by kind, eager and compiled")
    p.add_argument("--time-budget", type=float, default=1e9, help="skip optional sections after this many s")
    p.add_argument("--peak-size", type=int, default=0, help="matmul size of the peak (0: 8192 GPU, 2048 CPU)")
    p.add_argument("--audit-sizes", type=int, nargs="*", default=[500, 112])
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "sd14-random" if args.device.startswith("cuda") else "miniworld"
    b = Bench(args)
    dev = b.device
    b.data["machine"] = machine_info(dev)
    b.data["args"] = vars(args)
    b.log(f"machine: {b.data['machine'].get('gpu', platform.processor() or 'cpu')}")
    b.data["peak"] = matmul_peak(dev, args.peak_size)
    b.log(f"matmul peak {b.data['peak']['tflops']:.4g} TFLOP/s")
    model = build(args.model, dev)
    b.data["model"] = {
        "name": model.name,
        "unet_params_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
        "sample_shape": model.sample_shape,
        "attention_reference": attention_processors(model),
    }
    b.log(f"built {model.name} on {dev}; attention: {attention_processors(model)}")

    if dev.type == "cuda":
        b.data["model"]["attention_kernels_reference"] = b.guard("kernels", lambda: attention_kernels(model))
    if args.hooks_only:  # NeMo and Wanda alone: plain loops and the library, float32 then the fast path
        return run_hooks_only(b, model)
    if not args.skip_reference:
        run_reference(b, model)
    fp = FastPath(memory_budget_gib=args.memory_budget_gib)
    cuda = dev.type == "cuda"
    # fine-tuning keeps float32 master weights: autocast bf16, fused AdamW, one pass of 16
    if cuda and fp.channels_last:
        model.unet.to(memory_format=torch.channels_last)

    def fast_finetune():
        step, cleanup = finetune_work(model, [16], torch.bfloat16 if cuda else None, cuda)
        try:
            res = timed(step, dev, args.ref_repeats, None)
            settings = {"micro_batches": [16], "autocast": "bf16" if cuda else None, "fused_adamw": cuda}
            b.record("finetune", "fast", res, 1, settings)
            b.flops("finetune", step, 1)
        finally:
            cleanup()

    b.guard("fast finetune", fast_finetune)
    fp.apply(model)
    b.data["model"]["attention_fast"] = attention_processors(model)
    if cuda:
        b.data["model"]["attention_kernels_fast"] = b.guard("kernels", lambda: attention_kernels(model))
        b.log(f"attention kernels (fast): {b.data['model']['attention_kernels_fast']}")
    b.data["fast_path"] = fp.settings()
    b.data["chosen"] = run_fast(b, model, fp)
    b.guard("nemo/wanda", lambda: run_fast_hooks(b, model, b.data["chosen"]["gen_batch"]))
    projections(b)
    check_targets(b)
    b.save()
    print_table(b)

    # optional sections, cheapest and safest first; each is skipped once the time budget is spent
    if args.ablations and b.elapsed() < args.time_budget:
        b.guard("ablations", lambda: run_ablations(b, model, fp))
    if args.profile and cuda:
        b.guard("profile", lambda: run_profile(b, model, "eager"))
    if args.sdpa and cuda and b.elapsed() < args.time_budget:
        b.guard("sdpa", lambda: run_sdpa(b, model, fp, args.sdpa))
    if args.compile and cuda and b.elapsed() < args.time_budget:
        b.guard("compile", lambda: run_compiled(b, model, fp))
        projections(b)
        check_targets(b)
        b.save()
        if args.profile:
            b.guard("profile", lambda: run_profile(b, model, "compiled"))
    b.data["wall_s"] = b.elapsed()
    b.save()
    print_table(b)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
