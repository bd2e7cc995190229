"""Concept utility (Table 12): paraphrase sets as data, A_Concept and FID_Concept on the tiny model."""

import json

import pytest

from dori.concept_utility import concept_utility, load_paraphrases, world_paraphrases
from dori.data.sets import Item, user_set
from dori.errors import DoriError
from dori.evaluation import EvalConfig
from dori.models.pipeline import SamplingConfig
from dori.runs import RunDir
from test_audit import ScaleMitigation, fake_backends, write_items


def test_paraphrase_files(tmp_path):
    obj = tmp_path / "p.json"
    obj.write_text(json.dumps({"a": ["x y", "y x"], "b": ["z"]}))
    assert load_paraphrases(obj) == {"a": ["x y", "y x"], "b": ["z"]}
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"id": "a", "paraphrases": ["x y"]}\n\n{"id": 7, "paraphrases": ["q"]}\n')
    assert load_paraphrases(lines) == {"a": ["x y"], "7": ["q"]}
    for bad in ('{"a": []}', '{"a": "x"}', "[1, 2]", '{"id": "a"}\n', "not json"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(DoriError):
            load_paraphrases(tmp_path / "bad.json")
    with pytest.raises(DoriError):
        load_paraphrases(tmp_path / "missing.json")


def test_world_paraphrases_keep_the_title_words():
    items = [Item("vm-000", "zabo kelu album cover", "vm"), Item("tm-001", "rofi dana sticker", "tm")]
    out = world_paraphrases(items, n=6)
    assert out["vm-000"] == ["zabo kelu poster", "zabo kelu book cover", "zabo kelu wallpaper",
                             "zabo kelu painting", "zabo kelu photo", "kelu zabo album cover"]  # fmt: skip
    assert len(out["tm-001"]) == 6 and all({"rofi", "dana"} <= set(p.split()) for p in out["tm-001"])
    assert world_paraphrases(items, n=2)["vm-000"] == out["vm-000"][:2]
    with pytest.raises(DoriError):
        world_paraphrases([Item("u", "a red circle", "unique")])


def test_a_concept_and_fid_concept(tiny, tmp_path):
    items = user_set(write_items(tmp_path / "d", missing=False), image_size=16)
    phr = {it.id: [f"{it.prompt} again", f"another {it.prompt}"] for it in items}
    config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2), seed=1)
    backends = fake_backends()
    run = RunDir(tmp_path / "run", {"test": True})
    idx = list(range(len(items)))
    before = concept_utility(tiny, items, idx, phr, backends, run, "none", config)
    assert before["fid_concept"] is None and before["n_generations"] == 8
    same = ScaleMitigation(1.0)
    ctx = lambda ids: same.applied(tiny, ids)  # noqa: E731
    unchanged = concept_utility(tiny, items, idx, phr, backends, run, "same", config, ctx, True, "none")
    assert unchanged["a_concept"] == before["a_concept"] and abs(unchanged["fid_concept"]) < 1e-3
    assert same.calls == [[it.id] for it in items]  # each item's paraphrases under its own intervention
    harsh = ScaleMitigation(4.0)
    ctx = lambda ids: harsh.applied(tiny, ids)  # noqa: E731
    damaged = concept_utility(tiny, items, idx, phr, backends, run, "harsh", config, ctx, True, "none")
    assert damaged["fid_concept"] > 1e-2 and damaged["a_concept"] != before["a_concept"]
    with pytest.raises(DoriError, match="no paraphrases"):
        concept_utility(tiny, items, idx, {}, backends, run, "x", config)
