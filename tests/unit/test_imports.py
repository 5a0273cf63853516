"""The package's layers: no import circles among pipeline modules, and nothing under the CLI
imports it. Read statically from the source (every import statement, at module level and
inside functions), so an import that only runs on some code path counts too."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"

# Imports allowed to close a circle (none today): any circle fails the test.
KNOWN_IMPORTS: set[tuple[str, str]] = set()


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pipeline.x import y` imports pipeline.x.y when that is a module, else pipeline.x
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                               for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def one_package(component: set[str]) -> bool:
    """A package and its own modules (a base class in __init__.py, a registry of the parts that
    import it, as codecs/ has) are one layer; a circle through anything else is not."""
    return any(all(m == p or m.startswith(p + ".") for m in component) for p in component)


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_circles(tmp_path):
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "cli.py": "def run():\n    from pipeline.demo import demo\n",
                       "demo.py": "from pipeline import cli\n",
                       "sub/__init__.py": "Base = object\ndef parts():\n    from pipeline.sub.a import A\n",
                       "sub/a.py": "from pipeline.sub import Base\n"}.items():
        (tmp_path / "pipeline" / name).write_text(text)
    modules = module_files(tmp_path / "pipeline")
    found = circles(import_graph(modules))
    assert sorted(map(sorted, found)) == [["pipeline.cli", "pipeline.demo"], ["pipeline.sub", "pipeline.sub.a"]]
    assert [one_package(c) for c in found if "pipeline.cli" not in c] == [True]
    (tmp_path / "pipeline" / "sub" / "a.py").write_text("from pipeline.sub import Base\nfrom pipeline import demo\n")
    (tmp_path / "pipeline" / "demo.py").write_text("def f():\n    from pipeline.sub import parts\n")
    assert [one_package(c) for c in circles(import_graph(modules))] == [False]  # sub.a -> demo -> sub -> sub.a


def test_no_import_circles():
    graph = import_graph(module_files())
    for module, target in KNOWN_IMPORTS:
        graph[module].discard(target)
    assert [c for c in circles(graph) if not one_package(c)] == []


def test_nothing_imports_the_cli():
    """cli.py is the top layer: the demo, recipes and the rest are called by it, never call it."""
    importers = {m for m, targets in import_graph(module_files()).items() if "pipeline.cli" in targets}
    assert importers <= {"pipeline.__main__", "pipeline.train.__main__"}
