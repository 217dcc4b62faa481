"""What every subcommand shares: the model and prompt arguments, loading, JSON output, errors."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from tinygpt.arguments import SEED_RANGE, check_float, check_int
from tinygpt.errors import InputError, OutputError, TinyGPTError, require
from tinygpt.files import check_output_file
from tinygpt.interrupts import InterruptLatch  # noqa: F401  (re-exported for the commands)


class CLIError(TinyGPTError):
    """A problem with the command's arguments or inputs: printed as one line, exit code 2."""


def fail(message: str) -> int:
    print(f"tinygpt: error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, always
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with tinygpt's error format: one line `tinygpt: error: ...` naming the flag, exit code 2
    (argparse's own prints the usage first). Subcommands' parsers are of this class too."""

    def error(self, message):
        command = self.prog.removeprefix("tinygpt").strip()
        fail(f"{command}: {message}" if command else message)
        self.exit(2)


# ---------------------------------------------------------------------------------- errors and interrupts


def cli_message(error, flags: dict[str, str] | None = None) -> str:
    """An error's message in the command's terms: a probe's error about an API argument
    (`probes.harvest.argument_error`) names the command's flag for it instead, when `flags` maps the argument
    ({"steps": "--steps"}); any other error, its own message."""
    argument = getattr(error, "argument", None)
    if flags and argument in flags and hasattr(error, "template"):
        return error.template.format(argument=flags[argument], **error.values)
    return str(error)


def probe_errors(fn=None, *, flags: dict[str, str] | None = None):
    """Turn tinygpt's errors (bad input, damaged artifacts, a missing corpus package, a locked output) into
    one-line CLI errors, naming the command's flags (`cli_message`)."""
    if fn is None:
        return lambda fn: probe_errors(fn, flags=flags)

    def wrapped(args):
        try:
            return fn(args)
        except CLIError:
            raise
        except TinyGPTError as e:
            raise CLIError(cli_message(e, flags)) from None

    return wrapped


# -------------------------------------------------------------------------------------------- option types
# Every numeric option takes one of these types (tests/test_cli_options.py walks the parser to make sure):
# each refuses, while the command line is parsed and so before any work, what the option cannot mean (NaN,
# infinities, negatives, zero counts, absurd sizes), with argparse's "argument --FLAG: ..." naming the flag.
# The bounds are the API's own (tinygpt.arguments.check_int / check_float), so both refuse the same values.

INT_LIMIT = 2**31 - 1  # no count, size or index of a GPT-2 run comes near it


class Number:
    """An argparse type for an int or a finite float within bounds."""

    def __init__(self, kind, low=None, high=None, *, low_open=False, high_open=False, name=None):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = name or kind.__name__  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            value = self.kind(text.strip())
        except ValueError:
            word = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {word}, got {text!r}") from None
        try:
            if self.kind is int:
                value = check_int(value, "value", low=self.low, high=self.high)
                if abs(value) > INT_LIMIT:
                    raise argparse.ArgumentTypeError(f"{value} is out of range (more than {INT_LIMIT} in size)")
                return value
            return check_float(value, "value", low=self.low, high=self.high, low_open=self.low_open,
                               high_open=self.high_open)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    def __repr__(self):
        return f"Number({self.__name__})"


count = Number(int, 1, name="count")  # how many: steps, tokens, samples, rows (>= 1)
natural = Number(int, 0, name="natural")  # an index (layer, head, neuron) or a count where 0 means none
integer = Number(int, name="integer")  # a position: negative counts from the end
seed = Number(int, *SEED_RANGE, name="seed")  # jax's PRNGKey keeps 32 bits
real = Number(float, name="real")  # any finite number (coefficients, values)
nonnegative = Number(float, 0.0, name="nonnegative")  # temperatures, thresholds, L1 coefficients
positive = Number(float, 0.0, low_open=True, name="positive")  # learning rates, noise levels
probability = Number(float, 0.0, 1.0, low_open=True, name="probability")  # top-p: (0, 1]


def output_file(flag: str, suffixes: tuple[str, ...] | None = None):
    """An argparse type for a file the command will write: its directory exists and is writable (checked
    while parsing, so a typo fails at once, not after the computation)."""

    def parse(text: str):
        try:
            return str(check_output_file(text, flag, suffixes=suffixes))
        except OutputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None

    parse.__name__ = "path"
    return parse


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")
_plot_file = output_file("--plot", PLOT_SUFFIXES)


def plot_file(text: str):
    """--plot PATH: a writable path with an image extension matplotlib writes, and matplotlib installed."""
    path = _plot_file(text)
    try:
        require("matplotlib", "plot", "--plot")
    except TinyGPTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


plot_file.__name__ = "path"


def add_plot_arg(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--plot", type=plot_file, default=None, metavar="PATH.png",
                        help=f"{help} (.png, .pdf, .svg, ...; needs matplotlib)")


def save_plot(fig, path: str) -> None:
    """Write a figure of `probes.plots` to --plot's path and say so: the one confirmation line of every
    command, on stderr (stdout stays the table or the JSON)."""
    from probes import plots

    plots.save(fig, path)
    print(f"plot written to {path}", file=sys.stderr)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="ID_OR_DIR",
                        help="hub id (gpt2, gpt2-medium, openai-community/gpt2, ...) or a local directory with "
                             "config.json + model.safetensors, or 'organism' (the trained organism, docs/organisms.md); "
                             "default: the embedded Shakespeare model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default float32)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def add_process_args(parser: argparse.ArgumentParser) -> None:
    """The settings of a run over several processes (tinygpt.distributed, docs/distributed.md): the same
    command runs on every host, each with its own --process-id, or with the settings in the environment."""
    group = parser.add_argument_group("several processes (docs/distributed.md)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0, the same for every process (default: $TINYGPT_COORDINATOR)")
    group.add_argument("--num-processes", type=count, default=None, metavar="N",
                       help="how many processes take part (default: $TINYGPT_NUM_PROCESSES)")
    group.add_argument("--process-id", type=natural, default=None, metavar="I",
                       help="this process's id, 0 to N - 1 (default: $TINYGPT_PROCESS_ID)")


def join_processes(args) -> None:
    """Join the other processes (`tinygpt.distributed.initialize`) when the command takes the process
    settings and they are given, as flags or in the environment; otherwise nothing: one process."""
    if not hasattr(args, "process_id"):
        return
    from tinygpt import distributed

    given = (args.coordinator, args.num_processes, args.process_id)
    names = (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID)
    if all(value is None for value in given) and not any(os.environ.get(name) for name in names):
        return
    try:
        distributed.initialize(*given)
    except InputError as e:
        raise CLIError(f"{e} (flags: --coordinator, --num-processes, --process-id)") from None


def add_prompt_args(parser: argparse.ArgumentParser, *, nargs=None) -> None:
    """A positional PROMPT (text), or --tokens 12,7,99 for checkpoints without a tokenizer."""
    parser.add_argument("prompt", nargs=nargs or "?", default=None, metavar="PROMPT", help="prompt text")
    parser.add_argument("--tokens", default=None, metavar="IDS",
                        help="comma-separated token ids instead of PROMPT (e.g. --tokens 12,7,99)")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def load_model(args):
    """The model of --model / --dtype / --revision; first, for a command taking the process settings, this
    process joins the others when they are given (`join_processes`)."""
    import tinygpt

    join_processes(args)

    return tinygpt.load(args.model, dtype=args.dtype, revision=getattr(args, "revision", None))


def parse_token_list(text: str, flag: str = "--tokens") -> list[int]:
    """Comma-separated integers given to `flag` (token ids, positions, ...)."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError(f"{flag} is empty")
    if any(abs(i) > INT_LIMIT for i in ids):
        raise CLIError(f"{flag}: {next(i for i in ids if abs(i) > INT_LIMIT)} is out of range")
    return ids


def prompt_ids(model, prompt: str | None, tokens: str | None, *, what: str = "PROMPT",
               tokens_flag: str = "--tokens") -> list[int]:
    """Token ids of the prompt (text through the model's tokenizer, or token ids given to `tokens_flag`),
    checked against the vocabulary and context. `what` names the text argument in messages."""
    if tokens is not None and prompt is not None:
        raise CLIError(f"give either {what} or {tokens_flag}, not both")
    if tokens is not None:
        ids = parse_token_list(tokens, tokens_flag)
        where = tokens_flag
    elif prompt is not None:
        if model.tokenizer is None:
            raise CLIError(f"model {model.source!r} has no tokenizer (vocab.json/merges.txt); use {tokens_flag} "
                           "12,7,99")
        ids = model.tokenizer.encode(prompt)
        if not ids:
            raise CLIError(f"{what} is empty")
        where = what
    else:
        raise CLIError(f"give a {what} or {tokens_flag}")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise CLIError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    if len(ids) > model.config.n_ctx:
        raise CLIError(f"{where}: {len(ids)} tokens is longer than the model's context n_ctx={model.config.n_ctx}")
    return ids


def add_token_arg(parser, name: str, what: str) -> None:
    """--NAME TEXT (one token of the model's tokenizer) or --NAME-id ID."""
    parser.add_argument(f"--{name}", default=None, metavar="TEXT", help=f"{what}, as text that is one token")
    parser.add_argument(f"--{name}-id", type=natural, default=None, metavar="ID", help=f"{what}, as a token id")


def token_arg(model, text: str | None, token_id: int | None, flag: str) -> int | None:
    """The single token id given as --FLAG TEXT or --FLAG-id ID (None when neither is given)."""
    if text is not None and token_id is not None:
        raise CLIError(f"give either --{flag} or --{flag}-id, not both")
    if token_id is not None:
        if not 0 <= token_id < model.config.vocab_size:
            raise CLIError(f"--{flag}-id {token_id} is outside the vocabulary [0, {model.config.vocab_size})")
        return token_id
    if text is None:
        return None
    if model.tokenizer is None:
        raise CLIError(f"model {model.source!r} has no tokenizer: use --{flag}-id ID")
    text = unescape(text, f"--{flag}")
    ids = model.tokenizer.encode(text)
    if len(ids) != 1:
        raise CLIError(f"--{flag} {text!r} is {len(ids)} tokens {model.tokenizer.pieces(ids)}; give one token "
                       f"(mind the leading space) or --{flag}-id")
    return ids[0]


def unescape(text: str, flag: str) -> str:
    """`text` with Python's backslash escapes read (`--target "\\n"` is a newline; `\\\\` a backslash), so a
    token that a shell cannot type is written as it prints."""
    if "\\" not in text:
        return text
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise CLIError(f"{flag} {text!r}: {e.reason} (write a backslash as \\\\)") from None


def pieces(model, ids) -> list[str]:
    return model.token_texts(ids)


def decode(model, ids) -> str:
    return model.text(ids)


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def print_json(obj) -> None:
    print(json.dumps(to_jsonable(obj), ensure_ascii=False, indent=1))


def table(rows: list[list], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, (float, np.floating)):
        return f"{c:.4g}"
    return str(c)
