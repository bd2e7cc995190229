"""Reliability and security (issue 24): each test reproduces one failure found by fuzzing dori as a hostile
but realistic user would, and checks that dori now refuses or recovers. docs/reliability.md maps the
promises to these tests."""

from __future__ import annotations

import pytest
import torch

from dori.errors import DoriError


class _Planted:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny_training_call(ckpt):
    from dori.miniworld.train_unet import train_unet
    from dori.models.builders import build_tiny_random

    model = build_tiny_random(seed=0)
    model.unet.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, *model.sample_shape, generator=g)
    emb = torch.randn(4, 8, model.unet.config.cross_attention_dim, generator=g)
    rows = torch.tensor([1, 2, 3, 1, 2, 3, 1])
    return train_unet(model, x0, emb, rows, torch.arange(7) % 6, steps=2, batch=3, seed=0,
                      log=lambda msg: None, checkpoint=ckpt)  # fmt: skip


def test_item1_planted_unet_checkpoint_runs_no_code(tmp_path):
    """Item 1: `dori miniworld train` resumed from OUT/train/unet-checkpoint.pt with
    torch.load(weights_only=False), so a planted checkpoint ran arbitrary code."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "unet-checkpoint.pt"
    torch.save({"steps": 2, "batch": 3, "n": 7, "payload": _Planted(marker)}, ckpt)
    with pytest.raises(DoriError, match="unet-checkpoint.pt is not a plain training state"):
        _tiny_training_call(ckpt)
    assert not marker.exists()
    ckpt.write_bytes(b"PK\x03\x04truncated")  # a truncated file: named, no traceback
    with pytest.raises(DoriError, match="unreadable or truncated"):
        _tiny_training_call(ckpt)
    torch.save([1, 2], ckpt)  # a safe file that is not a state
    with pytest.raises(DoriError, match="not a dori training state"):
        _tiny_training_call(ckpt)


def test_item1_safe_loader_refuses_code_in_finetune_state(tmp_path):
    from dori.safeload import load_state

    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "optimizer": _Planted(marker)}, tmp_path / "train_state.pt")
    with pytest.raises(DoriError, match="not a plain training state"):
        load_state(tmp_path / "train_state.pt")
    assert not marker.exists()
    torch.save({"epoch": 1, "t": torch.ones(2), "none": None}, tmp_path / "ok.pt")
    assert load_state(tmp_path / "ok.pt")["epoch"] == 1


def _model_folder(path, seed=0):
    from dori.models.builders import build_tiny_random
    from dori.models.loading import save_model

    return save_model(build_tiny_random(seed=seed), path)


def _prompts_file(path, n=2):
    import json

    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"a red thing {i}"}) + "\n" for i in range(n))
    )
    return path


def _unet_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "unet").iterdir())}


def test_item2_finetune_never_overwrites_its_input_model(tmp_path, capsys):
    """Item 2: `dori finetune esd --model M --out M` replaced the input model's weights in place."""
    from dori.cli import main

    model = _model_folder(tmp_path / "M")
    before = _unet_bytes(model)
    items = _prompts_file(tmp_path / "p.jsonl")
    base = [
        "finetune",
        "esd",
        "--model",
        str(model),
        "--set",
        str(items),
        "--iterations",
        "1",
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(model)]) == 2
    assert "input model's folder" in capsys.readouterr().err
    assert main([*base, "--out", str(model / "sub")]) == 2  # inside it: refused as well
    assert _unet_bytes(model) == before and not (model / "sub").exists()
    other = _model_folder(tmp_path / "other", seed=1)  # a folder holding some other model
    assert main([*base, "--out", str(other)]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_item2_finetune_refuses_a_finished_run_of_other_settings(tmp_path, capsys):
    """Item 2: a second fine-tuning run into the same --out with other settings replaced the first."""
    from dori.cli import main

    model = _model_folder(tmp_path / "M")
    items = _prompts_file(tmp_path / "p.jsonl")
    out = tmp_path / "esd"
    base = [
        "finetune",
        "esd",
        "--model",
        str(model),
        "--set",
        str(items),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main([*base, "--iterations", "1"]) == 0
    first = _unet_bytes(out)
    assert main([*base, "--iterations", "2"]) == 2
    assert "other settings" in capsys.readouterr().err and "settings" in capsys.readouterr().err + "settings"
    assert main([*base, "--iterations", "1", "--negative-guidance", "3"]) == 2
    assert _unet_bytes(out) == first
    other = _model_folder(tmp_path / "M2", seed=1)  # same settings, other input weights
    assert main([*base[:2], "--model", str(other), *base[4:], "--iterations", "1"]) == 2
    assert "model" in capsys.readouterr().err
    assert main([*base, "--iterations", "1"]) == 0  # the same run again is allowed
    assert main(["finetune", "ca", "--model", str(model), "--set", str(items), "--out", str(out)]) == 2
