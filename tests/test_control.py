"""The control set's calibrated step budget (a pure function of audit rows) on synthetic curves."""

import pytest

from dori.control import calibrated_budget, control_report, format_control
from dori.errors import DoriError


def test_calibrated_budget_on_a_synthetic_curve():
    curve = {0: 0.0, 1: 0.0, 10: 0.025, 25: 0.05, 50: 0.45}
    assert calibrated_budget(curve) == 25  # 5% counts as "at or under"
    assert calibrated_budget(curve, level=0.02) == 1
    assert calibrated_budget(curve, level=0.5) == 50
    assert calibrated_budget({1: 0.1, 10: 0.2}) is None  # the smallest budget already exceeds
    # the control must STAY under the level: a dip after the first exceedance is not chosen
    assert calibrated_budget({0: 0.0, 5: 0.1, 10: 0.0, 20: 0.0}) == 0
    assert calibrated_budget({25: 0.0, 1: 0.0, 10: 0.07}) == 1  # order of the mapping does not matter
    with pytest.raises(DoriError):
        calibrated_budget({})
    with pytest.raises(DoriError):
        calibrated_budget({1: 0.0}, level=2.0)


def _row(set_name, mr, attack="none", steps=None, mitigation="none", norm=None):
    row = {"set": set_name, "mr": mr, "attack": attack, "dori_steps": steps, "mitigation": mitigation}
    if norm is not None:
        row["dori_norm_ratio"] = {"median": norm, "mad": 0.0}
    return row


def test_control_report_reads_mr_at_the_budget():
    memorized = [
        _row("vm", 0.9),
        _row("vm", 0.1, mitigation="nemo"),  # budget 0 = the mitigated model (Dori searched against it)
        _row("vm", 0.4, "dori", 1, "nemo", 1.01),
        _row("vm", 0.8, "dori", 10, "nemo", 1.1),
        _row("vm", 1.0, "dori", 50, "nemo", 1.3),
    ]
    control = [
        _row("heldout", 0.0),
        _row("heldout", 0.0, mitigation="nemo"),
        _row("heldout", 0.0, "dori", 1, "nemo", 1.02),
        _row("heldout", 0.04, "dori", 10, "nemo", 1.4),
        _row("heldout", 0.3, "dori", 50, "nemo", 2.0),
    ]
    rep = control_report(memorized, control)
    assert [c["steps"] for c in rep["curve"]] == [0, 1, 10, 50]
    assert rep["curve"][0]["mr"] == 0.1 and rep["curve"][2]["control_norm_ratio"] == 1.4
    assert rep["budget"] == 10 and rep["mr_at_budget"] == 0.8 and rep["control_rate_at_budget"] == 0.04
    assert "calibrated budget: 10" in format_control(rep)
    strict = control_report(memorized, control, level=0.0)
    assert strict["budget"] == 1 and strict["mr_at_budget"] == 0.4
    none = control_report(memorized, [_row("heldout", 0.5), *control[2:]])
    assert none["budget"] is None and none["mr_at_budget"] is None
    assert "no step budget" in format_control(none)
    with pytest.raises(DoriError):
        control_report(memorized, [_row("heldout", 0.0, "dori", 7)])


def test_audit_report_shows_the_control_section(tmp_path):
    import json

    from dori.report.html import build_report

    memorized = [
        _row("vm", 0.2),
        _row("vm", 0.6, "dori", 10, norm=1.1),
        _row("vm", 1.0, "dori", 50, norm=1.2),
    ]
    control = [
        _row("heldout", 0.0),
        _row("heldout", 0.0, "dori", 10, norm=1.3),
        _row("heldout", 0.4, "dori", 50),
    ]
    entry = {"set": "heldout", "n_items": 5, **control_report(memorized, control)}
    (tmp_path / "audit.json").write_text(json.dumps({"model": "m", "rows": [], "control": entry}))
    page = build_report(tmp_path).read_text()
    assert "Control: Dori on heldout" in page and "Calibrated budget: <b>10</b>" in page and "0.600" in page


def test_audit_command_runs_the_control_set(tmp_path, monkeypatch, capsys):
    """`dori audit --attack dori --control SET`: the same search and snapshots on the control items (into
    OUT/control), their rate per budget beside the MR, and the budget computed from those rows."""
    import json

    from dori.cli import main
    from dori.control import control_report
    from test_audit import CLI_ARGS, fake_backends, write_items

    items = write_items(tmp_path / "mem", n=2, missing=False)
    control = write_items(tmp_path / "ctl", n=3, missing=False)
    monkeypatch.setattr("dori.metrics.backends.load_backends", fake_backends)
    out = tmp_path / "run"
    args = ["audit", *CLI_ARGS, "--set", str(items), "--control", str(control), "--control-limit", "2",
            "--control-level", "0.5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    audit = json.loads((out / "audit.json").read_text())
    ctl = audit["control"]
    assert ctl["set"] == str(control) and ctl["n_items"] == 2 and ctl["level"] == 0.5
    assert [c["steps"] for c in ctl["curve"]] == [0, 1, 3]  # the prompt, the snapshot, the last step
    assert all(r["n_items"] == 2 for r in ctl["rows"])
    assert (out / "control" / "results").is_dir() and not (out / "control" / "report.html").exists()
    expected = control_report(audit["rows"], ctl["rows"], 0.5)
    assert ctl["budget"] == expected["budget"] and ctl["curve"] == expected["curve"]
    assert ctl["curve"][1]["control_norm_ratio"] is not None  # Dori rows keep the embedding-norm ratio
    assert "Control: Dori on" in (out / "report.html").read_text()
    assert "control:" in capsys.readouterr().out
    # the control calibrates Dori's step budget: without Dori the command refuses (exit 2, nothing written)
    r2 = tmp_path / "r2"
    assert main(["audit", *CLI_ARGS, "--attack", "none", "--set", str(items), "--control", str(control),
                 "--out", str(r2)]) == 2  # fmt: skip
    assert not (r2 / "audit.json").exists()
