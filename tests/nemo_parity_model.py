"""The tiny seeded model behind the NeMo SD 2 schedule parity values (tests/test_nemo_parity_sd2.py).

SD-family components small enough for a CPU, with the shapes NeMo's reference code hard-codes: 512 px, so
4 x 64 x 64 latents, three cross-attention down blocks of two transformer layers each and a cross-attention
mid block (the reference hooks ``down_blocks[0..2].attentions[0..1]`` and ``mid_block.attentions[0]``), 77
text positions, SD v1.4's scheduler configuration (the reference samples with DDIM). The attention layers
attend to the text only (``only_cross_attention``), which keeps a step on 64 x 64 latents cheap. ``to_v`` is
scaled x10 and ``conv_out`` x100 so that blocking value neurons changes the noise prediction visibly (as for
the earlier NeMo comparison, PARITY.md). The same function built the components the reference ran on (the
script that ran it imported this file), and :func:`statistics` the OOD statistics both sides read.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dori.models.builders import SD_SCHEDULER, TOKENIZER_DIR
from dori.models.pipeline import T2IModel

PROMPT = "a red circle on blue"


def build_components(seed: int = 0) -> dict:
    """Tokenizer, text encoder, UNet and the reference's DDIM scheduler; the global random state is kept."""
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.model_max_length = 77
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            )
        )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8, only_cross_attention=True,
        )  # fmt: skip
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.mul_(10.0)
        unet.conv_out.weight.mul_(100.0)
        unet.conv_out.bias.mul_(100.0)
    for m in (text, unet):
        m.eval().requires_grad_(False)
    sched = DDIMScheduler.from_config(dict(SD_SCHEDULER))
    return {"tokenizer": tok, "text_encoder": text, "unet": unet, "scheduler": sched}


def statistics(parts: dict, prompts: tuple[str, ...] = ("a cat", "green field", "two boats", "old map")):
    """Per value layer (reference order) the mean and std over ``prompts`` of the token-mean of |to_v|
    at the first DDIM step without guidance, from seed 1 (what the reference's statistics script collects,
    on a handful of prompts)."""
    unet, tok, text = parts["unet"], parts["tokenizer"], parts["text_encoder"]
    layers = [
        unet.down_blocks[b].attentions[a].transformer_blocks[0].attn2.to_v for b in range(3) for a in range(2)
    ]
    layers.append(unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v)
    sched = DDIMScheduler.from_config(parts["scheduler"].config)
    sched.set_timesteps(50)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [m.register_forward_hook(lambda _m, _i, o, j=j: seen[j].append(o[0].abs().mean(0))) for j, m in
             enumerate(layers)]  # fmt: skip
    with torch.no_grad(), torch.random.fork_rng():
        for p in prompts:
            ids = tok(
                [p], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            torch.manual_seed(1)
            x = torch.randn(1, 4, 64, 64)
            unet(sched.scale_model_input(x, sched.timesteps[0]), sched.timesteps[0], text(ids)[0])
    for h in hooks:
        h.remove()
    means = [torch.stack(s).mean(0) for s in seen]
    stds = [torch.stack(s).std(0) for s in seen]
    return means, stds


def dori_model(parts: dict) -> T2IModel:
    sched = DDPMScheduler.from_config(dict(SD_SCHEDULER))
    return T2IModel(
        unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler=sched, vae=None, name="nemo-parity",
    ).eval()  # fmt: skip
