"""Every module of the installed package imports: a subpackage missing from
pyproject's package list fails here (run against `pip install .`)."""

import importlib
import pkgutil
from pathlib import Path

import plait

SOURCE = Path(__file__).resolve().parents[1]


def test_every_module_imports():
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE)
        if relative.parts[0] in ("tests", "benchmarks", "build") or relative.parts[0].startswith(
            "."
        ):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(["plait", *parts]))
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)


def test_installed_package_lists_every_subpackage():
    found = {m.name for m in pkgutil.walk_packages(plait.__path__, "plait.") if m.ispkg}
    expected = {
        "plait." + p.name
        for p in SOURCE.iterdir()
        if (p / "__init__.py").is_file() and p.name not in ("tests", "benchmarks")
    }
    assert expected <= found, f"not installed: {sorted(expected - found)}"
