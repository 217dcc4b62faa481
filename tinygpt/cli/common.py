"""What every subcommand shares: the model and prompt arguments, loading, JSON output, errors."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


class CLIError(Exception):
    """A problem with the command's arguments or inputs: printed as one line, exit code 2."""


def fail(message: str) -> int:
    print(f"tinygpt: error: {message}", file=sys.stderr)
    return 2


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="ID_OR_DIR",
                        help="hub id (gpt2, gpt2-medium, openai-community/gpt2, ...) or a local directory with "
                             "config.json + model.safetensors; default: the embedded Shakespeare model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default float32)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def add_prompt_args(parser: argparse.ArgumentParser, *, nargs=None) -> None:
    """A positional PROMPT (text), or --tokens 12,7,99 for checkpoints without a tokenizer."""
    parser.add_argument("prompt", nargs=nargs or "?", default=None, metavar="PROMPT", help="prompt text")
    parser.add_argument("--tokens", default=None, metavar="IDS",
                        help="comma-separated token ids instead of PROMPT (e.g. --tokens 12,7,99)")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def load_model(args):
    import tinygpt

    return tinygpt.load(args.model, dtype=args.dtype, revision=getattr(args, "revision", None))


def parse_token_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise CLIError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--tokens is empty")
    return ids


def prompt_ids(model, prompt: str | None, tokens: str | None, *, what: str = "PROMPT") -> list[int]:
    """Token ids of the prompt (text through the model's tokenizer, or --tokens), checked against the
    vocabulary and context."""
    if tokens is not None and prompt is not None:
        raise CLIError(f"give either {what} or --tokens, not both")
    if tokens is not None:
        ids = parse_token_list(tokens)
    elif prompt is not None:
        if model.tokenizer is None:
            raise CLIError(f"model {model.source!r} has no tokenizer (vocab.json/merges.txt); use --tokens 12,7,99")
        ids = model.tokenizer.encode(prompt)
        if not ids:
            raise CLIError(f"{what} is empty")
    else:
        raise CLIError(f"give a {what} or --tokens")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise CLIError(f"token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    if len(ids) > model.config.n_ctx:
        raise CLIError(f"prompt of {len(ids)} tokens is longer than the model's context n_ctx={model.config.n_ctx}")
    return ids


def add_token_arg(parser, name: str, what: str) -> None:
    """--NAME TEXT (one token of the model's tokenizer) or --NAME-id ID."""
    parser.add_argument(f"--{name}", default=None, metavar="TEXT", help=f"{what}, as text that is one token")
    parser.add_argument(f"--{name}-id", type=int, default=None, metavar="ID", help=f"{what}, as a token id")


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
    ids = model.tokenizer.encode(text)
    if len(ids) != 1:
        raise CLIError(f"--{flag} {text!r} is {len(ids)} tokens {model.tokenizer.pieces(ids)}; give one token "
                       f"(mind the leading space) or --{flag}-id")
    return ids[0]


def pieces(model, ids) -> list[str]:
    ids = [int(i) for i in ids]
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    return model.tokenizer.pieces(ids)


def decode(model, ids) -> str:
    ids = [int(i) for i in ids]
    if model.tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return model.tokenizer.decode(ids)


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
