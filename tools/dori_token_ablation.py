"""Capacity ablation of Dori on the shipped miniworld (docs/results.md, world v2 session 9).

Dori moves only the first K of the embedding's token positions; the others keep the prompt's values (their
gradient is cut, so Adam leaves them where they are). Prints one JSON line: MR and the median best SSCD at
10, 25 and the last step, the mean L2 norm of y before and after (Fig. 7, right), and the mean loss of the
first and last 5 steps.

    python tools/dori_token_ablation.py K SET N [STEPS]      e.g.  python tools/dori_token_ablation.py 8 heldout 20

Generations go to runs/exp/tok-SET-K-N-STEPS (resumable per item, as every audit).
"""

import json
import sys
import time

import torch

from dori.attacks.dori import Dori, initial_embeddings
from dori.audit import resize_to
from dori.data.sets import load_set
from dori.evaluation import EvalConfig, Setting, dori_seed, evaluate_items
from dori.metrics.backends import load_backends
from dori.models.loading import load_model
from dori.runs import RunDir


def main(k: int, set_name: str, n: int, steps: int = 50) -> dict:
    model = load_model("miniworld")
    items = load_set(set_name, model, limit=n)
    backends = load_backends(model)
    config = EvalConfig()
    tokens = model.max_tokens
    mask = torch.zeros(1, tokens, 1)
    mask[:, :k] = 1
    loss = model.training_loss

    def masked_loss(x0, emb, t, noise, *args, **kwargs):  # positions >= k get no gradient
        return loss(x0, emb * mask + emb.detach() * (1 - mask), t, noise, *args, **kwargs)

    if k < tokens:
        model.training_loss = masked_loss
    index = list(range(len(items)))
    seeds = [dori_seed(config.seed, i) for i in index]
    y0 = initial_embeddings(model, [it.prompt for it in items], "prompt", seeds=seeds)
    x0 = model.encode_images(torch.stack([resize_to(it.image, model.image_size) for it in items]))
    start = time.time()
    res = Dori(steps=steps, snapshot_steps=(10, 25))(model, x0, y0, seeds)
    model.training_loss = loss
    out = {"K": k, "set": set_name, "n": n, "dori_s": time.time() - start}
    run = RunDir(f"runs/exp/tok-{set_name}-{k}-{n}-{steps}")
    for s, emb in ((10, res.snapshots[10]), (25, res.snapshots[25]), (steps, res.embeddings)):
        setting = Setting(key=f"dori{s}", label=f"dori{s}", attack="dori", dori_steps=s)
        recs = evaluate_items(
            model, items, index, backends, run, setting, config, embeddings=emb, progress=False
        )
        out[f"mr{s}"] = sum(r["replicated"] for r in recs) / len(recs)
        out[f"med{s}"] = float(torch.tensor([r["sscd_orig"]["max"] for r in recs]).median())
    out["init_norm"] = float(y0.flatten(1).norm(dim=1).mean())
    out["norm_end"] = float(res.norms[:, -1].mean())
    out["loss_first"] = float(res.losses[:, :5].mean())
    out["loss_last"] = float(res.losses[:, -5:].mean())
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    torch.set_num_threads(2)
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:]))))
