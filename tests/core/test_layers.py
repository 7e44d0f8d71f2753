"""The layers the architecture promises, proven on the source: every import statement of every
module, including those inside functions, is checked against what its layer may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "slsg": ROOT / "slsg",
    "slsg_train": ROOT / "training" / "slsg_train",
    "slsg_gateway": ROOT / "service" / "slsg_gateway",
    "slsg_triton": ROOT / "service" / "slsg_triton",
    "slsg_bench": ROOT / "benchmarks" / "slsg_bench",
}
SIDES = {"slsg_train", "slsg_gateway", "slsg_triton", "slsg_bench"}
# package -> top-level modules it must never import
FORBIDDEN = {
    "slsg": SIDES | {"torch", "fastapi", "onnxruntime", "PIL", "scipy"},
    "slsg_gateway": {"torch", "slsg_train", "slsg_triton", "slsg_bench"},
    "slsg_train": {"slsg_gateway", "slsg_triton", "slsg_bench"},
    "slsg_triton": {"torch", "slsg_train", "slsg_gateway", "slsg_bench"},
    "slsg_bench": set(),  # benchmarks may import both sides
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in one source file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        bad = imported_modules(path) & FORBIDDEN[package]
        found += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    assert PACKAGES[package].is_dir(), f"{package} moved: update PACKAGES"
    assert violations(package) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from torch import nn\n    import slsg_train.models\n")
    assert imported_modules(module) == {"os", "torch", "slsg_train"}
