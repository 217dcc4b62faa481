"""Logit lens: the lens of the last block's output is the model's logits; every summary (top tokens, KL,
target probability and rank) matches a direct computation; rows are shaped as the CLI's JSON promises.

The reading-probe tests share one small config (`CFG`, the shape of the committed golden checkpoint) and
`random_params`, so compiled programs are reused across files; functions under test take params as
arguments, so each compiles once per shape.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from probes.lens import LENS_SITES, lens_logits, logit_lens
from tinygpt.testing import random_params as _random_params
from tinygpt.testing import random_tokens as _random_tokens

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=16, vocab_size=61)
BATCH, SEQ = 2, 7
K = 5
seeds = st.integers(0, 2**32 - 1)
#: Reference forwards in the reading-probe tests keep every site: one compiled program per shape for all files.
KEEP = None


def random_params(seed, config=CFG):
    """Random weights with non-trivial LayerNorm weights and biases (`tinygpt.testing.random_params`)."""
    return _random_params(config, seed, spread=0.3)



def random_tokens(seed, batch=BATCH, seq=SEQ, config=CFG):
    return _random_tokens(config, seed, (batch, seq))


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------------- tests


@settings(max_examples=6)
@given(seed=seeds)
def test_lens_of_last_resid_post_is_the_models_logits(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    np.testing.assert_allclose(lens_logits(params, trace.resid_post[-1], CFG), trace.logits, rtol=1e-5, atol=1e-5)
    # and the earlier layers really are different readings (the invariant is not vacuous)
    assert np.abs(np.asarray(lens_logits(params, trace.resid_post[0], CFG) - trace.logits)).max() > 1e-2

    summary = logit_lens(params, CFG, tokens, target=3, k=K)
    last = LENS_SITES.index("resid_post")
    np.testing.assert_array_equal(summary.top_ids[last, -1], summary.final_top_ids)
    np.testing.assert_allclose(summary.top_probs[last, -1], summary.final_top_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(summary.kl[last, -1], 0.0, atol=1e-5)
    # resid_pre of block l + 1 is resid_post of block l: the same reading
    np.testing.assert_allclose(summary.kl[LENS_SITES.index("resid_pre"), 1:], summary.kl[last, :-1], rtol=1e-5,
                               atol=1e-6)


@settings(max_examples=4)
@given(seed=seeds, site=st.sampled_from(LENS_SITES), layer=st.integers(0, CFG.n_layer - 1))
def test_summaries_match_a_direct_computation(seed, site, layer):
    params, tokens = random_params(seed), random_tokens(seed)
    targets = random_tokens(seed + 1)  # one target per position
    k = K
    summary = logit_lens(params, CFG, tokens, target=targets, k=k)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    log_probs = log_softmax64(lens_logits(params, trace[site][layer], CFG))  # [batch, seq, vocab]
    final = log_softmax64(trace.logits)
    s = LENS_SITES.index(site)

    expected_kl = (np.exp(final) * (final - log_probs)).sum(-1)
    np.testing.assert_allclose(summary.kl[s, layer], expected_kl, rtol=1e-4, atol=1e-5)
    expected_top = np.sort(np.exp(log_probs), axis=-1)[..., ::-1][..., :k]
    np.testing.assert_allclose(summary.top_probs[s, layer], expected_top, rtol=1e-4, atol=1e-6)
    picked = np.take_along_axis(log_probs, summary.top_ids[s, layer].astype(int), axis=-1)
    np.testing.assert_allclose(np.exp(picked), summary.top_probs[s, layer], rtol=1e-4, atol=1e-6)
    target_log_prob = np.take_along_axis(log_probs, targets[..., None].astype(int), axis=-1)[..., 0]
    np.testing.assert_allclose(summary.target_probs[s, layer], np.exp(target_log_prob), rtol=1e-4, atol=1e-7)
    expected_rank = (log_probs > target_log_prob[..., None] + 1e-9).sum(-1)
    assert np.abs(summary.target_ranks[s, layer] - expected_rank).max() <= 1  # float ties may differ by one


def test_rows_are_the_documented_json_shape():
    params, tokens = random_params(0), random_tokens(0)
    summary = logit_lens(params, CFG, tokens, target=5, k=K)
    rows = summary.rows(batch=1)
    assert len(rows) == CFG.n_layer * len(LENS_SITES) * SEQ
    first, second = rows[0], rows[1]
    assert (first["layer"], first["site"], first["position"]) == (0, "resid_pre", 0)
    assert (second["layer"], second["site"], second["position"]) == (0, "resid_pre", 1)
    assert {"layer", "site", "position", "top", "kl", "target", "target_prob", "target_rank"} <= set(first)
    for row in rows:
        probs = [p for _, p in row["top"]]
        assert len(row["top"]) == K and probs == sorted(probs, reverse=True)
        assert all(isinstance(t, int) and 0 <= t < CFG.vocab_size for t, _ in row["top"])
    row = rows[-1]
    assert (row["layer"], row["site"], row["position"]) == (CFG.n_layer - 1, "resid_post", SEQ - 1)
    assert row["top"][0][0] == int(summary.final_top_ids[1, -1, 0])


def test_unknown_site_is_a_clear_error():
    with pytest.raises(ValueError, match="lens sites must be among resid_pre, resid_mid, resid_post"):
        logit_lens(random_params(0), CFG, random_tokens(0), sites=("mlp_out",))


def test_target_shapes():
    """One id, ids [batch, seq] or one per row [batch, 1]; a 1-d target (per row or per position?) is refused."""
    from probes.lens import broadcast_target

    tokens = np.zeros((3, 5), np.int32)
    np.testing.assert_array_equal(broadcast_target(7, tokens), np.full((3, 5), 7))
    per_row = broadcast_target(np.array([[1], [2], [3]]), tokens)
    np.testing.assert_array_equal(per_row, np.repeat([[1], [2], [3]], 5, axis=1))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        broadcast_target(np.array([1, 2, 3]), tokens)
    with pytest.raises(ValueError, match=r"broadcastable to the tokens' shape \(3, 5\)"):
        broadcast_target(np.zeros((2, 5), np.int32), tokens)
