"""``dori finetune`` end to end on the tiny model with file item sets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dori.cli import main
from dori.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _set(folder, name, n, seed):
    rows = []
    for i in range(n):
        _image(folder / f"{name}{i}.png", seed + i)
        rows.append({"id": f"{name}{i}", "prompt": f"{name} thing {i}", "image": f"{name}{i}.png"})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_adversarial_and_esd_write_loadable_models(tmp_path, capsys):
    mem = _set(tmp_path, "mem", 2, 0)
    util = _set(tmp_path, "util", 3, 10)
    surr = tmp_path / "surr"
    for i in range(2):
        (surr / f"mem{i}").mkdir(parents=True)
        _image(surr / f"mem{i}" / "0.png", 50 + i)
    out = tmp_path / "adv"
    common = ["--model", "tiny-random", "--set", str(mem), "--no-progress"]
    rc = main(["finetune", "adversarial", *common, "--utility-set", str(util), "--surrogates", str(surr),
               "--epochs", "1", "--dori-steps", "1", "--steps-per-embedding", "1", "--out", str(out),
               "--json", str(tmp_path / "adv.json")])  # fmt: skip
    assert rc == 0
    tuned = load_model(str(out))
    base = load_model("tiny-random")
    assert any(
        not torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), base.unet.parameters(), strict=True)
    )
    summary = json.loads((tmp_path / "adv.json").read_text())
    assert summary["settings"]["epochs"] == 1 and summary["skipped"] == {}
    assert (out / "checkpoints" / "epoch-0001" / "train_state.pt").exists()

    esd = ["--iterations", "1", "--resolution", "model", "--out", str(tmp_path / "esd")]
    rc = main(["finetune", "esd", *common, *esd])
    assert rc == 0 and (tmp_path / "esd" / "model_index.json").exists()


@pytest.mark.parametrize("command", [["finetune", "adversarial"], ["mitigate", "adversarial-ft"]])
def test_default_path_needs_no_surrogate_flag(tmp_path, monkeypatch, command):
    # `dori mitigate adversarial-ft` (the spelling) is the same command as `dori finetune adversarial`;
    # with no surrogate option the memorizing model makes its own, every one under the replication threshold
    import torch.nn.functional as F

    from dori.metrics.features import Backends

    class Copy:
        name = "pixel-copy"

        def __call__(self, images):
            x = F.interpolate(images.float(), size=(8, 8), mode="area").flatten(1)
            return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    class Aligner:
        name = "mean-colour"

        def image_features(self, images):
            return F.normalize(images.float().mean((2, 3)), dim=1)

        def text_features(self, prompts):
            return F.normalize(torch.tensor([[len(p) % 5 + 1.0, 1.0, 2.0] for p in prompts]), dim=1)

    threshold = 0.2  # low: a part of the tiny model's own generations count as replicas and must be left out
    monkeypatch.setattr(
        "dori.metrics.backends.load_backends", lambda *a, **k: Backends(Copy(), threshold, Aligner(), None)
    )
    mem = _set(tmp_path, "mem", 2, 0)
    util = _set(tmp_path, "util", 3, 10)
    out = tmp_path / "o"
    rc = main([*command, "--model", "tiny-random", "--set", str(mem), "--utility-set", str(util), "--epochs", "1",
               "--dori-steps", "1", "--steps-per-embedding", "1", "--sample-steps", "2", "--out", str(out),
               "--no-progress", "--json", str(tmp_path / "adv.json")])  # fmt: skip
    assert rc == 0
    index = json.loads((out / "surrogates" / "surrogates.json").read_text())
    assert index["settings"]["policy"] == "self" and index["failed"] == {}
    assert set(index["items"]) == {"mem0", "mem1"}
    for entry in index["items"].values():
        assert entry["similarity"] and max(entry["similarity"]) < threshold
        assert len(entry["alignment"]) == len(entry["similarity"]) == len(entry["source"])
    summary = json.loads((tmp_path / "adv.json").read_text())
    assert summary["skipped"] == {} and summary["settings"]["init_schedule"] == "both"


def test_surrogate_model_is_the_fallback_for_items_the_mitigation_leaves_replicating(tmp_path, monkeypatch):
    import dori.mitigations as mitigations
    import dori.mitigations.surrogate_policy as policy
    import dori.mitigations.surrogates as surrogates

    calls = []

    def fake_generate(generator, items, similarity, threshold, mitigation=None, **kw):
        calls.append(([it.id for it in items], mitigation is not None))
        out = surrogates.SurrogateSet()
        for it in items:
            if mitigation is not None and it.id == "mem1":
                out.failed[it.id] = "all candidates are replicas"
            else:
                out.images[it.id] = torch.rand(2, 3, 16, 16)
                out.similarity[it.id] = [0.1, 0.2]
        return out

    class Fitted:
        name, source, applied = "nemo", "unused", object()

    class Detector:
        name = "fake-copy-detector"

        def __call__(self, images):
            return images.flatten(1)

    class Backends:
        copy_detector, threshold = Detector(), 0.8

    import dori.commands.finetune_common as finetune_cmd

    monkeypatch.setattr(
        finetune_cmd, "copy_check", lambda args, model: (Detector(), Backends.threshold, Detector.name)
    )
    monkeypatch.setattr(policy, "generate_surrogates", fake_generate)
    monkeypatch.setattr(mitigations, "load_mitigation", lambda spec: Fitted())
    mem = _set(tmp_path, "mem", 3, 0)
    util = _set(tmp_path, "util", 2, 10)
    out = tmp_path / "adv"
    rc = main(["finetune", "adversarial", "--model", "tiny-random", "--set", str(mem), "--no-progress",
               "--utility-set", str(util), "--surrogate-mitigation", "nemo:unused", "--surrogate-model",
               "tiny-random", "--epochs", "1", "--dori-steps", "1", "--steps-per-embedding", "1",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    # the mitigation is tried on every item; the other model only on the one it failed for
    assert calls == [(["mem0", "mem1", "mem2"], True), (["mem1"], False)]
    index = json.loads((out / "surrogates" / "surrogates.json").read_text())
    assert index["settings"]["fallback_items"] == ["mem1"] and index["failed"] == {}
    assert sorted(index["items"]) == ["mem0", "mem1", "mem2"]


def test_surrogate_set_merge_fills_only_missing_items():
    from dori.mitigations.surrogates import SurrogateSet

    a = SurrogateSet(images={"x": torch.zeros(1, 3, 4, 4)}, similarity={"x": [0.1]}, failed={"y": "replicas"})
    b = SurrogateSet(
        images={"x": torch.ones(1, 3, 4, 4), "y": torch.ones(2, 3, 4, 4)}, similarity={"y": [0.2, 0.3]}
    )
    a.merge(b)
    assert torch.equal(a.images["x"], torch.zeros(1, 3, 4, 4)) and a.images["y"].shape[0] == 2
    assert a.failed == {} and a.similarity["y"] == [0.2, 0.3]
    c = SurrogateSet(failed={"z": "replicas"})
    c.merge(SurrogateSet(failed={"z": "also replicas"}))
    assert c.failed["z"] == "replicas; fallback: also replicas"
