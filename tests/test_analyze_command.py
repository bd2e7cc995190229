"""``dori analyze locality`` end to end on tiny-random (k = 3, 2 Dori steps), with fake scorer and
fake NeMo/Wanda; figures, JSON, notes and resume."""

import json

import numpy as np
import pytest
from PIL import Image

from dori.cli import main
from dori.commands import analyze
from dori.errors import DoriError
from test_locality import FakeNeMo, FakeWanda


@pytest.fixture
def items_file(tmp_path):
    rows = []
    for i, prompt in enumerate(["a red circle on grass", "a blue square in snow", "a green star at night"]):
        arr = (np.random.default_rng(i).random((16, 16, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append({"id": f"m{i}", "prompt": prompt, "image": f"{i}.png"})
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def fake_scorer(images, reference):
    return 1 - (images - reference).abs().flatten(1).mean(1)


def test_analyze_locality_end_to_end(items_file, tmp_path, monkeypatch):
    monkeypatch.setattr(analyze, "make_scorer", lambda model, args: (fake_scorer, 0.5, "fake"))
    monkeypatch.setattr(
        analyze, "make_mitigations", lambda model, args: {"nemo": FakeNeMo(), "wanda": FakeWanda()}
    )
    out, js = tmp_path / "run", tmp_path / "out.json"
    argv = ["analyze", "locality", "--model", "tiny-random", "--set", str(items_file), "--item", "m1"]
    argv += ["--nonmem-set", "nonmem", "--k", "3", "--steps", "2", "--sampling-steps", "1", "--no-progress"]
    assert main([*argv, "--out", str(out), "--json", str(js)]) == 0

    res = json.loads(js.read_text())
    disp = res["results"]["dispersion"]
    assert disp["item"] == "m1"
    for kind in ("random", "nonmem"):
        assert len(disp[kind]["pairwise_adv"]) == 3 and len(disp[kind]["init_to_adv"]) == 3
        assert disp[kind]["search"]["k"] == 3 and disp[kind]["search"]["seconds"] > 0
        assert len(disp[kind]["replication"]["best"]) == 3
    assert disp["reference_nonmem_pairwise"] == disp["nonmem"]["summary"]["pairwise_init"]
    act = res["results"]["activations"]
    assert act["n_mem"] == 3 and len(act["nemo"]["adv"]) == 2 and len(act["layer_types"]) == 11
    agr = res["results"]["agreement"]
    assert all(0.0 <= v <= 1.0 for m in ("nemo", "wanda") for v in agr[m]["adv"] + agr[m]["mem"])
    assert agr["nemo"]["count_all_mem"] == [[2, 2, 2]] * 2  # FakeNeMo picks 2 neurons per layer
    assert set(res["figures"]) == {"fig3", "fig4", "fig5", "fig10", "fig11", "fig12", "fig13"}
    for rel in res["figures"].values():
        assert (out / rel).read_bytes()[:4] == b"\x89PNG"
    assert set(res["notes"]) == set(res["figures"]) and "Fig. 4" in res["notes"]["fig4"]
    assert (out / "locality.json").exists()
    page = (out / "locality.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "Fig. 13" in page
    from dori.analysis.locality_verdict import locality_verdict

    verdict = res["verdict"]  # the record is stored, computed from the stored numbers, and on the page
    assert verdict == json.loads(json.dumps(locality_verdict(res["results"])))
    assert {c["figure"] for c in verdict["checks"]} == {
        "fig3",
        "fig4",
        "fig5",
        "fig10",
        "fig11",
        "fig12",
        "fig13",
    }
    assert f"{verdict['overall']['holding']} of {verdict['overall']['checks']} checks hold" in page

    # resume: nothing is searched or selected again, same numbers
    def boom(*a, **k):
        raise AssertionError("recomputed a finished unit")

    monkeypatch.setattr("dori.attacks.dori.Dori.__call__", boom)
    monkeypatch.setattr(analyze, "make_mitigations", lambda model, args: {"nemo": boom, "wanda": boom})
    assert main([*argv, "--out", str(out), "--json", str(js)]) == 0
    again = json.loads(js.read_text())["results"]
    assert again == res["results"]
    # a different setting in the same run directory is refused
    changed = [a if a != "3" else "4" for a in argv]  # --k 4
    assert main([*changed, "--out", str(out)]) == 2


def test_analyze_partial_analyses_and_resume_per_unit(items_file, tmp_path, monkeypatch):
    monkeypatch.setattr(analyze, "make_scorer", lambda model, args: (None, None, None))
    out = tmp_path / "run"
    argv = [
        "analyze",
        "locality",
        "--model",
        "tiny-random",
        "--set",
        str(items_file),
        "--nonmem-set",
        "nonmem",
    ]
    argv += ["--k", "2", "--steps", "1", "--no-progress", "--out", str(out)]
    assert main([*argv, "--analyses", "activations"]) == 0
    art = out / "artifacts" / "search.random.safetensors"
    stamp = art.stat().st_mtime_ns
    # activations needed the random-init triggers only: that search is saved, the non-memorized one not run
    assert (out / "results" / "search.random.json").exists()
    assert not (out / "results" / "search.nonmem.json").exists()
    assert not (out / "results" / "dispersion.json").exists()
    assert main([*argv, "--analyses", "dispersion"]) == 0
    disp = json.loads((out / "results" / "dispersion.json").read_text())
    assert art.stat().st_mtime_ns == stamp  # the saved random-init search is reused, not redone
    assert disp["random"]["search"]["k"] == 2 and disp["random"]["replication"] == {
        "skipped": "no copy detector"
    }
    assert main([*argv, "--analyses", "bogus"]) == 2


def test_find_item_errors(items_file):
    from dori.data.sets import load_set
    from dori.locality_run import find_item

    items = load_set(str(items_file))
    assert find_item(items, None, "x").id == "m0"
    with pytest.raises(DoriError):
        find_item(items, "nope", "x")
