"""The house plan holds: imports flow down the rooms, and `import fused_ops` loads only the ops.

Rooms, lowest first (README, "Architecture"): the kernels; backend.py; the ops; the multi-process ops
(fused_ops.distributed); convert; the face (fused_ops/__init__.py); the makemore application; the CLI.
A module may import from its own room or a lower one. The application and the CLI use the public API
only: `fused_ops`, `fused_ops.distributed` and their own room.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_ops
from fused_ops import backend

PACKAGE = Path(fused_ops.__file__).resolve().parent

ROOMS = [  # (room, module prefixes), lowest first
    ("kernels", ("fused_ops.kernels",)),
    ("backend", ("fused_ops.backend",)),
    ("ops", ("fused_ops.cross_entropy", "fused_ops.linear_cross_entropy", "fused_ops.batch_norm")),
    ("multi-process ops", ("fused_ops.distributed",)),
    ("convert", ("fused_ops.convert",)),
    ("face", ("fused_ops",)),
    ("application", ("fused_ops.makemore",)),
    ("CLI", ("fused_ops.__main__",)),
]
PUBLIC = ("fused_ops", "fused_ops.distributed")  # what the application and the CLI may import
# The imports up the rooms, made at call time: cross_entropy(process_group=...) and
# linear_cross_entropy(process_group=...) hand the call to their vocab-parallel twins, which reuse the
# op's checker (and, for the linear one, its chunk loop).
ALLOWED_UP = {
    ("fused_ops.cross_entropy", "fused_ops.distributed.vocab_parallel"),
    ("fused_ops.linear_cross_entropy", "fused_ops.distributed.vocab_parallel"),
}


def _room(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(ROOMS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no room: add it to ROOMS and to the README's architecture note"
    return max(matches)[1]  # the longest prefix: fused_ops.convert is convert, not the face


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (the kernels live in kernels/ in a checkout)."""
    import fused_ops.kernels

    roots = {"fused_ops": PACKAGE, "fused_ops.kernels": Path(fused_ops.kernels.__file__).resolve().parent}
    found = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def _imports(path: Path) -> set[str]:
    """The fused_ops modules that `path` imports anywhere (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; the project imports absolutely"
            names.add(node.module)
            # `from fused_ops.makemore import train` imports the module fused_ops.makemore.train, but
            # `from fused_ops import convert` the public function of that name
            public = getattr(sys.modules.get(node.module), "__all__", ())
            names.update(f"{node.module}.{alias.name}" for alias in node.names if alias.name not in public)
    return {name for name in names if name in MODULES}


MODULES = _modules()


def test_every_module_has_a_room():
    assert "fused_ops.makemore.train" in MODULES and "fused_ops.kernels.triton.cross_entropy" in MODULES
    for module in MODULES:
        _room(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down(module):
    room = _room(module)
    for imported in _imports(MODULES[module]):
        if (module, imported) in ALLOWED_UP:
            continue
        assert _room(imported) <= room, (
            f"{module} ({ROOMS[room][0]}) imports {imported} ({ROOMS[_room(imported)][0]}), a room above it"
        )
        if ROOMS[room][0] in ("application", "CLI") and not imported.startswith("fused_ops.makemore"):
            assert imported in PUBLIC, (
                f"{module} imports {imported}: the application uses the public API only"
            )


@pytest.mark.parametrize("module", sorted({low for low, _ in ALLOWED_UP}))
def test_the_upward_imports_are_made_at_call_time(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top_level = {
        node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert not any(name.startswith("fused_ops.distributed") for name in top_level)


def _loaded_after(code: str) -> set[str]:
    """Top-level module names in sys.modules after running `code` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return set(result.stdout.split())


@pytest.mark.slow
def test_import_loads_only_what_the_ops_need():
    """`import fused_ops` adds no triton, dynamo, tqdm, matplotlib or application to what `import torch`
    loads (torch itself imports tqdm when it is installed, from torch.hub)."""
    with_torch = _loaded_after("import torch")
    with_fused_ops = _loaded_after("import fused_ops")
    added = with_fused_ops - with_torch
    unwanted = sorted(
        name
        for name in added
        if name.split(".")[0] in ("triton", "tqdm", "matplotlib")
        or name.startswith(("fused_ops.makemore", "fused_ops.kernels", "torch._dynamo", "torch._inductor"))
    )
    assert unwanted == []


def test_constant_result_marks_like_torch():
    """backend._constant_result stands in for torch.compiler.assume_constant_result (which imports
    torch._dynamo): both must mark a function alike, or dynamo would trace os.environ under compile."""

    def marked_by_torch():
        return 1

    def marked_here():
        return 1

    torch.compiler.assume_constant_result(marked_by_torch)
    backend._constant_result(marked_here)
    assert vars(marked_by_torch) == vars(marked_here) == {"_dynamo_marked_constant": True}
