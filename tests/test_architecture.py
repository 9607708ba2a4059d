"""The packages import one way (docs/architecture.md): a test that fails when an import crosses it.

Every `import helios...` / `from helios... import` / relative import in src/helios, at module level or
inside a function, is read with `ast` (nothing is imported), and each is checked against the layers
below. The import graph between modules must also have no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "helios"

FOUNDATION = {"model_folder", "scenes", "runtime"}  # plain modules every layer may use
# layer -> the layers it may import (besides itself and FOUNDATION)
ALLOWED = {
    "model": set(),
    "sampling": set(),
    "engine": {"model", "sampling"},
    "eval": {"engine"},
    "train": {"engine", "model", "sampling"},
    "serve": {"engine", "model", "sampling"},
    "cli": {"__init__", "engine", "eval", "model", "sampling", "serve", "train"},  # __init__: the version
    "__init__": {"engine", "model", "sampling"},
    **{name: set() for name in FOUNDATION},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The helios modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "helios"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "helios":
                continue
            # `from helios.x import y` may name a submodule y
            subs = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
            out |= subs or {target}
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module(name: str) -> bool:
    p = SRC.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_import_goes_the_allowed_way():
    wrong = []
    for module, targets in import_graph().items():
        own = layer(module)
        may = ALLOWED[own] | FOUNDATION | {own}
        wrong += [f"{module} imports {t}" for t in sorted(targets) if layer(t) not in may]
    assert not wrong, "imports against the direction of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a circle through them
    edges = {m: {t for t in ts if t in graph and not (m + ".").startswith(t + ".")} for m, ts in graph.items()}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_reader_sees_relative_and_lazy_imports():
    """(Else the tests above could pass by seeing nothing.)"""
    f = SRC / "sampling" / "sampler.py"
    assert "helios.sampling.guidance" in imports_of(f)
    assert any(t.startswith("helios.engine") for t in imports_of(SRC / "train" / "stage3" / "rollout.py"))
    assert "helios.train.stages" in imports_of(SRC / "train" / "stage3" / "stage.py")
