"""Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): a few residual
dimensions take values thousands of times larger than the rest, at a few positions (the first token,
delimiters), appear abruptly in one early layer and then stay put. In GPT-2 small, dims 447 and 138 grow to
thousands at layer 2.

The investigation, one function per stage (`investigate` runs them all):

    detect        residual activations (resid_post) with |value| > threshold and >= ratio x the median |value|
                  of their hidden state; each massive dim's trajectory across layers
    exclusion     rerun with all attention disabled (attn_out = 0), then with all MLPs disabled (mlp_out = 0),
                  the residual stream kept: percent change of the top activations at every layer
    mlp_stages    inside the MLP of the layer where they first appear: max |value| at its input (ln2), after
                  W_in (mlp_pre), after GELU (mlp_post) and at its output (mlp_out)
    geometry      SVD of that layer's W_out [d_mlp, d_model] = U S V^T: sigma1, sigma2, their ratio, and the
                  regression of the massive dim's output on each token's projection h . v1, where h is the
                  token's mlp_post and v1 = U[:, 0] the top singular direction on the d_mlp side
    intervention  set the massive activations (at that layer's output) to zero, then to their mean, and
                  report the change in next-token loss

Layers are 0-based block indices: an activation at layer l is held by block l's output resid_post[l].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from probes import metrics
from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError

# --------------------------------------------------------------------------------------------------- detect


@displayable
@dataclasses.dataclass
class Activation:
    """One massive activation."""

    prompt: int  # index of the prompt
    layer: int  # block whose output resid_post holds it
    dim: int  # residual dimension
    position: int
    token: int  # token id at that position
    value: float
    ratio: float  # |value| / median |value| of its hidden state


def massive_mask(resid, threshold: float, ratio: float):
    """Which entries are massive: |x| > threshold and |x| >= ratio x the median |x| of their vector.
    resid [..., d_model] -> (bool [..., d_model], ratio to the median [..., d_model])"""
    magnitude = jnp.abs(resid)
    median = jnp.median(magnitude, axis=-1, keepdims=True)  # [..., 1]
    to_median = magnitude / jnp.maximum(median, jnp.finfo(magnitude.dtype).tiny)
    return (magnitude > threshold) & (to_median >= ratio), to_median


def residual_stream(params, tokens, config: Config, kill: str | None = None):
    """resid_post [layer, seq, d_model] of one prompt, token ids [seq]; kill "attn_out" or "mlp_out" to run
    with every attention / MLP output zeroed (the residual stream kept)."""
    attention, mlp = float(kill != "attn_out"), float(kill != "mlp_out")
    return scaled_sublayers(params, tokens, config, attention, mlp)


@functools.partial(jax.jit, static_argnames=("config",))
def scaled_sublayers(params, tokens, config: Config, attention, mlp):
    """resid_post [layer, seq, d_model] with every attn_out multiplied by `attention` and every mlp_out by
    `mlp` (1: as is, 0: disabled); one compiled program for the three runs of the exclusion test."""
    edits = {"attn_out": lambda value, layer: value * attention, "mlp_out": lambda value, layer: value * mlp}
    return forward(params, tokens[None], config, edits=edits, keep=("resid_post",)).resid_post[:, 0]


@checks_tokens("prompts")
def detect(params, config: Config, prompts, *, threshold: float = 100.0, ratio: float = 1000.0) -> list[Activation]:
    """Every massive activation of every prompt (token id arrays), largest |value| first."""
    found = []
    for index, tokens in enumerate(prompts):
        resid = residual_stream(params, jnp.asarray(tokens), config)  # [layer, seq, d_model]
        mask, to_median = (np.asarray(x) for x in massive_mask(resid, threshold, ratio))
        resid = np.asarray(resid)
        for layer, position, dim in zip(*np.nonzero(mask)):
            found.append(Activation(index, int(layer), int(dim), int(position), int(tokens[position]),
                                    float(resid[layer, position, dim]), float(to_median[layer, position, dim])))
    return sorted(found, key=lambda a: -abs(a.value))


@displayable(axes={"values": "layer"})
@dataclasses.dataclass
class Trajectory:
    """One massive dim at the (prompt, position) where it is largest, at every layer."""

    dim: int
    prompt: int
    position: int
    token: int
    values: np.ndarray  # [layer] resid_post[layer, position, dim]


def top_activations(activations: list[Activation], top: int) -> list[Activation]:
    """The largest activation of each of the `top` largest distinct (dim, prompt, position)."""
    seen, out = set(), []
    for a in activations:
        if (a.dim, a.prompt, a.position) not in seen:
            seen.add((a.dim, a.prompt, a.position))
            out.append(a)
    return out[:top]


@checks_tokens("prompts")
def trajectories(params, config: Config, prompts, activations: list[Activation]) -> list[Trajectory]:
    """For each massive dim, its value at every layer, at the (prompt, position) where it is largest."""
    out, done = [], set()
    for a in activations:  # largest first
        if a.dim in done:
            continue
        done.add(a.dim)
        resid = np.asarray(residual_stream(params, jnp.asarray(prompts[a.prompt]), config))
        out.append(Trajectory(a.dim, a.prompt, a.position, a.token, resid[:, a.position, a.dim]))
    return out


@displayable(axes={"max_abs": "layer", "dim": "layer", "position": "layer", "value": "layer",
                    "to_median": "layer", "median": "layer", "count": "layer"})
@dataclasses.dataclass
class LayerSummary:
    """Per layer of one prompt: its largest residual activation (resid_post, over positions and dims), where
    it is, how it compares to its hidden state's median |value|, and how many activations are massive."""

    threshold: float
    ratio: float
    max_abs: np.ndarray  # [layer] largest |resid_post[layer, position, dim]|
    dim: np.ndarray  # [layer] its residual dimension
    position: np.ndarray  # [layer] its position
    value: np.ndarray  # [layer] its signed value
    to_median: np.ndarray  # [layer] its |value| / the median |value| of its hidden state
    median: np.ndarray  # [layer] median |resid_post| over every position and dim of the layer
    count: np.ndarray  # [layer] activations that are massive (`massive_mask`)
    tokens: np.ndarray | None = None  # [seq] the prompt's ids (labels the figure; None: no figure)

    def _figure(self):
        """`probes.plots.massive_layers`: per layer, the largest and the median |resid_post|."""
        if self.tokens is None:
            return None
        from probes import plots
        from tinygpt import display

        return plots.massive_layers(self, display.pieces(self.tokens), prompt=display.decode(self.tokens))


@checks_tokens("tokens")
def layer_summary(params, config: Config, tokens, *, threshold: float = 100.0,
                  ratio: float = 1000.0) -> LayerSummary:
    """`LayerSummary` of one prompt, token ids [seq] (or [1, seq]): one forward pass."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise InputError("give a non-empty prompt")
    resid = residual_stream(params, jnp.asarray(tokens), config)  # [layer, seq, d_model]
    mask, to_median = (np.asarray(x) for x in massive_mask(resid, threshold, ratio))
    resid = np.asarray(resid, np.float64)
    n_layer, seq, d_model = resid.shape
    flat = np.abs(resid).reshape(n_layer, -1)
    where = np.argmax(flat, axis=1)  # [layer]
    position, dim = np.unravel_index(where, (seq, d_model))
    layers = np.arange(n_layer)
    return LayerSummary(threshold, ratio, flat[layers, where], dim, position, resid[layers, position, dim],
                        to_median[layers, position, dim].astype(np.float64), np.median(flat, axis=1),
                        mask.reshape(n_layer, -1).sum(axis=1), tokens)


# ------------------------------------------------------------------------------------------------ exclusion


@displayable(axes={"baseline": "layer", "attention_off": "layer", "mlp_off": "layer"})
@dataclasses.dataclass
class Exclusion:
    """The top activations at every layer with all attention, then all MLPs, disabled."""

    dim: int
    prompt: int
    position: int
    baseline: np.ndarray  # [layer] value in the normal run
    attention_off: np.ndarray  # [layer] with attn_out = 0 at every layer
    mlp_off: np.ndarray  # [layer] with mlp_out = 0 at every layer

    @staticmethod
    def percent(new, old):
        return 100.0 * (new - old) / np.maximum(np.abs(old), 1e-12)

    @property
    def attention_off_change(self) -> np.ndarray:
        """Percent change per layer with attention disabled."""
        return self.percent(self.attention_off, self.baseline)

    @property
    def mlp_off_change(self) -> np.ndarray:
        """Percent change per layer with the MLPs disabled."""
        return self.percent(self.mlp_off, self.baseline)


@checks_tokens("prompts")
def exclusion(params, config: Config, prompts, tops: list[Activation]) -> list[Exclusion]:
    out = []
    for a in tops:
        tokens = jnp.asarray(prompts[a.prompt])
        runs = [np.asarray(residual_stream(params, tokens, config, kill))[:, a.position, a.dim]
                for kill in (None, "attn_out", "mlp_out")]
        out.append(Exclusion(a.dim, a.prompt, a.position, *runs))
    return out


# ----------------------------------------------------------------------------------------------- MLP stages


@functools.partial(jax.jit, static_argnames=("config",))
def mlp_sites(params, tokens, config: Config):
    """ln2, mlp_pre, mlp_post, mlp_out of one prompt, each [layer, seq, ...]."""
    trace = forward(params, tokens[None], config, keep=("ln2", "mlp_pre", "mlp_post", "mlp_out"))
    return trace.ln2[:, 0], trace.mlp_pre[:, 0], trace.mlp_post[:, 0], trace.mlp_out[:, 0]


MLP_STAGES = ("input", "after_W_in", "after_gelu", "output")  # ln2, mlp_pre, mlp_post, mlp_out


@displayable
@dataclasses.dataclass
class MLPStages:
    """Max |value| through the MLP of `layer`, at the massive positions and at every other position."""

    layer: int
    massive: dict  # stage -> max |value| over the massive positions
    others: dict  # stage -> max |value| over the other positions (None when there are none)
    argmax: dict  # stage -> index (neuron or dim) of the max at the massive positions


@checks_tokens("prompts")
def mlp_stages(params, config: Config, prompts, activations: list[Activation], layer: int) -> MLPStages:
    massive_max = dict.fromkeys(MLP_STAGES, 0.0)
    others_max = dict.fromkeys(MLP_STAGES, None)
    argmax = dict.fromkeys(MLP_STAGES, -1)
    for index, tokens in enumerate(prompts):
        values = [np.abs(np.asarray(v[layer])) for v in mlp_sites(params, jnp.asarray(tokens), config)]
        massive = sorted({a.position for a in activations if a.prompt == index and a.layer == layer})
        other = [p for p in range(len(tokens)) if p not in massive]
        for stage, v in zip(MLP_STAGES, values):  # v [seq, width]
            if massive and v[massive].max() > massive_max[stage]:
                massive_max[stage] = float(v[massive].max())
                argmax[stage] = int(np.unravel_index(v[massive].argmax(), v[massive].shape)[1])
            if other:
                others_max[stage] = max(others_max[stage] or 0.0, float(v[other].max()))
    return MLPStages(layer, massive_max, others_max, argmax)


# ------------------------------------------------------------------------------------------------- geometry


@displayable
@dataclasses.dataclass
class Geometry:
    """W_out's spectrum and how well its top direction explains the massive dim's output."""

    layer: int
    dim: int
    sigma1: float
    sigma2: float
    ratio: float  # sigma1 / sigma2
    slope: float  # of mlp_out[dim] against h . v1, over every token of every prompt
    intercept: float
    r2: float
    projection: np.ndarray  # [tokens] h . v1
    output: np.ndarray  # [tokens] mlp_out[..., dim]
    is_massive: np.ndarray  # [tokens] bool, the token's position holds a massive activation at `layer`


def linear_fit(x, y):
    """Least squares y = slope x + intercept; (slope, intercept, R^2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return float(slope), float(intercept), float(r2)


@checks_tokens("prompts")
def geometry(params, config: Config, prompts, activations: list[Activation], layer: int, dim: int) -> Geometry:
    W_out = np.asarray(params["blocks"]["W_out"][layer], np.float64)  # [d_mlp, d_model]
    U, S, _ = np.linalg.svd(W_out, full_matrices=False)
    v1 = U[:, 0]  # [d_mlp] the direction of h that W_out amplifies most
    xs, ys, flags = [], [], []
    for index, tokens in enumerate(prompts):
        _, _, mlp_post, mlp_out = mlp_sites(params, jnp.asarray(tokens), config)
        xs.append(np.asarray(mlp_post[layer], np.float64) @ v1)  # [seq]
        ys.append(np.asarray(mlp_out[layer, :, dim], np.float64))  # [seq]
        massive = {a.position for a in activations if a.prompt == index and a.layer == layer}
        flags.append(np.asarray([p in massive for p in range(len(tokens))]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    slope, intercept, r2 = linear_fit(x, y)
    sigma2 = float(S[1]) if len(S) > 1 else 0.0
    return Geometry(layer, dim, float(S[0]), sigma2, float(S[0]) / sigma2 if sigma2 else float("inf"), slope,
                    intercept, r2, x, y, np.concatenate(flags))


# --------------------------------------------------------------------------------------------- intervention


@functools.partial(jax.jit, static_argnames=("config",))
def loss_with_set(params, tokens, layer, where, values, config: Config):
    """Mean next-token loss of one prompt (token ids [seq]) with resid_post[layer] set to `values` [d_model]
    where `where` [seq, d_model] holds."""

    def edit(resid, at_layer):
        return jnp.where((at_layer == layer) & where[None], values, resid)

    logits = forward(params, tokens[None], config, edits={"resid_post": edit}, keep=("logits",)).logits[0]
    return -metrics.log_prob(logits[:-1], tokens[1:]).mean()


@displayable
@dataclasses.dataclass
class Intervention:
    """Next-token loss (mean over every predicted token of every prompt) with the massive activations of
    `layer` set to zero and to their mean."""

    layer: int
    loss: float
    loss_zero: float
    loss_mean: float
    means: dict  # dim -> the mean value it is set to

    @property
    def change_zero(self) -> float:
        return self.loss_zero - self.loss

    @property
    def change_mean(self) -> float:
        return self.loss_mean - self.loss


@checks_tokens("prompts")
def intervention(params, config: Config, prompts, activations: list[Activation], layer: int) -> Intervention:
    at_layer = [a for a in activations if a.layer == layer]
    dims = sorted({a.dim for a in at_layer})
    means = {d: float(np.mean([a.value for a in at_layer if a.dim == d])) for d in dims}
    mean_values = np.zeros(config.d_model, np.float32)
    mean_values[dims] = [means[d] for d in dims]
    losses = {"none": [], "zero": [], "mean": []}
    counts = []
    for index, tokens in enumerate(prompts):
        if len(tokens) < 2:
            continue
        where = np.zeros((len(tokens), config.d_model), bool)
        for a in at_layer:
            if a.prompt == index:
                where[a.position, a.dim] = True
        tokens = jnp.asarray(tokens)
        for name, w, v in (("none", np.zeros_like(where), mean_values), ("zero", where, np.zeros_like(mean_values)),
                           ("mean", where, mean_values)):
            losses[name].append(float(loss_with_set(params, tokens, layer, w, v, config)))
        counts.append(len(tokens) - 1)
    if not counts:
        raise InputError("the loss needs a prompt of at least 2 tokens")
    loss = {name: float(np.average(v, weights=counts)) for name, v in losses.items()}
    return Intervention(layer, loss["none"], loss["zero"], loss["mean"], means)


# ------------------------------------------------------------------------------------------- investigation


@displayable
@dataclasses.dataclass
class MassiveReport:
    """Massive activations on some prompts (`investigate`): every one found, each massive dim across layers,
    and, at the first layer holding one, the exclusion test, the MLP's stages, the W_out geometry and the loss
    with them set to zero or to their mean."""

    threshold: float
    ratio: float
    prompts: list  # token id lists
    activations: list[Activation]
    trajectories: list[Trajectory]
    first_layer: int | None  # the earliest layer holding a massive activation (None: none found)
    exclusion: list[Exclusion]
    mlp: MLPStages | None
    geometry: Geometry | None
    intervention: Intervention | None

    def _headline(self):
        """How many activations are massive, and the largest of each layer."""
        criterion = f"|value| > {self.threshold:g} and >= {self.ratio:g} x its state's median |value|"
        prompts = f"{len(self.prompts)} prompt{'s' if len(self.prompts) != 1 else ''}"
        if not self.activations:
            return [("massive activations", f"none on {prompts} ({criterion})")]
        by_layer = {}
        for a in self.activations:
            by_layer.setdefault(a.layer, []).append(a)
        rows = []
        for layer, found in sorted(by_layer.items()):
            a = max(found, key=lambda a: abs(a.value))
            rows.append((layer, len(found), len({f.dim for f in found}), a.value, a.dim, a.prompt, a.position,
                         token(a.token), a.ratio))
        caption = (f"{len(self.activations)} massive activations on {prompts} ({criterion}), first at layer "
                   f"{self.first_layer}")
        if self.intervention is not None:
            i = self.intervention
            caption += (f"; next-token loss {i.loss:.4g}, {i.change_zero:+.4g} with layer {i.layer}'s set to zero, "
                        f"{i.change_mean:+.4g} with them set to their mean")
        return Table(["layer", "massive", "dims", "largest value", "dim", "prompt", "position", "token",
                      "x median"], rows, caption=caption)

    def _figure(self, max_lines: int = 8):
        """`probes.plots.massive`: the `max_lines` largest massive dims across layers and the W_out regression."""
        from probes import plots
        from tinygpt import display

        shown = display.decode(self.prompts[0]) if self.prompts else None
        if shown is not None and len(self.prompts) > 1:
            shown += f" (+{len(self.prompts) - 1} more)"
        return plots.massive(dataclasses.replace(self, trajectories=self.trajectories[:max_lines]), prompt=shown)


@checks_tokens("prompts")
def investigate(params, config: Config, prompts, *, threshold: float = 100.0, ratio: float = 1000.0,
                top: int = 4) -> MassiveReport:
    """Every stage of the module doc on `prompts` (a list of token id sequences). The MLP, geometry and
    intervention stages look at the first layer holding a massive activation and at its largest dim there;
    exclusion follows the `top` largest activations."""
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("give at least one non-empty prompt")
    found = detect(params, config, prompts, threshold=threshold, ratio=ratio)
    if not found:
        return MassiveReport(threshold, ratio, [p.tolist() for p in prompts], [], [], None, [], None, None, None)
    first = min(a.layer for a in found)
    dim = max((a for a in found if a.layer == first), key=lambda a: abs(a.value)).dim
    return MassiveReport(
        threshold, ratio, [p.tolist() for p in prompts], found, trajectories(params, config, prompts, found),
        first, exclusion(params, config, prompts, top_activations(found, top)),
        mlp_stages(params, config, prompts, found, first), geometry(params, config, prompts, found, first, dim),
        intervention(params, config, prompts, found, first))
