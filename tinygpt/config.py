"""The static shape of a GPT-2 model.

`Config` is a frozen (hashable) dataclass: it is passed to `jax.jit` as a static argument and is never
traced. It is read from, and written back to, a Hugging Face `config.json`.

Dimension names used throughout tinygpt, documented once:

    batch    independent sequences
    seq      query positions (tokens of the sequence being processed)
    key      key positions (the positions a query attends to)
    layer    transformer blocks, stacked on a leading axis
    head     attention heads
    d_model  width of the residual stream
    d_head   width of one head's query/key/value (d_model // n_head)
    d_mlp    width of the MLP hidden layer (4 * d_model in GPT-2)
    vocab    token vocabulary
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from .errors import ConfigError
from .files import read_json

INT_FIELDS = ("n_layer", "n_head", "d_model", "d_head", "d_mlp", "n_ctx", "vocab_size")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    """repr(value), cut to 40 characters (a config.json value may be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_positive_number(value) -> bool:
    """A finite int or float above zero (not a bool, a string, None, NaN or 1e400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        return False


@dataclasses.dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_mlp: int
    n_ctx: int
    vocab_size: int
    ln_eps: float = 1e-5

    def __post_init__(self):
        """Every field of the right type and range, or ConfigError naming the field."""
        for field in INT_FIELDS:
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"Config.{field} must be a positive integer, got {_show(value)}")
        if self.n_head * self.d_head != self.d_model:
            raise ConfigError(
                f"n_head * d_head must equal d_model, got {self.n_head} * {self.d_head} != {self.d_model}"
            )
        if not _is_positive_number(self.ln_eps):
            raise ConfigError(f"Config.ln_eps must be a positive finite number, got {_show(self.ln_eps)}")

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "Config":
        """Build a Config from the dict of a Hugging Face GPT-2 `config.json`.

        The one validation of a config.json: every key tinygpt reads is checked for its type and range, and
        configs of other architectures or with GPT-2 options tinygpt does not implement are rejected, each
        with a ConfigError naming `where` and the key, instead of silently computing something else.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"{where} must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise ConfigError(
                f"{where} describes model_type={_show(model_type)}, not a GPT-2 model (model_type 'gpt2')"
            )
        required = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"GPT-2 {where} is missing {', '.join(missing)}")
        for key in required:
            _check_positive_int(hf, key, where)
        n_inner = hf.get("n_inner")
        if n_inner is not None:
            _check_positive_int(hf, "n_inner", where, or_null=True)
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if not _is_positive_number(eps):
            raise ConfigError(f"{where}: layer_norm_epsilon must be a positive number (GPT-2 uses 1e-05), "
                              f"got {_show(eps)}")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"{where}: activation_function={_show(activation)} is not supported: tinygpt implements GPT-2's tanh "
                "GELU ('gelu_new')"
            )
        flags = {  # GPT-2 options and the only value tinygpt implements
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
        }
        for key, expected in flags.items():
            value = hf.get(key, expected)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {_show(value)}")
            if key == "tie_word_embeddings" and not value:
                raise ConfigError(f"{where} sets tie_word_embeddings=false; GPT-2 ties lm_head to wte")
            if value != expected:
                raise ConfigError(f"{where} sets {key}={value!r}, which tinygpt does not implement")
        n_embd, n_head = hf["n_embd"], hf["n_head"]
        if n_embd % n_head:
            raise ConfigError(f"{where}: n_embd={n_embd} is not divisible by n_head={n_head}")
        return cls(
            n_layer=hf["n_layer"],
            n_head=n_head,
            d_model=n_embd,
            d_head=n_embd // n_head,
            d_mlp=n_inner if n_inner is not None else 4 * n_embd,
            n_ctx=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            ln_eps=float(eps),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Config":
        """Read a Hugging Face GPT-2 `config.json` file: a regular file of at most 64 MB holding a JSON object
        (anything else, e.g. a FIFO, /dev/zero or 100,000 nested brackets, is a ConfigError naming it)."""
        hf = read_json(path, "config file", error=ConfigError)
        return cls.from_hf(hf, where=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict for this shape (GPT2LMHeadModel)."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.d_model,
            "n_inner": self.d_mlp if self.d_mlp != 4 * self.d_model else None,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.ln_eps,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
        }

    @classmethod
    def small(cls, **overrides) -> "Config":
        """GPT-2 small's shape (124M parameters), with optional overrides."""
        base = dict(n_layer=12, n_head=12, d_model=768, n_ctx=1024, vocab_size=50257)
        base.update(overrides)
        base.setdefault("d_head", base["d_model"] // base["n_head"])
        base.setdefault("d_mlp", 4 * base["d_model"])
        return cls(**base)


def _check_positive_int(hf: dict[str, Any], key: str, where: str, *, or_null: bool = False) -> None:
    value = hf[key]
    if not _is_int(value) or value <= 0:
        kind = "a positive integer" + (" or null" if or_null else "")
        raise ConfigError(f"{where}: {key} must be {kind}, got {_show(value)}")
