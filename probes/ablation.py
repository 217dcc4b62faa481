"""Ablation: remove part of the computation and measure what changes.

A part is a site at some layers, optionally restricted to heads, neurons (d_mlp), residual dimensions
(d_model) or positions. Its value is replaced by

    zero       0
    mean       its mean over a reference batch: per position (the reference has the prompt's length), or
               over the reference's positions too
    resample   its value on a reference prompt drawn at random (seeded) for each row (another row when the
               reference is the prompt batch itself)

Positions are token positions: in a left-padded batch (`attention_mask`) a selected position and a
per-position mean or resampled value land on each row's token at that position, not on a slot.

Whole components are sites too: all attention is `attn_out` at every layer, one layer's MLP is `mlp_out` at
that layer. The residual stream is kept: resid_mid = resid_pre + attn_out, so zeroing attn_out removes only
what attention writes. Heads are ablated at `z` (their output is z @ W_O, so zero / mean z is zero / mean
output), neurons at `mlp_post`.

`ablation_sweep` ablates every head (or neuron, or residual dimension) of every layer, one at a time, as one
compiled program (`tinygpt.sweep`), and scores each run with a metric of `probes.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from probes import metrics
from probes.transforms import unembedding_weight
from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.model import positions_from_mask
from tinygpt.sites import SITES, check_site_names
from tinygpt.sweep import axis_size, base_logits, cache_run, check_patch_site, starts_from_z, sweep_units
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError, InputTypeError

METHODS = ("zero", "mean", "resample")
# keyword -> the axis (dimension name of `tinygpt.sites`) it selects on
SELECTORS = {"heads": "head", "neurons": "d_mlp", "dims": "d_model", "positions": "seq"}


# ------------------------------------------------------------------------------------------ what is ablated


def token_positions(attention_mask) -> np.ndarray:
    """Each slot's position among its row's real tokens, as the position embedding counts them (left padding
    skipped), on the host.  [batch, seq] -> int [batch, seq]"""
    return np.asarray(positions_from_mask(jnp.asarray(attention_mask)))


def site_where(site: str, config: Config, seq: int, *, attention_mask=None, **selected) -> jax.Array:
    """bool mask of the selected entries of a site's value (without the layer axis): True at the given
    heads / neurons / dims / positions (each a list of indices, or None for all), size 1 on unselected axes.
    Positions are token positions: in a left-padded batch (`attention_mask` [batch, seq]) each row's real
    tokens are counted from its first one, so the mask gets a batch axis and padding is never selected.

    site_where("z", config, seq, heads=[3])  ->  [1, 1, head, 1], True at head 3"""
    check_site_names([site], "site")
    shape = SITES[site].shape
    where = jnp.ones((1,) * len(shape), bool)
    for keyword, indices in selected.items():
        if keyword not in SELECTORS:
            raise InputTypeError(f"unknown selector {keyword!r}; choose from {', '.join(SELECTORS)}")
        if indices is None:
            continue
        axis = SELECTORS[keyword]
        if axis not in shape:
            raise InputError(f"site {site!r} has no {axis} axis to select {keyword} on (its shape is "
                             f"[{', '.join(shape)}])")
        size = axis_size(site, axis, config, seq)
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        if indices.size == 0 or indices.min() < -size or indices.max() >= size:
            raise InputError(f"{keyword} {indices.tolist()} out of range for {axis} of size {size}")
        hot = np.zeros(size, bool)
        hot[indices] = True
        index = shape.index(axis)
        if axis == "seq" and attention_mask is not None:  # by token position, row by row
            real = np.asarray(attention_mask).astype(bool)  # [batch, seq]
            rows = hot[token_positions(attention_mask)] & real  # [batch, seq]
            batch_index = shape.index("batch")
            rows = rows.reshape([real.shape[0] if i == batch_index else size if i == index else 1
                                 for i in range(len(shape))])
            where = where & jnp.asarray(rows)
            continue
        where = where & jnp.asarray(hot).reshape([size if i == index else 1 for i in range(len(shape))])
    return where


def layer_list(layers, config: Config):
    """None -> every layer; an int or a list of ints -> a checked int array."""
    if layers is None:
        return np.arange(config.n_layer)
    layers = np.atleast_1d(np.asarray(layers, np.int64))
    if layers.size == 0 or layers.min() < 0 or layers.max() >= config.n_layer:
        raise InputError(f"layers {layers.tolist()} out of range for a model of {config.n_layer} layers")
    return layers


def layer_mask(layers, config: Config):
    """bool [layer], True at the chosen layers (None: all)."""
    mask = np.zeros(config.n_layer, bool)
    mask[layer_list(layers, config)] = True
    return mask


def replace_edit(source, where, layers):
    """The edit `(value, layer) -> value` putting source[layer] where `where` holds, at the layers where the
    bool mask `layers` [layer] holds. source [layer, ...] broadcasts against the site's value."""

    def edit(value, layer):
        return jnp.where(layers[layer] & where, source[layer], value)

    return edit


@functools.partial(jax.jit, static_argnames=("config", "site", "keep"))
def replaced_forward(params, tokens, config: Config, site: str, source, where, layers, *, attention_mask=None,
                     keep=("logits",)):
    """The forward with `site` replaced by source[layer] where `where` holds, at the layers where the bool
    mask `layers` [layer] holds.  -> Trace

    Every ablation, patch and neuron edit of these probes is this one function, compiled once per site,
    keep and shapes (the selection and the layers are arrays, not constants)."""
    edits = {site: replace_edit(source, where, layers)}
    return forward(params, tokens, config, edits=edits, attention_mask=attention_mask, keep=keep)


# -------------------------------------------------------------------------------------- replacement values


def ablation_source(params, config: Config, site: str, method: str, *, seq: int, batch: int, reference=None,
                    reference_mask=None, per_position: bool = True, seed: int = 0, attention_mask=None,
                    tokens=None):
    """The values an ablation puts in: [layer, batch|1, seq|1, ...] (the site's shape with the layer axis, size
    1 where it broadcasts).

    reference        int [ref_batch, ref_seq] token ids (mean and resample)
    reference_mask   [ref_batch, ref_seq] 1 real, 0 (left) padding: means over positions skip the padding
    per_position     mean per position (ref_seq must equal seq) or over the reference's positions too
    attention_mask   the prompts' [batch, seq] left padding: a real token at position j of its row gets the
                     reference's values at position j (not at its slot)
    tokens           the prompts [batch, seq]: resampling the prompt batch itself never gives a row itself"""
    check_patch_site(site)
    if method not in METHODS:
        raise InputError(f"unknown ablation method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "zero":
        return jnp.zeros((config.n_layer,) + (1,) * len(SITES[site].shape))
    if reference is None:
        raise InputError(f"{method} ablation needs a reference batch of prompts")
    reference = jnp.asarray(reference)
    if reference.ndim != 2:
        raise InputError(f"reference must be token ids [ref_batch, ref_seq], got shape {tuple(reference.shape)}")
    aligned = method == "resample" or per_position  # reference positions stand for the prompt's positions
    if (aligned or "key" in SITES[site].shape) and (reference.shape[1] != seq or reference_mask is not None):
        raise InputError(f"{method} ablation{' per position' if method == 'mean' else ''} of {site!r} needs "
                         f"unpadded reference prompts of the prompt's length {seq}, got length {reference.shape[1]}"
                         + (" (or take the mean over positions: per_position=False)" if method == "mean" else ""))
    if aligned and attention_mask is not None and "key" in SITES[site].shape:
        raise InputError(f"{method} ablation of {site!r} in a left-padded batch: its key axis would need the "
                         "reference's keys moved row by row; ablate unpadded prompts of equal length")
    values = forward(params, reference, config, attention_mask=reference_mask, keep=(site,))[site]
    if method == "resample":
        n = reference.shape[0]
        if tokens is not None and np.array_equal(np.asarray(reference), np.asarray(tokens)) and n > 1:
            # the prompt batch resampled from itself: row b draws among the other rows
            offsets = jax.random.randint(jax.random.PRNGKey(seed), (batch,), 1, n)
            rows = (jnp.arange(batch) + offsets) % n
        else:
            rows = jax.random.randint(jax.random.PRNGKey(seed), (batch,), 0, n)
        return at_token_positions(values[:, rows], site, attention_mask)  # [layer, batch, seq, ...]
    if per_position:
        return at_token_positions(values.mean(axis=1, keepdims=True), site, attention_mask)  # [layer, 1|batch, seq, ...]
    mask = jnp.ones(reference.shape) if reference_mask is None else reference_mask
    return mean_over_tokens(values, mask, 1 + SITES[site].shape.index("seq"))  # [layer, 1, 1, ...]


def at_token_positions(values, site: str, attention_mask):
    """Per-position values [layer, batch|1, seq, ...] moved so that each row's real token at position j (its
    slot shifted by the row's left padding) gets the values of position j.  -> [layer, batch, seq, ...]"""
    if attention_mask is None:
        return values
    batch, seq = np.shape(attention_mask)
    seq_axis = 1 + SITES[site].shape.index("seq")
    values = jnp.broadcast_to(values, (values.shape[0], batch) + values.shape[2:])
    index = token_positions(attention_mask).reshape(
        [batch if i == 1 else seq if i == seq_axis else 1 for i in range(values.ndim)])
    return jnp.take_along_axis(values, jnp.asarray(np.broadcast_to(index, values.shape)), axis=seq_axis)


def mean_over_tokens(values, mask, seq_axis: int):
    """Mean of values [layer, batch, ...] over the batch and the positions (axis `seq_axis`) where mask
    [batch, seq] is 1, keeping both axes with size 1."""
    shape = [1] * values.ndim
    shape[1], shape[seq_axis] = mask.shape
    weights = jnp.asarray(mask, values.dtype).reshape(shape)
    axes = (1, seq_axis)
    return (values * weights).sum(axis=axes, keepdims=True) / weights.sum(axis=axes, keepdims=True)


def ablation_edits(params, tokens, config: Config, site: str, *, layers=None, heads=None, neurons=None, dims=None,
                   positions=None, method: str = "zero", reference=None, reference_mask=None,
                   per_position: bool = True, seed: int = 0, attention_mask=None):
    """{site: edit} ablating the selected part of `site` at `layers` (None: all), for `forward` on `tokens`
    (with the same `attention_mask`; e.g. combined with other edits)."""
    source, where, mask = ablation_arrays(params, tokens, config, site, layers=layers, heads=heads, neurons=neurons,
                                          dims=dims, positions=positions, method=method, reference=reference,
                                          reference_mask=reference_mask, per_position=per_position, seed=seed,
                                          attention_mask=attention_mask)
    return {site: replace_edit(source, where, mask)}


def ablation_arrays(params, tokens, config: Config, site: str, *, layers, method, reference, reference_mask,
                    per_position, seed, attention_mask=None, **selected):
    """(source, where, layer mask) of an ablation (see `replaced_forward`)."""
    batch, seq = np.shape(tokens)
    where = site_where(site, config, seq, attention_mask=attention_mask, **selected)
    source = ablation_source(params, config, site, method, seq=seq, batch=batch, reference=reference,
                             reference_mask=reference_mask, per_position=per_position, seed=seed,
                             attention_mask=attention_mask, tokens=tokens)
    return source, where, layer_mask(layers, config)


@checks_tokens("tokens", "reference")
def ablate(params, tokens, config: Config, site: str, *, layers=None, heads=None, neurons=None, dims=None,
           positions=None, method: str = "zero", reference=None, reference_mask=None, per_position: bool = True,
           seed: int = 0, attention_mask=None, keep=("logits",)):
    """The forward on `tokens` with the selected part of `site` ablated (see the module doc).  -> Trace"""
    source, where, mask = ablation_arrays(params, tokens, config, site, layers=layers, heads=heads, neurons=neurons,
                                          dims=dims, positions=positions, method=method, reference=reference,
                                          reference_mask=reference_mask, per_position=per_position, seed=seed,
                                          attention_mask=attention_mask)
    keep = keep if isinstance(keep, str) else tuple(keep)
    return replaced_forward(params, jnp.asarray(tokens), config, site, source, where, mask,
                            attention_mask=attention_mask, keep=keep)


# ------------------------------------------------------------------------------ what one neuron does


NEURON_ACTIONS = ("ablate", "scale", "set")


@displayable(axes={"original": "batch vocab", "edited": "batch vocab", "kl": "batch seq"})
@dataclasses.dataclass
class OutputChange:
    """How an edit moved the output distribution."""

    position: int  # the position the log-probs are read at
    original: np.ndarray  # [batch, vocab] log-probs without the edit
    edited: np.ndarray  # [batch, vocab] log-probs with it
    kl: np.ndarray  # [batch, seq] KL(original || edited) at every position

    def top_changes(self, k: int = 10):
        """(promoted, suppressed): the k token ids whose log-prob at `position` rose / fell most (batch mean),
        each with the changes."""
        change = (self.edited - self.original).mean(axis=0)
        up, down = np.argsort(-change)[:k], np.argsort(change)[:k]
        return (up, change[up]), (down, change[down])

    def _headline(self):
        (up, up_change), (down, down_change) = self.top_changes(5)
        return Table(["promoted", "change", "suppressed", "change"],
                     [(token(u), float(uc), token(d), float(dc)) for u, uc, d, dc in zip(up, up_change, down, down_change)],
                     caption=f"log-prob changes at position {self.position}; KL there "
                             f"{float(self.kl[:, self.position].mean()):.4g} nats (batch mean)")


def output_change(original_logits, edited_logits, *, position: int = -1) -> OutputChange:
    """Compare logits [batch, seq, vocab] without and with an edit: log-probs at `position`, KL everywhere."""
    kl = metrics.kl_div(original_logits, edited_logits)  # [batch, seq]
    return OutputChange(int(position), np.asarray(metrics.log_probs(original_logits[:, position])),
                        np.asarray(metrics.log_probs(edited_logits[:, position])), np.asarray(kl))


NEURON_ACTIONS = ("ablate", "scale", "set")


@displayable(axes={"activation": "batch seq", "direct_logits": "vocab"})
@dataclasses.dataclass
class NeuronStudy:
    """What one MLP neuron does on a prompt batch."""

    layer: int
    neuron: int
    action: str
    value: float | None
    activation: np.ndarray  # [batch, seq] its activation (mlp_post) without the edit
    change: OutputChange  # the output distribution with the edit vs without
    direct_logits: np.ndarray  # [vocab] its output direction through the unembedding, W_out[neuron] @ W_U (wte.T)

    def _headline(self):
        top = np.argsort(-np.asarray(self.direct_logits))[:5]
        return [("neuron", f"L{self.layer}.{self.neuron} ({self.action}" + ("" if self.value is None else f" {self.value}") + ")"),
                ("max |activation|", float(np.abs(self.activation).max())),
                ("KL at position", float(self.change.kl[:, self.change.position].mean())),
                ("writes to", ", ".join(token(t) for t in top))]


@checks_tokens("tokens")
def neuron_study(params, tokens, config: Config, layer: int, neuron: int, *, action: str = "ablate",
                 value: float | None = None, positions=None, attention_mask=None, position: int = -1) -> NeuronStudy:
    """Zero (ablate), multiply by `value` (scale) or set to `value` (set) one neuron's activation at `layer`
    (at `positions`, or all), and report its activations, the change in the output distribution, and the
    tokens its output direction writes to directly (before the final LayerNorm)."""
    if action not in NEURON_ACTIONS:
        raise InputError(f"unknown neuron action {action!r}; choose one of {', '.join(NEURON_ACTIONS)}")
    if action != "ablate" and value is None:
        raise InputError(f"neuron action {action!r} needs a value")
    tokens = jnp.asarray(tokens)
    layer = int(layer_list(layer, config)[0])
    where = site_where("mlp_post", config, tokens.shape[1], neurons=[neuron], positions=positions,
                       attention_mask=attention_mask)
    clean = forward(params, tokens, config, attention_mask=attention_mask, keep=("mlp_post", "logits"))
    # the layer's input is unchanged, so its edited activation is a function of the clean one
    source = {"ablate": jnp.zeros_like(clean.mlp_post), "scale": clean.mlp_post * (value or 0.0),
              "set": jnp.full_like(clean.mlp_post, value or 0.0)}[action]
    edited = replaced_forward(params, tokens, config, "mlp_post", source, where, layer_mask(layer, config),
                              attention_mask=attention_mask, keep=("logits",)).logits
    direction = params["blocks"]["W_out"][layer, neuron]  # [d_model]
    W_U = unembedding_weight(params)  # [d_model, vocab]
    return NeuronStudy(layer, int(neuron), action, value, np.asarray(clean.mlp_post[layer, :, :, neuron]),
                       output_change(clean.logits, edited, position=position), np.asarray(direction @ W_U))


# ------------------------------------------------------------------------------------------------- sweeps


@displayable(axes={"values": "layer unit"})
@dataclasses.dataclass
class SweepResult:
    """A metric for every (layer, unit) intervened on, and for the run without intervention."""

    metric: str
    values: np.ndarray  # [layer, unit] the metric (mean over the batch) with that unit intervened on
    baseline: float  # the metric without intervention
    layers: np.ndarray  # the swept layers
    units: np.ndarray  # the swept units (heads, neurons, dims)

    @property
    def effect(self) -> np.ndarray:
        """values - baseline, [layer, unit]."""
        return self.values - self.baseline

    def _headline(self):
        effect = np.asarray(self.effect)
        order = np.argsort(-np.abs(effect), axis=None)[:8]
        rows = [(int(self.layers[i]), int(self.units[j]), float(self.values[i, j]), float(effect[i, j]))
                for i, j in zip(*np.unravel_index(order, effect.shape))]
        return Table(["layer", "unit", self.metric, "effect"], rows,
                     caption=f"largest effects on {self.metric} (baseline {self.baseline:.4g})")

    def _figure(self, max_layers: int = 64):
        """`probes.plots.layer_unit_grid` of the effects (wide sweeps, e.g. neurons: the largest cells);
        None beyond `max_layers` layers."""
        if len(self.layers) > max_layers:
            return None
        from probes import plots

        return plots.layer_unit_grid(
            {f"{self.metric} change": self.effect}, self.layers, self.units, unit="unit",
            value_label=f"change in {self.metric} (ablated - baseline {self.baseline:.3g})",
            what=f"ablation of each unit, one at a time: change in {self.metric}")


def unit_sweep_scores(params, tokens, attention_mask, source, layers, units, answer, wrong, *, config: Config,
                      site: str, axis: str | None, metric: str, position: int, chunk_size: int | None):
    """(values [layer, unit], baseline): the metric, averaged over the batch, of every run that replaces unit
    u of `site` at layer l by `source` (at all positions), and of the run on `tokens` as it is (the KL
    metric's reference)."""
    cache = cache_run(params, tokens, config, attention_mask=attention_mask, z=starts_from_z([site]))
    base = base_logits(params, cache, read=(position,))[:, 0]  # [batch, vocab]

    def score(logits):  # [batch, 1, vocab] -> []
        return metrics.metric(metric, logits[:, 0], answer=answer, wrong=wrong, reference=base).mean()

    values = sweep_units(params, config, cache, site, axis, source, score, layers=layers, units=units,
                         read=(position,), chunk_size=chunk_size)
    return values, score(base[:, None])


compiled_unit_sweep = jax.jit(unit_sweep_scores,
                              static_argnames=("config", "site", "axis", "metric", "position", "chunk_size"))


@checks_tokens("tokens", "reference")
def ablation_sweep(params, tokens, config: Config, *, site: str = "z", axis: str | None = "head",
                   metric: str = "log_prob", answer=None, wrong=None, method: str = "zero", reference=None,
                   reference_mask=None, per_position: bool = True, seed: int = 0, layers=None, units=None,
                   attention_mask=None, position: int = -1, chunk_size: int | None = None) -> SweepResult:
    """Ablate each unit of `site` at each layer, one at a time, and score each run at `position`.

    site, axis      what a unit is: ("z", "head") heads, ("mlp_post", "d_mlp") neurons, ("resid_pre",
                    "d_model") residual dimensions, (site, None) the whole site (one unit per layer)
    metric          "log_prob" / "prob" of `answer`, "logit_diff" of `answer` over `wrong`, or "kl" from the
                    unablated output (see probes.metrics); averaged over the batch
    answer, wrong   token ids, one per row or one for all
    layers, units   which to sweep (default all)
    One compiled program: runs for a layer start from that layer's cached input, vmapped over units."""
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    metrics.check_metric(metric, answer=answer, wrong=wrong, reference=True)
    layers = layer_list(layers, config)
    check_patch_site(site)
    size = 1 if axis is None else axis_size(site, axis, config, seq)
    units = np.arange(size) if units is None else np.atleast_1d(np.asarray(units, np.int64))
    if units.size == 0 or units.min() < 0 or units.max() >= size:
        raise InputError(f"units {units.tolist()} out of range for {axis} of size {size}")
    if axis == "seq" and attention_mask is not None and not np.all(np.asarray(attention_mask)):
        raise InputError("a sweep over positions of a left-padded batch would ablate slots, which are different "
                         "token positions in different rows; sweep unpadded prompts of equal length")
    source = ablation_source(params, config, site, method, seq=seq, batch=batch, reference=reference,
                             reference_mask=reference_mask, per_position=per_position, seed=seed,
                             attention_mask=attention_mask, tokens=tokens)
    values, baseline = compiled_unit_sweep(
        params, tokens, attention_mask, source, layers, units, _ids(answer), _ids(wrong), config=config,
        site=site, axis=axis, metric=metric, position=position, chunk_size=chunk_size)
    return SweepResult(metric, np.asarray(values), float(baseline), layers, units)


def _ids(tokens):
    return None if tokens is None else jnp.asarray(tokens, jnp.int32)


__all__ = ["METHODS", "SELECTORS", "site_where", "replace_edit", "replaced_forward", "ablation_source",
           "ablation_edits", "ablate", "OutputChange", "output_change", "NeuronStudy", "neuron_study", "SweepResult",
           "ablation_sweep", "unit_sweep_scores", "compiled_unit_sweep", "layer_list"]
