"""The layout of cli/: one sub-package per job, no import cycles, no command borrowing from another.

Read with ``ast`` only (nothing is imported), so the check is fast and sees every import,
including the ones inside functions and the registries that import modules by name
(``COMMAND_MODULES`` in cli/main.py, ``BENCH_MODULES`` in cli/bench/commands.py).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parents[2] / "cli"
# The only modules that stay directly in cli/: the package marker, the entry point, the shared error.
TOP_LEVEL = {"__init__.py", "main.py", "errors.py"}
# A module that defines one of these is a command: it answers a `stylerec ...` (or `python -m`) call.
COMMAND_FUNCS = ("register", "register_bench", "main")
# What imports_of records for a module named in a string (a registry importing it by name).
BY_NAME = "<by name>"


def cli_sources(root: Path = CLI) -> dict[str, str]:
    """Dotted module name -> source of every module under ``root`` (a package ``x`` is ``x/__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def _resolve(name: str, modules: Mapping[str, object]) -> str | None:
    """The module of ``modules`` that ``name`` (a module or a name in one) refers to: longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_package(module: str, sources: Mapping[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in sources)


def imports_of(module: str, source: str, sources: Mapping[str, str]) -> dict[str, set[str]]:
    """The modules of ``sources`` that ``module`` imports -> the names it takes from each.

    "*" stands for the module itself, ``BY_NAME`` for a string constant naming it exactly (a
    registry that imports by name). Imports anywhere in the file count, lazy ones inside functions too.
    """
    found: dict[str, set[str]] = {}

    def add(target: str | None, what: str) -> None:
        if target is not None and target != module:
            found.setdefault(target, set()).add(what)

    package = module if _is_package(module, sources) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, sources), "*")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in sources:
                    add(sub, "*")
                else:
                    add(_resolve(base, sources), alias.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in sources:
            add(node.value, BY_NAME)
    return found


def module_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    return {m: set(imports_of(m, src, sources)) for m, src in sources.items()}


def package_of(module: str) -> str:
    """``cli.client.commands`` -> ``cli.client``; the modules directly in cli/ are their own group."""
    return ".".join(module.split(".")[:2])


def package_graph(modules: Mapping[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in modules.items():
        edges = graph.setdefault(package_of(module), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(module))
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def command_modules(sources: Mapping[str, str]) -> set[str]:
    out = set()
    for module, source in sources.items():
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and (node.name in COMMAND_FUNCS or node.name.startswith("cmd_")):
                out.add(module)
    return out


def borrowed_from_commands(sources: Mapping[str, str]) -> list[str]:
    """``importer -> command (names)`` for every import of a command module by another module, except
    what wiring commands together needs: a registry naming it, a ``__main__`` running it, and a
    ``register*`` function (a command group adding another module's sub-commands under its own)."""
    commands = command_modules(sources)
    problems = []
    for module, source in sources.items():
        if module.endswith(".__main__"):
            continue
        for target, names in imports_of(module, source, sources).items():
            borrowed = {n for n in names if n != BY_NAME and not n.startswith("register")}
            if target in commands and borrowed:
                problems.append(f"{module} -> {target} ({', '.join(sorted(borrowed))})")
    return sorted(problems)


# --------------------------------------------------------------------------------------------- the real cli/


def test_only_the_entry_point_and_the_error_type_stay_directly_in_cli() -> None:
    assert {p.name for p in CLI.glob("*.py")} == TOP_LEVEL
    for folder in CLI.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert (folder / "__init__.py").is_file(), f"{folder} is not a package"


def test_no_import_cycle_between_cli_packages() -> None:
    graph = package_graph(module_graph(cli_sources()))
    assert {"cli.localstack", "cli.client", "cli.demo", "cli.bench", "cli.load"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_import_cycle_between_cli_modules() -> None:
    graph = module_graph(cli_sources())
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_command_imports_a_helper_from_another_command() -> None:
    sources = cli_sources()
    assert {"cli.client.commands", "cli.demo.run", "cli.load.commands"} <= command_modules(sources)
    assert borrowed_from_commands(sources) == []


def test_every_registered_command_module_exists() -> None:
    sources = cli_sources()
    for registry in ("cli.main", "cli.bench.commands"):
        listed = [
            node.value
            for node in ast.walk(ast.parse(sources[registry]))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cli.")
        ]
        assert listed, registry
        assert [m for m in listed if m not in sources] == [], registry


# --------------------------------------------------------------------------------------------- the checks fail


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, str]:
    for rel, text in files.items():
        path = tmp_path / "cli" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return cli_sources(tmp_path / "cli")


@pytest.mark.parametrize(
    "demo_source",
    [
        "from cli.client.commands import send\n",  # plain
        "def f():\n    from cli.client import commands\n",  # lazy, a module taken from its package
        "import cli.client.commands\n",
        "from ..client.commands import send\n",  # relative
    ],
)
def test_a_cycle_through_two_packages_is_found(tmp_path: Path, demo_source: str) -> None:
    sources = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "client/__init__.py": "",
            "client/commands.py": "from cli.demo.page import OUT\n\ndef send(): ...\n",
            "demo/__init__.py": "",
            "demo/page.py": "OUT = 1\n",
            "demo/run.py": demo_source,
        },
    )
    assert find_cycle(module_graph(sources)) is None  # the modules form no cycle ...
    cycle = find_cycle(package_graph(module_graph(sources)))
    assert cycle is not None and set(cycle) == {"cli.client", "cli.demo"}  # ... their packages do


def test_a_module_cycle_and_a_registry_edge_are_found(tmp_path: Path) -> None:
    sources = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "main.py": 'COMMAND_MODULES = ["cli.bench.commands"]\n',
            "bench/__init__.py": "",
            "bench/commands.py": "def register(sub): ...\n",
            "bench/a.py": "from cli.bench.b import x\ny = 1\n",
            "bench/b.py": "def x():\n    from cli.bench.a import y\n",
        },
    )
    graph = module_graph(sources)
    assert graph["cli.main"] == {"cli.bench.commands"}
    assert borrowed_from_commands(sources) == []  # a registry imports by name, it borrows nothing
    assert set(find_cycle(graph) or []) == {"cli.bench.a", "cli.bench.b"}


def test_a_command_borrowing_from_another_command_is_found(tmp_path: Path) -> None:
    sources = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "main.py": 'COMMAND_MODULES = ["cli.client.commands", "cli.client.forget"]\n'
            "from cli.errors import UsageError\n",
            "errors.py": "class UsageError(Exception): ...\n",
            "client/__init__.py": "",
            "client/commands.py": "from cli.client.items import register_items\n"
            "def register(sub): ...\ndef service_addr(): ...\n",
            "client/items.py": "def register_items(sub): ...\ndef cmd_items(args): ...\n",
            "client/forget.py": "def register(sub): ...\ndef cmd_forget(args):\n"
            "    from cli.client.commands import service_addr\n",
        },
    )
    assert borrowed_from_commands(sources) == ["cli.client.forget -> cli.client.commands (service_addr)"]
