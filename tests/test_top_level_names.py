"""No top-level name of the repository shadows a module that is imported.

`python -m pytest` (the README's test command), `python -m ...` and a user's
script saved at the repository root put the root first on sys.path, so a
top-level folder or module of ours named like an installed package replaces it
for everything that imports that package: transformers 5.25 imports the PyPI
package `kernels`, and plait's old `kernels/` folder broke every test that
imported transformers' MoE code.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _our_names() -> set[str]:
    names = set()
    for path in ROOT.iterdir():
        if path.name.startswith((".", "_")):
            continue
        if path.is_dir() or path.suffix == ".py":
            names.add(path.stem)
    return names


def _other_paths() -> list[str]:
    """sys.path without the repository root (and without '' standing for it)."""
    return [p for p in sys.path if p and Path(p).resolve() != ROOT]


def _importers(name: str, provider: Path | None) -> list[str]:
    """Files in site-packages, outside `provider` itself, that import `name`."""
    pattern = re.compile(rf"^\s*(?:from|import)\s+{re.escape(name)}(?:\.|\s|$)".encode(), re.M)
    needles = (f"import {name}".encode(), f"from {name}".encode())
    found = []
    for directory in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for file in Path(directory).rglob("*.py"):
            if provider is not None and provider in file.parents:
                continue
            try:
                text = file.read_bytes()
            except OSError:
                continue
            if any(n in text for n in needles) and pattern.search(text):
                found.append(str(file))
                if len(found) >= 3:
                    return found
    return found


def test_no_top_level_name_shadows_an_imported_module():
    distributions = importlib.metadata.packages_distributions()
    clashes = []
    for name in sorted(_our_names()):
        if name in sys.stdlib_module_names:
            clashes.append(f"{name}: a standard-library module")
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, _other_paths())
        if spec is None and name not in distributions:
            continue
        origin = (
            spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
        )
        provider = Path(origin) if origin else None
        importers = _importers(name, provider)
        # a package installed only as a packaging accident (xdsl ships its own
        # `tests` and `benchmarks`) is harmless while nothing imports it
        if importers:
            owner = ", ".join(distributions.get(name, ["?"]))
            clashes.append(f"{name}: installed by {owner} and imported by {importers[0]}")
    assert not clashes, "rename these top-level names: " + "; ".join(clashes)


def test_the_check_sees_an_imported_package():
    """The scan finds importers of a package everything uses (so it can fail)."""
    assert _importers("numpy", None)
