"""Every test that needs root says so (`pytest.mark.root`, or `lab`, or a fixture that makes
namespaces: tests/conftest.py), so `pytest -m "not root"` runs the rest as any user. A test needs
root when it, a helper or a fixture of its module (one level down) makes namespaces, links, nft
tables in a namespace, or mounts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT_FIXTURES

TESTS = Path(__file__).resolve().parents[1]
NEEDS_ROOT = re.compile(r'"netns", "add"|\bsmall_filesystem\(|\bmake_lab\(|\bLab\(|"mount"|\bunshare\b|'
                        r'\bplug_link\(|\battach_pod\(|\bapply_links\(|\bplug_veth\(|'
                        r'NftDataplane\((?!"nowhere")')
MARKED = {"root", "lab"}


def _marks(node: ast.AST) -> set[str]:
    """Marker names in a decorator list or a `pytestmark` value: pytest.mark.NAME anywhere in it."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}


def _unmarked_root_tests(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source)
    module_marks: set[str] = set()
    functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            module_marks |= _marks(node.value)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[node.name] = node
    if module_marks & MARKED:
        return []

    def needs_root(fn: ast.AST) -> bool:
        return bool(NEEDS_ROOT.search(ast.get_source_segment(source, fn) or ""))

    out = []
    for name, fn in functions.items():
        if not name.startswith("test_"):
            continue
        decorators = set().union(*(_marks(d) for d in fn.decorator_list)) if fn.decorator_list else set()
        args = {a.arg for a in fn.args.args}
        if decorators & MARKED or args & ROOT_FIXTURES:
            continue
        called = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        helpers = [functions[n] for n in (called | args) if n in functions and n != name]
        if needs_root(fn) or any(needs_root(h) for h in helpers):
            out.append(f"{path.relative_to(TESTS.parent)}::{name}")
    return out


def test_every_test_that_needs_root_is_marked() -> None:
    missing = [t for p in sorted(TESTS.rglob("test_*.py")) if p != Path(__file__).resolve()
               for t in _unmarked_root_tests(p)]
    assert not missing, "mark these @pytest.mark.root (they make namespaces, links or mounts):\n" + "\n".join(missing)


def test_the_check_sees_a_namespace_made_by_a_helper() -> None:
    sample = TESTS / "meta" / "_root_sample.txt"
    sample.write_text('import subprocess\n\ndef make():\n    subprocess.run(["ip", "netns", "add", "x"])\n\n\n'
                      'def test_x():\n    make()\n')
    try:
        assert _unmarked_root_tests(sample) == ["tests/meta/_root_sample.txt::test_x"]
    finally:
        sample.unlink()
