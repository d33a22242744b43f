"""DESIGN.md section 2: who may import whom, and which thin modules own each heavy library.

Reads the source with `ast` (nothing is imported), so it checks lazy imports inside
functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "learner", "actors", "deploy")
HEAVY = ("zmq", "ray", "vllm", "mlflow", "torch.distributed")

# Modules that must stay pure: no sockets, no cluster, no engine, no tracking, no collectives.
PURE = (
    "learner/algo/",
    "shared/config.py",
    "shared/wire.py",
    "shared/types.py",
    "shared/queue/state.py",
    "shared/weights/protocol.py",
    "shared/reward/",
    "shared/data/",
    "shared/signals.py",
)

# The thin modules that own each heavy library (a prefix of the module path).
OWNERS = {
    "zmq": ("shared/queue/transport.py",),
    "ray": ("deploy/",),
    "mlflow": ("shared/tracking/",),
    "vllm": ("actors/engine.py", "actors/weight_receiver.py"),
    # the learner's process group and its collectives, FSDP, DCP checkpoints; the weight group on both sides
    "torch.distributed": (
        "learner/dist.py", "learner/model.py", "learner/checkpoint.py", "learner/weight_sender.py",
        "learner/weight_sync.py",
        "shared/weights/group.py", "actors/weight_sync.py", "actors/weight_receiver.py",
    ),
    # the bytes on the wire and in the weight group's store
    "msgpack": ("shared/wire.py", "shared/weights/protocol.py"),
}

FORBIDDEN_PACKAGES = {
    "shared": ("learner", "actors", "deploy"),
    "learner": ("actors", "deploy"),
    "actors": ("learner", "deploy"),
    "deploy": (),
}


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _uses(names: set[str], lib: str) -> bool:
    return any(n == lib or n.startswith(lib + ".") for n in names)


def test_there_is_code_to_check() -> None:
    assert len(_modules()) >= 5


def test_packages_do_not_import_each_other() -> None:
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        names = _imports(path)
        for other in FORBIDDEN_PACKAGES[rel.split("/")[0]]:
            assert not _uses(names, other), f"{rel} imports {other}"


def test_pure_modules_import_no_heavy_library() -> None:
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(PURE):
            names = _imports(path)
            for lib in HEAVY:
                assert not _uses(names, lib), f"pure module {rel} imports {lib}"


def test_heavy_libraries_have_thin_owners() -> None:
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        names = _imports(path)
        for lib, owners in OWNERS.items():
            if _uses(names, lib):
                assert rel.startswith(owners), f"{rel} imports {lib}; only {owners} may"


def _public_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]


def _referenced_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def test_every_public_function_of_a_pure_module_is_called_by_production_code() -> None:
    """The tested pure function must be the one that runs: a public function no production module uses
    (tests do not count) is either dead or has an untested inline twin somewhere."""
    used: set[str] = set()
    for path in _modules():
        used |= _referenced_names(path)
    unused = [
        f"{path.relative_to(ROOT).as_posix()}::{name}"
        for path in _modules()
        if path.relative_to(ROOT).as_posix().startswith(PURE)
        for name in _public_functions(path)
        if name not in used
    ]
    assert not unused, f"public functions of pure modules that no production code calls: {unused}"
