"""The ``loka`` command line: one module per command group (:mod:`.update`, :mod:`.models`,
:mod:`.evaluate`, :mod:`.data`, :mod:`.kg`, :mod:`.serve`) and what they share (:mod:`.common`). Every command accepts
``--help``; an expected failure prints one line ``error: …`` and exits with status 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import NoReturn

from .. import env
from ..version import __version__
from . import data, evaluate, kg, models, serve, update
from .common import MethodNames, add_threads, os_message


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals (a wrong choice, a bad number, a missing or unknown flag) are one
    line on stderr and exit status 2, like every other loka error: ``error: loka edit: --method: invalid
    choice 'x' (choose from ...); see loka edit --help``. Subparsers are made of the same class
    (``add_subparsers`` uses the parent's type), so every command refuses the same way; ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        text = re.sub(r"^argument ", "", message)  # "argument --n: invalid int value: 'abc'" → "--n: ..."
        text = re.sub(r"invalid choice: ", "invalid choice ", text)
        text = " ".join(text.split())  # one line whatever argparse said
        self.exit(2, f"error: {self.prog}: {text}; see {self.prog} --help\n")

    def parse_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but unknown arguments are blamed on the (sub)command that was given them."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _chosen(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest subcommand parser that ``ns`` went through (``loka kg stats`` → its parser)."""
        parser: argparse.ArgumentParser = self
        while True:
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(ns, sub.dest, None) if sub is not None else None
            if sub is None or name not in sub.choices:
                return parser
            parser = sub.choices[name]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="loka", description="Edit, unlearn and measure what a language model knows.")
    p.add_argument(
        "--version", action="version", version=f"loka {__version__}", help="print the version and exit"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress and no log lines but warnings and errors"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods, forgetters = MethodNames(), MethodNames("forget")
    for group in (models, update, evaluate, data, kg, serve):
        group.register(sub, methods, forgetters)
    add_threads(p)
    _verbosity_everywhere(sub)
    return p


def _verbosity_everywhere(sub: argparse._SubParsersAction) -> None:
    """-v/-q after the command too (``loka eval ... -q``); SUPPRESS keeps the value given before it."""
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _verbosity_everywhere(nested[0])
            continue
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
        parser.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="no progress and no log lines but warnings and errors",
        )


def main(argv: list[str] | None = None) -> int:
    from ..errors import LokaError

    parser = build_parser()
    args = parser.parse_args(argv)
    env.setup_logging(args.verbose, args.quiet)
    try:
        if hasattr(args, "threads"):
            env.set_threads(args.threads)
        return int(args.fn(args) or 0)
    except LokaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``loka inspect A | head``): nothing left to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (
        OSError
    ) as e:  # the machine said no: missing, unreadable or unwritable path, full or read-only disk
        print(f"error: {os_message(e)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(
            f"error: a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
            file=sys.stderr,
        )
        return 2
    except json.JSONDecodeError as e:
        print(f"error: a file is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: an input nests too deeply (JSON nested thousands of levels?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; what was written is complete (writes are atomic)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
