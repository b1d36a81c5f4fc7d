"""``vtw``: the workbench's single command line.

``vtw fit|validate|test|predict`` hand their arguments to Lightning's ``LightningCLI``; every other
subcommand is looked up in :mod:`workbench.commands` and imported lazily. Bad input to those
(``INPUT_ERRORS``) ends with one ``vtw <command>: error: ...`` line and exit code 2; ``VTW_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from workbench.commands import COMMANDS, LIGHTNING_SUBCOMMANDS

# What the workbench raises for bad input (a missing or wrong file, key or checkpoint; the project's
# VolumeError and CheckpointMismatchError are ValueErrors): the CLI reports them in one line, exit code 2.
INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtw",
        description="Vision-token workbench: tokenizers, AR generators, EM Mamba pretraining, token compression.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_line in LIGHTNING_SUBCOMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    for name, (_, help_line) in sorted(COMMANDS.items()):
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from workbench import __version__

        print(f"vtw {__version__}")
        return 0
    if command in LIGHTNING_SUBCOMMANDS:
        from workbench.lightning_cli import run_lightning_cli

        run_lightning_cli([command, *rest])
        return 0
    if command not in COMMANDS:
        _top_parser().print_usage(sys.stderr)
        known = ", ".join([*LIGHTNING_SUBCOMMANDS, *sorted(COMMANDS)])
        print(f"vtw: unknown command {command!r}; known commands: {known}", file=sys.stderr)
        return 2
    module_name, help_line = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"vtw {command}", description=help_line)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except INPUT_ERRORS as err:  # bad files, keys, checkpoints: one line naming them, not a traceback
        if os.environ.get("VTW_DEBUG"):
            raise
        print(f"vtw {command}: error: {err}\n(set VTW_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
