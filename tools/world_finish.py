"""Issue 3 lead: is the shipped world's UNet short of what its data allows?

Continues diffusion training of a world's (EMA) UNet on the world's own training mix (unique, vm x dups,
tm x dups; the same loss, caption dropout and EMA as ``dori miniworld train``) for STEPS steps at a low peak
learning rate, and writes a copy of the world with the new UNet to OUT. The copy's NeMo calibration is
dropped (it belongs to the old UNet). Compare the two worlds with ``dori audit`` / ``dori miniworld check``.

    python tools/world_finish.py --steps 600 --batch 128 --lr 3e-5 --out runs/world-finish
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dori.miniworld import generator as gen
from dori.miniworld import train_parts as parts
from dori.miniworld.train import PRESETS, _produce, training_rows
from dori.miniworld.train_unet import train_unet
from dori.models.loading import load_model, resolve

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="miniworld")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--lr", type=float, default=3e-5)
p.add_argument("--seed", type=int, default=100, help="seed of the continued run (batches, noise, dropout)")
p.add_argument(
    "--sets", default="unique,vm,tm", help="which training items to continue on (default: the whole mix)"
)
p.add_argument("--device", default="cpu")
p.add_argument("--out", type=Path, required=True)
a = p.parse_args()
chosen = a.sets.split(",")
if any(k not in ("unique", "vm", "tm") for k in chosen):
    p.error(f"--sets takes a comma list of unique, vm, tm; got {a.sets!r}")

src = Path(resolve(a.model))
world = json.loads((src / "dori_world.json").read_text())
spec = replace(PRESETS[world.get("preset", "full")].spec, **world["spec"])
t0 = time.time()
model = load_model(a.model, device=a.device)
uni, uni_captions, _ = _produce("unique", spec, list(range(spec.n_unique)), None)
vm, vm_captions, _ = _produce("vm", spec, list(range(spec.n_vm)), None)
tm = _produce("tm", spec, list(range(spec.n_tm * spec.tm_dups)), None)[0]
tm_captions = gen.titles(spec)[1]
ref = load_file(str(src / "sets" / "vm.safetensors"))["images"]
if not torch.equal(ref, vm):
    raise SystemExit(
        "the generator no longer renders this world's vm images: its training data cannot be rebuilt"
    )
print(f"data rebuilt in {time.time() - t0:.0f} s (vm images identical to the shipped ones)", flush=True)

cache = a.out.parent / f"{src.name}-finish-data.pt"  # latents and caption embeddings of the source world
if cache.exists():
    x0, emb = torch.load(cache).values()
else:
    with torch.no_grad():
        x0 = parts.latents(model.vae, torch.cat([uni, vm, tm]).to(model.device))
        emb = model.encode_text([""] + uni_captions + vm_captions + tm_captions).float()
    torch.save({"x0": x0, "emb": emb}, cache)
print(f"latents and embeddings ready at {time.time() - t0:.0f} s", flush=True)
emb_index, x0_index = (r.to(model.device) for r in training_rows(spec, chosen))
model.text_encoder.requires_grad_(False)
model.unet.requires_grad_(True)  # loaded models come frozen
t1 = time.time()
ema, done = train_unet(
    model, x0, emb, emb_index, x0_index, a.steps, a.batch, a.seed, lambda m: print(m, flush=True), lr=a.lr
)
print(f"{done} steps in {time.time() - t1:.0f} s", flush=True)

if a.out.exists():
    shutil.rmtree(a.out)
shutil.copytree(src, a.out, ignore=shutil.ignore_patterns("nemo"))
ema.save_pretrained(a.out / "unet", safe_serialization=True)
world["finish"] = {
    "from": str(src),
    "sets": chosen,
    "steps": done,
    "batch": a.batch,
    "lr": a.lr,
    "seed": a.seed,
}
(a.out / "dori_world.json").write_text(json.dumps(world, indent=1))
print(f"wrote {a.out}", flush=True)
