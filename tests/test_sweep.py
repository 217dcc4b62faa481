"""tinygpt.sweep: every vectorised sweep equals the naive loop of single patched forwards (1e-5).

One config (3 layers so a run can start before, at and after a middle layer) and one token shape; random
weights with O(1) activations drawn by hypothesis through a seed. Each sweep is jitted once with the weights
and tokens as arguments; the naive single run (`patched_forward`) is jitted once with the layer, unit and
position as traced arguments. The core invariant (`test_sweep_entries_equal_single_runs`, 200 examples under
the ci profile) reuses those compiled programs and checks drawn entries of drawn sweeps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt import sweep
from tinygpt.params import param_shapes
from tinygpt.sites import SITES
from conftest import core_invariant

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=16, vocab_size=61)
BATCH, SEQ = 2, 9
TOL = 1e-5
seeds = st.integers(0, 2**32 - 1)


def random_params(seed):
    """Random weights with O(1) activations, non-uniform attention, non-zero biases and O(1) logits (the
    tied unembedding is small), so that 1e-5 is an absolute tolerance a few float32 ulps above rounding."""
    rng = np.random.default_rng(seed)
    D, M = CFG.d_model, CFG.d_mlp
    std = {"wte": 0.3, "wpe": 1.0, "W_Q": 2 / np.sqrt(D), "W_K": 2 / np.sqrt(D), "W_V": 1 / np.sqrt(D),
           "W_O": 1 / np.sqrt(D), "W_in": 1 / np.sqrt(D), "W_out": 1 / np.sqrt(M)}

    def draw(name, shape):
        if name in std:
            return jnp.asarray(std[name] * rng.standard_normal(shape), jnp.float32)
        if name.endswith("_w"):
            return jnp.asarray(1 + 0.2 * rng.standard_normal(shape), jnp.float32)
        return jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32)

    return {n: {m: draw(m, s) for m, s in shape.items()} if isinstance(shape, dict) else draw(n, shape)
            for n, shape in param_shapes(CFG).items()}


def random_tokens(seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (BATCH, SEQ)).astype(np.int32)


def answer_log_prob(logits):  # [batch, n_read, vocab] -> [batch]: log P(token 5) at the last read position
    return jax.nn.log_softmax(logits[:, -1])[:, 5]


# ------------------------------------------------------------------------------------- the naive single run


@functools.partial(jax.jit, static_argnames=("site", "axis"))
def naive_unit(params, tokens, mask, source, layer, unit, *, site, axis):
    """One full forward replacing one unit of `site` at one layer by `source`; the score."""
    patch = sweep.Patch(layer, layer + 1, sweep.unit_where(site, axis, unit, CFG, SEQ), source)
    return answer_log_prob(sweep.patched_forward(params, tokens, CFG, {site: patch}, attention_mask=mask))


# ------------------------------------------------------------------------------------------- unit sweeps


UNIT_SWEEPS = [("z", "head", None, False), ("z", "head", None, True), ("mlp_post", "d_mlp", 16, True),
               ("q", "head", None, False), ("k", "head", None, False)]  # (site, axis, chunk_size, z)


@pytest.mark.parametrize("site, axis, chunk_size, z", UNIT_SWEEPS)
@settings(max_examples=5)
@given(seed=seeds)
def test_unit_sweep_equals_naive_loop(site, axis, chunk_size, z, seed):
    """Zero replacement of every head, and replacement of every neuron, query head or key head by another
    batch's values (neurons chunked, with a ragged last chunk), at every layer, a left-padded row included;
    with z in the cache, each run's first block starts from the base run's z (the last layer's at the read
    position only). The last block computes queries at the read position only and keys everywhere, so a
    q or k patch there is applied to different positions."""
    params, tokens = random_params(seed), random_tokens(seed)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, :3] = 0  # row 1 is left-padded
    reference = tinygpt.forward(params, random_tokens(seed + 1), CFG, keep=(site,))[site]
    source = jnp.zeros((CFG.n_layer, 1, 1, 1, 1)) if site == "z" else reference[:, ::-1]
    size = sweep.axis_size(site, axis, CFG, SEQ)
    values = sweep_units_jit(params, tokens, mask, source, site=site, axis=axis, chunk_size=chunk_size, z=z)
    assert values.shape == (CFG.n_layer, size, BATCH)
    expected = np.stack([np.stack([naive_unit(params, tokens, mask, source, layer, unit, site=site, axis=axis)
                                   for unit in range(size)])
                         for layer in range(CFG.n_layer)])
    np.testing.assert_allclose(values, expected, atol=TOL, rtol=0)


@functools.partial(jax.jit, static_argnames=("site", "axis", "chunk_size", "z"))
def sweep_units_jit(params, tokens, mask, source, *, site, axis, chunk_size, z):
    cache = sweep.cache_run(params, tokens, CFG, attention_mask=mask, z=z)
    assert (cache.z is not None) == z
    size = sweep.axis_size(site, axis, CFG, SEQ)
    return sweep.sweep_units(params, CFG, cache, site, axis, source, answer_log_prob, layers=jnp.arange(CFG.n_layer),
                             units=jnp.arange(size), chunk_size=chunk_size)


# --------------------------------------------------------------------------------------- position sweeps

KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
WINDOWS = {"resid_pre": 1, "resid_post": 2, "mlp_out": 2, "attn_out": 3}  # resid_post's reaches the final resid
FIRST_CHANGED = 3  # the corrupted tokens differ from the clean ones from this position on


@jax.jit
def position_sweep_jit(params, clean, corrupt, noise):
    """Restore each kind of the clean run at every (layer, position) of the corrupted run (tokens changed
    from FIRST_CHANGED on, plus noise on their embeddings), windows of 1, 2 and 3 layers, two buckets,
    reading two positions. resid_post runs start a layer later (as the next block's resid_pre)."""
    sources = tinygpt.forward(params, clean, CFG, keep=KINDS)
    cache = sweep.cache_run(params, corrupt, CFG, edits={"embed": lambda e, layer: e + noise})
    values = sweep.sweep_positions(params, CFG, cache, {k: sources[k] for k in KINDS}, answer_log_prob,
                                   layers=jnp.arange(CFG.n_layer), positions=np.arange(SEQ), windows=WINDOWS,
                                   unchanged_before=FIRST_CHANGED, buckets=2, read=(-2, -1))
    # the sites after the attention alone, from a cache with z: each run's first block starts from it
    late = ("mlp_out", "attn_out")
    z_cache = sweep.cache_run(params, corrupt, CFG, edits={"embed": lambda e, layer: e + noise}, z=True)
    late_values = sweep.sweep_positions(params, CFG, z_cache, {k: sources[k] for k in late}, answer_log_prob,
                                        layers=jnp.arange(CFG.n_layer), positions=np.arange(SEQ), windows=WINDOWS,
                                        unchanged_before=FIRST_CHANGED, buckets=2, read=(-2, -1))
    # every kind from that cache: a patch before the attention (resid_pre) takes the full first block
    all_from_z = sweep.sweep_positions(params, CFG, z_cache, {k: sources[k] for k in KINDS}, answer_log_prob,
                                       layers=jnp.arange(CFG.n_layer), positions=np.arange(SEQ), windows=WINDOWS,
                                       unchanged_before=FIRST_CHANGED, buckets=2, read=(-2, -1))
    return values, late_values, all_from_z, answer_log_prob(sweep.base_logits(params, cache, read=(-2, -1)))


@jax.jit
def naive_position(params, clean, corrupt, noise, kind, layer, position):
    sources = tinygpt.forward(params, clean, CFG, keep=KINDS)
    patches = {}
    for i, site in enumerate(KINDS):
        lo, hi = sweep.window_layers(layer, WINDOWS[site], CFG.n_layer)
        off = CFG.n_layer  # an empty layer range: this kind is not the one restored
        patches[site] = sweep.Patch(jnp.where(kind == i, lo, off), jnp.where(kind == i, hi, off),
                                    sweep.unit_where(site, "seq", position, CFG, SEQ), sources[site])
    logits = sweep.patched_forward(params, corrupt, CFG, patches, edits={"embed": lambda e, layer: e + noise},
                                   read=(-2, -1))
    return answer_log_prob(logits)


def position_inputs(seed):
    """(params, clean, corrupt, noise): corrupted tokens and noise on their embeddings from FIRST_CHANGED on."""
    params, clean = random_params(seed), random_tokens(seed)
    corrupt = clean.copy()
    corrupt[:, FIRST_CHANGED:] = random_tokens(seed + 1)[:, FIRST_CHANGED:]
    noise = np.zeros((BATCH, SEQ, CFG.d_model), np.float32)
    noise[:, FIRST_CHANGED:] = np.random.default_rng(seed).standard_normal((BATCH, SEQ - FIRST_CHANGED, CFG.d_model))
    return params, clean, corrupt, noise


@settings(max_examples=5)
@given(seed=seeds)
def test_position_sweep_equals_naive_loop(seed):
    params, clean, corrupt, noise = position_inputs(seed)
    values, late_values, all_from_z, base = position_sweep_jit(params, clean, corrupt, noise)
    assert values.shape == (len(KINDS), CFG.n_layer, SEQ, BATCH)
    expected = np.asarray([[[naive_position(params, clean, corrupt, noise, k, layer, p) for p in range(SEQ)]
                            for layer in range(CFG.n_layer)] for k in range(len(KINDS))])
    np.testing.assert_allclose(values, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(late_values, expected[2:], atol=TOL, rtol=0)
    np.testing.assert_allclose(all_from_z, expected, atol=TOL, rtol=0)
    # before the first change, restoring is a no-op: the base run's score
    np.testing.assert_allclose(values[:, :, :FIRST_CHANGED], np.broadcast_to(base, values[:, :, :FIRST_CHANGED].shape),
                               atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------- the core invariant

SIZES = {"seq": SEQ, "head": CFG.n_head, "d_head": CFG.d_head, "d_mlp": CFG.d_mlp, "d_model": CFG.d_model}


@core_invariant
@given(seed=seeds, kind=st.sampled_from(UNIT_SWEEPS + ["positions"]),
       pads=st.lists(st.integers(0, SEQ - 1), min_size=BATCH, max_size=BATCH),
       entries=st.lists(st.tuples(st.integers(0, len(KINDS) - 1), st.integers(0, CFG.n_layer - 1),
                                  st.integers(0, CFG.d_mlp - 1)), min_size=1, max_size=3))
def test_sweep_entries_equal_single_runs(seed, kind, pads, entries):
    """Drawn entries (kind, layer, unit or position) of a drawn sweep equal the single patched run. Unit sweeps:
    any left padding of the rows (`pads` per row), any replacement values; position sweeps: the restorations of
    `test_position_sweep_equals_naive_loop`. Only that test's and the unit test's compiled programs are used
    (same static arguments and shapes), so the examples cost milliseconds."""
    if kind == "positions":
        params, clean, corrupt, noise = position_inputs(seed)
        values = position_sweep_jit(params, clean, corrupt, noise)[0]  # [kind, layer, position, batch]
        for k, layer, position in entries:
            position %= SEQ
            np.testing.assert_allclose(values[k, layer, position],
                                       naive_position(params, clean, corrupt, noise, k, layer, position),
                                       atol=TOL, rtol=0, err_msg=f"{KINDS[k]} restored at layer {layer}, {position}")
        return
    site, axis, chunk_size, z = kind
    params, tokens = random_params(seed), random_tokens(seed)
    mask = (np.arange(SEQ)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)
    if site == "z":  # zero ablation, as in the unit test
        source = jnp.zeros((CFG.n_layer, 1, 1, 1, 1))
    else:
        shape = (CFG.n_layer, *(BATCH if d == "batch" else SIZES[d] for d in SITES[site].shape))
        source = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(shape), jnp.float32)
    values = sweep_units_jit(params, tokens, mask, source, site=site, axis=axis, chunk_size=chunk_size, z=z)
    size = sweep.axis_size(site, axis, CFG, SEQ)
    for _, layer, unit in entries:
        unit %= size
        np.testing.assert_allclose(values[layer, unit],
                                   naive_unit(params, tokens, mask, source, layer, unit, site=site, axis=axis),
                                   atol=TOL, rtol=0, err_msg=f"{site} {axis} unit {unit} at layer {layer}")


# ------------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("n, chunk", [(7, 3), (6, 6), (4, 9)])
def test_chunked_vmap_equals_vmap(n, chunk):
    """Ragged last chunk, exact chunks, one chunk larger than the input."""
    xs = (jnp.arange(n, dtype=jnp.float32), jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2))

    def fn(x):
        return {"a": x[0] * 2, "b": x[1].sum() + x[0]}

    got, want = jax.jit(lambda xs: sweep.chunked_vmap(fn, xs, chunk))(xs), jax.vmap(fn)(xs)
    for key in ("a", "b"):
        np.testing.assert_array_equal(got[key], want[key])


@given(positions=st.lists(st.integers(0, 30), min_size=1, max_size=20), n=st.integers(1, 6))
def test_position_buckets_partition_in_order(positions, n):
    buckets = sweep.position_buckets(np.asarray(positions), n)
    assert 0 < len(buckets) <= n
    np.testing.assert_array_equal(np.concatenate(buckets), np.unique(positions))


@given(layer=st.integers(0, 11), window=st.integers(1, 12))
def test_window_layers_is_romes(layer, window):
    lo, hi = sweep.window_layers(layer, window, 12)
    expected = [L for L in range(max(0, layer - window // 2), min(12, layer - (-window // 2)))]
    assert list(range(int(lo), int(hi))) == expected
    assert int(lo) <= layer < int(hi)


def test_chunk_size_within_budget():
    per_run = sweep.run_bytes(CFG, BATCH, SEQ)
    assert sweep.chunk_size_for(CFG, BATCH, SEQ, 100, memory_budget=10 * per_run) == 10
    assert sweep.chunk_size_for(CFG, BATCH, SEQ, 4, memory_budget=10 * per_run) == 4
    assert sweep.chunk_size_for(CFG, BATCH, SEQ, 100, memory_budget=1) == 1


def test_errors_name_the_problem():
    params, tokens = random_params(0), random_tokens(0)
    with pytest.raises(ValueError, match="embed / pos_embed only"):
        sweep.cache_run(params, tokens, CFG, edits={"mlp_out": lambda v, layer: v})
    with pytest.raises(ValueError, match="global"):
        sweep.check_patch_site("logits")
    with pytest.raises(ValueError, match="no axis 'head'"):
        sweep.unit_where("mlp_out", "head", 0, CFG, SEQ)
    cache = sweep.cache_run(params, tokens, CFG)
    patch = sweep.Patch(0, 1, sweep.unit_where("resid_pre", "seq", 5, CFG, SEQ), jnp.zeros((3, 1, 1, 1)))
    with pytest.raises(ValueError, match="precede the first recomputed position"):
        sweep.run_patched(params, CFG, cache, {"resid_pre": patch}, first=5, read=(2,))
    with pytest.raises(ValueError, match="outside a sequence of 9"):
        sweep.read_positions([9], SEQ)


@settings(max_examples=5)
@given(seed=seeds, layer=st.integers(0, CFG.n_layer - 1), position=st.integers(0, SEQ - 1))
def test_resid_post_and_resid_pre_patched_together(seed, layer, position):
    """resid_post runs start at the next block (its resid_pre): with a resid_pre patch active at that same
    next layer (and one reaching past the last block, which has no resid_pre to patch there), the run equals
    the full patched forward, the resid_post patch applied first."""
    params, tokens = random_params(seed), random_tokens(seed)
    other = tinygpt.forward(params, random_tokens(seed + 1), CFG, keep=("resid_pre", "resid_post"))
    at = sweep.unit_where("resid_pre", "seq", position, CFG, SEQ)
    half = jnp.arange(CFG.d_model)[None, None, :] < CFG.d_model // 2  # overlapping, not equal, regions
    patches = {"resid_pre": sweep.Patch(layer + 1, CFG.n_layer + 1, at & half, other.resid_pre[::-1]),
               "resid_post": sweep.Patch(layer, CFG.n_layer, at, other.resid_post)}
    cache = sweep.cache_run(params, tokens, CFG)
    ours = sweep.run_patched(params, CFG, cache, patches, read=(position, -1) if position < SEQ - 1 else (-1,))
    plain = sweep.patched_forward(params, tokens, CFG, patches, read=(position, -1) if position < SEQ - 1 else (-1,))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=TOL, rtol=0)
