"""The manifold view: how many dimensions the residual stream really uses at each layer, and what a linear
read-out can tell about the token from it.

Intrinsic dimension, two ways:

- TwoNN (Facco, d'Errico, Rodriguez, Laio 2017, "Estimating the intrinsic dimension of datasets by a minimal
  neighborhood information"). For each point, mu = r2 / r1, the ratio of the distances to its second and
  first nearest neighbours. On a d-dimensional manifold with locally uniform density mu is Pareto
  distributed, F(mu) = 1 - mu^-d, so -log(1 - F(mu)) = d log mu. `method="fit"` (the default, as in the
  paper): the least-squares slope through the origin of -log(1 - F_empirical(mu_i)) against log(mu_i), with
  the 10% largest mu discarded (the tail is dominated by noise and sparse regions). `method="mle"`: the
  maximum-likelihood estimate with its small-sample bias removed, d = (N - 1) / sum_i log(mu_i) (the plain
  MLE is N / sum_i log(mu_i)). Duplicate points (r1 = 0) are dropped first.
- PCA participation ratio: (sum_i lambda_i)^2 / sum_i lambda_i^2 over the covariance eigenvalues, the number
  of directions the variance is spread over (k for an isotropic Gaussian in k dims). Linear: it counts the
  dimensions of the flat space the points span, where TwoNN measures the local dimension of a curved one.

Per layer (`layer_geometry`): points are the residual stream at the same token positions entering block 0
("embed": wte + wpe) and leaving every block (resid_post), positions >= 1 of token windows (position 0 has no
context and an outlying residual). A linear probe (logistic regression, trained with optax on 70% of the
windows, accuracy on the other 30%) reads a labelled property of the token at each layer (`PROPERTIES`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.errors import InputError
from tinygpt.inputs import checks_tokens
from tinygpt.model import causal_mask, run_blocks

from .harvest import embed_tokens


# ------------------------------------------------------------------------------------- intrinsic dimension


def _two_nearest(points, block: int = 1024) -> np.ndarray:
    """Distances from every point to its two nearest other points, a block of rows at a time, in float64.
    The neighbours are found with the squared distance |a|^2 + |b|^2 - 2 a.b, which in float32 cancels
    badly when the points lie far from the origin compared with their spacing (a few residual vectors with
    massive activations: distances off by 2-4x); in float64 it picks them reliably, and their distances
    are then measured as |a - b|.  points [n, d] -> [n, 2]"""
    points = np.asarray(points, np.float64)
    n = len(points)
    squared_norms = (points**2).sum(-1)  # [n]
    distances = np.empty((n, 2))
    for start in range(0, n, block):
        rows = points[start:start + block]  # [block, d]
        squared = squared_norms[start:start + block, None] + squared_norms[None, :] - 2 * rows @ points.T
        squared[np.arange(len(rows)), start + np.arange(len(rows))] = np.inf  # not its own neighbour
        nearest = np.argpartition(squared, 1, axis=-1)[:, :2]  # [block, 2] the two nearest, in any order
        exact = np.sqrt(((rows[:, None, :] - points[nearest]) ** 2).sum(-1))  # [block, 2]
        distances[start:start + block] = np.sort(exact, axis=-1)
    return distances


def neighbour_ratios(points) -> np.ndarray:
    """mu = r2 / r1 for every point after dropping duplicate points.  [n, d] -> [n_unique]"""
    points = np.unique(np.asarray(points, np.float32), axis=0)
    if len(points) < 3:
        raise InputError(f"TwoNN needs at least 3 distinct points, got {len(points)}")
    centred = points - points.mean(0)  # distances are shift-invariant; centring keeps float32 precise
    r = _two_nearest(centred)  # [n, 2]
    r1, r2 = r[:, 0], r[:, 1]
    keep = r1 > 0  # still coincident after rounding: no ratio
    return r2[keep] / r1[keep]


def two_nn_dimension(points, *, method: str = "fit", discard: float = 0.1) -> float:
    """TwoNN intrinsic dimension of points [n, d] (see the module doc for "fit" and "mle")."""
    mu = np.sort(neighbour_ratios(points))
    log_mu = np.log(np.maximum(mu, 1.0 + 1e-12))  # mu >= 1 by definition; ties give log 0
    n = len(mu)
    if method == "mle":
        return float((n - 1) / log_mu.sum())
    if method != "fit":
        raise InputError(f"method must be 'fit' or 'mle', got {method!r}")
    empirical_cdf = np.arange(1, n + 1) / n  # F(mu_(i)) = i / N for the i-th smallest
    kept = slice(0, min(int(n * (1 - discard)), n - 1))  # F = 1 (the largest mu) has no finite -log(1 - F)
    x, y = log_mu[kept], -np.log(1 - empirical_cdf[kept])
    return float((x * y).sum() / (x * x).sum())


def participation_ratio(points) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of points [n, d]."""
    points = np.asarray(points, np.float64)
    centred = points - points.mean(0)
    eigenvalues = np.linalg.svd(centred, compute_uv=False) ** 2 / (len(points) - 1)  # [min(n, d)]
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


# ------------------------------------------------------------------------------------------------- labels

PROPERTIES = {
    "repeated": "the token occurred earlier in its window (a fact about the context; from the embedding alone a "
                "probe can only guess from how frequent the token is; needs no tokenizer)",
    "line_end": "the next token starts a new line: the token ends a verse line, a speaker tag or a speech",
    "capitalised": "the token starts with a capital letter (after an optional leading space)",
}


def property_labels(name: str, windows, tokenizer=None) -> np.ndarray:
    """Boolean labels [n_windows, seq] of a property in `PROPERTIES` for every token of the windows. The last
    position of a window is labelled False for "line_end" (its next token is not in the window)."""
    windows = np.asarray(windows)
    if name == "repeated":
        earlier = np.tril(np.ones((windows.shape[1],) * 2, bool), k=-1)  # [seq, seq], j < i
        same = windows[:, :, None] == windows[:, None, :]  # [n_windows, seq, seq]
        return (same & earlier).any(-1)
    if name not in PROPERTIES:
        raise InputError(f"unknown property {name!r}; known: {', '.join(PROPERTIES)}")
    if tokenizer is None:
        raise InputError(f"property {name!r} reads the tokens' text: the model needs a tokenizer (or use 'repeated')")
    vocab = np.arange(int(windows.max()) + 1)
    texts = tokenizer.pieces(vocab.tolist())
    if name == "line_end":
        starts_line = np.array([t.startswith("\n") for t in texts])
        labels = np.zeros(windows.shape, bool)
        labels[:, :-1] = starts_line[windows[:, 1:]]
        return labels
    capital = np.array([t.lstrip(" ")[:1].isupper() for t in texts])
    return capital[windows]


# --------------------------------------------------------------------------------------------- linear probe


@displayable
@dataclasses.dataclass
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    majority: float  # test accuracy of always answering the training set's majority class


def _probe_loss(weights, x, y, weight_decay):
    logits = x @ weights["w"] + weights["b"]  # [n]
    return optax.sigmoid_binary_cross_entropy(logits, y).mean() + weight_decay * (weights["w"] ** 2).sum()


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_logistic(x, y, *, steps: int = 500, lr: float = 0.05, weight_decay: float = 1e-4):
    """Logistic regression on standardised features, full-batch Adam.  x [n, d], y [n] in {0, 1} ->
    (weights {w [d], b []}, mean [d], std [d])"""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    weights = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    optimizer = optax.adam(lr)

    def step(carry, _):
        weights, state = carry
        grads = jax.grad(_probe_loss)(weights, x, y, weight_decay)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(weights, updates), state), None

    (weights, _), _ = jax.lax.scan(step, (weights, optimizer.init(weights)), None, length=steps)
    return weights, mean, std


@jax.jit
def probe_predictions(weights, mean, std, x):
    """The fitted probe's answers on x [n, d] -> bool [n]."""
    return ((x - mean) / std) @ weights["w"] + weights["b"] > 0


def linear_probe(x_train, y_train, x_test, y_test, *, steps: int = 500) -> ProbeResult:
    """Train a logistic-regression probe on (x_train, y_train) and measure it on (x_test, y_test)."""
    y_train, y_test = np.asarray(y_train, bool), np.asarray(y_test, bool)
    x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
    weights, mean, std = fit_logistic(x_train, jnp.asarray(y_train, jnp.float32), steps=steps)
    majority = y_train.mean() >= 0.5
    return ProbeResult(
        train_accuracy=float((np.asarray(probe_predictions(weights, mean, std, x_train)) == y_train).mean()),
        test_accuracy=float((np.asarray(probe_predictions(weights, mean, std, x_test)) == y_test).mean()),
        majority=float((y_test == majority).mean()))


# -------------------------------------------------------------------------------------------- per layer


@functools.lru_cache(maxsize=8)
def _residual_streams_fn(config: Config):
    """jit (params, tokens [batch, seq]) -> [layer + 1, batch, seq, d_model]: the residual entering block 0
    and leaving every block."""

    @jax.jit
    def run(params, tokens):
        resid = embed_tokens(params, tokens)  # [batch, seq, d_model]
        mask = causal_mask(jnp.ones(tokens.shape, jnp.int32))
        _, kept = run_blocks(params["blocks"], resid, mask, config, {}, frozenset({"resid_post"}))
        return jnp.concatenate([resid[None], kept["resid_post"]]).astype(jnp.float32)

    return run


def residual_points(params, config: Config, windows, positions, *, batch: int = 8) -> np.ndarray:
    """The residual stream at chosen (window, position) pairs, at every depth.
    windows [n_windows, seq]; positions [n, 2] of (window, position) -> [layer + 1, n, d_model]"""
    windows = np.asarray(windows, np.int32)
    positions = np.asarray(positions)
    run = _residual_streams_fn(config)
    points = np.zeros((config.n_layer + 1, len(positions), config.d_model), np.float32)
    needed = np.unique(positions[:, 0])
    for start in range(0, len(needed), batch):
        chosen = needed[start: start + batch]
        padded = np.concatenate([chosen, np.repeat(chosen[-1:], batch - len(chosen))])
        streams = np.asarray(run(params, windows[padded]))  # [layer + 1, batch, seq, d_model]
        for slot, w in enumerate(chosen):
            here = np.flatnonzero(positions[:, 0] == w)
            points[:, here] = streams[:, slot, positions[here, 1]]
    return points


@displayable
@dataclasses.dataclass
class LayerGeometry:
    name: str  # "embed" (entering block 0) or "L{i}" (leaving block i)
    two_nn: float
    two_nn_mle: float
    participation_ratio: float
    probe: ProbeResult | None


@displayable
@dataclasses.dataclass
class ManifoldReport:
    layers: list[LayerGeometry]
    n_points: int
    property: str | None
    positive_rate: float | None  # fraction of sampled tokens with the property


def sample_positions(windows, n_points: int, seed: int = 0, skip_first: int = 1) -> np.ndarray:
    """n_points distinct (window, position) pairs with position >= skip_first, uniformly.  -> [n, 2]"""
    n_windows, seq = np.asarray(windows).shape
    candidates = n_windows * (seq - skip_first)
    if candidates < 3:
        raise InputError(f"{n_windows} windows of {seq} tokens leave {candidates} positions: too few")
    flat = np.sort(np.random.default_rng(seed).choice(candidates, min(n_points, candidates), replace=False))
    return np.stack([flat // (seq - skip_first), flat % (seq - skip_first) + skip_first], axis=1)


@checks_tokens("windows")
def layer_geometry(params, config: Config, windows, *, n_points: int = 2000, property: str | None = "repeated",
                   tokenizer=None, probe_steps: int = 500, seed: int = 0) -> ManifoldReport:
    """Intrinsic dimension (TwoNN fit and MLE, participation ratio) of the residual stream at every depth,
    and the held-out accuracy of a linear probe for `property` (None: no probe), on n_points tokens."""
    windows = np.asarray(windows, np.int32)
    positions = sample_positions(windows, n_points, seed)
    points = residual_points(params, config, windows, positions)  # [layer + 1, n, d_model]
    labels = None
    if property is not None:
        labels = property_labels(property, windows, tokenizer)[positions[:, 0], positions[:, 1]]  # [n]
        held_out = np.random.default_rng(seed + 1).random(len(windows)) < 0.3  # split by window
        test = held_out[positions[:, 0]]
        if test.all() or not test.any():
            raise InputError(f"{len(np.unique(positions[:, 0]))} windows are too few to hold 30% of them out for "
                             f"the probe: use more tokens or points")
    layers = []
    for depth, x in enumerate(points):
        probe = None
        if labels is not None:
            probe = linear_probe(x[~test], labels[~test], x[test], labels[test], steps=probe_steps)
        layers.append(LayerGeometry(name="embed" if depth == 0 else f"L{depth - 1}", two_nn=two_nn_dimension(x),
                                    two_nn_mle=two_nn_dimension(x, method="mle"),
                                    participation_ratio=participation_ratio(x), probe=probe))
    return ManifoldReport(layers=layers, n_points=len(positions), property=property,
                          positive_rate=None if labels is None else float(labels.mean()))


# ------------------------------------------------------------------------------------- synthetic manifolds


def linear_subspace(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """n Gaussian points on a random k-dim linear subspace of R^d.  [n, d]"""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0]  # [d, k], orthonormal columns
    return rng.standard_normal((n, k)) @ basis.T


def sphere(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """n uniform points on the unit k-sphere (a k-dim manifold in R^(k+1)), rotated into R^d.  [n, d]"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k + 1))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rotation = np.linalg.qr(rng.standard_normal((d, k + 1)))[0]  # [d, k + 1]
    return x @ rotation.T


def swiss_roll(n: int, seed: int = 0) -> np.ndarray:
    """n points on the swiss roll, a 2-dim curved sheet in R^3.  [n, 3]"""
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    height = 21 * rng.random(n)
    return np.stack([t * np.cos(t), height, t * np.sin(t)], axis=1)
