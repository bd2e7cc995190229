"""The demo's adversarial fine-tuning part: which fine-tuning and audits it runs, and the rows it returns (the
library functions it calls are replaced by recorders; no model runs)."""

from __future__ import annotations

import json

import dori.recipes.advft_story as story


def _audit(key_rows):
    def row(k, mr, fid):
        util = (
            {}
            if fid is None
            else {"a_clip_utility": {"median": fid / 10, "n": 100}, "utility_set": "heldout"}
        )
        return {"key": k, "set": "s", "mr": mr, "n_items": 12, "fid": fid, **util}

    return {"rows": [row(*r) for r in key_rows]}


def test_story_fine_tunes_once_and_audits_prompt_and_random_init(tmp_path, monkeypatch):
    calls = {"ft": 0, "jobs": {}}

    class FakeFT:
        def __init__(self, **kw):
            pass

        def __call__(self, model, items, out, surrogates=None, utility=()):
            calls["ft"] += 1
            calls["ft_items"], calls["n_utility"] = len(items), len(utility)
            (out / "surrogates").mkdir(parents=True, exist_ok=True)
            (out / "surrogates" / "surrogates.json").write_text(
                json.dumps({"settings": {"summary": {"n": 1}}})
            )
            (out / "finetune.json").write_text(json.dumps({"epochs_done": 8, "utility": ["u"] * 3}))

    class FakePolicy:
        def __init__(self, **kw):
            pass

        def surrogates(self, model, items, out, copy_check, aligner=None):
            return "surrogates"

    def fake_audit(out, job):
        calls["jobs"][out.name] = job
        mr = {"audit-advft": 0.5, "audit-advft-random": 0.25}.get(out.name, 0.0)
        fid = {"audit-advft": 5.0, "audit-none": 3.0}.get(out.name)
        return _audit([("none", 0.9 if out.name == "audit-none" else 0.0, fid), ("none+dori-50", mr, None)])

    monkeypatch.setattr(story, "open_model", lambda *a: object())
    monkeypatch.setattr(story, "load_set", lambda name, model=None, limit=None: [name] * (limit or 40))
    monkeypatch.setattr(story, "load_backends", lambda model: None)
    monkeypatch.setattr(story, "SurrogatePolicy", FakePolicy)
    monkeypatch.setattr(story, "AdversarialFineTuning", FakeFT)
    monkeypatch.setattr(story, "run_audit_job", fake_audit)
    cfg = story.AdvFTStoryConfig(limit=12, progress=False)
    result = story.run_advft_story(tmp_path, cfg)
    assert calls["ft"] == 1 and calls["ft_items"] == 12 and calls["n_utility"] == 2000
    jobs = calls["jobs"]
    assert jobs["audit-advft"].attack.init == "prompt" and jobs["audit-advft"].attack.steps == 50
    assert jobs["audit-advft-random"].attack.init == "random"
    assert jobs["audit-advft"].model == str(tmp_path / "advft") and jobs["audit-advft"].limit == 12
    assert jobs["audit-advft"].utility_set == "heldout" and jobs["audit-advft"].n_utility == 100
    # no unmitigated row given: the recipe audits the unmitigated model's utility itself, same prompts and seed
    assert jobs["audit-none"].model == "miniworld" and jobs["audit-none"].utility_set == "heldout"
    assert jobs["audit-none"].seed == jobs["audit-advft"].seed and jobs["audit-none"].attack is None
    rows = result["rows"]
    assert rows["advft"]["mr"] == 0.0 and rows["advft+dori"]["mr"] == 0.5
    assert rows["advft+dori-random"]["mr"] == 0.25 and rows["utility.advft"]["fid"] == 5.0
    assert rows["utility.advft"]["a_clip"] == {"median": 0.5, "n": 100} and rows["utility.none"]["fid"] == 3.0
    assert result["finetune"] == {"epochs_done": 8}  # the utility id list is left out
    assert json.loads((tmp_path / "advft_story.json").read_text())["rows"]["advft+dori"]["mr"] == 0.5
    calls[
        "jobs"
    ].clear()  # resumed: the finished fine-tuning is not run again; a given unmitigated row is used
    given = {"fid": 2.5, "kid": 0.1, "a_clip_utility": {"median": 0.7, "n": 100}, "utility_set": "heldout"}
    again = story.run_advft_story(tmp_path, cfg, unmitigated=given)
    assert calls["ft"] == 1 and "audit-none" not in calls["jobs"]
    assert (
        again["rows"]["utility.none"]["fid"] == 2.5
        and again["rows"]["utility.none"]["a_clip"]["median"] == 0.7
    )


def test_demo_fine_tunes_on_the_cpu_budget_and_opens_the_report_with_the_run_s_sentences(
    tmp_path, monkeypatch
):
    """run_demo: Table 1's rows, then the fine-tuned model's (its unmitigated utility is Table 1's), the CPU budget
    on the CPU, and the report's first paragraphs are the sentences of these rows."""
    import dori.recipes.demo as demo
    import dori.report.html as html

    seen = {}
    table = {
        "rows": [
            {"setting": "none", "mr": 0.9, "n_items": 10, "fid": 3.0, "kid": 1.0},
            {"setting": "nemo", "mr": 0.0, "n_items": 10},
            {"setting": "nemo+dori", "mr": 0.8, "n_items": 10},
        ],
        "steps_rows": [],
    }
    monkeypatch.setattr(demo, "run_table1", lambda out, cfg: table)

    def fake_story(out, cfg, unmitigated=None):
        seen["story"], seen["unmitigated"] = cfg, unmitigated
        return {
            "rows": {
                "advft": {"setting": "advft", "mr": 0.0, "n_items": 10},
                "advft+dori": {"setting": "advft+dori", "mr": 0.0, "n_items": 10},
                "advft+dori-random": {"setting": "advft+dori-random", "mr": 0.1, "n_items": 10},
                "utility.none": {"setting": "utility.none", "a_clip": 0.8},
                "utility.advft": {"setting": "utility.advft", "a_clip": 0.79, "fid": 4.0},
            }
        }

    monkeypatch.setattr(story, "run_advft_story", fake_story)

    def fake_report(folder, out, rows, title, intro_html):
        seen["rows"], seen["intro"] = rows, intro_html
        return out

    monkeypatch.setattr(html, "build_report", fake_report)
    result = demo.run_demo(tmp_path, demo.DemoConfig(limit=10, device="cpu", progress=False))
    assert seen["story"].finetune == demo.CPU_ADVFT and seen["story"].limit == 10
    settings = [r["setting"] for r in seen["rows"]]
    assert settings == ["none", "nemo", "nemo+dori", "advft", "advft+dori", "advft+dori-random"] + [
        "utility.none",
        "utility.advft",
    ]
    assert seen["unmitigated"]["setting"] == "none" and seen["unmitigated"]["fid"] == 3.0  # Table 1's row
    assert "NeMo hides the images" in result["sentences"][1]
    assert "Adversarial fine-tuning removes them" in result["sentences"][2]
    assert seen["intro"].startswith("<p>" + result["sentences"][0])


def test_utility_rows_render_in_the_report_tables():
    """The utility rows the recipe makes (from an audit row's FID/KID and utility A_CLIP) format as table cells,
    with or without a MAD; the demo's report failed on a utility A_CLIP without one."""
    from dori.report.tables import cells

    audit_row = {
        "fid": 4.5, "kid": 0.25, "utility_set": "heldout", "fid_reference": "heldout: 100 reference images",
        "a_clip_utility": {"median": 0.861, "mad": 0.02, "mean": 0.85, "n": 100},
    }  # fmt: skip
    row = story._utility_row(audit_row, "utility.advft")
    assert row["n_items"] == 100 and row["set"] == "heldout" and row["fid"] == 4.5
    headers, body = cells([row, dict(row, a_clip={"median": 0.5, "n": 3})])
    col = headers.index("↑ A_CLIP")
    assert body[0][col] == "0.86 ± 0.02" and body[1][col] == "0.50"
    assert body[0][headers.index("↓ FID")] == "4.50"
    assert story._utility_row({"fid": None}, "utility.none") is None and story._utility_row(None, "x") is None
