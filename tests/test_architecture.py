"""The import directions of docs/architecture.md, checked on the source: every import of one
of our packages by another must be one the table allows. A new package, or a new arrow,
starts here and in the doc."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each distribution's import packages live (pyproject.toml, clients/pyproject.toml).
SOURCES = (ROOT / "server", ROOT / "adapter_store", ROOT / "clients")
OURS = ("vbserve", "vbserve_store", "vbserve_client")

# unit -> the units it may import (a unit is `vbserve.<child>` or a whole other package).
# Lowest layer first; the same table as docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "vbserve_client": set(),
    "vbserve.backends": set(),
    "vbserve_store": {"vbserve.backends"},
    "vbserve.settings": {"vbserve.backends"},
    "vbserve.vblora": {"vbserve_store"},
    "vbserve.model": {"vbserve.settings", "vbserve.vblora", "vbserve_store"},
    "vbserve.tenancy": {"vbserve.backends", "vbserve.settings", "vbserve_store"},
    "vbserve.engine": {"vbserve.model", "vbserve.settings", "vbserve.vblora", "vbserve_store"},
    "vbserve.training": {
        "vbserve.backends",
        "vbserve.model",
        "vbserve.settings",
        "vbserve.tenancy",
        "vbserve.vblora",
        "vbserve_store",
    },
    "vbserve.metrics": {"vbserve.engine"},
    "vbserve.ui": set(),
    "vbserve.services": {"vbserve.model", "vbserve.settings", "vbserve.tenancy", "vbserve.training", "vbserve_store"},
    "vbserve.api": {
        "vbserve.backends",
        "vbserve.engine",
        "vbserve.metrics",
        "vbserve.model",
        "vbserve.settings",
        "vbserve.tenancy",
        "vbserve.training",
        "vbserve.vblora",
        "vbserve_store",
    },
    "vbserve.worker_host": {"vbserve.services", "vbserve.settings", "vbserve.tenancy", "vbserve.training"},
    "vbserve.app": {
        "vbserve.api",
        "vbserve.engine",
        "vbserve.metrics",
        "vbserve.services",
        "vbserve.settings",
        "vbserve.tenancy",
        "vbserve.training",
        "vbserve.ui",
        "vbserve.worker_host",
        "vbserve_store",
    },
    "vbserve.cli": {"vbserve.app", "vbserve.settings", "vbserve.worker_host"},
    "vbserve": set(),  # vbserve/__init__.py
}


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vbserve" and len(parts) > 1 else parts[0]


def imports() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported module) for every absolute import of ours."""
    found = []
    for source in SOURCES:
        for path in source.rglob("*.py"):
            parts = path.relative_to(source).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                found += [(str(path.relative_to(ROOT)), unit(module), name) for name in names]
    return found


def test_every_package_is_placed_in_the_table() -> None:
    units = {importer for _, importer, _ in imports()}
    for source in SOURCES:
        for package in source.iterdir():
            if package.name in OURS:
                units |= {
                    unit(f"{package.name}.{child.stem}")
                    for child in package.iterdir()
                    if (child.suffix == ".py" and child.stem != "__init__") or (child / "__init__.py").exists()
                }
    assert units - set(ALLOWED) == set(), "place the new package in ALLOWED and docs/architecture.md"


def test_imports_follow_the_allowed_directions() -> None:
    wrong = [
        f"{file}: {importer} imports {name}"
        for file, importer, name in imports()
        if name.split(".")[0] in OURS and unit(name) != importer and unit(name) not in ALLOWED[importer]
    ]
    assert wrong == []


def test_no_module_imports_the_old_generic_names() -> None:
    """`server` and `adapter_store` are folders, not packages: importing them would find
    whatever else an environment installs under those names."""
    old = [
        f"{file}: {name}" for file, _, name in imports() if name.split(".")[0] in ("server", "adapter_store", "clients")
    ]
    assert old == []


def test_the_table_has_no_cycle() -> None:
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, " -> ".join((*path, node))
        if node not in done:
            for nxt in ALLOWED[node]:
                visit(nxt, (*path, node))
            done.add(node)

    for node in ALLOWED:
        visit(node, ())
