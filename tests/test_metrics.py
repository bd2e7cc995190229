import math

import numpy as np
import pytest
import torch

from dori.errors import DoriError
from dori.metrics import functions as M
from dori.report.tables import format_table, table_html


def test_cosine_of_identical_and_orthogonal_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    sims = M.cosine_matrix(a, a)
    torch.testing.assert_close(sims.diagonal(), torch.ones(3))
    assert sims[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert sims[0, 2] == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def test_sscd_orig_max_and_median():
    gens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = M.sscd_orig(gens, torch.tensor([5.0, 0.0]))
    assert out["scores"] == pytest.approx([1.0, 0.0, 1 / math.sqrt(2)], abs=1e-6)
    assert out["max"] == pytest.approx(1.0)
    assert out["median"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # an even number of generations: the median averages the two middle scores
    out = M.sscd_orig(gens[:2], torch.tensor([1.0, 0.0]))
    assert out["median"] == pytest.approx(0.5)


def test_memorization_rate_counts_items_at_threshold():
    assert M.memorization_rate([0.9, 0.69, 0.7, 0.1], 0.7) == pytest.approx(0.5)
    assert M.memorization_rate([0.2], 0.7) == 0.0
    assert math.isnan(M.memorization_rate([], 0.7))


def test_sscd_gen_pairs_by_seed():
    ref = torch.eye(3)
    out = M.sscd_gen(ref.clone(), ref)
    assert out["max"] == pytest.approx(1.0) and out["median"] == pytest.approx(1.0)
    shuffled = M.sscd_gen(ref[[1, 2, 0]], ref)  # same images, other seeds: no pair matches
    assert shuffled["max"] == pytest.approx(0.0)
    with pytest.raises(DoriError, match="paired"):
        M.sscd_gen(ref[:2], ref)


def test_d_sscd_mean_pairwise():
    same = torch.ones(4, 3)
    assert M.d_sscd(same)["mean"] == pytest.approx(1.0)
    assert M.d_sscd(torch.eye(3))["mean"] == pytest.approx(0.0)
    mixed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # pairs: 1, 0, 0
    assert M.d_sscd(mixed) == pytest.approx({"mean": 1 / 3, "max": 1.0})
    assert math.isnan(M.d_sscd(torch.ones(1, 3))["mean"])


def test_a_clip_mean_cosine():
    out = M.a_clip(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0]))
    assert out["mean"] == pytest.approx(0.5)


def test_median_and_mad():
    assert M.median_mad([1, 2, 3, 4, 100]) == {"median": 3.0, "mad": 1.0}
    assert M.mad([5, 5, 5]) == 0.0
    assert M.median([1, 2, 3, 10]) == 2.5
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(0).normal(size=101)
    assert M.mad(x) == pytest.approx(scipy_stats.median_abs_deviation(x))


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # non-commuting covariances against scipy's matrix square root
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    q1, q2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = q1 @ q1.T + 0.1 * np.eye(4), q2 @ q2.T + 0.1 * np.eye(4)
    ref = np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert M.frechet_distance(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(ref, rel=1e-8)


def test_fid_of_samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    assert abs(M.fid(x, x.copy())) < 1e-8
    n, s, mu = 40_000, np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.0, -1.0, 0.5])
    a = rng.normal(size=(n, 4))
    b = rng.normal(size=(n, 4)) * s + mu
    expected = np.sum(mu**2) + np.sum(1 + s**2 - 2 * s)
    assert M.fid(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=0.05)
    with pytest.raises(DoriError):
        M.fid(a[:1], b)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same = M.kid(x, y, num_subsets=20, max_subset_size=300)
    shifted = M.kid(x, y + 1.0, num_subsets=20, max_subset_size=300)
    assert abs(same) < 0.02
    assert shifted > 0.5
    assert shifted > 20 * abs(same)
    assert M.kid(x, y, num_subsets=5, seed=3) == M.kid(x, y, num_subsets=5, seed=3)


def test_registry_declares_direction():
    assert {"sscd_orig", "sscd_gen", "d_sscd", "a_clip", "mr", "fid", "kid"} <= set(M.METRICS)
    assert [n for n, spec in M.METRICS.items() if spec.higher_is_better] == ["a_clip"]
    assert M.METRICS["mr"].arrow == "↓" and M.METRICS["a_clip"].arrow == "↑"
    with pytest.raises(DoriError, match="twice"):
        M.register_metric("mr", higher_is_better=False)(lambda: None)


def test_tables_mark_direction_and_missing():
    rows = [
        {"setting": "none", "set": "vm", "n_items": 2, "mr": 1.0, "sscd_orig": {"median": 0.9, "mad": 0.04},
         "sscd_gen": None, "a_clip": {"median": 0.33, "mad": 0.01}, "fid": 14.44, "kid": 0.0061},
        {"setting": "nemo <x>", "set": "vm", "n_items": 2, "mr": 0.2, "sscd_orig": {"median": 0.33, "mad": 0.18},
         "sscd_gen": {"median": 0.4, "mad": 0.21}, "a_clip": None, "fid": None, "kid": None},
    ]  # fmt: skip
    text = format_table(rows)
    assert "↓ SSCD_orig" in text and "↑ A_CLIP" in text and "↓ MR" in text
    assert "0.90 ± 0.04" in text and "N/A" in text and "0.0061" in text
    assert "D_SSCD" not in text  # no row has it
    md = format_table(rows, fmt="markdown")
    assert md.splitlines()[1].startswith("|---") and md.count("\n") == 3
    assert "nemo &lt;x&gt;" in table_html(rows)


# NeMo's compute_prompt_alignment.py (ml-research/localizing_memorization_in_diffusion_models @ f952ede), run
# unmodified on the features below (shims: `clip` looks the features up per image file and caption, `rtpt`,
# `pandas.read_csv`, `.to("cuda")` on the CPU; float32 where the reference's CLIP runs in fp16 on a GPU), six
# captions of types VM, TM, VM, VM, TM, VM, ten images each; every median it took was recorded.
NEMO_PER_ITEM = [0.804467499256134, 0.8557156920433044, 0.7725010514259338,
                 0.8964244723320007, 0.8842371702194214, 0.7772912979125977]  # fmt: skip
NEMO_OVERALL = (0.804467499256134, 0.031966447830200195)
NEMO_VM = (0.7772912979125977, 0.004790246486663818)
NEMO_TM = (0.8557156920433044, 0.0)


def _nemo_alignment_inputs():
    g = torch.Generator().manual_seed(2026)
    img = torch.randn(6, 10, 16, generator=g)
    txt = torch.randn(6, 16, generator=g)
    return img + 1.5 * txt[:, None], txt


def test_a_clip_aggregation_matches_nemo_script():
    img, txt = _nemo_alignment_inputs()
    per_item = [M.a_clip(img[i], txt[i])["median"] for i in range(6)]
    np.testing.assert_allclose(per_item, NEMO_PER_ITEM, rtol=0, atol=1e-6)
    for idx, (m, d) in (([0, 1, 2, 3, 4, 5], NEMO_OVERALL), ([0, 2, 3, 5], NEMO_VM), ([1, 4], NEMO_TM)):
        got = M.lower_median_mad([per_item[i] for i in idx])
        assert abs(got["median"] - m) < 1e-6 and abs(got["mad"] - d) < 1e-6
    # an even count: torch's median is the lower middle value, numpy's the midpoint (dori's other metrics)
    assert abs(M.median_mad(per_item)["median"] - NEMO_OVERALL[0]) > 1e-3
    from dori.evaluation import Setting, summarize

    records = [{"sscd_orig": {"max": 0.5, "median": 0.4}, "d_sscd": {"mean": 0.2}, "sscd_gen": None,
                "a_clip": M.a_clip(img[i], txt[i])} for i in range(6)]  # fmt: skip
    row = summarize(records, Setting("none", "none"), "s", 0.7)
    assert row["a_clip_aggregation"] == "median" and abs(row["a_clip"]["median"] - NEMO_OVERALL[0]) < 1e-6
    mean_row = summarize(records, Setting("none", "none"), "s", 0.7, a_clip="mean")
    assert mean_row["a_clip"] == M.median_mad([M.a_clip(img[i], txt[i])["mean"] for i in range(6)])


def test_jpeg_roundtrip_is_pil_default_save():
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    ims = (torch.rand(2, 3, 16, 16, generator=g) * 255).round().to(torch.uint8)
    out = M.jpeg_roundtrip(ims)
    buf = io.BytesIO()
    Image.fromarray(ims[1].permute(1, 2, 0).numpy()).save(buf, format="JPEG")  # as NeMo: no quality given
    buf.seek(0)
    ref = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(out[1], ref) and out.dtype == torch.uint8 and not torch.equal(out, ims)
    with pytest.raises(DoriError):
        M.jpeg_roundtrip(ims.float())
