"""Package boundaries: ``iris`` and the local Clerk stand-in (``clerk_standin``) never import each other.

The stand-in plays Clerk for ``make run``, the tests and the benchmarks. ``iris`` must not depend on it, so
production never loads a fake Clerk; the stand-in must not depend on ``iris``, so it stays an independent
check of our Clerk client. Both directions are read from the source (every ``import`` statement, at module
level or inside a function), so an import no test happens to run still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, package: str) -> set[str]:
    """Every module and name ``source`` imports anywhere in its body, as dotted names (``from a import b``
    gives ``a`` and ``a.b``). Relative imports are resolved against ``package``, the dotted package of the
    module the source belongs to."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def imports_under(package: str) -> dict[str, set[str]]:
    """``imported_modules`` of every ``.py`` file of the top-level ``package``, keyed by its path."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    return {
        str(path.relative_to(ROOT)): imported_modules(
            path.read_text(encoding="utf-8"), ".".join(path.relative_to(ROOT).parent.parts)
        )
        for path in files
    }


def naming(imports: dict[str, set[str]], forbidden: str) -> dict[str, list[str]]:
    """The imports of ``forbidden`` (or anything inside it), per file that has any."""
    found = {
        path: sorted(name for name in names if name == forbidden or name.startswith(forbidden + "."))
        for path, names in imports.items()
    }
    return {path: names for path, names in found.items() if names}


@pytest.mark.parametrize(("package", "forbidden"), [("iris", "clerk_standin"), ("clerk_standin", "iris")])
def test_iris_and_the_standin_do_not_import_each_other(package: str, forbidden: str) -> None:
    assert naming(imports_under(package), forbidden) == {}


def test_the_check_sees_imports_inside_functions_and_relative_imports() -> None:
    source = (
        "import os\n"
        "def later():\n"
        "    from clerk_standin import StandinServer\n"
        "    import clerk_standin.app\n"
        "from . import models\n"
        "from .wire import now_ms\n"
    )
    names = imported_modules(source, "iris")
    assert {"clerk_standin.StandinServer", "clerk_standin.app", "iris.models", "iris.wire.now_ms"} <= names
    assert naming({"probe.py": names}, "clerk_standin") == {
        "probe.py": ["clerk_standin", "clerk_standin.StandinServer", "clerk_standin.app"]
    }
    assert naming({"probe.py": names}, "clerk") == {}  # a prefix of a name is not that package
