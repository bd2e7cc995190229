import contextlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dori.attacks.dori import Dori
from dori.audit import run_audit
from dori.data.sets import user_set
from dori.errors import DoriError
from dori.evaluation import EvalConfig, generation_seeds
from dori.metrics.features import Backends
from dori.models.pipeline import SamplingConfig
from dori.report.html import build_report
from dori.runs import RunDir, load_tensors

CAPTION = 'a <b>red</b> & "blue" thing'
CHROMIUM = Path("/usr/bin/chromium")


class FakeCopy:
    name = "fake-copy"

    def __call__(self, images):
        x = F.interpolate(images.float(), size=(8, 8), mode="area").flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)


class FakeAligner:
    name = "fake-clip"

    def image_features(self, images):
        return F.normalize(images.float().mean((2, 3)), dim=1)

    def text_features(self, prompts):
        return F.normalize(torch.tensor([[len(p) % 7 + 1.0, 1.0, 2.0] for p in prompts]), dim=1)


class FakeInception:
    name = "fake-inception"

    def __call__(self, images):
        return F.interpolate(images.float(), size=(4, 4), mode="area").flatten(1)


def fake_backends(*args, **kwargs):
    return Backends(FakeCopy(), 0.7, FakeAligner(), FakeInception())


class ScaleMitigation:
    """Scales the UNet's output conv within the block (factor 1 = a mitigation that changes nothing)."""

    name = "scale"
    per_item = True

    def __init__(self, factor):
        self.factor, self.calls, self.row_calls = factor, [], []
        self.source = f"factor-{factor}"

    @contextlib.contextmanager
    def applied_rows(self, model, row_ids):
        self.row_calls.append(list(row_ids))
        with self._scaled(model):
            yield

    @contextlib.contextmanager
    def applied(self, model, item_ids=None):
        self.calls.append(None if item_ids is None else list(item_ids))
        with self._scaled(model):
            yield

    @contextlib.contextmanager
    def _scaled(self, model):
        weight = model.unet.conv_out.weight
        old = weight.detach().clone()
        weight.data.mul_(self.factor)
        try:
            yield
        finally:
            weight.data.copy_(old)


def write_items(folder: Path, n: int = 2, missing: bool = True, kinds: tuple = ("user",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        rows.append(
            {
                "id": f"it{i}",
                "prompt": f"{CAPTION} {i}",
                "image": f"img{i}.png",
                "type": kinds[i % len(kinds)],
            }
        )
    if missing:
        rows.append({"id": "gone", "prompt": "no image", "image": "nope.png"})
    path = folder / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


CLI_ARGS = ["--model", "tiny-random", "--device", "cpu", "--attack", "dori", "--steps", "3",
            "--snapshots", "1", "--n-gens", "2", "--sample-steps", "2", "--no-progress", "--seed", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from dori.cli import main

    base = tmp_path_factory.mktemp("audit")
    items = write_items(base / "data")
    run, out = base / "run", base / "out.json"
    args = ["audit", *CLI_ARGS, "--set", str(items), "--utility-set", str(items), "--out", str(run)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dori.metrics.backends.load_backends", fake_backends)
        assert main([*args, "--json", str(out)]) == 0
    return run, json.loads(out.read_text())


def test_audit_json_schema(cli_run):
    run, result = cli_run
    assert [r["setting"] for r in result["rows"]] == [
        "no mitigation",
        "no mitigation + dori @1",
        "no mitigation + dori",
    ]
    for row in result["rows"]:
        assert row["n_items"] == 2 and row["set"].endswith("items.jsonl")
        assert 0.0 <= row["mr"] <= 1.0
        for key in ("sscd_orig", "d_sscd", "a_clip"):
            assert set(row[key]) == {"median", "mad"} and all(np.isfinite(list(row[key].values())))
        assert row["sscd_gen"] is None  # unmitigated: N/A as in the paper
        assert row["fid"] >= 0 and np.isfinite(row["kid"])
    assert [r["dori_steps"] for r in result["rows"]] == [None, 1, 3]
    assert "dori_norm_ratio" not in result["rows"][0]
    saved = load_tensors(run / "artifacts" / "dori.none.it0.safetensors")
    searched = [load_tensors(run / "artifacts" / f"dori.none.{i}.safetensors") for i in ("it0", "it1")]
    ratios = [float(t["norms"][2]) / float(t["init"].norm()) for t in searched]
    assert result["rows"][2]["dori_norm_ratio"]["median"] == pytest.approx(float(np.median(ratios)))
    assert saved["norms"].shape == (3,) and result["rows"][1]["dori_norm_ratio"]["median"] > 0
    assert result["skipped"] == [{"id": "gone", "reason": result["skipped"][0]["reason"]}]
    assert "nope.png" in result["skipped"][0]["reason"]
    prov = result["provenance"]
    assert {"git", "torch", "diffusers", "seed", "device", "dtype", "backends", "protocol"} <= set(prov)
    assert prov["backends"]["copy_detector"] == "fake-copy" and prov["seed"] == 5
    assert json.loads((run / "audit.json").read_text())["rows"] == result["rows"]
    rec = json.loads((run / "results" / "item.none.it1.json").read_text())
    assert rec["seeds"] == generation_seeds(5, 1, 2) and len(rec["sscd_orig"]["scores"]) == 2
    dori = (run / "artifacts" / "dori.none.it0.safetensors").exists()
    assert dori and (run / "artifacts" / "gen.none+dori-3.it1.safetensors").exists()


def test_report_is_self_contained_and_escaped(cli_run, tmp_path):
    run, _ = cli_run
    page = build_report(run, out=tmp_path / "r.html").read_text()
    assert "a &lt;b&gt;red&lt;/b&gt; &amp; &quot;blue&quot; thing 0" in page
    assert "<b>red</b>" not in page
    # MR plot + per item: training image, 2 prompt and 2 Dori generations, loss curve, norm curve
    assert page.count("<img ") == 1 + 2 * (1 + 2 + 2 + 1 + 1)
    assert page.count('src="data:image/png;base64,') == page.count("<img ")
    assert "http://" not in page and "https://" not in page.replace("https://dl.fbaipublicfiles", "")
    with pytest.raises(DoriError, match="audit.json"):
        build_report(tmp_path)


def test_report_command_rebuilds(cli_run, capsys):
    from dori.cli import main

    run, _ = cli_run
    (run / "report.html").unlink()
    assert main(["report", str(run), "--markdown"]) == 0
    assert (run / "report.html").exists()
    assert "| ↓ MR" in capsys.readouterr().out.replace("|↓", "| ↓")


def expected_report_images(run: Path) -> int:
    """How many images the report of an audit run must hold, counted from the run itself: the MR-vs-steps
    plot (with Dori rows), and per item its training image, the generations of each shown setting (the
    prompt rows and the final Dori row) and, with Dori, the loss and norm curves."""
    audit = json.loads((run / "audit.json").read_text())
    settings = audit["settings"]
    dori = [s for s in settings if s["attack"] != "none"]
    shown = [s["key"] for s in settings if s["attack"] == "none"] + (
        [max(dori, key=lambda s: s["dori_steps"])["key"]] if dori else []
    )
    records = [json.loads(p.read_text()) for p in (run / "results").glob("item.*.json")]
    total = 1 if any(r.get("dori_steps") for r in audit["rows"]) else 0
    for item in sorted({r["item"] for r in records}):
        total += int((run / "artifacts" / f"train.{item}.safetensors").exists())
        total += sum(len(r["seeds"]) for r in records if r["item"] == item and r["setting"] in shown)
        total += 2 if dori else 0  # loss and norm curves
    return total


@pytest.mark.browser
def test_report_renders_in_chromium(cli_run, tmp_path):
    """The report opened in headless Chromium: every image it must hold (counted from the run) loads, no
    script error; the page's status is read from attributes, not page text. Needs /usr/bin/chromium (CI
    installs Debian's package through .ci/run); skipped, and says so, where it is absent."""
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    run, _ = cli_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    out = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", (run / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    html_tag = re.search(r"<html[^>]*>", out.stdout)
    assert html_tag, out.stdout[-2000:] + out.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', html_tag.group()))
    expected = expected_report_images(run)
    assert (
        expected >= 10
    )  # this run: the steps plot + 2 items x (training image, 2 x 2 generations, 2 curves)
    assert attrs == {"status": "ok", "images": str(expected), "broken": "0", "errors": "0"}, attrs
    assert len(re.findall(r"<img\b", out.stdout)) == expected
    assert not re.search(r">[^<]*(pending|images=\d)", out.stdout)  # no status text on the page


def record_sampling(model, monkeypatch) -> list[list[int]]:
    """The seeds of every ``model.sample`` call from now on (the calls still sample)."""
    sampled, real_sample = [], model.sample

    def recording(emb, seeds, *args, **kwargs):
        sampled.append(list(seeds))
        return real_sample(emb, seeds, *args, **kwargs)

    monkeypatch.setattr(model, "sample", recording)
    return sampled


def _audit(
    model, folder, run_dir, batch_size=64, mitigation=None, attack="dori", progress=False, kinds=("user",)
):
    items = user_set(write_items(folder, missing=False, kinds=kinds), image_size=16)
    config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2, batch_size=batch_size), seed=3)
    run = RunDir(run_dir, {"test": True})
    return run_audit(
        model, items, "toy", fake_backends(), run, config, mitigation=mitigation,
        attack=Dori(steps=2) if attack == "dori" else None, snapshots=(1,), progress=progress,
    )  # fmt: skip


def test_identity_mitigation_pairs_seeds_and_restores(tiny, tmp_path):
    fitted = {"scale:1": ScaleMitigation(1.0), "scale:0": ScaleMitigation(0.0)}
    before = tiny.unet.conv_out.weight.detach().clone()
    same = _audit(tiny, tmp_path / "d", tmp_path / "same", mitigation=fitted["scale:1"], kinds=("vm", "tm"))
    keys = ["none", "scale", "scale+dori-1", "scale+dori-2"]
    assert [r["key"] for r in same["rows"]] == [k for k in keys for _ in range(3)]
    assert [r["set"] for r in same["rows"][:3]] == ["toy", "toy/tm", "toy/vm"]
    assert [r["n_items"] for r in same["rows"][:3]] == [2, 1, 1]
    none_row, scale_row = same["rows"][0], same["rows"][3]
    # a mitigation that changes nothing regenerates the reference images at the same seeds
    assert scale_row["sscd_gen"] == {"median": pytest.approx(1.0), "mad": pytest.approx(0.0, abs=1e-6)}
    assert scale_row["sscd_orig"]["median"] == pytest.approx(none_row["sscd_orig"]["median"], abs=1e-5)
    assert all(c is not None and len(c) == 1 for c in fitted["scale:1"].calls)  # one context per item
    ids = {"it0", "it1"}  # batched calls carry each row's own item (applied_rows)
    assert fitted["scale:1"].row_calls and all(set(r) <= ids for r in fitted["scale:1"].row_calls)
    assert same["settings"][1]["mitigation"] == "scale:factor-1.0"
    changed = _audit(tiny, tmp_path / "d", tmp_path / "changed", mitigation=fitted["scale:0"], attack="none")
    assert changed["rows"][1]["sscd_gen"]["median"] < 0.99
    torch.testing.assert_close(tiny.unet.conv_out.weight, before, rtol=0, atol=0)


def test_resume_after_interruption_and_batching(tiny, tmp_path, monkeypatch):
    whole = _audit(tiny, tmp_path / "d", tmp_path / "whole")  # all items in one sample call
    import dori.evaluation.items as E  # evaluate_items calls score_item from its own module

    real_score, calls = E.score_item, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(E, "score_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        _audit(tiny, tmp_path / "d", tmp_path / "part", batch_size=2)  # one item per sample call
    assert sorted(p.name for p in (tmp_path / "part" / "results").glob("item.*")) == ["item.none.it0.json"]
    monkeypatch.setattr(E, "score_item", real_score)

    sampled = record_sampling(tiny, monkeypatch)
    resumed = _audit(tiny, tmp_path / "d", tmp_path / "part", batch_size=2, progress=True)
    assert sampled[0] == generation_seeds(3, 1, 2)  # only the unfinished item of the first setting
    for a, b in zip(whole["rows"], resumed["rows"], strict=True):
        for key in ("sscd_orig", "d_sscd", "a_clip"):
            assert a[key] == pytest.approx(b[key], abs=1e-4)
        assert a["mr"] == b["mr"]

    sampled.clear()
    monkeypatch.setattr(Dori, "__call__", lambda *a, **k: pytest.fail("finished Dori searched again"))
    again = _audit(tiny, tmp_path / "d", tmp_path / "part", batch_size=2)
    assert sampled == [] and again["rows"] == resumed["rows"]
    with pytest.raises(DoriError, match="other settings"):
        RunDir(tmp_path / "part", {"test": False})


def test_unlearndiffatk_attack_rows(tiny, tmp_path):
    from dori.attacks.unlearndiffatk import UnlearnDiffAtk

    items = user_set(write_items(tmp_path / "d", missing=False), image_size=16)
    config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2), seed=3)
    run = RunDir(tmp_path / "uda", {"test": True})
    out = run_audit(
        tiny, items, "toy", fake_backends(), run, config, attack=UnlearnDiffAtk(timesteps=2, iterations=2),
        progress=False,
    )  # fmt: skip
    assert [r["key"] for r in out["rows"]] == ["none", "none+uda"]
    prompts = [run.get(f"uda.none.{it.id}")["prompt"] for it in items]
    # the reference's decoded prompt: k tokens, then the prompt's tokens that fit (8 positions here)
    kept = [
        tiny.tokenizer.decode(tiny.tokenizer(it.prompt, add_special_tokens=False).input_ids[:3])
        for it in items
    ]
    assert all(p.endswith(k) and p != it.prompt for p, k, it in zip(prompts, kept, items, strict=True))
    # the reference's early stop: a prompt whose generation passes the threshold ends the item's search
    assert [run.get(f"uda.none.{it.id}")["stopped_at"] for it in items] == [None] * len(items)  # 0.7: none
    always = Backends(FakeCopy(), -2.0, FakeAligner(), FakeInception())  # every cosine passes -2
    run2 = RunDir(tmp_path / "uda2", {"test": True})
    run_audit(
        tiny, items, "toy", always, run2, config, attack=UnlearnDiffAtk(timesteps=2, iterations=2),
        progress=False,
    )  # fmt: skip
    # the reference first judges the unattacked prompt: when it already replicates, it is kept
    assert [run2.get(f"uda.none.{it.id}")["stopped_at"] for it in items] == [0] * len(items)
    assert [run2.get(f"uda.none.{it.id}")["prompt"] for it in items] == [it.prompt for it in items]


def test_fast_flag_on_cpu_gives_the_same_rows(cli_run, tmp_path):
    """``--fast`` keeps float32 on the CPU and only changes batching, which results never depend on."""
    from dori.cli import main

    _, result = cli_run
    items = write_items(tmp_path / "data")
    out = tmp_path / "fast.json"
    args = [
        "audit",
        *CLI_ARGS,
        "--set",
        str(items),
        "--utility-set",
        str(items),
        "--out",
        str(tmp_path / "run"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dori.metrics.backends.load_backends", fake_backends)
        assert main([*args, "--fast", "--json", str(out)]) == 0
    fast = json.loads(out.read_text())
    keys = ("setting", "mr", "sscd_orig", "d_sscd", "a_clip", "fid")
    assert [{k: r[k] for k in keys} for r in fast["rows"]] == [
        {k: r[k] for k in keys} for r in result["rows"]
    ]
    assert fast["provenance"]["dtype"] == "torch.float32"


def test_skip_windows_the_set_and_refuses_an_empty_one():
    from dori.audit_run import window as _window

    items = list(range(10))
    assert _window(items, 0, None) == items
    assert _window(items, 3, 4) == [3, 4, 5, 6]
    assert _window(items, 8, 5) == [8, 9]
    with pytest.raises(DoriError, match="no items left"):
        _window(items, 10, None)
    with pytest.raises(DoriError, match=">= 0"):
        _window(items, -1, None)


def test_audit_norm_ball_bounds_the_searched_embeddings(tmp_path, capsys):
    from dori.cli import main

    items = write_items(tmp_path / "data", missing=False)
    args = ["audit", *CLI_ARGS, "--set", str(items), "--snapshots", "none", "--out", str(tmp_path / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dori.metrics.backends.load_backends", fake_backends)
        assert main([*args, "--norm-ball", "0"]) == 2
        assert "--norm-ball must be positive" in capsys.readouterr().err
        assert main([*args, "--norm-ball", "5.0"]) == 0
    for i in ("it0", "it1"):
        saved = load_tensors(tmp_path / "run" / "artifacts" / f"dori.none.{i}.safetensors")
        assert float(saved["init"].norm()) > 5.0  # the prompt's embedding lies outside the ball ...
        assert float(saved["embedding"].norm()) <= 5.0 + 1e-4  # ... and every step is projected back
        assert torch.all(saved["norms"] <= 5.0 + 1e-4)


def test_share_unmitigated_reuses_the_none_rows_and_utility_of_another_mitigation_s_audit(
    tiny, tmp_path, monkeypatch
):
    """Table 1's Wanda audit takes the unmitigated rows and utility from the NeMo audit: the rows equal an audit
    that generated everything itself, the unmitigated model generates nothing, and another protocol shares
    nothing. The utility rows carry A_CLIP of the utility generations with their prompts."""
    from dori.audit import Utility
    from dori.audit_run import audit_to_folder, share_unmitigated

    items = user_set(write_items(tmp_path / "d", n=3, missing=False), image_size=16)
    ref = [it.image for it in items]
    utility = Utility("toy", [it.prompt for it in items] + ["another caption"], lambda: ref)

    def audit(out, factor, seed=3, share_from=None):
        config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2), seed=seed)
        return audit_to_folder(
            tmp_path / out, tiny, items, "toy", fake_backends(), config, mitigation=ScaleMitigation(factor),
            attack=None, snapshots=(), utility=utility, progress=False, report=False, share_from=share_from,
        )  # fmt: skip

    first = audit("a", 1.0)
    alone = audit("b", 0.5)
    sampled = record_sampling(tiny, monkeypatch)
    shared = audit("c", 0.5, share_from=tmp_path / "a")
    assert shared["rows"] == alone["rows"]
    # only the mitigated model generated: 3 items x 2 generations, then 4 utility prompts
    assert [len(seeds) for seeds in sampled] == [6, 4]
    assert (tmp_path / "c" / "results" / "item.none.it0.json").read_bytes() == (
        tmp_path / "a" / "results" / "item.none.it0.json"
    ).read_bytes()
    none_row = next(r for r in shared["rows"] if r["key"] == "none" and r["set"] == "toy")
    assert none_row["fid"] == next(r for r in first["rows"] if r["key"] == "none")["fid"]
    clip = none_row["a_clip_utility"]
    assert clip["n"] == 4 and -1.0 <= clip["median"] <= 1.0 and clip["mean"] != 0.0 and clip["mad"] >= 0.0
    scale_row = next(r for r in shared["rows"] if r["key"] == "scale" and r["set"] == "toy")
    assert scale_row["a_clip_utility"]["n"] == 4 and scale_row["fid"] != none_row["fid"]
    other = audit("d", 0.5, seed=4)
    assert other["rows"] != alone["rows"]
    same, seeds4 = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("c", "d"))
    assert (
        share_unmitigated(tmp_path / "a", RunDir(tmp_path / "e", seeds4)) == 0
    )  # other seeds: nothing shared
    assert share_unmitigated(tmp_path / "missing", RunDir(tmp_path / "f", same)) == 0
    copied = share_unmitigated(tmp_path / "a", RunDir(tmp_path / "g", same))
    assert copied == len(list((tmp_path / "g" / "results").glob("*"))) + len(
        list((tmp_path / "g" / "artifacts").glob("*"))
    )
    assert {p.name for p in (tmp_path / "g" / "results").glob("*")} == {
        "item.none.it0.json", "item.none.it1.json", "item.none.it2.json", "utility.none.json"
    }  # fmt: skip


def test_share_rows_only_takes_the_prompt_rows_from_an_audit_with_another_attack(tiny, tmp_path, monkeypatch):
    """The demo's audit of Dori from random init takes the fine-tuned model's prompt rows from its audit of Dori
    from the prompt (``share_rows_only``): its rows equal an audit that generated everything, its model generates
    only the Dori rows, no utility record is copied, and without ``share_rows_only`` the other attack shares
    nothing."""
    from dori.audit import Utility
    from dori.audit_run import audit_to_folder

    items = user_set(write_items(tmp_path / "d", n=3, missing=False), image_size=16)
    utility = Utility("toy", [it.prompt for it in items], lambda: [it.image for it in items])

    def audit(out, init, share_from=None, rows_only=False, with_utility=False):
        config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2), seed=3)
        return audit_to_folder(
            tmp_path / out, tiny, items, "toy", fake_backends(), config, attack=Dori(steps=1, init=init),
            snapshots=(), utility=utility if with_utility else None, progress=False, report=False,
            share_from=share_from, share_rows_only=rows_only,
        )  # fmt: skip

    audit("prompt", "prompt", with_utility=True)
    alone = audit("alone", "random")
    sampled = record_sampling(tiny, monkeypatch)
    shared = audit("shared", "random", share_from=tmp_path / "prompt", rows_only=True)
    assert shared["rows"] == alone["rows"]
    assert [len(seeds) for seeds in sampled] == [6]  # the Dori row only: 3 items x 2 generations
    assert {p.name for p in (tmp_path / "shared" / "results").glob("*none.*")} == {
        "item.none.it0.json", "item.none.it1.json", "item.none.it2.json"
    }  # fmt: skip
    sampled.clear()
    audit("full", "random", share_from=tmp_path / "prompt")  # the attack differs: nothing shared
    assert [len(seeds) for seeds in sampled] == [6, 6]
