"""The `tinygpt` command: parse -> call the engine or a probe -> render (table, --json, plot).

Each family of subcommands lives in its own module here, with a `register(subparsers)` function; a
subcommand's handler returns nothing and prints its result (the probe's result, rendered)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

import tinygpt
from tinygpt import interrupts
from tinygpt.errors import TinyGPTError

from .common import CLIError, InterruptLatch, Parser, fail  # noqa: F401  (CLIError: re-exported)

# Modules of subcommands, in the order `--help` lists them. A module that is missing is skipped.
COMMAND_MODULES = ["core", "causal", "reading", "geometry", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tinygpt",
        description="A minimal GPT-2 in JAX for interpretability: generate, inspect every intermediate, and "
        "probe. --model takes a hub id (gpt2, gpt2-medium, ...) or a local directory; by default it is the "
        "embedded Shakespeare model, which needs no network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {tinygpt.version()}")
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


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that files being written are cleaned up as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit code: 0 success, 2 a bad
    argument, input or file (one line `tinygpt: error: ...` on stderr, never a traceback), 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM). Errors that are tinygpt's own bugs still show their traceback."""
    as_script = argv is None
    if as_script:
        # First, before jax is imported (`import tinygpt` is lazy): during start-up a Ctrl-C is remembered, not
        # raised (raised, it could be dropped by a gc callback or abort an extension's import); `_run` arms it
        # once the arguments are parsed (see tinygpt.interrupts). tinygpt.__main__ did this already.
        interrupts.install()
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = _run(build_parser(), argv, arm=as_script)
        if as_script and InterruptLatch.received:  # the KeyboardInterrupt was swallowed, the command ran on
            code = _interrupted("interrupted", 130)
    except KeyboardInterrupt:
        code = _interrupted("interrupted", 130)
    except Terminated:
        code = _interrupted("terminated", 143)
    if as_script and code in (130, 143):
        # Leave without tearing down the interpreter: XLA's threads may still be running a computation, and
        # Python's shutdown under them can crash (a segfault instead of exit 130). Every file being written
        # has been cleaned up by now (tinygpt.files.atomic_write), and the output streams are flushed.
        os._exit(code)
    return code


def _interrupted(what: str, code: int) -> int:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(f"tinygpt: {what}", file=sys.stderr, flush=True)
    return code


def _run(parser, argv, *, arm: bool = False) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if arm:  # start-up is over (jax imported, arguments parsed): a Ctrl-C from now on raises
        interrupts.arm()
    try:
        args.func(args)
    except TinyGPTError as e:  # bad input, options, files: CLIError, InputError, WeightsError, ...
        return fail(str(e))
    except BrokenPipeError:  # `tinygpt ... | head -1`: the reader left; stop quietly
        _silence_stdout()
        return 0
    except OSError as e:  # the disk, not tinygpt: full, read-only, permission denied while writing
        where = f" {e.filename!r}" if e.filename else ""
        return fail(f"{e.strerror or e}{where}")
    return 0


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so Python's final flush does not fail again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
