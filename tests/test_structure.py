"""The shape of mlcd_jax/'s import graph (issue 29), from the source alone (``ast``, nothing imported).

Every ``import`` statement counts, function-local ones included, relative ones resolved; ``from P import
n`` is an import of the submodule ``P.n`` when there is one, else of ``P``. Checked: no import cycle; no
library module imports an entry point (``mlcd_jax.main``, a ``__main__``, a module run as a program);
no module is over :data:`MAX_LINES` lines; ``checkpointing`` does not import ``data``; ``cluster/`` does
not import ``evaluate/`` and the trainer does not import ``cluster/``. The training wing's layers, top
down: ``train`` -> ``objectives`` -> ``losses`` / ``models`` / ``runs``: nothing below imports what is
above it, ``losses`` (pure loss math) imports no ``cluster/``, and of ``cluster/`` the objectives use only
``cluster.kmeans`` (faiss k-means, for ProtoCLIP's episodes). The trainer's code names no objective.

``KNOWN`` names the violations not fixed yet, check by check; each check must find exactly those (a fixed
one is taken off the list, so the list only shrinks).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlcd_jax"
MAX_LINES = 450

KNOWN: dict[str, set[str]] = {
    "cycles": set(),
    "entry_points": set(),
    "sizes": set(),
    "layers": set(),
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package's module that importing ``name`` loads last (``name`` or its nearest package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """The package's modules that ``module`` imports anywhere in ``source``."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(_resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _resolve(base))
    return {name for name in found if name and name != module}


GRAPH = {module: _imports(module, path.read_text(), path.name == "__init__.py") for module, path in MODULES.items()}


def _is_entry_point(module: str) -> bool:
    """``mlcd_jax.main``, a ``__main__`` module, or a module with an ``if __name__ == "__main__"`` block."""
    if module == "mlcd_jax.main" or module.endswith(".__main__"):
        return True
    tree = ast.parse(MODULES[module].read_text())
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _cycles() -> set[str]:
    """One ``a -> b -> ... -> a`` line per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(GRAPH[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.add(" -> ".join(sorted(component) + [min(component)]))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _edges(sources: str, targets: str) -> set[str]:
    """``a -> b`` for every import of a module under ``targets`` by a module under ``sources``."""
    return {f"{a} -> {b}" for a, imported in GRAPH.items() if _under(a, sources)
            for b in imported if _under(b, targets)}


def test_the_graph_sees_function_local_and_relative_imports():
    source = (
        "import os\nimport mlcd_jax.data.order\nfrom mlcd_jax.losses import l2_normalize\n"
        "def f():\n    from mlcd_jax.cluster import kmeans\n    from . import records\n    from ..models.vit import x\n"
    )
    assert _imports("mlcd_jax.data.sources", source) == {
        "mlcd_jax.data.order", "mlcd_jax.losses", "mlcd_jax.cluster.kmeans", "mlcd_jax.data.records",
        "mlcd_jax.models.vit",
    }


def test_no_import_cycle():
    assert _cycles() == KNOWN["cycles"]


def test_nothing_imports_an_entry_point():
    """Entry points sit on top: what they share lives in library modules (``mlcd_jax.cli``)."""
    entry = {m for m in MODULES if _is_entry_point(m)}
    assert {"mlcd_jax.main", "mlcd_jax.cluster.__main__", "mlcd_jax.evaluate.__main__"} <= entry
    found = {f"{a} -> {b}" for a, imported in GRAPH.items() for b in imported if b in entry}
    assert found == KNOWN["entry_points"]


def test_no_module_over_max_lines():
    found = {m for m, path in MODULES.items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert found == KNOWN["sizes"]


def test_layers():
    found = _edges("mlcd_jax.checkpointing", "mlcd_jax.data")
    found |= _edges("mlcd_jax.cluster", "mlcd_jax.evaluate")
    found |= _edges("mlcd_jax.train", "mlcd_jax.cluster")
    for lower in ("mlcd_jax.losses", "mlcd_jax.models", "mlcd_jax.runs"):
        found |= _edges(lower, "mlcd_jax.objectives") | _edges(lower, "mlcd_jax.train")
    found |= _edges("mlcd_jax.objectives", "mlcd_jax.train")
    found |= _edges("mlcd_jax.losses", "mlcd_jax.cluster")
    found |= {edge for edge in _edges("mlcd_jax.objectives", "mlcd_jax.cluster")
              if not edge.endswith(" -> mlcd_jax.cluster.kmeans")}
    assert found == KNOWN["layers"]


# What the trainer's code (names and strings, docstrings and comments aside) must not hold: loss kinds,
# the state keys and batch arrays of particular objectives, as a whole name or string; these anywhere.
OBJECTIVE_NAMES = {"mlcd", "mlc", "softmax", "clip", "lit", "siglip", "protoclip", "text", "heads", "tokens",
                   "logit_scale", "logit_bias", "episode", "episode_pos", "labels"}
OBJECTIVE_PARTS = re.compile(r"episode|protoclip|siglip|infonce", re.IGNORECASE)


def _code_words(source: str) -> list[str]:
    """The names and the non-docstring strings (quotes stripped) of ``source``."""
    tree = ast.parse(source)
    docstring_lines = {node.body[0].lineno for node in ast.walk(tree)
                       if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                       and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [tok.string.strip("\"'") for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start[0] not in docstring_lines)]


def _names_an_objective(word: str) -> bool:
    return word.lower() in OBJECTIVE_NAMES or bool(OBJECTIVE_PARTS.search(word))


def test_the_trainer_names_no_objective():
    """The loop, state, optimizer, step and validation reach every objective through its methods."""
    assert [w for w in _code_words('"""clip"""\nx = batch["tokens"]  # lit\n') if _names_an_objective(w)] == ["tokens"]
    found = {f"{module}: {word}" for module, path in MODULES.items() if _under(module, "mlcd_jax.train")
             for word in _code_words(path.read_text()) if _names_an_objective(word)}
    assert found == set()


@pytest.mark.parametrize("check", sorted(KNOWN))
def test_known_violations_are_named(check):
    """An allow-list entry is a module or an ``a -> b`` edge of the package, never a pattern."""
    for entry in KNOWN[check]:
        assert all(part in MODULES for part in entry.split(" -> ")), entry
