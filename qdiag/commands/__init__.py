"""The analyses' commands, below the command line: the parser of every analysis subcommand and
the one function that runs a parsed command. ``qdiag.cli`` (the ``qdiag`` program) and
``qdiag.sweep`` (each job of a sweep) both run analyses through here.

    from qdiag import commands
    commands.run(["cliff", "--bits", "4,2", "--out", "results/"])   # the exit code, as the program's
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .. import __version__
from . import analyses, diagnose
from .options import common_options

# Old subcommand names, kept for one release.
ALIASES = {"lens": ["trace"], "causal": ["patch"]}


def parser(extra: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The ``qdiag`` parser with every analysis's subcommand; ``extra(sub)`` adds more (the CLI's sweep)."""
    p = argparse.ArgumentParser(prog="qdiag", description="Why does a quantized LLM fail?")
    p.add_argument("--version", action="version", version=f"qdiag {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, aliases=ALIASES.get(name, []))
        common_options(c)
        c.set_defaults(func=func)
        return c

    analyses.register(command)
    diagnose.register(command)
    diagnose.register_prescribe(command)
    if extra is not None:
        extra(sub)
    return p


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command; bad input it finds (a missing file, a value out of range) is one line on
    stderr and exit code 2."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"qdiag {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def run(argv: list[str]) -> int:
    """Parse and run one analysis command (``argv`` as on the command line, without ``qdiag``)."""
    return execute(parser().parse_args(argv))
