import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dori.attacks.dori import Dori, initial_embeddings
from dori.fast import COMPILE_PAYS_FROM_ITEMS, FastPath, attention_processors, compile_hint, units_that_fit
from dori.models.builders import build_tiny_random
from dori.models.pipeline import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent


def test_units_that_fit():
    assert units_that_fit(per_unit=2.0, fixed=1.0, available=10.0) == 4
    assert units_that_fit(per_unit=2.0, fixed=1.0, available=10.0, hi=3) == 3
    assert units_that_fit(per_unit=20.0, fixed=1.0, available=10.0) == 1  # at least one


def test_cpu_default_is_unchanged():
    """On the CPU the fast path keeps float32 and contiguous weights: results are bit-identical."""
    ref, fast_model = build_tiny_random(seed=0), build_tiny_random(seed=0)
    path = FastPath()
    path.apply(fast_model)
    assert fast_model.dtype == torch.float32
    assert attention_processors(fast_model) == {"AttnProcessor2_0": 8}  # diffusers' SDPA processor
    x0 = ref.encode_images(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    init = initial_embeddings(ref, ["a", "b", "c"])
    dori, items = path.dori(fast_model, n_items=3, steps=3)
    assert items == 3 and dori.max_micro_batch == 3 * dori.batch_size
    a = Dori(steps=3)(ref, x0, init, [1, 2, 3]).embeddings
    b = dori(fast_model, x0, init, [1, 2, 3]).embeddings
    assert torch.equal(a, b)
    cfg = path.sampling(fast_model, SamplingConfig(steps=2))
    assert cfg == SamplingConfig(steps=2)
    dori2, items2, cfg2 = FastPath(compile=True).prepare(fast_model, SamplingConfig(steps=2), steps=3)
    assert items2 == 4 and cfg2 == cfg and dori2.steps == 3  # no compiling on the CPU
    assert getattr(fast_model.unet, "_compiled_call_impl", None) is None


def test_bf16_weights_close_to_float32():
    """bf16 weights (the GPU fast path, here on the CPU): y, x_t, loss and DDIM state stay float32."""
    ref, low = build_tiny_random(seed=0), build_tiny_random(seed=0)
    FastPath(dtype=torch.bfloat16).apply(low)
    assert low.unet.dtype == torch.bfloat16 and low.text_encoder.dtype == torch.float32
    x0 = ref.encode_images(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    init = initial_embeddings(ref, ["a red circle", "b"])
    a = Dori(steps=3)(ref, x0, init, [1, 2])
    b = Dori(steps=3)(low, x0, init, [1, 2])
    assert b.embeddings.dtype == torch.float32
    rel = (a.embeddings - b.embeddings).norm() / (a.embeddings - init).norm()
    assert rel < 0.1, rel  # the updates agree to bf16 rounding
    torch.testing.assert_close(b.losses, a.losses, rtol=0.05, atol=1e-3)
    cfg = SamplingConfig(steps=2, batch_size=2)
    img_a, img_b = ref.sample(init, [5, 6], cfg), low.sample(init, [5, 6], cfg)
    assert img_b.dtype == torch.float32
    assert (img_a - img_b).abs().max() < 0.05


def test_chunked_decode_equals_whole(tiny):
    y = tiny.encode_text(["a red circle"] * 3)
    whole = tiny.sample(y, [1, 2, 3], SamplingConfig(steps=2, batch_size=3))
    chunked = tiny.sample(y, [1, 2, 3], SamplingConfig(steps=2, batch_size=3, decode_batch_size=2))
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_bench_cpu_mode(tmp_path):
    """benchmarks/bench_sd.py --device cpu on tiny-random with tiny sizes writes the full JSON whose derived
    figures follow from its measurements (a subprocess of minutes: slow tier)."""
    out = tmp_path / "bench.json"
    args = "--device cpu --model tiny-random --steps 1 --sample-steps 1 --gens 2 --nemo-seeds 2"
    args += " --wanda-calls 1 --ref-repeats 1 --fast-repeats 1 --peak-size 256"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sd.py"), *args.split(), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for name in ("dori", "gen10", "nemo", "wanda", "finetune"):
        w = data["workloads"][name]
        assert w["flops_per_item"] > 0
        for variant in ("reference", "fast"):
            v = w[variant]
            assert v["per_item_s"] > 0
            assert v["tflops"] == pytest.approx(w["flops_per_item"] / v["per_item_s"] / 1e12, rel=1e-6)
        ratio = w["fast"]["per_item_s"] / w["reference"]["per_item_s"]
        assert w["fast"]["ratio_to_reference"] == pytest.approx(ratio, rel=1e-6)
    assert data["peak"]["tflops"] > 0
    assert set(data["projections"]) == {"reference", "fast"}
    assert "500_prompts_dori+gen10_min" in data["projections"]["fast"]
    assert "s/item" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_fast_path_on_gpu_probes_memory():
    model = build_tiny_random(seed=0).to("cuda")
    path = FastPath()
    path.apply(model)
    assert model.unet.dtype == torch.bfloat16
    dori, items = path.dori(model, steps=2)
    assert 1 <= items <= path.max_dori_items
    cfg = path.sampling(model)
    assert 1 <= cfg.batch_size <= path.max_sampling_batch


def test_compile_hint_only_where_compiling_pays():
    """The audit suggests --compile on CUDA from the measured break-even on, never on the CPU or when on."""
    n = COMPILE_PAYS_FROM_ITEMS
    assert "--compile" in compile_hint(n, "cuda", False)
    assert compile_hint(n - 1, "cuda", False) is None
    assert compile_hint(10 * n, "cuda", True) is None
    assert compile_hint(10 * n, "cpu", False) is None
