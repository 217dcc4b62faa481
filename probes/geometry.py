"""Superposition geometry: how close to orthogonal are a model's directions, compared with random ones?

A d-dimensional space has only d orthogonal directions, but exponentially many *nearly* orthogonal ones:
two random unit vectors have cosine ~ N(0, 1/d), so in high dimension almost every pair is within a few
degrees of 90. A model can store more features than dimensions ("superposition") if it tolerates that
small interference. This module measures it:

- pairwise cosines within a set of vectors (all pairs, or a uniform sample of pairs for big sets), summarised
  (mean |cos|, std, quantiles of |cos|, the fraction of pairs within an angle of orthogonality) next to the
  same statistics for as many Gaussian random vectors of the same dimension;
- the sets: token embeddings (rows of wte), neuron keys (the residual direction a neuron reads,
  ln2_w * W_in[:, i] centred over d_model: `probes.memory.residual_keys`, the key `probes.polysemantic` uses
  too) and neuron values (rows of W_out: what it writes), SAE decoder rows;
- the Johnson-Lindenstrauss view: how many vectors in d dims can be pairwise within an angle theta of
  orthogonal (|cos| <= eps = sin theta). Three numbers: the union bound exp(d eps^2 / 4) (random vectors
  that many are pairwise within eps with positive probability, from P(|cos| > eps) <= 2 exp(-d eps^2 / 2));
  the birthday estimate sqrt(2 ln 2 / p) with the exact pair probability p (cos^2 ~ Beta(1/2, (d-1)/2) for
  uniform unit vectors), the median count of random vectors before the first pair beyond eps; and that
  count measured by drawing random vectors.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import betainc

from tinygpt.display import displayable
from tinygpt.errors import InputError

from .memory import residual_keys

QUANTILES = (0.5, 0.9, 0.99)


def unit_vectors(vectors) -> np.ndarray:
    """Rows divided by their norms (zero rows stay zero).  [n, d] -> [n, d] float64"""
    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def pairwise_cosines(vectors, *, max_pairs: int = 200_000, seed: int = 0) -> np.ndarray:
    """Cosines of all pairs i < j of the rows, or of `max_pairs` pairs drawn uniformly (i != j) when there
    are more.  [n, d] -> [n_pairs]"""
    u = unit_vectors(vectors)
    n = len(u)
    if n < 2:
        raise InputError(f"need at least 2 vectors for pairwise cosines, got {n}")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, max_pairs)
        j = (i + rng.integers(1, n, max_pairs)) % n  # a different row, uniformly
    return (u[i] * u[j]).sum(-1)


def gaussian_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n isotropic Gaussian vectors in d dims: the baseline of random directions.  [n, d]"""
    return np.random.default_rng(seed).standard_normal((n, d))


def epsilon_for_angle(degrees: float) -> float:
    """|cos| <= sin(theta) means the angle is within theta of 90 degrees."""
    if not 0 < degrees < 90:
        raise InputError(f"the angle from orthogonal must be in (0, 90) degrees, got {degrees}")
    return math.sin(math.radians(degrees))


@displayable
@dataclasses.dataclass
class CosineSummary:
    n: int  # vectors
    d: int  # their dimension
    n_pairs: int
    mean: float
    std: float
    mean_abs: float
    abs_quantiles: dict  # {"0.5": ..., "0.9": ..., "0.99": ...} of |cos|
    max_abs: float
    within: float  # fraction of pairs with |cos| <= eps


def summarize(cosines, n: int, d: int, eps: float) -> CosineSummary:
    cosines = np.asarray(cosines, np.float64)
    magnitude = np.abs(cosines)
    return CosineSummary(n=n, d=d, n_pairs=len(cosines), mean=float(cosines.mean()), std=float(cosines.std()),
                         mean_abs=float(magnitude.mean()),
                         abs_quantiles={str(q): float(np.quantile(magnitude, q)) for q in QUANTILES},
                         max_abs=float(magnitude.max()), within=float((magnitude <= eps).mean()))


@displayable
@dataclasses.dataclass
class SetGeometry:
    name: str
    summary: CosineSummary
    gaussian: CosineSummary  # the same n and d, random Gaussian directions
    cosines: np.ndarray = dataclasses.field(repr=False)  # [n_pairs], for histograms
    gaussian_cosines: np.ndarray = dataclasses.field(repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": dataclasses.asdict(self.summary),
                "gaussian": dataclasses.asdict(self.gaussian)}


def set_geometry(name: str, vectors, *, eps: float, max_pairs: int = 200_000, seed: int = 0) -> SetGeometry:
    """Pairwise-cosine statistics of the rows of `vectors` [n, d] and of n Gaussian vectors in d dims."""
    vectors = np.asarray(vectors, np.float64)
    n, d = vectors.shape
    cosines = pairwise_cosines(vectors, max_pairs=max_pairs, seed=seed)
    baseline = pairwise_cosines(gaussian_vectors(n, d, seed + 1), max_pairs=max_pairs, seed=seed)
    return SetGeometry(name, summarize(cosines, n, d, eps), summarize(baseline, n, d, eps), cosines, baseline)


def model_vector_sets(params, layer: int) -> dict[str, np.ndarray]:
    """The model's directions in the residual stream: token embeddings, and block `layer`'s neuron keys
    (`probes.memory.residual_keys`: ln2_w * W_in[:, i], centred, the residual direction each neuron reads)
    and neuron values (W_out rows)."""
    blocks = params["blocks"]
    n_layer = blocks["W_in"].shape[0]
    if not 0 <= layer < n_layer:
        raise InputError(f"layer {layer} is outside [0, {n_layer})")
    return {
        "embedding": np.asarray(params["wte"], np.float64),  # [vocab, d_model]
        f"neuron_keys L{layer}": residual_keys(params, layer),  # [d_mlp, d_model]
        f"neuron_values L{layer}": np.asarray(blocks["W_out"][layer], np.float64),  # [d_mlp, d_model]
    }


def superposition(sets: dict, *, eps: float, max_pairs: int = 200_000, seed: int = 0) -> list[SetGeometry]:
    """`set_geometry` of every named set {name: [n, d]}."""
    return [set_geometry(name, vectors, eps=eps, max_pairs=max_pairs, seed=seed) for name, vectors in sets.items()]


# ---------------------------------------------------------------------------------- the Johnson-Lindenstrauss view


def pair_beyond_probability(d: int, eps: float) -> float:
    """P(|cos| > eps) for two independent uniform unit vectors in d dims: cos^2 ~ Beta(1/2, (d - 1)/2), so
    it is the regularized incomplete beta I_{1 - eps^2}((d - 1)/2, 1/2), in float64 (d = 768 at 45 degrees
    gives 1.5e-117; 0 only below float64's ~1e-308)."""
    if d < 2:
        return 0.0 if eps >= 1 else 1.0
    return float(betainc((d - 1) / 2, 0.5, 1.0 - eps**2))


def jl_bound(d: int, eps: float) -> float:
    """The union bound: exp(d eps^2 / 4) random unit vectors are pairwise within eps with positive
    probability (N^2/2 pairs, each beyond eps with probability <= 2 exp(-d eps^2 / 2))."""
    return math.exp(d * eps**2 / 4)


def birthday_estimate(d: int, eps: float) -> float:
    """Median number of random unit vectors drawn before the first pair beyond eps: P(N pairwise within) ~
    exp(-N^2 p / 2) = 1/2 at N = sqrt(2 ln 2 / p); inf where p underflows float64 (N > 1e154)."""
    p = pair_beyond_probability(d, eps)
    return math.inf if p == 0 else math.sqrt(2 * math.log(2) / p)


def first_violation(vectors, eps: float, block: int = 256) -> int:
    """How many leading rows are pairwise within eps (|cos| <= eps): the index of the first row with an
    earlier partner beyond eps, or n if none. Rows are compared a block at a time, stopping at the first
    violation.  [n, d] -> int"""
    u = unit_vectors(vectors)
    for start in range(0, len(u), block):
        rows = np.arange(start, min(start + block, len(u)))  # [block]
        cosines = u[rows] @ u[: rows[-1] + 1].T  # [block, rows seen so far]
        earlier = np.arange(rows[-1] + 1)[None, :] < rows[:, None]  # partner j < row i
        violates = ((np.abs(cosines) > eps) & earlier).any(axis=1)  # [block]
        if violates.any():
            return int(rows[np.argmax(violates)])
    return len(u)


@displayable
@dataclasses.dataclass
class Capacity:
    d: int
    angle_degrees: float  # within this angle of 90 degrees
    eps: float  # |cos| <= eps
    pair_beyond_probability: float
    jl_bound: float
    birthday_estimate: float
    measured: float  # median over trials of random vectors drawn before the first pair beyond eps
    measured_capped: bool  # True when a trial reached max_vectors (the measurement is a lower bound)


def capacity(d: int, angle_degrees: float, *, trials: int = 5, max_vectors: int = 4096, seed: int = 0) -> Capacity:
    """How many directions fit in d dims pairwise within `angle_degrees` of orthogonal (see module doc)."""
    eps = epsilon_for_angle(angle_degrees)
    rng = np.random.default_rng(seed)
    counts = [first_violation(rng.standard_normal((max_vectors, d)), eps) for _ in range(trials)]
    return Capacity(d=d, angle_degrees=angle_degrees, eps=eps, pair_beyond_probability=pair_beyond_probability(d, eps),
                    jl_bound=jl_bound(d, eps), birthday_estimate=birthday_estimate(d, eps),
                    measured=float(np.median(counts)), measured_capped=max(counts) >= max_vectors)
