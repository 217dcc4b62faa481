"""GPT-2 parameters: a plain pytree (nested dicts) of jax arrays.

Weights are in `x @ W` layout (Hugging Face's Conv1D layout, loaded untransposed); attention weights are
split per head; the blocks' parameters are stacked on a leading `layer` axis so the forward can `lax.scan`
over them. The unembedding is `wte.T`: tied, never copied.

    params = {
        "wte": [vocab, d_model],        "wpe": [n_ctx, d_model],
        "blocks": {
            "ln1_w": [layer, d_model],  "ln1_b": [layer, d_model],
            "W_Q": [layer, head, d_model, d_head],  "b_Q": [layer, head, d_head],   (same for K, V)
            "W_O": [layer, head, d_head, d_model],  "b_O": [layer, d_model],
            "ln2_w": [layer, d_model],  "ln2_b": [layer, d_model],
            "W_in": [layer, d_model, d_mlp],  "b_in": [layer, d_mlp],
            "W_out": [layer, d_mlp, d_model], "b_out": [layer, d_model],
        },
        "lnf_w": [d_model],             "lnf_b": [d_model],
    }

Optionally an explicit, untied unembedding, which `tinygpt.model.unembed` then uses instead of wte.T (the
official checkpoints have none; `probes.transforms` makes one to fold or center weights):

        "W_U": [d_model, vocab],        "b_U": [vocab],
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .errors import InputError

Params = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param_shapes(config: Config) -> dict[str, Any]:
    """The shape of every parameter, in the same nesting as the params pytree."""
    L, H, D, Dh, M = config.n_layer, config.n_head, config.d_model, config.d_head, config.d_mlp
    return {
        "wte": (config.vocab_size, D),
        "wpe": (config.n_ctx, D),
        "blocks": {
            "ln1_w": (L, D),
            "ln1_b": (L, D),
            "W_Q": (L, H, D, Dh),
            "b_Q": (L, H, Dh),
            "W_K": (L, H, D, Dh),
            "b_K": (L, H, Dh),
            "W_V": (L, H, D, Dh),
            "b_V": (L, H, Dh),
            "W_O": (L, H, Dh, D),
            "b_O": (L, D),
            "ln2_w": (L, D),
            "ln2_b": (L, D),
            "W_in": (L, D, M),
            "b_in": (L, M),
            "W_out": (L, M, D),
            "b_out": (L, D),
        },
        "lnf_w": (D,),
        "lnf_b": (D,),
    }


def resolve_dtype(dtype) -> jnp.dtype:
    """Accept "float32" / "bfloat16" / "float16" or a numpy/jax dtype; reject anything else."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dt}")
    return dt


def init_params(config: Config, key: jax.Array, dtype="float32") -> Params:
    """Random parameters with GPT-2's initialisation (see `_init_params`), as one compiled program."""
    return _init_jit(config, str(resolve_dtype(dtype)))(key)


@functools.lru_cache(maxsize=32)
def _init_jit(config: Config, dtype: str):
    return jax.jit(lambda key: _init_params(config, key, dtype))


def _init_params(config: Config, key: jax.Array, dtype="float32") -> Params:
    """Random parameters with GPT-2's initialisation (normal std 0.02, residual projections scaled by
    1/sqrt(2 * n_layer), LayerNorm weights one, biases zero)."""
    shapes = param_shapes(config)
    dt = resolve_dtype(dtype)
    std, proj_std = 0.02, 0.02 / np.sqrt(2 * config.n_layer)
    normal_std = {"wte": std, "wpe": 0.01, "W_Q": std, "W_K": std, "W_V": std, "W_in": std,
                  "W_O": proj_std, "W_out": proj_std}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    # One normal draw for every random weight (a single random-number op compiles far faster than one per
    # parameter), cut into the weights in pytree order.
    sizes = [int(np.prod(shape)) for path, shape in leaves if path[-1].key in normal_std]
    draws = jnp.split(jax.random.normal(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
    out = []
    for path, shape in leaves:
        name = path[-1].key
        if name in normal_std:
            out.append((normal_std[name] * draws.pop(0).reshape(shape)).astype(dt))
        elif name.endswith("_w"):
            out.append(jnp.ones(shape, dt))
        else:
            out.append(jnp.zeros(shape, dt))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_params(params: Params, config: Config) -> None:
    """Raise ValueError naming the first parameter whose presence or shape disagrees with `config`."""
    expected = param_shapes(config)

    def walk(exp, got, prefix):
        if not isinstance(got, dict):
            raise InputError(f"params{prefix} should be a dict, got {type(got).__name__}")
        for name, shape in exp.items():
            if name not in got:
                raise InputError(f"params{prefix} is missing {name!r}")
            if isinstance(shape, dict):
                walk(shape, got[name], f"{prefix}[{name!r}]")
            elif tuple(got[name].shape) != shape:
                raise InputError(
                    f"params{prefix}[{name!r}] has shape {tuple(got[name].shape)}, config expects {shape}"
                )

    walk(expected, params, "")
    if "W_U" in params or "b_U" in params:  # an explicit unembedding comes whole
        unembedding = {"W_U": (config.d_model, config.vocab_size), "b_U": (config.vocab_size,)}
        walk(unembedding, params, "")


def cast(params: Params, dtype) -> Params:
    """All parameters cast to `dtype` ("float32", "bfloat16" or "float16")."""
    dt = resolve_dtype(dtype)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


def n_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def layer_views(blocks: Params) -> tuple[Params, ...]:
    """The stacked blocks as one params dict per layer (no layer axis), for code that runs the layers one
    by one with a Python loop (the KV-cache decode step).

    Inside a compiled `lax.scan`, taking layer l of a stacked weight is a dynamic slice that XLA's CPU
    backend copies, so a scanned single-token step moves every weight twice. Views taken here, outside
    the compiled program, cost nothing on the CPU backend: each one aliases its slice of the stacked
    buffer. On other backends (and for arrays numpy cannot view, or inside a jax transformation) they are
    ordinary slices, i.e. one copy of the block weights while they are alive."""
    n_layer = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    return tuple(jax.tree_util.tree_map(lambda x: _layer_view(x, layer), blocks) for layer in range(n_layer))


def _layer_view(x, layer: int):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and _on_cpu(x):
        host = np.asarray(x)  # the CPU buffer itself, read-only, no copy
        if not host.flags.owndata:
            return host_to_jax(host[layer], x.sharding)
    return x[layer]


_MAY_ALIAS = "may_alias" in inspect.signature(jax.device_put).parameters  # jax >= 0.5


def host_to_jax(x: np.ndarray, device=None) -> jax.Array:
    """A numpy buffer as a jax array on `device` (default: the default device): on the CPU backend the jax
    array aliases the buffer when it is 64-byte aligned (no copy); elsewhere it is copied to the device."""
    return jax.device_put(x, device, may_alias=True) if _MAY_ALIAS else jax.device_put(x, device)


def _on_cpu(x: jax.Array) -> bool:
    """A single-device array on the CPU backend (sharded arrays are sliced instead)."""
    devices = x.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"
