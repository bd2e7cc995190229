"""The locality metrics (Finding Dori Section 4, Eq. 6-7) on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from dori.analysis import activation_discrepancy as AD
from dori.analysis import embedding_dispersion as ED
from dori.analysis import weight_agreement as WA
from dori.errors import DoriError
from dori.models.hooks import record_activations
from dori.models.layers import ffn_layers, value_layers


def brute_discrepancy(acts: torch.Tensor) -> float:
    a = acts.flatten(1).double()
    n = a.shape[0]
    total = sum(float((a[i] - a[j]).pow(2).sum()) for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


# ---------------------------------------------------------------- activation discrepancy (Eq. 6)
def test_identical_activations_give_zero_discrepancy():
    one = torch.randn(1, 4, 6) * 50 + 1000
    assert AD.mean_discrepancy(one.repeat(9, 1, 1)) == pytest.approx(0.0, abs=1e-6)


def test_closed_form_equals_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(7, 3, 5, generator=g) * 2 + 10  # a common offset: the identity must not lose it
    assert AD.mean_discrepancy(acts) == pytest.approx(brute_discrepancy(acts), rel=1e-9)
    sums = AD.MomentSums()  # chunked accumulation gives the same
    for chunk in acts.split(3):
        sums.add(chunk)
    assert sums.mean_discrepancy() == pytest.approx(brute_discrepancy(acts), rel=1e-9)
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert AD.mean_discrepancy(two) == pytest.approx(25.0)
    with pytest.raises(DoriError):
        AD.mean_discrepancy(acts[:1])


def test_layer_discrepancies_match_recorded_activations(tiny):
    emb = torch.randn(5, *tiny.null_embedding().shape[1:], generator=torch.Generator().manual_seed(1))
    v, f = value_layers(tiny.unet)[0], ffn_layers(tiny.unet)[-1]
    got = AD.layer_discrepancies(tiny, emb, outputs=[v], inputs=[f], seed=3, batch_size=2)
    x, t = AD.first_step_input(tiny, seed=3)
    with (
        record_activations(tiny.unet, [v]) as outs,
        record_activations(tiny.unet, [f], inputs=True) as ins,
        torch.no_grad(),
    ):
        tiny.unet_forward(x.expand(5, -1, -1, -1), t.expand(5), emb)
    assert got["output"][v] == pytest.approx(brute_discrepancy(outs[v][0]), rel=1e-5)
    assert got["input"][f] == pytest.approx(brute_discrepancy(ins[f][0]), rel=1e-5)
    same = AD.layer_discrepancies(tiny, emb[:1].repeat(4, 1, 1), outputs=[v], inputs=[f], batch_size=3)
    assert same["output"][v] == pytest.approx(0.0, abs=1e-6)
    assert same["input"][f] == pytest.approx(0.0, abs=1e-6)


def test_adv_vs_mem_tables(tiny):
    y = torch.randn(6, *tiny.null_embedding().shape[1:], generator=torch.Generator().manual_seed(2))
    res = AD.adv_vs_mem(tiny, y[:3], y[3:], layer_types=("cross-attn V", "self-attn Q"), batch_size=2)
    assert res.nemo["layers"] == value_layers(tiny.unet)
    assert len(res.wanda["adv"]) == len(ffn_layers(tiny.unet))
    assert set(res.layer_types) == {"cross-attn V", "self-attn Q"}
    # NeMo's value layers are the cross-attention V layers of the down and mid blocks
    cross_v = dict(
        zip(res.layer_types["cross-attn V"]["layers"], res.layer_types["cross-attn V"]["adv"], strict=True)
    )
    for name, value in zip(res.nemo["layers"], res.nemo["adv"], strict=True):
        assert cross_v[name] == pytest.approx(value)
    # the first self-attention sees only the (fixed) noise: no text yet, no discrepancy
    assert res.layer_types["self-attn Q"]["adv"][0] == pytest.approx(0.0, abs=1e-8)
    assert res.to_dict()["n_adv"] == 3


# ---------------------------------------------------------------- weight agreement (Eq. 7)
def test_iou_known_answers():
    a = torch.tensor([[True, False], [True, False]])
    assert WA.iou(a, a) == 1.0
    assert WA.iou(a, ~a) == 0.0
    assert WA.iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0
    assert WA.iou([0, 1, 2], [1, 2, 3]) == pytest.approx(0.5)
    assert WA.iou(torch.tensor([5]), []) == 0.0
    assert WA.iou(np.array([True, True, False]), [0, 1]) == 1.0  # mask and indices of the same set
    with pytest.raises(DoriError):
        WA.to_indices(np.array([0.5, 1.0]))


def test_mean_agreement_identical_disjoint_empty():
    m = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    assert WA.mean_agreement([m] * 5) == pytest.approx(1.0)
    assert WA.mean_agreement([[0, 1], [2, 3], [4]]) == 0.0
    assert WA.mean_agreement([[], [], []]) == 1.0
    # pairs: {0,1}-{1,2}: 1/3, {0,1}-{}: 0, {1,2}-{}: 0 -> mean 1/9
    assert WA.mean_agreement([[0, 1], [1, 2], []]) == pytest.approx(1 / 9)
    rng = np.random.default_rng(0)
    sets = [rng.choice(50, size=rng.integers(0, 10), replace=False) for _ in range(6)]
    mat = WA.pairwise_iou(sets)
    for i in range(6):
        for j in range(6):
            assert mat[i, j] == pytest.approx(WA.iou(sets[i], sets[j]))


def test_layer_agreement_missing_layer_is_empty():
    per = [{"a": [1, 2], "b": [0]}, {"a": [1, 2]}, {"a": [1, 2]}]
    assert WA.layer_agreement(per, ["a", "c"]) == [1.0, 1.0]
    assert WA.layer_agreement(per, ["b"]) == [pytest.approx(1 / 3)]  # only the two empty ones agree
    assert WA.layer_counts(per, ["a", "b"]) == [[2, 2, 2], [1, 0, 0]]


class FakeNeMo:
    """Top-2 output channels of each value layer by mean |activation| (depends on the embedding)."""

    def select(self, model, cond_embedding):
        out = {}
        for name in value_layers(model.unet):
            with torch.no_grad():
                act = model.unet.get_submodule(name)(cond_embedding).abs().mean(dim=(0, 1))
            out[name] = act.topk(2).indices
        return out


class FakeWanda:
    """Top 10% of |W| * ||column of the embedding-projected input|| per FFN layer."""

    def masks(self, model, cond_embeddings):
        from dori.models.hooks import WeightMasks

        g = torch.Generator().manual_seed(int(cond_embeddings.abs().sum() * 1000) % 2**31)
        out = {}
        for name in ffn_layers(model.unet):
            w = model.unet.get_submodule(name).weight
            score = w.abs() * torch.rand(1, w.shape[1], generator=g)
            out[name] = score >= score.flatten().quantile(0.9)
        return WeightMasks(out)


def test_selection_drivers(tiny):
    y = torch.randn(3, *tiny.null_embedding().shape[1:], generator=torch.Generator().manual_seed(5))
    nemo = WA.nemo_selections(FakeNeMo(), tiny, y)
    assert len(nemo) == 3 and all(len(s[n]) == 2 for s in nemo for n in value_layers(tiny.unet))
    wanda = WA.wanda_selections(FakeWanda(), tiny, torch.cat([y[:1], y[:1], y[1:2]]))
    layers = ffn_layers(tiny.unet)
    table = WA.agreement_table(wanda[:2], wanda, layers)
    assert table["adv"] == [1.0] * len(layers)  # the same embedding twice: the same weights
    assert all(0.0 <= v < 1.0 for v in table["mem"])


# ---------------------------------------------------------------- embedding dispersion (Sec. 4.1)
def test_distances_on_known_points():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert ED.pairwise_l2(pts).tolist() == pytest.approx([5.0, 10.0, 5.0])
    assert ED.paired_l2(pts, pts + torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0] * 3)
    emb = pts.view(3, 1, 2)  # (N, tokens, dim) is flattened per embedding
    assert ED.pairwise_l2(emb).tolist() == pytest.approx([5.0, 10.0, 5.0])
    s = ED.summarize([1, 2, 3, 4, 5])
    assert (s["median"], s["mean"], s["min"], s["max"], s["n"]) == (3.0, 3.0, 1.0, 5.0, 5)
    with pytest.raises(DoriError):
        ED.pairwise_l2(pts[:1])


def test_dispersion_numbers_and_tsne():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(6, 2, 3, generator=g)
    numbers = ED.dispersion_numbers(init, init * 2, seed=0)
    assert len(numbers["pairwise_init"]) == 15
    assert numbers["pairwise_adv"] == pytest.approx([2 * d for d in numbers["pairwise_init"]])
    norms = init.flatten(1).norm(dim=1).tolist()
    assert numbers["init_to_adv"] == pytest.approx(norms)
    assert np.array(numbers["tsne"]["init"]).shape == (6, 2)
    assert all(math.isfinite(v) for p in numbers["tsne"]["adv"] for v in p)


def test_timed_search_and_replication_check(tiny):
    x0 = tiny.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    init = torch.randn(3, *tiny.null_embedding().shape[1:])
    from dori.attacks.dori import Dori

    res, seconds = ED.timed_search(Dori(steps=2), tiny, x0, init, [0, 1, 2])
    assert res.embeddings.shape == init.shape and seconds > 0
    calls = []

    def fake_scorer(images, reference):  # similarity = 1 - mean abs difference of pixels
        calls.append(images.shape[0])
        return 1 - (images - reference).abs().flatten(1).mean(1)

    ref = torch.rand(3, 16, 16)
    scores = ED.replication_scores(
        tiny, res.embeddings, ref, fake_scorer, [7, 8], ED.SamplingConfig(steps=2, guidance=7.0)
    )
    assert scores.shape == (3, 2) and calls == [6]
    summary = ED.replication_summary(torch.tensor([[0.1, 0.8], [0.2, 0.3]]), 0.7)
    assert summary["replicated"] == [True, False] and summary["rate"] == 0.5
    with pytest.raises(DoriError):
        ED.timed_search(Dori(steps=1), tiny, x0, init, [0, 1])


def _dispersion(adv_random=100.0, replicated=(True,) * 10, threshold=0.8):
    def part(init, adv, travel, rep):
        s = {
            "pairwise_init": {"median": init},
            "pairwise_adv": {"median": adv},
            "init_to_adv": {"median": travel},
        }
        out = {"summary": s}
        if rep is not None:
            out["replication"] = {
                "replicated": list(rep),
                "rate": sum(rep) / len(rep),
                "threshold": threshold,
            }
        return out

    return {
        "random": part(90.0, adv_random, 40.0, replicated),
        "nonmem": part(80.0, 95.0, 50.0, None),  # replication not checked: only the spread is tested
        "reference_nonmem_pairwise": {"median": 80.0},
    }


@pytest.mark.parametrize("ratio, holds", [(0.49, False), (0.5, True), (0.51, True)])
def test_discrepancy_verdict_flips_at_the_stated_threshold(ratio, holds):
    """Fig. 4's verdict from the numbers: Y_adv / Y_mem >= COMPARABLE in more than half the layers of both."""
    from dori.analysis.locality_verdict import COMPARABLE, locality_verdict

    assert COMPARABLE == 0.5
    table = {"layers": ["a", "b", "c"], "adv": [ratio * 10, ratio * 10, 1.0], "mem": [10.0, 10.0, 10.0]}
    act = {"n_adv": 2, "n_mem": 2, "nemo": table, "wanda": table, "layer_types": {}}
    v = locality_verdict({"activations": act})
    assert [c["figure"] for c in v["checks"]] == ["fig4", "fig4"]  # no layer types: Fig. 12 not checked
    assert [c["value"] for c in v["checks"]] == pytest.approx([2 / 3 if holds else 0.0] * 2)
    assert all(c["op"] == ">" and c["threshold"] == 0.5 for c in v["checks"])
    assert v["figures"] == {"fig4": holds}
    assert v["overall"] == {
        "checks": 2,
        "holding": 2 * holds,
        "verdict": "reproduced" if holds else "not reproduced",
    }


def test_verdict_record_of_dispersion_and_agreement():
    from dori.analysis.locality_verdict import locality_verdict

    table = {"adv": [0.3, 0.5, 1.0], "mem": [0.4, 0.5, 1.0], "n_adv": 2, "n_mem": 2, "unit": "weights"}
    table.update(count_adv=[[5, 6], [2, 2], [0, 0]], count_all_mem=[[5, 6], [2, 2], [0, 0]])
    results = {
        "dispersion": _dispersion(),
        "agreement": {"nemo": {"skipped": "nemo not available"}, "wanda": table},
    }
    v = locality_verdict(results)
    fig3 = [c for c in v["checks"] if c["figure"] == "fig3"]
    assert [c["value"] for c in fig3] == pytest.approx([1.0, 100 / 90]) and all(c["holds"] for c in fig3)
    assert [c["value"] for c in v["checks"] if c["figure"] == "fig10"] == pytest.approx([95 / 80])
    fig11 = [(c["value"], c["threshold"], c["holds"]) for c in v["checks"] if c["figure"] == "fig11"]
    assert fig11 == [(100.0, 90.0, True), (95.0, 80.0, True), (50.0, 40.0, True), (100.0, 80.0, True)]
    (fig5,) = [c for c in v["checks"] if c["figure"] == "fig5"]
    assert fig5["value"] == pytest.approx(2 / 3) and fig5["holds"]  # 0.3 and 0.5 are below 0.6
    (fig13,) = [c for c in v["checks"] if c["figure"] == "fig13"]
    assert (fig13["value"], fig13["threshold"], fig13["holds"]) == (
        0.0,
        5.5,
        False,
    )  # deepest third selects none
    assert v["figures"] == {"fig3": True, "fig10": True, "fig11": True, "fig5": True, "fig13": False}
    assert v["overall"] == {"checks": 9, "holding": 8, "verdict": "partly reproduced"}

    # 8/10 replicate (< 0.9) and the triggers from N(0, I) closer together than their inits: Fig. 3 fails
    v = locality_verdict({"dispersion": _dispersion(adv_random=60.0, replicated=(True,) * 8 + (False,) * 2)})
    fig3 = [c for c in v["checks"] if c["figure"] == "fig3"]
    assert [(c["value"], c["holds"]) for c in fig3] == [(0.8, False), (pytest.approx(60 / 90), False)]
    assert v["figures"]["fig3"] is False and v["figures"]["fig11"] is False
    assert locality_verdict({})["overall"] == {"checks": 0, "holding": 0, "verdict": "nothing checked"}


def test_notes_render_the_recorded_verdict():
    """The notes print the record's outcome, not one of their own: a record that says "does not hold" for
    numbers that would pass is rendered as it says."""
    from dori.analysis.locality_verdict import locality_verdict
    from dori.report.locality_notes import locality_notes, verdict_markdown

    disp = _dispersion()
    for kind in ("random", "nonmem"):
        disp[kind]["search"] = {"k": 10, "steps": 5, "seconds": 1.0, "device": "cpu", "torch_threads": 1}
    results = {"dispersion": disp}
    verdict = locality_verdict(results)
    assert verdict["figures"]["fig3"] is True
    assert "Pattern holds" in locality_notes(results, verdict)["fig3"]
    verdict["checks"][0]["holds"], verdict["figures"]["fig3"] = False, False
    notes = locality_notes(results, verdict)
    assert "Pattern does NOT hold" in notes["fig3"] and "Pattern holds" in notes["fig11"]
    table = verdict_markdown(verdict).splitlines()
    rows = [row for row in table if row.startswith("| fig") and not row.startswith("| figure")]
    assert len(rows) == len(verdict["checks"]) and rows[0].endswith("| no |")  # fig3 replication, as recorded


def test_copy_detector_scorer_is_cosine():
    def detector(images):  # normalized mean colour: a toy descriptor
        return torch.nn.functional.normalize(images.flatten(2).mean(2), dim=1)

    score = ED.copy_detector_scorer(detector)
    ref = torch.zeros(3, 4, 4)
    ref[0] = 1.0
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0], images[1, 1] = 0.5, 1.0
    assert score(images, ref).tolist() == pytest.approx([1.0, 0.0])
