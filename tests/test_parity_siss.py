"""SISS against numbers from its reference code (claserken/SISS).

How the expected values were made (outside the project; the project holds none of the reference's code):
claserken/SISS at commit af2a29c4d294ac6de338d915e49adfb47540bc06, ``delete_sd.DeleteSD.run`` with
``config/delete_sd.yaml`` unchanged except ``training_steps: 1``, ``gradient_checkpointing: false``,
``report_to: null`` and the data paths, run once on CPU in fp32 on the tiny model of the ``tiny`` fixture
(``build_tiny_random(seed=0)`` saved as a diffusers folder, loaded by the reference with ``from_pretrained``).
Data: two 16x16 RGB images ``np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=uint8)`` (drawn in
turn), the first labelled 0 (kept), the second 1 (deleted); modified prompt "blue square zz". Import shims
only: torchvision, torchmetrics, datasets, hydra and wandb stubbed (Normalize(127.5, 127.5) and read_image
reimplemented, wandb.log recorded), ``Sampler.__init__`` accepting the dataset (newer torch), validation
images skipped, and every random draw of the training loop (``latent_dist.sample()``, ``torch.randn_like``
for the noise, ``torch.rand`` for the mixture choice) taken from one CPU generator seeded 1234, in the
reference's order. Settings therefore as the reference's SD config: 16 micro-batches of 1, t = 999 (its
``randint(999, 1000)``), lambda 0.5, scaling norm 750, clipping 1.0, AdamW lr 1e-5, weight decay 0.01.

Recorded from that run: the sums of the importance-weighted losses over the 16 micro-batches, divided by the
accumulation (accelerate divides each backward by 16), the norms of the accumulated keep and deletion
gradients (``gradient/norm_loss_x``, ``gradient/norm_loss_a``), and the first six weights of ``conv_in``
after the AdamW step.
"""

import numpy as np
import pytest
import torch

from dori.data.sets import Item
from dori.mitigations.siss import SISS

REFERENCE = {
    "l_keep": 275.7795181274414,  # sum over micro-batches of sum(w_x * (eps_x - pred)^2) / 16
    "l_del": 276.79867458343506,
    "keep_grad_norm": 332.4261474609375,
    "del_grad_norm": 331.45111083984375,
    "scaling_factor": 2.262777090072632,  # 750 / del_grad_norm
    "conv_in_after": [
        -0.016202177852392197,
        -0.12915019690990448,
        -0.060571350157260895,
        -0.06876780837774277,
        0.0783810093998909,
        0.023248758167028427,
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _images():
    g = np.random.RandomState(0)
    arrays = [g.randint(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    return [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]


def test_siss_step_matches_reference(tiny):
    keep, forget = _images()
    log = []
    siss = SISS(steps=1, seed=1234)  # every other setting: dori's defaults, which are the reference's
    out = siss.unlearn(
        tiny,
        Item(id="x", prompt="blue square"),
        keep[None],
        forget[None],
        prompt="blue square zz",
        log=log.append,
    )
    step = log[0]
    assert step["l_keep"] == pytest.approx(REFERENCE["l_keep"], rel=1e-5)
    assert step["l_del"] == pytest.approx(REFERENCE["l_del"], rel=1e-5)
    assert step["keep_grad_norm"] == pytest.approx(REFERENCE["keep_grad_norm"], rel=1e-5)
    assert step["del_grad_norm"] == pytest.approx(REFERENCE["del_grad_norm"], rel=1e-5)
    assert step["scaling_norm"] / step["del_grad_norm"] == pytest.approx(
        REFERENCE["scaling_factor"], rel=1e-5
    )
    after = next(out.unet.parameters()).flatten()[:6]
    torch.testing.assert_close(after, torch.tensor(REFERENCE["conv_in_after"]), rtol=0, atol=1e-7)


def test_siss_differs_from_reference_with_the_old_choices(tiny):
    """The check above can fail: averaging instead of summing, or conditioning on the memorized prompt,
    moves the numbers off the reference's."""
    keep, forget = _images()
    log = []
    SISS(steps=1, seed=1234).unlearn(
        tiny, Item(id="x", prompt="blue square"), keep[None], forget[None], log=log.append
    )
    assert log[0]["keep_grad_norm"] != pytest.approx(REFERENCE["keep_grad_norm"], rel=1e-3)
    log = []
    SISS(steps=1, seed=1234, timestep=None).unlearn(
        tiny,
        Item(id="x", prompt="blue square"),
        keep[None],
        forget[None],
        prompt="blue square zz",
        log=log.append,
    )
    assert log[0]["l_keep"] != pytest.approx(REFERENCE["l_keep"], rel=1e-3)
