"""Sharding per-item work over processes: the helpers in one process, and ``torchrun -m dori`` with two CPU
processes (gloo) giving the rows of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dori import distributed
from dori.distributed import DistContext, map_sharded, run_sharded, shard
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


def test_single_process_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched() and distributed.is_main()
    assert distributed.my_share([3, 1, 2]) == [3, 1, 2]
    calls = []

    def fn(batch):
        calls.append(batch)
        return [x * 10 for x in batch]

    assert map_sharded(fn, [1, 2, 3, 4, 5], batch_size=2) == [10, 20, 30, 40, 50]
    assert calls == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="2 items"):
        map_sharded(lambda b: [0], [1, 2], batch_size=2)
    with distributed.main_first():
        distributed.sync()  # no-ops in one process


def _sscd_stand_in(path: Path) -> Path:
    """A TorchScript 'copy detector' (4x4 average colours): the CLI loads it as --sscd."""
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    torch.jit.trace(module, torch.rand(1, 3, 32, 32)).save(str(path))
    return path


@pytest.mark.multiprocess
def test_torchrun_two_gloo_processes_audit_equals_one(tmp_path, monkeypatch, capsys):
    """``torchrun --nproc_per_node 2 -m dori audit`` (gloo, tiny-random): one run directory, one JSON and
    report written by rank 0, rows equal to the one-process audit; a lost item is recomputed alone."""
    from dori.cli import main
    from test_audit import write_items  # beside this file (pytest puts the tests folder on the path)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    items = write_items(tmp_path / "data", n=5, missing=False)
    sscd = _sscd_stand_in(tmp_path / "sscd.pt")
    args = ["audit", "--model", "tiny-random", "--device", "cpu", "--set", str(items), "--sscd", str(sscd),
            "--attack", "dori", "--steps", "3", "--snapshots", "1", "--n-gens", "2", "--sample-steps", "2",
            "--no-progress", "--seed", "5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    single = json.loads((tmp_path / "one.json").read_text())

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dori",
    ]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("no mitigation + dori @1") == 1  # one table: rank 1 prints nothing
    assert proc.stderr.count("report: ") == 1
    multi = json.loads((tmp_path / "two.json").read_text())
    assert json.loads((tmp_path / "two" / "audit.json").read_text())["rows"] == multi["rows"]
    assert [r["setting"] for r in multi["rows"]] == [r["setting"] for r in single["rows"]]
    for a, b in zip(single["rows"], multi["rows"], strict=True):
        assert a["n_items"] == b["n_items"] == 5 and a["mr"] == b["mr"]
        # the items are the same, their batches are not: float32 rounding of other batch shapes, which Adam's
        # normalized steps carry into the embeddings (seen: 3e-5 on a median of 0.85)
        for key in ("sscd_orig", "d_sscd"):
            assert a[key]["median"] == pytest.approx(b[key]["median"], abs=2e-4)
            assert a[key]["mad"] == pytest.approx(b[key]["mad"], abs=2e-4)
    run = RunDir(tmp_path / "two")
    records = dict(run.results("item."))
    assert len(records) == 15 and {r["rank"] for r in records.values()} == {0, 1}  # 3 rows x 5 items

    # resumable per item: a lost result (and its Dori search) is recomputed, the rest is kept
    lost = "item.none+dori-3.it3"
    run.result_path(lost).unlink()
    (run.path / "artifacts" / "dori.none.it3.safetensors").unlink()
    kept = run.result_path("item.none+dori-3.it1").stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert run.result_path("item.none+dori-3.it1").stat().st_mtime_ns == kept
    assert run.get(lost)["sscd_orig"]["max"] == pytest.approx(records[lost]["sscd_orig"]["max"], abs=2e-4)
    assert [r["mr"] for r in again["rows"]] == [r["mr"] for r in multi["rows"]]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*cmd, "-m", "dori", *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_detect_and_mitigate_nemo_equal_one_process(tmp_path, monkeypatch):
    """``dori detect`` and ``dori mitigate nemo`` (plain and iterative) under torchrun with two gloo processes
    write the per-prompt results of one process."""
    from dori.cli import main
    from test_audit import write_items

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    detect = ["detect", "--model", "tiny-random", "--device", "cpu", "--set", "vm", "--negatives", "nonmem",
              "--limit", "3", "--wen-gens", "1", "--nemo-seeds", "2", "--traj-steps", "3", "--traj-first", "1",
              "--traj-gens", "1", "--no-progress"]  # fmt: skip
    items = str(write_items(tmp_path / "data", n=4, missing=False))
    nemo = ["mitigate", "nemo", "--model", "tiny-random", "--device", "cpu", "--set", items, "--n-seeds", "3",
            "--theta-start", "1.5", "--tau", "0.05", "--no-progress", "--calibration-set", items,
            "--dori-steps", "2", "--chunk", "1"]  # fmt: skip
    runs = [(detect, "detect"), (nemo, "nemo"), ([*nemo, "--iterative", "2"], "nemo-it")]
    for args, name in runs:
        assert main([*args, "--out", str(tmp_path / f"{name}-one")]) == 0
        proc = _torchrun([*args, "--out", str(tmp_path / f"{name}-two")])
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = RunDir(tmp_path / "detect-one"), RunDir(tmp_path / "detect-two")
    a, b = dict(one.results("detect.")), dict(two.results("detect."))
    assert sorted(a) == sorted(b) and len(a) == 3 * 2 * 3
    for k in a:
        assert a[k]["score"] == pytest.approx(b[k]["score"], rel=1e-4, abs=1e-5)
    _compare_nemo(tmp_path)


def _compare_nemo(base: Path) -> None:
    """NeMo's neuron sets equal; its scores equal to float32 rounding of other batch shapes (seen: 1e-6). In
    iterative NeMo, round 1 (sets and Dori embeddings) is the same; round 2 is only compared item by item for
    being flagged: on tiny-random every score is 0.999 +- 1e-4, so refinement decisions (score < threshold)
    turn on 1e-7 differences of round 1's embeddings and pick other neurons (seen with 2 of 4 items)."""
    from safetensors.torch import load_file

    def items(folder: Path) -> dict:
        return json.loads((folder / "nemo.json").read_text())["items"]

    for one, two in (
        (base / "nemo-one", base / "nemo-two"),
        (base / "nemo-it-one" / "round-1", base / "nemo-it-two" / "round-1"),
    ):
        a, b = items(one), items(two)
        assert sorted(a) == sorted(b)
        for k in a:
            assert (a[k]["memorized"], a[k]["kept_seeds"], a[k]["initial"], a[k]["refined"]) == (
                b[k]["memorized"], b[k]["kept_seeds"], b[k]["initial"], b[k]["refined"]
            )  # fmt: skip
            assert a[k]["refined_score"] == pytest.approx(b[k]["refined_score"], abs=1e-5)
    ya = load_file(str(base / "nemo-it-one" / "round-1" / "embeddings.safetensors"))["y"]
    yb = load_file(str(base / "nemo-it-two" / "round-1" / "embeddings.safetensors"))["y"]
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    a, b = items(base / "nemo-it-one" / "round-2"), items(base / "nemo-it-two" / "round-2")
    assert {k: v["memorized"] for k, v in a.items()} == {k: v["memorized"] for k, v in b.items()}


def test_commands_that_are_not_sharded_refuse_torchrun(monkeypatch, capsys):
    """Under torchrun a command without sharded items would run N whole copies into one folder: refused."""
    from dori.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["demo"]) == 2
    assert "runs as one process" in capsys.readouterr().err
