"""The single-token decode step's layout helpers: per-layer weight views and the head-batched projection."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt.kernels import project_heads_batched
from tinygpt.model import attention_output, project_heads
from tinygpt.params import layer_views


def small_params():
    config = tinygpt.Config(n_layer=3, n_head=2, d_model=32, d_head=16, d_mlp=64, n_ctx=16, vocab_size=40)
    return config, tinygpt.init_params(config, jax.random.PRNGKey(0))


def test_layer_views_equal_the_stacked_layers_and_alias_them_on_cpu():
    config, params = small_params()
    views = layer_views(params["blocks"])
    assert len(views) == config.n_layer
    for layer, view in enumerate(views):
        assert set(view) == set(params["blocks"])
        for name, stacked in params["blocks"].items():
            np.testing.assert_array_equal(view[name], stacked[layer])
            if jax.default_backend() == "cpu":  # a view into the stacked buffer, not a copy
                offset = view[name].unsafe_buffer_pointer() - stacked.unsafe_buffer_pointer()
                assert offset == layer * view[name].nbytes, name


def test_layer_views_under_jit_are_slices():
    _, params = small_params()
    views = jax.jit(lambda blocks: layer_views(blocks))(params["blocks"])
    for layer, view in enumerate(views):
        np.testing.assert_array_equal(view["W_in"], params["blocks"]["W_in"][layer])


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), seq=st.integers(1, 3), n_head=st.integers(1, 4), d_model=st.sampled_from([8, 24]),
       d_head=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_head_batched_projection_equals_the_reference(batch, seq, n_head, d_model, d_head, seed):
    rng = np.random.default_rng(seed)  # host inputs and jitted functions: one compile per shape, not per op
    x = rng.standard_normal((batch, seq, d_model)).astype(np.float32)
    W = rng.standard_normal((n_head, d_model, d_head)).astype(np.float32)
    b = rng.standard_normal((n_head, d_head)).astype(np.float32)
    expected = np.einsum("bsm,hmd->bshd", np.float64(x), np.float64(W)) + np.float64(b)
    got = jax.jit(project_heads_batched)(x, W, b)
    assert got.shape == (batch, seq, n_head, d_head)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, jax.jit(project_heads)(x, W, b), rtol=1e-5, atol=1e-5)


def test_attention_output_is_the_sum_of_per_head_writes():
    kz, kw, kb = jax.random.split(jax.random.PRNGKey(1), 3)
    z = jax.random.normal(kz, (2, 5, 3, 4))  # [batch, seq, head, d_head]
    W_O = jax.random.normal(kw, (3, 4, 6))  # [head, d_head, d_model]
    b_O = jax.random.normal(kb, (6,))
    per_head = sum(np.float64(z[:, :, h]) @ np.float64(W_O[h]) for h in range(3))
    np.testing.assert_allclose(attention_output(z, W_O, b_O), per_head + np.float64(b_O), rtol=1e-5, atol=1e-5)
    assert jnp.asarray(attention_output(z, W_O, b_O)).shape == (2, 5, 6)
