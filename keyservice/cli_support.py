"""The typer side of the three CLIs (fusion-keys, fusion-archiver, fusion-client): the entry
point that turns every failure into one sentence and an exit code (keyservice.exits), help
text, ``--version`` and old option spellings. Imported by the CLI modules only: the libraries
(keyservice, client's viewer library) never import typer.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import typer
from typer.main import get_command_name

from keyservice.exitcodes import ExitCode
from keyservice.exits import failure, version
from keyservice.text import printable

__all__ = ["add_version_option", "hidden_aliases", "only_invoked", "run", "say", "tidy_help",
           "unwrap"]


def add_version_option(app: typer.Typer, prog: str) -> None:
    """``PROG --version``: print the version and exit (before any command runs)."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {version()}")
            raise typer.Exit()

    @app.callback()
    def _root(_version: bool = typer.Option(
            False, "--version", callback=show, is_eager=True,
            help="Print the version and exit.")) -> None:
        pass


def hidden_aliases(app: typer.Typer, aliases: Mapping[str, str]) -> None:
    """Old option spellings that keep working (scripts use them) but are not shown in help:
    ``aliases`` maps an old long option name to the current one, without the dashes
    ("url": "archiver" makes ``--url X`` mean ``--archiver X`` in every command of ``app``)."""
    settings = dict(app.info.context_settings or {})
    # click normalizes every option name, declared or given, through this function.
    settings["token_normalize_func"] = lambda name: aliases.get(name, name)
    app.info.context_settings = settings


def unwrap(text: str) -> str:
    """Help text without the line breaks of source code: paragraphs (blank lines) are kept,
    lines within one are joined, so that help is wrapped to the terminal, not to the source."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def tidy_help(app: typer.Typer) -> None:
    """Every command of ``app`` (and its groups) gets its docstring, unwrapped, as help."""
    for command in app.registered_commands:
        text = command.help or (command.callback.__doc__ if command.callback else None)
        if text:
            command.help = unwrap(text)
    for group in app.registered_groups:
        if group.help:
            group.help = unwrap(group.help)
        if group.typer_instance is not None:
            if group.typer_instance.info.help:
                group.typer_instance.info.help = unwrap(group.typer_instance.info.help)
            tidy_help(group.typer_instance)


def say(prog: str, message: str) -> None:
    # Messages quote tokens, certificates and the Archiver: never let them drive the terminal.
    typer.echo(f"{prog}: {printable(message, newlines=True)}", err=True)


def only_invoked(app: typer.Typer, args: Sequence[str]) -> typer.Typer:
    """``app`` with only the command (or group, and in it the command) that ``args`` names
    first; ``app`` itself when they name none (help, --version, a mistyped command).

    typer turns every registered command into a click command, reading each one's signature
    and evaluating its annotations, whenever any of them runs: about 10 ms of CPU for
    fusion-client's commands before ``play`` starts. The command that runs is built exactly as
    before, with the same callback (--version), context settings (old option spellings) and
    name, so its options, help and usage errors are the same (issue 23: start-up)."""
    if not args:
        return app
    first = args[0]
    for command in app.registered_commands:
        name = command.name or (get_command_name(command.callback.__name__)
                                if command.callback is not None else None)
        if name == first:
            reduced = copy.copy(app)
            reduced.registered_commands, reduced.registered_groups = [command], []
            return reduced
    for group in app.registered_groups:
        if group.name == first and group.typer_instance is not None:
            inner = copy.copy(group)
            inner.typer_instance = only_invoked(group.typer_instance, args[1:])
            reduced = copy.copy(app)
            reduced.registered_commands, reduced.registered_groups = [], [inner]
            return reduced
    return app


def run(app: typer.Typer, prog: str, argv: list[str] | None = None) -> NoReturn:
    """The console-script entry point of each CLI."""
    tidy_help(app)
    app = only_invoked(app, sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=argv, prog_name=prog, standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (bad option, missing argument)
        if type(exc).__name__ != "NoArgsIsHelpError":  # the help text was printed already
            exc.show()  # type: ignore[attr-defined]
        raise SystemExit(getattr(exc, "exit_code", ExitCode.USAGE)) from None
    except SystemExit:
        raise
    except BaseException as exc:  # the last line of defence against tracebacks
        message, code = failure(exc)
        say(prog, message)
        raise SystemExit(code) from None
    raise SystemExit(code if isinstance(code, int) else ExitCode.OK)
