"""README.md's reference tables against the code, so neither can drift from the other.

* "Configuration reference": one row per ``VmConfig`` field, in ``VmConfig.fields()`` order,
  with its type, default, allowed values and help text (the help column is
  ``VmConfig.field_help()`` word for word); the value objects' signatures below it.
* "Magics": one row per option of the ``%%vm`` parser (IPython's ``@magic_arguments`` stores
  the argparse parser on the decorated method as ``VmMagics.vm.parser``), with its argument
  spelled as the parser spells it (and the interpreter, its one positional); every ``%vm`` sub-command and every ``%config VmMagics``
  setting is named.
* Every example: each fenced block says its language, and every ``python`` and ``ipython``
  block runs verbatim, in README order, as notebook cells of one real IPython shell (real VMs),
  so a reader can paste each block into a cell of its own.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest
from traitlets import Bool, Enum, Float, Instance, Int, List, Unicode

from supermachine_jupyter.config import (
    AssetPaths,
    MountSpec,
    VmConfig,
    VolumeSpec,
    host_cpu_count,
    host_memory_mib,
)
from supermachine_jupyter.jupyter.magics import VmMagics

README = Path(__file__).resolve().parent.parent / "README.md"


# -- reading the README --------------------------------------------------------------------------

def _section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match[1]


def _cells(line: str) -> list[str]:
    """A markdown table row's cells, with ``\\|`` (a pipe inside a cell) unescaped."""
    inner = line.strip()[1:-1]
    return [cell.strip().replace(r"\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _table(section: str, first_header: str) -> list[list[str]]:
    """Rows (without header and separator) of the table in ``section`` whose first header
    cell is ``first_header``."""
    lines = section.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|") and _cells(line)[0] == first_header:
            rows = []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return rows
    raise AssertionError(f"no table headed {first_header!r} in the README section")


def _code(cell: str) -> str:
    """A cell's text without the backticks of inline code."""
    return cell.replace("`", "").strip()


def _words(text: str) -> str:
    return " ".join(text.split())


# -- the configuration reference -----------------------------------------------------------------

CONFIG_HEADER = ["field", "type", "default", "allowed values", "help"]


@pytest.fixture(scope="module")
def config_rows() -> dict[str, list[str]]:
    section = _section("Configuration reference")
    header = next(_cells(line) for line in section.splitlines() if line.startswith("| field"))
    assert header == CONFIG_HEADER
    rows = _table(section, "field")
    assert all(len(row) == len(CONFIG_HEADER) for row in rows), "a row has the wrong column count"
    names = [_code(row[0]) for row in rows]
    assert len(names) == len(set(names)), f"a field is listed twice: {names}"
    return {name: row for name, row in zip(names, rows)}


def test_every_field_is_in_the_reference_and_nothing_else(config_rows):
    fields = list(VmConfig.fields())
    assert set(config_rows) == set(fields), (
        f"missing from README: {sorted(set(fields) - set(config_rows))}; "
        f"in README but not VmConfig fields: {sorted(set(config_rows) - set(fields))}")
    assert list(config_rows) == fields, "README lists the fields in another order than the code"


def _type_words(trait) -> list[str]:
    """Words the type column must contain for this trait."""
    if isinstance(trait, List):
        words = [f"list[{trait.spec_type.__name__}]"]
    elif isinstance(trait, Instance):
        words = [trait.klass.__name__]
    elif isinstance(trait, Bool):
        words = ["bool"]
    elif isinstance(trait, Int):
        words = ["int"]
    elif isinstance(trait, Float):
        words = ["float"]
    elif isinstance(trait, (Unicode, Enum)):
        words = ["str"]
    else:
        raise TypeError(f"test does not know trait type {type(trait).__name__}")
    if trait.allow_none:
        words.append("None")
    return words


@pytest.mark.parametrize("field", VmConfig.fields())
def test_type_column(config_rows, field):
    cell = _code(config_rows[field][1])
    trait = VmConfig.class_traits()[field]
    for word in _type_words(trait):
        assert word in cell, f"{field}: type {cell!r} should mention {word!r}"


@pytest.mark.parametrize("field", VmConfig.fields())
def test_default_column(config_rows, field):
    cell = _code(config_rows[field][2])
    help_text = VmConfig.field_help()[field]
    if cell.startswith("$"):
        # A default read from the environment: the help text must say which variable.
        assert cell in help_text, f"{field}: default {cell} is not explained by its help text"
        return
    try:
        documented = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        pytest.fail(f"{field}: default {cell!r} is neither a Python literal nor $VARIABLE")
    assert documented == VmConfig().trait_defaults(field), \
        f"{field}: README default {documented!r}, code {VmConfig().trait_defaults(field)!r}"


@pytest.mark.parametrize("field", VmConfig.fields())
def test_allowed_values_column(config_rows, field):
    """Every limit the code's own error message states (other than this host's RAM and CPU
    count) and every quoted choice appears in the README."""
    from supermachine_jupyter.config import _allowed

    cell = config_rows[field][3]
    assert cell, f"{field}: allowed values are empty"
    allowed = _allowed(field)
    host_specific = {str(host_memory_mib()), str(host_cpu_count())}
    numbers = set(re.findall(r"\d+", allowed)) - host_specific
    for number in numbers:
        assert re.search(rf"(?<![\d.]){number}(?![\d.])", cell), \
            f"{field}: the code allows {allowed!r}; README's {cell!r} lacks {number}"
    for choice in re.findall(r"'([^']+)'", allowed):
        assert choice in cell, f"{field}: the code allows {allowed!r}; README lacks {choice!r}"


@pytest.mark.parametrize("field", VmConfig.fields())
def test_help_column_is_the_field_help(config_rows, field):
    assert _words(config_rows[field][4]) == _words(VmConfig.field_help()[field]), (
        f"{field}: README help differs from VmConfig.field_help()[{field!r}]")


@pytest.mark.parametrize("spec_type", [VolumeSpec, MountSpec, AssetPaths])
def test_value_object_signatures(spec_type):
    parts = []
    for field in dataclasses.fields(spec_type):
        if field.default is dataclasses.MISSING:
            parts.append(field.name)
        else:
            parts.append(f"{field.name}={field.default!r}")
    signature = f"{spec_type.__name__}({', '.join(parts)})"
    section = _words(_section("Configuration reference").replace("`", ""))
    assert signature in section, f"README's configuration reference should show {signature}"


# -- the magics ----------------------------------------------------------------------------------

def _vm_options() -> dict[str, argparse.Action]:
    parser = VmMagics.vm.parser
    options = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            # The one positional, the interpreter after the options: README's row spells it
            # as the parser's metavar ("INTERPRETER [ARGS]").
            assert action.dest == "interpreter", f"%%vm has a positional {action.dest!r}"
            options[action.metavar.split()[0]] = action
            continue
        options[max(action.option_strings, key=len)] = action
    return options


@pytest.fixture(scope="module")
def option_rows() -> dict[str, str]:
    """``{option: its argument as README spells it}`` from the ``%%vm`` options table."""
    rows = _table(_section("Magics"), "`%%vm` option")
    documented = {}
    for row in rows:
        assert len(row) == 2 and row[1], f"row {row} should be: | `--option ARG` | meaning |"
        option, _, argument = _code(row[0]).partition(" ")
        assert option not in documented, f"{option} is listed twice"
        documented[option] = argument.strip()
    return documented


def test_every_vm_option_is_documented_and_nothing_else(option_rows):
    options = _vm_options()
    assert set(option_rows) == set(options), (
        f"missing from README: {sorted(set(options) - set(option_rows))}; "
        f"in README but not accepted by %%vm: {sorted(set(option_rows) - set(options))}")


@pytest.mark.parametrize("option", sorted(_vm_options()))
def test_vm_option_argument_is_spelled_as_the_parser_does(option_rows, option):
    action = _vm_options()[option]
    documented = option_rows.get(option)
    if documented is None:
        pytest.fail(f"{option} is not in README's %%vm options table")
    if not action.option_strings:
        assert documented == " ".join(action.metavar.split()[1:]), \
            f"{option}: README {documented!r}, parser {action.metavar!r}"
    elif action.nargs == 0:
        assert documented == "", f"{option} takes no argument, README shows {documented!r}"
    elif action.choices:
        assert documented.split("|") == [str(c) for c in action.choices], \
            f"{option}: README {documented!r}, parser choices {list(action.choices)}"
    else:
        expected = action.metavar or action.dest.upper()
        assert documented == expected, f"{option}: README {documented!r}, parser {expected!r}"


def _line_subcommands() -> set[str]:
    """The ``%vm`` sub-commands, from the line magic's docstring ("%vm list | stop NAME…")."""
    doc = VmMagics.vm_line.__doc__.strip().splitlines()[0]
    assert doc.startswith("%vm "), doc
    return {part.split()[0] for part in doc[len("%vm "):].split("|")}


def test_every_line_magic_command_is_documented():
    section = _section("Magics")
    documented = set(re.findall(r"`%vm (\w+)", section))
    assert documented == _line_subcommands(), (
        f"README names %vm {sorted(documented)}; the line magic has {sorted(_line_subcommands())}")


def test_every_magic_setting_is_documented():
    section = _section("Magics")
    settings = set(VmMagics.class_traits(config=True))
    named = set(re.findall(r"`(\w+)`", section)) | set(re.findall(r"VmMagics\.(\w+)", section))
    assert settings <= named, f"%config VmMagics settings missing from README: {settings - named}"
    for referenced in re.findall(r"VmMagics\.(\w+)", section):
        assert referenced in settings, f"README names VmMagics.{referenced}, which does not exist"


# -- the examples --------------------------------------------------------------------------------

#: Languages a README block may have: the runnable ones, and a file tree.
RUNNABLE = ("python", "ipython")
LANGUAGES = (*RUNNABLE, "text")


def _blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block of README.md."""
    blocks, language, code, start = [], None, [], 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, code, start = line[3:].strip(), [], number
            else:
                blocks.append((language, "\n".join(code) + "\n", start))
                language = None
        elif language is not None:
            code.append(line)
    assert language is None, f"README.md: the block opened at line {start} is never closed"
    return blocks


def test_every_block_says_its_language():
    for language, code, line in _blocks():
        assert language in LANGUAGES, (
            f"README.md line {line}: a block marked {language!r}; mark it one of {LANGUAGES} "
            "(python and ipython blocks are run by the tests)")


def test_each_ipython_block_is_one_cell():
    """A cell magic must open its block: ``%load_ext`` and ``%%vm`` in one block is a
    SyntaxError when pasted into one cell."""
    for language, code, line in _blocks():
        if language != "ipython":
            continue
        assert "\n%%" not in code, f"README.md line {line}: a cell magic in mid-block"


def test_readme_examples_run_verbatim():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    from supermachine_jupyter.snapshots import cache

    shell = start_ipython() or InteractiveShell.instance()
    examples = [(language, code, line) for language, code, line in _blocks()
                if language in RUNNABLE]
    assert len(examples) >= 8, "README lost its examples"
    try:
        for _, code, line in examples:
            result = shell.run_cell(code)
            assert result.success, (f"README.md line {line} failed: "
                                    f"{result.error_before_exec or result.error_in_exec}\n{code}")
        magics = shell._supermachine_magics
        # What the examples claim, checked on what they left behind.
        assert magics.vms["lab1"].memory_mib == 512 and magics.vms["lab1"].vcpus == 2
        assert "bin" in shell.user_ns["listing"].split() and "nowhere" in shell.user_ns["problems"]
        job = magics.jobs[-1]
        assert job.wait(60).exit_code == 0
        assert shell.user_ns["log"] == "step 1\nstep 2\nstep 3\n"
    finally:
        shell.run_line_magic("vm", "stop --all")
        cache.wait_for_background(timeout=60)
