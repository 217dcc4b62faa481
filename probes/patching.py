"""Activation patching: which activations carry the difference between a clean and a corrupted prompt.

The two prompts have the same length (e.g. "... John gave a drink to" and the same with another name).
Denoising runs the corrupted prompt with one activation taken from the clean run (does it bring the clean
behaviour back?); noising runs the clean prompt with one activation from the corrupted run (does it break
it?). A metric of the logits at one position (`probes.metrics`, averaged over the batch) scores each run, and

    recovery = (metric_patched - metric_corrupt) / (metric_clean - metric_corrupt)

is 1 where the patched run scores like the clean run and 0 where it scores like the corrupted one.

Granularity (`by`): "position" patches a site at one (layer, position); "head" one head's z at one layer
(all positions); "neuron" one MLP neuron (mlp_post); "dim" one residual dimension; "layer" the whole site.

Attribution patching estimates every patch at once to first order around the run being patched:

    metric(patched) - metric(base) ~ (a_source - a_base) . d metric / d a

with the gradients of all sites from one backward pass (Nanda's "attribution patching").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from probes import metrics
from probes.ablation import layer_list, layer_mask, replaced_forward, site_where
from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.model import unembed
from tinygpt.sites import SITES
from tinygpt.sweep import (axis_size, base_logits, cache_run, check_patch_site, starts_from_z, sweep_positions,
                           sweep_units)
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError

DIRECTIONS = ("denoise", "noise")
GRANULARITIES = {"position": "seq", "head": "head", "neuron": "d_mlp", "dim": "d_model", "layer": None}


# ------------------------------------------------------------------------------------------ prompt pairs


def check_pair(clean_tokens, corrupt_tokens):
    """Both as int arrays [batch, seq] of the same shape, or a ValueError saying how they differ."""
    clean, corrupt = np.asarray(clean_tokens), np.asarray(corrupt_tokens)
    clean, corrupt = (x[None] if x.ndim == 1 else x for x in (clean, corrupt))
    if clean.shape != corrupt.shape:
        raise InputError(f"clean and corrupted prompts must have the same shape [batch, seq] (patching matches "
                         f"positions), got {clean.shape} and {corrupt.shape}")
    return clean, corrupt


def base_and_source(clean, corrupt, direction: str):
    """(tokens of the run that is patched, tokens of the run the patched values come from)."""
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; choose 'denoise' (patch clean values into the "
                         "corrupted run) or 'noise' (corrupted values into the clean run)")
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def first_difference(clean, corrupt) -> int:
    """The first position where any row's tokens differ (seq when none do): patching before it is a no-op."""
    differs = np.nonzero((clean != corrupt).any(axis=0))[0]
    return int(differs[0]) if differs.size else clean.shape[1]


# ----------------------------------------------------------------------------------------- a single patch


@checks_tokens("clean_tokens", "corrupt_tokens")
def patch(params, clean_tokens, corrupt_tokens, config: Config, site: str, *, layers=None, positions=None,
          heads=None, neurons=None, dims=None, direction: str = "denoise", keep=("logits",)):
    """The run on the corrupted prompt with `site` taken from the clean run (denoise), or the reverse
    (noise), at `layers` (None: all) and the selected positions / heads / neurons / dims.  -> Trace"""
    check_patch_site(site)
    clean, corrupt = check_pair(clean_tokens, corrupt_tokens)
    base, source_tokens = base_and_source(clean, corrupt, direction)
    source = forward(params, source_tokens, config, keep=(site,))[site]  # [layer, batch, ...]
    where = site_where(site, config, clean.shape[1], positions=positions, heads=heads, neurons=neurons, dims=dims)
    keep = keep if isinstance(keep, str) else tuple(keep)
    return replaced_forward(params, jnp.asarray(base), config, site, source, where, layer_mask(layers, config),
                            keep=keep)


# ------------------------------------------------------------------------------------------------ sweeps


@displayable(axes={"values": "layer unit"})
@dataclasses.dataclass
class PatchingResult:
    """The metric of every patched run, and of the clean and corrupted runs."""

    site: str
    by: str
    direction: str
    metric: str
    values: np.ndarray  # [layer, unit] metric of the run patched at (layer, unit) (unit: position, head, ...)
    clean: float  # metric of the clean run
    corrupt: float  # metric of the corrupted run
    layers: np.ndarray
    units: np.ndarray

    @property
    def recovery(self) -> np.ndarray:
        """(values - corrupt) / (clean - corrupt), [layer, unit]."""
        return np.asarray(metrics.normalized_recovery(self.values, self.corrupt, self.clean))

    def _headline(self):
        recovery = self.recovery
        order = np.argsort(-np.abs(np.nan_to_num(recovery)), axis=None)[:8]
        rows = [(int(self.layers[i]), int(self.units[j]), float(self.values[i, j]), float(recovery[i, j]))
                for i, j in zip(*np.unravel_index(order, recovery.shape))]
        return Table(["layer", self.by, self.metric, "recovery"], rows,
                     caption=f"{self.site} by {self.by} ({self.direction}): clean {self.clean:.4g}, corrupt "
                             f"{self.corrupt:.4g}; largest recoveries")

    def _figure(self, max_layers: int = 64):
        """`probes.plots.layer_unit_grid` of the normalised recovery (wide sweeps: the largest cells); None
        beyond `max_layers` layers."""
        if len(self.layers) > max_layers:
            return None
        from probes import plots

        return plots.layer_unit_grid(
            {self.site: self.recovery}, self.layers, self.units, unit=self.by,
            value_label="normalised recovery (patched - corrupt) / (clean - corrupt)",
            what=f"activation patching ({self.direction}) by {self.by}: recovery of {self.metric} (clean "
                 f"{self.clean:.3g}, corrupt {self.corrupt:.3g})")


def patching_scores(params, base, source_tokens, layers, answer, wrong, *, config: Config, site: str, by: str,
                    units: tuple, metric: str, position: int, direction: str, unchanged_before: int, buckets: int,
                    chunk_size: int | None):
    """(values [layer, unit], clean metric, corrupt metric): traceable; see `patching_sweep`."""
    source_trace = forward(params, source_tokens, config, keep=(site, "ln_final"))
    source = source_trace[site]  # [layer, batch, ...]
    source_logits = unembed(source_trace.ln_final[:, [position]], params)[:, 0]  # [batch, vocab]
    cache = cache_run(params, base, config, z=starts_from_z([site]))
    base_logit = base_logits(params, cache, read=(position,))[:, 0]  # [batch, vocab]
    clean_logits, corrupt_logits = ((source_logits, base_logit) if direction == "denoise"
                                    else (base_logit, source_logits))

    def score(logits):  # [batch, 1, vocab] -> []
        return metrics.metric(metric, logits[:, 0], answer=answer, wrong=wrong, reference=clean_logits).mean()

    if by == "position":
        values = sweep_positions(params, config, cache, {site: source}, score, layers=layers,
                                 positions=np.asarray(units), unchanged_before=unchanged_before, buckets=buckets,
                                 read=(position,), chunk_size=chunk_size)[0]
    else:
        values = sweep_units(params, config, cache, site, GRANULARITIES[by], source, score, layers=layers,
                             units=jnp.asarray(units), read=(position,), chunk_size=chunk_size)
    return values, score(clean_logits[:, None]), score(corrupt_logits[:, None])


compiled_patching = jax.jit(patching_scores, static_argnames=(
    "config", "site", "by", "units", "metric", "position", "direction", "unchanged_before", "buckets",
    "chunk_size"))


@checks_tokens("clean_tokens", "corrupt_tokens")
def patching_sweep(params, clean_tokens, corrupt_tokens, config: Config, *, site: str = "resid_pre",
                   by: str = "position", metric: str = "logit_diff", answer=None, wrong=None,
                   direction: str = "denoise", layers=None, units=None, position: int = -1, buckets: int = 2,
                   chunk_size: int | None = None) -> PatchingResult:
    """Patch `site` at every (layer, unit) one at a time and score each run at `position`.

    by              "position" (units are positions), "head" (site z), "neuron" (site mlp_post), "dim" or
                    "layer" (the whole site at one layer: one unit)
    metric          see probes.metrics, averaged over the batch; "kl" is KL(clean || patched)
    answer, wrong   token ids (one per row, or one for all)
    units           which positions / heads / neurons / dims (default all)
    One compiled program: each layer's runs start from that layer's cached input, position sweeps recompute
    positions from the patched one on only, and positions before the first differing token are not run
    (patching there changes nothing)."""
    clean, corrupt = check_pair(clean_tokens, corrupt_tokens)
    base, source_tokens = base_and_source(clean, corrupt, direction)
    check_patch_site(site)
    if by not in GRANULARITIES:
        raise InputError(f"unknown granularity by={by!r}; choose one of {', '.join(GRANULARITIES)}")
    metrics.check_metric(metric, answer=answer, wrong=wrong, reference=True)
    axis = GRANULARITIES[by]
    size = 1 if axis is None else axis_size(site, axis, config, clean.shape[1])
    units = np.arange(size) if units is None else np.atleast_1d(np.asarray(units, np.int64))
    if units.size == 0 or units.min() < 0 or units.max() >= size:
        raise InputError(f"units {units.tolist()} out of range for {axis} of size {size}")
    layers = layer_list(layers, config)
    values, clean_metric, corrupt_metric = compiled_patching(
        params, base, source_tokens, layers, _ids(answer), _ids(wrong), config=config, site=site, by=by,
        units=tuple(units.tolist()), metric=metric, position=position, direction=direction,
        unchanged_before=first_difference(clean, corrupt), buckets=buckets, chunk_size=chunk_size)
    return PatchingResult(site, by, direction, metric, np.asarray(values), float(clean_metric),
                          float(corrupt_metric), layers, units)


def _ids(tokens):
    return None if tokens is None else jnp.asarray(tokens, jnp.int32)


# ------------------------------------------------------------------------------------ attribution patching


@displayable
@dataclasses.dataclass
class Attribution:
    """First-order estimates of every patch's effect on the metric: metric(patched) - metric(base)."""

    direction: str
    metric: str
    base: float  # the metric of the run being patched (corrupt when denoising)
    source: float  # the metric of the run the values come from
    elements: dict[str, np.ndarray]  # site -> [layer, ...site axes without batch]: (a_source - a_base) * grad,
    #                                   summed over the batch (the metric is a batch mean)

    def by(self, site: str, axis: str = "seq") -> np.ndarray:
        """The estimate for patching one index of `axis` ("seq": a position, "head", "d_mlp", "d_model") at
        each layer: the elements summed over every other axis.  -> [layer, size of axis]"""
        names = SITES[site].shape[1:]  # without batch
        if axis not in names:
            raise InputError(f"site {site!r} has no axis {axis!r}; its axes are {', '.join(names)}")
        values = self.elements[site]
        other = tuple(1 + i for i, name in enumerate(names) if name != axis)
        return values.sum(axis=other)

    def by_layer(self, site: str) -> np.ndarray:
        """The estimate for patching the whole site at each layer.  -> [layer]"""
        return self.elements[site].reshape(self.elements[site].shape[0], -1).sum(axis=1)


def attribution_scores(params, base, source_tokens, answer, wrong, *, config: Config, sites: tuple, metric: str,
                       position: int, direction: str):
    """(elements {site: [layer, ...]}, base metric, source metric): traceable; see `attribution_patching`."""
    source_trace = forward(params, source_tokens, config, keep=sites + ("ln_final",))
    source_logits = unembed(source_trace.ln_final[:, [position]], params)[:, 0]  # [batch, vocab]
    base_trace = forward(params, base, config, keep=sites)
    clean_logits = source_logits if direction == "denoise" else None

    def base_metric(deltas):
        """The metric of the base run with deltas added at every site (zero deltas: the base run)."""
        edits = {site: (lambda value, layer, site=site: value + deltas[site][layer]) for site in sites}
        trace = forward(params, base, config, edits=edits, keep=("ln_final",))
        logits = unembed(trace.ln_final[:, [position]], params)[:, 0]  # [batch, vocab]
        reference = logits if clean_logits is None else clean_logits
        return metrics.metric(metric, logits, answer=answer, wrong=wrong,
                              reference=jax.lax.stop_gradient(reference)).mean()

    zeros = {site: jnp.zeros_like(base_trace[site]) for site in sites}
    value, grads = jax.value_and_grad(base_metric)(zeros)
    elements = {site: ((source_trace[site] - base_trace[site]) * grads[site]).sum(axis=1) for site in sites}
    source_metric = metrics.metric(metric, source_logits, answer=answer, wrong=wrong,
                                   reference=source_logits if clean_logits is None else clean_logits).mean()
    return elements, value, source_metric


compiled_attribution = jax.jit(attribution_scores,
                               static_argnames=("config", "sites", "metric", "position", "direction"))


@checks_tokens("clean_tokens", "corrupt_tokens")
def attribution_patching(params, clean_tokens, corrupt_tokens, config: Config, *,
                         sites=("resid_pre", "attn_out", "mlp_out", "z"), metric: str = "logit_diff", answer=None,
                         wrong=None, direction: str = "denoise", position: int = -1) -> Attribution:
    """Attribution patching: the first-order estimate of every patch of `sites` (any (layer, index) of them),
    from one forward on each prompt and one backward pass on the base run.

    Exact for patches that move the metric linearly; `tests/test_patching.py` shows it converging to exact
    patching as the corrupted prompt's activations approach the clean ones. KL's gradient at its minimum is
    zero, so direction="noise" with metric "kl" (KL from the clean run, around the clean run) is refused:
    every estimate would be 0."""
    if direction == "noise" and metric == "kl":
        raise InputError("attribution patching with metric 'kl' and direction 'noise' estimates around the clean "
                         "run, where KL from it has zero gradient: every estimate would be 0; use "
                         "direction='denoise' or another metric")
    clean, corrupt = check_pair(clean_tokens, corrupt_tokens)
    base, source_tokens = base_and_source(clean, corrupt, direction)
    sites = tuple(sites)
    for site in sites:
        check_patch_site(site)
    metrics.check_metric(metric, answer=answer, wrong=wrong, reference=True)
    elements, base_metric, source_metric = compiled_attribution(
        params, base, source_tokens, _ids(answer), _ids(wrong), config=config, sites=sites, metric=metric,
        position=position, direction=direction)
    return Attribution(direction, metric, float(base_metric), float(source_metric),
                       {site: np.asarray(v) for site, v in elements.items()})
