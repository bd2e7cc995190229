import json
import sys
import types
from pathlib import Path

import pytest
import torch

from dori.errors import DoriError
from dori.metrics import backends as B

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class _Probe(torch.nn.Module):
    """Reports what it was fed: height, width and the mean input value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = torch.full((n,), float(x.shape[-2]))
        w = torch.full((n,), float(x.shape[-1]))
        return torch.stack([h, w, x.mean(dim=(1, 2, 3)) * 1000], dim=1)


class _Pool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.zeros(x.shape[0], 2048, 1, 1)
        feats[:, 0] = float(x.shape[-1])
        feats[:, 1] = x.amin(dim=(1, 2, 3)).view(-1, 1, 1)
        feats[:, 2] = x.amax(dim=(1, 2, 3)).view(-1, 1, 1)
        return feats


class _Inception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


def test_sscd_resizes_to_320_normalizes_and_unit_rows(tmp_path):
    sscd = B.SSCD(_script(_Probe(), tmp_path / B.SSCD_FILE))
    mean_img = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 40, 24).clone()
    out = sscd(mean_img)
    assert out.shape == (2, 3)
    # input resized to 320x320 and normalized to zero mean -> direction (1, 1, 0)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0, 0.0]) / 2**0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert B.SSCD(tmp_path).path.name == B.SSCD_FILE  # a folder holding the file works too


def test_inception_pool_features(tmp_path):
    inc = B.InceptionPool(_script(_Inception(), tmp_path / B.INCEPTION_FILE))
    feats = inc(torch.cat([torch.ones(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)]))
    assert feats.shape == (2, 2048)
    assert feats[0, 0] == 299
    assert feats[0, 1] == pytest.approx((255 - 128) / 128) and feats[1, 1] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "cls,name,flag",
    [(B.SSCD, B.SSCD_FILE, "--sscd"), (B.InceptionPool, B.INCEPTION_FILE, "--inception")],
)
def test_missing_or_broken_files_name_the_file(tmp_path, cls, name, flag):
    with pytest.raises(DoriError, match=f"{name}.*{flag}"):
        cls(None)
    with pytest.raises(DoriError, match="not found") as err:
        cls(tmp_path / "nowhere" / name)
    assert "http" in str(err.value)
    bad = tmp_path / name
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(DoriError, match="not a TorchScript"):
        cls(bad)


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from dori.models.builders import load_tokenizer

    tok = load_tokenizer(16)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 32, "width": 32},
                "image_mean": list(B.CLIP_MEAN),
                "image_std": list(B.CLIP_STD),
            }
        )  # fmt: skip
    )
    return folder


def test_clip_from_local_folder(tmp_path):
    clip = B.CLIPAligner(_tiny_clip(tmp_path / "clip"))
    wide = torch.rand(2, 3, 20, 40)
    assert clip.preprocess(wide).shape == (2, 3, 32, 32)
    img = clip.image_features(wide)
    txt = clip.text_features(["a red circle", "a blue square"])
    assert img.shape == (2, 8) and txt.shape == (2, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(2))
    assert not torch.allclose(txt[0], txt[1])


def test_clip_missing_gives_clear_error(tmp_path):
    with pytest.raises(DoriError, match="not found"):
        B.CLIPAligner(tmp_path / "no-clip")
    with pytest.raises(DoriError, match="not available offline"):
        B.CLIPAligner("dori-tests/no-such-clip-model")


def test_load_backends_real_files_and_miniworld(tiny, tmp_path, monkeypatch):
    with pytest.raises(DoriError, match=B.SSCD_FILE):
        B.load_backends(tiny)
    sscd = _script(_Probe(), tmp_path / B.SSCD_FILE)
    inc = _script(_Inception(), tmp_path / B.INCEPTION_FILE)
    backends = B.load_backends(tiny, sscd=sscd, inception=inc)
    assert backends.threshold == 0.7 and backends.aligner is None
    assert backends.describe()["features"].startswith("inception")

    calls = []
    fake = types.ModuleType("dori.miniworld.standins")
    fake.load_standins = lambda world, device="cpu": calls.append((world, device)) or "standins"
    monkeypatch.setitem(sys.modules, "dori.miniworld.standins", fake)
    from dori.world import World

    monkeypatch.setattr(tiny, "world", World(tmp_path))
    assert B.load_backends(tiny) == "standins"
    assert calls == [(tmp_path, tiny.device)]
    assert B.load_backends(tiny, sscd=sscd).copy_detector.name.startswith("sscd")
