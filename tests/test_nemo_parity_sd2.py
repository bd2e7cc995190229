"""NeMo with the paper's SD 2 schedule (theta_min 0.25, theta step 0.2; Finding Dori App. H.8) against the
reference code's own numbers.

Reference: ml-research/localizing_memorization_in_diffusion_models @ f952ede, ``3_detect_memorized_neurons.py``
run unmodified (``compute_memorization_statistics``) once, outside the project, on CPU in float32, on the tiny
model of ``tests/nemo_parity_model.py`` (seed 0), prompt ``nemo_parity_model.PROMPT``, with ``--seed 1
--samples_per_prompt 2 --guidance_scale 0 --min_theta 0.25 --theta_reduction_per_step 0.2 --initial_theta 5
--initial_k 1250 --scaling_factor 0 --pairwise_ssim_threshold -1e9 --ssim_threshold_initial_selection -1
--ssim_threshold_refinement -1`` and the OOD statistics of ``nemo_parity_model.statistics`` saved as the
``--version`` .pt file. Shims only: ``Tensor.cuda`` and ``Module.to("cuda")`` as no-ops, stub ``rtpt`` and a
';'-CSV ``pandas.read_csv``, the reference's loaders returning the tiny components; torchmetrics 1.3.2 for its
MS-SSIM. The seed filter is off on both sides (a random UNet never makes two seeds look alike).

A threshold of -1 is never reached, so the selection runs until its stop: the reference's ``theta == 1`` never
fires (theta passes 1 as 0.9999999999999978) and theta stays at 0.19999999999999785, so the loop ends only when
k reaches its constant 1280. ``--initial_k 1250`` (a reference option) keeps that to 30 steps: from k = 1250 the
top-k holds every neuron of every layer, so each step differs only in theta, and the last blocking is the one
k = 0 would reach after 1280 steps. dori runs the same loop with ``stop="reference"``, ``k_start=1250`` and the
reference's ``max_neurons=1280``; both then refine that blocking (every neuron, listed twice where theta and
top-k both chose it) against its own score. ``stop="theta-min"`` stops at theta ~ 0.2 with another threshold.
The reference run (2026-11-29, torch 2.13.0+cpu) took about 4 minutes on a shared 2-core CPU; this test takes
about 45 s on 2 idle cores (about 190 noise-difference evaluations on 64 x 64 latents), in the default suite.
"""

import pytest
import torch

import dori.mitigations.nemo as nemo_module
from dori.mitigations.nemo import NeMo
from dori.mitigations.nemo_calibration import Calibration
from dori.models.layers import value_layers
from nemo_parity_model import PROMPT, build_components, dori_model, statistics

pytestmark = pytest.mark.usefixtures("one_thread")

# recorded from the reference run (CSV columns of 3_detect_memorized_neurons.py; lists keep its duplicates)
REF_INITIAL = [
    [0, 1, 2, 3, 4, 5, 7, 1, 3, 6, 0, 2, 4, 7, 5],
    [0, 1, 2, 3, 4, 5, 6, 7, 2, 7, 5, 3, 1, 6, 4, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 7, 2, 0, 1, 4, 6, 3, 5],
    [0, 1, 2, 3, 5, 7, 2, 7, 5, 3, 4, 6, 0, 1],
    [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 0, 4, 8, 6, 11, 7, 12, 13, 5, 10, 14, 9, 3, 15, 2, 1],
    [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 13, 14, 11, 5, 3, 2, 10, 0, 14, 12, 7, 13, 1, 15, 8, 9, 6, 4],
    [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        11,
        7,
        0,
        3,
        14,
        4,
        5,
        13,
        12,
        9,
        1,
        10,
        6,
        8,
        2,
        15,
    ],
]
REF_INITIAL_SSIM = 0.9014145135879517
REF_REFINED = [[1, 3, 2, 4], [], [4], [5], [], [], []]
REF_REFINED_SSIM = 0.8977687954902649


def test_sd2_schedule_reference_stop_reproduces_the_reference(monkeypatch):
    parts = build_components(0)
    model = dori_model(parts)
    layers = value_layers(model.unet)
    means, stds = statistics(parts)
    calib = Calibration(dict(zip(layers, means, strict=True)), dict(zip(layers, stds, strict=True)), 0.0, 0.0)
    monkeypatch.setattr(nemo_module, "max_pairwise_ms_ssim", lambda d, s: torch.ones(len(d)))  # filter off
    nemo = NeMo(theta_min=0.25, theta_step=0.2, tau=-1.0, n_seeds=2, seed=1, stop="reference", k_start=1250,
                max_neurons=1280)  # fmt: skip
    item = nemo.detect(model, model.encode_text([PROMPT]), calib)[0]
    assert item.theta == 0.19999999999999785 and item.k == 1280
    dedup = [list(dict.fromkeys(v)) for v in REF_INITIAL]
    assert [item.initial[layer] for layer in layers] == dedup
    assert item.initial_score == pytest.approx(REF_INITIAL_SSIM, abs=2e-5)
    assert [item.refined[layer] for layer in layers] == [list(dict.fromkeys(v)) for v in REF_REFINED]
    assert item.refined_score == pytest.approx(REF_REFINED_SSIM, abs=2e-5)
