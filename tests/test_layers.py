"""Imports run one way, down DESIGN.md's layers: commands -> callbacks, lightning_modules -> datamodules -> core."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(folder: str, exclude: str | None = None) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    return [path for path in files if exclude is None or not path.is_relative_to(REPO / exclude)]


FORBIDDEN = {
    "tessera": ("lightning", "lightning_modules", "callbacks", "datamodules", "tessera.commands"),
    "datamodules": ("lightning_modules", "callbacks", "tessera.commands"),
    "lightning_modules": ("callbacks", "tessera.commands"),
    "callbacks": ("tessera.commands",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(layer):
    upward = [
        f"{module_name(path)} imports {name}"
        for path in modules(layer, exclude="tessera/commands" if layer == "tessera" else None)
        for name in sorted(imports(path))
        if any(name == above or name.startswith(above + ".") for above in FORBIDDEN[layer])
    ]
    assert upward == []


def test_the_commands_import_each_other_without_a_cycle():
    graph = {module_name(path): imports(path) for path in modules("tessera/commands")}
    visiting, done = set(), set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in visiting, "import cycle: " + " -> ".join(trail + [name])
        if name in done:
            return
        visiting.add(name)
        for imported in graph[name]:
            if imported in graph:
                visit(imported, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
