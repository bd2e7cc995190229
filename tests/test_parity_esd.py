"""ESD against numbers from its reference code (rohitgandikota/erasing).

How the expected values were made (outside the project; the project holds none of the reference's code):
rohitgandikota/erasing at commit 25613d27892326e0c7770f7f3555bea4be150089, ``esd_sd.py`` run unmodified
(``runpy``) on CPU with ``--erase_concept "blue square" --train_method esd-x --iterations 2 --device cpu``
(and ``--train_method esd-u --iterations 1``), all other options at their defaults (lr 5e-5, negative
guidance 2, guidance 3, 50 inference steps; the script's own bfloat16 and PNDM), after ``random.seed(0)``.
Import shims only: ``UNet2DConditionModel.from_pretrained`` and ``StableDiffusionPipeline.from_pretrained``
resolve the hub id to the tiny model of the ``tiny`` fixture (``build_tiny_random(seed=0)`` saved as a
diffusers folder with SD v1.4's scheduler folder: PNDM, ``skip_prk_steps``, the same betas), and the
pipeline call gets ``height = width = 16`` (the tiny model's size) instead of the script's 1024, whose
full-resolution self-attention does not fit a tiny CPU model. ``torch.nn.MSELoss.forward`` and
``torch.optim.Adam.step`` were wrapped to record the targets, losses and weights after each step.

Recorded: per iteration the MSE loss and the norm and first values of the target
eps_c - 2 (eps_c - eps_null); after the run, the first six weights of the first trained parameter
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight`` for esd-x, ``conv_in.weight`` for esd-u),
the number of trained tensors and the sum of all trained weights.
"""

import pytest
import torch

from dori.data.sets import Item
from dori.mitigations.esd import ESD, esd_parameter_names

REFERENCE = {
    "esd-x": {
        "loss": [0.00090789794921875, 0.005401611328125],
        "target_norm": [5.590766429901123, 5.008267402648926],
        "n_params": 20,
        "sum_after": 12.090336799621582,
        "first_after": [-0.2392578125, 0.2138671875, 0.166015625, -0.0673828125, -0.04296875, -0.150390625],
    },
    "esd-u": {
        "loss": [0.00090789794921875],
        "target_norm": [5.590766429901123],
        "n_params": 122,
        "sum_after": -0.07902932167053223,
        "first_after": [
            -0.0162353515625,
            -0.12890625,
            -0.060546875,
            -0.06884765625,
            0.07861328125,
            0.023193359375,
        ],
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_esd_matches_reference(tiny, method):
    ref = REFERENCE[method]
    log = []
    esd = ESD(iterations=len(ref["loss"]), resolution=16, parameters=method)  # otherwise dori's defaults
    out = esd(tiny, [Item(id="x", prompt="blue square")], log=log.append)
    names = esd_parameter_names(out.unet, method)
    assert len(names) == ref["n_params"]
    # bfloat16 throughout, as the reference: the same operations give the same bits
    assert [r["loss"] for r in log] == pytest.approx(ref["loss"], rel=1e-6)
    assert [r["target_norm"] for r in log] == pytest.approx(ref["target_norm"], rel=1e-6)
    params = dict(out.unet.named_parameters())
    torch.testing.assert_close(
        params[names[0]].flatten()[:6], torch.tensor(ref["first_after"]), rtol=0, atol=1e-6
    )
    assert float(sum(params[n].sum() for n in names)) == pytest.approx(ref["sum_after"], abs=1e-4)
    assert not any("norm" in n.split(".")[-2] for n in names)  # normalization layers are never trained


def test_esd_old_target_is_not_the_reference(tiny):
    """The check can fail: dori's former target eps_null - 2 (eps_c - eps_null) is another number."""
    log = []
    ESD(iterations=1, resolution=16, negative_guidance=3.0)(
        tiny, [Item(id="x", prompt="blue square")], log=log.append
    )
    # eps_c - 3 (eps_c - eps_null) = eps_null - 2 (eps_c - eps_null)
    assert log[0]["target_norm"] != pytest.approx(REFERENCE["esd-x"]["target_norm"][0], rel=1e-3)
    assert ESD(variant="paper").iterations == 10_000 and ESD().iterations == 200
