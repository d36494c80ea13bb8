"""Import hygiene: no import loops inside privaudit, and the Keras model zoo does not need torch."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import privaudit

ROOT = Path(privaudit.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, found on disk (nothing is imported)."""
    out = {"privaudit": ROOT / "__init__.py"}

    def walk(path: Path, prefix: str):
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                out[name] = path / info.name / "__init__.py"
                walk(path / info.name, name)
            else:
                out[name] = path / f"{info.name}.py"

    walk(ROOT, "privaudit")
    return out


def _imports(tree: ast.Module, module: str, is_pkg: bool, *, lazy: bool):
    """(module, imported names) for each import statement of a module. Without ``lazy``: what runs when the module
    is imported, i.e. module-level statements (also inside module-level if/try) but not the imports inside
    functions, nor ``if TYPE_CHECKING:`` blocks. With ``lazy``: every import statement, wherever it is."""
    package = module if is_pkg else module.rpartition(".")[0]

    def statements(body):
        for node in body:
            if isinstance(node, ast.If):
                test = node.test
                if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                    yield from statements(node.orelse)
                    continue
                yield from statements(node.body)
                yield from statements(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from statements(block)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node

    nodes = ([n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if lazy
             else statements(tree.body))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield base, [a.name for a in node.names]


def import_graph(*, lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the privaudit modules it imports (at import time, or anywhere with ``lazy``)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for base, names in _imports(tree, name, path.name == "__init__.py", lazy=lazy):
            if not base.startswith("privaudit"):
                continue
            # "from pkg import sub" imports the submodule pkg.sub; "from mod import f" imports mod
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods]
            edges.update(subs or ([base] if base in mods else []))
            if subs and len(subs) < len(names):  # some names come from the package itself
                edges.add(base)
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_walker_sees_imports_and_finds_a_planted_loop():
    graph = import_graph()
    assert "privaudit.backends.torch_models" in graph["privaudit.backends.opacus_backend"]
    assert "privaudit.backends.distributed" in graph["privaudit.backends.opacus_backend"]  # from pkg import sub
    assert "privaudit.reports.format" in graph["privaudit.reports"]  # a package's __init__ counts too
    # lazy imports inside functions count only when asked for
    assert "privaudit.audit.accounting" not in graph["privaudit.audit.engine"]
    assert "privaudit.audit.accounting" in import_graph(lazy=True)["privaudit.audit.engine"]
    planted = {**graph, "privaudit.backends.torch_models": graph["privaudit.backends.torch_models"]
               | {"privaudit.backends.opacus_backend"}}
    assert ["privaudit.backends.opacus_backend", "privaudit.backends.torch_models"] in _cycles(planted)


def test_privaudit_has_no_import_loops():
    assert _cycles(import_graph()) == []


# Loops through imports inside functions that issue 13 removes with the study package; delete the entry with them.
KNOWN_LAZY_LOOPS: list[list[str]] = []


def test_no_new_loops_through_lazy_imports_either():
    """A loop through a function-level import still ties two modules into one (distributed.py and
    opacus_backend.py did, through pick_device)."""
    assert [c for c in _cycles(import_graph(lazy=True)) if c not in KNOWN_LAZY_LOOPS] == []


def _imported_after(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             "print('loaded:' + ','.join(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=ROOT.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("loaded:")][-1]
    return set(filter(None, line.removeprefix("loaded:").split(",")))


def test_the_keras_model_zoo_does_not_import_torch():
    assert _imported_after("import privaudit.backends.tf_models") == set()
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed: building a Keras model is not tried")
    # building a network loads TensorFlow, and still not torch
    loaded = _imported_after("from privaudit.backends.tf_models import create_model\n"
                             "create_model('resnet9-gn', in_channels=1, num_classes=2, width=4, spatial_dims=2, "
                             "size=16)")
    assert loaded == {"tensorflow"}
