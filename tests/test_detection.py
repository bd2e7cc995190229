"""Detection of memorized prompts: metrics on known score lists, Wen et al.'s score against UNet outputs
computed here by hand, NeMo's score and the trajectory decomposition on the tiny model, and `dori detect`."""

import itertools
import json
import math

import pytest
import torch

from dori.detection import DETECTORS, build_detector
from dori.detection.metrics import auc, roc_curve, summarize, tpr_at_fpr
from dori.detection.trajectory import TrajectoryScore, decompose, schedule_coefficients
from dori.detection.wen import WenScore
from dori.errors import DoriError


# ---------------------------------------------------------------- metrics
def brute_auc(pos, neg):
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auc_known_lists():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0  # no label flipping: a reversed detector scores 0
    assert auc([1, 1, 1], [1, 1]) == 0.5  # all tied
    assert auc([1, 2, 3, 4], [1, 2, 3, 4]) == 0.5
    # ties between a positive and a negative count one half: (0.5 + 1 + 1 + 1) / 4
    assert auc([1, 2], [1, 0]) == pytest.approx(0.875)


def test_auc_matches_mann_whitney_with_ties():
    gen = torch.Generator().manual_seed(0)
    pos = (torch.randn(40, generator=gen) + 0.7).mul(3).round().tolist()
    neg = torch.randn(55, generator=gen).mul(3).round().tolist()
    assert auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)


def test_roc_has_one_point_per_distinct_score():
    curve = roc_curve([2, 2, 1], [1, 0])
    assert curve["thresholds"][1:] == [2, 1, 0]
    assert curve["fpr"] == [0, 0, 0.5, 1.0]
    assert curve["tpr"] == pytest.approx([0, 2 / 3, 1, 1])


def test_tpr_at_fpr_is_strict_with_ties():
    # two negatives tie with the best positive at 5: flagging it costs 2% FPR
    neg = [5.0, 5.0] + [0.0] * 98
    pos = [5.0, 4.0, 1.0, 0.0]
    assert tpr_at_fpr(pos, neg, 0.01) == {"tpr": 0.0, "fpr": 0.0, "threshold": None}
    three = tpr_at_fpr(pos, neg, 0.03)
    assert three["tpr"] == 0.75 and three["fpr"] == pytest.approx(0.02) and three["threshold"] == 1.0


def test_tpr_at_fpr_counts_fpr_equal_to_target():
    neg = [3.0] + [0.0] * 99  # one false positive = exactly 1%
    point = tpr_at_fpr([2.0, 4.0], neg, 0.01)
    assert point["tpr"] == 1.0 and point["fpr"] == pytest.approx(0.01)
    assert tpr_at_fpr([2.0, 4.0], neg, 0.0)["tpr"] == 0.5


def test_summary_and_bad_input():
    s = summarize([3, 4], [0, 1, 2])
    assert s["auc"] == 1.0 and s["tpr@1%fpr"] == 1.0 and s["tpr@3%fpr"] == 1.0
    assert s["roc"]["fpr"][0] == 0 and s["roc"]["tpr"][-1] == 1
    with pytest.raises(DoriError):
        auc([], [1.0])
    with pytest.raises(DoriError):
        auc([math.nan], [1.0])
    with pytest.raises(DoriError):
        tpr_at_fpr([1], [0], 1.5)


# ---------------------------------------------------------------- detectors
def test_registry_contract(tiny):
    assert set(DETECTORS) >= {"wen", "nemo", "trajectory"}
    small = {"wen": dict(n_gens=2), "nemo": dict(n_seeds=3), "trajectory": dict(steps=4, first=2, n_gens=1)}
    for name in ("wen", "nemo", "trajectory"):
        det = build_detector(name, **small[name])
        assert det.name == name and json.dumps(det.settings())
        out = det.score(tiny, ["a red cube", "two dogs"], [0, 1])
        assert len(out) == 2 and all(math.isfinite(r["score"]) for r in out)
        with pytest.raises(DoriError):
            det.score(tiny, "a red cube", [0])
    with pytest.raises(DoriError):
        build_detector("nope")


def _unet(model, x, t, text):
    """The tiny model's UNet on x at timestep t for a prompt, computed directly from its components."""
    ids = model.tokenizer([text], padding="max_length", max_length=model.max_tokens, truncation=True,
                          return_tensors="pt").input_ids  # fmt: skip
    emb = model.text_encoder(ids)[0].expand(x.shape[0], -1, -1)
    return model.unet(x, torch.full((x.shape[0],), t), encoder_hidden_states=emb).sample


@torch.no_grad()
def test_wen_score_matches_hand_computed_unet_outputs(tiny):
    """d_k = ||eps(x_t, c) - eps(x_t, "")||_2 at the first two DDIM steps (981, 961), guidance 7.5, for the prompt
    at position 3 of its set with gen_seed 5: the reference draws its latents after torch.manual_seed(3 + 5)
    with one torch.randn of (n_gens, C, H, W) (on the CPU, the same numbers as here)."""
    prompt, index, gens = "a red cube on grass", 3, 3
    torch.manual_seed(index + 5)
    x = torch.randn((gens, *tiny.sample_shape))  # the reference's draw (global generator)
    a = tiny.scheduler.alphas_cumprod
    u, c = _unet(tiny, x, 981, ""), _unet(tiny, x, 981, prompt)
    d1 = (c - u).flatten(1).norm(dim=1)
    eps = u + 7.5 * (c - u)
    x0 = (x - (1 - a[981]).sqrt() * eps) / a[981].sqrt()
    x961 = a[961].sqrt() * x0 + (1 - a[961]).sqrt() * eps
    d2 = (_unet(tiny, x961, 961, prompt) - _unet(tiny, x961, 961, "")).flatten(1).norm(dim=1)

    first = WenScore(n_gens=gens, gen_seed=5).score(tiny, ["other prompt", prompt], [0, index])[1]
    assert first["score"] == pytest.approx(float(d1.mean()), rel=1e-5)
    assert first["per_gen"] == pytest.approx(d1.tolist(), rel=1e-5)
    both = WenScore(n_gens=gens, gen_seed=5, end=2).score(tiny, [prompt], [index])[0]
    assert both["per_step"] == pytest.approx([float(d1.mean()), float(d2.mean())], rel=1e-4)
    assert both["score"] == pytest.approx(float((d1.mean() + d2.mean()) / 2), rel=1e-4)
    assert (
        d1 - d2
    ).abs().max() > 1e-3  # the second step is a different number (the test can tell them apart)
    with pytest.raises(DoriError):
        WenScore(start=1, end=1)


def test_nemo_score_is_max_pairwise_ssim(tiny):
    from dori.detection.nemo_score import NeMoScore
    from dori.metrics.ssim import ms_ssim_settings, pairwise_ms_ssim, upper_pairs
    from dori.mitigations.nemo_noise import initial_latents, noise_differences

    det = NeMoScore(n_seeds=4, max_rows=4)  # one prompt per UNet call: batching must not change a score
    out = det.score(tiny, ["a cat", "a dog"], [0, 1])
    lat = initial_latents(tiny, 4, 1)
    d = noise_differences(tiny, tiny.encode_text(["a dog"]).expand(4, -1, -1), lat, det.noise)
    pairs = upper_pairs(pairwise_ms_ssim(d, ms_ssim_settings(*tiny.sample_shape[1:])))
    assert out[1]["score"] == pytest.approx(float(pairs.max()), abs=1e-6)
    assert out[1]["mean_pairwise"] == pytest.approx(float(pairs.mean()), abs=1e-6)
    assert out[0]["score"] != pytest.approx(out[1]["score"], abs=1e-9)


def test_trajectory_decomposition_recovers_coefficients():
    gen = torch.Generator().manual_seed(0)
    x_t, x_0 = torch.randn(2, 64, generator=gen), torch.randn(2, 64, generator=gen)
    w0 = torch.tensor([[0.1, 0.5, 1.0], [0.2, 0.3, 1.0]])
    wt = torch.tensor([[0.9, 0.6, 0.0], [0.95, 0.7, 0.0]])
    states = torch.cat([x_t[:, None], w0[..., None] * x_0[:, None] + wt[..., None] * x_t[:, None]], 1)
    got0, gott, rms = decompose(states)
    assert got0.float() == pytest.approx(w0, abs=1e-5) and gott.float() == pytest.approx(wt, abs=1e-5)
    assert rms.max() < 1e-5


def test_trajectory_score_is_excess_over_schedule(tiny, monkeypatch):
    """A trajectory that follows sqrt(abar) exactly scores 0; one whose endpoint coefficient runs 0.1 ahead
    in every update scores 0.1; the schedule is that of the DDIM timesteps after each update."""
    det = TrajectoryScore(steps=5, first=2, n_gens=2)
    th0, tht = schedule_coefficients(tiny, 5)
    a = tiny.scheduler.alphas_cumprod
    assert tiny.ddim_scheduler(5).timesteps.tolist() == [801, 601, 401, 201, 1]
    assert float(th0[0]) == pytest.approx(float(a[601].sqrt()), rel=1e-6)  # the latent after 801 -> 601
    assert float(th0[-1]) == pytest.approx(
        float(a[0].sqrt()), rel=1e-6
    )  # final: abar_0 (set_alpha_to_one off)
    gen = torch.Generator().manual_seed(1)
    x_t, x_0 = torch.randn(64, generator=gen), torch.randn(64, generator=gen)

    def fake(model, prompts):
        out = []
        for shift in (0.0, 0.1)[: len(prompts)]:
            w0 = (th0 + shift).clamp(max=1.0).float()
            w0[-1], wt = 1.0, tht.float().clone()
            wt[-1] = 0.0
            states = torch.cat([x_t[None], w0[:, None] * x_0 + wt[:, None] * x_t])
            out.append(torch.stack([states, states]))
        return torch.stack(out)

    monkeypatch.setattr(TrajectoryScore, "trajectories", lambda self, model, prompts: fake(model, prompts))
    r = det.score(tiny, ["p", "q"], [0, 1])
    assert r[0]["score"] == pytest.approx(0.0, abs=1e-5)
    assert r[1]["score"] == pytest.approx(0.1, abs=1e-5)


# ---------------------------------------------------------------- the command
def test_detect_command_writes_scores_roc_and_resumes(tmp_path):
    from dori.cli import main

    out = tmp_path / "det"
    argv = ["detect", "--model", "tiny-random", "--device", "cpu", "--set", "vm", "--negatives", "nonmem",
            "--also", "tm", "--limit", "3", "--wen-gens", "1", "--nemo-seeds", "2", "--traj-steps", "3",
            "--traj-first", "1", "--traj-gens", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    det = json.loads((out / "detection.json").read_text())
    assert {p["detector"] for p in det["pairs"]} == {"wen", "nemo", "trajectory"}
    assert all(p["positive"] == "vm" and p["negative"] == "nonmem" for p in det["pairs"])
    assert len(det["scores"]["wen"]["tm"]) == 3 and det["sets"]["tm"]["role"] == "reported"
    assert det["detectors"]["wen"]["guidance"] == 7.5 and det["detectors"]["wen"]["n_gens"] == 1
    page = (out / "report.html").read_text()
    assert "ROC vm vs nonmem" in page and "data:image/png" in page
    files = sorted((out / "results").glob("detect.*.json"))
    assert len(files) == 3 * 3 * 3
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(argv) == 0  # resumes: nothing recomputed
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(SystemExit):
        main(["detect", "--model", "tiny-random"])  # --set is required


def test_detection_joins_an_audit_report_of_the_same_model(tmp_path):
    from dori.report.html import build_report

    audit = tmp_path / "audit"
    audit.mkdir()
    prov = {"model": "miniworld"}
    (audit / "audit.json").write_text(json.dumps({"model": "miniworld", "rows": [], "provenance": prov}))
    det = tmp_path / "det"
    det.mkdir()
    pair = {"detector": "wen", "positive": "vm", "negative": "heldout", **summarize([2.0, 3.0], [1.0, 2.5])}
    scores = {"wen": {"vm": [{"item": "vm-000", "prompt": "a <b>", "score": 2.0}]}}
    detection = {"model": "miniworld", "pairs": [pair], "scores": scores, "provenance": prov}
    (det / "detection.json").write_text(json.dumps(detection))
    page = build_report(audit, detection=det).read_text()
    assert "Detection of memorized prompts" in page and "ROC vm vs heldout" in page and "a &lt;b&gt;" in page
    detection["model"] = "sd14-random"
    (det / "detection.json").write_text(json.dumps(detection))
    page = build_report(audit, detection=det).read_text()
    assert "Not joined" in page and "ROC vm vs heldout" not in page
