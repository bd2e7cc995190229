import json
from pathlib import Path

import pytest

from dori.data.sets import sd_set, user_set
from dori.errors import DoriError
from dori.runs import RunDir


def test_resume_skips_finished_and_survives_kill(tmp_path):
    cfg = {"model": "tiny", "steps": 3}
    run = RunDir(tmp_path / "r", cfg)
    done = []

    def work(keys, fail_at=None):
        for k in keys:
            if run.has(k):
                continue
            if k == fail_at:
                raise KeyboardInterrupt
            done.append(k)
            run.put(k, {"v": k})

    with pytest.raises(KeyboardInterrupt):
        work(["a", "b", "c"], fail_at="b")
    run = RunDir(tmp_path / "r", cfg)
    work(["a", "b", "c"])
    assert done == ["a", "b", "c"]
    assert [k for k, _ in run.results()] == ["a", "b", "c"]
    assert not list((tmp_path / "r" / "results").glob(".*tmp"))


def test_changed_config_refused(tmp_path):
    RunDir(tmp_path / "r", {"steps": 3})
    with pytest.raises(DoriError, match="steps"):
        RunDir(tmp_path / "r", {"steps": 4})
    RunDir(tmp_path / "r", {"steps": 3, "progress": False})  # non-binding keys may change


def test_provenance_written(tmp_path):
    """Provenance names the commit the code runs from (the same as git reports), the versions and argv."""
    import subprocess
    import sys

    import torch

    import dori

    run = RunDir(tmp_path / "r", {})
    prov = run.provenance
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(dori.__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert len(head) == 40 and prov["git"] == head
    assert prov["torch"] == torch.__version__ and prov["dori"] == dori.__version__
    assert prov["argv"] == sys.argv


def test_shipped_sets():
    assert len(sd_set("vm")) == 112 and len(sd_set("tm")) == 388 and len(sd_set("memorized")) == 500
    assert len(sd_set("coco")) == 10000
    assert sd_set("vm")[0].prompt == "The No Limits Business Woman Podcast"


def test_missing_image_skips_item_with_reason(tmp_path):
    assert sd_set("vm", images_dir=tmp_path)[0].image is None
    item = sd_set("vm", images_dir=tmp_path)[0]
    _ = item.image
    assert "no training image" in item.skip_reason


def test_user_set_bad_file_clear_error(tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"prompt": "a", "image": "x.png"}\n{not json}\n')
    with pytest.raises(DoriError, match="items.jsonl:2"):
        user_set(bad)
    missing_prompt = tmp_path / "b.csv"
    missing_prompt.write_text("prompt,image\n,x.png\n")
    with pytest.raises(DoriError, match="no 'prompt'"):
        user_set(missing_prompt)


def test_user_set_loads_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "x.png")
    f = tmp_path / "items.jsonl"
    f.write_text(
        json.dumps({"prompt": "red", "image": "x.png", "id": "r1"})
        + "\n"
        + json.dumps({"prompt": "gone", "image": "nope.png"})
        + "\n"
    )
    items = user_set(f)
    assert items[0].image.shape == (3, 8, 8) and float(items[0].image[0].mean()) == 1.0
    assert items[1].image is None and "not found" in items[1].skip_reason
