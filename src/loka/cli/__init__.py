"""The ``loka`` command line: one module per command group (:mod:`.update`, :mod:`.models`,
:mod:`.evaluate`, :mod:`.data`, :mod:`.kg`, :mod:`.serve`) and what they share (:mod:`.common`). Every command accepts
``--help``; an expected failure prints one line ``error: …`` and exits with status 2."""

from __future__ import annotations

import argparse
import json
import sys

from .. import env
from . import data, evaluate, kg, models, serve, update
from .common import MethodNames, add_threads, os_message


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loka", description="Edit, unlearn and measure what a language model knows."
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
