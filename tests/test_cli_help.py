"""The three CLIs' help, walked command by command (issue 20, item 6): every option explains
itself, no help text carries the source's line breaks, each group's summary names its real
subcommands, and each concept has one option name in all three CLIs (old spellings are hidden
aliases that keep working)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

import archiver.cli
import client.cli
import keyservice.cli
from fusion_testkit import forkserver

APPS = {"fusion-keys": keyservice.cli.app, "fusion-archiver": archiver.cli.app,
        "fusion-client": client.cli.app}
# One name per concept in the three CLIs.
CONCEPTS = {"the Archiver's URL": "--archiver", "an output file": "--output"}
RETIRED = {"--url": "--archiver", "--out": "--output",  # old spellings: hidden aliases
           "--oaep-hash": "--key-scheme"}


# typer builds on its own copy of click: its classes are reached through typer.core.
Command = Any


def commands(prog: str) -> Iterator[tuple[list[str], Command]]:
    """Every command and group of ``prog``, with its path of names (hidden ones included)."""
    def walk(path: list[str], command: Command) -> Iterator[tuple[list[str], Command]]:
        yield path, command
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                yield from walk([*path, name], sub)

    yield from walk([], typer.main.get_command(APPS[prog]))


ALL = [(prog, path, command) for prog in APPS for path, command in commands(prog)]
IDS = [" ".join([prog, *path]) for prog, path, _ in ALL]


def visible_options(command: Command) -> list[TyperOption]:
    return [p for p in command.params if isinstance(p, TyperOption) and not p.hidden]


@pytest.mark.parametrize(("prog", "path", "command"), ALL, ids=IDS)
def test_every_option_has_help_and_no_help_has_hard_line_breaks(
        prog: str, path: list[str], command: Command) -> None:
    for option in visible_options(command):
        assert option.help and option.help.strip(), f"{prog} {path}: {option.opts} has no help"
        assert "\n" not in option.help, f"{prog} {path}: {option.opts}: a line break in help"
    for argument in (p for p in command.params if isinstance(p, TyperArgument)):
        assert getattr(argument, "help", None), f"{prog} {path}: {argument.name} has no help"
    text = command.help or ""
    if path:
        assert text.strip(), f"{prog} {path}: no help"
    assert "\n" not in text.replace("\n\n", ""), f"{prog} {path}: a line break within a paragraph"
    result = CliRunner().invoke(APPS[prog], [*path, "--help"], prog_name=prog,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in visible_options(command):
        assert option.opts[0] in result.output


@pytest.mark.parametrize(("prog", "path", "command"),
                         [c for c in ALL if isinstance(c[2], TyperGroup) and c[1]],
                         ids=[i for i, c in zip(IDS, ALL, strict=True)
                              if isinstance(c[2], TyperGroup) and c[1]])
def test_group_summaries_name_their_subcommands(prog: str, path: list[str],
                                                command: Command) -> None:
    summary = command.help or ""
    for name, sub in command.commands.items():
        if not sub.hidden:
            assert name in summary, f"{prog} {' '.join(path)}: the summary does not name {name}"


@pytest.mark.parametrize(("prog", "path", "command"), ALL, ids=IDS)
def test_one_name_per_concept(prog: str, path: list[str], command: Command) -> None:
    names = {name for option in visible_options(command) for name in option.opts}
    assert not names & set(RETIRED), f"{prog} {path}: {names & set(RETIRED)} shown"
    for option in visible_options(command):
        if "FUSION_ARCHIVER_URL" == option.envvar:
            assert option.opts[0] == CONCEPTS["the Archiver's URL"], (prog, path, option.opts)
        if option.name in ("out", "output"):
            assert option.opts[0] == CONCEPTS["an output file"] and "-o" in option.opts, \
                (prog, path, option.opts)


def test_old_spellings_still_work() -> None:
    """Scripts written for --url (fusion-archiver) and --out (fusion-keys) keep working."""
    def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return forkserver.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    for spelling in (["--url", "http://127.0.0.1:9"], ["--url=http://127.0.0.1:9"],
                     ["--archiver", "http://127.0.0.1:9"]):
        done = run("archiver", "cameras", "list", *spelling, "--admin-token", "x")
        assert done.returncode == 40 and "127.0.0.1:9" in done.stderr, done.stderr
    # --out and --output reach the same check (the file exists: refused before the token).
    for spelling in ("--out", "--output", "-o"):
        done = run("keyservice.cli", "export", "--token", "pkcs11:token=none", spelling,
                   __file__)
        assert done.returncode == 2 and "already exists" in done.stderr, done.stderr
    # --oaep-hash is the old name of --key-scheme (issue 24): parsed, not "No such option".
    for module, command in (("archiver", ["viewers", "add", __file__]), ("client", ["grant"])):
        for spelling in ("--oaep-hash", "--key-scheme"):
            done = run(module, *command, spelling, "sha1")
            assert done.returncode == 2 and "Missing" in done.stderr, done.stderr
