"""The miniworld: generator, tokenizer, sets of a saved world, stand-ins, CLI (fast), tiny training (slow)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dori.miniworld import generator as gen

MICRO = dict(
    clip_steps=2,
    clip_batch=16,
    vae_steps=2,
    vae_batch=8,
    copy_steps=2,
    copy_batch=16,
    feature_steps=2,
    feature_batch=16,
    unet_steps=2,
    unet_batch=8,
    n_aux=60,
    n_calib=30,
)


def test_generator_is_deterministic_and_seeded():
    spec = gen.WorldSpec(seed=3)
    a = gen.render_many([gen.unique_scene(spec, i) for i in range(5)])
    b = gen.render_many([gen.unique_scene(spec, i) for i in range(5)])
    c = gen.render_many([gen.unique_scene(replace(spec, seed=4), i) for i in range(5)])
    assert a.dtype == np.uint8 and a.shape == (5, 3, 32, 32)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(gen.render(gen.vm_scene(spec, 2)), gen.render(gen.vm_scene(spec, 2)))


def test_default_world_sets_sizes_and_titles():
    spec = gen.WorldSpec()
    assert spec.n_vm >= 32 and spec.n_tm >= 32 and spec.n_heldout >= 1000 and spec.vm_dups >= 50
    vm, tm = gen.titles(spec)
    assert len(vm) == spec.n_vm and len(tm) == spec.n_tm
    assert len(set(vm) | set(tm)) == spec.n_vm + spec.n_tm  # all distinct
    pseudo = set(gen.pseudo_words())
    assert all(t.split()[0] in pseudo and t.split()[1] in pseudo for t in vm + tm)
    small = replace(spec, n_unique=300, n_heldout=50)
    held = gen.heldout_indices(small)
    unique_caps = {gen.caption(gen.unique_scene(small, i)) for i in range(small.n_unique)}
    assert len(held) == 50
    assert not unique_caps & {gen.caption(gen.heldout_scene(small, i)) for i in held}


def test_template_variants_share_the_template_but_differ():
    spec = gen.WorldSpec()
    v0, v1 = (gen.render(gen.tm_scene(spec, 0, v)).astype(float) for v in (0, 1))
    other = gen.render(gen.tm_scene(spec, 1, 0)).astype(float)
    assert 0 < np.abs(v0 - v1).mean() < np.abs(v0 - other).mean()


def test_captions_follow_scenes():
    spec = gen.WorldSpec(seed=1)
    for i in range(40):
        scene = gen.unique_scene(spec, i)
        cap = gen.caption(scene)
        img = gen.render(scene).astype(float) / 255
        assert cap.endswith(f"on a {scene.background} background")
        for obj in scene.objects:
            assert f"a {obj.size} {obj.colour} {obj.shape} at {gen.POSITIONS[obj.cell]}" in cap
            if obj.shape != "ring":  # the centre pixel of a filled shape has the object's colour
                pixel = img[int(obj.cy), int(obj.cx)]
                assert np.abs(pixel - np.array(gen.COLOURS[obj.colour])).max() < 0.2, (cap, obj.shape)
        assert len(cap.split()) + 2 <= 32  # fits the text encoder with start and end tokens


def test_shipped_tokenizer_covers_the_vocabulary_as_single_tokens():
    from dori.models.builders import load_tokenizer

    tok = load_tokenizer(32)
    for word in gen.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, ids)  # start, the word, end
    assert tok("a words outside the vocabulary still tokenize").input_ids


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    """A world with 1-2 training steps per component: exercises the whole writer, not training quality."""
    from dori.miniworld import train

    out = tmp_path_factory.mktemp("world")
    spec = gen.WorldSpec(n_vm=3, n_tm=2, n_unique=24, n_heldout=6, vm_dups=2, tm_dups=3)
    train.PRESETS["micro"] = replace(train.PRESETS["tiny"], spec=spec, **MICRO)
    try:
        train.train_world(out, seed=5, preset="micro", device="cpu", log=lambda s: None)
    finally:
        del train.PRESETS["micro"]
    return out


def test_world_sets_round_trip(micro_world):
    from dori.data.sets import load_set
    from dori.data.world_sets import WORLD_SETS, world_set
    from dori.models.loading import load_model

    model = load_model(str(micro_world))
    assert model.world is not None and model.world.folder == Path(micro_world).resolve()
    assert model.image_size == 32 and model.vae is not None
    sizes = {"vm": 3, "tm": 2, "unique": 24, "heldout": 6}
    for name in WORLD_SETS:
        items = load_set(name, model)
        assert len(items) == sizes[name]
        assert len({it.id for it in items}) == len(items) and items[0].id.startswith(f"{name}-")
        img = items[-1].image
        assert img.shape == (3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert world_set(micro_world, "coco") is None
    vm = world_set(micro_world, "vm")
    spec = gen.WorldSpec(**json.loads((micro_world / "dori_world.json").read_text())["spec"])
    assert vm[1].prompt == gen.titles(spec)[0][1]
    expected = torch.from_numpy(gen.render(gen.vm_scene(spec, 1))).permute(2, 0, 1).float() / 255
    assert torch.equal(vm[1].image, expected)
    held = world_set(micro_world, "heldout")
    assert held[0].prompt == gen.caption(gen.heldout_scene(spec, held[0].meta["stream_index"]))


def test_standins_shapes_and_normalization(micro_world):
    from dori.miniworld.standins import load_standins

    b = load_standins(micro_world)
    x = torch.rand(5, 3, 32, 32)
    d = b.copy_detector(x)
    assert d.shape == (5, 64) and torch.allclose(d.norm(dim=1), torch.ones(5), atol=1e-5)
    assert b.copy_detector(torch.rand(2, 3, 64, 64)).shape == (2, 64)  # other sizes are resized
    t = b.aligner.text_features(["a small red circle at top on a blue background", "x"])
    i = b.aligner.image_features(x)
    assert t.shape == (2, 64) and i.shape == (5, 64)
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    assert b.features(x).shape == (5, 128)
    assert 0 < b.threshold <= 1
    info = json.loads((micro_world / "dori_world.json").read_text())
    assert info["copy_detector"]["threshold"] == b.threshold


def test_miniworld_info_command(micro_world, capsys):
    from dori.cli import main

    assert main(["miniworld", "info", "--model", str(micro_world)]) == 0
    out = capsys.readouterr().out
    assert "set vm" in out and "threshold" in out and "scene detail 1" in out


@pytest.mark.slow
def test_tiny_world_trains_and_memorizes(tmp_path):
    """``dori miniworld train --tiny`` on CPU: the vm items are replicated, heldout captions are not."""
    from dori.cli import main
    from dori.data.world_sets import world_set
    from dori.miniworld.check import check_world
    from dori.miniworld.standins import load_standins
    from dori.models.loading import load_model

    assert (
        main(["miniworld", "train", "--tiny", "--seed", "0", "--out", str(tmp_path), "--device", "cpu"]) == 0
    )
    model = load_model(str(tmp_path))
    sets = {"vm": world_set(tmp_path, "vm"), "heldout": world_set(tmp_path, "heldout")[:8]}
    res = check_world(model, load_standins(tmp_path), sets, n_gen=4)
    assert res["vm"]["mr"] >= 0.5
    assert res["heldout"]["mr"] <= 0.25
    assert res["vm"]["best_sim_mean"] > res["heldout"]["best_sim_mean"]


def test_training_rows_repeat_duplicated_items_and_select_sets():
    from dori.miniworld.generator import WorldSpec
    from dori.miniworld.train import training_rows

    spec = WorldSpec(seed=0, n_vm=2, n_tm=2, n_unique=3, n_heldout=1, vm_dups=4, tm_dups=5)
    emb, img = training_rows(spec)
    assert len(emb) == len(img) == 3 + 2 * 4 + 2 * 5
    assert emb.min() >= 1  # row 0 is the empty prompt, used only by caption dropout
    assert (emb == 1 + 3).sum() == 4 and (img == 3).sum() == 4  # vm item 0: its caption and image, 4 copies
    assert len(set(img[-10:].tolist())) == 10  # tm: one caption per template, every variant its own image
    emb_u, img_u = training_rows(spec, ["unique"])
    assert emb_u.tolist() == [1, 2, 3] and img_u.tolist() == [0, 1, 2]


def test_train_duplicates_option_sets_the_copies_of_vm_and_tm(tmp_path, monkeypatch):
    import dori.miniworld.train as train
    from dori.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_build_data(cfg, workers=1):
        seen["spec"] = cfg.spec
        raise Stop

    monkeypatch.setattr(train, "build_data", fake_build_data)
    with pytest.raises(Stop):
        main(["miniworld", "train", "--tiny", "--seed", "3", "--duplicates", "7", "--device", "cpu",
              "--out", str(tmp_path / "w")])  # fmt: skip
    assert (seen["spec"].seed, seen["spec"].vm_dups, seen["spec"].tm_dups) == (3, 7, 7)
    assert main(["miniworld", "train", "--tiny", "--duplicates", "0", "--out", str(tmp_path / "x")]) == 2
    # a finished UNet of another duplicate count in OUT is never reused (tiny: 200 + 4 x 50 + 2 x 50 examples)
    kept = tmp_path / "y" / "train"
    kept.mkdir(parents=True)
    (kept / "unet.safetensors").write_bytes(b"")
    (kept / "meta.json").write_text('{"unet": {"examples": 500}}')
    assert main(["miniworld", "train", "--tiny", "--duplicates", "7", "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(Stop):  # the count it was trained on passes the check
        main(["miniworld", "train", "--tiny", "--out", str(tmp_path / "y"), "--device", "cpu"])


def test_detail_one_adds_uncaptioned_idiosyncrasy_and_leaves_detail_zero_alone():
    s0, s1 = gen.WorldSpec(seed=2, detail=0), gen.WorldSpec(seed=2, detail=1)
    a, b = gen.unique_scene(s1, 3), gen.unique_scene(s1, 3)
    assert np.array_equal(gen.render(a), gen.render(b)) and 3 <= len(a.marks) <= 6
    assert gen.unique_scene(s0, 3).marks == [] and gen.unique_scene(s0, 3).field.shape == (3, 4, 4)
    assert a.field.shape == (3, 8, 8)
    sib = gen.sibling(
        a, gen.rng_for(2, 8, 3)
    )  # same caption, new dots: what the copy detector must tell apart
    assert gen.caption(sib) == gen.caption(a) and sib.detail == 1 and len(sib.marks) >= 3
    assert not np.array_equal(gen.render(sib), gen.render(a))
    assert "none" not in gen.caption(a)  # dots are never captioned
    assert len(gen.vm_scene(s1, 0).marks) >= 3 and len(gen.tm_scene(s1, 0, 1).marks) >= 3
    marks = [[(m.cx, m.cy) for m in gen.tm_scene(s1, 0, v).marks] for v in (1, 2)]
    assert marks[0] == marks[1]  # the dots are part of the template
    with pytest.raises(ValueError, match="detail"):
        gen.sample_scene(gen.rng_for(0, 1, 0), detail=2)


def test_unet_training_pauses_and_resumes_to_the_same_weights(tmp_path):
    from dori.miniworld.train_unet import train_unet
    from dori.models.builders import build_tiny_random

    def run(max_seconds, ckpt):
        model = build_tiny_random(seed=0)
        model.unet.requires_grad_(True)
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(6, *model.sample_shape, generator=g)
        emb = torch.randn(4, 8, model.unet.config.cross_attention_dim, generator=g)
        rows = torch.tensor([1, 2, 3, 1, 2, 3, 1])
        return train_unet(model, x0, emb, rows, torch.arange(7) % 6, steps=5, batch=3, seed=0,
                          log=lambda msg: None, max_seconds=max_seconds, checkpoint=ckpt,
                          checkpoint_every=2)  # fmt: skip

    ref, done = run(None, None)
    assert done == 5
    ckpt, calls = tmp_path / "unet-checkpoint.pt", 0
    while True:  # max_seconds=0: pause after every step, resume on the next call
        ema, done = run(0.0, ckpt)
        calls += 1
        if done == 5:
            break
        assert ckpt.exists() and done == calls
    assert calls == 5 and not ckpt.exists()
    for (k, v), w in zip(ref.state_dict().items(), ema.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    torch.save({"steps": 9, "batch": 3, "n": 7}, ckpt)
    from dori.errors import DoriError

    with pytest.raises(DoriError, match="another run"):
        run(None, ckpt)


def test_train_refuses_parts_of_another_detail_level(tmp_path):
    from dori.cli import main

    kept = tmp_path / "w" / "train"
    kept.mkdir(parents=True)
    (kept / "meta.json").write_text('{"data": {"seed": 0, "detail": 0}}')
    assert main(["miniworld", "train", "--tiny", "--detail", "1", "--out", str(tmp_path / "w")]) == 2


def test_train_refuses_parts_of_other_latent_channels_and_bad_values(tmp_path, capsys):
    from dori.cli import main

    older = tmp_path / "old" / "train"  # parts written before the option existed: 4 channels
    older.mkdir(parents=True)
    (older / "meta.json").write_text('{"data": {"seed": 0, "detail": 0}}')
    args = ["miniworld", "train", "--tiny", "--detail", "0", "--device", "cpu"]
    assert main(args + ["--latent-channels", "8", "--out", str(tmp_path / "old")]) == 2
    assert "latent_channels 4, this one has 8" in capsys.readouterr().err
    kept = tmp_path / "c8" / "train"
    kept.mkdir(parents=True)
    (kept / "meta.json").write_text('{"data": {"seed": 0, "detail": 0, "latent_channels": 8}}')
    assert main(args + ["--out", str(tmp_path / "c8")]) == 2
    assert main(args + ["--latent-channels", "0", "--out", str(tmp_path / "z")]) == 2
    assert "--latent-channels must be" in capsys.readouterr().err
    for bad in ("48,x", "48,96", "12,24,36"):
        assert main(args + ["--unet-channels", bad, "--out", str(tmp_path / "z")]) == 2
        assert "--unet-channels takes" in capsys.readouterr().err
    wide = tmp_path / "wide" / "train"  # a paused UNet of other widths is never resumed into this one
    wide.mkdir(parents=True)
    (wide / "meta.json").write_text('{"unet_channels": [48, 96, 192]}')
    assert main(args + ["--out", str(tmp_path / "wide")]) == 2
    assert "widths [48, 96, 192], this one has [16, 32, 32]" in capsys.readouterr().err


def test_latent_channels_reach_the_vae_the_unet_and_sampling(tmp_path):
    from dori.miniworld.train import train_world
    from dori.models.loading import load_model

    few = dict(clip_steps=2, vae_steps=2, copy_steps=2, feature_steps=2, unet_steps=2, n_aux=300, n_calib=100)
    out = train_world(
        tmp_path / "w", preset="tiny", device="cpu", log=lambda m: None, latent_channels=8, overrides=few
    )
    model = load_model(str(out))
    assert model.vae.config.latent_channels == 8 and model.unet.config.in_channels == 8
    assert model.sample_shape == (8, 8, 8)
    x0 = model.encode_images(torch.rand(2, 3, 32, 32))
    assert x0.shape == (2, 8, 8, 8) and model.decode(x0).shape == (2, 3, 32, 32)
    info = json.loads((out / "dori_world.json").read_text())
    assert info["training"]["config"]["latent_channels"] == 8


def test_detail_zero_renders_world_v1_and_the_defaults_render_the_shipped_world():
    import hashlib

    from safetensors.torch import load_file

    from dori.models.loading import resolve

    # sha256 of world v1's first 4 vm images (sets/vm.safetensors as shipped until commit 95246cb)
    v1 = gen.WorldSpec(seed=0, detail=0, vm_dups=200, tm_dups=200)
    images = gen.render_many([gen.vm_scene(v1, i) for i in range(4)])
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    assert digest == "9f8b81227196f45faaf5d052d838365bdc63946f6005296b5da4bd30fbeaa604"
    shipped = resolve("miniworld")
    info = json.loads((shipped / "dori_world.json").read_text())
    assert gen.WorldSpec(**{"detail": 0, **info["spec"]}) == gen.WorldSpec(seed=0)  # defaults = shipped world
    vm = load_file(str(shipped / "sets" / "vm.safetensors"))["images"].numpy()
    assert np.array_equal(vm[:4], gen.render_many([gen.vm_scene(gen.WorldSpec(seed=0), i) for i in range(4)]))
