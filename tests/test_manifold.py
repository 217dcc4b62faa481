"""The manifold view: TwoNN recovers the dimension of synthetic manifolds (flat and curved), the participation
ratio counts isotropic dimensions, labels and probes are right, and the per-layer report reads the same
residual stream as the forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
from probes import manifold
from tinygpt.params import param_shapes

CONFIG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=32, n_ctx=12, vocab_size=20)


def random_params(config, seed=0):
    """Random model parameters drawn with numpy (eager jax.random compiles once per shape)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        loc = 1.0 if path[-1].key.startswith("ln") and path[-1].key.endswith("_w") else 0.0
        return jnp.asarray(loc + (0.1 if loc else 0.3) * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("name, points, dimension, tolerance", [
    ("5-dim subspace of R^50", manifold.linear_subspace(2000, 5, 50, seed=0), 5, 0.6),
    ("5-sphere in R^50", manifold.sphere(2000, 5, 50, seed=1), 5, 0.6),
    ("swiss roll", manifold.swiss_roll(2000, seed=2), 2, 0.25),
    ("circle in R^10", manifold.sphere(1000, 1, 10, seed=3), 1, 0.15),
])
def test_two_nn_recovers_the_dimension(name, points, dimension, tolerance):
    for method in ("fit", "mle"):
        assert manifold.two_nn_dimension(points, method=method) == pytest.approx(dimension, abs=tolerance), method


def test_two_nn_ignores_duplicates_and_rejects_degenerate_input():
    points = manifold.linear_subspace(1000, 3, 20, seed=4)
    doubled = np.concatenate([points, points[:300]])
    assert manifold.two_nn_dimension(doubled) == pytest.approx(manifold.two_nn_dimension(points), rel=1e-6)
    with pytest.raises(ValueError, match="3 distinct"):
        manifold.two_nn_dimension(np.ones((10, 4)))
    with pytest.raises(ValueError, match="method"):
        manifold.two_nn_dimension(points, method="pca")


def brute_force_two_nearest(points):
    """Exact distances to the two nearest other points, in float64.  [n, d] -> [n, 2]"""
    points = np.asarray(points, np.float64)
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=-1)[:, :2]


def test_neighbour_distances_are_exact_far_from_the_origin():
    """A few points far out (as residual vectors with massive activations are): |a|^2 + |b|^2 - 2 a.b in
    float32 cancels there and gave distances off by up to 4x; the chosen neighbours' distances are exact."""
    points = manifold.linear_subspace(600, 3, 40, seed=5)
    far = points[:40] + 3000.0 * np.eye(40)[0]  # 40 of them moved 3000 along one axis
    cloud = np.concatenate([points, far]).astype(np.float32)
    got = manifold._two_nearest(cloud - cloud.mean(0))
    np.testing.assert_allclose(got, brute_force_two_nearest(cloud), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_participation_ratio_counts_isotropic_dimensions(k):
    points = manifold.linear_subspace(4000, k, 30, seed=k)
    assert manifold.participation_ratio(points) == pytest.approx(k, rel=0.05)
    stretched = points.copy()
    stretched[:, 0] *= 1e3  # one dominant direction
    assert manifold.participation_ratio(stretched) < 1.1


@given(st.integers(0, 1000))
def test_repeated_labels(seed):
    windows = np.random.default_rng(seed).integers(0, 6, (3, 9))
    labels = manifold.property_labels("repeated", windows)
    expected = [[windows[w, p] in windows[w, :p] for p in range(9)] for w in range(3)]
    np.testing.assert_array_equal(labels, expected)


class Pieces:
    """A stand-in tokenizer: token i is the text TEXTS[i]."""

    TEXTS = ["A", " b", "\n", " C", "d", "\n\n"]

    def pieces(self, ids):
        return [self.TEXTS[i] for i in ids]


def test_text_properties():
    windows = np.array([[0, 1, 2, 3, 5, 4]])
    np.testing.assert_array_equal(manifold.property_labels("line_end", windows, Pieces()),
                                  [[False, True, False, True, False, False]])
    np.testing.assert_array_equal(manifold.property_labels("capitalised", windows, Pieces()),
                                  [[True, False, False, True, False, False]])
    with pytest.raises(ValueError, match="tokenizer"):
        manifold.property_labels("line_end", windows)
    with pytest.raises(ValueError, match="unknown property"):
        manifold.property_labels("rhymes", windows)


def test_linear_probe_separates_a_linear_concept_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 10))
    y = x @ rng.standard_normal(10) > 0.3
    result = manifold.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result.test_accuracy > 0.95 and result.train_accuracy > 0.95
    noise = manifold.linear_probe(x[:400], rng.random(400) < 0.8, x[400:], rng.random(200) < 0.8)
    assert noise.test_accuracy < noise.majority + 0.05  # nothing to learn: no better than the majority class


def test_layer_geometry_reads_the_forward_residual_stream():
    params = random_params(CONFIG)
    windows = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (30, 12))
    positions = manifold.sample_positions(windows, 50, seed=1)
    assert positions[:, 1].min() >= 1 and len(np.unique(positions, axis=0)) == 50
    points = manifold.residual_points(params, CONFIG, windows, positions, batch=8)  # [layer + 1, 50, d_model]
    trace = tinygpt.forward(params, windows, CONFIG, keep=("resid_pre", "resid_post"))
    w, p = positions[:, 0], positions[:, 1]
    np.testing.assert_allclose(points[0], np.asarray(trace.resid_pre[0])[w, p], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(points[1:], np.asarray(trace.resid_post)[:, w, p], rtol=1e-5, atol=1e-5)

    # a property of the token itself is linearly readable from its embedding (6 token types in 16 dims)
    report = manifold.layer_geometry(params, CONFIG, windows % 6, n_points=300, property="capitalised",
                                     tokenizer=Pieces(), probe_steps=200)
    assert [g.name for g in report.layers] == ["embed", "L0", "L1"] and report.n_points == 300
    assert report.positive_rate == pytest.approx(2 / 6, abs=0.1)
    assert all(0 < g.two_nn < CONFIG.d_model and 1 <= g.participation_ratio <= CONFIG.d_model for g in report.layers)
    embed = report.layers[0].probe
    assert embed.test_accuracy > 0.95 and embed.majority < 0.8
