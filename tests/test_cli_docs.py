"""The README documents the command line as it is: an options table per command generated from
click's own parameters (``python tests/test_cli_docs.py`` rewrites them), the exit codes, and the
pre-commit hook.

Each table sits between ``<!-- options: COMMAND -->`` and ``<!-- /options -->`` in README.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import pytest

from onnxrep import cli

README = Path(__file__).resolve().parent.parent / "README.md"
HOOKS = README.parent / ".pre-commit-hooks.yaml"
_BLOCK = re.compile(r"(<!-- options: (\S+) -->\n)(.*?)(<!-- /options -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _metavar(param: click.Parameter, command: click.Command) -> str:
    """The metavar as --help shows it."""
    ctx = click.Context(command)
    try:
        return param.make_metavar(ctx)
    except TypeError:  # click < 8.2
        return param.make_metavar()


def _names(param: click.Parameter, command: click.Command) -> str:
    if isinstance(param, click.Argument):
        return _metavar(param, command)
    names = ", ".join(param.opts) + "".join(f" / {o}" for o in param.secondary_opts)
    if not param.is_flag and not param.count:
        names += f" {_metavar(param, command)}"
    return names


def _help(param: click.Parameter, command: click.Command) -> str:
    if isinstance(param, click.Argument):
        name = _metavar(param, command).strip("[]")
        text = cli.ARGUMENTS[(command.name, name)]
        return text if param.required else f"Optional. {text}"
    text = param.help or ""
    if param.show_default and param.default is not None and not param.is_flag:
        text += f" Default: {param.default}."
    return text


def options_table(command: click.Command) -> str:
    """The markdown table of a command's arguments and options, in click's order."""
    rows = ["| argument / option | meaning |", "| --- | --- |"]
    for param in command.params:
        if isinstance(param, click.Option) and param.hidden:
            continue
        rows.append(f"| `{_cell(_names(param, command))}` | {_cell(_help(param, command))} |")
    rows.append("| `-h, --help` | Show the help and exit. |")
    return "\n".join(rows) + "\n"


def exit_code_table() -> str:
    rows = ["| code | meaning |", "| --- | --- |"]
    rows += [f"| {code} | {_cell(text)} |" for code, text in cli.EXIT_CODES.items()]
    return "\n".join(rows) + "\n"


def expected_blocks() -> dict[str, str]:
    blocks = {name: options_table(cmd) for name, cmd in cli.main.commands.items()}
    blocks["exit-codes"] = exit_code_table()
    return blocks


def regenerate(text: str) -> str:
    blocks = expected_blocks()
    return _BLOCK.sub(lambda m: m.group(1) + blocks.get(m.group(2), m.group(3)) + m.group(4), text)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_every_command_has_its_options_table_in_the_readme():
    found = {m.group(2): m.group(3) for m in _BLOCK.finditer(README.read_text())}
    expected = expected_blocks()
    missing = sorted(set(expected) - set(found))
    assert not missing, f"README has no options table for {missing} (run: python tests/test_cli_docs.py)"
    stale = sorted(name for name in expected if found[name] != expected[name])
    assert not stale, f"README's tables for {stale} differ from --help (run: python tests/test_cli_docs.py)"
    unknown = sorted(set(found) - set(expected))
    assert not unknown, f"README documents commands that do not exist: {unknown}"


def test_the_tables_name_every_option_of_the_help_text():
    """Each option as the table names it (flags and metavar) is in click's own --help."""
    from helpers import invoke

    for name, cmd in cli.main.commands.items():
        help_text = invoke(name, "--help").stdout
        for param in cmd.params:
            names = _names(param, cmd)
            assert names in help_text, (name, names)
            assert f"| `{_cell(names)}` |" in options_table(cmd)


def test_the_readme_names_each_command_and_exit_code():
    text = README.read_text()
    for name in cli.main.commands:
        assert f"onnxrep {name}" in text, name
    for code in cli.EXIT_CODES:
        assert f"| {code} |" in text


def test_the_passes_table_lists_every_pass_in_run_order():
    from onnxrep import engine

    text = README.read_text()
    section = text[text.index("## Passes"):]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([a-z-]+)` \|", section, re.M)
    assert rows == list(engine.available_passes()), "README's passes table differs from `onnxrep passes`"


def _documented_signatures() -> dict[str, tuple[list[tuple[str, object]], bool]]:
    """The README's Python API table: function name -> ([(parameter, default)], complete), where
    ``complete`` is False for a row that elides parameters with ``...``."""
    import ast

    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for name, params in re.findall(r"^\| `(?:onnxrep\.api\.)?(\w+)\((.*?)\)` \|", section, re.M):
        complete = "..." not in params
        params = ", ".join(p for p in (q.strip() for q in params.split(",")) if p != "...")
        args = ast.parse(f"def f({params}): pass").body[0].args
        positional = args.args
        pos = [(a.arg, None) for a in positional]
        for (arg, _), d in zip(pos[len(pos) - len(args.defaults):], args.defaults):
            pos[[n for n, _ in pos].index(arg)] = (arg, ast.literal_eval(d))
        kw = [(a.arg, None if d is None else ast.literal_eval(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
        rows[name] = (pos + kw, complete)
    return rows


def test_the_python_api_table_matches_the_signatures():
    import inspect

    from onnxrep import api

    rows = _documented_signatures()
    assert {"optimize", "verify", "load", "save", "optimize_file", "inspect"} <= set(rows)
    for name, (documented, complete) in rows.items():
        params = inspect.signature(getattr(api, name)).parameters
        actual = [(p.name, None if p.default is p.empty else p.default) for p in params.values()]
        if complete:
            assert documented == actual, name
        else:
            assert all(item in actual for item in documented), (name, documented)


def test_pre_commit_hook_runs_onnxrep_check_on_onnx_files():
    yaml = pytest.importorskip("yaml")
    hooks = yaml.safe_load(HOOKS.read_text())
    hook = next(h for h in hooks if h["id"] == "onnxrep-check")
    assert hook["entry"] == "onnxrep check"
    assert hook["language"] == "python"
    files = re.compile(hook["files"])
    assert files.search("models/resnet.onnx") and files.search("a.onnx")
    assert not files.search("a.onnx.data") and not files.search("a.onnx.txt") and not files.search("notes.md")
    assert hook.get("pass_filenames", True)  # the files go to `onnxrep check MODEL...`
    assert "id: onnxrep-check" in README.read_text()
    # the entry is the console script of this package, and the command exists
    assert "check" in cli.main.commands


if __name__ == "__main__":
    README.write_text(regenerate(README.read_text()))
    print(f"rewrote the tables in {README}", file=sys.stderr)
