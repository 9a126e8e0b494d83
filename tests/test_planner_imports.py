"""The planner's modules import one way (issue 13): types → ILP → re-check loop → spaces → suggestions → plan.

Two checks: each module imports alone in a fresh interpreter (so none relies on another having been imported
first), and the static graph of ``memplan.planner``'s imports, module level and inside functions alike, has no
cycle (a function-local import that dodges a cycle is still an edge of the graph).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PLANNER = Path(__file__).resolve().parent.parent / "memplan" / "planner"
MODULES = sorted(p.stem for p in PLANNER.glob("*.py") if p.stem != "__init__")


def planner_edges(source: str) -> set[str]:
    """The ``memplan.planner`` modules a source file imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "memplan.planner":
                out |= {a.name for a in node.names}
            elif node.module.startswith("memplan.planner."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("memplan.planner.")}
    return out


def graph() -> dict[str, set[str]]:
    return {m: planner_edges((PLANNER / f"{m}.py").read_text()) & set(MODULES) for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert planner_edges("def f():\n    from memplan.planner.plan import plan\n") == {"plan"}


def test_planner_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) >= 20, sorted(edges)  # the whole package was read
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_types_and_ilp_sit_below_the_spaces_and_the_entry_point():
    """The layering the issue names: request/result types and the ILP import no space, loop or entry point."""
    edges = graph()
    upper = {"plan", "suggest", "train_plan", "infer", "recheck", "train", "train_offload", "train_recompute"}
    for low in ("request", "ilp_model", "ilp_layers", "ilp", "ilp_search", "space", "split", "setting"):
        assert not (edges[low] & upper), (low, edges[low] & upper)
    assert "plan" not in edges["suggest"]  # suggestions are given the planner, they do not import it


ALONE = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "memplan" or m.startswith("memplan.")]:
        del sys.modules[loaded]  # memplan anew for each module; third-party libraries stay loaded (speed)
    try:
        importlib.import_module("memplan.planner." + name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_planner_module_imports_alone():
    """Each module imported first, with no other memplan module loaded, in a fresh interpreter (one for all)."""
    proc = subprocess.run([sys.executable, "-c", ALONE, *MODULES], capture_output=True, text=True, timeout=120,
                          cwd=PLANNER.parent.parent)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def test_import_alone_check_fails_on_a_missing_module():
    proc = subprocess.run([sys.executable, "-c", ALONE, "no_such_module"], capture_output=True, text=True,
                          timeout=60, cwd=PLANNER.parent.parent)
    assert proc.returncode == 1 and "no_such_module" in proc.stdout
