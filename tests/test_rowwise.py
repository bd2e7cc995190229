"""Row-wise interventions (several items' NeMo neurons / Wanda masks in one UNet batch) must equal
applying each item's intervention alone."""

import torch

from dori.models.hooks import (
    apply_weight_masks,
    rowwise_scale_output_channels,
    rowwise_weight_masks,
    scale_output_channels,
)
from dori.models.layers import ffn_layers, value_layers


def _unet_out(model, x, y, t):
    return model.unet(x, t, encoder_hidden_states=y).sample


def test_rowwise_channel_scale_equals_per_item(tiny):
    layer = value_layers(tiny.unet)[0]
    width = tiny.unet.get_submodule(layer).out_features
    neurons = [[0, 3], [5], []]
    x, y, t = torch.randn(3, 4, 8, 8), tiny.encode_text(["a", "b", "c"]), torch.tensor([900, 500, 10])
    alone = []
    for r, idx in enumerate(neurons):
        with scale_output_channels(tiny.unet, {layer: idx}):
            alone.append(_unet_out(tiny, x[r : r + 1], y[r : r + 1], t[r : r + 1]))
    mult = torch.ones(3, width)
    for r, idx in enumerate(neurons):
        mult[r, idx] = 0.0
    with rowwise_scale_output_channels(tiny.unet, {layer: mult}):
        together = _unet_out(tiny, x, y, t)
        doubled = _unet_out(tiny, torch.cat([x, x]), torch.cat([y, y]), torch.cat([t, t]))  # CFG layout
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(doubled[3:], torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_rowwise_weight_masks_equal_per_item(tiny):
    layer = ffn_layers(tiny.unet)[0]
    w = tiny.unet.get_submodule(layer).weight
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(w.shape, generator=gen) < 0.1 for _ in range(2)]
    row_group = torch.tensor([1, 0, -1])
    x, y, t = torch.randn(3, 4, 8, 8), tiny.encode_text(["a", "b", "c"]), torch.tensor([900, 500, 10])
    alone = []
    for r, g in enumerate(row_group.tolist()):
        sub = {layer: masks[g]} if g >= 0 else {}
        with apply_weight_masks(tiny.unet, sub):
            alone.append(_unet_out(tiny, x[r : r + 1], y[r : r + 1], t[r : r + 1]))
    before = w.detach().clone()
    with rowwise_weight_masks(tiny.unet, {layer: masks}, row_group):
        together = _unet_out(tiny, x, y, t)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert torch.equal(tiny.unet.get_submodule(layer).weight, before)
