"""The Table 1 recipe's command lines (no model runs: the dori CLI is replaced by a recorder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dori.recipes.table1 as table1


class _Stop(Exception):
    pass


def _record(monkeypatch, calls: list[list[str]]):
    def fake_cli(args):
        calls.append(args)
        if args[0] == "audit":
            if "unique" in args:
                raise _Stop
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "audit.json").write_text(json.dumps({"rows": []}))
        return 0

    monkeypatch.setattr(table1, "dori_cli", fake_cli)


@pytest.mark.parametrize("limit, expected", [(None, "40"), (12, "12")])
def test_nonmem_audit_is_bounded_without_a_limit(tmp_path, monkeypatch, limit, expected):
    # the world's non-memorized set has 40,000 items: "all items" must not mean all of them
    calls: list[list[str]] = []
    _record(monkeypatch, calls)
    with pytest.raises(_Stop):
        table1.run_table1(tmp_path, table1.Table1Config(limit=limit, progress=False))
    nonmem = calls[-1]
    assert nonmem[nonmem.index("--set") + 1] == "unique"
    assert nonmem.count("--limit") == 1 and nonmem[nonmem.index("--limit") + 1] == expected
    mem = [c for c in calls if c[0] == "audit" and "--mitigation" in c]
    assert len(mem) == 2 and all(("--limit" in c) == (limit is not None) for c in mem)
