"""``vtw``: the workbench's single command line.

``vtw fit|validate|test|predict`` hand their arguments to Lightning's ``LightningCLI``; every other
subcommand is looked up in :mod:`workbench.commands` and imported lazily.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workbench.commands import COMMANDS, LIGHTNING_SUBCOMMANDS


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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
