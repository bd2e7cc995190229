"""``dori finetune`` end to end on the tiny model with file item sets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dori.cli import main
from dori.models.loading import load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

    rc = main(["finetune", "esd", *common, "--iterations", "1", "--out", str(tmp_path / "esd")])
    assert rc == 0 and (tmp_path / "esd" / "model_index.json").exists()


def test_finetune_without_surrogates_is_a_clear_error(tmp_path, capsys):
    mem = _set(tmp_path, "mem", 1, 0)
    rc = main(
        ["finetune", "adversarial", "--model", "tiny-random", "--set", str(mem), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "--surrogate-mitigation nemo:DIR" in capsys.readouterr().err
