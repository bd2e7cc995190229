"""The Table 1 recipe's plan: which fits and audits it runs on which sets (no model runs: the library
functions it calls are replaced by recorders)."""

from __future__ import annotations

import pytest

import dori.recipes.table1 as table1


class _Stop(Exception):
    pass


def _record(monkeypatch, calls: list[dict]):
    def fake_set(name, model=None, limit=None, **kw):
        n = 40 if name in ("vm", "heldout") else 40_000
        return [f"{name}{i}" for i in range(n)][:limit] if limit else [f"{name}{i}" for i in range(n)]

    def fake_fit(name):
        return lambda model, items, out, method, *a, **kw: calls.append({"fit": name, "n": len(items)})

    def fake_audit(out, model, items, set_name, backends, config, mitigation=None, attack=None, **kw):
        calls.append(
            {"audit": set_name, "n": len(items), "mitigation": mitigation, "utility": kw.get("utility")}
        )
        if set_name == "unique":
            raise _Stop

    monkeypatch.setattr(table1, "_model", lambda cfg: object())
    monkeypatch.setattr(table1, "load_set", fake_set)
    monkeypatch.setattr(table1, "fit_nemo", fake_fit("nemo"))
    monkeypatch.setattr(table1, "fit_wanda", fake_fit("wanda"))
    monkeypatch.setattr(table1, "load_backends", lambda model: None)
    monkeypatch.setattr(table1, "load_mitigation", lambda spec: spec)
    monkeypatch.setattr(table1, "utility_set", lambda name, model, n: (name, n))
    monkeypatch.setattr(table1, "audit_to_folder", fake_audit)


@pytest.mark.parametrize("limit, expected", [(None, 40), (12, 12)])
def test_nonmem_audit_is_bounded_without_a_limit(tmp_path, monkeypatch, limit, expected):
    # the world's non-memorized set has 40,000 items: "all items" must not mean all of them
    calls: list[dict] = []
    _record(monkeypatch, calls)
    with pytest.raises(_Stop):
        table1.run_table1(tmp_path, table1.Table1Config(limit=limit, progress=False))
    assert [c.get("fit") for c in calls[:2]] == ["nemo", "wanda"]
    assert all(c["n"] == (limit or 40) for c in calls[:2])
    nonmem = calls[-1]
    assert nonmem["audit"] == "unique" and nonmem["n"] == expected and nonmem["mitigation"] is None
    assert nonmem["utility"] is None
    mem = [c for c in calls if c.get("audit") == "vm"]
    assert [m["mitigation"] for m in mem] == [f"nemo:{tmp_path / 'nemo'}", f"wanda:{tmp_path / 'wanda'}"]
    assert all(m["n"] == (limit or 40) and m["utility"] == ("heldout", 200) for m in mem)
