"""Imports run one way: models/ knows no trainer, data or CLI; diffusion/ and data/ never import
training/; nothing imports the CLI. Checked on the source (every import statement, also the ones
inside functions), so a violation fails here, not in a user's environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dreambooth_jax"
FORBIDDEN = {
    "models": ("dreambooth_jax.training", "dreambooth_jax.data", "dreambooth_jax.diffusion", "dreambooth_jax.cli",
               "dreambooth_jax.train", "dreambooth_jax.demo", "dreambooth_jax.sampling"),
    "diffusion": ("dreambooth_jax.training", "dreambooth_jax.data", "dreambooth_jax.cli", "dreambooth_jax.train"),
    "data": ("dreambooth_jax.training", "dreambooth_jax.cli", "dreambooth_jax.train"),
    "sharding.py": ("dreambooth_jax.training", "dreambooth_jax.diffusion", "dreambooth_jax.models"),
}
CLI = ("dreambooth_jax.cli", "dreambooth_jax.train")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _hits(names: set[str], prefixes) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_layer_imports(part):
    files = [PKG / part] if part.endswith(".py") else sorted((PKG / part).rglob("*.py"))
    bad = {str(f.relative_to(PKG)): _hits(imports(f), FORBIDDEN[part]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_nothing_imports_the_cli():
    bad = {}
    for f in PKG.rglob("*.py"):
        if f.name in ("cli.py", "__main__.py"):
            continue
        hits = _hits(imports(f), CLI if f.name != "train.py" else ("dreambooth_jax.cli",))
        if hits:
            bad[str(f.relative_to(PKG))] = hits
    assert not bad
