"""Concept Ablation against numbers from its reference code (nupurkmr9/concept-ablation).

How the expected values were made (outside the project; the project holds none of the reference's code):
nupurkmr9/concept-ablation at commit c11fb1bdc7cd97ea65877b0d41722f5e3ef2561f, ``diffusers/train.py``
``main(parse_args(...))`` run once on CPU in fp32 with the memorization example's options
``--concept_type memorization --caption_target "*+blue square" --with_prior_preservation --prior_loss_weight 1.0
--train_batch_size 2 --learning_rate 5e-7 --scale_lr --parameter_group full-weight --hflip`` and
``--max_train_steps 1 --resolution 64 --num_class_images 3 --dataloader_num_workers 0`` (seed 42, the
default). The model: the ``tiny`` fixture's UNet and text encoder (``build_tiny_random(seed=0)``) with a VAE of
four blocks (x8 downsampling, as the script's mask assumes), built below, saved as a diffusers folder.
Data: three 64x64 anchor images already in the class folder (so none were generated), images
``np.random.RandomState(s).randint(0, 256, (64, 64, 3), dtype=uint8)``: s = 1 "a square", s = 2 "a blue shape",
and the memorized image (s = 0) itself as a third anchor, which the script's ``filter`` drops.
Import shims only: torchvision replaced by a stub (ToTensor, Normalize, PIL flips drawn with ``torch.rand(1)``
as torchvision does; same-size Resize/RandomCrop are identities here), ``openai`` stubbed,
``transformers.CLIPFeatureExtractor`` aliased to its new name, the SSCD torchscript replaced by a fixed
embedding (the filter's threshold rule is what runs), and the draws of the training step
(``latent_dist.sample()``, ``torch.randn_like``, ``torch.randint``) taken from one CPU generator seeded 4321.

Recorded: the batch the script built (which anchors, flips, and its NumPy draws for the resize augmentation:
scale 49 at (14, 10), then scale 80 at (6, 10) with the prefix "zoomed in "), the total and prior losses, the
learning rate after ``--scale_lr``, the gradient norm before clipping, and the first six ``conv_in`` weights
after the AdamW step.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from dori.mitigations.concept_ablation import ConceptAblation, bos_detach_hooks
from dori.mitigations.concept_ablation_data import Augment, draw_augment, resize_augment

REFERENCE = {
    "augment": [(49, 14, 10, ""), (80, 6, 10, "zoomed in ")],
    "mask_sums": [16.0, 64.0],
    "loss": 0.9168025255203247,
    "prior_loss": 0.8992957472801208,
    "lr": 2e-06,
    "grad_norm_before_clip": 2.3949737548828125,
    "conv_in_after": [
        -0.01619017869234085,
        -0.12916220724582672,
        -0.060563359409570694,
        -0.06875582039356232,
        0.07838901877403259,
        0.02323675900697708,
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_x8():
    from dori.models.builders import build_tiny_random

    m = build_tiny_random(seed=0)
    torch.manual_seed(0)
    m.vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()
    return m


def _image(seed):
    a = np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255


def test_augmentation_draws_and_masks_match_reference():
    rng = np.random.RandomState(42)  # the script's set_seed(42) seeds NumPy's global generator
    augs = [draw_augment(rng, 64) for _ in range(2)]
    assert [(a.scale, a.top, a.left, a.prefix) for a in augs] == REFERENCE["augment"]
    for aug, want in zip(augs, REFERENCE["mask_sums"], strict=True):
        img, mask = resize_augment(_image(1), aug, 8)
        assert img.shape == (3, 64, 64) and float(mask.sum()) == want
    small = resize_augment(_image(1), Augment(49, 14, 10, ""), 8)[0]
    assert float(small[:, :14].abs().sum()) == 0.0  # the canvas outside the pasted image is zero (grey)


def test_ca_loss_learning_rate_and_step_match_reference(tiny_x8):
    ca = ConceptAblation()  # dori's defaults, which are the reference's
    assert ca.learning_rate == pytest.approx(REFERENCE["lr"], rel=1e-12)
    square, shape = (_image(1), "a square", "blue square"), (_image(2), "a blue shape", "blue square")
    inst, prior = [shape, square], [square, shape]  # the script's batch: instances 2, 1; class images 1, 2
    flips = [True, False, True, False]  # instance 0, class 0, instance 1, class 1
    augs = [Augment(*a) for a in REFERENCE["augment"]]
    model = tiny_x8
    from dori.mitigations.training import trainable_copy

    ft = trainable_copy(model)
    ft.unet.requires_grad_(True)
    ft.unet.train()
    hooks = bos_detach_hooks(ft.unet)
    gen = torch.Generator().manual_seed(4321)
    l_abl, l_prior = ca.losses(ft, inst, prior, flips, augs, gen)
    loss = l_abl + ca.prior_loss_weight * l_prior
    assert float(loss.detach()) == pytest.approx(REFERENCE["loss"], rel=1e-5)
    assert float(l_prior.detach()) == pytest.approx(REFERENCE["prior_loss"], rel=1e-5)
    loss.backward()
    for h in hooks:
        h.remove()
    params = list(ft.unet.parameters())
    norm = torch.nn.utils.clip_grad_norm_(params, ca.grad_clip)
    assert float(norm) == pytest.approx(REFERENCE["grad_norm_before_clip"], rel=1e-5)
    opt = torch.optim.AdamW(params, lr=ca.learning_rate, weight_decay=ca.weight_decay)
    opt.step()
    after = params[0].detach().flatten()[:6]
    torch.testing.assert_close(after, torch.tensor(REFERENCE["conv_in_after"]), rtol=0, atol=1e-8)


def test_ca_gradient_without_the_bos_detach_is_not_the_reference(tiny_x8):
    """The gradient check can fail: with gradients through the first token's key/value it misses."""
    from dori.mitigations.training import trainable_copy

    ca = ConceptAblation()
    square, shape = (_image(1), "a square", "blue square"), (_image(2), "a blue shape", "blue square")
    ft = trainable_copy(tiny_x8)
    ft.unet.requires_grad_(True)
    ft.unet.train()
    augs = [Augment(*a) for a in REFERENCE["augment"]]
    l_abl, l_prior = ca.losses(
        ft,
        [shape, square],
        [square, shape],
        [True, False, True, False],
        augs,
        torch.Generator().manual_seed(4321),
    )
    (l_abl + l_prior).backward()
    norm = float(torch.stack([p.grad.norm() for p in ft.unet.parameters()]).norm())
    assert norm != pytest.approx(REFERENCE["grad_norm_before_clip"], rel=1e-4)
