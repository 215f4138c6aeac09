"""The package's shape: no import cycles (function-level imports included), a top level that holds only the
public API, the CLI entry and what is shared, and no method name checked outside ``selfprompt.methods``."""

import ast
import re
from pathlib import Path

import selfprompt

SRC = Path(selfprompt.__file__).parent
TOP_LEVEL = {
    # modules: the public API, the CLI entry and what several packages share
    "__init__.py", "__main__.py", "_torchvision_compat.py", "adapter.py", "atomic.py", "card.py", "config.py",
    "hub.py", "model.py", "pictures.py", "safe_yaml.py", "tta_config.py", "version.py",
    # packages, arrows pointing down: cli -> apps -> engine, pretrain, serving -> config -> methods -> model,
    # init, backbones, analysis -> data
    "analysis", "apps", "backbones", "cli", "data", "engine", "init", "methods", "pretrain", "serving",
    "zoo",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    """Every selfprompt module ``name`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_function_level_imports_and_finds_a_cycle():
    assert "selfprompt.engine.run" in GRAPH["selfprompt.cli.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_import_cycle():
    assert cycles(GRAPH) == []


def test_no_cycle_between_top_level_packages():
    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        if name == "selfprompt":
            continue  # the public API re-exports from everywhere
        packages.setdefault(top(name), set()).update(top(t) for t in targets if top(t) != top(name))
    assert cycles(packages) == []


def test_nothing_inside_imports_the_public_api_module():
    assert [name for name, targets in GRAPH.items() if "selfprompt" in targets and name != "selfprompt"] == []


def test_top_level_holds_only_the_api_the_cli_entry_and_what_is_shared():
    entries = {p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert entries == TOP_LEVEL


def test_no_method_name_is_checked_outside_the_methods_package():
    pattern = re.compile(r"""(startswith|endswith)\(\s*["'](vpt|spt|linear|full|bitfit|deep|shallow)""")
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if "methods" not in path.relative_to(SRC).parts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
