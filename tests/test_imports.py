"""The top-level modules import each other without a circle (run as a script it prints the graph):

    python tests/test_imports.py
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the top-level modules of root it imports anywhere in its source (also inside functions)}."""
    mods = {p.stem for p in root.glob("*.py")}
    graph = {}
    for m in sorted(mods):
        names = set()
        for node in ast.walk(ast.parse((root / f"{m}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        graph[m] = (names & mods) - {m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        path.pop()
        return []
    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return []


def test_no_import_cycle():
    graph = import_graph()
    assert {"train", "test", "runner", "predict", "bench"} <= set(graph)
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
    assert "train" not in graph["test"] and "test" not in graph["train"]  # the two share runner.py instead


def test_every_name_a_script_imports_from_the_project_exists():
    """`from module import name` in script/*.py and the top-level files names something that module defines (a
    moved function breaks a hand-run benchmark script long before anyone runs it)."""
    import importlib
    import sys
    sys.path.insert(0, str(ROOT))
    missing = []
    mods = {p.stem for p in ROOT.glob("*.py")}
    for f in sorted(ROOT.glob("script/*.py")) + sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                m = importlib.import_module(node.module)
                missing += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(m, a.name)]
    assert not missing, missing


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    g = import_graph()
    for m, deps in g.items():
        print(f"{m:11s} -> {', '.join(sorted(deps)) or '-'}")
    c = find_cycle(g)
    print("import cycle: " + " -> ".join(c) if c else "no import cycle")
    raise SystemExit(1 if c else 0)
