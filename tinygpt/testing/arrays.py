"""Random weights and tokens from a seed, drawn with numpy: no compile per shape, no hypothesis.

`tinygpt.testing.strategies.params` draws a seed and calls `random_params` (token_batches draws its ids one by
one instead, so hypothesis can shrink each, and builds the mask with `left_padding_mask`); tests that hold a
seed already call these directly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..params import Params, check_params, param_shapes


def random_params(config: Config, seed: int, *, spread: float = 0.2, wte_std: float = 1.0) -> Params:
    """GPT-2 params in the official layout (`tinygpt.params`), float32, scaled so that every parameter matters
    and no identity holds by accident of zeros or ones:

    wte          N(0, wte_std^2) (std 1: O(1) embeddings; smaller gives smaller logits)
    wpe          N(0, 1)
    W_Q, W_K     std 2 / sqrt(d_model): attention scores of std ~4, patterns far from uniform
    W_V, W_O     std 1 / sqrt(d_model); W_in std 1 / sqrt(d_model), W_out std 1 / sqrt(d_mlp): unit gain
    LayerNorm    weights 1 + spread * N(0, 1)
    biases       spread * N(0, 1)

    The same (config, seed, spread, wte_std) always gives the same params."""
    rng = np.random.default_rng(seed)
    D, M = config.d_model, config.d_mlp
    std = {"wte": wte_std, "wpe": 1.0, "W_Q": 2 / np.sqrt(D), "W_K": 2 / np.sqrt(D), "W_V": 1 / np.sqrt(D),
           "W_O": 1 / np.sqrt(D), "W_in": 1 / np.sqrt(D), "W_out": 1 / np.sqrt(M)}

    def draw(name, shape):
        if name in std:
            x = std[name] * rng.standard_normal(shape)
        elif name.endswith("_w"):
            x = 1 + spread * rng.standard_normal(shape)
        else:
            x = spread * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    def walk(shapes):
        return {n: walk(s) if isinstance(s, dict) else draw(n, s) for n, s in shapes.items()}

    params = walk(param_shapes(config))
    check_params(params, config)
    return params


def random_tokens(config: Config, seed: int, shape) -> np.ndarray:
    """Token ids uniform over the vocabulary, int32 of `shape`."""
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


def left_padding_mask(pads, seq: int) -> np.ndarray:
    """The attention mask, int32 [len(pads), seq], of rows whose first pads[row] positions are padding."""
    return (np.arange(seq)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)
