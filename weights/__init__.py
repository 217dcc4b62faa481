"""Getting weights: official Hugging Face GPT-2 checkpoints (hub or local directory, safetensors) and the
embedded default model, into tinygpt's `(Config, params, Tokenizer)`; and writing them back."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import read, write
from .errors import WeightsError
from .hub import ALIASES, HubError, resolve

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


def load(name_or_path: str | os.PathLike | None = None, *, dtype="float32", revision: str | None = None,
         cache_dir=None, offline: bool | None = None):
    """Load a GPT-2 checkpoint as a `tinygpt.Model`.

    name_or_path  a local directory (config.json + model.safetensors [+ vocab.json, merges.txt]), a hub id
                  ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "openai-community/gpt2",
                  any GPT-2-architecture repo), or None for the embedded default model
    dtype         "float32", "bfloat16" or "float16"
    revision, cache_dir, offline   passed to huggingface_hub (offline also follows HF_HUB_OFFLINE)
    """
    from tinygpt.api import Model
    from tinygpt.params import resolve_dtype

    resolve_dtype(dtype)  # a bad dtype fails before anything is downloaded or read
    if name_or_path is None:
        if not (EMBEDDED_DIR / "model.safetensors").is_file():
            raise WeightsError(f"the embedded default model is missing from {EMBEDDED_DIR}")
        directory, source = EMBEDDED_DIR, "embedded"
    else:
        directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, offline=offline)
        source = str(name_or_path)
    config, params = read(directory, dtype=dtype)
    return Model(config=config, params=params, tokenizer=load_tokenizer(directory, config), source=source)


def load_tokenizer(directory: str | os.PathLike, config=None):
    """The directory's tokenizer (vocab.json + merges.txt), or None when the checkpoint ships none."""
    from tinygpt.tokenizer import Tokenizer

    directory = Path(directory)
    if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        return None
    tokenizer = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    if config is not None and tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )
    return tokenizer


def save(model, directory: str | os.PathLike) -> None:
    """Write `model` in the official HF GPT-2 layout: config.json, model.safetensors (Conv1D layout,
    official names), and vocab.json + merges.txt when the model has a tokenizer."""
    write(directory, model.config, model.params)
    if model.tokenizer is not None:
        model.tokenizer.save(directory)


__all__ = ["load", "save", "read", "write", "resolve", "load_tokenizer", "WeightsError", "HubError",
           "ALIASES", "EMBEDDED_DIR"]
