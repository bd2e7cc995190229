"""Contract tests, parametrized over each registry: a method added to a registry is tested the day it is added
(and this file fails until it says how to build a tiny one).

* every inference-time mitigation (:data:`dori.mitigations.MITIGATIONS`, through :mod:`dori.fitting`): it fits
  on the tiny model and changes its output, ``applied`` restores the weights bit-exactly, ``save``/``load``
  round-trips, and ``applied_rows`` equals applying each row's item alone;
* every attack (:data:`dori.attacks.base.ATTACKS`): result shapes, the seed fixes the result, a target searched
  in a batch gets what it gets alone;
* every metric (:data:`dori.metrics.functions.METRICS`): its declared direction and known values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dori.attacks.base import ATTACKS, Attack, AttackResult, attack_class
from dori.data.sets import Item
from dori.metrics import functions as M
from dori.mitigations import available_mitigations, load_mitigation
from dori.mitigations.base import Mitigation

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on blue", "a small green square", "two yellow stars", "a cat on a mat"]


# ------------------------------------------------------------------------------------------ mitigations
def _fit_nemo(model, items, out, tmp):
    from dori.fitting import fit_nemo
    from dori.mitigations.nemo import NeMo

    calib = tmp / "calibration.jsonl"
    calib.write_text("\n".join(json.dumps({"id": str(i), "prompt": p}) for i, p in enumerate(PROMPTS)))
    nemo = NeMo(n_seeds=4, theta_start=1.75, tau=0.05, cache_dir=str(tmp / "cache"))
    fit_nemo(model, items, out, nemo, calibration_set=str(calib), progress=False, log=lambda msg: None)


def _fit_wanda(model, items, out, tmp):
    from dori.fitting import fit_wanda
    from dori.mitigations.wanda import Wanda

    fit_wanda(model, items, out, Wanda(sparsity=0.1, timesteps=3, steps=5), group="prompt", progress=False)


TINY_FITS = {"nemo": _fit_nemo, "wanda": _fit_wanda}


@pytest.fixture(scope="module", params=available_mitigations())
def fitted(request, tiny, tmp_path_factory):
    name = request.param
    assert name in TINY_FITS, f"mitigation {name!r} is registered but has no tiny fit in this contract test"
    tmp = tmp_path_factory.mktemp(name)
    items = [Item(id=f"it{i}", prompt=p) for i, p in enumerate(PROMPTS[:2])]
    TINY_FITS[name](tiny, items, tmp / "fit", tmp)
    return name, load_mitigation(f"{name}:{tmp / 'fit'}"), [it.id for it in items], tmp


def _inputs(model, n):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, *model.sample_shape, generator=g)
    y = model.encode_text([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    return x, y, torch.tensor([900, 500, 100, 10][:n])


def _unet(model, x, y, t):
    with torch.no_grad():
        return model.unet(x, t, encoder_hidden_states=y).sample


def test_mitigation_is_the_protocol_and_changes_the_model(fitted, tiny):
    name, m, ids, _ = fitted
    assert isinstance(m, Mitigation) and m.name == name and m.per_item
    x, y, t = _inputs(tiny, 2)
    ref = _unet(tiny, x, y, t)
    with m.applied(tiny):
        changed = _unet(tiny, x, y, t)
    assert not torch.allclose(changed, ref)  # the fit found something to prune: the checks below are not void


def test_applied_restores_the_weights_bit_exactly(fitted, tiny):
    _, m, ids, _ = fitted
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    x, y, t = _inputs(tiny, 2)
    for item_ids in (None, ids[:1]):
        with m.applied(tiny, item_ids):
            _unet(tiny, x, y, t)
    with m.applied_rows(tiny, [ids[0], ids[1]]):
        _unet(tiny, x, y, t)
    with pytest.raises(RuntimeError), m.applied(tiny):  # an error inside the block restores them too
        raise RuntimeError("boom")
    after = tiny.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_save_load_round_trip(fitted, tiny):
    name, m, ids, tmp = fitted
    m.save(tmp / "copy")
    back = load_mitigation(f"{name}:{tmp / 'copy'}")
    assert back.source == str(tmp / "copy")
    x, y, t = _inputs(tiny, 2)
    for item_ids in (None, ids[1:]):
        with m.applied(tiny, item_ids):
            a = _unet(tiny, x, y, t)
        with back.applied(tiny, item_ids):
            b = _unet(tiny, x, y, t)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_applied_rows_equals_each_item_alone(fitted, tiny):
    _, m, ids, _ = fitted
    rows = [ids[0], ids[1], ids[0]]
    x, y, t = _inputs(tiny, 3)
    alone = []
    for r, item in enumerate(rows):
        with m.applied(tiny, [item]):
            alone.append(_unet(tiny, x[r : r + 1], y[r : r + 1], t[r : r + 1]))
    with m.applied_rows(tiny, rows):
        together = _unet(tiny, x, y, t)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0], alone[1])


# ------------------------------------------------------------------------------------------------ attacks
TINY_ATTACKS = {
    "dori": {"steps": 2, "batch_size": 2, "init": "random"},
    "unlearndiffatk": {"timesteps": 2, "iterations": 2, "k": 2},
}


@pytest.fixture(params=sorted(ATTACKS))
def attack(request) -> Attack:
    name = request.param
    assert name in TINY_ATTACKS, (
        f"attack {name!r} is registered but has no tiny settings in this contract test"
    )
    return attack_class(name)(**TINY_ATTACKS[name])


def _targets(model, n):
    g = torch.Generator().manual_seed(3)
    return model.encode_images(torch.rand(n, 3, model.image_size, model.image_size, generator=g))


def test_attack_shapes_and_protocol(attack, tiny):
    assert isinstance(attack, Attack) and attack.name in ATTACKS
    x0 = _targets(tiny, 2)
    res = attack.run(tiny, x0, PROMPTS[:2], [1, 2])
    tokens_dim = tiny.encode_text(PROMPTS[:1]).shape[1:]
    assert isinstance(res, AttackResult)
    assert res.embeddings.shape == (2, *tokens_dim) and res.embeddings.dtype == torch.float32
    assert res.losses.shape[0] == 2 and torch.isfinite(res.losses).all()
    assert all(v.shape[0] == 2 for v in res.tensors.values())
    assert len(res.records) in (0, 2)
    steps = attack.row_steps((1,))
    assert steps and attack.recording(steps).settings() is not None


def test_attack_seed_fixes_the_result(attack, tiny):
    x0 = _targets(tiny, 1)
    a = attack.run(tiny, x0, PROMPTS[:1], [5])
    b = attack.run(tiny, x0, PROMPTS[:1], [5])
    c = attack.run(tiny, x0, PROMPTS[:1], [6])
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=0, atol=0)
    assert not torch.equal(a.losses, c.losses)


def test_attack_batched_equals_alone(attack, tiny):
    x0 = _targets(tiny, 2)
    both = attack.run(tiny, x0, PROMPTS[:2], [1, 2])
    for i in range(2):
        alone = attack.run(tiny, x0[i : i + 1], PROMPTS[i : i + 1], [i + 1])
        torch.testing.assert_close(both.embeddings[i : i + 1], alone.embeddings, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.losses[i : i + 1], alone.losses, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ metrics
def _close_and_far():
    """Generations like the reference (close) and unlike it (far), as descriptor vectors."""
    ref = torch.tensor([1.0, 0.0, 0.0])
    close = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0]])
    far = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return ref, close, far


def _features(shift: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.random.default_rng(0).standard_normal((300, 4))
    return a, a + shift


# metric -> (value on a "good" input, value on a "bad" input, [(value, expected), ...] known values)
def _cases():
    ref, close, far = _close_and_far()
    text = torch.tensor([1.0, 0.0, 0.0])
    return {
        "sscd_orig": (
            M.sscd_orig(far, ref)["median"], M.sscd_orig(close, ref)["median"],
            [(M.sscd_orig(close[:1], ref)["max"], 1.0), (M.sscd_orig(far, ref)["max"], 0.0)],
        ),
        "sscd_gen": (
            M.sscd_gen(far, close)["median"], M.sscd_gen(close, close)["median"],
            [(M.sscd_gen(close, close)["median"], 1.0)],
        ),
        "d_sscd": (
            M.d_sscd(far)["mean"], M.d_sscd(close[:1].repeat(2, 1))["mean"],
            [(M.d_sscd(close[:1].repeat(3, 1))["mean"], 1.0), (M.d_sscd(far)["mean"], 0.0)],
        ),
        "a_clip": (
            M.a_clip(close[:1], text)["mean"], M.a_clip(far, text)["mean"],
            [(M.a_clip(close[:1], text)["mean"], 1.0)],
        ),
        "mr": (
            M.memorization_rate([0.1, 0.2], 0.7), M.memorization_rate([0.9, 0.7], 0.7),
            [(M.memorization_rate([0.9, 0.69, 0.7, 0.1], 0.7), 0.5)],
        ),
        "fid": (
            M.fid(*_features(0.0)), M.fid(*_features(1.0)),
            [(M.fid(*_features(0.0)), 0.0), (M.fid(*_features(1.0)), 4.0)],  # equal covariances: ||shift||^2
        ),
        "kid": (M.kid(*_features(0.0), num_subsets=5), M.kid(*_features(1.0), num_subsets=5), []),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_metric_direction_and_known_values(name):
    cases = _cases()
    assert name in cases, f"metric {name!r} is registered but has no case in this contract test"
    good, bad, known = cases[name]
    spec = M.METRICS[name]
    assert (good > bad) if spec.higher_is_better else (good < bad), (name, good, bad)
    for value, expected in known:
        assert not math.isnan(value) and value == pytest.approx(expected, abs=1e-6), (name, value, expected)
