"""The mitigation registry, ``load_mitigation`` specs, and ``dori mitigate`` end to end on the tiny model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dori.cli import main
from dori.errors import DoriError
from dori.mitigations import (
    MITIGATIONS,
    NoMitigation,
    available_mitigations,
    load_mitigation,
    register_mitigation,
)
from dori.mitigations.nemo import NeMoResult
from dori.mitigations.wanda import Wanda, WandaResult

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_and_none():
    assert {"nemo", "wanda"} <= set(available_mitigations())
    assert MITIGATIONS["nemo"] is NeMoResult and MITIGATIONS["wanda"] is WandaResult
    with pytest.raises(DoriError, match="already registered"):
        register_mitigation("nemo")(type("Other", (), {}))
    none = load_mitigation("none")
    assert isinstance(none, NoMitigation) and none.name == "none"
    with none.applied(object(), ["x"]):
        pass


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("nemo", "needs a folder"),
        ("nemo:", "needs a folder"),
        ("bogus", "bad mitigation spec"),
        ("bogus:/tmp", "unknown mitigation 'bogus'"),
        ("wanda:/no/such/dir", "does not exist"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DoriError, match=message):
        load_mitigation(spec)


def test_folder_of_the_wrong_kind(tmp_path):
    with pytest.raises(DoriError, match="no NeMo result"):
        load_mitigation(f"nemo:{tmp_path}")
    (tmp_path / "wanda.json").write_text(json.dumps({"method": "nemo"}))
    with pytest.raises(DoriError, match="not a Wanda result"):
        load_mitigation(f"wanda:{tmp_path}")


def _items_file(tmp_path, images: bool = False):
    path = tmp_path / "items.jsonl"
    rows = [{"id": "a", "prompt": "a red circle on blue"}, {"id": "b", "prompt": "two yellow stars"}]
    if images:
        rng = np.random.default_rng(0)
        for row in rows:
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(
                tmp_path / f"{row['id']}.png"
            )
            row["image"] = f"{row['id']}.png"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_mitigate_wanda_cli_writes_loadable_masks_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "wanda"
    argv = ["mitigate", "wanda", "--model", "tiny-random", "--set", _items_file(tmp_path), "--out", str(out),
            "--sparsity", "0.1", "--timesteps", "2", "--group", "prompt", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    fitted = load_mitigation(f"wanda:{out}")
    assert isinstance(fitted, WandaResult) and set(fitted.groups) == {"a", "b"} and fitted.per_item
    assert fitted.config["sparsity"] == 0.1 and "git" in fitted.provenance
    expected = Wanda(sparsity=0.1, timesteps=2).masks_each(
        tiny, tiny.encode_text(["a red circle on blue", "two yellow stars"])
    )
    for i, item in enumerate("ab"):
        got = fitted.masks_for([item]).masks
        assert all(torch.equal(got[k], expected[i].masks[k]) for k in got)
    first = (out / "masks" / "00000.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # resumed: nothing recomputed
    assert (out / "masks" / "00000.safetensors").stat().st_mtime_ns == first
    assert main([*argv[:-4], "0.2", *argv[-3:]]) == 2  # other settings in the same folder are refused
    assert "other settings" in capsys.readouterr().err


def test_mitigate_nemo_cli(tmp_path):
    out = tmp_path / "nemo"
    argv = ["mitigate", "nemo", "--model", "tiny-random", "--set", _items_file(tmp_path), "--out", str(out),
            "--n-seeds", "3", "--theta-start", "1.5", "--tau", "0.05", "--no-progress", "--device", "cpu",
            "--calibration-set", _items_file(tmp_path), "--json", str(tmp_path / "s.json")]  # fmt: skip
    assert main(argv) == 0
    fitted = load_mitigation(f"nemo:{out}")
    assert isinstance(fitted, NeMoResult) and set(fitted.items) == {"a", "b"}
    assert fitted.calibration["tau"] == 0.05 and (out / "calibration.safetensors").exists()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["items"]["a"]["neurons"] == sum(map(len, fitted.items["a"].refined.values()))
    result_file = next((out / "results").glob("item.a*.json"))
    stamp = result_file.stat().st_mtime_ns
    assert main(argv) == 0  # resumed: the items are not searched again
    assert result_file.stat().st_mtime_ns == stamp and load_mitigation(f"nemo:{out}").items == fitted.items


def test_mitigate_nemo_iterative_cli_writes_rounds_and_resumes(tmp_path, capsys):
    out = tmp_path / "nemo-it"
    assert main(["mitigate", "nemo", "--model", "tiny-random", "--set", _items_file(tmp_path), "--out",
                 str(tmp_path / "no-images"), "--iterative", "2", "--tau", "0.05", "--no-progress",
                 "--calibration-set", _items_file(tmp_path)]) == 2  # fmt: skip
    assert "have none (a, b)" in capsys.readouterr().err
    items = _items_file(tmp_path, images=True)
    argv = ["mitigate", "nemo", "--model", "tiny-random", "--set", items, "--out", str(out),
            "--n-seeds", "3", "--theta-start", "1.5", "--tau", "0.05", "--no-progress", "--device", "cpu",
            "--calibration-set", items, "--dori-steps", "2", "--json", str(tmp_path / "s.json"),
            "--iterative", "2"]  # fmt: skip
    assert main(argv) == 0
    rounds = [load_mitigation(f"nemo:{out}/round-{r}") for r in (1, 2)]
    assert [r.config["round"] for r in rounds] == [1, 2]
    for i in ("a", "b"):  # neuron sets only grow from round to round
        assert all(
            set(v) <= set(rounds[1].items[i].refined.get(k, []))
            for k, v in rounds[0].items[i].refined.items()
        )
    assert load_mitigation(f"nemo:{out}").items == rounds[1].items  # DIR itself is the last round
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [r["round"] for r in summary["iterative"]] == [1, 2]
    stamp = (out / "round-1" / "nemo.json").stat().st_mtime_ns
    assert main([*argv[:-1], "3"]) == 0  # one more round: rounds 1-2 are reused
    assert "resuming after round 2" in capsys.readouterr().err
    assert (out / "round-1" / "nemo.json").stat().st_mtime_ns == stamp and (out / "round-3").is_dir()
    assert main([*argv[:-5], "3", *argv[-4:]]) == 2  # other Dori steps in the same folder are refused
