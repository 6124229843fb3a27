"""docs/cli.md against the tools' option parsers, both ways: every option of a tool's parser appears in the tool's
section of the page, every option the section names exists in the parser, and every tool of the repository has a
section (tests/cli_tools.py finds them)."""

from __future__ import annotations

import argparse
import re

import pytest

from tests.cli_tools import ROOT, SACRED_SCRIPTS, TOOLS, entry_point_modules, tool_module
from util.options import OptionParser

PAGE = ROOT / "docs" / "cli.md"
_SECTION = re.compile(r"^## `(python [^`]+)`[ \t]*$", re.MULTILINE)
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def sections(text: str) -> dict[str, str]:
    """Tool sections of the page: ``prog`` of a ``## `python ...``` heading -> its text up to the next ``## ``."""
    out = {}
    for match in _SECTION.finditer(text):
        end = text.find("\n## ", match.end())
        out[match.group(1)] = text[match.end():end if end != -1 else len(text)]
    return out


def page_options(section: str) -> set[str]:
    """The ``--options`` a section names (anywhere: tables, usage blocks, prose)."""
    return set(_OPTION.findall(section))


def parser_options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(long options without ``--help``, names of the positional arguments as the page writes them)."""
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    positionals = {str(a.metavar or a.dest.upper()) for a in parser._actions if not a.option_strings}
    return options, positionals


def test_helpers_on_hand_made_text() -> None:
    text = ("# Tools\n\nintro --not-a-tool-option\n\n## `python -m a.b`\n\n| `--x-y` | 1 | with `--z` |\n"
            "\n## make targets\n\n`--make-flag`\n\n## `python c.py`\n\n```\npython c.py RUNS [--w]\n```\n")
    assert sections(text) == {"python -m a.b": "\n\n| `--x-y` | 1 | with `--z` |\n",
                              "python c.py": "\n\n```\npython c.py RUNS [--w]\n```\n"}
    assert page_options(sections(text)["python -m a.b"]) == {"--x-y", "--z"}
    parser = argparse.ArgumentParser()
    parser.add_argument("runs")
    parser.add_argument("--w", type=int)
    parser.add_argument("-q", "--quiet", action="store_true")
    assert parser_options(parser) == ({"--w", "--quiet"}, {"RUNS"})


def test_every_command_line_module_is_a_listed_tool() -> None:
    assert entry_point_modules() == {module for module, _ in TOOLS.values()} | SACRED_SCRIPTS


def test_every_tool_has_one_section() -> None:
    text = PAGE.read_text(encoding="utf-8")
    headings = _SECTION.findall(text)
    assert len(headings) == len(set(headings)), "a tool has two sections"
    assert set(headings) == set(TOOLS)


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_the_page_lists_exactly_the_options_of_the_parser(prog: str) -> None:
    parser = tool_module(prog).build_parser()
    assert isinstance(parser, OptionParser) and parser.prog == prog  # one option parser: one-line errors
    options, positionals = parser_options(parser)
    section = sections(PAGE.read_text(encoding="utf-8"))[prog]
    listed = page_options(section) - {"--help"}  # every parser has it; the page may point at it
    assert not options - listed, f"{prog}: options missing from docs/cli.md: {sorted(options - listed)}"
    assert not listed - options, f"{prog}: docs/cli.md names options the parser lacks: {sorted(listed - options)}"
    for name in positionals:
        assert f"`{name}`" in section, f"{prog}: positional argument {name} missing from docs/cli.md"


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_the_command_line_uses_that_parser(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``main([... '--help'])`` prints the help of ``build_parser()``: the parser the page is compared with."""
    module = tool_module(prog)
    with pytest.raises(SystemExit) as stop:
        module.main([*TOOLS[prog][1], "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == module.build_parser().format_help()
