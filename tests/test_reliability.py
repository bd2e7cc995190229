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
