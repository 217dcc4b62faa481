"""Property-based invariants of the forward pass, over random weights and tokens of a few tiny configs.

JAX compiles once per (config, keep, input shapes), so the config space is three fixed cases, each with its
own sequence length; hypothesis draws weights (through a seed), tokens, positions, permutations, padding
masks and pad ids. Jitted forwards are cached at module level by (config, keep, edits) (`make_forward` caches
per input shape), so the core invariants (`@core_invariant`: 200 examples each under the ci profile, see
tests/conftest.py) cost a few compiles and then milliseconds per example.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
from tinygpt.params import cast, check_params
from tinygpt.sites import SITE_NAMES, SITES
from conftest import core_invariant
from random_weights import random_params as _random_params  # noqa: E402

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
seeds = st.integers(0, 2**32 - 1)


@st.composite
def case_and_mask(draw, cases=cases):
    """(case, mask): a left-padding mask [BATCH, case.seq] (each row 0 .. seq-1 pad positions; shrinks to
    no padding) or None, half the time each."""
    case = draw(cases)
    if not draw(st.booleans(), label="masked"):
        return case, None
    pads = draw(st.lists(st.integers(0, case.seq - 1), min_size=BATCH, max_size=BATCH), label="pads")
    return case, (np.arange(case.seq)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)


HEAD_SITES = ("q", "k", "v", "z", "head_out", "attn_scores", "attn_pattern")
ATTN_SITES = ("attn_scores", "attn_pattern")

# ----------------------------------------------------------------------------------------------- helpers

_FORWARDS: dict = {}


def identity(value, layer):
    return value


def fwd(config, keep=None, edited=()):
    """The jitted forward for (config, keep) with an identity edit at each site in `edited`, compiled once
    per input shape for the whole module."""
    key = (config, keep, edited)
    if key not in _FORWARDS:
        _FORWARDS[key] = tinygpt.make_forward(config, keep=keep, edits={name: identity for name in edited} or None)
    return _FORWARDS[key]


def random_params(config, seed):
    """Random weights scaled so every parameter matters (see tests/random_weights.py)."""
    params = _random_params(config, seed)
    check_params(params, config)
    return params



def random_tokens(config, seed, shape):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


def seq_axis(name):
    """Axis of the query position in a trace value (counting the leading layer axis of per-layer sites)."""
    site = SITES[name]
    return site.shape.index("seq") + (1 if site.per_layer else 0)


def batch_axis(name):
    return 1 if SITES[name].per_layer else 0


def np64(x):
    return np.asarray(x, np.float64)


def assert_close(actual, expected, rtol=1e-5, atol_frac=1e-5, what=""):
    """allclose with an absolute tolerance relative to the scale (max |finite value|) of `expected`;
    infinities must match exactly."""
    actual, expected = np64(actual), np64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    scale = float(np.max(np.abs(expected[finite]))) if finite.any() else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_frac * max(scale, 1e-6), err_msg=what)


def assert_bitwise(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.view(np.uint8).tobytes() != expected.view(np.uint8).tobytes():
        diff = np.max(np.abs(np64(actual) - np64(expected))[np.isfinite(np64(expected))], initial=0.0)
        raise AssertionError(f"{what}: not bitwise identical (max |diff| {diff:.3g})")


# --------------------------------------------------------------------------------------------- causality


@core_invariant
@given(case=cases, seed=seeds, data=st.data())
def test_causality_future_tokens_do_not_change_the_past(case, seed, data):
    cfg, S = case.config, case.seq
    t = data.draw(st.integers(1, S - 1), label="t")
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed ^ 0x5EED)
    tokens = random_tokens(cfg, seed, (BATCH, S))
    changed = tokens.copy()
    changed[:, t:] = (tokens[:, t:] + rng.integers(1, cfg.vocab_size, (BATCH, S - t))) % cfg.vocab_size
    assert (changed[:, t:] != tokens[:, t:]).all()

    a, b = fwd(cfg)(params, tokens), fwd(cfg)(params, changed)
    for name in SITE_NAMES:
        past = np.arange(t)
        # attention rows < t: their keys are <= the query, so < t as well; compare the whole row
        assert_close(np.take(np.asarray(b[name]), past, axis=seq_axis(name)),
                     np.take(np.asarray(a[name]), past, axis=seq_axis(name)),
                     rtol=1e-6, atol_frac=1e-6, what=f"{name} at positions < {t}")
    # the changed tokens do reach the outputs (the comparison above is not vacuous)
    assert not np.allclose(np.asarray(a.logits)[:, t:], np.asarray(b.logits)[:, t:])


# ------------------------------------------------------------------------------- residual decomposition


@core_invariant
@given(case_mask=case_and_mask(), seed=seeds)
def test_residual_stream_decomposes_into_component_writes(case_mask, seed):
    case, mask = case_mask
    cfg = case.config
    tr = fwd(cfg)(random_params(cfg, seed), random_tokens(cfg, seed, (BATCH, case.seq)), mask)
    total = np64(tr.embed) + np64(tr.pos_embed)
    assert_close(tr.resid_pre[0], total, what="resid_pre[0] = embed + pos_embed")
    for layer in range(cfg.n_layer):
        total = total + np64(tr.attn_out[layer]) + np64(tr.mlp_out[layer])
        assert_close(tr.resid_mid[layer], np64(tr.resid_pre[layer]) + np64(tr.attn_out[layer]),
                     what=f"resid_mid[{layer}] = resid_pre + attn_out")
        assert_close(tr.resid_post[layer], np64(tr.resid_mid[layer]) + np64(tr.mlp_out[layer]),
                     what=f"resid_post[{layer}] = resid_mid + mlp_out")
        if layer + 1 < cfg.n_layer:
            assert_bitwise(tr.resid_pre[layer + 1], tr.resid_post[layer], what=f"resid_pre[{layer + 1}]")
    assert_close(tr.resid_post[-1], total, what="resid_post[-1] = embed + pos_embed + sum(attn_out + mlp_out)")


@core_invariant
@given(case_mask=case_and_mask(), seed=seeds)
def test_attn_out_is_the_sum_of_head_writes(case_mask, seed):
    case, mask = case_mask
    cfg = case.config
    params = random_params(cfg, seed)
    tr = fwd(cfg)(params, random_tokens(cfg, seed, (BATCH, case.seq)), mask)
    blocks = params["blocks"]
    for layer in range(cfg.n_layer):
        head_out = np.einsum("bshd,hdm->bshm", np64(tr.z[layer]), np64(blocks["W_O"][layer]))
        assert_close(tr.head_out[layer], head_out, what=f"head_out[{layer}] = z @ W_O per head")
        assert_close(tr.attn_out[layer], np64(tr.head_out[layer]).sum(axis=-2) + np64(blocks["b_O"][layer]),
                     what=f"attn_out[{layer}] = sum of head_out + b_O")


# ------------------------------------------------------------------------------------ attention patterns


def check_patterns(pattern, scores, mask=None):
    """pattern/scores [layer, batch, head, seq, key]: rows sum to 1, exactly zero above the diagonal (scores
    -inf there) and, where a mask is given, exactly zero on padding keys of real queries."""
    pattern, scores = np.asarray(pattern), np.asarray(scores)
    seq = pattern.shape[-1]
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=0, atol=1e-5, err_msg="pattern rows sum to 1")
    above = np.triu(np.ones((seq, seq), bool), k=1)
    assert (pattern[..., above] == 0).all(), "attention pattern is non-zero above the diagonal"
    assert (scores[..., above] == -np.inf).all(), "attention scores above the diagonal are not -inf"
    assert (pattern >= 0).all()
    if mask is not None:
        real = mask.astype(bool)
        real_query_pad_key = real[:, None, :, None] & ~real[:, None, None, :]  # [batch, 1, seq, key]
        sel = np.broadcast_to(real_query_pad_key[None], pattern.shape)
        assert (pattern[sel] == 0).all(), "a real query attends a padding key"
        assert (scores[sel] == -np.inf).all(), "a padding key's score is not -inf for a real query"


@core_invariant
@given(case_mask=case_and_mask(), seed=seeds)
def test_attention_pattern_is_causal_and_normalized(case_mask, seed):
    case, mask = case_mask
    cfg = case.config
    tr = fwd(cfg)(random_params(cfg, seed), random_tokens(cfg, seed, (BATCH, case.seq)), mask)
    check_patterns(tr.attn_pattern, tr.attn_scores, mask)
    if mask is None:  # sanity: the random weights give non-uniform attention (the properties are not trivially met)
        assert np.asarray(tr.attn_pattern)[..., -1, :].max() > 1.5 / case.seq


# ------------------------------------------------------------------------------------ padding invariance


def real_part(value, name, row, n_pad):
    """The values of batch row `row` at its real (non-padding) positions; attention sites restricted to real
    queries and real keys."""
    value = np.take(np.asarray(value), row, axis=batch_axis(name))  # drops the batch axis
    ax = seq_axis(name) - 1
    value = np.take(value, np.arange(n_pad, value.shape[ax]), axis=ax)
    if name in ATTN_SITES:
        value = value[..., n_pad:]
    return value


@core_invariant
@given(case=cases, seed=seeds, data=st.data())
def test_left_padding_matches_unpadded_single_runs(case, seed, data):
    cfg, S, n = case.config, case.seq, case.short
    pad_id = data.draw(st.integers(0, cfg.vocab_size - 1), label="pad_id")
    short_row = data.draw(st.integers(0, BATCH - 1), label="short_row")
    params = random_params(cfg, seed)
    long_prompt = random_tokens(cfg, seed, (S,))
    short_prompt = random_tokens(cfg, seed + 1, (n,))

    tokens = np.tile(long_prompt, (BATCH, 1))
    mask = np.ones((BATCH, S), np.int32)
    tokens[short_row] = np.concatenate([np.full(S - n, pad_id), short_prompt])
    mask[short_row, : S - n] = 0
    padded = fwd(cfg)(params, tokens, mask)

    # Unpadded references: the short prompt alone, [1, n]; the long prompt without any mask (batched with a
    # copy of itself so the compiled [BATCH, S] forward is reused: batch rows are independent).
    short_run = fwd(cfg)(params, short_prompt[None])
    long_run = fwd(cfg)(params, np.tile(long_prompt, (BATCH, 1)))

    for name in SITE_NAMES:
        for row in range(BATCH):
            ref, n_pad = (short_run, S - n) if row == short_row else (long_run, 0)
            assert_close(real_part(padded[name], name, row, n_pad), real_part(ref[name], name, 0, 0),
                         what=f"{name}, batch row {row} ({S - n_pad} real tokens after {n_pad} pads)")
        if name != "attn_scores":  # every value, at padding positions too, is finite
            assert np.isfinite(np.asarray(padded[name])).all(), f"{name} has non-finite values"
    check_patterns(padded.attn_pattern, padded.attn_scores, mask)


# ------------------------------------------------------------------------------------- head permutation


@given(case=cases, seed=seeds, data=st.data())
def test_consistent_head_permutation_only_permutes_heads(case, seed, data):
    cfg = case.config
    layer = data.draw(st.integers(0, cfg.n_layer - 1), label="layer")
    perm = np.array(data.draw(st.permutations(range(cfg.n_head)), label="perm"))
    params = random_params(cfg, seed)
    tokens = random_tokens(cfg, seed, (BATCH, case.seq))

    blocks = dict(params["blocks"])
    for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O"):  # head axis right after the layer axis
        blocks[name] = blocks[name].at[layer].set(blocks[name][layer][perm])
    permuted = dict(params, blocks=blocks)

    a, b = fwd(cfg)(params, tokens), fwd(cfg)(permuted, tokens)
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
@given(case_mask=case_and_mask(st.just(EAGER_CASE)), seed=seeds)
def test_jit_equals_no_jit(case_mask, seed):
    _, mask = case_mask
    cfg = EAGER_CASE.config
    params = random_params(cfg, seed)
    tokens = random_tokens(cfg, seed, (BATCH, EAGER_CASE.seq))
    jitted = fwd(cfg)(params, tokens, mask)
    with jax.disable_jit():
        eager = tinygpt.forward(params, tokens, cfg, attention_mask=mask)
    assert jitted.kept() == eager.kept() == SITE_NAMES
    for name in SITE_NAMES:
        assert_close(jitted[name], eager[name], what=name)


# ------------------------------------------------------------------------------------------ bf16 vs fp32


@given(case=cases, seed=seeds)
def test_bfloat16_logits_close_to_float32(case, seed):
    cfg = case.config
    params = random_params(cfg, seed)
    tokens = random_tokens(cfg, seed, (BATCH, case.seq))
    full = fwd(cfg)(params, tokens)
    half_params = cast(params, "bfloat16")
    half = fwd(cfg, ("logits",))(half_params, tokens)
    assert half.logits.dtype == jnp.float32  # logits are computed in float32
    shapes = jax.eval_shape(lambda p, t: tinygpt.forward(p, t, cfg, keep=("resid_post",)), half_params, tokens)
    assert shapes.resid_post.dtype == jnp.bfloat16  # the residual stream really is bf16 (traced, not compiled)
    # Tolerance: bf16 keeps 8 significant bits (relative rounding error up to 2^-9 ~ 0.2% per rounding). The
    # residual stream is stored in bf16 and every matmul input and output is rounded: ~5 roundings per block
    # on O(1) LayerNorm-ed activations, amplified by the sharp attention of these weights (scores of std ~4:
    # a 0.2% error on a score of 10 moves the pattern by ~2%). Over 1-3 blocks this measures at ~1% RMS and
    # up to ~2.3% max of the logit scale (30 seeds per case), so the bounds are 5% of the logit scale for the
    # worst element and 3% for the RMS error: about twice what bf16 does, far below a real bug (O(100%)).
    l32, l16 = np64(full.logits), np64(half.logits)
    scale = np.abs(l32).max()
    err = np.abs(l16 - l32)
    assert err.max() <= 0.05 * scale, f"max |bf16 - f32| = {err.max():.3g}, logit scale {scale:.3g}"
    rms = np.sqrt((err**2).mean()) / np.sqrt((l32**2).mean())
    assert rms <= 0.03, f"relative RMS error {rms:.3g}"


# -------------------------------------------------------------------------------------------------- keep


KEEP_CASE = CASES[1]


@given(seed=seeds)
def test_keep_one_layer_site(seed):
    cfg = KEEP_CASE.config
    params, tokens = random_params(cfg, seed), random_tokens(cfg, seed, (BATCH, KEEP_CASE.seq))
    tr = fwd(cfg, ("resid_post",))(params, tokens)
    assert tr.kept() == ("resid_post",)
    assert all(getattr(tr, n) is None for n in SITE_NAMES if n != "resid_post")
    assert tr.resid_post.shape == (cfg.n_layer, BATCH, KEEP_CASE.seq, cfg.d_model)
    assert_close(tr.resid_post, fwd(cfg)(params, tokens).resid_post, rtol=1e-6, atol_frac=1e-6)


@given(seed=seeds)
def test_keep_global_site_only(seed):
    cfg = KEEP_CASE.config
    params, tokens = random_params(cfg, seed), random_tokens(cfg, seed, (BATCH, KEEP_CASE.seq))
    tr = fwd(cfg, ("logits",))(params, tokens)
    assert tr.kept() == ("logits",)
    assert all(getattr(tr, n) is None for n in SITE_NAMES if n != "logits")
    assert_close(tr.logits, fwd(cfg)(params, tokens).logits, rtol=1e-6, atol_frac=1e-6)


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
    params = random_params(config, 0)
    tokens = random_tokens(config, 0, (BATCH, seq))
    jaxpr = jax.make_jaxpr(lambda p, t: tinygpt.forward(p, t, config, keep=keep))(params, tokens).jaxpr
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


def _eager(edits, keep):
    params, tokens = _identity_inputs()
    with jax.disable_jit():  # op by op: cheap per call once the shapes are warm, and no compile per edit
        return tinygpt.forward(params, tokens, IDENTITY_CASE.config, edits=edits, keep=keep)


def _identity_base(keep):
    if keep not in _IDENTITY_BASE:
        _IDENTITY_BASE[keep] = _eager(None, keep)
    return _IDENTITY_BASE[keep]


# An edit at these sites makes a forward that keeps neither take the reference attention (scores, softmax,
# values written out) where the unedited one takes the fused CPU kernel (`causal_attention`). The two sum in
# different orders: with jax 0.10 on the 2-core CPUs, attn_out differs by up to 1.4e-6 (it was bitwise with
# the jax of 275866a). Every other identity edit is bitwise, and these are too when the sites are kept.
KERNEL_SWITCHING = frozenset({"attn_scores", "attn_pattern"})


def assert_identity(actual, expected, what, *, switches_kernel):
    """Bitwise, or float32 rounding where the edit switched the attention kernel (see KERNEL_SWITCHING)."""
    if switches_kernel:
        assert_close(actual, expected, rtol=1e-5, atol_frac=1e-5, what=what)
    else:
        assert_bitwise(actual, expected, what=what)


@pytest.mark.parametrize("keep", [None, RESTRICTED_KEEP], ids=["keep_all", "keep_restricted"])
@pytest.mark.parametrize("site", SITE_NAMES)
def test_identity_edit_changes_nothing(site, keep):
    base = _identity_base(keep)
    same = _eager({site: lambda v, layer: v}, keep)
    assert same.kept() == base.kept()
    switches = keep is not None and site in KERNEL_SWITCHING
    for name in base.kept():
        assert_identity(same[name], base[name], f"{name} with an identity edit at {site!r}", switches_kernel=switches)
    fresh = (lambda v, layer: v * 1) if keep is None else (lambda v, layer: v + 0)  # a new array, equal
    equal = _eager({site: fresh}, keep)
    for name in base.kept():
        assert_close(equal[name], base[name], rtol=1e-6, atol_frac=1e-6,
                     what=f"{name} with a fresh-but-equal edit at {site!r}")


@pytest.mark.parametrize("keep", [None, RESTRICTED_KEEP], ids=["keep_all", "keep_restricted"])
@core_invariant
@given(case_mask=case_and_mask(), seed=seeds)
def test_identity_edits_at_every_site_under_jit_are_bitwise(keep, case_mask, seed):
    """Identity edits at every site at once (the per-site edits are tested op by op above): every kept value
    bitwise equal to the unedited forward's, for any weights, tokens and padding. With restricted `keep` the edits
    make the forward take its reference attention and per-head outputs where the unedited one takes the fused
    paths: equal to float32 rounding there (KERNEL_SWITCHING). (Both forwards always get a mask, all ones for no padding: one compile per case.)"""
    case, mask = case_mask
    cfg = case.config
    params, tokens = random_params(cfg, seed), random_tokens(cfg, seed, (BATCH, case.seq))
    mask = np.ones((BATCH, case.seq), np.int32) if mask is None else mask
    every = fwd(cfg, keep, SITE_NAMES)(params, tokens, mask)
    base = fwd(cfg, keep)(params, tokens, mask)
    assert every.kept() == base.kept() == (SITE_NAMES if keep is None else keep)
    for name in base.kept():
        assert_identity(every[name], base[name], f"{name}, identity edits at every site, keep={keep}",
                        switches_kernel=keep is not None)
