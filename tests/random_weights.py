"""Random GPT-2 weights for property tests: O(1) activations, attention far from uniform, random LayerNorm
weights and non-zero biases, so that no identity holds by accident of zeros or ones."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tinygpt.params import param_shapes


def random_params(config, seed, spread: float = 0.2):
    """Embeddings std 1; W_Q, W_K std 2/sqrt(d_model) (attention scores of std ~4); other projections unit
    gain; LayerNorm weights 1 + spread * N(0, 1); biases spread * N(0, 1). Drawn with numpy (no compile)."""
    rng = np.random.default_rng(seed)
    D, M = config.d_model, config.d_mlp
    std = {"wte": 1.0, "wpe": 1.0, "W_Q": 2 / np.sqrt(D), "W_K": 2 / np.sqrt(D), "W_V": 1 / np.sqrt(D),
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

    return walk(param_shapes(config))
