"""The package's shape: every re-exported name resolves, no import cycle (function-level imports
included), metadata listing stays torch-free, and no module grows past ~400 lines unexplained."""

import ast
import importlib
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "lexlora"
SUBPACKAGES = ["data", "model", "adapters", "training", "evaluation", "serving", "export"]


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lexlora_imports(path, known):
    """The lexlora modules a file imports anywhere in it (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    found = set()
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known:
            found.add(name)
    return found


def test_every_reexported_name_resolves():
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"lexlora.{sub}")
        assert package.__all__, sub
        for name in package.__all__:
            assert getattr(package, name) is not None, f"lexlora.{sub}.{name}"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        importlib.import_module("lexlora.model").nope


def test_no_import_cycle():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: lexlora_imports(p, paths) - {m} for m, p in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "lexlora.model.generation" in graph["lexlora.serving.registry"]  # the graph is really read


def test_reading_adapter_metadata_does_not_import_torch():
    code = ("import sys, lexlora.adapters.catalog, lexlora.adapters.format; "
            "print('torch' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_no_module_is_over_400_lines_without_saying_why():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 420 and "lines" not in docstring:
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, long
