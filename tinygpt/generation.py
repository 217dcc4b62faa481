"""Text generation with a key-value cache, compiled so a whole continuation is one XLA program.

The prompt runs through the reference `forward` (keeping its keys and values); each new token then runs
through `decode_step`, which is the same block (`block_qkv` + `block_attend_mlp`) attending over the
cache. Edits apply to the prompt and to every step, and any sites can be kept for both: the prompt's trace
is a normal `Trace`, the steps' trace is stacked over steps, `[step, layer, batch, 1, ...]`.

Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus), seeded by an explicit seed.
Left-padded batches give the same tokens as single runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from .config import Config
from .model import (
    _at_top_level,
    block_attend_mlp,
    block_qkv,
    check_inputs,
    final_sites,
    forward,
    positions_from_mask,
    project_heads_batched,
    unembed,
)
from .params import layer_views
from .trace import Edits, SiteRecorder, Trace, normalize_edits, normalize_keep


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits, key, sampling: Sampling):
    """Next token ids from logits [batch, vocab] (float32). -> [batch]"""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        # keep the smallest set of most probable tokens whose probability reaches top_p
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop_sorted = mass_before >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@dataclasses.dataclass
class Generation:
    tokens: Any  # [batch, new] the generated ids
    sequences: Any  # [batch, prompt + new] prompt (with its padding) followed by the generated ids
    logits: Any = None  # [batch, new, vocab] the logits each new token was chosen from (return_logits=True)
    prompt_trace: Trace | None = None  # kept sites of the prompt
    step_trace: Trace | None = None  # kept sites of generated tokens fed back: [step, layer, batch, 1, ...]


def decode_step(params, layers, token, position, cache, index, key_valid, config: Config, edits, keep):
    """Run one new token per sequence through the model, attending over the KV cache.

    layers: one params dict per block (`tinygpt.params.layer_views`); token, position [batch];
    cache: per block a pair (k, v) [batch, total, head, d_head]; index: cache slot of this token (a traced
    int); key_valid [batch, total] slots holding real keys (this token's included).
    Returns (logits [batch, vocab], new cache, Trace of this step with per-layer sites stacked [layer, ...]).

    The blocks run in a Python loop over per-layer weights rather than a `lax.scan` over the stacked ones:
    a single token's step reads every weight once and does little else, and a scan's per-layer slice of
    the stacked weights is a copy on XLA's CPU backend (measured: the step ~1.5x slower). The price is a
    compile time that grows with depth (a 12-layer model's `generate` compiles in ~3 s on CPU, a 48-layer
    one in ~11 s); the prompt's forward still scans."""
    outer = SiteRecorder(edits, keep | {"logits"}, None)
    embed = outer("embed", params["wte"][token][:, None])  # [batch, 1, d_model]
    pos_embed = outer("pos_embed", params["wpe"][position][:, None])  # [batch, 1, d_model]
    mask = key_valid[:, None, None, :]  # [batch, 1, 1, total]

    resid = embed + pos_embed  # [batch, 1, d_model]
    new_cache, per_layer = [], []
    for layer, (p, (layer_k, layer_v)) in enumerate(zip(layers, cache)):
        site = SiteRecorder(edits, keep, jnp.asarray(layer, jnp.int32))
        resid_pre, q, k, v = block_qkv(resid, p, site, config.ln_eps, project_heads_batched)
        layer_k = lax.dynamic_update_slice_in_dim(layer_k, k.astype(layer_k.dtype), index, axis=1)
        layer_v = lax.dynamic_update_slice_in_dim(layer_v, v.astype(layer_v.dtype), index, axis=1)
        resid = block_attend_mlp(resid_pre, q, layer_k, layer_v, mask, p, site, config.ln_eps)
        new_cache.append((layer_k, layer_v))
        per_layer.append(site.kept)
    final_sites(resid, params, outer, config.ln_eps)
    logits = outer.kept["logits"][:, -1]
    kept = {name: value for name, value in outer.kept.items() if name in keep}
    stacked = jax.tree_util.tree_map(lambda *values: jnp.stack(values), *per_layer)  # [layer, batch, 1, ...]
    return logits, tuple(new_cache), Trace(**kept, **stacked)


def generate(
    params,
    config: Config,
    tokens,
    max_new_tokens: int,
    *,
    attention_mask=None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    edits: Edits | None = None,
    keep=(),
    return_logits: bool = False,
    on_token: Callable[[int, np.ndarray], None] | None = None,
) -> Generation:
    """Continue `tokens` [batch, seq] (left-padded if `attention_mask` [batch, seq] is given) by
    `max_new_tokens` tokens, with a KV cache, as one compiled program.

    temperature 0 is greedy; top_k / top_p filter before sampling; `seed` fixes the random draws.
    edits  {site: fn(value, layer)} applied to the prompt and to every generated step
    keep   sites to keep for the prompt and the steps (default none)
    on_token  called on the host as `on_token(step, ids[batch])` while the program runs (streaming)."""
    sampling = Sampling(temperature, top_k, top_p)
    tokens, attention_mask = check_inputs(tokens, attention_mask, config)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = tokens.shape[1] + max_new_tokens
    if total > config.n_ctx:
        raise ValueError(
            f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens = {total} exceeds the model's "
            f"context n_ctx={config.n_ctx}"
        )
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    if not _at_top_level():  # inside an outer jit/vmap: trace inline (a cache keyed on closures over tracers
        # would only grow)
        return _generate(params, layer_views(params["blocks"]), tokens, attention_mask, jax.random.PRNGKey(seed),
                         config, max_new_tokens, sampling, normalize_edits(edits),
                         normalize_keep(keep) if keep else frozenset(), return_logits, on_token)
    run = _compiled(config, max_new_tokens, sampling, _Static(normalize_edits(edits)),
                    normalize_keep(keep) if keep else frozenset(), return_logits, _Static(on_token))
    return run(params, layer_views(params["blocks"]), tokens, attention_mask, jax.random.PRNGKey(seed))


class _Static:
    """Wraps an unhashable static value (edits dict, callback) for jit's cache by identity."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value) if not isinstance(self.value, dict) else hash(
            tuple((k, tuple(map(id, v))) for k, v in self.value.items()))

    def __eq__(self, other):
        return isinstance(other, _Static) and hash(self) == hash(other)


_CACHE: dict = {}


def _compiled(config, max_new_tokens, sampling, edits, keep, return_logits, on_token):
    key = (config, max_new_tokens, sampling, edits, keep, return_logits, on_token)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda *args: _generate(*args, config, max_new_tokens, sampling, edits.value,
                                                      keep, return_logits, on_token.value))
        if len(_CACHE) > 64:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def _generate(params, layers, tokens, attention_mask, key, config, max_new_tokens, sampling, edits, keep,
              return_logits, on_token):
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens

    # Prefill: the prompt through the reference forward, keeping its keys and values. Only the last
    # position's logits are needed (all of them when the caller reads or edits logits).
    full_logits = "logits" in keep or "logits" in edits
    prompt = forward(params, tokens, config, edits=edits, attention_mask=attention_mask,
                     keep=keep | {"k", "v", "logits" if full_logits else "ln_final"})
    pad = [(0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
    # per block (k, v) [batch, total, head, d_head]: the prompt's, then room for the new tokens
    cache = tuple((jnp.pad(prompt.k[layer], pad), jnp.pad(prompt.v[layer], pad)) for layer in range(config.n_layer))
    key_valid = jnp.pad(attention_mask.astype(bool), [(0, 0), (0, max_new_tokens)])  # [batch, total]
    next_position = positions_from_mask(attention_mask)[:, -1] + 1  # [batch]

    key, subkey = jax.random.split(key)
    if full_logits:
        first_logits = prompt.logits[:, -1]  # [batch, vocab]
    else:
        first_logits = unembed(prompt.ln_final[:, -1:], params["wte"])[:, 0]
    first = sample(first_logits, subkey, sampling)
    _stream(on_token, 0, first)

    def step(carry, i):
        token, cache, key_valid, key = carry
        index = prompt_len + i - 1  # cache slot of the token being fed
        key_valid = key_valid.at[:, index].set(True)
        logits, cache, trace = decode_step(
            params, layers, token, next_position + i - 1, cache, index, key_valid, config, edits, keep)
        key, subkey = jax.random.split(key)
        token = sample(logits, subkey, sampling)
        _stream(on_token, i, token)
        out = (token, logits if return_logits else None, trace)
        return (token, cache, key_valid, key), out

    carry = (first, cache, key_valid, key)
    _, (rest, rest_logits, step_trace) = lax.scan(step, carry, jnp.arange(1, max_new_tokens))
    new_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [batch, new]
    logits = None
    if return_logits:
        logits = jnp.concatenate([first_logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    prompt_kept = Trace(**{name: getattr(prompt, name) for name in keep})
    return Generation(
        tokens=new_tokens,
        sequences=jnp.concatenate([tokens, new_tokens.astype(tokens.dtype)], axis=1),
        logits=logits,
        prompt_trace=prompt_kept if keep else None,
        step_trace=step_trace if keep else None,
    )


def _stream(on_token, step, token):
    if on_token is not None:
        io_callback(lambda s, t: on_token(int(s), np.asarray(t)), None, step, token,
                                     ordered=True)


jax.tree_util.register_dataclass(
    Generation, data_fields=["tokens", "sequences", "logits", "prompt_trace", "step_trace"], meta_fields=[]
)
