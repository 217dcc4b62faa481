"""The fused attention paths on CPU equal the reference path (`attention_scores`, `apply_mask`, `softmax`,
`mix_values`): `chunked_attention` (queries a chunk at a time) for any mask: causal, left-padded, queries
that are a suffix of the keys (the sweeps' causal-suffix reuse) and arbitrary masks; `causal_attention` (a
sequence over itself, one head at a time, each chunk of queries against the keys up to its last query) for
causal, left-padded and random lower-triangular masks; with the sequence a multiple of the chunk, ragged, or
shorter than one chunk. A forward that keeps only resid_post (fused path) agrees with one that keeps the
pattern (reference path), never holds a [seq, key] float array, and skips the keys after each chunk."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
from tinygpt.kernels import ATTENTION_CHUNK, causal_attention, chunked_attention
from tinygpt.model import apply_mask, attention_scores, causal_mask, mix_values, softmax
from tinygpt.testing import random_params

BATCH, HEAD, D_HEAD = 2, 3, 8
CHUNK = 4  # a small chunk keeps the shapes small; the module's own chunk is tested through the forward


def reference(q, k, v, mask):
    return mix_values(softmax(apply_mask(attention_scores(q, k), mask)), v)


def random_qkv(seed, seq, keys, dtype=jnp.float32):
    """q [batch, seq, head, d_head], k, v [batch, keys, head, d_head]; scores of std ~2 (peaked softmax)."""
    rng = np.random.default_rng(seed)
    q = 2 * rng.standard_normal((BATCH, seq, HEAD, D_HEAD))
    k, v = rng.standard_normal((2, BATCH, keys, HEAD, D_HEAD))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def make_mask(kind, seed, seq, keys):
    """[batch, 1, seq, keys]: the queries are the last `seq` of `keys` positions; every row sees its own."""
    rng = np.random.default_rng(seed + 1)
    attention_mask = np.ones((BATCH, keys), np.int32)
    if kind == "padded":  # row 1 left-padded by 0 to keys - 1 positions, row 0 not at all
        attention_mask[1, : rng.integers(keys)] = 0
    mask = np.asarray(causal_mask(jnp.asarray(attention_mask)))[:, :, keys - seq :]
    if kind in ("random", "random causal"):  # any mask at all, as long as each query sees at least itself
        mask = rng.random((BATCH, 1, seq, keys)) < 0.5
        if kind == "random causal":  # ... and no key after it
            mask &= np.arange(keys)[None, :] <= keys - seq + np.arange(seq)[:, None]
        mask[:, :, np.arange(seq), keys - seq + np.arange(seq)] = True
    return jnp.asarray(mask)


# (seq, keys): square, queries a suffix of the keys; a multiple of the chunk, ragged, shorter than a chunk
SHAPES = [(8, 8), (11, 11), (3, 3), (1, 1), (8, 13), (6, 10), (2, 9), (1, 7)]
MASKS = ["causal", "padded", "random"]


def assert_equals_reference(attention, seq, keys, kind, seed, mask_seed):
    """`attention` on random q, k, v and a mask of `kind` equals the reference path to 1e-6."""
    q, k, v = random_qkv(seed, seq, keys)
    mask = make_mask(kind, mask_seed, seq, keys)
    got = jitted(attention)(q, k, v, mask)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, jitted(reference)(q, k, v, mask), atol=1e-6, rtol=0)


@functools.lru_cache(maxsize=None)
def jitted(attention):
    """`attention` compiled (with the test's chunk): one compile per shape, where eager calls dispatch each op."""
    if attention is reference:
        return jax.jit(reference)
    return jax.jit(functools.partial(attention, chunk=CHUNK))


@given(seed=st.integers(0, 2**32 - 2), shape=st.sampled_from(SHAPES), kind=st.sampled_from(MASKS))
def test_chunked_equals_reference(seed, shape, kind):
    assert_equals_reference(chunked_attention, *shape, kind, seed, seed)


@pytest.mark.parametrize("seq, keys", SHAPES)
@pytest.mark.parametrize("kind", MASKS)
def test_chunked_equals_reference_every_shape(seq, keys, kind):
    """Every shape and mask kind once (hypothesis samples them; this makes sure each is run)."""
    assert_equals_reference(chunked_attention, seq, keys, kind, seq * keys, seq + keys)


@pytest.mark.parametrize("attention", [chunked_attention, causal_attention])
def test_fused_equals_reference_bfloat16(attention):
    """16-bit inputs on the CPU take the fused paths too: scores and softmax in float32, products in bf16."""
    q, k, v = random_qkv(0, 11, 11, jnp.bfloat16)
    mask = make_mask("padded", 0, 11, 11)
    got = attention(q, k, v, mask, chunk=CHUNK)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), reference(q, k, v, mask).astype(jnp.float32),
                               atol=2e-2, rtol=0)


# A sequence over itself: a multiple of the chunk, ragged, shorter than a chunk, one position
SQUARE = [8, 11, 3, 1, 13]
CAUSAL_MASKS = ["causal", "padded", "random causal"]


@given(seed=st.integers(0, 2**32 - 2), seq=st.sampled_from(SQUARE), kind=st.sampled_from(CAUSAL_MASKS))
def test_causal_equals_reference(seed, seq, kind):
    assert_equals_reference(causal_attention, seq, seq, kind, seed, seed)


@pytest.mark.parametrize("seq", SQUARE)
@pytest.mark.parametrize("kind", CAUSAL_MASKS)
def test_causal_equals_reference_every_shape(seq, kind):
    assert_equals_reference(causal_attention, seq, seq, kind, seq, seq + 1)


# ----------------------------------------------------------------------------------------------- forward

SEQ = ATTENTION_CHUNK + 22  # longer than one chunk of the module's own size, and ragged
CONFIG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=64, n_ctx=SEQ + 2, vocab_size=53)


@pytest.fixture(scope="module")
def inputs():
    params = random_params(CONFIG, 0)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    attention_mask = np.ones((BATCH, SEQ), np.int32)
    attention_mask[1, :37] = 0  # one left-padded row
    return params, jnp.asarray(tokens), jnp.asarray(attention_mask)


def test_forward_fused_equals_reference_path(inputs):
    params, tokens, attention_mask = inputs
    fused = tinygpt.forward(params, tokens, CONFIG, attention_mask=attention_mask, keep=("resid_post",))
    full = tinygpt.forward(params, tokens, CONFIG, attention_mask=attention_mask,
                           keep=("resid_post", "attn_pattern"))
    assert full.attn_pattern.shape == (CONFIG.n_layer, BATCH, CONFIG.n_head, SEQ, SEQ)
    np.testing.assert_allclose(fused.resid_post, full.resid_post, atol=1e-5, rtol=0)


def _float_shapes(jaxpr):
    """The shapes of every floating-point value of a jaxpr, in sub-jaxprs (scan, map, pjit bodies) too."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if jnp.issubdtype(getattr(var.aval, "dtype", jnp.int32), jnp.floating):
                yield var.aval.shape
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _float_shapes(inner)


@pytest.mark.parametrize("keep, holds_pattern", [(("resid_post",), False), (("resid_post", "attn_pattern"), True)])
def test_fused_forward_never_holds_seq_by_key_scores(inputs, keep, holds_pattern):
    params, tokens, attention_mask = inputs
    jaxpr = jax.make_jaxpr(lambda p, t, m: tinygpt.forward(p, t, CONFIG, attention_mask=m, keep=keep))(
        params, tokens, attention_mask).jaxpr
    square = [s for s in _float_shapes(jaxpr) if list(s).count(SEQ) >= 2]
    assert bool(square) == holds_pattern, square


def test_fused_forward_skips_the_keys_after_each_chunk(inputs):
    """On CPU the forward's fused path is `causal_attention`: its first chunk of queries scores only the
    keys up to its last query, [chunk, chunk], and no float of the whole forward has a [chunk, seq] shape."""
    if jax.default_backend() == "gpu":
        pytest.skip("on GPUs the fused path is jax.nn.dot_product_attention")
    params, tokens, attention_mask = inputs
    jaxpr = jax.make_jaxpr(lambda p, t, m: tinygpt.forward(p, t, CONFIG, attention_mask=m, keep=("resid_post",)))(
        params, tokens, attention_mask).jaxpr
    shapes = {tuple(s[-2:]) for s in _float_shapes(jaxpr) if len(s) >= 2}
    assert (ATTENTION_CHUNK, ATTENTION_CHUNK) in shapes
    assert (ATTENTION_CHUNK, SEQ) not in shapes
