"""The tiny seeded model behind the UnlearnDiffAtk parity values (tests/test_uda_parity.py).

SD-family components small enough for a CPU, with the shapes the reference code hard-codes: a CLIP-style
vocabulary of 49,408 tokens whose end-of-text id is 49,407 (the shipped 1,181-token vocabulary with filler
entries before the two special tokens), 77 positions, 512 px images and 4 x 64 x 64 latents. The UNet's attention layers attend to the
text only (``only_cross_attention``), which keeps a step on 64 x 64 latents cheap on a CPU. The same
function built the components the reference ran on (it was imported by the script that ran it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dori.models.builders import SD_SCHEDULER, TOKENIZER_DIR
from dori.models.pipeline import T2IModel

VOCAB = 49408
PROMPT = "a red circle on blue"


def tokenizer_files(out: Path) -> Path:
    """The shipped tokenizer with filler entries so that <|startoftext|> = 49406, <|endoftext|> = 49407."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in specials]
    words += [f"zqfill{i:05d}</w>" for i in range(VOCAB - 2 - len(words))]
    (out / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words + specials)}))
    return out


def build_components(tmp: Path, seed: int = 0, scale: float = 1000.0) -> dict:
    """Tokenizer, text encoder, UNet and VAE, seeded; the global random state is left untouched.

    ``scale`` multiplies the UNet's output layer, so that the loss gradient with respect to the token
    distributions exceeds 1 in places and the reference's clipping of it changes the step.
    """
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_files(tmp / "tokenizer")))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            )
        )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8, only_cross_attention=True,
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=512,
            scaling_factor=0.18215,
        )  # fmt: skip
        image = torch.rand(3, 512, 512)
    with torch.no_grad():
        unet.conv_out.weight.mul_(scale)
        unet.conv_out.bias.mul_(scale)
    for m in (text, unet, vae):
        m.eval().requires_grad_(False)
    return {"tokenizer": tok, "text_encoder": text, "unet": unet, "vae": vae, "image": image}


def dori_model(parts: dict) -> T2IModel:
    sched = DDPMScheduler.from_config(dict(SD_SCHEDULER))
    return T2IModel(
        unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler=sched, vae=parts["vae"], name="uda-parity",
    ).eval()  # fmt: skip
