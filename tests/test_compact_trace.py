"""Compact traces (`forward(..., compact=True)`): sites that are cheap functions of other kept sites are
not stored but computed on read, and every kept site reads as in the fully stored trace (to float32
rounding: the same functions of the same values, which XLA may fuse differently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt.sites import DERIVED, SITE_NAMES
from tinygpt.trace import Trace, derived_sites

CONFIG = tinygpt.Config(n_layer=3, n_head=4, d_model=32, d_head=8, d_mlp=128, n_ctx=16, vocab_size=97)
PARAMS = tinygpt.init_params(CONFIG, jax.random.PRNGKey(0))
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 12)).astype(np.int32)
MASK = np.ones((3, 12), np.int32)
MASK[2, :4] = 0  # a left-padded row
EVERY_DERIVABLE = {"ln1", "attn_scores", "attn_pattern", "head_out", "resid_mid", "ln2", "mlp_post", "resid_post"}


def assert_same_sites(compact: Trace, full: Trace, names=SITE_NAMES):
    for name in names:
        a, b = getattr(compact, name), getattr(full, name)
        assert (a is None) == (b is None), name
        if a is not None:
            # the same functions on the same values; XLA may fuse them differently (float32 rounding)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-5, err_msg=name)


def leaf_bytes(trace: Trace) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(trace))


def test_every_site_compact_equals_every_site_stored():
    """A derived site is computed with the forward's own functions from the same stored values."""
    full = tinygpt.forward(PARAMS, TOKENS, CONFIG, attention_mask=MASK)
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, attention_mask=MASK, compact=True)
    assert set(compact.derived()) == EVERY_DERIVABLE == set(DERIVED)
    assert compact.kept() == full.kept() == SITE_NAMES
    assert set(compact.stored()) == set(SITE_NAMES) - EVERY_DERIVABLE
    stored_bytes = leaf_bytes(compact)  # before any derived site is read (and kept)
    weight_bytes = sum(PARAMS["blocks"][w].nbytes for w in ("W_O", "ln1_w", "ln1_b", "ln2_w", "ln2_b"))
    weight_bytes += CONFIG.n_layer * MASK.size  # the attention mask per layer, as bools
    derived_bytes = sum(getattr(full, name).nbytes for name in EVERY_DERIVABLE)
    assert stored_bytes == leaf_bytes(full) - derived_bytes + weight_bytes
    assert_same_sites(compact, full)


def test_compiled_forward_returns_only_the_stored_sites():
    """The compiled compact forward's outputs hold no derived site (the weights join outside it)."""
    run = tinygpt.make_forward(CONFIG, compact=True)
    trace = run(PARAMS, TOKENS)
    stored = jax.tree_util.tree_leaves(trace)
    weights = {w for name in trace.derived() for w in DERIVED[name][1]}
    assert len(stored) == len(trace.stored()) + len(weights)
    assert_same_sites(trace, tinygpt.forward(PARAMS, TOKENS, CONFIG))


def test_a_site_is_stored_when_its_sources_are_not_kept():
    trace = tinygpt.forward(PARAMS, TOKENS, CONFIG, keep=("attn_pattern", "mlp_post", "resid_post"), compact=True)
    assert trace.derived() == () and trace.stored() == ("attn_pattern", "mlp_post", "resid_post")
    keep = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # resid_mid, a source, not kept: stored
    assert tinygpt.forward(PARAMS, TOKENS, CONFIG, keep=keep, compact=True).derived() == ()
    # resid_post derived from a derived resid_mid
    keep = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    trace = tinygpt.forward(PARAMS, TOKENS, CONFIG, keep=keep, compact=True)
    assert trace.derived() == ("resid_mid", "resid_post") and trace.kept() == keep
    assert_same_sites(trace, tinygpt.forward(PARAMS, TOKENS, CONFIG, keep=keep))


def test_edited_site_is_stored_and_edited_sources_propagate():
    """An edited derived site is not a function of its sources: stored. Edited sources are what the
    forward computed from, so what is derived from them matches."""
    edits = {
        "attn_pattern": lambda p, layer: p * 0.5,  # stored as edited
        "mlp_pre": lambda x, layer: x + 0.25 * (layer == 1),  # mlp_post is derived from the edited values
        "attn_out": lambda x, layer: -x,  # resid_mid = resid_pre + the edited attn_out
    }
    full = tinygpt.forward(PARAMS, TOKENS, CONFIG, edits=edits)
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, edits=edits, compact=True)
    assert "attn_pattern" in compact.stored()
    assert {"mlp_post", "resid_mid", "resid_post"} <= set(compact.derived())
    assert_same_sites(compact, full)


@settings(max_examples=8)  # each example traces an edited forward op by op (~1.7 s); CI's budget is 20 min
@given(keep=st.sets(st.sampled_from(SITE_NAMES), min_size=1),
       edited=st.sets(st.sampled_from(["resid_pre", "attn_scores", "z", "mlp_pre", "resid_mid", "head_out",
                                       "ln1", "mlp_post"]), max_size=3))
def test_any_keep_and_edits_read_the_same(keep, edited):
    edits = {name: (lambda x, layer: x * 1.5 + 0.125) for name in edited}
    if "attn_scores" in edits:  # keep the masked entries at -inf
        edits["attn_scores"] = lambda s, layer: jnp.where(jnp.isfinite(s), s * 1.5, s)
    full = tinygpt.forward(PARAMS, TOKENS, CONFIG, edits=edits, keep=keep, attention_mask=MASK)
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, edits=edits, keep=keep, attention_mask=MASK, compact=True)
    assert set(compact.derived()) == derived_sites(frozenset(keep), edits)
    assert not set(compact.derived()) & set(edits)
    assert_same_sites(compact, full)


def test_compact_trace_through_jit_and_layer_slicing():
    """A compact trace is a pytree: it crosses jit boundaries, and a map along the layer axis (which the
    weights it carries share) slices the derived sites with it."""
    tokens = TOKENS[:2]  # a batch unlike n_layer, so the map below cannot slice a non-layer axis
    compact = tinygpt.forward(PARAMS, tokens, CONFIG, compact=True)
    full = tinygpt.forward(PARAMS, tokens, CONFIG)
    through = jax.jit(lambda t: t)(compact)
    assert through.derived() == compact.derived()
    assert_same_sites(through, full)
    per_layer = {n for n in SITE_NAMES if n not in ("embed", "pos_embed", "ln_final_scale", "ln_final", "logits")}
    first_two = jax.tree_util.tree_map(lambda x: x[:2] if x.ndim >= 2 and x.shape[0] == CONFIG.n_layer else x,
                                       compact)
    for name in per_layer:
        np.testing.assert_allclose(np.asarray(getattr(first_two, name)), np.asarray(getattr(full, name))[:2],
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def test_inside_jit_and_materialized():
    @jax.jit
    def head_out_sum(params, tokens):
        return tinygpt.forward(params, tokens, CONFIG, compact=True).head_out.sum(axis=-2)

    full = tinygpt.forward(PARAMS, TOKENS, CONFIG)
    np.testing.assert_allclose(np.asarray(head_out_sum(PARAMS, TOKENS)),
                               np.asarray(full.attn_out - PARAMS["blocks"]["b_O"][:, None, None]),
                               rtol=1e-5, atol=1e-5)
    materialized = tinygpt.forward(PARAMS, TOKENS, CONFIG, compact=True).materialized()
    assert materialized.derived() == () and materialized.stored() == SITE_NAMES
    assert_same_sites(materialized, full)


def test_compact_trace_from_vmap():
    """vmap stacks every leaf, the weights included: derived sites of the stacked trace are right."""
    def run(compact):
        return jax.vmap(lambda t: tinygpt.forward(PARAMS, t[None], CONFIG, compact=compact))(TOKENS)

    compact, full = run(True), run(False)
    assert compact.derived() and compact.ln1.shape == (3, CONFIG.n_layer, 1, 12, CONFIG.d_model)
    assert_same_sites(compact, full)


def test_read_inside_jit_does_not_leak_into_the_trace():
    """A derived site first read inside a jit over a concrete trace is not kept as a tracer."""
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, compact=True)
    full = tinygpt.forward(PARAMS, TOKENS, CONFIG)
    inside = jax.jit(lambda: compact.resid_post.sum())()
    np.testing.assert_allclose(float(inside), float(full.resid_post.sum()), rtol=1e-5)
    assert_same_sites(compact, full)  # read outside: concrete values


def test_replace_keeps_every_other_site():
    """Replacing a source (or dropping it) leaves the sites computed from it as they were, as on a stored
    trace; the replaced site reads its new value."""
    full = tinygpt.forward(PARAMS, TOKENS, CONFIG)
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, compact=True)
    zeros = jnp.zeros_like(full.resid_pre)
    for trace in (compact.replace(resid_pre=zeros, ln1_scale=None), full.replace(resid_pre=zeros, ln1_scale=None)):
        assert trace.ln1_scale is None and "ln1_scale" not in trace.kept()
        np.testing.assert_array_equal(np.asarray(trace.resid_pre), 0)
        assert_same_sites(trace, full, [n for n in SITE_NAMES if n not in ("resid_pre", "ln1_scale")])
    assert {"ln1", "resid_mid", "ln2", "resid_post"} <= set(compact.replace(resid_pre=zeros).stored())


def test_derived_value_is_computed_once():
    compact = tinygpt.forward(PARAMS, TOKENS, CONFIG, compact=True)
    assert compact.attn_pattern is compact.attn_pattern
    assert compact["head_out"] is compact.head_out


def test_unknown_names_are_refused():
    with pytest.raises(tinygpt.SiteError, match="resid_psot"):
        Trace(resid_psot=np.zeros(3))
    with pytest.raises(tinygpt.SiteError, match="pattern"):
        Trace(derived=("pattern",))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        Trace().nope
