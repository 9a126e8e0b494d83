"""memplan's modules import one way: the imports that run when a module loads (not those inside functions, nor
``if TYPE_CHECKING`` blocks) form no cycle over the whole package, and the modules split out of ``engines/vllm.py`` and
``vector.py`` each import alone in a fresh interpreter.

``tests/test_planner_imports.py`` holds ``memplan.planner`` to the stricter rule (function-level imports too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memplan"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def load_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module loads: outside functions, classes and TYPE_CHECKING blocks."""
    out: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return out


def edges(source: str, known: set[str]) -> set[str]:
    """The memplan modules (``known``) a module's source imports when it loads, the package root left out."""
    out: set[str] = set()
    for node in load_time_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif node.module in known:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return out - {"memplan"}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> the modules it imports), or None."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_cycle_check_finds_a_planted_cycle() -> None:
    planted = "from memplan.b import x\n\ndef f():\n    from memplan.c import y\n"
    graph = {"memplan.a": edges(planted, {"memplan.a", "memplan.b", "memplan.c"}), "memplan.b": {"memplan.a"}}
    assert graph["memplan.a"] == {"memplan.b"}  # the function-level import is no edge
    assert set(cycle(graph) or ()) == {"memplan.a", "memplan.b"}


def test_memplan_imports_form_no_cycle_at_load_time() -> None:
    known = set(MODULES)
    found = cycle({name: edges(path.read_text(), known) for name, path in MODULES.items()})
    assert found is None, " -> ".join(found or ())


SPLIT = ["memplan.engines.vllm", "memplan.engines.vllm_budget", "memplan.engines.vllm_peak", "memplan.engines.vllm_pool",
         "memplan.vector", "memplan.vector_fit", "memplan.vector_group"]


@pytest.mark.parametrize("module", SPLIT)
def test_each_split_module_imports_alone(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
