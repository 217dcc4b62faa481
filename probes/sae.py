"""Sparse autoencoders: a dictionary of directions whose sparse combinations reconstruct a site's activations.

    f     = encode(x)  = relu((x * s - b_dec) @ W_enc + b_enc)          "relu": ReLU codes, an L1 penalty on f
                      (only the k largest pre-activations kept)          "topk": exactly k codes at most, no L1
    x_hat = decode(f)  = (f @ W_dec + b_dec) / s

W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]. Row i of W_dec is feature i's
direction; the rows are kept unit-norm (renormalised after every step, and the gradient's component along
each row removed before the step, so the L1 penalty cannot be dodged by shrinking codes and growing rows).
`s` (config.input_scale) is a constant fixed from the training data so that E ||x s||^2 = d_in, which makes
l1_coeff mean the same thing at every site and model.

SAEs loaded from SAELens (`probes.saelens`) may also be
    "jumprelu": f = relu(pre) where pre > threshold, else 0        (params + threshold [d_sae])
    "gated":    f = relu(x' @ (W_enc * exp(r_mag)) + b_mag) where x' @ W_enc + b_gate > 0, else 0
                                                                   (params b_gate, r_mag, b_mag instead of b_enc)
with x' the SAE's input minus b_dec, or the input itself when config.apply_b_dec_to_input is False; and their
input may be normalised per token (config.input_norm): "constant_norm_rescale" scales x to norm sqrt(d_in)
and the reconstruction back by the same factor, "layer_norm" standardises x ((x - mean) / (std + 1e-5), std
with Bessel's correction) and maps the reconstruction back by x_hat * std + mean. Both need the input to
decode: `decode(params, f, config, x)`. tinygpt trains "relu" and "topk" SAEs only.

Loss per input: ||x s - x_hat s||^2 (summed over d_in) + l1_coeff * sum_i f_i   (the L1 term only for "relu").

Training (`train_sae`): Adam (optax) with linear warmup and cosine decay; batches drawn without replacement
from an activation store (`probes.harvest`); the steps run as jit-compiled `lax.scan`s of `log_every` steps.
A latent that has not fired for `dead_steps` steps is dead; every `resample_every` steps dead latents are
resampled as in Anthropic's "Towards Monosemanticity": each is pointed at an input the SAE reconstructs
badly (drawn with probability proportional to its squared error, squared), its encoder column scaled to 0.2 x
the mean alive encoder norm (x 1 when every latent is dead), its bias and its Adam moments zeroed. When every
latent is dead and no resampling is due any more (`resample_every` 0, or fewer steps left than it), training
stops with an SAEError saying what to change, instead of returning an SAE that encodes nothing.

Metrics: L0 (mean number of active latents per token), the fraction of variance explained, the fraction of
dead latents, and the loss recovered when the reconstruction replaces the site in the forward pass:
(CE_ablated - CE_sae) / (CE_ablated - CE_clean), with the site zero-ablated (and mean-ablated) as baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinygpt import forward, sharding
from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.edits import Edit, edit_value
from tinygpt.errors import ArtifactError
from tinygpt.files import save_safetensors
from tinygpt.inputs import checks_tokens
from tinygpt.sites import SITES

from .harvest import argument_error, check_model, check_tensors, is_integer, metadata_json, read_safetensors, \
    site_chunks

KINDS = ("relu", "topk", "jumprelu", "gated")
TRAINED_KINDS = ("relu", "topk")  # the kinds train_sae trains; the others come from SAELens
INPUT_NORMS = ("none", "constant_norm_rescale", "layer_norm")  # per-token input normalisation (SAELens')
LAYER_NORM_EPS = 1e-5  # SAELens' "layer_norm": (x - mean) / (std + eps)
POSITIVE = ("d_in", "d_sae", "k", "batch_size", "steps", "dead_steps")  # the other integer fields may be 0


class SAEError(ArtifactError):
    """A bad SAE configuration, a file that is not an SAE, or activations of the wrong width."""


@displayable
@dataclasses.dataclass(frozen=True)
class SAEConfig:
    d_in: int
    d_sae: int
    kind: str = "relu"  # "relu" (ReLU + L1) or "topk"; "jumprelu" or "gated" (loaded from SAELens)
    l1_coeff: float = 2.0  # weight of sum_i f_i in the loss ("relu")
    k: int = 32  # active latents per input ("topk")
    lr: float = 1e-3
    batch_size: int = 1024
    steps: int = 2000
    warmup_steps: int = 100
    dead_steps: int = 250  # a latent silent for this many steps is dead
    resample_every: int = 500  # resample dead latents every this many steps (0: never)
    input_scale: float = 1.0  # inputs are multiplied by this (set from the data by train_sae)
    seed: int = 0
    site: str | None = None  # where the activations came from (provenance; None for other data)
    layer: int | None = None
    apply_b_dec_to_input: bool = True  # subtract b_dec from the input before encoding
    input_norm: str = "none"  # "none" (x * input_scale), "constant_norm_rescale" or "layer_norm" (per token)

    def __post_init__(self):
        """Every field checked; an error names the field (`argument_error`, so the CLI names its flag)."""
        if self.kind not in KINDS:
            raise argument_error(SAEError, "kind", "{argument} must be one of {kinds}, got {kind!r}", kinds=KINDS,
                                 kind=self.kind)
        for name in ("d_in", "d_sae", "k", "batch_size", "steps", "dead_steps", "warmup_steps", "resample_every",
                     "seed"):
            value, least = getattr(self, name), 1 if name in POSITIVE else 0
            if not is_integer(value) or value < least:
                raise argument_error(SAEError, name, "{argument} must be an integer >= {least}, got {value!r}",
                                     least=least, value=value)
        for name, least, open_ in (("l1_coeff", 0.0, False), ("lr", 0.0, True), ("input_scale", 0.0, True)):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                    or value < least or (open_ and value == least)):
                raise argument_error(SAEError, name, "{argument} must be a finite number {op} {least:g}, got {value!r}",
                                     op=">" if open_ else ">=", least=least, value=value)
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise argument_error(SAEError, "apply_b_dec_to_input", "{argument} must be true or false, got {value!r}",
                                 value=self.apply_b_dec_to_input)
        if self.input_norm not in INPUT_NORMS:
            raise argument_error(SAEError, "input_norm", "{argument} must be one of {norms}, got {value!r}",
                                 norms=INPUT_NORMS, value=self.input_norm)
        if self.input_norm != "none" and self.input_scale != 1.0:
            raise argument_error(SAEError, "input_scale", "{argument} must be 1 with input_norm {norm!r}, got "
                                 "{value!r}", norm=self.input_norm, value=self.input_scale)
        if self.kind == "topk" and self.k > self.d_sae:
            raise argument_error(SAEError, "k", "{argument}={k} exceeds the number of latents d_sae={d_sae}",
                                 k=self.k, d_sae=self.d_sae)
        if self.site is not None:
            if self.site not in SITES:
                raise argument_error(SAEError, "site", "unknown {argument} {site!r}: not a tinygpt site",
                                     site=self.site)
            if SITES[self.site].shape[:2] != ("batch", "seq"):
                raise argument_error(SAEError, "site", "{argument} {site!r} is not one vector per token",
                                     site=self.site)
            if (self.layer is None) == SITES[self.site].per_layer:
                raise argument_error(SAEError, "layer", "site {site!r} {need} a {argument}, got {layer!r}",
                                     site=self.site, layer=self.layer,
                                     need="needs" if SITES[self.site].per_layer else "takes no")
        if self.layer is not None and (not is_integer(self.layer) or self.layer < 0):
            raise argument_error(SAEError, "layer", "{argument} must be None or an integer >= 0, got {layer!r}",
                                 layer=self.layer)


@displayable
@dataclasses.dataclass
class SAE:
    config: SAEConfig
    params: dict  # W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (see `param_shapes`)
    info: dict = dataclasses.field(default_factory=dict)  # the file's `extra`: model, model_fingerprint, harvest


# --------------------------------------------------------------------------------------------- the model


def param_shapes(config: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The SAE's tensors and their shapes: the encoder and decoder, with b_enc for "relu" and "topk",
    b_enc and threshold for "jumprelu", b_gate, r_mag and b_mag for "gated"."""
    d_in, d_sae = config.d_in, config.d_sae
    encoder_biases = {"relu": ("b_enc",), "topk": ("b_enc",), "jumprelu": ("b_enc", "threshold"),
                      "gated": ("b_gate", "r_mag", "b_mag")}[config.kind]
    return {"W_enc": (d_in, d_sae), **{name: (d_sae,) for name in encoder_biases}, "W_dec": (d_sae, d_in),
            "b_dec": (d_in,)}


def init_sae(config: SAEConfig, seed: int = 0, data_mean=None) -> dict:
    """Unit-norm random decoder rows, the encoder tied to the decoder's transpose, b_dec at the (scaled)
    data mean when given."""
    W_dec = np.random.default_rng(seed).standard_normal((config.d_sae, config.d_in))  # [d_sae, d_in]
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = np.zeros(config.d_in) if data_mean is None else np.asarray(data_mean) * config.input_scale
    params = {"W_enc": W_dec.T, "b_enc": np.zeros(config.d_sae), "W_dec": W_dec, "b_dec": b_dec}
    return {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}


def unit_rows(W):
    """Each row divided by its L2 norm.  [n, d] -> [n, d]"""
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-8)


def input_normalization(x, config: SAEConfig):
    """(shift, scale_in, scale_out): the SAE reads (x - shift) * scale_in and its reconstruction x_hat leaves as
    x_hat * scale_out + shift. Constants for input_norm "none"; per token otherwise.  x [..., d_in] ->
    three arrays broadcasting against x ([..., 1] per token)"""
    if config.input_norm == "constant_norm_rescale":
        scale = math.sqrt(config.d_in) / jnp.linalg.norm(x, axis=-1, keepdims=True)  # [..., 1]
        return 0.0, scale, 1.0 / scale
    if config.input_norm == "layer_norm":
        mean = x.mean(-1, keepdims=True)  # [..., 1]
        std = jnp.std(x, axis=-1, keepdims=True, ddof=1)  # [..., 1], Bessel-corrected as torch.std
        return mean, 1.0 / (std + LAYER_NORM_EPS), std
    return 0.0, config.input_scale, 1.0 / config.input_scale


def encoder_input(params, x, config: SAEConfig):
    """The vector the encoder multiplies: the normalised input, minus b_dec when apply_b_dec_to_input.
    x [..., d_in] -> [..., d_in]"""
    if config.input_norm == "none":
        scaled = x * config.input_scale  # [..., d_in]
    else:
        shift, scale_in, _ = input_normalization(x, config)
        scaled = (x - shift) * scale_in  # [..., d_in]
    return scaled - params["b_dec"] if config.apply_b_dec_to_input else scaled


def pre_activations(params, x, config: SAEConfig):
    """encoder_input(x) @ W_enc + b_enc, e.g. (x s - b_dec) @ W_enc + b_enc; for "gated" the gate's, with b_gate.
    x [..., d_in] -> [..., d_sae]"""
    bias = params["b_gate"] if config.kind == "gated" else params["b_enc"]
    return encoder_input(params, x, config) @ params["W_enc"] + bias


def encode(params, x, config: SAEConfig):
    """Feature activations f >= 0.  x [..., d_in] -> [..., d_sae]"""
    if config.kind == "gated":
        return gated_encode(params, encoder_input(params, x, config))
    pre = pre_activations(params, x, config)  # [..., d_sae]
    if config.kind == "topk":
        threshold = jax.lax.stop_gradient(kth_largest(pre, config.k))  # [..., 1]
        return jnp.where(pre >= threshold, jax.nn.relu(pre), 0.0)
    if config.kind == "jumprelu":
        return jnp.where(pre > params["threshold"], jax.nn.relu(pre), 0.0)
    return jax.nn.relu(pre)


def gated_encode(params, x_in):
    """A gated SAE's codes: the gate (x_in @ W_enc + b_gate > 0) decides which latents fire, the magnitude
    path (the same encoder scaled by exp(r_mag), its own bias b_mag, a ReLU) how strongly.
    x_in [..., d_in] (the encoder input) -> [..., d_sae]"""
    gate = x_in @ params["W_enc"] + params["b_gate"] > 0  # [..., d_sae]
    magnitude = jax.nn.relu(x_in @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"])  # [..., d_sae]
    return jnp.where(gate, magnitude, 0.0)


def kth_largest(x, k: int, iterations: int = 32):
    """A threshold t per row with exactly the k largest values of the row >= t.  [..., n] -> [..., 1]

    Bisection between the row's min and max: keep the half where at least k values lie above. It selects
    the same entries as `jax.lax.top_k(x, k)` (unless the k-th and (k+1)-th values are closer than
    (max - min) / 2**32 or one float step), and runs several times faster than XLA's top_k on CPU."""
    low, high = x.min(-1, keepdims=True), x.max(-1, keepdims=True)  # [..., 1]

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        enough_above = (x >= middle).sum(-1, keepdims=True) >= k
        return jnp.where(enough_above, middle, low), jnp.where(enough_above, high, middle)

    low, _ = jax.lax.fori_loop(0, iterations, halve, (low, high))
    return low


def decode(params, f, config: SAEConfig, x=None):
    """Reconstruction in the input's units.  f [..., d_sae] -> [..., d_in]

    With a per-token input_norm the reconstruction is mapped back with the statistics of the input x
    [..., d_in] that f encodes, so x is then required."""
    if config.input_norm == "none":
        return (f @ params["W_dec"] + params["b_dec"]) / config.input_scale
    if x is None:
        raise SAEError(f"decode of an SAE with input_norm {config.input_norm!r} needs the input x that the codes "
                       f"encode (its per-token normalisation is undone): call decode(params, f, config, x)")
    shift, _, scale_out = input_normalization(x, config)
    return (f @ params["W_dec"] + params["b_dec"]) * scale_out + shift


def reconstruct(params, x, config: SAEConfig):
    """decode(encode(x)).  [..., d_in] -> [..., d_in]"""
    return decode(params, encode(params, x, config), config, x)


def sae_loss(params, x, config: SAEConfig):
    """Mean over the batch of ||x s - x_hat s||^2 + l1_coeff * sum_i f_i (L1 only for "relu").
    x [batch, d_in] -> (loss, (f [batch, d_sae], squared error [batch]))"""
    f = encode(params, x, config)  # [batch, d_sae]
    error = (decode(params, f, config, x) - x) * config.input_scale  # [batch, d_in]
    squared_error = (error**2).sum(-1)  # [batch]
    sparsity = f.sum(-1) if config.kind == "relu" else jnp.zeros_like(squared_error)  # [batch]
    loss = squared_error.mean() + config.l1_coeff * sparsity.mean()
    return loss, (f, squared_error)


# ------------------------------------------------------------------------------------------------ training


def remove_parallel_component(grad_W_dec, W_dec):
    """The gradient of each unit-norm decoder row minus its component along the row.  [d_sae, d_in]"""
    parallel = (grad_W_dec * W_dec).sum(-1, keepdims=True)  # [d_sae, 1]
    return grad_W_dec - parallel * W_dec


def make_optimizer(config: SAEConfig) -> optax.GradientTransformation:
    """Adam; the learning rate warms up linearly (over at most half the steps), then decays to 10% (cosine)."""
    warmup = min(config.warmup_steps, config.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, config.steps, end_value=0.1 * config.lr)
    return optax.adam(schedule)


def make_train_step(config: SAEConfig, optimizer):
    """One training step, a pure function: (params, opt_state, steps_since_fired [d_sae], x [batch, d_in])
    -> (params, opt_state, steps_since_fired, metrics). steps_since_fired counts, per latent, the steps since it
    was last active on any row of a batch."""

    def step(params, opt_state, steps_since_fired, x):
        (loss, (f, squared_error)), grads = jax.value_and_grad(sae_loss, has_aux=True)(params, x, config)
        grads = {**grads, "W_dec": remove_parallel_component(grads["W_dec"], params["W_dec"])}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "W_dec": unit_rows(params["W_dec"])}
        fired = (f > 0).any(axis=0)  # [d_sae]
        steps_since_fired = jnp.where(fired, 0, steps_since_fired + 1)
        metrics = {"loss": loss, "mse": squared_error.mean() / config.d_in, "l0": (f > 0).sum(-1).mean(),
                   "dead_fraction": (steps_since_fired >= config.dead_steps).mean()}
        return params, opt_state, steps_since_fired, metrics

    return step


def make_train_steps(config: SAEConfig, optimizer, mesh=None):
    """A jit-compiled run of consecutive steps, one per batch of xs [steps, batch, d_in] (a `lax.scan`):
    (params, opt_state, steps_since_fired, xs) -> (params, opt_state, steps_since_fired, metrics averaged
    over the steps). With a `mesh`, every output is replicated over it: give xs split along its batch axis
    and the rest replicated, and the compiled program is data parallel (each device's rows' share of the
    gradient, summed across devices by the collective XLA inserts for the batch mean)."""
    step = make_train_step(config, optimizer)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else sharding.replicated(mesh))
    def run(params, opt_state, steps_since_fired, xs):
        def scan_step(carry, x):
            params, opt_state, steps_since_fired, metrics = step(*carry, x)
            return (params, opt_state, steps_since_fired), metrics

        carry, metrics = jax.lax.scan(scan_step, (params, opt_state, steps_since_fired), xs)  # metrics [steps]
        return *carry, jax.tree.map(jnp.mean, metrics)

    return run


def resample_dead(params, opt_state, steps_since_fired, x, rng: np.random.Generator, *, optimizer,
                  config: SAEConfig):
    """Re-initialise the dead latents (silent for config.dead_steps steps or more) towards inputs x [n, d_in]
    that the SAE reconstructs badly (drawn with probability proportional to their squared error, squared),
    and zero their Adam moments and silence counts. Returns (params, opt_state, steps_since_fired)."""
    dead = np.asarray(steps_since_fired) >= config.dead_steps  # [d_sae]
    if not dead.any():
        return params, opt_state, steps_since_fired
    weight = np.asarray(_squared_errors(params, x, config), np.float64) ** 2  # [n]
    chosen = rng.choice(len(x), size=config.d_sae, p=weight / weight.sum() if weight.sum() > 0 else None)
    params, opt_state = _point_latents_at(params, opt_state, dead, x[chosen], optimizer=optimizer, config=config)
    return params, opt_state, np.where(dead, 0, steps_since_fired)


@functools.partial(jax.jit, static_argnames="config")
def _squared_errors(params, x, config: SAEConfig):
    return sae_loss(params, x, config)[1][1]  # [n]


@functools.partial(jax.jit, static_argnames=("optimizer", "config"))
def _point_latents_at(params, opt_state, dead, inputs, *, optimizer, config: SAEConfig):
    """Latent i, if dead, gets decoder row = the unit direction of inputs[i] (scaled, minus b_dec), encoder
    column = that direction x 0.2 x the mean encoder norm of the alive latents (1 when none is alive: a zero
    column would never fire), b_enc = 0, Adam moments 0.  dead bool [d_sae], inputs [d_sae, d_in]."""
    directions = unit_rows(inputs * config.input_scale - params["b_dec"])  # [d_sae, d_in]
    encoder_norms = jnp.linalg.norm(params["W_enc"], axis=0)  # [d_sae]
    n_alive = (~dead).sum()
    alive_mean_norm = jnp.where(n_alive > 0, jnp.where(dead, 0.0, encoder_norms).sum() / jnp.maximum(n_alive, 1), 1.0)
    params = {
        "W_enc": jnp.where(dead[None, :], directions.T * 0.2 * alive_mean_norm, params["W_enc"]),
        "b_enc": jnp.where(dead, 0.0, params["b_enc"]),
        "W_dec": jnp.where(dead[:, None], directions, params["W_dec"]),
        "b_dec": params["b_dec"],
    }

    def zero_dead(moments):  # an Adam moment, shaped like params
        return {"W_enc": jnp.where(dead[None, :], 0.0, moments["W_enc"]),
                "b_enc": jnp.where(dead, 0.0, moments["b_enc"]),
                "W_dec": jnp.where(dead[:, None], 0.0, moments["W_dec"]),
                "b_dec": moments["b_dec"]}

    opt_state = optax.tree_utils.tree_map_params(optimizer, zero_dead, opt_state,
                                                 is_leaf=lambda t: isinstance(t, dict) and "W_dec" in t)
    return params, opt_state


def input_scale_for(acts, n_sample: int = 20000, seed: int = 0) -> float:
    """The constant s with E ||x s||^2 = d_in, estimated on a sample of rows."""
    rows = np.sort(np.random.default_rng(seed).choice(len(acts), min(n_sample, len(acts)), replace=False))
    sample = np.asarray(acts[rows], np.float64)
    return float(np.sqrt(sample.shape[1] / (sample**2).sum(-1).mean()))


def batch_rows(n: int, batch_size: int, rng: np.random.Generator):
    """Endless sorted row indices [batch_size] into n rows, each epoch a new permutation (sorted, so that
    memory-mapped reads run sequential-ish)."""
    if n < batch_size:
        raise argument_error(SAEError, "batch_size", "{argument} {batch_size} is more than the {n} activation rows",
                             batch_size=batch_size, n=n)
    while True:
        order = rng.permutation(n)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield np.sort(order[start: start + batch_size])


def split_batches(acts, rows, mesh):
    """The batches acts[rows] (rows [steps, batch]) as one array [steps, batch, d_in] split along its batch
    axis over the mesh's devices, each process reading only the rows its own devices hold."""
    shape = (*rows.shape, acts.shape[1])
    return jax.make_array_from_callback(shape, sharding.split_along(mesh, 1),
                                        lambda index: np.asarray(acts[rows[index[:2]]], np.float32)[(..., index[2])])


def train_sae(acts, config: SAEConfig, *, normalize: bool = True, progress: bool = True, log_every: int = 100,
              on_round: Callable[[dict], None] | None = None, mesh=None):
    """Train an SAE on activation rows acts [n, d_in] (an array or a memory-mapped harvest).

    The steps run in rounds of `log_every` (one compiled `lax.scan` each); after a round its mean metrics are
    logged, and dead latents are resampled when the round crossed a multiple of
    config.resample_every (and at least that many steps remain). on_round(history entry) is called after
    each round. Every latent dead with no resampling left to revive one is an SAEError.
    Returns (SAE, history: a list of {step, loss, mse, l0, dead_fraction}, averaged over each round).

    Data parallel over the devices of `mesh` (default: every device of every process, `tinygpt.distributed`;
    with one device, plain single-device training): each batch is split over the devices, the SAE and
    Adam's state replicated, and the compiled step forms the whole batch's mean gradient itself. The batches
    and the seed are the same, so the losses equal one device's to float rounding (the sums run in another
    order). config.batch_size must divide by the number of devices. With several processes every process
    calls it with the same acts (the harvest, on a filesystem all of them see), reads only the rows of each
    batch that its devices hold, and gets the same SAE."""
    if acts.ndim != 2 or acts.shape[1] != config.d_in:
        raise SAEError(f"activations have shape {tuple(acts.shape)}, expected [n, d_in={config.d_in}]")
    if config.kind not in TRAINED_KINDS or (config.apply_b_dec_to_input, config.input_norm) != (True, "none"):
        raise argument_error(SAEError, "kind", "train_sae trains kinds {kinds} with apply_b_dec_to_input and "
                             "input_norm 'none'; got {argument} {kind!r}, apply_b_dec_to_input {apply}, input_norm "
                             "{norm!r} (such SAEs are loaded from SAELens)", kinds=TRAINED_KINDS, kind=config.kind,
                             apply=config.apply_b_dec_to_input, norm=config.input_norm)
    if not is_integer(log_every) or log_every < 1:
        raise argument_error(SAEError, "log_every", "{argument} must be at least 1, got {value!r}", value=log_every)
    if len(acts) < config.batch_size:
        raise argument_error(SAEError, "batch_size", "{argument} {batch_size} is more than the {n} activation rows",
                             batch_size=config.batch_size, n=len(acts))
    if normalize:
        config = dataclasses.replace(config, input_scale=input_scale_for(acts, seed=config.seed))
    rng = np.random.default_rng(config.seed)
    sample = np.asarray(acts[np.sort(rng.choice(len(acts), min(len(acts), 20000), replace=False))], np.float32)
    params = init_sae(config, config.seed, data_mean=sample.mean(0))
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    mesh = data_parallel_mesh(config, mesh)
    run_steps = make_train_steps(config, optimizer, mesh)
    steps_since_fired = np.zeros(config.d_sae, np.int32)
    if mesh is not None:
        params, opt_state, steps_since_fired = sharding.replicate((params, opt_state, steps_since_fired), mesh)
    data = batch_rows(len(acts), config.batch_size, rng)
    history = []
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, desc=f"SAE {config.kind}", disable=not progress)
    done = 0
    try:
        while done < config.steps:
            round_steps = min(log_every, config.steps - done)
            rows = np.stack([next(data) for _ in range(round_steps)])  # [round_steps, batch]
            if mesh is None:
                xs = np.asarray(acts[rows.reshape(-1)], np.float32).reshape(*rows.shape, -1)  # [round_steps, batch, d_in]
            else:  # each device its share of every batch, read by its own process
                xs = split_batches(acts, rows, mesh)
            params, opt_state, steps_since_fired, metrics = run_steps(params, opt_state, steps_since_fired, xs)
            previous, done = done, done + round_steps
            resampling_left = config.resample_every and config.steps - done >= config.resample_every
            crossed = config.resample_every and done // config.resample_every > previous // config.resample_every
            if crossed and resampling_left:
                if mesh is not None:  # on this process's copy (every process computes the same), then replicated
                    params, opt_state, steps_since_fired = jax.tree.map(np.asarray, (params, opt_state,
                                                                                     steps_since_fired))
                params, opt_state, steps_since_fired = resample_dead(params, opt_state, steps_since_fired, sample,
                                                                     rng, optimizer=optimizer, config=config)
                if mesh is not None:
                    params, opt_state, steps_since_fired = sharding.replicate((params, opt_state,
                                                                               steps_since_fired), mesh)
            elif not resampling_left and np.all(np.asarray(steps_since_fired) >= min(config.dead_steps, done)):
                raise SAEError(f"every latent of the SAE is dead at step {done} of {config.steps} (none fired in the "
                               f"last {min(config.dead_steps, done)} steps) and no resampling is left to revive them: "
                               f"lower l1_coeff (now {config.l1_coeff:g}) or lr (now {config.lr:g}), or resample dead "
                               f"latents (resample_every, now {config.resample_every})")
            history.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
            bar.update(round_steps)
            bar.set_postfix(mse=f"{history[-1]['mse']:.4f}", l0=f"{history[-1]['l0']:.1f}",
                            dead=f"{history[-1]['dead_fraction']:.2f}")
            if on_round is not None:
                on_round(history[-1])
    finally:
        bar.close()
    if mesh is not None:  # the replicated SAE as this process's own arrays
        params = {name: jnp.asarray(np.asarray(value)) for name, value in params.items()}
    return SAE(config, params), history


def data_parallel_mesh(config: SAEConfig, mesh=None):
    """The mesh train_sae splits its batches over: `mesh`, or every device when there are several; None
    for one device (plain training). The batch size must divide by its device count."""
    mesh = sharding.device_mesh() if mesh is None and jax.device_count() > 1 else mesh
    if mesh is None or mesh.size == 1:
        return None
    if config.batch_size % mesh.size:
        raise argument_error(SAEError, "batch_size", "{argument} {batch_size} does not split over the {n} devices "
                             "(data parallel training): make it a multiple of {n}", batch_size=config.batch_size,
                             n=mesh.size)
    return mesh


# ------------------------------------------------------------------------------------------------ metrics


@displayable
@dataclasses.dataclass
class SAEMetrics:
    l0: float  # mean number of active latents per row
    fve: float  # fraction of variance explained: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2
    mse: float  # mean squared error per element, in the input's units
    dead_fraction: float  # latents that never fire on these rows
    n_rows: int


@functools.partial(jax.jit, static_argnames="config")
def _batch_statistics(params, x, valid, config: SAEConfig):
    """Over the valid rows of x [batch, d_in]: the number of active latents, the summed squared error, and
    which latents fired [d_sae]."""
    f = encode(params, x, config)  # [batch, d_sae]
    active = (f > 0) & valid[:, None]  # [batch, d_sae]
    error = (decode(params, f, config, x) - x) * valid[:, None]  # [batch, d_in]
    return active.sum(), (error**2).sum(), active.any(axis=0)


def evaluate(sae: SAE, acts, *, batch_size: int = 4096) -> SAEMetrics:
    """L0, fraction of variance explained, MSE and dead fraction over acts [n, d_in]."""
    if acts.ndim != 2 or acts.shape[1] != sae.config.d_in:
        raise SAEError(f"activations have shape {tuple(acts.shape)}, the SAE expects [n, {sae.config.d_in}]")
    n, d = acts.shape
    chunks = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    mean = sum(np.asarray(acts[a:b], np.float64).sum(0) for a, b in chunks) / n  # [d_in]
    active = squared_error = total_variance = 0.0
    fired = np.zeros(sae.config.d_sae, bool)
    for a, b in chunks:
        x = np.zeros((batch_size, d), np.float32)  # one shape for every chunk: the tail is padded
        x[: b - a] = acts[a:b]
        valid = np.arange(batch_size) < b - a
        n_active, error, fired_here = _batch_statistics(sae.params, x, valid, sae.config)
        active += float(n_active)
        squared_error += float(error)
        fired |= np.asarray(fired_here)
        total_variance += float(((x[: b - a] - mean) ** 2).sum())
    return SAEMetrics(l0=active / n, fve=1.0 - squared_error / total_variance, mse=squared_error / (n * d),
                      dead_fraction=float(1.0 - fired.mean()), n_rows=n)


@displayable
@dataclasses.dataclass
class LossRecovered:
    ce_clean: float  # next-token cross-entropy (nats) of the unedited model
    ce_sae: float  # with the site replaced by the SAE's reconstruction
    ce_zero: float  # with the site zero-ablated
    ce_mean: float  # with the site replaced by its mean activation
    recovered: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    recovered_vs_mean: float  # (ce_mean - ce_sae) / (ce_mean - ce_clean)


def splice_edit(site_value_fn, layer: int | None):
    """An edit that replaces the site's value by site_value_fn(value) at block `layer` (every call for global
    sites). The replacement sees the value flattened to [batch, seq, width]."""

    def edit(value, current_layer):
        flat = value.reshape(*value.shape[:2], -1)  # [batch, seq, width]
        new = site_value_fn(flat).reshape(value.shape)
        return new if layer is None else jnp.where(current_layer == layer, new, value)

    return edit


@edit_value("params", static=("config",))
class Splice(Edit):
    """The edit value replacing a site's value by an SAE's reconstruction (the value flattened to [batch,
    seq, d_in], as the SAE reads it): its weights are leaves and its SAEConfig static, so a forward with it
    compiles once and runs any SAE of the same shapes at compiled speed. Made by `sae_edit`."""

    params: dict
    config: SAEConfig

    def change(self, value, layer):
        flat = value.reshape(*value.shape[:2], -1)  # [batch, seq, d_in]
        return reconstruct(self.params, flat, self.config).reshape(value.shape)


def sae_edit(sae: SAE, *, positions=None) -> Splice:
    """The SAE spliced into the forward at the site and layer it was trained on (`sae.config.site` and
    `.layer`), at every position or the absolute `positions`: `forward(..., edits=sae_edit(sae))`."""
    if sae.config.site is None:
        raise SAEError("this SAE records no site (it was trained on other data): splice it with "
                       "splice_edit at the site you choose")
    return Splice(sae.config.site, sae.params, sae.config, layer=sae.config.layer, positions=positions)


def next_token_loss(params, tokens, config: Config, edits=None):
    """Mean next-token cross-entropy (nats) of each window.  tokens [batch, seq] -> [batch]"""
    logits = forward(params, tokens, config, edits=edits, keep=("logits",)).logits  # [batch, seq, vocab]
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, seq - 1, vocab]
    targets = tokens[:, 1:]  # [batch, seq - 1]
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0].mean(-1)


@functools.lru_cache(maxsize=32)
def _spliced_losses_fn(config: Config, sae_config: SAEConfig, site: str, layer: int | None):
    """jit (params, sae_params, mean [width], tokens [batch, seq]) -> {mode: CE per window [batch]} for the
    clean model and the site replaced by the SAE's reconstruction, zeros, or its mean."""

    @jax.jit
    def run(params, sae_params, mean, tokens):
        replacements = {
            "sae": lambda x: reconstruct(sae_params, x, sae_config),
            "zero": jnp.zeros_like,
            "mean": lambda x: jnp.broadcast_to(mean, x.shape),
        }
        losses = {"clean": next_token_loss(params, tokens, config)}
        for mode, replace in replacements.items():
            losses[mode] = next_token_loss(params, tokens, config, {site: splice_edit(replace, layer)})
        return losses

    return run


@checks_tokens("windows")
def loss_recovered(params, config: Config, sae: SAE, windows, *, mean_activation=None, batch: int = 8,
                   site: str | None = None, layer: int | None = None) -> LossRecovered:
    """Cross-entropy on token windows [n, seq] with the SAE's reconstruction spliced in at its site (from the
    SAE config, or `site`/`layer`), against the clean model and zero / mean ablation of the site. The mean
    ablation puts in `mean_activation` [d_in] (default: the site's mean over every token of `windows`)."""
    site = site or sae.config.site
    layer = sae.config.layer if layer is None else layer
    if site is None:
        raise SAEError("the SAE does not record its site: pass site= (and layer=)")
    windows = np.asarray(windows, np.int32)
    if mean_activation is None:  # the site's mean over every token of the windows
        sums = [values.sum(axis=(0, 1), dtype=np.float64) for _, values in
                site_chunks(params, config, windows, site, layer, batch=batch)]
        mean = jnp.asarray(sum(sums) / windows.size, jnp.float32)
    else:
        mean = jnp.asarray(mean_activation, jnp.float32)
    run = _spliced_losses_fn(config, sae.config, site, layer)
    per_window = {"clean": [], "sae": [], "zero": [], "mean": []}
    for start in range(0, len(windows), batch):
        chunk = windows[start: start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])  # one shape
        for mode, losses in run(params, sae.params, mean, padded).items():
            per_window[mode].append(np.asarray(losses)[: len(chunk)])
    ce = {mode: float(np.concatenate(losses).mean()) for mode, losses in per_window.items()}
    return LossRecovered(ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"], ce_mean=ce["mean"],
                         recovered=(ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
                         recovered_vs_mean=(ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]))


# ------------------------------------------------------------------------------------------------ save / load

METADATA_KEY = "tinygpt_sae_config"
EXTRA_KEY = "tinygpt_sae_extra"
# Fields added for SAELens' SAEs, saved only when they differ from these defaults: a file of a relu or topk
# SAE is byte for byte what it was before they existed.
LATER_FIELDS = {"apply_b_dec_to_input": True, "input_norm": "none"}


def config_fields(config: SAEConfig) -> dict:
    """The SAEConfig as saved: every field, less the later ones at their defaults (LATER_FIELDS)."""
    return {name: value for name, value in dataclasses.asdict(config).items()
            if name not in LATER_FIELDS or value != LATER_FIELDS[name]}


def save_sae(sae: SAE, path: str | os.PathLike, extra: dict | None = None) -> None:
    """safetensors file of the SAE's tensors (`param_shapes`), the SAEConfig (and `extra`, e.g. the model and its
    `model_fingerprint`, checked by `load_sae(path, params)`) as JSON metadata. Written atomically (a
    temporary file beside `path`, fsynced, renamed) and deterministically (sorted keys)."""
    tensors = {name: np.asarray(value, np.float32) for name, value in sae.params.items()}
    metadata = {METADATA_KEY: json.dumps(config_fields(sae.config), sort_keys=True)}
    if extra:
        metadata[EXTRA_KEY] = json.dumps(extra, sort_keys=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, metadata)


def load_sae(path: str | os.PathLike, params=None) -> SAE:
    """An SAE written by `save_sae`, checked: its config (known keys, each field valid, a known site), its
    tensors (float32, the config's shapes, finite) and, given the model's `params`, that it was trained on
    this model's activations (the model fingerprint in its metadata). Any problem is one SAEError.
    (`probes.saelens.load_any` reads these files and SAELens' directories.)"""
    path = Path(path)
    where = f"SAE file {str(path)!r}"
    tensors, metadata = read_safetensors(path, "SAE file", error=SAEError)
    if METADATA_KEY not in metadata:
        raise SAEError(f"{where} is not an SAE saved by tinygpt (no {METADATA_KEY} in its metadata)")
    fields = metadata_json(metadata, METADATA_KEY, where, error=SAEError)
    if not isinstance(fields, dict):
        raise SAEError(f"{where}: metadata {METADATA_KEY!r} is not a JSON object")
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SAEError(f"{where}: unknown SAEConfig key(s) {', '.join(map(repr, unknown))}; the file was written by "
                       f"another program or version, or edited")
    missing = sorted({"d_in", "d_sae"} - set(fields))
    if missing:
        raise SAEError(f"{where}: the SAEConfig lacks {', '.join(missing)}")
    try:
        config = SAEConfig(**fields)
    except SAEError as e:
        raise SAEError(f"{where}: {e}") from None
    check_tensors(tensors, param_shapes(config), where, error=SAEError)
    info = metadata_json(metadata, EXTRA_KEY, where, error=SAEError, default={})
    if not isinstance(info, dict):
        raise SAEError(f"{where}: metadata {EXTRA_KEY!r} is not a JSON object")
    sae = SAE(config, {name: jnp.asarray(value) for name, value in tensors.items()}, info)
    check_sae_model(sae, params, where)
    return sae


def check_sae_model(sae: SAE, params, where: str = "the SAE") -> None:
    """Refuse an SAE trained on another model's activations (when it records the model fingerprint)."""
    check_model(sae.info.get("model_fingerprint"), params, where, error=SAEError)


def sae_extra(path: str | os.PathLike) -> dict:
    """The `extra` metadata saved with an SAE (empty when none)."""
    return load_sae(path).info


# ------------------------------------------------------------------------------------- synthetic ground truth


def synthetic_superposition(n_features: int, d: int, n_samples: int, *, p_active: float = 0.05, seed: int = 0):
    """Data made of known sparse features in superposition: a dictionary of n_features random unit
    directions in d < n_features dims, and inputs x = codes @ dictionary where each feature is active
    independently with probability p_active, with a magnitude uniform in [0.5, 1.5].
    Returns (x [n_samples, d] float32, dictionary [n_features, d], codes [n_samples, n_features])."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_features, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    active = rng.random((n_samples, n_features)) < p_active
    codes = active * rng.uniform(0.5, 1.5, (n_samples, n_features))
    return (codes @ dictionary).astype(np.float32), dictionary.astype(np.float32), codes.astype(np.float32)


def max_cosines(true_dictionary, learned_dictionary) -> np.ndarray:
    """For every true feature, the largest cosine with any learned direction (1.0: recovered exactly).
    true [n_true, d], learned [n_learned, d] -> [n_true]"""
    true = np.asarray(true_dictionary, np.float64)
    learned = np.asarray(learned_dictionary, np.float64)
    true = true / np.linalg.norm(true, axis=1, keepdims=True)
    learned = learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)
    return (true @ learned.T).max(axis=1)
