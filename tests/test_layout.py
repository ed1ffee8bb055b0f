"""Package boundaries: ``iris`` and the local Clerk stand-in (``clerk_standin``) never import each other.

The stand-in plays Clerk for ``make run``, the tests and the benchmarks. ``iris`` must not depend on it, so
production never loads a fake Clerk; the stand-in must not depend on ``iris``, so it stays an independent
check of our Clerk client. Both directions are read from the source (every ``import`` statement, at module
level or inside a function), so an import no test happens to run still fails here. The same reading of
``iris/*.py`` proves that no import cycle runs through iris's own modules.
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


# ---- No import cycle inside iris: every module can be imported on its own, lowest layers first.


def iris_import_graph(package_dir: Path = ROOT / "iris") -> dict[str, set[str]]:
    """Module -> the iris modules it imports, read from every ``*.py`` of ``package_dir`` (at module level or
    inside a function). ``from iris import clerk`` is an import of ``iris.clerk``; only a name that is not a
    module (``from iris import create_app``) is an import of the package, ``iris``."""
    paths = sorted(package_dir.glob("*.py"))
    modules = {"iris" if path.stem == "__init__" else f"iris.{path.stem}": path for path in paths}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                # Relative imports in iris/*.py are relative to the package, iris.
                base = ".".join(filter(None, ["iris", node.module])) if node.level else node.module or ""
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in modules else base)
        graph[module] = {target for target in targets if target in modules and target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts (``[a, b, a]``), or None when there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_iris_has_no_import_cycle() -> None:
    graph = iris_import_graph()
    assert {"iris", "iris.config", "iris.tokens", "iris.auth"} <= set(graph)
    assert find_cycle(graph) is None


def test_the_cycle_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The cycle iris once had: config imported auth inside a function, and auth imported config."""
    (tmp_path / "__init__.py").write_text("from iris import config\n")
    (tmp_path / "config.py").write_text("def check():\n    from iris import auth\n")
    (tmp_path / "auth.py").write_text("from iris.config import ConfigError\n")
    assert find_cycle(iris_import_graph(tmp_path)) == ["iris.config", "iris.auth", "iris.config"]
    (tmp_path / "config.py").write_text("import os\n")
    assert find_cycle(iris_import_graph(tmp_path)) is None


# ---- The test suite's own layout: fixtures in conftest.py, helpers in helpers.py, no shared state.

# Calls that build a fresh mutable container at import time.
MUTABLE_CALLS = frozenset(
    {"list", "dict", "set", "bytearray", "defaultdict", "deque", "OrderedDict", "Counter"}
)
MUTABLE_NODES = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


def is_test_support_import(name: str) -> bool:
    """Whether the dotted ``name`` is (something in) a test module or conftest.py."""
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0] == "conftest" or parts[0].startswith("test_"))


def layout_problems(path: Path) -> list[str]:
    """What a ``tests/*.py`` module does against the suite's layout, as ``"line N: ..."`` strings.

    The rule: test modules hold tests, conftest.py holds fixtures, tests/helpers.py (and the support modules
    beside it: servers, browsers, drill_support, ...) hold everything shared. So no module imports a test
    module or conftest.py (pytest loads conftest.py itself; importing it as well gives two copies of its
    state). And no module keeps mutable state at module level: a list, dict or set assigned there
    (a literal, a comprehension or a ``list()``-style call), an augmented assignment there, or a ``global``
    statement anywhere. Such state is shared by every test of the run, so one test can change what the next
    one sees. Constants are fine: strings, numbers, tuples, frozensets and read-only mappings
    (``types.MappingProxyType``); state a test needs belongs in a fixture, whose scope says how long it lives.
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    problems = [
        f"imports {name}"
        for name in sorted(imported_modules(source, "tests"))
        if is_test_support_import(name)
    ]
    problems = [f"{path.name}: {problem}" for problem in problems]
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"{path.name}: line {node.lineno}: global {', '.join(node.names)}")
    for node in tree.body:
        if isinstance(node, ast.AugAssign):
            problems.append(
                f"{path.name}: line {node.lineno}: module-level {ast.unparse(node.target)} changes"
            )
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            value = node.value
            called = value.func if isinstance(value, ast.Call) else None
            called_name = (
                called.id
                if isinstance(called, ast.Name)
                else called.attr
                if isinstance(called, ast.Attribute)
                else ""
            )
            if isinstance(value, MUTABLE_NODES) or called_name in MUTABLE_CALLS:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = ", ".join(ast.unparse(target) for target in targets)
                problems.append(f"{path.name}: line {node.lineno}: module-level mutable {names}")
    return problems


def test_test_modules_share_through_helpers_not_each_other_and_keep_no_module_state() -> None:
    paths = sorted((ROOT / "tests").glob("*.py"))
    assert {"conftest.py", "helpers.py", "test_layout.py"} <= {path.name for path in paths}
    assert [problem for path in paths for problem in layout_problems(path)] == []


def test_the_layout_check_sees_test_imports_and_module_state(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "from tests.conftest import make_test_app\n"
        "from tests.test_auth import register\n"
        "from tests import test_users_api\n"
        "from tests.helpers import PASSWORD\n"
        "from tests.servers import free_port\n"
        "APPS = []\n"
        "SEEN: dict[str, int] = {}\n"
        "IDS = [n for n in range(3)]\n"
        "CACHE = dict()\n"
        "COUNT = 0\n"
        "COUNT += 1\n"
        "NAMES = ('a', 'b')\n"
        "KINDS = frozenset({'x'})\n"
        "URL = '/api'\n"
        "def bump():\n"
        "    global COUNT\n"
        "    local = []\n"
        "    return local\n"
    )
    assert layout_problems(probe) == [
        "test_probe.py: imports tests.conftest",
        "test_probe.py: imports tests.conftest.make_test_app",
        "test_probe.py: imports tests.test_auth",
        "test_probe.py: imports tests.test_auth.register",
        "test_probe.py: imports tests.test_users_api",
        "test_probe.py: line 16: global COUNT",
        "test_probe.py: line 6: module-level mutable APPS",
        "test_probe.py: line 7: module-level mutable SEEN",
        "test_probe.py: line 8: module-level mutable IDS",
        "test_probe.py: line 9: module-level mutable CACHE",
        "test_probe.py: line 11: module-level COUNT changes",
    ]
