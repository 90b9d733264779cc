"""The package's shape: the import layers declared in ``pyproject.toml`` hold, no import cycle is
longer than two files, and ``optim/adam_mini.py`` stays small (``docs/architecture.md``)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
ADAM_MINI = ROOT / "src" / "blockopt" / "optim" / "adam_mini.py"


def test_adam_mini_module_is_at_most_450_lines_and_no_function_longer_than_60():
    source = ADAM_MINI.read_text()
    assert len(source.splitlines()) <= 450
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            if node.end_lineno - first + 1 > 60:
                long.append((node.name, node.end_lineno - first + 1))
    assert not long, long


def test_the_import_layers_of_pyproject_hold(capsys):
    """``lint-imports``: cli > bench > integrations > optim > distributed | hessian > partition >
    kernels | models | utils; no import runs up a layer or across siblings."""
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 broken" in out and "KEPT" in out, out


def _cycles_longer_than_two(graph: grimp.ImportGraph) -> list[list[str]]:
    """One simple import cycle of three modules or more per strongly connected component that has one."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for m in modules:
        if m not in index:
            connect(m)
    found = []
    for component in components:
        inside = set(component)

        def path_back(path: list[str], inside: set[str] = inside) -> list[str] | None:
            for w in edges[path[-1]]:
                if w == path[0] and len(path) >= 3:
                    return path
                if w in inside and w not in path and w > path[0]:
                    longer = path_back([*path, w])
                    if longer:
                        return longer
            return None

        for start in sorted(inside) if len(inside) >= 3 else ():
            cycle = path_back([start])
            if cycle:
                found.append(cycle)
                break
    return found


def test_no_import_cycle_is_longer_than_two_files():
    graph = grimp.build_graph("blockopt", include_external_packages=False, cache_dir=None)
    assert not _cycles_longer_than_two(graph)


def test_the_cycle_finder_finds_a_three_file_cycle_and_ignores_two_file_ones():
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.a"), ("p.c", "p.a"), ("p.a", "p.c"), ("p.x", "p.y"), ("p.y", "p.z"),
                 ("p.z", "p.x")]:
        graph.add_import(importer=a, imported=b)
    assert _cycles_longer_than_two(graph) == [["p.x", "p.y", "p.z"]]
