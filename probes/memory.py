"""The MLP as a key-value memory (Geva et al., 2021).

    mlp_out = sum_i gelu(ln2 . key_i + b_in[i]) * value_i + b_out

Neuron i of layer l reads its key, key_i = W_in[l][:, i] (a column in tinygpt's x @ W layout), and writes its
value, value_i = W_out[l][i] (a row), scaled by its activation mlp_post_i. Reading the value through the
unembedding (lnf_w * W_U, see `probes.transforms.unembedding_matrix`) shows which tokens an activation
promotes and which it suppresses (after centering: the final LayerNorm removes the mean, and a shift shared
by every logit changes no probability).

Two quantities have one definition here, used by every probe that reports them:

- A neuron's *activation* at a token (`neuron_activations`) is mlp_post (after GELU) in a forward pass over
  the window of tokens that holds it, run from the window's first token (no padding; nothing is prepended
  here: a corpus is one token stream with `<|endoftext|>` before each document, `probes.harvest.text_stream`,
  cut into non-overlapping windows, `probes.harvest.token_windows`). It depends on every token before it in
  its window, so the same text gives the same number only in the same window. `neuron_on_prompt` (a prompt
  is one window), `top_activations` and `probes.polysemantic.neuron_report` all compute it there.
- A neuron's *key* in the residual stream (`residual_keys`) is ln2_w * W_in[:, i], centred over d_model:
  mlp_pre_i = ln2(x) . W_in[:, i] + b_in[i] = (x - mean x) . (ln2_w * W_in[:, i]) / s + const, and
  (x - mean x) . k = x . (k - mean k), so the centred key is exactly the residual direction the neuron reads
  (scaled by 1/s, the LayerNorm's divisor); its mean component is invisible to the neuron.
  `probes.geometry` and `probes.polysemantic` use it. (`neuron_key` is the raw W_in column, the key in the
  space of ln2's output.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.errors import InputError
from tinygpt.inputs import checks_tokens
from tinygpt.model import causal_mask, embedding, run_blocks

from .transforms import center, unembedding_matrix

f32 = jnp.float32


def check_neuron(config: Config, layer: int, neuron: int) -> None:
    if not 0 <= layer < config.n_layer:
        raise InputError(f"layer {layer} is out of range: the model has {config.n_layer} layers (0-based)")
    if not 0 <= neuron < config.d_mlp:
        raise InputError(f"neuron {neuron} is out of range: each MLP has d_mlp={config.d_mlp} neurons (0-based)")


def neuron_key(params, layer: int, neuron: int):
    """The direction neuron reads from ln2: W_in[layer][:, neuron].  -> [d_model]"""
    return params["blocks"]["W_in"][layer][:, neuron]


def neuron_value(params, layer: int, neuron: int):
    """The vector the neuron writes per unit of activation: W_out[layer][neuron].  -> [d_model]"""
    return params["blocks"]["W_out"][layer][neuron]


def residual_keys(params, layer: int) -> np.ndarray:
    """The residual-stream direction each neuron of block `layer` reads: ln2_w * W_in[:, i], centred over
    d_model (see the module doc), float64.  -> [d_mlp, d_model]"""
    blocks = params["blocks"]
    keys = np.asarray(blocks["W_in"][layer], np.float64).T * np.asarray(blocks["ln2_w"][layer], np.float64)
    return keys - keys.mean(axis=1, keepdims=True)


def value_logits(params, layer: int, neuron: int):
    """The neuron's value vector read through the unembedding: centered value @ (lnf_w * W_U), float32.
    Its direct effect on the logits is activation / ln_final_scale times this.  -> [vocab]"""
    value = center(neuron_value(params, layer, neuron).astype(f32))  # [d_model]
    return value @ unembedding_matrix(params)  # [vocab]


@displayable
@dataclasses.dataclass
class ValueTokens:
    promoted: list[tuple[int, float]]  # (token id, logit effect per unit activation), largest first
    suppressed: list[tuple[int, float]]  # most negative first

    def _headline(self):
        return Table(["promoted", "logit", "suppressed", "logit"],
                     [(token(u), float(a), token(d), float(b)) for (u, a), (d, b) in zip(self.promoted, self.suppressed)])


def value_tokens(params, layer: int, neuron: int, k: int = 10) -> ValueTokens:
    """The tokens the neuron's value vector promotes most and suppresses most (per unit of activation)."""
    effect = np.asarray(value_logits(params, layer, neuron))  # [vocab]
    order = np.argsort(-effect, kind="stable")
    top, bottom = order[:k], order[::-1][:k]
    return ValueTokens(promoted=[(int(t), float(effect[t])) for t in top],
                       suppressed=[(int(t), float(effect[t])) for t in bottom])


# --------------------------------------------------------------------------------------- one layer's MLP


def layer_mlp_post(params, tokens, layer: int, config: Config):
    """One block's MLP activations, running only the blocks up to it.  tokens [batch, seq] (no padding)
    -> [batch, seq, d_mlp]

    Blocks 0..layer-1 run keeping nothing, block `layer` keeps its mlp_post, later blocks are skipped.
    `layer` is a Python int: it sets how many blocks run (see `compiled_layer_mlp_post`)."""
    seq = tokens.shape[1]
    resid = embedding(params["wte"], tokens) + params["wpe"][jnp.arange(seq)]  # [batch, seq, d_model]
    mask = causal_mask(jnp.ones(tokens.shape, jnp.int32))  # [batch, 1, seq, key]
    before = jax.tree.map(lambda x: x[:layer], params["blocks"])
    resid, _ = run_blocks(before, resid, mask, config, {}, frozenset(), layers=jnp.arange(layer))
    this = jax.tree.map(lambda x: x[layer:layer + 1], params["blocks"])
    _, kept = run_blocks(this, resid, mask, config, {}, frozenset({"mlp_post"}), layers=jnp.array([layer]))
    return kept["mlp_post"][0]


@functools.lru_cache(maxsize=32)
def compiled_layer_mlp_post(config: Config, layer: int):
    """`layer_mlp_post` jitted for one (config, layer): (params, tokens) -> [batch, seq, d_mlp]."""
    return jax.jit(functools.partial(layer_mlp_post, layer=layer, config=config))


@checks_tokens("windows")
def neuron_activations(params, config: Config, windows, layer: int, neuron: int, *, batch: int = 16) -> np.ndarray:
    """The neuron's activation (mlp_post, after GELU) at every token of windows [n, seq], each window run from
    its first token (the one definition, see the module doc), `batch` windows at a time, only up to the
    neuron's block.  -> [n, seq] float32"""
    check_neuron(config, layer, neuron)
    windows = np.asarray(windows, np.int32)
    run = compiled_layer_mlp_post(config, layer)
    acts = [np.asarray(run(params, jnp.asarray(windows[start:start + batch]))[..., neuron], np.float32)
            for start in range(0, len(windows), batch)]  # [chunk, seq] each
    return np.concatenate(acts)


@displayable
@dataclasses.dataclass
class TopActivations:
    """A neuron's largest activations over a corpus of windows."""

    activations: np.ndarray  # [k] largest first
    windows: np.ndarray  # [k] which window
    positions: np.ndarray  # [k] position within the window
    tokens: np.ndarray  # [k] the token at that position


@checks_tokens("windows")
def top_activations(params, config: Config, windows, layer: int, neuron: int, *, k: int = 10,
                    batch: int = 16) -> TopActivations:
    """The k (window, position) pairs where the neuron is most active (`neuron_activations`) over windows
    [n, seq] of a corpus, largest first (ties: the earlier token first)."""
    windows = np.asarray(windows, np.int32)
    acts = neuron_activations(params, config, windows, layer, neuron, batch=batch)  # [n, seq]
    flat = np.argsort(-acts, axis=None, kind="stable")[:k]
    rows, cols = np.unravel_index(flat, acts.shape)
    return TopActivations(activations=acts[rows, cols], windows=rows, positions=cols, tokens=windows[rows, cols])


# ------------------------------------------------------------------------------------------- on a prompt


@displayable(axes={"activations": "seq", "ln_final_scale": "seq"})
@dataclasses.dataclass
class NeuronOnPrompt:
    activations: np.ndarray  # [seq] the neuron's activation at every position (batch row 0)
    ln_final_scale: np.ndarray  # [seq] the final LayerNorm scale there
    position: int
    promoted: list[tuple[int, float]]  # at `position`: the tokens whose logits it raises most (direct effect)
    suppressed: list[tuple[int, float]]


@checks_tokens("tokens")
def neuron_on_prompt(params, config: Config, tokens, layer: int, neuron: int, *, position: int = -1,
                     k: int = 10) -> NeuronOnPrompt:
    """The neuron's activation at every position of tokens [1, seq] (`neuron_activations`, the prompt as one
    window), and its direct effect on the logits at `position`: activation / ln_final_scale * value_logits
    (final LayerNorm scale frozen, as in DLA)."""
    check_neuron(config, layer, neuron)
    activations = neuron_activations(params, config, np.asarray(tokens)[:1], layer, neuron)[0]  # [seq]
    trace = forward(params, tokens, config, keep=("ln_final_scale",))
    scale = np.asarray(trace.ln_final_scale[0, :, 0], np.float32)  # [seq]
    effect = activations[position] / scale[position] * np.asarray(value_logits(params, layer, neuron))  # [vocab]
    order = np.argsort(-effect, kind="stable")
    return NeuronOnPrompt(
        activations=activations, ln_final_scale=scale, position=int(position),
        promoted=[(int(t), float(effect[t])) for t in order[:k]],
        suppressed=[(int(t), float(effect[t])) for t in order[::-1][:k]],
    )
