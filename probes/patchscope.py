"""Patchscopes (Ghandeharioun et al., 2024): decode a hidden state by patching it into another prompt.

Take the residual vector h at (source prompt, source position, source layer), run a target prompt with its
residual at (target position, target layer) replaced by h, and read what the model says next. The default
target is an identity prompt,

    cat -> cat
    1135 -> 1135
    hello -> hello
    ?

whose few-shot pattern asks the model to repeat the token at "?", so the patched state is decoded into the
token(s) it stands for. Multi-hop: patch the last state of one prompt ("the capital of France") into a
placeholder of a second template ("the language spoken in X is") to compose two lookups.

The site (resid_pre, resid_mid or resid_post) is the same at both ends; `layer` is the block index. The
patch is applied in the target prompt only; the generated tokens that follow run unpatched.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import tinygpt
from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.inputs import checks_tokens

from .steering import RESID_SITES, resolve_positions
from tinygpt.errors import InputError

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


@checks_tokens("tokens")
def hidden_states(params, config: Config, tokens, position: int = -1, site: str = "resid_post"):
    """The residual at `site` of every block at one position of tokens [1, seq].  -> [layer, d_model]"""
    trace = tinygpt.forward(params, tokens, config, keep=(site,))
    return trace[site][:, 0, position]


def patch_edit(vector, layer, position):
    """An edit replacing the residual at block `layer`, token position `position` (>= 0; both may be traced)
    with `vector`. In generation the generated tokens' positions come after the prompt's: they pass unchanged.
    """

    def edit(value, at_layer, positions):  # value [batch, seq, d_model], positions [batch, seq]
        here = (at_layer == layer) & (positions == position)[..., None]  # [batch, seq, 1]
        return jnp.where(here, vector.astype(value.dtype), value)

    return edit


@functools.partial(jax.jit, static_argnames=("config", "site", "k"))
def _patched_next_tokens(params, target_tokens, vectors, layers, position, config: Config, site: str, k: int):
    """For each (vector, layer): the top-k next tokens after the target prompt [1, seq] with the patch.
    vectors [n, d_model], layers [n] -> ids [n, k], probabilities [n, k]"""

    def one(xs):
        vector, layer = xs
        edits = {site: patch_edit(vector, layer, position)}
        logits = tinygpt.forward(params, target_tokens, config, edits=edits, keep=("logits",)).logits[0, -1]
        top_log_probs, top_ids = lax.top_k(jax.nn.log_softmax(logits), k)
        return top_ids, jnp.exp(top_log_probs)

    return lax.map(one, (vectors, layers))


@functools.partial(jax.jit, static_argnames=("config", "site", "max_new_tokens"))
def _patched_generations(params, target_tokens, vectors, layers, position, config: Config, site: str,
                         max_new_tokens: int):
    """For each (vector, layer), vmapped: the greedy continuation of the target prompt [1, seq] with the patch
    in the prompt.  -> [n, new]"""

    def one(vector, layer):
        edits = {site: patch_edit(vector, layer, position)}
        return tinygpt.generate(params, config, target_tokens, max_new_tokens, temperature=0.0,
                                edits=edits).tokens[0]

    return jax.vmap(one)(vectors, layers)


@displayable(axes={"top_ids": "pair k", "top_probs": "pair k", "generated": "pair new"})
@dataclasses.dataclass
class Patchscope:
    source_layers: list[int]
    target_layers: list[int]
    source_position: int
    target_position: int
    top_ids: np.ndarray  # [n, k] next-token candidates after the patched target prompt, most probable first
    top_probs: np.ndarray  # [n, k]
    generated: np.ndarray | None  # [n, new] greedy continuation of each patched target prompt


@checks_tokens("source_tokens", "target_tokens")
def patchscope(params, config: Config, source_tokens, target_tokens, *, source_layers=None,
               source_position: int = -1, target_layer: int | None = None, target_position: int = -1,
               site: str = "resid_post", k: int = 5, max_new_tokens: int = 0) -> Patchscope:
    """Patch the source prompt's state (source_position, each of `source_layers`; default all) into the
    target prompt at (target_position, target_layer; default the same layer) and decode the next token, and
    a greedy continuation of `max_new_tokens` tokens. Prompts are token ids [1, seq]."""
    if site not in RESID_SITES:
        raise InputError(f"patchscope site must be one of {', '.join(RESID_SITES)}, got {site!r}")
    source_tokens, target_tokens = np.asarray(source_tokens, np.int32), np.asarray(target_tokens, np.int32)
    if source_tokens.shape[0] != 1 or target_tokens.shape[0] != 1:
        raise InputError("patchscope takes one source and one target prompt, each of shape [1, seq]")
    source_layers = list(range(config.n_layer)) if source_layers is None else [int(x) for x in source_layers]
    target_layers = source_layers if target_layer is None else [int(target_layer)] * len(source_layers)
    for layer in source_layers + target_layers:
        if not 0 <= layer < config.n_layer:
            raise InputError(f"layer {layer} is out of range: the model has {config.n_layer} layers (0-based)")
    source_position = resolve_positions([source_position], source_tokens.shape[1])[0]
    target_position = resolve_positions([target_position], target_tokens.shape[1])[0]

    states = hidden_states(params, config, source_tokens, source_position, site)  # [layer, d_model]
    vectors = states[jnp.asarray(source_layers)]  # [n, d_model]
    layers = jnp.asarray(target_layers)
    top_ids, top_probs = _patched_next_tokens(params, jnp.asarray(target_tokens), vectors, layers, target_position,
                                              config, site, min(k, config.vocab_size))
    generated = None
    if max_new_tokens > 0:
        generated = np.asarray(_patched_generations(params, jnp.asarray(target_tokens), vectors, layers,
                                                    target_position, config, site, max_new_tokens))
    return Patchscope(source_layers=source_layers, target_layers=target_layers, source_position=source_position,
                      target_position=target_position, top_ids=np.asarray(top_ids), top_probs=np.asarray(top_probs),
                      generated=generated)


@checks_tokens("first_tokens", "template_tokens")
def multihop(params, config: Config, first_tokens, template_tokens, placeholder_position: int, **kwargs) -> Patchscope:
    """Patch the last state of the first prompt into the template's placeholder position (e.g. the X of
    "the language spoken in X is"), at each layer, and decode what follows the template. Keyword arguments
    as for `patchscope` (source_layers, target_layer, site, k, max_new_tokens)."""
    return patchscope(params, config, first_tokens, template_tokens, source_position=-1,
                      target_position=placeholder_position, **kwargs)
