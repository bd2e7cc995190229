import os
import subprocess
import sys
from pathlib import Path

import pytest

from dori.distributed import DistContext, run_sharded, shard
from dori.runs import RunDir

HERE = Path(__file__).parent


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_run_sharded_single_process_resumes(tmp_path):
    run = RunDir(tmp_path / "run", {"x": 1})
    calls = []

    def work(batch):
        calls.append(list(batch))
        return [{"sq": i * i} for i in batch]

    out = run_sharded(DistContext(), run, list(range(5)), key=lambda i: f"i{i}", work=work, batch_size=2)
    assert out == {f"i{i}": {"sq": i * i} for i in range(5)}
    assert calls == [[0, 1], [2, 3], [4]]
    run.result_path("i3").unlink()
    calls.clear()
    assert run_sharded(DistContext(), run, list(range(5)), key=lambda i: f"i{i}", work=work) == out
    assert calls == [[3]]


def _strip(results):
    return {k: {kk: vv for kk, vv in v.items() if kk != "rank"} for k, v in results.items()}


def test_two_gloo_processes_equal_one(tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo), tiny-random: merged results equal a single-process run."""
    import dist_worker  # beside this file (pytest puts the tests folder on the path)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    single = dist_worker.audit(str(tmp_path / "single"))

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(HERE / "dist_worker.py"), str(tmp_path / "multi")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = RunDir(tmp_path / "multi")
    merged = dict(multi.results())
    assert sorted(merged) == sorted(single)
    assert {v["rank"] for v in merged.values()} == {0, 1}
    a, b = _strip(single), _strip(merged)
    for k in a:
        assert a[k]["loss"] == pytest.approx(b[k]["loss"], rel=1e-5, abs=1e-6)
        assert a[k]["norm"] == pytest.approx(b[k]["norm"], rel=1e-5)
        assert a[k]["gen_mean"] == pytest.approx(b[k]["gen_mean"], rel=1e-5, abs=1e-6)

    # resumable per item: a lost result is recomputed, the others are kept
    multi.result_path("item4").unlink()
    again = dist_worker.audit(str(tmp_path / "multi"))
    assert again["item4"]["rank"] == 0 and again["item1"]["rank"] == 1
    assert again["item4"]["norm"] == pytest.approx(single["item4"]["norm"], rel=1e-5)
