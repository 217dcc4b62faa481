"""Superposition geometry: pairwise cosines (all pairs or a uniform sample), Gaussian baselines that match
theory, and the Johnson-Lindenstrauss view (exact pair probability, bounds, and the measured count)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes import geometry, memory


@given(st.integers(2, 40), st.integers(1, 12), st.integers(0, 1000))
def test_all_pairs_cosines_match_a_direct_computation(n, d, seed):
    v = np.random.default_rng(seed).standard_normal((n, d))
    cosines = geometry.pairwise_cosines(v)
    assert cosines.shape == (n * (n - 1) // 2,)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = (u @ u.T)[np.triu_indices(n, k=1)]
    np.testing.assert_allclose(cosines, expected, atol=1e-12)


def test_sampled_pairs_are_distinct_rows():
    v = np.eye(300)  # orthonormal: any pair of distinct rows has cosine 0, a row with itself 1
    cosines = geometry.pairwise_cosines(v, max_pairs=5000, seed=3)
    assert cosines.shape == (5000,) and np.abs(cosines).max() == 0.0


def test_gaussian_baseline_matches_theory():
    d = 64
    cosines = geometry.pairwise_cosines(geometry.gaussian_vectors(400, d, seed=1))
    assert cosines.std() == pytest.approx(1 / math.sqrt(d), rel=0.05)  # var(cos) = 1/d
    summary = geometry.summarize(cosines, 400, d, eps=0.2)
    assert summary.mean_abs == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.05)
    assert summary.within == pytest.approx(1 - geometry.pair_beyond_probability(d, 0.2), abs=0.01)


def test_structured_sets_differ_from_their_baseline():
    rng = np.random.default_rng(0)
    clustered = rng.standard_normal((200, 32)) * 0.3 + rng.standard_normal(32)  # a shared direction
    result = geometry.set_geometry("clustered", clustered, eps=0.26)
    assert result.summary.mean > 0.5 and abs(result.gaussian.mean) < 0.02
    assert (result.summary.n, result.summary.d) == (result.gaussian.n, result.gaussian.d) == (200, 32)


@pytest.mark.parametrize("d, eps", [(8, 0.5), (64, 0.2), (256, 0.12)])
def test_pair_probability_is_exact(d, eps):
    rng = np.random.default_rng(d)
    cosines = geometry.pairwise_cosines(rng.standard_normal((2000, d)), max_pairs=400_000, seed=d)
    measured = (np.abs(cosines) > eps).mean()
    p = geometry.pair_beyond_probability(d, eps)
    assert measured == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(cosines)) + 1e-4)
    assert p <= 2 * math.exp(-d * eps**2 / 2)  # the Gaussian tail bound behind the JL estimate


@pytest.mark.parametrize("d, eps", [(768, 0.5), (768, math.sqrt(0.5)), (4096, math.sin(math.radians(20)))])
def test_pair_probability_deep_in_the_tail(d, eps):
    """Far below float32's range (where a float32 incomplete beta returned 0 and the birthday estimate inf):
    log P(|cos| > eps) = log(2 int_eps^1 (1 - t^2)^((d - 3) / 2) dt / B(1/2, (d - 1) / 2)), integrated here
    in log space with the trapezoid rule."""
    t = np.linspace(eps, 1.0, 400_001)
    log_integrand = (d - 3) / 2 * np.log1p(-np.minimum(t**2, 1 - 1e-300))
    weights = np.full_like(t, t[1] - t[0])
    weights[[0, -1]] /= 2
    terms = log_integrand + np.log(weights)
    log_integral = terms.max() + np.log(np.exp(terms - terms.max()).sum())
    log_beta = math.lgamma(0.5) + math.lgamma((d - 1) / 2) - math.lgamma(d / 2)
    p = geometry.pair_beyond_probability(d, eps)
    assert 0 < p < 1e-40
    assert math.log(p) == pytest.approx(math.log(2) + log_integral - log_beta, rel=1e-4)
    assert math.isfinite(geometry.birthday_estimate(d, eps))


def test_first_violation():
    basis = np.eye(10)
    assert geometry.first_violation(basis, 0.1) == 10
    rows = np.concatenate([basis[:6], basis[2:3] + 0.01, basis[6:]])  # row 6 repeats row 2
    assert geometry.first_violation(rows, 0.1, block=4) == 6


def test_capacity_grows_with_dimension_and_matches_the_birthday_estimate():
    small, large = geometry.capacity(64, 15, trials=5), geometry.capacity(256, 15, trials=15, seed=1)
    assert small.measured < large.measured and small.jl_bound < large.jl_bound
    assert large.eps == pytest.approx(math.sin(math.radians(15)))
    assert large.jl_bound == pytest.approx(math.exp(256 * large.eps**2 / 4))
    assert 0.5 < large.measured / large.birthday_estimate < 2.0 and not large.measured_capped
    with pytest.raises(ValueError, match="angle"):
        geometry.capacity(64, 90)


def test_model_vector_sets():
    rng = np.random.default_rng(0)
    params = {"wte": rng.standard_normal((50, 16)),
              "blocks": {"W_in": rng.standard_normal((2, 16, 32)), "W_out": rng.standard_normal((2, 32, 16)),
                         "ln2_w": rng.standard_normal((2, 16))}}
    sets = geometry.model_vector_sets(params, 1)
    assert {k: v.shape for k, v in sets.items()} == {"embedding": (50, 16), "neuron_keys L1": (32, 16),
                                                     "neuron_values L1": (32, 16)}
    # the neuron key is the residual direction it reads, centred (LayerNorm removes the mean): memory's one
    # definition, which probes.polysemantic uses too
    key = params["blocks"]["W_in"][1][:, 3] * params["blocks"]["ln2_w"][1]
    np.testing.assert_allclose(sets["neuron_keys L1"][3], key - key.mean(), atol=1e-12)
    np.testing.assert_array_equal(sets["neuron_keys L1"], memory.residual_keys(params, 1))
    results = geometry.superposition(sets, eps=0.3)
    assert [r.name for r in results] == list(sets) and all(r.summary.n_pairs > 0 for r in results)
