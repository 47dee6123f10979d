"""The package's layering (README "Layout"): each sub-package imports only the layers below it, and no module
imports itself back through others at import time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_peft"

# Lowest first. A package may import its own layer's base modules and any lower layer; never a higher one, nor a
# sibling of its own layer (training and inference do not know each other; nor do export and sweeps).
LAYERS = [
    {"errors", "env", "paths", "stats", "console", "compat", "__init__"},
    {"methods"},
    {"checkpoints"},
    {"data"},
    {"models"},
    {"tasks"},
    {"training", "inference"},
    {"export", "sweeps"},
    {"cli"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported lit_peft module, at import time?)], lazy (function-level) imports included."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")} | {"lit_peft"}
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_peft"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                targets = [n for n in names if n in modules] or [node.module]
                edges += [(t, id(node) in top) for t in targets]
            elif isinstance(node, ast.Import):
                edges += [(a.name, id(node) in top) for a in node.names if a.name.startswith("lit_peft")]
        found[_module(path)] = edges
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_sub_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "conf"}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert packages | modules <= set(LAYER), (packages | modules) - set(LAYER)


def test_sub_packages_import_only_lower_layers():
    wrong = []
    for module, edges in _imports().items():
        src = _package(module)
        for target, _ in edges:
            dst = _package(target)
            if src != dst and (LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and LAYER[src] > 0)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles_at_import_time():
    graph = {m: {t for t, top in edges if top and t != m} for m, edges in _imports().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(t) :], t]))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_readme_draws_every_sub_package():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert all(f"{name}/" in layout for name in packages), [n for n in packages if f"{n}/" not in layout]
