"""The package's layers as a contract: the math never reaches FLARE, and no import cycle exists.

The import graph is read with `ast` from every module under `custom/pharmafl`, imports inside
functions included (a lazy import still couples two modules).
"""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "custom" / "pharmafl"

# Shared math and the use cases' own code: nothing here may reach FLARE or the layers above it.
MATH_PACKAGES = ("core", "aggregation", "secure_sum", "privacy", "multitask", "binding_sites")
# Modules in those packages that drive whole simulator runs and so sit above the jobs layer.
ORCHESTRATION = {"pharmafl.multitask.bench", "pharmafl.multitask.experiment", "pharmafl.binding_sites.experiment"}
FORBIDDEN_FOR_MATH = ("nvflare", "pharmafl.flare", "pharmafl.consortium", "pharmafl.cli", "pharmafl.testing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """pharmafl modules (or `nvflare`) imported by one module; `from a import b` counts `a.b` if it is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "nvflare":
                found.add("nvflare")
            elif target.split(".")[0] == "pharmafl":
                found.add(target)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from `start`, each mapped to the module that imported it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        current = stack.pop()
        for dep in graph.get(current, ()):
            if dep not in seen and dep != start:
                seen[dep] = current
                stack.append(dep)
    return seen


def _chain(parents: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(parents[chain[-1]])
    return " -> ".join(reversed(chain))


def test_the_graph_is_read(graph):
    # The contract means nothing if the reader misses imports: check edges we know exist.
    assert "nvflare" in graph["pharmafl.flare.fedavg_aggregator"]
    assert "pharmafl.aggregation.weighted_mean" in graph["pharmafl.flare.fedavg_aggregator"]
    assert "pharmafl.secure_sum.protocol" in graph["pharmafl.flare.secure_sum_workflow"]
    assert len(graph) > 60


def test_math_never_reaches_flare_or_the_layers_above(graph):
    math = [m for m in graph if m.count(".") and m.split(".")[1] in MATH_PACKAGES and m not in ORCHESTRATION]
    assert "pharmafl.secure_sum.protocol" in math and "pharmafl.multitask.train" in math
    leaks = []
    for module in math:
        parents = _reachable(graph, module)
        for reached in parents:
            if reached.startswith(FORBIDDEN_FOR_MATH):
                leaks.append(_chain(parents, module, reached))
    assert not leaks, "math modules reach FLARE or the layers above it:\n" + "\n".join(sorted(leaks))


def test_only_flare_and_the_consortium_runner_import_nvflare(graph):
    # flare/ is the adapter layer; testing/ plays FLARE's server; consortium/ drives POC and the FLARE API.
    allowed = ("pharmafl.flare", "pharmafl.testing", "pharmafl.consortium")
    importers = sorted(m for m, deps in graph.items() if "nvflare" in deps and not m.startswith(allowed))
    assert not importers, f"modules outside flare/ importing nvflare: {importers}"


def test_no_import_cycles(graph):
    cycles = []
    for module in graph:
        for dep in graph[module]:
            back = _reachable(graph, dep)
            if module in back:
                cycles.append(f"{module} -> {_chain(back, dep, module)}")
                break
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_the_cycle_check_finds_a_cycle():
    looped = {"pharmafl.a": {"pharmafl.b"}, "pharmafl.b": {"pharmafl.c"}, "pharmafl.c": {"pharmafl.a"}}
    assert "pharmafl.a" in _reachable(looped, "pharmafl.b")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles(looped)
