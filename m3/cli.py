"""The `m3` command.

Each verb is a small function that imports what it needs only when it runs, so that
`m3 --help` answers without loading torch or Lightning. User errors (`m3.errors.UserError`)
are printed as one message, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from m3.errors import UserError

Verb = Callable[[argparse.Namespace], int]


def _smoke(args: argparse.Namespace) -> int:
    from m3.smoke import smoke

    smoke(preset=args.preset, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the `m3` command (no heavy imports).

    Returns:
        The parser; each sub-command stores its handler in the `handler` attribute.
    """
    parser = argparse.ArgumentParser(
        prog="m3",
        description="Memory³: language modeling with explicit memory.",
    )
    parser.add_argument("--version", action="version", version=f"m3 {_version()}")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    smoke = verbs.add_parser(
        "smoke",
        help="run a model preset with random memories and check cached decoding",
        description=(
            "Build a randomly initialised model, run one forward pass with random explicit "
            "memories, decode with a KV cache and memory swaps, and check that both agree."
        ),
    )
    smoke.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    smoke.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    smoke.set_defaults(handler=_smoke)
    return parser


def _version() -> str:
    from m3 import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `m3` command.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status: 0 on success, 2 for a user error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Verb | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except UserError as error:
        print(f"m3: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m3: interrupted", file=sys.stderr)
        return 130
