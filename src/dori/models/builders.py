"""Built-in architectures, constructed in code with random weights (seeded).

* ``tiny-random``: a few-thousand-parameter latent SD-family pipeline for unit tests.
* ``sd14-random`` / ``sd2-random`` / ``sd2-768-random``: the real Stable Diffusion v1.4 / 2-base / 2 (768-v)
  architectures with random weights. Timing does not depend on weight values, so these are what the
  benchmarks and shape tests run on.

All use dori's shipped tokenizer files (``dori/assets/tokenizer``); no hub access.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dori.models.pipeline import T2IModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD2_UNET = dict(
    SD14_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

CLIP_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
OPENCLIP_H14_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1024,
)


def load_tokenizer(max_length: int) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.model_max_length = max_length
    return tok


def _text_encoder(config: dict, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(CLIPTextConfig(**config, **ids))


def build_tiny_random(seed: int = 0, prediction_type: str = "epsilon", latent: bool = True) -> T2IModel:
    """A tiny SD-family pipeline (latent 4x8x8 from 16x16 images, or pixel 3x16x16) for tests."""
    torch.manual_seed(seed)
    tok = load_tokenizer(8)
    text = _text_encoder(
        dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=8,
        ),
        tok,
    )
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=8 if latent else 16,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = None
    if latent:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=0.18215,
        )
    sched = DDPMScheduler.from_config(dict(SD_SCHEDULER, prediction_type=prediction_type))
    return T2IModel(
        unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, vae=vae, name="tiny-random"
    ).eval()


def build_sd_random(version: str = "1.4", seed: int = 0, with_vae: bool = True) -> T2IModel:
    """Stable Diffusion v1.4 / 2-base / 2 (768-v) architecture with random weights."""
    torch.manual_seed(seed)
    tok = load_tokenizer(77)
    if version == "1.4":
        unet_cfg, text_cfg, pred, name = SD14_UNET, CLIP_L14_TEXT, "epsilon", "sd14-random"
    elif version == "2-base":
        unet_cfg, text_cfg, pred, name = SD2_UNET, OPENCLIP_H14_TEXT, "epsilon", "sd2-random"
    elif version == "2-768":
        unet_cfg, text_cfg, pred, name = (
            dict(SD2_UNET, sample_size=96),
            OPENCLIP_H14_TEXT,
            "v_prediction",
            "sd2-768-random",
        )
    else:
        raise ValueError(f"unknown SD version {version!r}")
    unet = UNet2DConditionModel(**unet_cfg)
    text = _text_encoder(text_cfg, tok)
    vae = AutoencoderKL(**SD_VAE) if with_vae else None
    sched = DDPMScheduler.from_config(dict(SD_SCHEDULER, prediction_type=pred))
    return T2IModel(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, vae=vae, name=name).eval()
