"""The docs hold against the code: docs/architecture.md's package list, dependency line and command groups;
every ``docs/methods.md, <Section>`` citation in the source names a heading of docs/methods.md."""

import importlib
import re
from pathlib import Path

import selfprompt
from selfprompt.cli import COMMANDS

from test_architecture import GRAPH

SRC = Path(selfprompt.__file__).parent
DOCS = Path(__file__).resolve().parents[1] / "docs"
ARCHITECTURE = (DOCS / "architecture.md").read_text()
METHODS = (DOCS / "methods.md").read_text()


def package_block() -> str:
    section = ARCHITECTURE[ARCHITECTURE.index("## Packages") :]
    start = section.index("```\n") + 4
    return section[start : section.index("\n```", start)]


def test_the_package_list_names_every_top_level_package_and_module_and_nothing_else():
    listed = {line.split()[0].rstrip("/") for line in package_block().splitlines() if line[:1].strip()}
    present = {
        p.stem if p.suffix == ".py" else p.name
        for p in SRC.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    listed = {name.removesuffix(".py") for name in listed}
    assert sorted(listed - present) == [], "listed in docs/architecture.md but gone"
    assert sorted(present - listed) == [], "in src/selfprompt but not listed in docs/architecture.md"


def test_the_command_groups_are_the_cli_modules_that_contribute_commands():
    line = re.search(r"one module per command group \(([^)]*)\)", " ".join(package_block().split()))
    listed = {name.strip() for name in line.group(1).split(",")}
    groups = {
        path.stem: importlib.import_module(f"selfprompt.cli.{path.stem}")
        for path in (SRC / "cli").glob("*.py")
        if path.stem != "__init__"
    }
    groups = {name: module.COMMANDS for name, module in groups.items() if hasattr(module, "COMMANDS")}
    assert listed == set(groups)
    assert sorted(c.name for commands in groups.values() for c in commands) == sorted(COMMANDS)


def test_the_dependency_chain_runs_down_only():
    arrows = " ".join(ARCHITECTURE[ARCHITECTURE.index("Arrows:") :].split("\n\n")[0].split())
    chain = [name.strip(" `") for name in re.search(r"`([^`]*->[^`]*)`", arrows).group(1).split("->")]

    def imports(package: str) -> set[str]:
        found = set()
        for module, targets in GRAPH.items():
            if module == f"selfprompt.{package}" or module.startswith(f"selfprompt.{package}."):
                found |= {t.split(".")[1] for t in targets if t != "selfprompt"}
        return found - {package}

    assert all((SRC / name).is_dir() or (SRC / f"{name}.py").is_file() for name in chain)
    upward = [(low, high) for i, high in enumerate(chain) for low in chain[i + 1 :] if high in imports(low)]
    assert upward == [], "a package imports one to its left in docs/architecture.md's Arrows line"
    mentioned = set(re.findall(r"`(\w+)`", arrows))
    present = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} | {
        p.stem for p in SRC.glob("*.py") if not p.stem.startswith("_")
    }
    assert sorted(mentioned - present) == []


HEADINGS = {line.lstrip("#").strip() for line in METHODS.splitlines() if re.match(r"#{2,4} ", line)}
CITATION = re.compile(r"docs/methods\.md,\s+")


def cited_sections(text: str) -> list[str]:
    """The heading each ``docs/methods.md, <Section>`` citation starts with (the longest that fits), or the
    text that follows when none fits; ``... and <Section>`` continuations count too."""
    found = []
    for match in CITATION.finditer(text):
        rest = text[match.end() :]
        while True:
            fits = [h for h in HEADINGS if rest.startswith(h) and not rest[len(h) : len(h) + 1].isalnum()]
            if not fits:
                found.append(rest[:40])
                break
            heading = max(fits, key=len)
            found.append(heading)
            rest = rest[len(heading) :]
            if not rest.startswith(" and ") or not any(rest[5:].startswith(h) for h in HEADINGS):
                break
            rest = rest[5:]
    return found


def test_every_methods_doc_citation_in_the_source_names_a_heading_and_none_cites_the_old_notes():
    files = [*SRC.rglob("*.py"), *SRC.rglob("*.yaml")]
    cited = {f"{p.relative_to(SRC)}: {s}" for p in files for s in cited_sections(p.read_text())}
    assert cited, "no citation found: the pattern is wrong"
    assert sorted(c for c in cited if c.split(": ", 1)[1] not in HEADINGS) == []
    assert [str(p.relative_to(SRC)) for p in files if "METHODS.md" in p.read_text()] == []


def test_the_citation_reader_finds_headings_and_refuses_others():
    assert cited_sections("(docs/methods.md, LoRA and AdaptFormer); x") == ["LoRA", "AdaptFormer"]
    assert cited_sections("see docs/methods.md,\nSSF.") == ["SSF"]
    assert cited_sections("docs/methods.md, Nowhere") == ["Nowhere"]
