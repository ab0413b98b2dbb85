"""The ``foveal`` command line.

Every module of this package that defines ``add_commands(subparsers)`` contributes
sub-commands; each sub-command sets ``func`` (taking the parsed args, returning an exit code or
None). Errors are one line on stderr (``foveal: error: ...``) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pydantic import ValidationError

from ..core.component import format_validation_error


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="foveal",
        description="Attention-based medical segmentation and explanations of vision models.",
    )
    parser.add_argument("--version", action="version", version=f"foveal {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        if hasattr(module, "add_commands"):
            module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        return int(code or 0)
    except KeyboardInterrupt:
        print("foveal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        msg = format_validation_error(e) if isinstance(e, ValidationError) else str(e)
        print(f"foveal: error: {type(e).__name__}: {msg} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
