"""The shape of the package: no import cycle between tunestack modules (function-level imports included), no
module of more than 400 lines, and each shared job in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tunestack"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the tunestack modules it imports anywhere in its body. `from pkg import name` counts as an
    import of pkg.name when that is a module. A package's own __init__ is not counted as imported by its
    submodules (Python runs it first, but it only re-exports)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
                elif target.rsplit(".", 1)[0] in modules and target.rsplit(".", 1)[0] != name:
                    graph[name].add(target.rsplit(".", 1)[0])
        # the package itself is implied by any submodule import: drop edges to ancestors
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # infer.batch imports the chat command only inside a function
    assert "tunestack.infer.chat" in graph["tunestack.infer.batch"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_ground_floor_imports_nothing_above_it() -> None:
    graph = import_graph()
    ground = {f"tunestack.{name}" for name in ("errors", "locks", "atomic", "checkpoints", "rundir")}
    for low in ground:
        above = graph[low] - ground
        assert not above, f"{low} imports {above}"
    for name, imports in graph.items():
        if name.startswith(("tunestack.config", "tunestack.data", "tunestack.model")):
            upward = {m for m in imports if m.startswith(("tunestack.train", "tunestack.infer", "tunestack.eval"))}
            assert not upward, f"{name} imports {upward}"


def test_no_module_is_longer_than_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _definitions(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if regex.search(p.read_text()))


def test_shared_jobs_are_written_once() -> None:
    # atomic writes; a final save moved in; an export's files moved in once read back
    assert _definitions(r"os\.replace\(") == ["atomic.py", "export/outputs.py", "rundir.py"]
    assert _definitions(r"mkdtemp\(") == ["atomic.py"]
    assert _definitions(r"PeftModel\.from_pretrained\(") == ["model/adapters.py"]  # stacking adapters
    assert _definitions(r"^def (split_held_out|held_out_indices)\(") == ["data/records.py"]
    assert _definitions(r"json\.loads\(line\)") == ["data/sources.py", "rundir.py"]  # records, lenient run files
    assert _definitions(r'"\.jsonl", "\.csv"') == ["data/sources.py"]  # the data-file suffixes
    assert _definitions(r"^COMMANDS[:=]") == ["cli.py"]  # the command table
    assert _definitions(r"^IGNORE_INDEX =") == ["data/collators.py"]
