"""The import graph of tinygpt/, weights/ and probes/: one way, no circles (../shared/ARCHITECTURE.md).

Every import statement counts, at module level or inside a function (an import at call time is still a
dependency). `from package import name` is an edge to the submodule `package.name` when there is one, and
`from tinygpt import name` to the module `tinygpt/__init__.py` fetches `name` from (its `_EXPORTS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tinygpt", "weights", "probes")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """module name -> file, for every .py file of the three packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def lazy_exports(modules: dict[str, Path]) -> dict[str, str]:
    """tinygpt's PEP 562 table: public name -> the module defining it (`tinygpt._EXPORTS`, read from the
    source so this test imports nothing)."""
    tree = ast.parse(modules["tinygpt"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: f"tinygpt.{module}" for name, module in table.items()}
    return {}


def imports_of(module: str, path: Path, modules: dict[str, Path], exports: dict[str, str]) -> set[str]:
    """The modules of the three packages that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    targets.append(submodule)
                elif source == "tinygpt" and alias.name in exports:
                    targets.append(exports[alias.name])
                else:
                    targets.append(source)
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module name: its module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = module_files(root)
    exports = lazy_exports(modules)
    return {name: imports_of(name, path, modules, exports) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def is_engine(module: str) -> bool:
    """tinygpt's engine: everything in tinygpt/ below the command line (tinygpt.cli, tinygpt.__main__)."""
    return module.split(".")[0] == "tinygpt" and not module.startswith(("tinygpt.cli", "tinygpt.__main__"))


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_engine_imports_neither_probes_nor_the_command_line():
    graph = import_graph()
    bad = sorted((m, t) for m, targets in graph.items() if is_engine(m) for t in targets
                 if t.split(".")[0] == "probes" or not is_engine(t) and t.startswith("tinygpt"))
    assert not bad, "the engine reaches up: " + ", ".join(f"{m} imports {t}" for m, t in bad)


def test_weights_hand_back_data_and_import_neither_the_model_object_nor_probes():
    graph = import_graph()
    bad = sorted((m, t) for m, targets in graph.items() if m.split(".")[0] == "weights" for t in targets
                 if t.split(".")[0] == "probes" or t in ("tinygpt.api", "tinygpt") or t.startswith("tinygpt.cli"))
    assert not bad, "weights/ reaches up: " + ", ".join(f"{m} imports {t}" for m, t in bad)


def test_the_reference_model_imports_only_what_the_math_needs():
    """model.py is the reference: config, the site recorder and the fast paths, nothing of traces, inputs,
    caches or files."""
    assert import_graph()["tinygpt.model"] <= {"tinygpt.config", "tinygpt.params", "tinygpt.recorder",
                                               "tinygpt.kernels"}


# ------------------------------------------------------------------------------ the checker, on made-up trees


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


@pytest.mark.parametrize("files, cycle", [
    ({"tinygpt/a.py": "from .b import f\n", "tinygpt/b.py": "def g():\n    from .a import h\n"},
     ["tinygpt.a", "tinygpt.b"]),
    ({"tinygpt/api.py": "import weights\n", "weights/__init__.py": "from tinygpt.api import Model\n"},
     ["tinygpt.api", "weights"]),
    ({"tinygpt/__init__.py": "_EXPORTS = {'forward': 'compiled'}\n", "tinygpt/compiled.py": "from . import trace\n",
      "tinygpt/trace.py": "from tinygpt import forward\n"}, ["tinygpt.compiled", "tinygpt.trace"]),
    ({"probes/x.py": "import probes.y.z as q\n", "probes/y/z.py": "from ..x import thing\n",
      "probes/y/__init__.py": ""}, ["probes.x", "probes.y.z"]),
])
def test_the_checker_finds_a_cycle_of_each_kind(tmp_path, files, cycle):
    assert cycles(import_graph(write_tree(tmp_path, files))) == [cycle]


def test_the_checker_sees_no_cycle_in_a_one_way_tree(tmp_path):
    root = write_tree(tmp_path, {"tinygpt/a.py": "import numpy\nfrom . import b\n", "tinygpt/b.py": "import os\n",
                                 "probes/p.py": "from tinygpt.a import f\nfrom tinygpt import b\n"})
    graph = import_graph(root)
    assert graph["probes.p"] == {"tinygpt.a", "tinygpt.b"} and graph["tinygpt.a"] == {"tinygpt.b"}
    assert cycles(graph) == []
