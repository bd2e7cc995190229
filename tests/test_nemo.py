"""NeMo on the tiny model and on synthetic scores; MS-SSIM against a direct computation."""

import math
import shutil

import pytest
import torch

from dori.errors import DoriError
from dori.metrics.ssim import MSSSIMSettings, ms_ssim, ms_ssim_settings
from dori.mitigations import nemo_calibration
from dori.mitigations.nemo import NeMo, NeMoResult
from dori.mitigations.nemo_calibration import Calibration, is_sd14, reference_statistics, value_activations
from dori.mitigations.nemo_iterative import iterative_nemo
from dori.mitigations.nemo_noise import (
    NoiseSettings,
    detection_timestep,
    initial_latents,
    masks_for_rows,
    noise_differences,
    normalize_per_channel,
)
from dori.models.hooks import scale_output_channels
from dori.models.layers import value_layers

PROMPTS = ["a red circle on blue", "a small green square", "two yellow stars", "a cat on a mat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nemo-cache")


@pytest.fixture(scope="module")
def calib(tiny, cache_dir):
    return NeMo(n_seeds=4, cache_dir=str(cache_dir)).calibrate(tiny, PROMPTS, prompt_set="test")


# ------------------------------------------------------------------ MS-SSIM
def _naive_ssim(x, y, k, sigma, data_range=1.0):
    """Single-scale mean SSIM over valid window positions, by explicit loops."""
    c = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-0.5 * (c / sigma) ** 2)
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - k + 1):
            for j in range(x.shape[2] - k + 1):
                a, b = x[ch, i : i + k, j : j + k], y[ch, i : i + k, j : j + k]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return torch.stack(vals).mean()


def test_ms_ssim_single_scale_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 9, 9, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(1, 2, 9, 9, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ms_ssim(x, y, MSSSIMSettings(kernel_size=5, sigma=1.0, betas=(1.0,)), data_range=1.0)
    torch.testing.assert_close(got[0], _naive_ssim(x[0], y[0], 5, 1.0))


def test_ms_ssim_matches_torchmetrics_1_3_2():
    """Expected values from torchmetrics 1.3.2 (the NeMo reference's version), computed on these inputs with
    ``multiscale_structural_similarity_index_measure(x, y, reduction="none", kernel_size=11,
    betas=(0.33, 0.33, 0.33))`` (data range from the data, as NeMo calls it)."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(3, 4, 48, 48, generator=g)
    y = x + torch.tensor([0.1, 0.4, 1.0]).view(3, 1, 1, 1) * torch.randn(x.shape, generator=g)
    lo, hi = y.amin((2, 3), keepdim=True), y.amax((2, 3), keepdim=True)
    y = (y - lo) / (hi - lo)
    expected = torch.tensor([0.8833866715431213, 0.49931129813194275, 0.22937409579753876])
    torch.testing.assert_close(ms_ssim(x, y), expected, atol=1e-5, rtol=0)


def test_ms_ssim_identity_and_monotone_in_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 4, 64, 64, generator=g)
    assert ms_ssim_settings(64, 64) == MSSSIMSettings()  # NeMo's 11 / 1.5 / 3 x 0.33 on SD latents
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(4))
    scores = [
        float(ms_ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean())
        for s in (0.05, 0.2, 0.6)
    ]
    assert 1 > scores[0] > scores[1] > scores[2] >= 0
    small = torch.rand(3, 4, 8, 8, generator=g)  # tiny-model latents: the fallback settings
    torch.testing.assert_close(ms_ssim(small, small), torch.ones(3))
    assert float(ms_ssim(small, torch.rand(3, 4, 8, 8, generator=g)).mean()) < 0.5


def test_ms_ssim_settings_fallback_and_errors():
    s = ms_ssim_settings(32, 32)
    assert s.kernel_size == 7 and len(s.betas) == 3 and math.isclose(s.sigma, 1.5 * 7 / 11)
    assert ms_ssim_settings(8, 8).betas == (0.33, 0.33) and ms_ssim_settings(8, 8).kernel_size == 3
    with pytest.raises(DoriError, match="too small"):
        ms_ssim_settings(2, 2)
    with pytest.raises(DoriError, match="too small"):
        ms_ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), MSSSIMSettings())


# ------------------------------------------------------------------ the selection algorithm on synthetic scores
def _drive(nemo, acts, calib, tau, score_fn, max_neurons=32):
    gen = nemo.search(acts, calib, tau, max_neurons)
    asked = [next(gen)]
    try:
        while True:
            asked.append(gen.send(score_fn(asked[-1])))
    except StopIteration as stop:
        return stop.value, asked


def _synthetic():
    layers = ["L0", "L1"]
    means = {"L0": torch.full((16,), 1.0), "L1": torch.full((32,), 1.0)}
    stds = {"L0": torch.full((16,), 1.0), "L1": torch.full((32,), 1.0)}
    acts = {"L0": torch.linspace(1.5, 1.9, 16), "L1": torch.linspace(1.1, 1.6, 32)}
    acts["L0"][3] = -1.1  # z = 2.1 (the only z above 0.9) but the smallest raw activation
    return layers, acts, Calibration(means, stds, 0.3, 0.1)


def test_selection_finds_the_one_memorization_neuron():
    _, acts, calib = _synthetic()
    nemo = NeMo()

    def score(blocking):  # memorization persists unless neuron 3 of L0 is blocked
        return 0.1 if 3 in blocking["L0"] else 0.9

    out, asked = _drive(nemo, acts, calib, 0.4, score)
    # theta 5, 4.75, ..., 2.0: neuron 3 (z = 2.1) enters at theta = 2.0, after 12 steps (k = 12)
    assert out["theta"] == 2.0 and out["k"] == 12 and out["initial_score"] == 0.1
    assert 3 in out["initial"]["L0"] and len(out["initial"]["L1"]) == 12
    assert out["refined"] == {"L0": [3], "L1": []} and out["refined_score"] == 0.1
    assert out["refine_tau"] == 0.4
    # refinement: L1 dropped as a whole (1 evaluation), then each of L0's 13 neurons, then the final score
    assert len(asked) == 13 + 2 + 13 + 1


def test_selection_stops_at_theta_floor_and_keeps_the_score_as_threshold():
    _, acts, calib = _synthetic()
    nemo = NeMo()
    out, asked = _drive(nemo, acts, calib, 0.4, lambda b: 0.9)
    assert out["theta"] == 1.0 and out["k"] == 16  # 16 reductions; theta = 1 itself is never evaluated
    assert out["initial"] == nemo._initial(acts, calib, 1.25, 15)
    assert out["refine_tau"] == 0.9  # nothing scores below 0.9: refinement keeps everything
    assert out["refined"] == out["initial"]


def test_paper_variant_ranks_top_k_by_z():
    _, acts, calib = _synthetic()
    ref = NeMo()._initial(acts, calib, math.inf, 1)
    paper = NeMo(variant="paper")._initial(acts, calib, math.inf, 1)
    assert ref["L0"] == [15]  # the largest raw activation
    assert paper["L0"] == [3]  # the largest z
    with pytest.raises(DoriError):
        NeMo(variant="nope")
    with pytest.raises(DoriError):
        NeMo(use_theta=False, use_top_k=False)


# ------------------------------------------------------------------ on the tiny model
def test_reference_statistics_shape_and_mismatch(tiny):
    means, stds = reference_statistics()
    assert [v.numel() for v in means.values()] == [320, 320, 640, 640, 1280, 1280, 1280]
    assert all((s > 0).all() for s in stds.values())
    with pytest.raises(DoriError, match="layers"):
        reference_statistics(tiny)


def test_calibration_cached_and_consistent(tiny, calib, cache_dir, tmp_path, monkeypatch):
    assert calib.tau() == pytest.approx(calib.ssim_mean + calib.ssim_std)
    assert calib.tau(strong=True) < calib.tau()
    assert (
        NeMo(strong=True).threshold(calib) == calib.tau(strong=True) and NeMo(tau=0.2).threshold(calib) == 0.2
    )
    acts = value_activations(tiny, tiny.encode_text(PROMPTS))
    for layer in value_layers(tiny.unet):
        torch.testing.assert_close(calib.means[layer], acts[layer].mean(0))
        torch.testing.assert_close(calib.stds[layer], acts[layer].std(0))
    calib.save(tmp_path / "c.safetensors")
    back = Calibration.load(tmp_path / "c.safetensors")
    assert back.ssim_mean == calib.ssim_mean and back.info == calib.info
    assert len(list(cache_dir.glob("calibration-*.safetensors"))) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(nemo_calibration, "pairwise_ssim_values", fail)
    again = nemo_calibration.calibrate(
        tiny, "abs-mean", NeMo()._v["threshold"], ms_ssim_settings(8, 8), n_seeds=4,
        prompts=PROMPTS, prompt_set="test", cache_dir=cache_dir,
    )  # fmt: skip
    assert again.ssim_std == calib.ssim_std
    torch.testing.assert_close(again.means, calib.means)

    # a world folder may carry the calibration (the shipped miniworld does): used when the cache is empty
    world = tmp_path / "world"
    (world / "nemo").mkdir(parents=True)
    for f in cache_dir.glob("calibration-*"):
        shutil.copy(f, world / "nemo" / f.name)
    from dori.world import World

    monkeypatch.setattr(tiny, "world", World(world))
    shipped = nemo_calibration.calibrate(
        tiny, "abs-mean", NeMo()._v["threshold"], ms_ssim_settings(8, 8), n_seeds=4,
        prompts=PROMPTS, prompt_set="test", cache_dir=tmp_path / "empty-cache",
    )  # fmt: skip
    assert shipped.ssim_mean == calib.ssim_mean and not (tmp_path / "empty-cache").exists()
    assert shipped.info["source"] == "computed, shipped with the world"


def test_row_masks_equal_channel_scaling(tiny):
    layer = value_layers(tiny.unet)[0]
    y = tiny.encode_text(PROMPTS[:2]).repeat_interleave(2, 0)
    lat = initial_latents(tiny, 2, 1).repeat(2, 1, 1, 1)
    ns = NoiseSettings()
    masks = masks_for_rows(tiny, value_layers(tiny.unet), [{layer: [1, 5]}, {}, {layer: [1, 5]}, {}])
    batched = noise_differences(tiny, y, lat, ns, masks)
    with scale_output_channels(tiny.unet, {layer: [1, 5]}):
        blocked = noise_differences(tiny, y[[0, 2]], lat[[0, 2]], ns)
    plain = noise_differences(tiny, y[[1, 3]], lat[[1, 3]], ns)
    torch.testing.assert_close(batched[[0, 2]], blocked, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[[1, 3]], plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def _small(**kw):
    return NeMo(n_seeds=4, theta_start=1.75, **kw)


def test_detect_is_deterministic_and_batch_independent(tiny, calib):
    y = tiny.encode_text(PROMPTS[:2])
    nemo = _small(tau=0.05)
    a = nemo.detect(tiny, y, calib)
    b = nemo.detect(tiny, y, calib)
    assert a == b
    assert all(it.memorized and it.evaluations > 0 for it in a)
    single = nemo.detect(tiny, y[1:], calib, ids=["1"])
    assert single[0].refined == a[1].refined
    assert {k: v.tolist() for k, v in nemo.select(tiny, y[1], calib).items()} == {
        k: sorted(v) for k, v in a[1].refined.items()
    }


def test_seed_filter_marks_unmemorized(tiny, calib):
    item = _small(tau=1.0).detect(tiny, tiny.encode_text(PROMPTS[:1]), calib)[0]
    assert not item.memorized and item.kept_seeds == []
    assert all(v == [] for v in item.refined.values())


def test_result_applies_restores_and_round_trips(tiny, calib, tmp_path):
    nemo = _small(tau=0.05)
    res = nemo.fit(tiny, PROMPTS[:2], calibration=calib)
    assert set(res.items) == {"0", "1"} and res.layers == value_layers(tiny.unet)
    union = res.neurons()
    assert sum(map(len, union.values())) > 0
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    y = tiny.encode_text(PROMPTS[:1])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ref = tiny.unet(x, t, encoder_hidden_states=y).sample
    with res.applied(tiny):
        out = tiny.unet(x, t, encoder_hidden_states=y).sample
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(tiny.unet(x, t, encoder_hidden_states=y).sample, ref, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())
    res.save(tmp_path)
    back = NeMoResult.load(tmp_path)
    assert back.items == res.items and back.neurons(["1"]) == res.neurons(["1"])
    with back.applied(tiny, ["0", "1"]):
        torch.testing.assert_close(tiny.unet(x, t, encoder_hidden_states=y).sample, out)
    with pytest.raises(DoriError, match="no neuron set"):
        back.neurons(["nope"])


def test_iterative_nemo_accumulates(tiny, calib):
    nemo = _small(tau=0.05)
    y = tiny.encode_text(PROMPTS[:2])
    seen = []

    def search(r, blocked):
        seen.append([{k: list(v) for k, v in b.items()} for b in blocked])
        return y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(r))

    rounds = iterative_nemo(nemo, tiny, ["a", "b"], y, search, rounds=2, calibration=calib)
    assert len(rounds) == 2 and rounds[1].embeddings.shape == y.shape
    for i in ("a", "b"):
        first, second = rounds[0].result.items[i].refined, rounds[1].result.items[i].refined
        assert all(set(first[k]) <= set(second[k]) for k in first)
    assert {k: set(v) for k, v in seen[0][0].items()} == {
        k: set(v) for k, v in rounds[0].result.items["a"].refined.items()
    }


def test_noise_difference_settings(tiny):
    y = tiny.encode_text(PROMPTS[:1])
    lat = initial_latents(tiny, 1, 1)
    torch.testing.assert_close(lat, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)))
    ref = NoiseSettings()  # detection: second DDIM timestep (961 with 50 steps), no guidance
    assert int(detection_timestep(tiny, ref)) == 961
    assert int(detection_timestep(tiny, NoiseSettings(timestep_index=0))) == 981
    t = torch.tensor([961])
    with torch.no_grad():
        u = tiny.unet(lat, t, encoder_hidden_states=tiny.null_embedding()).sample
        c = tiny.unet(lat, t, encoder_hidden_states=y).sample
    torch.testing.assert_close(noise_differences(tiny, y, lat, ref), normalize_per_channel(c - lat))
    cfg = noise_differences(tiny, y, lat, NoiseSettings(guidance=7.0))
    torch.testing.assert_close(cfg, normalize_per_channel(u + 7 * (c - u) - lat), atol=1e-5, rtol=1e-4)
    swapped = noise_differences(tiny, y, lat, NoiseSettings(guidance=7.0, swapped_cfg=True))
    torch.testing.assert_close(swapped, normalize_per_channel(c + 7 * (u - c) - lat), atol=1e-5, rtol=1e-4)
    d = noise_differences(tiny, y, lat, ref)
    assert d.amin() == 0 and d.amax() == 1


def test_paper_variant_scores_with_guidance_and_its_neurons_block_memorization(tiny, calib):
    """The paper variant scores at the first timestep with guidance 7 (the reference without guidance at the
    second), so its scores differ; its refined neurons bring the score under tau, and a tau above every score
    flags nothing."""
    y = tiny.encode_text(PROMPTS[:1])
    paper = NeMo(variant="paper", n_seeds=3, theta_start=1.5, tau=0.05).detect(tiny, y, calib)[0]
    ref = NeMo(variant="reference", n_seeds=3, theta_start=1.5, tau=0.05).detect(tiny, y, calib)[0]
    assert paper.memorized and paper.evaluations > 0
    assert sum(map(len, paper.refined.values())) > 0
    assert paper.refined_score < paper.refine_tau  # blocking the found neurons ends the memorization signal
    assert paper.initial_score != pytest.approx(ref.initial_score, abs=1e-6)
    assert not NeMo(variant="paper", n_seeds=3, tau=1e6).detect(tiny, y, calib)[0].memorized


def test_sd14_is_recognized_by_name(tiny):
    assert not is_sd14(tiny)
    tiny.name = "CompVis/stable-diffusion-v1-4"
    try:
        assert is_sd14(tiny)
    finally:
        tiny.name = "tiny-random"


@pytest.mark.parametrize("arch", ["1.4", "2-base"])
def test_layer_targets_on_sd_architectures(arch):
    """SD v1.4's value layers match the shipped statistics; SD 2's (1024-wide text) are found by name too."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from dori.models.builders import SD2_UNET, SD14_UNET
    from dori.models.layers import ffn_layers, get_module

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**(SD14_UNET if arch == "1.4" else SD2_UNET))
    layers = value_layers(unet)
    assert len(layers) == 7 and len(ffn_layers(unet)) == 16
    if arch == "1.4":
        means, stds = reference_statistics()
        assert layers == list(means)
        Calibration(means, stds, 0.358, 0.070).check(SimpleNamespace(unet=unet))
    else:
        assert {get_module(unet, n).in_features for n in layers} == {1024}


def test_iterative_nemo_resumes_from_finished_rounds(tiny, calib):
    nemo = _small(tau=0.05)
    y = tiny.encode_text(PROMPTS[:2])

    def search(r, blocked):
        return y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(r))

    full = iterative_nemo(nemo, tiny, ["a", "b"], y, search, rounds=3, calibration=calib)
    saved = []
    first = iterative_nemo(
        nemo, tiny, ["a", "b"], y, search, rounds=1, calibration=calib, on_round=saved.append
    )
    assert len(saved) == 1
    resumed = iterative_nemo(nemo, tiny, ["a", "b"], y, search, rounds=3, calibration=calib, done=first)
    assert len(resumed) == 3 and resumed[0] is first[0]
    for a, b in zip(full, resumed, strict=True):
        assert {k: v.refined for k, v in a.result.items.items()} == {
            k: v.refined for k, v in b.result.items.items()
        }
        torch.testing.assert_close(a.embeddings, b.embeddings)
    with pytest.raises(DoriError, match="other items"):
        iterative_nemo(nemo, tiny, ["a", "c"], y, search, rounds=2, calibration=calib, done=first)


def test_dori_search_batches_items_with_their_own_neurons(tiny):
    from dori.attacks.dori import Dori
    from dori.mitigations.nemo_iterative import make_dori_search

    layers = value_layers(tiny.unet)
    x0 = tiny.encode_images(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    y = tiny.encode_text(PROMPTS[:3])
    blocked = [{layers[0]: [0, 3, 5]}, {}, {layers[0]: [1], layers[-1]: [2, 4]}]
    dori = Dori(steps=3, batch_size=4, max_micro_batch=8)  # two items per UNet batch: groups of 2 and 1
    got = make_dori_search(dori, tiny, x0, y, [11, 12, 13])(1, blocked)
    for i, b in enumerate(blocked):  # one item at a time, its neurons blocked for the whole model
        with scale_output_channels(tiny.unet, b, 0.0):
            alone = dori(tiny, x0[i : i + 1], y[i : i + 1], [11 + i + 1]).embeddings
        torch.testing.assert_close(got[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], make_dori_search(dori, tiny, x0, y, [11, 12, 13])(1, [{}, {}, {}])[0])


def test_sd2_schedule_reference_stop_never_fires_on_theta():
    """The paper's SD 2 setting (theta_min 0.25, step 0.2; Appendix H.8). The reference
    (ml-research/localizing_memorization_in_diffusion_models @ f952ede, ``3_detect_memorized_neurons.py``
    83-97, run with ``--min_theta 0.25 --theta_reduction_per_step 0.2``) stops the selection only when
    ``theta == 1``; theta passes 1 as 0.9999999999999978 (recorded in that run) and ends at
    0.19999999999999785, so k keeps rising to the maximum. ``stop="theta-min"`` stops at theta ~ 0.2."""
    _, acts, calib = _synthetic()
    sd2 = dict(theta_min=0.25, theta_step=0.2)
    theta = 5.0
    for _ in range(20):
        theta -= 0.2
    assert theta == 0.9999999999999978  # the reference's float drift
    out, _ = _drive(NeMo(**sd2), acts, calib, 0.4, lambda b: 0.9)
    assert out["k"] == 32 and out["theta"] == 0.19999999999999785  # k ran to the widest layer
    early, _ = _drive(NeMo(**sd2, stop="theta-min"), acts, calib, 0.4, lambda b: 0.9)
    assert early["k"] == 24 and abs(early["theta"] - 0.2) < 1e-9
    # the default schedule reaches 1 exactly: both rules stop at the same place
    a, _ = _drive(NeMo(), acts, calib, 0.4, lambda b: 0.9)
    b, _ = _drive(NeMo(stop="theta-min"), acts, calib, 0.4, lambda b: 0.9)
    assert a == b and a["k"] == 16
    with pytest.raises(DoriError):
        NeMo(stop="never")


def test_duplicated_neuron_is_unblocked_at_its_second_place():
    """As the reference's ``initial_neuron_selection`` (a neuron chosen by theta and by top-k is listed
    twice, ``activation_detection.py`` 105-108) and ``neuron_refinement`` (``list.remove`` of one copy per
    trial, 239-254): the order of the true trials changes, and with it the refined set."""
    means, stds = {"L0": torch.zeros(4)}, {"L0": torch.ones(4)}
    acts = {"L0": torch.tensor([0.1, 6.0, 0.2, 5.5])}  # z = |a|: theta 5 picks 1 and 3, top-1 picks 1
    calib = Calibration(means, stds, 0.3, 0.1)

    def score(b):  # either neuron 1 or neuron 3 blocked removes the memorization
        return 0.1 if (1 in b["L0"] or 3 in b["L0"]) else 0.9

    keep, asked = _drive(NeMo(k_start=1), acts, calib, 0.4, score)
    assert asked[0] == {"L0": [1, 3, 1]}
    assert keep["initial"] == {"L0": [1, 3]} and keep["refined"] == {"L0": [1]}
    drop, asked_drop = _drive(NeMo(k_start=1, duplicates="drop"), acts, calib, 0.4, score)
    assert asked_drop[0] == {"L0": [1, 3]} and drop["refined"] == {"L0": [3]}
    assert len(asked) == len(asked_drop) + 1
