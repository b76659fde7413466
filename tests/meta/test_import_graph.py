"""The layering of src/tether, read from the source with `ast` (nothing is imported):

- no import cycle between modules, counting the imports at module level (those that run when the
  module is loaded, and those under `if TYPE_CHECKING:`, which tie the modules as much for a reader);
  an import inside a function is how a lower layer starts an optional upper one, and is not counted;
- `calc/` (pure: replica -> plan) uses no I/O layer: nothing from agent/, dataplane/, server/, cli/, lab/;
- the CLI (a client of the API) uses no agent code.
The two layer rules count every import, wherever it is written (a function, a TYPE_CHECKING block).
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    module_level: bool  # not inside a function (possibly under TYPE_CHECKING)


def module_name(path: pathlib.Path, src: pathlib.Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name: str, tree: ast.Module, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in a module's tree, resolved to the project's modules (`from a import b` is
    module a.b when that exists, else a)."""
    out: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend(Import(name, a.name, node.lineno, module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append(Import(name, sub if sub in known else target, node.lineno, module_level))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return [i for i in out if i.imported == "tether" or i.imported.startswith("tether.")]


def project_imports(src: pathlib.Path = SRC) -> list[Import]:
    files = sorted((src / "tether").rglob("*.py"))
    known = {module_name(p, src) for p in files}
    out: list[Import] = []
    for p in files:
        out += imports_of(module_name(p, src), ast.parse(p.read_text(), str(p)), p.name == "__init__.py", known)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


IMPORTS = project_imports()


def test_the_reader_finds_the_imports_it_must_judge() -> None:
    """Guards the rules below against passing because nothing was read."""
    pairs = {(i.importer, i.imported, i.module_level) for i in IMPORTS}
    assert ("tether.agent.main", "tether.calc.replica", True) in pairs
    assert ("tether.agent.cni.server", "tether.agent.local_endpoints", True) in pairs  # under TYPE_CHECKING
    assert ("tether.agent.extras", "tether.agent.dns", False) in pairs  # in a function


def test_the_cycle_finder_finds_a_cycle_and_no_false_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    assert cycles({"a": {"a"}}) == [["a"]]


def test_relative_imports_are_resolved_against_the_importing_module() -> None:
    tree = ast.parse("from . import b\nfrom ..c import d\n")
    found = imports_of("tether.x.a", tree, False, {"tether.x.b"})
    assert [i.imported for i in found] == ["tether.x.b", "tether.c"]


def test_no_import_cycle_between_modules_of_src_tether() -> None:
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.module_level:
            edges.setdefault(i.importer, set()).add(i.imported)
    found = cycles(edges)
    assert not found, "import cycles (module-level imports, TYPE_CHECKING included): " + "; ".join(
        " <-> ".join(c) for c in found)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("tether.calc", ("tether.agent", "tether.dataplane", "tether.server", "tether.cli", "tether.lab")),
    ("tether.cli", ("tether.agent",)),
])
def test_a_layer_imports_nothing_from_the_layers_it_must_not_use(package: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted({f"{i.importer} imports {i.imported}" for i in IMPORTS
                  if in_package(i.importer, package) and any(in_package(i.imported, f) for f in forbidden)})
    assert not bad, f"{package} must not use {', '.join(forbidden)}:\n" + "\n".join(bad)
