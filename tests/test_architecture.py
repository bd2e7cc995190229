"""The layering rules of docs/architecture.md, checked on the source (no imports are executed).

* library code never imports the CLI: ``dori.cli`` / ``dori.commands`` appear only in ``dori/cli.py``,
  ``dori/__main__.py`` and ``dori/commands/`` (nor in ``experiments/`` or ``benchmarks/``);
* no import circle between dori's modules: the graph of every import statement (module level, inside
  functions and under ``TYPE_CHECKING`` alike; ``from package import module`` is an edge to the module) has
  no cycle;
* a miniworld is ``model.world`` (:class:`dori.world.World`), never the key ``"world_dir"``;
* source files stay under 400 lines (the listed exceptions say why).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dori"
CLI_FILES = {"cli.py", "__main__.py"}
LONG_FILES = {
    # one algorithm each, read top to bottom (GUIDE.md: one method, one file); splitting would scatter it
    "mitigations/adversarial_ft.py": "Algorithm 2 with its resumable training loop",
    "miniworld/generator.py": "the world's scene grammar and renderer, one pure function of the seed",
    "miniworld/train.py": "the world's resumable training pipeline (stages share one state file)",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported(node: ast.AST, module: str, is_package: bool, modules: frozenset = frozenset()) -> list[str]:
    """Module names an import statement refers to: ``from a import b`` names ``a.b`` when that is a module
    (in ``modules``), else ``a``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        subs = [f"{prefix}.{a.name}" for a in node.names]
        return [m if m in modules else prefix for m in subs] if modules else [prefix, *subs]
    return []


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text())) for p in sorted(SRC.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    mods = sources()
    names = frozenset(mods)
    graph = {}
    for name, (path, tree) in mods.items():
        deps = set()
        for node in ast.walk(tree):
            for target in imported(node, name, path.name == "__init__.py", names):
                if target in mods and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := dfs(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["dori.audit"]  # the graph was really built
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_library_never_imports_the_cli():
    offenders = []
    files = [
        p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] != "commands" and p.name not in CLI_FILES
    ]
    files += list((ROOT / "experiments").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported(node, "x.y", False):
                if target.startswith(("dori.cli", "dori.commands")):
                    offenders.append(f"{path.relative_to(ROOT)}: {target}")
    assert not offenders, offenders


def test_world_dir_key_only_in_the_world_module():
    offenders = [
        str(p.relative_to(ROOT))
        for p in SRC.rglob("*.py")
        if p.name != "world.py"
        and any(
            isinstance(n, ast.Constant) and n.value == "world_dir" for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert not offenders, offenders


def test_source_files_stay_short():
    long = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert set(long) <= set(LONG_FILES), {k: v for k, v in long.items() if k not in LONG_FILES}
    stale = set(LONG_FILES) - set(long)  # an exception whose file was split or shortened leaves the list
    assert not stale, f"no longer over 400 lines (or gone), remove from LONG_FILES: {sorted(stale)}"
