"""UnlearnDiffAtk against its reference code, on a tiny seeded model.

Expected values: OPTML-Group/Diffusion-MU-Attack @ 5a3e5d3 (``src/attackers/text_grad_.py`` and
``src/tasks/classifier_.py``, unmodified), run once outside this project on CPU in fp32 with transformers
4.38.2, diffusers 0.27.1 and torch 2.13, on the components of ``tests/uda_parity_model.py`` (scale 1000,
saved from this environment and loaded there). Import shims only: the metric/classifier modules stubbed (the
success test never fires), the model loaders returning the tiny components, the dataset loader returning one
item (a seeded 512 px image, prompt "a red circle on blue", seed None, guidance 7.5). Settings as
``attack.py`` with the church config's attacker section except the lengths: ``torch.manual_seed(0)``,
concept church, ``prefix_k``, k = 3, lr 0.01, weight decay 0.1, ``rand_init`` False, ``sequential`` True,
``iteration`` 2, ``n_samples`` 2 (timesteps 250 and 750), ``sampling_step_num`` 2, eval seed 0. Recorded
by wrapping methods: the sampled tokens, the losses, the gradient the optimizer saw, the distributions
after each Adam step and after each projection, and the decoded prompts the evaluation was asked about.
"""

import pytest
import torch

from dori.attacks.simplex import project_bisection, project_simplex
from dori.attacks.unlearndiffatk import UnlearnDiffAtk, resize_center_crop
from dori.errors import DoriError
from uda_parity_model import PROMPT, build_components, dori_model

FIX = [0, 7, 320, 1180, 20000, 49406, 49407]  # vocabulary entries recorded (incl. both special tokens)
SAMPLED = [[11511, 32336, 1528], [4680, 49271, 24116], [3962, 12967, 40880], [4680, 18724, 28013]]
LOSS = [114330.390625, 110074.125, 113421.90625, 111358.984375]
PROMPTS = [
    "zqfill35952 zqfill18382 zqfill35406 a red circle on blue",
    "zqfill44406 zqfill15587 zqfill35406 a red circle on blue",
]
GRAD1_CLIPPED = [49306, 49301, 49305]
GRAD2_CLIPPED = [49339, 49314, 49318]
GRAD2_SUM = [-92.11756896972656, -138.2139892578125, -0.3996429443359375]
GRAD2_FIX = [[1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0]] * 3
AFTER2_POS = [24754, 24774, 24716]
_a, _b, _c = 0.0005263054626993835, 0.010038906708359718, -0.009999999776482582
AFTER2_FIX = [[_c, _a, _b, _c, _a, _c, _b], [_c, _b, _b, _c, _a, _c, _b], [_c, _a, _b, _c, _a, _c, _b]]
PROJ1_NNZ, PROJ1_SUM = [24643, 24681, 24653], [0.9588063359260559, 0.960284948348999, 0.9591954946517944]
PROJ1_VALUE = 3.8907863199710846e-05  # every kept entry of FIX
PROJ1_FIX_KEPT = [[2, 6], [1, 2, 6], [2, 6]]
PROJ2_NNZ, PROJ2_SUM = [17916, 16754, 17693], [1.0182201862335205, 0.948101282119751, 0.9999216794967651]
PROJ2_VALUE = [5.683116614818573e-05, 5.6590884923934937e-05, 5.6517310440540314e-05]  # at FIX[2]
PROJ2_MAX = [7.004197686910629e-05, 7.004197686910629e-05, 7.004197686910629e-05]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    parts = build_components(tmp_path_factory.mktemp("uda-parity"))
    model = dori_model(parts)
    return model, model.encode_images(parts["image"][None])


def _run(model, x0, monkeypatch, timesteps=2, **kw):
    """Two timesteps of two iterations, recording what the reference run recorded."""
    rec = {"grad": [], "before": [], "after": [], "asked": [], "drawn": []}
    attack = UnlearnDiffAtk(k=3, iterations=2, timesteps=timesteps, **kw)
    project, sample = attack.project, attack.sample

    def sample_rec(p, gens):
        out = sample(p, gens)
        rec["drawn"].append(out[0].tolist())
        return out

    attack.sample = sample_rec

    def project_rec(p):
        out = project(p)
        if p.requires_grad:  # inside the loop (the initial projection is of a plain tensor)
            rec["before"].append(p.detach().clone())
            rec["after"].append(out.clone())
        return out

    attack.project = project_rec
    step = torch.optim.Adam.step

    def step_rec(self, *a, **k):
        rec["grad"].append(self.param_groups[0]["params"][0].grad.detach().clone())
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step_rec)

    def success(idx, emb):
        rec["asked"].append(emb.clone())
        return [False] * len(idx)

    res = attack(model, x0, [PROMPT], [0], success=success)
    return res, rec


def test_uniform_start_over_the_full_vocabulary(parity):
    model, _ = parity
    attack = UnlearnDiffAtk()
    p = attack.initial(model, 2, [torch.Generator().manual_seed(0)] * 2)
    assert p.shape == (2, 3, 49408) and attack.allowed_ids(model).numel() == 49408
    assert torch.all(p == torch.tensor(1 / 49408, dtype=torch.float32))  # reference: fill_(1/|V|), projected
    assert UnlearnDiffAtk(vocabulary="no-special").allowed_ids(model).numel() == 49406


def test_reference_trajectory_step_by_step(parity, monkeypatch):
    model, x0 = parity
    res, rec = _run(model, x0, monkeypatch)
    # the token draws of all four iterations (each timestep re-seeds, as the reference's evaluation does)
    assert rec["drawn"] == SAMPLED
    torch.testing.assert_close(res.losses[0], torch.tensor(LOSS), rtol=1e-4, atol=0)
    # the first clipped step: every gradient entry within [-1, 1], nearly all of them at the clip
    g1, g2 = rec["grad"][0][0], rec["grad"][1][0]
    assert g1.abs().max() <= 1 and g2.abs().max() <= 1
    assert all(abs(a - b) <= 10 for a, b in zip((g1.abs() == 1).sum(-1).tolist(), GRAD1_CLIPPED, strict=True))
    assert all(abs(a - b) <= 10 for a, b in zip((g2.abs() == 1).sum(-1).tolist(), GRAD2_CLIPPED, strict=True))
    torch.testing.assert_close(g2[:, FIX], torch.tensor(GRAD2_FIX))
    torch.testing.assert_close(g2.sum(-1), torch.tensor(GRAD2_SUM), rtol=0, atol=0.5)
    # the Adam step (weight decay 0.1) before the second projection
    a2 = rec["before"][1][0]
    # (an entry whose gradient is near 0 can change sign between the two environments: counts within 5)
    assert all(abs(a - b) <= 5 for a, b in zip((a2 > 0).sum(-1).tolist(), AFTER2_POS, strict=True))
    torch.testing.assert_close(a2[:, FIX], torch.tensor(AFTER2_FIX), rtol=1e-5, atol=1e-9)
    # the bisection projection: its rows do not sum to 1, exactly as the reference's
    p1, p2 = rec["after"][0][0], rec["after"][1][0]
    assert (p1 > 0).sum(-1).tolist() == PROJ1_NNZ
    assert all(abs(a - b) <= 5 for a, b in zip((p2 > 0).sum(-1).tolist(), PROJ2_NNZ, strict=True))
    torch.testing.assert_close(p1.sum(-1), torch.tensor(PROJ1_SUM), rtol=1e-5, atol=0)
    # (the threshold is only 1e-5-accurate, so tiny input differences between the two environments move
    # the second step's row sums by up to 2e-3; the projection itself is checked exactly below)
    torch.testing.assert_close(p2.sum(-1), torch.tensor(PROJ2_SUM), rtol=2e-3, atol=0)
    for row, kept in enumerate(PROJ1_FIX_KEPT):
        expect = torch.tensor([PROJ1_VALUE if j in kept else 0.0 for j in range(len(FIX))])
        torch.testing.assert_close(p1[row, FIX], expect, rtol=1e-5, atol=0)
    torch.testing.assert_close(p2.max(-1).values, torch.tensor(PROJ2_MAX), rtol=3e-3, atol=0)
    torch.testing.assert_close(p2[:, FIX[2]], torch.tensor(PROJ2_VALUE), rtol=3e-3, atol=0)
    # the prompts judged after each timestep: decoded, tokenized again
    assert res.prompts == [PROMPTS[1]]
    assert len(rec["asked"]) == 3  # the unattacked prompt, then one per timestep
    torch.testing.assert_close(rec["asked"][1], model.encode_text([PROMPTS[0]]).float())
    torch.testing.assert_close(rec["asked"][2], model.encode_text([PROMPTS[1]]).float())
    torch.testing.assert_close(res.embeddings, model.encode_text([PROMPTS[1]]).float())


def test_without_the_clip_the_second_step_differs(parity, monkeypatch):
    model, x0 = parity
    _, rec = _run(model, x0, monkeypatch, timesteps=1, clip_grad=False)
    assert rec["grad"][0].abs().max() > 10  # what the reference's hardtanh removes
    a2 = rec["before"][1][0][:, FIX]
    assert (a2 - torch.tensor(AFTER2_FIX)).abs().max() > 1e-4  # the second Adam step sees other magnitudes


def test_bisection_equals_the_reference_projection():
    """Reference: ``TextGrad.projection`` (bisection, xi 1e-5) on ``torch.randn(1, 3, 4000, generator=
    torch.Generator().manual_seed(0)) * 0.01``, same environment as the module docstring's."""
    v = torch.randn(1, 3, 4000, generator=torch.Generator().manual_seed(0))[0] * 0.01
    out = torch.stack([project_bisection(r) for r in v])
    assert (out > 0).sum(-1).tolist() == [215, 240, 229]
    assert out.sum(-1).tolist() == [1.0004717111587524, 1.0017818212509155, 1.0017430782318115]
    assert out.max(-1).values.tolist() == [0.024838216602802277, 0.021569861099123955, 0.0187038816511631]


def test_projections():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 50, generator=g) * 0.1
    exact = project_simplex(v)
    torch.testing.assert_close(exact.sum(-1), torch.ones(4))
    bis = torch.stack([project_bisection(r) for r in v])
    # bisection stops at a bracket of 1e-5 on the threshold: each entry within 1e-5 of the exact projection
    assert (bis - exact).abs().max() <= 1e-5
    u = torch.full((8,), 1 / 8)
    assert torch.equal(project_bisection(u), u)


def test_resize_center_crop_keeps_aspect():
    img = torch.zeros(3, 20, 40)
    img[:, :, 10:30] = 1.0  # the central square
    out = resize_center_crop(img, 10)
    assert out.shape == (3, 10, 10) and out[:, :, 1:-1].min() > 0.99 and out.mean() > 0.95
    square = torch.rand(3, 10, 10)
    assert torch.equal(resize_center_crop(square, 10), square)


def test_unattacked_prompt_that_succeeds_is_kept(parity):
    model, x0 = parity
    res = UnlearnDiffAtk(k=3, iterations=1, timesteps=1)(
        model, x0, [PROMPT], [0], success=lambda i, e: [True]
    )
    assert res.stopped_at == [0] and res.prompts == [PROMPT] and res.token_ids[0].tolist() == [-1, -1, -1]
    with pytest.raises(DoriError):
        UnlearnDiffAtk(init="zero")
