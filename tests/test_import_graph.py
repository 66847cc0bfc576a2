"""The project's modules import each other without cycles.

Every import statement counts, also those inside functions or under `if TYPE_CHECKING:`: a lazy
import that dodges a cycle at run time still ties two modules together, so each must be readable
(and importable) without the other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "datasets", "models", "ops", "tools", "ugs", "util")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "main.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {_module_name(p): p for p in files}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that `path` (module `name`) imports: `import a.b` and `from a.b import c`
    give a.b, or a.b.c where c is itself a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_sees_a_lazy_and_a_type_checking_cycle():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert import_cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    modules = project_modules()
    assert {"models.build", "models.dino", "ugs", "main"} <= set(modules)
    assert "models.dino" in imported_modules(modules["models.build"], "models.build", set(modules))


def test_project_modules_import_without_cycles():
    modules = project_modules()
    known = set(modules)
    graph = {name: imported_modules(path, name, known) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 50  # the parser sees the project's imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles among project modules: " + "; ".join(" <-> ".join(c) for c in cycles)
