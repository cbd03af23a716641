"""Imports point down only: ``theory`` is the bottom layer, ``sims`` and ``imaging`` stand on it side by
side, ``diffsteer`` (the command line) on top. Checked on the syntax tree of every .py file of the
packages, so nothing is imported and imports inside functions count too:

- theory imports none of sims, imaging, diffsteer;
- sims and imaging import neither each other nor diffsteer, also not by name at run time
  (``importlib.import_module("imaging...")``, the way a hidden cycle is made);
- no module of the packages (nor of benchmarks/ and tools/) imports a private name (``_x``) from another
  module, so every name used across modules is part of its module's interface. Tests may reach
  private names (they test internals).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("theory", "sims", "imaging", "diffsteer")
FORBIDDEN = {"theory": {"sims", "imaging", "diffsteer"}, "sims": {"imaging", "diffsteer"},
             "imaging": {"sims", "diffsteer"}, "diffsteer": set()}


def _files(*dirs):
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported module, imported names or None) for every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mod = _module_name(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__", "find_spec"):
                yield node.lineno, node.args[0].value, None


def test_relative_imports_resolve_like_python():
    """The resolver above (so the other tests cannot pass by misreading relative imports)."""
    import importlib.util

    src = ROOT / "sims" / "gradguide" / "figures.py"
    targets = {t for _, t, _ in _imports(src)}
    assert "sims.gradguide.config" in targets
    assert importlib.util.resolve_name(".config", "sims.gradguide") == "sims.gradguide.config"


@pytest.mark.parametrize("layer", PACKAGES)
def test_imports_point_down_only(layer):
    bad = []
    for path in _files(layer):
        for line, target, _ in _imports(path):
            top = target.split(".")[0]
            if top in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, f"{layer} must not import {sorted(FORBIDDEN[layer])}:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path in _files(*PACKAGES, "benchmarks", "tools"):
        for line, target, names in _imports(path):
            if target == "__future__":
                continue
            private_mod = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            private = [n for n in (names or []) if n.startswith("_") and not n.startswith("__")]
            if private_mod or private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {private or private_mod} from {target}")
    assert not bad, "private names imported from another module (make them public or move them):\n" + "\n".join(bad)
