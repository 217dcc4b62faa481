"""tinygpt.sweep: every vectorised sweep equals the naive loop of single patched forwards (1e-5).

One config (3 layers so a run can start before, at and after a middle layer) and one token shape; random
weights with O(1) activations drawn by hypothesis through a seed. The comparisons are the public checks of
`tinygpt.testing` (`check_sweep_equals_single_runs`, `check_position_sweep_equals_single_runs`): each sweep is
jitted once with the weights and tokens as arguments, and the naive single run (`patched_forward`) once with the
layer, unit and position as traced arguments. The core invariant (`test_sweep_entries_equal_single_runs`, 200
examples under the ci profile) reuses those compiled programs and checks drawn entries of drawn sweeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt import sweep
from tinygpt.sites import SITES
from tinygpt.testing import (check_position_sweep_equals_single_runs, check_sweep_equals_single_runs, random_params,
                             random_tokens)
from tinygpt.testing.strategies import SEEDS as seeds
from tinygpt.testing.strategies import token_batches
from conftest import core_invariant

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=16, vocab_size=61)
BATCH, SEQ = 2, 9
TOL = 1e-5
ANSWER = 5  # the sweeps score log P(token 5) at the last read position
# O(1) logits (a small tied unembedding), so that 1e-5 is an absolute tolerance a few float32 ulps above rounding
WTE_STD = 0.3


def inputs(seed):
    """(params, tokens) of CFG's shape, drawn from `seed`."""
    return random_params(CFG, seed, wte_std=WTE_STD), random_tokens(CFG, seed, (BATCH, SEQ))


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
    params, tokens = inputs(seed)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, :3] = 0  # row 1 is left-padded
    reference = tinygpt.forward(params, random_tokens(CFG, seed + 1, (BATCH, SEQ)), CFG, keep=(site,))[site]
    source = None if site == "z" else reference[:, ::-1]  # None: zeros
    check_sweep_equals_single_runs(params, CFG, tokens, mask, site=site, axis=axis, source=source, answer=ANSWER,
                                   chunk_size=chunk_size, z=z, tolerance=TOL)


# --------------------------------------------------------------------------------------- position sweeps

KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
WINDOWS = {"resid_pre": 1, "resid_post": 2, "mlp_out": 2, "attn_out": 3}  # resid_post's reaches the final resid
FIRST_CHANGED = 3  # the corrupted tokens differ from the clean ones from this position on


def position_inputs(seed):
    """(params, clean, corrupt, noise): corrupted tokens and noise on their embeddings from FIRST_CHANGED on."""
    params, clean = inputs(seed)
    corrupt = clean.copy()
    corrupt[:, FIRST_CHANGED:] = random_tokens(CFG, seed + 1, (BATCH, SEQ))[:, FIRST_CHANGED:]
    noise = np.zeros((BATCH, SEQ, CFG.d_model), np.float32)
    noise[:, FIRST_CHANGED:] = np.random.default_rng(seed).standard_normal((BATCH, SEQ - FIRST_CHANGED, CFG.d_model))
    return params, clean, corrupt, noise


def check_position_sweep(seed, entries=None):
    """Restore each kind of the clean run at every (layer, position) of the corrupted run (tokens changed from
    FIRST_CHANGED on, plus noise on their embeddings), windows of 1, 2 and 3 layers, two buckets, reading two
    positions; also from a cache with z, of every kind and of the kinds after the attention alone (each run's
    first block starts from z). resid_post runs start a layer later (as the next block's resid_pre)."""
    params, clean, corrupt, noise = position_inputs(seed)
    check_position_sweep_equals_single_runs(params, CFG, clean, corrupt, sites=KINDS, windows=WINDOWS, noise=noise,
                                            answer=ANSWER, unchanged_before=FIRST_CHANGED, buckets=2, read=(-2, -1),
                                            z=True, entries=entries, tolerance=TOL)


@settings(max_examples=5)
@given(seed=seeds)
def test_position_sweep_equals_naive_loop(seed):
    """Every entry; before the first change, restoring is a no-op: the base run's score."""
    check_position_sweep(seed)


# ------------------------------------------------------------------------------------- the core invariant

SIZES = {"seq": SEQ, "head": CFG.n_head, "d_head": CFG.d_head, "d_mlp": CFG.d_mlp, "d_model": CFG.d_model}


@core_invariant
@given(seed=seeds, kind=st.sampled_from(UNIT_SWEEPS + ["positions"]),
       batch=token_batches(CFG, batch=BATCH, seq=SEQ),
       entries=st.lists(st.tuples(st.integers(0, len(KINDS) - 1), st.integers(0, CFG.n_layer - 1),
                                  st.integers(0, CFG.d_mlp - 1)), min_size=1, max_size=3))
def test_sweep_entries_equal_single_runs(seed, kind, batch, entries):
    """Drawn entries (kind, layer, unit or position) of a drawn sweep equal the single patched run. Unit sweeps:
    any tokens and left padding (`batch`), any replacement values; position sweeps: the restorations of
    `test_position_sweep_equals_naive_loop`. Only that test's and the unit test's compiled programs are used
    (same static arguments and shapes), so the examples cost milliseconds."""
    if kind == "positions":
        check_position_sweep(seed, entries=[(k, layer, position % SEQ) for k, layer, position in entries])
        return
    site, axis, chunk_size, z = kind
    tokens, mask = batch
    params = random_params(CFG, seed, wte_std=WTE_STD)
    if site == "z":  # zero ablation, as in the unit test
        source = None
    else:
        shape = (CFG.n_layer, *(BATCH if d == "batch" else SIZES[d] for d in SITES[site].shape))
        source = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(shape), jnp.float32)
    size = sweep.axis_size(site, axis, CFG, SEQ)
    check_sweep_equals_single_runs(params, CFG, tokens, mask, site=site, axis=axis, source=source, answer=ANSWER,
                                   chunk_size=chunk_size, z=z, tolerance=TOL,
                                   entries=[(layer, unit % size) for _, layer, unit in entries])


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
    params, tokens = inputs(0)
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
    params, tokens = inputs(seed)
    other = tinygpt.forward(params, random_tokens(CFG, seed + 1, (BATCH, SEQ)), CFG, keep=("resid_pre", "resid_post"))
    at = sweep.unit_where("resid_pre", "seq", position, CFG, SEQ)
    half = jnp.arange(CFG.d_model)[None, None, :] < CFG.d_model // 2  # overlapping, not equal, regions
    patches = {"resid_pre": sweep.Patch(layer + 1, CFG.n_layer + 1, at & half, other.resid_pre[::-1]),
               "resid_post": sweep.Patch(layer, CFG.n_layer, at, other.resid_post)}
    cache = sweep.cache_run(params, tokens, CFG)
    ours = sweep.run_patched(params, CFG, cache, patches, read=(position, -1) if position < SEQ - 1 else (-1,))
    plain = sweep.patched_forward(params, tokens, CFG, patches, read=(position, -1) if position < SEQ - 1 else (-1,))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=TOL, rtol=0)
