"""Reliability and security (issue 24): each test reproduces one failure found by fuzzing dori as a hostile
but realistic user would, and checks that dori now refuses or recovers. docs/reliability.md maps the
promises to these tests."""

from __future__ import annotations

import re

import pytest
import torch

from dori.errors import DoriError


class _Planted:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny_training_call(ckpt):
    from dori.miniworld.train_unet import train_unet
    from dori.models.builders import build_tiny_random

    model = build_tiny_random(seed=0)
    model.unet.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, *model.sample_shape, generator=g)
    emb = torch.randn(4, 8, model.unet.config.cross_attention_dim, generator=g)
    rows = torch.tensor([1, 2, 3, 1, 2, 3, 1])
    return train_unet(model, x0, emb, rows, torch.arange(7) % 6, steps=2, batch=3, seed=0,
                      log=lambda msg: None, checkpoint=ckpt)  # fmt: skip


def test_item1_planted_unet_checkpoint_runs_no_code(tmp_path):
    """Item 1: `dori miniworld train` resumed from OUT/train/unet-checkpoint.pt with
    torch.load(weights_only=False), so a planted checkpoint ran arbitrary code."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "unet-checkpoint.pt"
    torch.save({"steps": 2, "batch": 3, "n": 7, "payload": _Planted(marker)}, ckpt)
    with pytest.raises(DoriError, match="unet-checkpoint.pt is not a plain training state"):
        _tiny_training_call(ckpt)
    assert not marker.exists()
    ckpt.write_bytes(b"PK\x03\x04truncated")  # a truncated file: named, no traceback
    with pytest.raises(DoriError, match="unreadable or truncated"):
        _tiny_training_call(ckpt)
    torch.save([1, 2], ckpt)  # a safe file that is not a state
    with pytest.raises(DoriError, match="not a dori training state"):
        _tiny_training_call(ckpt)


def test_item1_safe_loader_refuses_code_in_finetune_state(tmp_path):
    from dori.safeload import load_state

    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "optimizer": _Planted(marker)}, tmp_path / "train_state.pt")
    with pytest.raises(DoriError, match="not a plain training state"):
        load_state(tmp_path / "train_state.pt")
    assert not marker.exists()
    torch.save({"epoch": 1, "t": torch.ones(2), "none": None}, tmp_path / "ok.pt")
    assert load_state(tmp_path / "ok.pt")["epoch"] == 1


def _model_folder(path, seed=0):
    from dori.models.builders import build_tiny_random
    from dori.models.loading import save_model

    return save_model(build_tiny_random(seed=seed), path)


def _prompts_file(path, n=2):
    import json

    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"a red thing {i}"}) + "\n" for i in range(n))
    )
    return path


def _unet_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "unet").iterdir())}


def test_item2_finetune_never_overwrites_its_input_model(tmp_path, capsys):
    """Item 2: `dori finetune esd --model M --out M` replaced the input model's weights in place."""
    from dori.cli import main

    model = _model_folder(tmp_path / "M")
    before = _unet_bytes(model)
    items = _prompts_file(tmp_path / "p.jsonl")
    base = [
        "finetune",
        "esd",
        "--model",
        str(model),
        "--set",
        str(items),
        "--iterations",
        "1",
        "--device",
        "cpu",
        "--resolution",
        "model",
    ]
    assert main([*base, "--out", str(model)]) == 2
    assert "input model's folder" in capsys.readouterr().err
    assert main([*base, "--out", str(model / "sub")]) == 2  # inside it: refused as well
    assert _unet_bytes(model) == before and not (model / "sub").exists()
    other = _model_folder(tmp_path / "other", seed=1)  # a folder holding some other model
    assert main([*base, "--out", str(other)]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_item2_finetune_refuses_a_finished_run_of_other_settings(tmp_path, capsys):
    """Item 2: a second fine-tuning run into the same --out with other settings replaced the first."""
    from dori.cli import main

    model = _model_folder(tmp_path / "M")
    items = _prompts_file(tmp_path / "p.jsonl")
    out = tmp_path / "esd"
    base = [
        "finetune",
        "esd",
        "--model",
        str(model),
        "--set",
        str(items),
        "--device",
        "cpu",
        "--resolution",
        "model",
        "--out",
        str(out),
    ]
    assert main([*base, "--iterations", "1"]) == 0
    first = _unet_bytes(out)
    assert main([*base, "--iterations", "2"]) == 2
    assert "other settings or data (settings)" in capsys.readouterr().err
    assert main([*base, "--iterations", "1", "--negative-guidance", "3"]) == 2
    assert _unet_bytes(out) == first
    other = _model_folder(tmp_path / "M2", seed=1)  # same settings, other input weights
    assert main([*base[:2], "--model", str(other), *base[4:], "--iterations", "1"]) == 2
    assert "model" in capsys.readouterr().err
    assert main([*base, "--iterations", "1"]) == 0  # the same run again is allowed
    assert main(["finetune", "ca", "--model", str(model), "--set", str(items), "--out", str(out)]) == 2


def _toy_audit(model, tmp_path, name, dori_lr=0.1, guidance=7.0, norm_ball=None):
    from dori.attacks.dori import Dori
    from dori.audit import run_audit
    from dori.data.sets import user_set
    from dori.evaluation import EvalConfig
    from dori.models.pipeline import SamplingConfig
    from dori.runs import RunDir
    from test_audit import fake_backends, write_items

    items = user_set(write_items(tmp_path / "d", missing=False), image_size=16)
    config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2, guidance=guidance), seed=3)
    return run_audit(
        model, items, "toy", fake_backends(), RunDir(tmp_path / name, {"t": name}), config,
        attack=Dori(steps=2, lr=dori_lr, norm_ball=norm_ball), snapshots=(), progress=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, setting",
    [({"dori_lr": float("inf")}, "none+dori-2"), ({"guidance": float("nan")}, "none"),
     ({"norm_ball": float("nan")}, "none+dori-2")],
)  # fmt: skip
def test_item4_non_finite_is_refused_not_reported_clean(tiny, tmp_path, kwargs, setting):
    """Item 4: `--lr inf`, `--guidance nan`, `--norm-ball nan` turned into black images scored "not memorized":
    MR 0.00 with no warning. Now the audit refuses, naming the setting, and reports no row."""
    with pytest.raises(DoriError, match=rf"setting '{re.escape(setting)}'.*not finite"):
        _toy_audit(tiny, tmp_path, "run", **kwargs)


def test_item4_non_finite_stored_score_is_refused(tiny, tmp_path):
    """A result file holding a NaN score (older run, tampered folder) is never summarized into a clean MR."""
    import json

    _toy_audit(tiny, tmp_path, "run")
    path = tmp_path / "run" / "results" / "item.none.it0.json"
    record = json.loads(path.read_text())
    record["sscd_orig"]["max"] = float("nan")
    path.write_text(json.dumps(record))
    with pytest.raises(DoriError, match="setting 'none'.*non-finite"):
        _toy_audit(tiny, tmp_path, "run")


BAD_NUMBERS = [
    (["audit", "--set", "vm", "--limit", "-3"], "--limit must be at least 1"),
    (["audit", "--set", "vm", "--sample-steps", "-1"], "--sample-steps must be at least 1"),
    (["audit", "--set", "vm", "--sample-steps", "0"], "--sample-steps must be at least 1"),
    (["audit", "--set", "vm", "--sample-steps", "5000"], "--sample-steps must be at most 1000"),
    (["audit", "--set", "vm", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["audit", "--set", "vm", "--seed", str(2**64 + 1)], "--seed must be in"),
    (["audit", "--set", "vm", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["audit", "--set", "vm", "--attack", "dori", "--lr", "inf"], "--lr must be a finite number"),
    (["audit", "--set", "vm", "--attack", "dori", "--lr", "nan"], "--lr must be a finite number"),
    (["audit", "--set", "vm", "--guidance", "nan"], "--guidance must be a finite number"),
    (["audit", "--set", "vm", "--norm-ball", "nan"], "--norm-ball must be a finite number"),
    (["audit", "--set", "vm", "--mitigation", ""], "--mitigation is empty"),
    (["finetune", "esd", "--set", "vm", "--iterations", "0"], "--iterations must be at least 1"),
    (["finetune", "esd", "--set", "vm", "--iterations", "-1"], "--iterations must be at least 1"),
    (["finetune", "adversarial", "--set", "vm", "--lr", "0"], "--lr must be positive"),
    (["finetune", "siss", "--set", "vm", "--scaling-norm", "nan"], "--scaling-norm must be a positive"),
]


@pytest.mark.parametrize("argv, message", BAD_NUMBERS, ids=[" ".join(a[2:]) for a, _ in BAD_NUMBERS])
def test_item7_bad_numbers_are_refused_before_any_work(tmp_path, capsys, argv, message):
    """Item 7: `--limit -3` dropped the last 3 items, `--sample-steps -1` ran, `finetune --iterations 0` meant
    "default" and `-1` wrote an unchanged model as fine-tuned, `--mitigation ""` meant none; item 9: `--lr nan`,
    `--sample-steps 0`/5000, `--batch-size 0`, a seed over 64 bits, `--device tpu` ended in tracebacks."""
    from dori.cli import main

    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_item7_every_default_passes_validation():
    import argparse

    from dori.cli import build_parser
    from dori.commands.validate import validate_args

    def walk(parser, command):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, command or name)
        defaults = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "command")}
        yield argparse.Namespace(command=command, **defaults)

    namespaces = list(walk(build_parser(), None))
    assert len(namespaces) > 10
    for ns in namespaces:
        validate_args(ns)


def test_item3_ids_differing_in_unsafe_characters_keep_their_own_results(tiny, tmp_path):
    """Item 3: ids `a/b` and `a b` shared one result file: one item's result lost, the other counted twice."""
    import json

    from dori.audit import run_audit
    from dori.data.sets import user_set
    from dori.evaluation import EvalConfig
    from dori.models.pipeline import SamplingConfig
    from dori.runs import RunDir, safe_key
    from test_audit import fake_backends, write_items

    path = write_items(tmp_path / "d", missing=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["id"], rows[1]["id"] = "a/b", "a b"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = user_set(path, image_size=16)
    config = EvalConfig(n_gens=2, sampling=SamplingConfig(steps=2), seed=3)
    run = RunDir(tmp_path / "run", {"t": 1})
    result = run_audit(tiny, items, "toy", fake_backends(), run, config, progress=False)
    assert result["rows"][0]["n_items"] == 2
    assert [run.get(f"item.none.{i}")["item"] for i in ("a/b", "a b")] == ["a/b", "a b"]
    assert len(list((run.path / "results").glob("item.none.*.json"))) == 2
    keys = ["a/b", "a b", "a_b", "a%2Fb", "é", "e", "x" * 400, "x" * 399 + "y"]
    names = [safe_key(k) for k in keys]
    assert len(set(names)) == len(keys) and all(len(n) <= 180 and "/" not in n for n in names)
    assert safe_key("laion-123") == "laion-123" and safe_key("nemo+dori-10") == "nemo+dori-10"


def _hold_in_subprocess(folder, env=None, code=None):
    import os
    import subprocess
    import sys

    code = code or (  # the lock module alone: no torch import, a fast subprocess
        "import sys, time; from dori.runlock import RunLock; r = RunLock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_lock_two_processes_never_write_one_run_folder(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m dori audit` (before sharding) and two shells started two complete audits
    writing into one run folder. A second process is now refused, naming the holder; a killed holder frees
    the folder; objects of one process share the lock."""
    from dori.runs import RunDir

    folder = tmp_path / "run"
    folder.mkdir()
    proc = _hold_in_subprocess(folder)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DoriError, match=rf"in use by pid {proc.pid} "):
            RunDir(folder, {"a": 1})
    finally:
        proc.kill()
        proc.wait()
    first = RunDir(folder, {"a": 1})  # the killed holder released it
    second = RunDir(folder, {"a": 1})  # this same process: shared
    code = "import sys; from dori.runlock import RunLock; RunLock(sys.argv[1])"
    other = _hold_in_subprocess(folder, code=code)
    assert other.wait(120) != 0 and "in use by pid" in other.stderr.read()
    first.lock.close()
    second.lock.close()
    assert _hold_in_subprocess(folder, code=code).wait(120) == 0  # released when this process let go


def test_lock_lets_the_ranks_of_one_torchrun_job_share_the_folder(tmp_path, monkeypatch):
    """Ranks > 0 of the holder's own torchrun job are let in; a rank of another job is refused."""
    from dori.runs import RunDir

    folder = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    holder = RunDir(folder, {"a": 1})  # rank 0 (no RANK set)
    code = "import sys; from dori.runlock import RunLock; RunLock(sys.argv[1], wait_s=2)"
    same = _hold_in_subprocess(folder, {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job-1"}, code)
    other = _hold_in_subprocess(
        folder, {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job-2"}, code
    )
    assert same.wait(120) == 0, same.stderr.read()
    assert other.wait(120) != 0 and "not held by rank 0 of this torchrun job" in other.stderr.read()
    holder.lock.close()


def test_item5_resume_is_keyed_on_content_not_argument_strings(tmp_path, monkeypatch, capsys):
    """Item 5: after editing a user set's prompts or images, re-fitting the mitigation in the same nemo:DIR or
    replacing the weights under the same --model path, a rerun silently reused the old results."""
    import json

    import numpy as np
    from PIL import Image

    from dori.cli import main
    from dori.fingerprint import mitigation_fingerprint
    from test_audit import fake_backends, write_items

    monkeypatch.setattr("dori.metrics.backends.load_backends", fake_backends)
    model = _model_folder(tmp_path / "M")
    items = write_items(tmp_path / "d", missing=False)
    run = tmp_path / "run"
    argv = ["audit", "--model", str(model), "--device", "cpu", "--set", str(items), "--n-gens", "1",
            "--sample-steps", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged content: resumes
    original = items.read_text()
    items.write_text(original.replace("thing 0", "thing zero"))  # an edited prompt
    assert main(argv) == 2
    assert "the items' prompts or images changed" in capsys.readouterr().err
    items.write_text(original)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "d" / "img1.png")  # a replaced image
    assert main(argv) == 2
    write_items(tmp_path / "d", missing=False)  # the original images again
    assert main(argv) == 0
    _model_folder(model, seed=5)  # other weights under the same path
    assert main(argv) == 2
    assert "the model's weights changed" in capsys.readouterr().err
    fitted = tmp_path / "nemo"  # a re-fitted mitigation in the same folder changes its fingerprint
    fitted.mkdir()
    (fitted / "neurons.json").write_text(json.dumps({"it0": [[0, 1]]}))
    before = mitigation_fingerprint(f"nemo:{fitted}")
    (fitted / "neurons.json").write_text(json.dumps({"it0": [[0, 2]]}))
    assert mitigation_fingerprint(f"nemo:{fitted}") != before


def test_corrupt_run_files_are_named_and_results_recomputed(tiny, tmp_path, capsys):
    """Item 9 (run folder): a corrupt result is named and recomputed; a corrupt artifact or config is named."""
    first = _toy_audit(tiny, tmp_path, "run")
    result = tmp_path / "run" / "results" / "item.none.it0.json"
    result.write_text('{"truncated": ')
    again = _toy_audit(tiny, tmp_path, "run")
    assert "item.none.it0.json is corrupt" in capsys.readouterr().err
    assert again["rows"] == first["rows"] and (result.parent / "item.none.it0.json.corrupt").exists()
    (tmp_path / "run" / "artifacts" / "dori.none.it1.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(DoriError, match="dori.none.it1.safetensors is corrupt"):
        _toy_audit(tiny, tmp_path, "run")
    (tmp_path / "run" / "config.json").write_text("{")
    with pytest.raises(DoriError, match="config.json is corrupt"):
        _toy_audit(tiny, tmp_path, "run")


class _Server:
    """A loopback TCP server whose handler misbehaves: it never answers, or trickles bytes."""

    def __init__(self, handler):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stop = threading.Event()

        def serve():
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.conns.append(conn)
                threading.Thread(target=handler, args=(conn, self.stop), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.stop.set()
        for c in [*self.conns, self.sock]:
            c.close()


def _never_answers(conn, stop):
    stop.wait(60)


def _trickles(conn, stop):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: image/png\r\n\r\n")
    while not stop.wait(0.3):
        try:
            conn.sendall(b"x")
        except OSError:
            return


def test_item8_fetch_has_an_overall_deadline(tmp_path):
    """Item 8: `--fetch` from a server trickling a byte every few seconds ran far past its 10 s timeout (the
    timeout was per read). Now the whole download has the deadline, the item is skipped, no .part is left."""
    import time

    from dori.data.images import ImageStore
    from dori.data.sets import Item

    server = _Server(_trickles)
    try:
        store = ImageStore(fetch=True, cache_dir=tmp_path / "cache", timeout_s=1.5)
        item = Item("x", "p", image_ref=f"http://127.0.0.1:{server.port}/a.png")
        item._loader = store.load
        t0 = time.monotonic()
        assert item.image is None
        assert time.monotonic() - t0 < 10
        assert "deadline" in item.skip_reason
        assert not list((tmp_path / "cache").glob("*.part"))
    finally:
        server.close()


def test_item8_download_has_an_overall_deadline(monkeypatch):
    """Item 8: `--download` against an endpoint that accepts and never answers blocked indefinitely."""
    import socket
    import time

    import huggingface_hub

    from dori.models.loading import _hub_snapshot

    server = _Server(_never_answers)

    def stalled_download(*args, **kwargs):  # what the hub client does against that endpoint: wait for bytes
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            return s.recv(1)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stalled_download)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            DoriError, match=r"downloading org/model \(--download\) did not finish within its 1.5 s"
        ):
            _hub_snapshot("org/model", allow_download=True, deadline_s=1.5)
        assert time.monotonic() - t0 < 10
    finally:
        server.close()


def test_item9_bad_inputs_are_clear_errors_or_skips(tiny, tmp_path, monkeypatch):
    """Item 9: tracebacks for a truncated text-encoder safetensors, a Latin-1 JSONL, a decompression-bomb PNG
    (the run died instead of skipping the item), a malformed dori_world.json, unusable --out / --json, a
    --clip folder with a pickle, a Wanda mask path with ../ (item 6)."""
    import json

    import numpy as np
    import PIL.Image
    from PIL import Image

    from dori.commands.validate import check_writable_file
    from dori.data.sets import user_set
    from dori.models.loading import load_model, save_model
    from dori.runs import RunDir

    folder = save_model(tiny, tmp_path / "m")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DoriError, match="could not load the model"):
        load_model(str(folder))
    folder = save_model(tiny, tmp_path / "m2")
    (folder / "dori_world.json").write_text("{not json")
    with pytest.raises(DoriError, match="dori_world.json is malformed"):
        load_model(str(folder))

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "café"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DoriError, match="not UTF-8"):
        user_set(latin)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffprompt,image\na thing,x.png\n".encode())
    assert user_set(bom)[0].prompt == "a thing"  # item 10: a BOM is not "row 1 has no 'prompt'"

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "bomb.png")
    (tmp_path / "bomb.jsonl").write_text(json.dumps({"id": "b", "prompt": "p", "image": "bomb.png"}))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50)  # 256 pixels: over twice the limit, a "bomb"
    item = user_set(tmp_path / "bomb.jsonl")[0]
    assert item.image is None and "decompression bomb" in item.skip_reason.lower()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (a_file, a_file / "sub", "/proc/dori-reliab-test"):
        with pytest.raises(DoriError, match="run folder|cannot"):
            RunDir(bad, {"a": 1})
    for bad in (tmp_path, a_file / "out.json", "/proc/dori-reliab-test/out.json"):
        with pytest.raises(DoriError, match="--json"):
            check_writable_file(str(bad), "--json")

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    torch.save({"w": torch.ones(1)}, clip / "pytorch_model.bin")
    from dori.metrics.backends import CLIPAligner

    with pytest.raises(DoriError, match="only pickle files: pytorch_model.bin"):
        CLIPAligner(clip)


def test_item10_messages_say_what_happened(tmp_path, monkeypatch):
    """Item 10: a relative model path that does not exist was reported as a missing hub id; a failed --download
    said "add --download"."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dori.models.loading import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DoriError, match=r"'runs/model' is not a folder \(.*runs/model does not exist\)"):
        load_model("runs/model")

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DoriError, match=r"could not download org/model \(--download was given\)") as err:
        load_model("org/model", allow_download=True)
    assert "add --download" not in str(err.value)


def _nemo_folder(folder, layer, refined, model_sha=None):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    item = {"id": "it0", "memorized": True, "kept_seeds": [0], "initial": {layer: refined}, "initial_score": 0.5,
            "refined": {layer: refined}, "refined_score": 0.4}  # fmt: skip
    data = {"method": "nemo", "layers": [layer], "config": {"scale": 0.0}, "items": {"it0": item}}
    (folder / "nemo.json").write_text(json.dumps(data))
    if model_sha is not None:
        (folder / "config.json").write_text(json.dumps({"model_sha": model_sha}))
    return folder


def test_item6_mitigations_are_tied_to_their_model(tiny, tmp_path):
    """Item 6: NeMo neurons fitted on one model were applied to another without a check (or crashed with
    IndexError); negative or fractional neuron indices were accepted; a Wanda mask path with ../ was
    followed outside its folder."""
    import json

    from dori.mitigations import load_mitigation
    from dori.models.builders import build_tiny_random
    from dori.models.identity import weights_fingerprint

    layer = next(n for n, _ in tiny.unet.named_modules() if n.endswith("attn2.to_v"))
    width = dict(tiny.unet.named_modules())[layer].out_features
    fitted = load_mitigation(f"nemo:{_nemo_folder(tmp_path / 'ok', layer, [0, 1])}")
    with fitted.applied(tiny, ["it0"]):
        pass  # fits: no record of the fitted model (an older fit), indices in range
    too_big = load_mitigation(f"nemo:{_nemo_folder(tmp_path / 'big', layer, [width + 3])}")
    with (
        pytest.raises(DoriError, match=f"has {width} channels, index {width + 3}"),
        too_big.applied(tiny, ["it0"]),
    ):
        pass
    for bad in ([-1], [1.5], ["2"]):
        with pytest.raises(DoriError, match="not non-negative integers"):
            load_mitigation(f"nemo:{_nemo_folder(tmp_path / 'bad', layer, bad)}")
    other = build_tiny_random(seed=7)  # same architecture, other weights
    tied = load_mitigation(
        f"nemo:{_nemo_folder(tmp_path / 'tied', layer, [0], weights_fingerprint(other, coarse=True))}"
    )
    with pytest.raises(DoriError, match="fitted on another model"), tied.applied(tiny, ["it0"]):
        pass
    with tied.applied(other.to(dtype=torch.bfloat16), ["it0"]):
        pass  # the same weights in another dtype are the same model
    (tmp_path / "ok" / "nemo.json").write_text('{"method": "nemo", "items": {"it0": {"id": ')
    with pytest.raises(DoriError, match="nemo.json is corrupt"):
        load_mitigation(f"nemo:{tmp_path / 'ok'}")

    wanda = tmp_path / "wanda"
    (wanda / "masks").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    entry = {"file": "../../outside.safetensors", "shapes": {}, "counts": {}}
    (wanda / "wanda.json").write_text(
        json.dumps({"method": "wanda", "groups": {"g": ["it0"]}, "masks": {"g": entry}})
    )
    with pytest.raises(DoriError, match="is not a file name in"):
        load_mitigation(f"wanda:{wanda}")
