"""The package claims Python 3.10 (requires-python): nothing may need 3.11 unguarded."""

from __future__ import annotations

import ast
from pathlib import Path

import edgesplit
from edgesplit.toml_compat import tomllib

PACKAGE = Path(edgesplit.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_tomllib_only_through_the_compat_module() -> None:
    # tomllib is 3.11+; every reader goes through edgesplit.toml_compat (tomli on 3.10)
    offenders = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
                 if p.name != "toml_compat.py" and "tomllib" in _imported_modules(p)]
    assert offenders == []


def test_tomli_declared_for_python310() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    deps = [d.replace(" ", "").replace('"', "'") for d in project["dependencies"]]
    assert any(d.startswith("tomli>=") and d.endswith(";python_version<'3.11'") for d in deps), deps


def test_type_checker_and_linter_target_python310() -> None:
    tool = tomllib.loads(PYPROJECT.read_text())["tool"]
    assert tool["mypy"]["python_version"] == "3.10"   # mypy checks the 3.10 branch
    assert tool["ruff"]["target-version"] == "py310"


def test_compat_module_reads_toml() -> None:
    assert tomllib.loads('a = 1\n[b]\nc = "d"\n') == {"a": 1, "b": {"c": "d"}}
