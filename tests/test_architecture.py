"""The package's shape, read from the source: layered folders, one-way dependencies, no cycles.

Each folder of cxr_tfdata may import only the folders listed for it below (the rule each folder's
`__init__.py` states); tfrecords_builder may import only cxr_tfdata's bottom two folders, and
cxr_tfdata never imports tfrecords_builder. Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.helpers import REPO_ROOT

PACKAGES = ("cxr_tfdata", "tfrecords_builder")
# What each part of the house may import besides itself (and the standard library and third parties).
MAY_IMPORT = {
    "cxr_tfdata.files": set(),
    "cxr_tfdata.core": {"cxr_tfdata.files"},
    "cxr_tfdata.metrics": {"cxr_tfdata.core"},
    "cxr_tfdata.data": {"cxr_tfdata.files", "cxr_tfdata.core"},
    "cxr_tfdata.modeling": {"cxr_tfdata.files", "cxr_tfdata.core", "cxr_tfdata.metrics", "cxr_tfdata.data"},
    "cxr_tfdata.evaluation": {"cxr_tfdata.files", "cxr_tfdata.core", "cxr_tfdata.metrics", "cxr_tfdata.data",
                              "cxr_tfdata.modeling"},
    "cxr_tfdata.serving": {"cxr_tfdata.files", "cxr_tfdata.core", "cxr_tfdata.metrics", "cxr_tfdata.data",
                           "cxr_tfdata.modeling"},
    "cxr_tfdata.training": {"cxr_tfdata.files", "cxr_tfdata.core", "cxr_tfdata.metrics", "cxr_tfdata.data",
                            "cxr_tfdata.modeling", "cxr_tfdata.evaluation"},
    "cxr_tfdata.cli": {"cxr_tfdata"},  # the entry points may import anything of cxr_tfdata's
    "tfrecords_builder": {"cxr_tfdata.files", "cxr_tfdata.core"},
}
# Folders that hold no TensorFlow at import: a binary's --help, the converter's workers and
# the metric maths start in a fraction of a second.
NO_TENSORFLOW_AT_IMPORT = ("cxr_tfdata.files", "cxr_tfdata.core", "cxr_tfdata.metrics")
HEAVY = ("tensorflow", "keras", "tensorflow_datasets")
MAX_MODULE_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """Every module named by an import in the file (`from a import b` gives a.b when a.b is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return names


def _part(module: str) -> str | None:
    """The layer a module of ours belongs to: the longest key of MAY_IMPORT it lies in."""
    keys = [key for key in MAY_IMPORT if module == key or module.startswith(key + ".")]
    return max(keys, key=len) if keys else None


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def test_every_module_lies_in_a_layer():
    loose = [name for name in MODULES if _part(name) is None and name != "cxr_tfdata"]
    assert not loose, f"modules outside every layer (add them to a folder): {loose}"


def test_imports_follow_the_layers():
    broken = []
    for name, path in MODULES.items():
        part = _part(name)
        if part is None:
            continue
        for imported in _imports(path):
            target = _part(imported) if _ours(imported) else None
            if target is None or target == part:
                continue
            allowed = MAY_IMPORT[part]
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                broken.append(f"{name} imports {imported} ({part} may import {sorted(allowed) or 'nothing of ours'})")
    assert not broken, "\n".join(broken)


def test_cxr_tfdata_never_imports_the_builder():
    backwards = [f"{name} imports {imported}" for name, path in MODULES.items() if name.startswith("cxr_tfdata")
                 for imported in _imports(path) if imported.split(".")[0] == "tfrecords_builder"]
    assert not backwards, "\n".join(backwards)


@pytest.mark.parametrize("layer", NO_TENSORFLOW_AT_IMPORT)
def test_bottom_layers_import_no_tensorflow_at_module_level(layer):
    heavy = [f"{name} imports {imported}" for name, path in MODULES.items() if _part(name) == layer
             for imported in _imports(path, top_level_only=True) if imported.split(".")[0] in HEAVY]
    assert not heavy, "\n".join(heavy)


def test_no_import_cycle():
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    # A package's __init__ importing nothing of ours, the graph is over modules; a cycle is a path back.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_modules_stay_readable_at_once():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    missing = [name for name, path in MODULES.items() if path.name == "__init__.py" and name in MAY_IMPORT
               and "import" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not missing, f"__init__.py without a docstring stating what it may import: {missing}"


def test_the_checks_see_a_broken_import(tmp_path):
    """The layer check itself can fail: a metrics module importing the training folder is caught."""
    assert _part("cxr_tfdata.metrics.calibration") == "cxr_tfdata.metrics"
    target = _part("cxr_tfdata.training.train")
    assert not any(target == a or target.startswith(a + ".") for a in MAY_IMPORT["cxr_tfdata.metrics"])
