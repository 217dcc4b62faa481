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
import json
import os
from typing import Any

from .errors import ConfigError




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
        for field in ("n_layer", "n_head", "d_model", "d_head", "d_mlp", "n_ctx", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Config.{field} must be a positive integer, got {value!r}")
        if self.n_head * self.d_head != self.d_model:
            raise ConfigError(
                f"n_head * d_head must equal d_model, got {self.n_head} * {self.d_head} != {self.d_model}"
            )
        if not self.ln_eps > 0:
            raise ConfigError(f"Config.ln_eps must be positive, got {self.ln_eps!r}")

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Config":
        """Build a Config from the dict of a Hugging Face GPT-2 `config.json`.

        Rejects configs of other architectures and GPT-2 options tinygpt does not implement, naming
        the offending key, instead of silently computing something else.
        """
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise ConfigError(
                f"config.json describes model_type={model_type!r}, not a GPT-2 model (model_type 'gpt2')"
            )
        required = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"GPT-2 config.json is missing {', '.join(missing)}")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"activation_function={activation!r} is not supported: tinygpt implements GPT-2's tanh "
                "GELU ('gelu_new')"
            )
        unsupported = {
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "add_cross_attention": False,
            "scale_attn_weights": True,
        }
        for key, expected in unsupported.items():
            if hf.get(key, expected) != expected:
                raise ConfigError(f"config.json sets {key}={hf[key]!r}, which tinygpt does not implement")
        if hf.get("tie_word_embeddings", True) is not True:
            raise ConfigError("config.json sets tie_word_embeddings=false; GPT-2 ties lm_head to wte")
        n_embd, n_head = hf["n_embd"], hf["n_head"]
        if not isinstance(n_embd, int) or not isinstance(n_head, int) or n_head <= 0 or n_embd % n_head:
            raise ConfigError(f"n_embd={n_embd!r} is not divisible by n_head={n_head!r}")
        n_inner = hf.get("n_inner")
        return cls(
            n_layer=hf["n_layer"],
            n_head=n_head,
            d_model=n_embd,
            d_head=n_embd // n_head,
            d_mlp=n_inner if n_inner is not None else 4 * n_embd,
            n_ctx=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Config":
        """Read a Hugging Face GPT-2 `config.json` file."""
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf(hf)

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
