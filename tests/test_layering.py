"""The layering DESIGN.md promises, read from the imports (every import, local ones included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compsearch"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base.split(".")
                head = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{head}.{module}" if module else head
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in out if m.startswith("compsearch")}


MODULES = _modules()
GRAPH = {n: {m for m in _imports(n, p) if m in MODULES and m != n} for n, p in MODULES.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("compsearch.kernels", ("compsearch.search", "compsearch.objectives", "compsearch.cli",
                                "compsearch.spaces")),
        ("compsearch.tasks", ("compsearch.search", "compsearch.cli")),
        ("compsearch.objectives", ("compsearch.search", "compsearch.cli")),
        ("compsearch.spaces", ("compsearch.objectives", "compsearch.search", "compsearch.cli")),
        ("compsearch.pipeline", ("compsearch.search", "compsearch.cli")),
        ("compsearch.final", ("compsearch.search", "compsearch.cli")),
        ("compsearch.train", ("compsearch.search", "compsearch.cli")),
        ("compsearch.search", ("compsearch.cli",)),
    ],
)  # fmt: skip
def test_lower_layers_never_import_higher_ones(importer, forbidden):
    broken = [
        f"{n} -> {d}"
        for n, deps in GRAPH.items()
        if _under(n, importer)
        for d in deps
        if any(_under(d, f) for f in forbidden)
    ]
    assert not broken, broken


LEAVES = ("compsearch.errors", "compsearch._schema", "compsearch._files", "compsearch._plugins",
          "compsearch.fingerprint")  # fmt: skip


def test_helper_modules_are_leaves():
    inner = {n: GRAPH[n] - {"compsearch.errors"} for n in LEAVES}
    assert not any(inner.values()), inner


def test_recipes_are_plain_data():
    # a recipe module imports only the recipes package and the leaf helpers: the errors, the
    # schema validators, atomic files, and the model fingerprint a recipe records
    allowed = ("compsearch.recipes", *LEAVES)
    broken = [
        f"{n} -> {d}"
        for n, deps in GRAPH.items()
        if _under(n, "compsearch.recipes")
        for d in deps
        if not any(_under(d, a) for a in allowed)
    ]
    assert not broken, broken


def test_no_import_cycles():
    seen, stack, cycles = set(), [], []

    def visit(node, path):
        if node in path:
            cycles.append([*path[path.index(node) :], node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(GRAPH[node]):
            # a package imports its own modules in __init__ to re-export them: not a cycle
            if not _under(nxt, node):
                visit(nxt, [*path, node])

    for module in sorted(GRAPH):
        visit(module, stack)
    assert not cycles, cycles[:3]


def test_no_module_over_500_lines():
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: c for n, c in big.items() if c > 500}
