import pytest
import torch

from dori.errors import DoriError
from dori.models.builders import build_tiny_random
from dori.models.hooks import WeightMasks, apply_weight_masks, record_activations, scale_output_channels
from dori.models.layers import ffn_layers, value_layers
from dori.models.loading import load_model, save_model
from dori.models.pipeline import SamplingConfig


def _state(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_encode_text_shapes(tiny):
    y = tiny.encode_text(["a red circle", "blue square on green"])
    assert y.shape == (2, tiny.max_tokens, 32)
    assert tiny.null_embedding().shape == (1, tiny.max_tokens, 32)
    assert not torch.allclose(y[0], y[1])


def test_image_roundtrip_shapes(tiny, tiny_pixel):
    img = torch.rand(2, 3, 16, 16)
    x0 = tiny.encode_images(img)
    assert x0.shape == (2, 4, 8, 8)
    assert tiny.decode(x0).shape == (2, 3, 16, 16)
    px = tiny_pixel.encode_images(img)
    assert torch.allclose(tiny_pixel.decode(px), img, atol=1e-6)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_training_loss_follows_prediction_type(pred):
    m = build_tiny_random(prediction_type=pred)
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 500, 990])
    y = m.encode_text(["a", "b", "c"])
    loss = m.training_loss(x0, y, t, noise)
    assert loss.shape == (3,)
    x_t = m.add_noise(x0, noise, t)
    pred_out = m.unet(x_t, t, encoder_hidden_states=y).sample
    target = noise if pred == "epsilon" else m.scheduler.get_velocity(x0, noise, t)
    expected = (pred_out - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    if pred == "v_prediction":  # the v target differs from eps, so the loss must differ from an eps loss
        assert not torch.allclose(target, noise)


def test_sampling_deterministic_per_seed(tiny):
    cfg = SamplingConfig(steps=3, guidance=7.0, batch_size=2)
    y = tiny.encode_text(["a red circle"] * 3)
    a = tiny.sample(y, [1, 2, 3], cfg)
    b = tiny.sample(y[:1], [2], cfg)
    assert a.shape == (3, 3, 16, 16)
    torch.testing.assert_close(a[1:2], b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[0], a[1])


def test_save_load_roundtrip(tmp_path, tiny):
    save_model(tiny, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    for k, v in tiny.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[k], v)
    torch.testing.assert_close(loaded.encode_text(["a red circle"]), tiny.encode_text(["a red circle"]))
    assert loaded.vae is not None


def test_missing_weights_error(tmp_path, tiny):
    save_model(tiny, tmp_path / "m")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DoriError, match="unet/diffusion_pytorch_model.safetensors"):
        load_model(str(tmp_path / "m"))


def test_hub_id_absent_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DoriError, match="not in the local Hugging Face cache"):
        load_model("CompVis/stable-diffusion-v1-4")


def test_pickle_refused_unless_allowed(tmp_path, tiny):
    folder = save_model(tiny, tmp_path / "m")
    unet_dir = folder / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny.unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(DoriError, match="pickle"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    torch.testing.assert_close(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_unknown_model_spec():
    with pytest.raises(DoriError, match="unknown model"):
        load_model("no-such-model")


def test_layer_targets(tiny):
    assert value_layers(tiny.unet) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    names = ffn_layers(tiny.unet)
    assert len(names) == 4 and names[1].startswith("mid_block")


def test_scale_channels_and_restore(tiny):
    before = _state(tiny)
    layer = value_layers(tiny.unet)[0]
    y = tiny.encode_text(["a red circle"])
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    ref = tiny.unet(x, t, encoder_hidden_states=y).sample
    with scale_output_channels(tiny.unet, {layer: [0, 3]}), record_activations(tiny.unet, [layer]) as acts:
        out = tiny.unet(x, t, encoder_hidden_states=y).sample
    assert torch.all(acts[layer][0][..., [0, 3]] == 0)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(tiny.unet(x, t, encoder_hidden_states=y).sample, ref)
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_weight_masks_apply_undo_save_load(tmp_path, tiny):
    before = _state(tiny)
    layer = ffn_layers(tiny.unet)[0]
    w = tiny.unet.get_submodule(layer).weight
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, :5] = True
    masks = WeightMasks({layer: mask}, {"method": "test"})
    masks.save(tmp_path / "m.safetensors")
    loaded = WeightMasks.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.masks[layer], mask) and loaded.meta["method"] == "test"
    with apply_weight_masks(tiny.unet, loaded):
        assert torch.all(tiny.unet.get_submodule(layer).weight[0, :5] == 0)
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(RuntimeError), apply_weight_masks(tiny.unet, loaded):
        raise RuntimeError("boom")
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_sd14_random_real_shapes():
    m = load_model("sd14-random")
    y = m.encode_text(["a photo"])
    assert y.shape == (1, 77, 768)
    assert m.sample_shape == (4, 64, 64)
    x0 = torch.randn(1, 4, 64, 64)
    emb = y.clone().requires_grad_(True)
    loss = m.training_loss(x0, emb, torch.tensor([500]), torch.randn_like(x0))
    loss.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    x = m.initial_noise([0])
    sched = m.ddim_scheduler(50)
    eps = m.predict_noise(x, sched.timesteps[0], y, m.null_embedding(), 7.0)
    assert sched.step(eps, sched.timesteps[0], x).prev_sample.shape == (1, 4, 64, 64)
