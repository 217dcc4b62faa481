"""The `tinygpt` command: parse -> call the engine or a probe -> render (table, --json, plot).

Each family of subcommands lives in its own module here, with a `register(subparsers)` function; a
subcommand's handler returns nothing and prints its result (the probe's result, rendered)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import CLIError, fail

# Modules of subcommands, in the order `--help` lists them. A module that is missing is skipped.
COMMAND_MODULES = ["core", "causal", "reading", "geometry"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinygpt",
        description="A minimal GPT-2 in JAX for interpretability: generate, inspect every intermediate, and "
        "probe. --model takes a hub id (gpt2, gpt2-medium, ...) or a local directory; by default it is the "
        "embedded Shakespeare model, which needs no network.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except CLIError as e:
        return fail(str(e))
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # errors tinygpt raises for bad input or files are one line, exit code 2
        from tinygpt.config import ConfigError
        from tinygpt.model import InputError
        from tinygpt.sites import SiteError

        try:
            from weights import WeightsError
        except ImportError:  # pragma: no cover
            WeightsError = ()
        if isinstance(e, (InputError, SiteError, ConfigError, WeightsError)):
            return fail(str(e))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
