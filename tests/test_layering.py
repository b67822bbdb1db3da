"""The rooms of the package import only downward, and no two rooms import each
other, directly or around a loop.

A room is a top-level folder or module of the package; its rank says what it
may import: rooms of a lower rank, and rooms of its own rank where that makes
no loop. Every import counts, also one inside a function (a lazy import is
still a dependency). Tests and benchmarks stand outside the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANKS = {
    "_version": 0,
    "ir": 0,
    "frontend": 1,
    "customops": 1,
    "hardware": 1,
    "examples": 2,  # tiny models built with frontend's Hugging Face helpers
    "cost": 2,
    "passes": 3,
    "backends": 4,
    "runtime": 5,
    "api": 6,
    "training": 6,
    "__init__": 6,  # `import plait`: the public names (api's and training's)
    "cli": 7,
}
OUTSIDE = ("tests", "benchmarks", "build")


def _room(parts: tuple[str, ...]) -> str:
    return parts[0] if parts else "__init__"


def imports(root: Path) -> list[tuple[str, str, str, int]]:
    """(from room, to room, file, line) for every import of one of the
    package's own modules, in every module below `root` (the package)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in OUTSIDE or relative.parts[0].startswith("."):
            continue
        module = list(relative.with_suffix("").parts)
        package = module[:-1]
        source = _room(tuple(module) if module != ["__init__"] else ())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, package):
                # `from x import y` imports module x.y where there is one, else x
                name = [*target[:-1], target[-1]] if _is_module(root, target) else target[:-1]
                found.append((source, _room(tuple(name)), str(relative), node.lineno))
    return found


def _targets(node: ast.AST, package: list[str]) -> list[list[str]]:
    """The dotted names (below the package) an import statement names."""
    if isinstance(node, ast.Import):
        return [
            a.name.split(".")[1:] + ["*"] for a in node.names if a.name.split(".")[0] == "plait"
        ]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = [*package[: len(package) - (node.level - 1)]]
    elif (node.module or "").split(".")[0] == "plait":
        base = []
        node = ast.ImportFrom(node.module.partition(".")[2] or None, node.names, 0)
    else:
        return []
    module = node.module.split(".") if node.module else []
    return [[*base, *module, a.name] for a in node.names]


def _is_module(root: Path, name: list[str]) -> bool:
    path = root.joinpath(*name)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(root: Path, ranks: dict[str, int] = RANKS) -> list[str]:
    problems, edges = [], {}
    for source, target, file, line in imports(root):
        if source == target:
            continue
        for room in (source, target):
            if room not in ranks:
                problems.append(f"{file}:{line}: room '{room}' has no rank in RANKS")
        if ranks.get(target, 0) > ranks.get(source, 0):
            problems.append(f"{file}:{line}: {source} imports {target}, a higher room")
        edges.setdefault(source, {}).setdefault(target, f"{file}:{line}")
    problems += [f"rooms import each other in a loop: {loop}" for loop in _loops(edges)]
    return sorted(set(problems))


def _loops(edges: dict[str, dict[str, str]]) -> list[str]:
    """Each set of rooms that reach one another, with the imports between them."""
    reach = {room: _reachable(edges, room) for room in edges}
    loops = set()
    for room in edges:
        together = sorted(r for r in reach[room] if room in reach.get(r, ()))
        if together:
            inside = [
                f"{a} -> {b} ({where})"
                for a in together
                for b, where in sorted(edges.get(a, {}).items())
                if b in together
            ]
            loops.add(f"{', '.join(together)}: {'; '.join(inside)}")
    return sorted(loops)


def _reachable(edges: dict[str, dict[str, str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), {}):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_rooms_import_only_downward_and_without_loops():
    assert not violations(ROOT), "\n".join(violations(ROOT))


def test_every_room_has_a_rank():
    rooms = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert rooms - set(OUTSIDE) == set(RANKS)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_an_upward_import_fails_even_inside_a_function(tmp_path):
    root = _package(
        tmp_path,
        {
            "ir/__init__.py": "",
            "ir/ops.py": "def f():\n    from ..passes.base import Pass\n",
            "passes/__init__.py": "",
            "passes/base.py": "from ..ir import ops\n",
        },
    )
    assert violations(root) == [
        "ir/ops.py:2: ir imports passes, a higher room",
        "rooms import each other in a loop: ir, passes: ir -> passes (ir/ops.py:2); "
        "passes -> ir (passes/base.py:1)",
    ]


def test_rooms_of_one_rank_may_not_import_each_other_in_a_loop(tmp_path):
    root = _package(
        tmp_path,
        {
            "api.py": "from plait import training\n",
            "training.py": "from .api import DEFAULT_PIPELINE\n",
        },
    )
    (loop,) = violations(root)
    assert loop == (
        "rooms import each other in a loop: api, training: api -> training (api.py:1); "
        "training -> api (training.py:1)"
    )
