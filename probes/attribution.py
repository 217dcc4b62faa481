"""Direct logit attribution: how much each component's write into the residual stream adds to a logit.

The final residual stream is a sum of writes (the residual decomposition):

    x = embed + pos_embed + sum_l [ sum_h head_out[l, h] + b_O[l] + mlp_out[l] ]

and the logit of token t is

    logit_t = ln_f(x) . W_U[:, t] = ((x - mean(x)) / s) . (lnf_w * W_U[:, t]) + lnf_b . W_U[:, t]

with s = ln_final_scale = sqrt(var(x) + eps). Freezing s at its value on the prompt (taken from the trace),
the first term is linear in x, and since the mean of a sum is the sum of the means, it splits exactly over
the components c:

    contribution_c = (c - mean(c)) / s . (lnf_w * W_U[:, t])
    logit_t = sum_c contribution_c + lnf_b . W_U[:, t]                      (exact)

The last term, the final LayerNorm's bias read by the unembedding (plus b_U for untied params, see
`probes.transforms`), belongs to no component and is reported separately as `bias_term`. For a logit
difference t - t' use W_U[:, t] - W_U[:, t'] throughout. "Direct" means the path straight to the logits:
what a component does through later blocks is not counted here (and the frozen s hides how the component
changes the final LayerNorm's scale).

Per neuron of one MLP layer: mlp_out = sum_i mlp_post_i W_out[i] + b_out, so the MLP's contribution splits
into mlp_post_i (W_out[i] - mean) / s . direction per neuron, plus b_out's contribution.
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
from tinygpt.inputs import checks_tokens

from .transforms import center, unembedding_bias, unembedding_matrix
from tinygpt.errors import InputError

f32 = jnp.float32


# ----------------------------------------------------------------------------------- residual decomposition


def component_labels(config: Config) -> tuple[list[str], list, list]:
    """Names, layers and heads of the residual components, in the order of `residual_decomposition`:
    embed, pos_embed, then per layer each head (L{l}H{h}), the attention bias (L{l}.b_O) and the MLP
    (L{l}.mlp)."""
    labels, layers, heads = ["embed", "pos_embed"], [None, None], [None, None]
    for layer in range(config.n_layer):
        for head in range(config.n_head):
            labels.append(f"L{layer}H{head}"), layers.append(layer), heads.append(head)
        labels.append(f"L{layer}.b_O"), layers.append(layer), heads.append(None)
        labels.append(f"L{layer}.mlp"), layers.append(layer), heads.append(None)
    return labels, layers, heads


DECOMPOSITION_SITES = ("embed", "pos_embed", "head_out", "mlp_out", "ln_final_scale", "logits")


def stack_components(trace, params):
    """The residual components of a trace (kept: embed, pos_embed, head_out, mlp_out) stacked in
    `component_labels` order.  -> [component, batch, seq, d_model], summing to the final resid_post."""
    head_out = jnp.moveaxis(trace.head_out, 3, 1)  # [layer, head, batch, seq, d_model]
    b_O = jnp.broadcast_to(params["blocks"]["b_O"][:, None, None, None, :], trace.mlp_out[:, None].shape)
    per_layer = jnp.concatenate([head_out, b_O.astype(head_out.dtype), trace.mlp_out[:, None]], axis=1)
    per_layer = per_layer.reshape(-1, *per_layer.shape[2:])  # [layer * (head + 2), batch, seq, d_model]
    return jnp.concatenate([trace.embed[None], trace.pos_embed[None], per_layer], axis=0)


@checks_tokens("tokens")
def residual_decomposition(params, config: Config, tokens, attention_mask=None):
    """(labels, vectors [component, batch, seq, d_model]) whose sum over components is the final residual."""
    trace = forward(params, tokens, config, attention_mask=attention_mask, keep=DECOMPOSITION_SITES[:4])
    return component_labels(config)[0], np.asarray(stack_components(trace, params))


# ----------------------------------------------------------------------------------------- logit attribution


def logit_direction(params, target, baseline=None):
    """The unembedding direction of token `target` (minus `baseline`'s), lnf_w * W_U[:, t]: the normalised
    final residual's dot product with it is the logit (difference) before the bias term.  -> [d_model]"""
    W = unembedding_matrix(params)  # [d_model, vocab]
    direction = W[:, target]
    return direction if baseline is None else direction - W[:, baseline]


def logit_bias_term(params, target, baseline=None):
    """lnf_b . W_U[:, t] (+ b_U[t]): the part of the logit (difference) no component writes."""
    bias = unembedding_bias(params)  # [vocab]
    return bias[target] if baseline is None else bias[target] - bias[baseline]


def direct_contributions(vectors, scale, direction):
    """(c - mean(c)) / s . direction for every component vector.  vectors [..., d_model], scale [..., 1]
    broadcastable, direction [d_model] -> [...]"""
    return (center(vectors.astype(f32)) / scale) @ direction


@displayable(axes={"contributions": "component batch", "bias_term": "batch", "logit": "batch", "ln_final_scale": "batch"})
@dataclasses.dataclass
class Attribution:
    """Direct logit attribution at one position. logit == contributions.sum(0) + bias_term (per batch row)."""

    labels: list[str]  # component names (`component_labels`)
    layers: list  # block of each component (None for embed, pos_embed)
    heads: list  # head of each component (None for non-head components)
    contributions: np.ndarray  # [component, batch]
    bias_term: np.ndarray  # [batch] lnf_b . W_U[:, t] (same for every row)
    logit: np.ndarray  # [batch] the model's logit of target (minus baseline's) at `position`
    ln_final_scale: np.ndarray  # [batch] the frozen final LayerNorm scale s
    target: int
    baseline: int | None
    position: int

    def _headline(self):
        values = np.asarray(self.contributions).mean(axis=1)  # [component]
        order = np.argsort(-np.abs(values))[:10]
        against = "" if self.baseline is None else f" minus {token(self.baseline)}"
        return Table(["component", "direct logit"], [(self.labels[i], float(values[i])) for i in order],
                     caption=f"logit of {token(self.target)}{against} at position {self.position}: "
                             f"{float(np.mean(self.logit)):.4g} (batch mean); largest components")

    def _figure(self, top: int = 16):
        """`probes.plots.attribution`: the `top` largest components by |contribution| (batch mean)."""
        from probes import plots
        from tinygpt import display

        values = np.asarray(self.contributions, np.float64).mean(axis=1)  # [component]
        order = np.argsort(-np.abs(values), kind="stable")[:top]
        what = f"the logit of '{plots.text(display.pieces([self.target])[0])}'"
        if self.baseline is not None:
            what += f" - the logit of '{plots.text(display.pieces([self.baseline])[0])}'"
        batch = len(self.logit)
        what += (f" at position {self.position}" + (f" (mean over {batch} sequences)" if batch > 1 else "")
                 + (f", largest {len(order)} of {len(values)} components" if len(order) < len(values)
                    else f", all {len(values)} components by size"))
        return plots.attribution([self.labels[i] for i in order], values[order], logit=float(np.mean(self.logit)),
                                 what=what)


@functools.partial(jax.jit, static_argnames=("config",))
def _attribute(params, tokens, attention_mask, target, baseline, position, config: Config):
    trace = forward(params, tokens, config, attention_mask=attention_mask, keep=DECOMPOSITION_SITES)
    vectors = stack_components(trace, params)[:, :, position]  # [component, batch, d_model]
    scale = trace.ln_final_scale[:, position]  # [batch, 1]
    direction = logit_direction(params, target, baseline)  # [d_model]
    logits = trace.logits[:, position]  # [batch, vocab]
    logit = logits[:, target] - (0.0 if baseline is None else logits[:, baseline])  # [batch]
    contributions = direct_contributions(vectors, scale, direction)  # [component, batch]
    return contributions, logit_bias_term(params, target, baseline), logit, scale[:, 0]


def check_read(config: Config, seq: int, position: int, target: int, baseline: int | None) -> None:
    """Raise ValueError for a position outside the sequence or a token id outside the vocabulary (inside jit
    an index out of range is silently clamped: position 7 of 5 tokens would read position 4)."""
    if not -seq <= position < seq:
        raise InputError(f"position {position} is outside a sequence of {seq} tokens")
    for name, token in (("target", target), ("baseline", baseline)):
        if token is not None and not 0 <= token < config.vocab_size:
            raise InputError(f"{name} token id {token} is outside the vocabulary [0, {config.vocab_size})")


@checks_tokens("tokens")
def direct_logit_attribution(params, config: Config, tokens, target: int, *, baseline: int | None = None,
                             position: int = -1, attention_mask=None) -> Attribution:
    """Each component's direct contribution to the logit of `target` (or target - baseline) at `position`
    of every sequence in tokens [batch, seq], through the final LayerNorm with its scale frozen."""
    tokens = jnp.asarray(tokens)
    check_read(config, tokens.shape[1], position, target, baseline)
    contributions, bias_term, logit, scale = _attribute(params, tokens, attention_mask, target, baseline,
                                                        position, config)
    labels, layers, heads = component_labels(config)
    batch = tokens.shape[0]
    return Attribution(labels=labels, layers=layers, heads=heads, contributions=np.asarray(contributions),
                       bias_term=np.full(batch, float(bias_term)), logit=np.asarray(logit),
                       ln_final_scale=np.asarray(scale), target=int(target),
                       baseline=None if baseline is None else int(baseline), position=int(position))


# ---------------------------------------------------------------------------------------- per-neuron (MLP)


@displayable(axes={"neurons": "d_mlp batch", "activations": "d_mlp batch", "bias": "batch", "total": "batch"})
@dataclasses.dataclass
class NeuronAttribution:
    """One MLP layer's direct contribution split over its neurons: neurons.sum(0) + bias == total."""

    layer: int
    neurons: np.ndarray  # [d_mlp, batch] mlp_post_i (W_out[i] - mean) / s . direction
    activations: np.ndarray  # [d_mlp, batch] mlp_post at the position
    bias: np.ndarray  # [batch] b_out's contribution
    total: np.ndarray  # [batch] the MLP's contribution (its row in `direct_logit_attribution`)

    def _headline(self):
        values = np.asarray(self.neurons).mean(axis=1)  # [d_mlp]
        order = np.argsort(-np.abs(values))[:8]
        return Table(["neuron", "direct logit", "activation"],
                     [(f"L{self.layer}.{i}", float(values[i]), float(np.asarray(self.activations)[i].mean())) for i in order],
                     caption=f"MLP {self.layer} total {float(np.mean(self.total)):.4g}; largest neurons (batch mean)")


@functools.partial(jax.jit, static_argnames=("config",))
def _attribute_neurons(params, tokens, attention_mask, layer, target, baseline, position, config: Config):
    trace = forward(params, tokens, config, attention_mask=attention_mask,
                    keep=("mlp_post", "mlp_out", "ln_final_scale"))
    scale = trace.ln_final_scale[:, position]  # [batch, 1]
    direction = logit_direction(params, target, baseline)  # [d_model]
    W_out, b_out = params["blocks"]["W_out"][layer], params["blocks"]["b_out"][layer]  # [d_mlp, d_model], [d_model]
    activations = trace.mlp_post[layer][:, position].astype(f32)  # [batch, d_mlp]
    per_unit_activation = direct_contributions(W_out, 1.0, direction)  # [d_mlp] each neuron's value vector
    neurons = activations * per_unit_activation / scale  # [batch, d_mlp]
    bias = direct_contributions(b_out, scale, direction)  # [batch]
    total = direct_contributions(trace.mlp_out[layer][:, position], scale, direction)  # [batch]
    return neurons.T, activations.T, bias, total


@checks_tokens("tokens")
def neuron_attribution(params, config: Config, tokens, layer: int, target: int, *, baseline: int | None = None,
                       position: int = -1, attention_mask=None) -> NeuronAttribution:
    """Each neuron of MLP `layer`: its direct contribution to the logit of `target` (or target - baseline)
    at `position`, with the final LayerNorm scale frozen as in `direct_logit_attribution`."""
    if not 0 <= layer < config.n_layer:
        raise InputError(f"layer {layer} is out of range: the model has {config.n_layer} layers (0-based)")
    check_read(config, jnp.shape(tokens)[1], position, target, baseline)
    neurons, activations, bias, total = _attribute_neurons(params, jnp.asarray(tokens), attention_mask, layer,
                                                           target, baseline, position, config)
    return NeuronAttribution(layer=layer, neurons=np.asarray(neurons), activations=np.asarray(activations),
                             bias=np.asarray(bias), total=np.asarray(total))
