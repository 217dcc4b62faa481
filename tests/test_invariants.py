"""Property-based invariants of the forward pass, over random weights and tokens of a few tiny configs.

The invariants themselves are the public checks of `tinygpt.testing` (tinygpt/testing/invariants.py), and the
inputs come from its strategies. JAX compiles once per (config, keep, input shapes), so the config space is three
fixed cases, each with its own sequence length; hypothesis draws weights (through a seed), tokens, positions,
permutations and padding masks. `tinygpt.forward` reuses one compiled program per (config, keep, input shape),
so the core invariants (`@core_invariant`: 200 examples each under the ci profile, see tests/conftest.py) cost
a few compiles and then milliseconds per example.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import tinygpt
from tinygpt import testing
from tinygpt.params import cast
from tinygpt.sites import SITE_NAMES, SITES
from tinygpt.testing import assert_close, check_identity_edit, random_params, random_tokens
from tinygpt.testing.strategies import params, token_batches
from conftest import core_invariant

BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
    config: tinygpt.Config
    seq: int  # length of the token batches of this case
    short: int  # length of the shorter prompt in the padding test

    def __repr__(self):  # readable hypothesis falsifying examples
        c = self.config
        return f"Case(L{c.n_layer} H{c.n_head} D{c.d_model} M{c.d_mlp} ctx{c.n_ctx} V{c.vocab_size} seq{self.seq})"


CASES = [
    # one layer, one head, the whole context
    Case(tinygpt.Config(n_layer=1, n_head=1, d_model=16, d_head=16, d_mlp=64, n_ctx=8, vocab_size=29), 8, 3),
    # d_mlp != 4 * d_model
    Case(tinygpt.Config(n_layer=2, n_head=2, d_model=24, d_head=12, d_mlp=40, n_ctx=12, vocab_size=41), 6, 2),
    Case(tinygpt.Config(n_layer=3, n_head=3, d_model=48, d_head=16, d_mlp=192, n_ctx=16, vocab_size=64), 11, 5),
]
# every vocab size differs from every other dimension of its case (the jaxpr test looks for it)
for _c in CASES:
    _cfg = _c.config
    assert _cfg.vocab_size not in (BATCH, _c.seq, _c.short, _cfg.n_layer, _cfg.n_head, _cfg.d_model,
                                   _cfg.d_head, _cfg.d_mlp, _cfg.n_ctx)

cases = st.sampled_from(CASES)


@st.composite
def inputs(draw, cases=cases, masked=None):
    """(case, params, tokens, mask) for a forward of the case's shape [BATCH, case.seq]: random params, drawn
    tokens, and a left-padding mask half the time (None the other half; `masked` fixes which)."""
    case = draw(cases)
    tokens, mask = draw(token_batches(case.config, batch=BATCH, seq=case.seq), label="tokens, mask")
    if masked is None:
        masked = draw(st.booleans(), label="masked")
    return case, draw(params(case.config), label="params"), tokens, mask if masked else None


HEAD_SITES = ("q", "k", "v", "z", "head_out", "attn_scores", "attn_pattern")


# --------------------------------------------------------------------------------------------- causality


@core_invariant
@given(case_inputs=inputs(masked=False), data=st.data())
def test_causality_future_tokens_do_not_change_the_past(case_inputs, data):
    case, weights, tokens, _ = case_inputs
    t = data.draw(st.integers(1, case.seq - 1), label="t")
    testing.check_causal(weights, case.config, tokens, position=t, seed=data.draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------------------------- residual decomposition


@core_invariant
@given(case_inputs=inputs())
def test_residual_stream_decomposes_into_component_writes(case_inputs):
    case, weights, tokens, mask = case_inputs
    testing.check_residual_decomposition(weights, case.config, tokens, mask)


@core_invariant
@given(case_inputs=inputs())
def test_attn_out_is_the_sum_of_head_writes(case_inputs):
    case, weights, tokens, mask = case_inputs
    testing.check_head_sums(weights, case.config, tokens, mask)


# ------------------------------------------------------------------------------------ attention patterns


@core_invariant
@given(case_inputs=inputs())
def test_attention_pattern_is_causal_and_normalized(case_inputs):
    case, weights, tokens, mask = case_inputs
    testing.check_attention_patterns(weights, case.config, tokens, mask)
    if mask is None:  # sanity: the random weights give non-uniform attention (the properties are not trivially met)
        pattern = tinygpt.forward(weights, tokens, case.config).attn_pattern
        assert np.asarray(pattern)[..., -1, :].max() > 1.5 / case.seq


# ------------------------------------------------------------------------------------ padding invariance


@core_invariant
@given(case_inputs=inputs(masked=False), data=st.data())
def test_left_padding_matches_unpadded_single_runs(case_inputs, data):
    """A batch of full-length prompts, one row (drawn) cut to the case's short length by left padding (drawn
    ids at its padding positions): every row's real positions equal the row run alone, unpadded."""
    case, weights, tokens, _ = case_inputs
    short_row = data.draw(st.integers(0, BATCH - 1), label="short_row")
    pads = np.zeros(BATCH, int)
    pads[short_row] = case.seq - case.short
    testing.check_padding_invariance(weights, case.config, tokens, testing.left_padding_mask(pads, case.seq))


# ------------------------------------------------------------------------------------- head permutation


@given(case_inputs=inputs(st.sampled_from([c for c in CASES if c.config.n_head >= 2]), masked=False),
       data=st.data())
def test_consistent_head_permutation_only_permutes_heads(case_inputs, data):
    case, weights, tokens, _ = case_inputs
    cfg = case.config
    layer = data.draw(st.integers(0, cfg.n_layer - 1), label="layer")
    perm = np.array(data.draw(st.permutations(range(cfg.n_head)), label="perm"))
    assume(not np.array_equal(perm, np.arange(cfg.n_head)))  # the identity would permute nothing

    blocks = dict(weights["blocks"])
    for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O"):  # head axis right after the layer axis
        blocks[name] = blocks[name].at[layer].set(blocks[name][layer][perm])
    permuted = dict(weights, blocks=blocks)

    a, b = tinygpt.forward(weights, tokens, cfg), tinygpt.forward(permuted, tokens, cfg)
    for name in SITE_NAMES:
        expected = np.asarray(a[name])
        if name in HEAD_SITES:
            head_axis = SITES[name].shape.index("head")
            expected = expected.copy()
            expected[layer] = np.take(expected[layer], perm, axis=head_axis)
        assert_close(b[name], expected, what=f"{name} with heads of layer {layer} permuted by {perm}")


# ------------------------------------------------------------------------------------------ jit vs eager


# Op-by-op execution compiles every primitive once per shape (~10 s per case on 2 cores), so the no-jit runs
# use one case, shared with the identity-edit tests; hypothesis still draws weights, tokens and masks.
EAGER_CASE = CASES[1]


@core_invariant
@given(case_inputs=inputs(st.just(EAGER_CASE)))
def test_jit_equals_no_jit(case_inputs):
    case, weights, tokens, mask = case_inputs
    testing.check_jit_equals_eager(weights, case.config, tokens, mask)


# ------------------------------------------------------------------------------------------ bf16 vs fp32


@given(case_inputs=inputs(masked=False))
def test_bfloat16_logits_close_to_float32(case_inputs):
    case, weights, tokens, _ = case_inputs
    cfg = case.config
    full = tinygpt.forward(weights, tokens, cfg)
    half_params = cast(weights, "bfloat16")
    half = tinygpt.forward(half_params, tokens, cfg, keep=("logits",))
    assert half.logits.dtype == jnp.float32  # logits are computed in float32
    shapes = jax.eval_shape(lambda p, t: tinygpt.forward(p, t, cfg, keep=("resid_post",)), half_params, tokens)
    assert shapes.resid_post.dtype == jnp.bfloat16  # the residual stream really is bf16 (traced, not compiled)
    # Tolerance: bf16 keeps 8 significant bits (relative rounding error up to 2^-9 ~ 0.2% per rounding). The
    # residual stream is stored in bf16 and every matmul input and output is rounded: ~5 roundings per block
    # on O(1) LayerNorm-ed activations, amplified by the sharp attention of these weights (scores of std ~4:
    # a 0.2% error on a score of 10 moves the pattern by ~2%). Over 1-3 blocks this measures at ~1% RMS and
    # up to ~2.3% max of the logit scale (30 seeds per case), so the bounds are 5% of the logit scale for the
    # worst element and 3% for the RMS error: about twice what bf16 does, far below a real bug (O(100%)).
    l32, l16 = np.asarray(full.logits, np.float64), np.asarray(half.logits, np.float64)
    scale = np.abs(l32).max()
    err = np.abs(l16 - l32)
    assert err.max() <= 0.05 * scale, f"max |bf16 - f32| = {err.max():.3g}, logit scale {scale:.3g}"
    rms = np.sqrt((err**2).mean()) / np.sqrt((l32**2).mean())
    assert rms <= 0.03, f"relative RMS error {rms:.3g}"


# -------------------------------------------------------------------------------------------------- keep


KEEP_CASE = CASES[1]


@given(case_inputs=inputs(st.just(KEEP_CASE), masked=False))
def test_keep_one_layer_site(case_inputs):
    _, weights, tokens, _ = case_inputs
    cfg = KEEP_CASE.config
    tr = tinygpt.forward(weights, tokens, cfg, keep=("resid_post",))
    assert tr.kept() == ("resid_post",)
    assert all(getattr(tr, n) is None for n in SITE_NAMES if n != "resid_post")
    assert tr.resid_post.shape == (cfg.n_layer, BATCH, KEEP_CASE.seq, cfg.d_model)
    assert_close(tr.resid_post, tinygpt.forward(weights, tokens, cfg).resid_post, rtol=1e-6, atol_frac=1e-6)


@given(case_inputs=inputs(st.just(KEEP_CASE), masked=False))
def test_keep_global_site_only(case_inputs):
    _, weights, tokens, _ = case_inputs
    cfg = KEEP_CASE.config
    tr = tinygpt.forward(weights, tokens, cfg, keep=("logits",))
    assert tr.kept() == ("logits",)
    assert all(getattr(tr, n) is None for n in SITE_NAMES if n != "logits")
    assert_close(tr.logits, tinygpt.forward(weights, tokens, cfg).logits, rtol=1e-6, atol_frac=1e-6)


def _dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr, in sub-jaxprs (scan bodies, pjit, ...) too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _dot_generals(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _dot_generals(sub.jaxpr)


def _vocab_dots(config, keep, seq):
    weights = random_params(config, 0)
    tokens = random_tokens(config, 0, (BATCH, seq))
    jaxpr = jax.make_jaxpr(lambda p, t: tinygpt.forward(p, t, config, keep=keep))(weights, tokens).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert dots, "no dot_general found at all: the jaxpr walk is broken"
    V = config.vocab_size
    return [e for e in dots if any(V in getattr(v.aval, "shape", ()) for v in (*e.invars, *e.outvars))]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_logits_not_computed_unless_kept(case):
    assert _vocab_dots(case.config, ("logits",), case.seq), "the unembedding should be a dot_general over vocab"
    assert _vocab_dots(case.config, ("resid_post",), case.seq) == []
    assert _vocab_dots(case.config, ("resid_post", "ln_final"), case.seq) == []


# ---------------------------------------------------------------------------------------- identity edits

IDENTITY_CASE = EAGER_CASE
RESTRICTED_KEEP = ("attn_out", "resid_post", "logits")
_IDENTITY_BASE: dict = {}


def _identity_inputs():
    cfg = IDENTITY_CASE.config
    return random_params(cfg, 1234), random_tokens(cfg, 1234, (BATCH, IDENTITY_CASE.seq))


def _identity_base(keep):
    """The unedited op-by-op forward of the identity inputs (one per keep, shared by the per-site tests)."""
    if keep not in _IDENTITY_BASE:
        with jax.disable_jit():
            _IDENTITY_BASE[keep] = tinygpt.forward(*_identity_inputs(), IDENTITY_CASE.config, keep=keep)
    return _IDENTITY_BASE[keep]


# An edit at attn_scores or attn_pattern makes a forward that keeps neither take the reference attention
# (scores, softmax, values written out) where the unedited one takes the fused CPU kernel (`causal_attention`).
# The two sum in different orders: with jax 0.10 on the 2-core CPUs, attn_out differs by up to 1.4e-6 (it was
# bitwise with the jax of 275866a). `check_identity_edit` compares those within its tolerance
# (tinygpt.testing.invariants.KERNEL_SWITCHING); every other identity edit must be bitwise.


@pytest.mark.parametrize("keep", [None, RESTRICTED_KEEP], ids=["keep_all", "keep_restricted"])
@pytest.mark.parametrize("site", SITE_NAMES)
def test_identity_edit_changes_nothing(site, keep):
    """Op by op, one site at a time: the identity edit bitwise (within 1e-6 where it switches the attention
    kernel), and an edit returning a fresh but equal array within 1e-6."""
    weights, tokens = _identity_inputs()
    check_identity_edit(weights, IDENTITY_CASE.config, tokens, sites=(site,), keep=keep, jit=False, fresh=True,
                        baseline=_identity_base(keep), tolerance=1e-6)


@pytest.mark.parametrize("keep", [None, RESTRICTED_KEEP], ids=["keep_all", "keep_restricted"])
@core_invariant
@given(case_inputs=inputs())
def test_identity_edits_at_every_site_under_jit_are_bitwise(keep, case_inputs):
    """Identity edits at every site at once (the per-site edits are tested op by op above): every kept value
    bitwise equal to the unedited forward's, for any weights, tokens and padding. With restricted `keep` the
    edits make the forward take its reference attention where the unedited one takes the fused path: equal to
    float32 rounding there (KERNEL_SWITCHING). (Both forwards always get a mask, all ones for no padding: one
    compile per case.)"""
    case, weights, tokens, mask = case_inputs
    mask = np.ones((BATCH, case.seq), np.int32) if mask is None else mask
    check_identity_edit(weights, case.config, tokens, mask, keep=keep)
