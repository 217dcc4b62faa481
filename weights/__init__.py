"""Getting weights: official Hugging Face GPT-2 checkpoints (hub or local directory, safetensors) and the
embedded default model, into tinygpt's `(Config, params, Tokenizer)`; and writing them back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from .checkpoint import read, write
from .errors import WeightsError
from .hub import ALIASES, HubError, resolve

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
# The models that ship inside the package, by name: `load(NAME)`, `--model NAME`. None is "embedded".
EMBEDDED_MODELS = {"embedded": EMBEDDED_DIR, "organism": Path(__file__).resolve().parent / "organism_lm"}


class Checkpoint(NamedTuple):
    """What a checkpoint holds, in the engine's layout: plain data (`tinygpt.load` builds the Model)."""

    config: Any  # tinygpt.Config
    params: dict  # the params pytree (`tinygpt.params`)
    tokenizer: Any  # tinygpt.Tokenizer, or None for a checkpoint without vocab.json / merges.txt


def load(name_or_path: str | os.PathLike | None = None, *, dtype="float32", revision: str | None = None,
         cache_dir=None, offline: bool | None = None, allow_nonfinite: bool = False):
    """Read a GPT-2 checkpoint: its (config, params, tokenizer) as a `Checkpoint` (`tinygpt.load` makes a Model).

    name_or_path  a local directory (config.json + model.safetensors [+ vocab.json, merges.txt]), a hub id
                  ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "openai-community/gpt2",
                  any GPT-2-architecture repo), a name of EMBEDDED_MODELS ("embedded", "organism": the trained
                  organism of weights.organisms.trained_path()), or None for the embedded default model
    dtype         "float32", "bfloat16" or "float16"
    revision, cache_dir, offline   passed to huggingface_hub (offline also follows HF_HUB_OFFLINE)
    allow_nonfinite  load weights holding NaN or inf (a WeightsError by default: such a model's logits are NaN)

    A damaged config.json raises ConfigError; a damaged or mismatched model.safetensors, vocab.json or
    merges.txt raises WeightsError; each names the file and the problem.
    """
    from tinygpt.params import resolve_dtype

    resolve_dtype(dtype)  # a bad dtype fails before anything is downloaded or read
    name = "embedded" if name_or_path is None else name_or_path
    if isinstance(name, str) and name in EMBEDDED_MODELS and not Path(name).is_dir():
        directory = EMBEDDED_MODELS[name]
        if not (directory / "model.safetensors").is_file():
            raise WeightsError(f"the embedded model {name!r} is missing from {directory}")
    else:
        directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, offline=offline)
    config, params = read(directory, dtype=dtype, allow_nonfinite=allow_nonfinite)
    return Checkpoint(config, params, load_tokenizer(directory, config))


def load_tokenizer(directory: str | os.PathLike, config=None):
    """The directory's tokenizer (vocab.json + merges.txt), or None when the checkpoint ships neither file.

    One of the two without the other is a WeightsError, and so (given the model's `config`) is a tokenizer
    whose ids are not exactly the model's vocabulary: the model could generate ids it cannot decode, or
    the tokenizer produce ids the model has no embedding for."""
    from tinygpt.tokenizer import Tokenizer

    directory = Path(directory)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    present = [os.path.lexists(vocab), os.path.lexists(merges)]
    if not any(present):
        return None
    if not all(present):
        have, lack = (vocab, merges) if present[0] else (merges, vocab)
        raise WeightsError(f"{directory} has {have.name} but no {lack.name}: a GPT-2 tokenizer needs both (or "
                           "neither, to load the model without a tokenizer)")
    tokenizer = Tokenizer.from_files(vocab, merges)
    if config is not None and tokenizer.vocab_size != config.vocab_size:
        raise WeightsError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size:,} tokens (vocab.json) but the model's "
            f"vocab_size is {config.vocab_size:,} (config.json): "
            + (f"ids {tokenizer.vocab_size:,} to {config.vocab_size - 1:,} could be generated and not decoded"
               if tokenizer.vocab_size < config.vocab_size else
               f"ids {config.vocab_size:,} and up have no embedding")
            + "; use the vocab.json made for this model, or load the weights alone: "
            f"tinygpt.Model(*weights.read({str(directory)!r}))"
        )
    return tokenizer


def save(model, directory: str | os.PathLike) -> None:
    """Write `model` in the official HF GPT-2 layout: config.json, model.safetensors (Conv1D layout,
    official names), and vocab.json + merges.txt when the model has a tokenizer."""
    write(directory, model.config, model.params)
    if model.tokenizer is not None:
        model.tokenizer.save(directory)


__all__ = ["Checkpoint", "load", "save", "read", "write", "resolve", "load_tokenizer", "WeightsError", "HubError",
           "ALIASES", "EMBEDDED_DIR"]
