"""Wanda on the tiny model: mask rule, union over calls, null-prompt scaling, apply/restore, save/load."""

import pytest
import torch

from dori.errors import DoriError
from dori.mitigations.wanda import Wanda, WandaResult, make_groups, wanda_mask
from dori.models.layers import ffn_layers, get_module

PROMPTS = ["a red circle on blue", "a small green square", "two yellow stars"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(**kw):
    return Wanda(**{"sparsity": 0.1, "timesteps": 3, "steps": 5, **kw})


def test_mask_rule_row_sparsity_and_null():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    target = torch.rand(64, generator=g)
    k = int(0.1 * 64)
    # a null prompt that every score beats: exactly k weights per output row
    m = wanda_mask(w, target, torch.zeros(64), 0.1)
    assert (m.sum(1) == k).all()
    s = w.abs() * target
    assert torch.equal(m, torch.zeros_like(m).scatter(1, s.topk(k, 1).indices, True))
    # a null prompt that beats some columns: per row, the top-k entries that also beat the null
    null = target * (0.5 + torch.rand(64, generator=g))
    m2 = wanda_mask(w, target, null, 0.1)
    beats = s > w.abs() * null
    assert torch.equal(m2, m & beats) and (m2.sum(1) <= k).all() and m2.sum() < m.sum()
    assert not wanda_mask(w, target, target, 0.1).any()  # the target never beats itself


def test_squared_norms_normalize_rows_and_include_uncond(tiny):
    wanda = _small()
    sq = wanda.squared_norms(tiny, tiny.encode_text(PROMPTS[:2]))
    for layer, v in sq.items():
        assert v.shape[:2] == (3, 2) and v.shape[2] == get_module(tiny.unet, layer).in_features
        # unit rows: the squared column norms sum to the row count (positions x 2 CFG branches)
        positions = {"down": 64, "mid": 16, "up": 64}[layer.split("_")[0]]
        torch.testing.assert_close(v.sum(-1), torch.full((3, 2), 2.0 * positions))
    single = wanda.squared_norms(tiny, tiny.encode_text(PROMPTS[1:2]))
    for layer in sq:  # an embedding's statistics do not depend on its batch
        torch.testing.assert_close(single[layer][:, 0], sq[layer][:, 1], atol=1e-4, rtol=1e-4)


def test_union_over_calls_contains_each_call(tiny):
    wanda = _small()
    y = tiny.encode_text(PROMPTS)
    sq = {k: v.sum(1) for k, v in wanda.squared_norms(tiny, y).items()}
    null = wanda.null_norms(tiny)
    per_call = wanda.per_call_masks(tiny, sq, null, 3)
    union = wanda.masks_from_norms(tiny, sq, null, 3)
    assert set(union.masks) == set(ffn_layers(tiny.unet))
    for layer, calls in per_call.items():
        assert len(calls) == 3
        for m in calls:
            assert not (m & ~union.masks[layer]).any()
        assert torch.equal(union.masks[layer], calls[0] | calls[1] | calls[2])
    assert sum(union.count().values()) > 0
    assert torch.equal(wanda.masks(tiny, y).masks[layer], union.masks[layer])
    fewer = _small(timesteps=1).masks(tiny, y)
    assert all(not (fewer.masks[k] & ~union.masks[k]).any() for k in union.masks)


def test_null_prompt_scaled_by_group_size(tiny):
    wanda = _small()
    null = wanda.null_norms(tiny)
    # a group of 3 null prompts accumulates 3x the null prompt's squared norms ...
    three = wanda.squared_norms(tiny, tiny.null_embedding().expand(3, -1, -1))
    for k, v in three.items():
        torch.testing.assert_close(v.sum(1), 3 * null[k], rtol=1e-5, atol=1e-5)
    # ... and the null side is scaled by the group size, so such a group never beats it
    target = {k: 3 * v for k, v in null.items()}
    assert sum(wanda.masks_from_norms(tiny, target, null, 3).count().values()) == 0
    assert sum(wanda.masks_from_norms(tiny, target, null, 1).count().values()) > 0


def test_fit_groups_apply_restore_and_round_trip(tiny, tmp_path):
    wanda = _small()
    items = PROMPTS
    res = wanda.fit(tiny, items, group="prompt")
    assert res.per_item and set(res.groups) == {"0", "1", "2"}
    each = wanda.masks_each(tiny, tiny.encode_text(PROMPTS))
    for i in range(3):
        for k in each[i].masks:
            assert torch.equal(res.masks_for([str(i)]).masks[k], each[i].masks[k])
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    masks = res.masks_for(["1"])
    with res.applied(tiny, ["1"]):
        for k, m in masks.masks.items():
            w = get_module(tiny.unet, k).weight
            assert (w[m] == 0).all() and (w[~m] == before[f"{k}.weight"][~m]).all()
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())
    res.save(tmp_path)
    back = WandaResult.load(tmp_path)
    assert back.groups == res.groups
    for gid in res.masks:
        for k, m in res.masks[gid].masks.items():
            assert torch.equal(back.masks[gid].masks[k], m)
    union = back.masks_for(None)
    assert all(torch.equal(union.masks[k], res.masks_for(["0", "1", "2"]).masks[k]) for k in union.masks)
    with pytest.raises(DoriError, match="no mask"):
        back.masks_for(["nope"])
    one = wanda.fit(tiny, items, group="all")
    assert not one.per_item and list(one.groups) == ["all"]


def test_groups_and_settings():
    assert make_groups(list("abcde"), 2) == {"group-0": ["a", "b"], "group-1": ["c", "d"], "group-2": ["e"]}
    assert make_groups(list("ab"), "all") == {"all": ["a", "b"]}
    with pytest.raises(DoriError):
        make_groups(list("ab"), "some")
    with pytest.raises(DoriError):
        Wanda(sparsity=0)
    with pytest.raises(DoriError):
        Wanda(timesteps=60, steps=50)
