"""Edits: functions `(value, layer) -> value` applied at named sites, under jit, vmap and grad, and their errors.

One small config (3 layers so that "earlier" and "later" both exist around a middle layer) and one input
shape. Jitted functions take the edit's parameters (layer, head, scale, patched values) as traced arguments,
so each compiles once; the remaining tests run op by op (`jax.disable_jit`), which compiles each primitive
once per shape and is then cheap per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt.sites import GLOBAL_SITES, LAYER_SITES, SITE_NAMES
from tinygpt.recorder import SiteRecorder
from tinygpt.testing import assert_close
from tinygpt.testing import random_params as _random_params
from tinygpt.testing import random_tokens as _random_tokens

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=10, vocab_size=53)
BATCH, SEQ = 2, 7
H = CFG.n_head

seeds = st.integers(0, 2**32 - 1)
# op-by-op runs cost ~0.1 s each: fewer examples, and no shrinking (the drawn seeds carry no structure to shrink)
eager_settings = settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# ----------------------------------------------------------------------------------------------- helpers


def random_params(seed):
    """Random weights with O(1) activations, non-uniform attention and non-zero biases."""
    return _random_params(CFG, seed)



def random_tokens(seed):
    return _random_tokens(CFG, seed, (BATCH, SEQ))


def np64(x):
    return np.asarray(x, np.float64)


def scale_of(x):
    x = np64(x)
    finite = np.isfinite(x)
    return float(np.abs(x[finite]).max()) if finite.any() else 0.0


def assert_differs(actual, expected, what=""):
    """Clearly different: some element moves by more than 1e-3 of the scale."""
    diff = np.abs(np64(actual) - np64(expected))
    diff = diff[np.isfinite(diff)]
    assert diff.size and diff.max() > 1e-3 * max(scale_of(expected), 1e-6), f"{what} did not change"


base_forward = tinygpt.make_forward(CFG)


def eager(params, tokens, **kwargs):
    with jax.disable_jit():
        return tinygpt.forward(params, tokens, CFG, **kwargs)


# ------------------------------------------------------------------------------- zeroing one head's z


@jax.jit
def zero_head(params, tokens, L, h):
    """The forward with head h's z zeroed at layer L only (L and h traced: one compile for all)."""

    def edit(z, layer):  # z [batch, seq, head, d_head]
        return jnp.where((layer == L) & (jnp.arange(H) == h)[:, None], 0.0, z)

    return tinygpt.forward(params, tokens, CFG, edits={"z": edit})


@given(seed=seeds, L=st.integers(0, CFG.n_layer - 1), h=st.integers(0, H - 1))
def test_zeroing_a_head_changes_only_later_values(seed, L, h):
    params, tokens = random_params(seed), random_tokens(seed)
    base = base_forward(params, tokens)
    ablated = zero_head(params, tokens, L, h)
    other = np.arange(H) != h

    for name in ("embed", "pos_embed"):
        assert_close(ablated[name], base[name], what=name)
    for name in LAYER_SITES:
        for layer in range(L):
            assert_close(ablated[name][layer], base[name][layer], what=f"{name}[{layer}] before layer {L}")
    for name in ("resid_pre", "ln1_scale", "ln1", "q", "k", "v", "attn_scores", "attn_pattern"):
        assert_close(ablated[name][L], base[name][L], what=f"{name}[{L}] upstream of z")
    for name in ("z", "head_out"):
        assert (np.asarray(ablated[name][L])[:, :, h] == 0).all(), f"{name}[{L}] of head {h} is not zero"
        assert_close(ablated[name][L][:, :, other], base[name][L][:, :, other], what=f"{name}[{L}], other heads")
    for name in ("attn_out", "resid_mid", "resid_post"):
        assert_differs(ablated[name][L], base[name][L], what=f"{name}[{L}]")
    for layer in range(L + 1, CFG.n_layer):
        assert_differs(ablated.resid_pre[layer], base.resid_pre[layer], what=f"resid_pre[{layer}]")
    assert_differs(ablated.logits, base.logits, what="logits")


# ----------------------------------------------------------------- resid_pre at layer 0 vs the embeddings


@eager_settings
@given(seed=seeds)
def test_resid_pre_edit_at_layer_0_equals_editing_the_embeddings(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    rng = np.random.default_rng(seed)
    d_embed = jnp.asarray(rng.standard_normal((BATCH, SEQ, CFG.d_model)), jnp.float32)
    d_pos = jnp.asarray(rng.standard_normal((BATCH, SEQ, CFG.d_model)), jnp.float32)

    via_embeddings = eager(params, tokens, edits={"embed": lambda v, layer: v + d_embed,
                                                   "pos_embed": lambda v, layer: v + d_pos})
    via_resid = eager(params, tokens, edits={
        "resid_pre": lambda v, layer: jnp.where(layer == 0, v + (d_embed + d_pos), v)})
    for name in (*LAYER_SITES, "ln_final_scale", "ln_final", "logits"):
        assert_close(via_resid[name], via_embeddings[name], what=name)
    assert_differs(via_resid.logits, base_forward(params, tokens).logits, what="logits")


# ------------------------------------------------------------------------------- activation patching


@jax.jit
def patch_resid_pre(params, tokens, stored, L):
    """Replace resid_pre at layer L with `stored[L]` (the resid_pre of another run)."""
    return tinygpt.forward(params, tokens, CFG,
                           edits={"resid_pre": lambda v, layer: jnp.where(layer == L, stored[layer], v)})


@given(seed=seeds)
def test_activation_patching_reproduces_the_source_run(seed):
    params = random_params(seed)
    clean, corrupt = random_tokens(seed), random_tokens(seed + 1)
    source, target = base_forward(params, clean), base_forward(params, corrupt)
    assert_differs(source.logits, target.logits, what="logits of the two runs")

    for L in range(CFG.n_layer):  # L = 0: the whole residual stream entering the model
        patched = patch_resid_pre(params, corrupt, source.resid_pre, L)
        for name in ("embed", "pos_embed"):  # upstream of the patch: the corrupt run's own values
            assert_close(patched[name], target[name], what=name)
        for name in LAYER_SITES:
            for layer in range(CFG.n_layer):
                want = source if layer >= L else target
                assert_close(patched[name][layer], want[name][layer],
                             what=f"{name}[{layer}] after patching resid_pre[{L}]")
        for name in ("ln_final_scale", "ln_final", "logits"):
            assert_close(patched[name], source[name], what=f"{name} after patching resid_pre[{L}]")


# ------------------------------------------------------------------------------------ edit composition


@eager_settings
@given(seed=seeds, factor=st.floats(1.5, 3.0))
def test_a_sequence_of_edits_applies_in_order(seed, factor):
    params, tokens = random_params(seed), random_tokens(seed)
    # a shift that varies over d_model (LayerNorm would erase a uniform one)
    shift = jnp.asarray(np.random.default_rng(seed).standard_normal(CFG.d_model), jnp.float32)

    def add(v, layer):
        return jnp.where(layer == 0, v + shift, v)

    def mul(v, layer):
        return jnp.where(layer == 0, v * factor, v)

    in_order = eager(params, tokens, edits={"mlp_out": [add, mul]})
    composed = eager(params, tokens, edits={"mlp_out": lambda v, layer: mul(add(v, layer), layer)})
    reverse = eager(params, tokens, edits={"mlp_out": (mul, add)})
    base = base_forward(params, tokens)

    for name in SITE_NAMES:
        assert_close(in_order[name], composed[name], what=name)
    # the kept value is the edited one: (x + shift) * factor, not (x * factor) + shift
    shift64 = np64(shift)
    assert_close(in_order.mlp_out[0], (np64(base.mlp_out[0]) + shift64) * factor, what="mlp_out[0]")
    assert_close(reverse.mlp_out[0], np64(base.mlp_out[0]) * factor + shift64, what="mlp_out[0], reversed")
    assert_differs(reverse.logits, in_order.logits, what="logits with the edits in the other order")


# ------------------------------------------------------------------------------------ vmap over an edit


def _scaled_logits(params, tokens, s):
    return tinygpt.forward(params, tokens, CFG, edits={"mlp_out": lambda v, layer: v * s},
                           keep=("logits",)).logits


scaled_logits = jax.jit(_scaled_logits)
scaled_logits_vmapped = jax.jit(jax.vmap(_scaled_logits, in_axes=(None, None, 0)))


def _ablated_logits(params, tokens, L, h):
    def edit(z, layer):
        return jnp.where((layer == L) & (jnp.arange(H) == h)[:, None], 0.0, z)

    return tinygpt.forward(params, tokens, CFG, edits={"z": edit}, keep=("logits",)).logits


ablated_logits_vmapped = jax.jit(jax.vmap(_ablated_logits, in_axes=(None, None, None, 0)))


@given(seed=seeds, scales=st.lists(st.floats(-2.0, 2.0), min_size=4, max_size=4))
def test_vmap_over_an_edit_scale_equals_a_loop(seed, scales):
    params, tokens = random_params(seed), random_tokens(seed)
    batched = scaled_logits_vmapped(params, tokens, jnp.asarray(scales, jnp.float32))
    assert batched.shape == (len(scales), BATCH, SEQ, CFG.vocab_size)
    for i, s in enumerate(scales):
        assert_close(batched[i], scaled_logits(params, tokens, jnp.float32(s)), what=f"scale {s}")


@given(seed=seeds, L=st.integers(0, CFG.n_layer - 1))
def test_vmap_over_the_ablated_head_equals_a_loop(seed, L):
    params, tokens = random_params(seed), random_tokens(seed)
    batched = ablated_logits_vmapped(params, tokens, L, jnp.arange(H))
    for h in range(H):
        single = zero_head(params, tokens, L, h).logits
        assert_close(batched[h], single, what=f"head {h} of layer {L}")
    assert_differs(batched[0], batched[-1], what="ablating different heads")


# ------------------------------------------------------------------------------------ grad through edits


def _logit_of_scale(s, params, tokens):
    return _scaled_logits(params, tokens, s)[0, -1, 0]


logit_and_grad = jax.jit(jax.value_and_grad(_logit_of_scale))


@given(seed=seeds, s=st.floats(0.5, 1.5))
def test_grad_through_an_edit_parameter(seed, s):
    params, tokens = random_params(seed), random_tokens(seed)
    value, grad = logit_and_grad(jnp.float32(s), params, tokens)
    logits = np64(scaled_logits(params, tokens, jnp.float32(s)))
    assert abs(float(value) - logits[0, -1, 0]) <= 1e-5 * np.abs(logits).max(), "value"
    eps = 1e-2  # central difference: O(eps^2) truncation, O(1e-4) float32 rounding on O(1-10) logits
    hi = float(scaled_logits(params, tokens, jnp.float32(s + eps))[0, -1, 0])
    lo = float(scaled_logits(params, tokens, jnp.float32(s - eps))[0, -1, 0])
    numeric = (hi - lo) / (2 * eps)
    assert np.isfinite(float(grad))
    assert abs(float(grad) - numeric) <= 2e-2 * max(1.0, abs(numeric)), (float(grad), numeric)


def test_grad_is_not_trivially_zero():
    params, tokens = random_params(0), random_tokens(0)
    _, grad = logit_and_grad(jnp.float32(1.0), params, tokens)
    assert abs(float(grad)) > 1e-3


# ---------------------------------------------------------------------------------- the layer argument


def _recording_edits(seen):
    def recorder(name):
        def edit(v, layer):
            seen.setdefault(name, []).append(layer)
            return v

        return edit

    return {name: recorder(name) for name in SITE_NAMES}


def test_global_sites_get_layer_none_and_layer_sites_the_block_index():
    params, tokens = random_params(0), random_tokens(0)
    seen: dict = {}
    eager(params, tokens, edits=_recording_edits(seen))
    assert sorted(seen) == sorted(SITE_NAMES)
    for name in GLOBAL_SITES:
        assert seen[name] == [None], f"{name} got layer {seen[name]}"
    for name in LAYER_SITES:
        assert [int(layer) for layer in seen[name]] == list(range(CFG.n_layer)), name

    # under jit: global sites still get None, per-layer sites a traced block index
    seen = {}
    jax.make_jaxpr(lambda p, t: tinygpt.forward(p, t, CFG, edits=_recording_edits(seen)))(params, tokens)
    for name in GLOBAL_SITES:
        assert seen[name] == [None], f"{name} got layer {seen[name]} under jit"
    for name in LAYER_SITES:
        assert all(isinstance(layer, jax.core.Tracer) for layer in seen[name]), name


def test_layer_argument_is_the_block_index_in_values():
    params, tokens = random_params(0), random_tokens(0)
    tr = eager(params, tokens, edits={"mlp_out": lambda v, layer: jnp.zeros_like(v) + layer},
               keep=("mlp_out",))
    for layer in range(CFG.n_layer):
        assert (np.asarray(tr.mlp_out[layer]) == layer).all()


@eager_settings
@given(seed=seeds, pad=st.integers(1, 3), target=st.integers(0, SEQ - 4), layer=st.integers(0, CFG.n_layer - 1))
def test_an_edit_with_positions_hits_the_same_token_in_a_left_padded_row(seed, pad, target, layer):
    """An edit taking `positions` is given each token's position among its row's real tokens: on a row
    left-padded by `pad` it edits the same token as on the unpadded row, so every real position's values
    agree; an edit indexing the seq axis would hit the token `pad` places earlier."""
    params, tokens = random_params(seed), random_tokens(seed)
    direction = jax.random.normal(jax.random.PRNGKey(seed % 1000), (CFG.d_model,))

    seen = []

    def steer(x, at, positions):  # x [batch, seq, d_model], positions [batch, seq]
        seen.append(positions)
        return jnp.where((at == layer) & (positions == target)[..., None], x + 4.0 * direction, x)

    edits = {"resid_pre": steer}
    real = SEQ - pad
    padded = np.concatenate([np.zeros((BATCH, pad), np.int32), tokens[:, :real]], axis=1)
    mask = np.concatenate([np.zeros((BATCH, pad), np.int32), np.ones((BATCH, real), np.int32)], axis=1)
    got = eager(params, padded, edits=edits, attention_mask=mask, keep=("resid_post", "logits"))
    want = eager(params, tokens[:, :real], edits=edits, keep=("resid_post", "logits"))
    np.testing.assert_array_equal(seen[0][:, pad:], np.broadcast_to(np.arange(real), (BATCH, real)))
    np.testing.assert_allclose(got.logits[:, pad:], want.logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.resid_post[:, :, pad:], want.resid_post, atol=1e-4, rtol=0)
    unedited = eager(params, tokens[:, :real], keep=("logits",))
    assert not np.allclose(want.logits[:, target:], unedited.logits[:, target:], atol=1e-3)  # the edit acts
    np.testing.assert_array_equal(want.logits[:, :target], unedited.logits[:, :target])  # only from `target` on


def test_an_edit_with_positions_where_none_are_given_names_the_site():
    recorder = SiteRecorder({"mlp_out": (lambda x, layer, positions: x,)}, frozenset(), 0)
    with pytest.raises(ValueError, match="'mlp_out' takes positions"):
        recorder("mlp_out", jnp.zeros((1, 2, 3)))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("site", ["mlp_post", "attn_pattern", "embed", "logits"])
def test_edit_returning_the_wrong_shape_names_the_site(site):
    params, tokens = random_params(0), random_tokens(0)
    edits = {site: lambda v, layer: v[..., :1]}
    with pytest.raises(ValueError, match=f"'{site}'"):
        eager(params, tokens, edits=edits)
    with pytest.raises(ValueError, match=f"'{site}'"):  # under jit the check happens while tracing
        jax.make_jaxpr(lambda p, t: tinygpt.forward(p, t, CFG, edits=edits))(params, tokens)


def test_edit_returning_a_scalar_is_a_shape_error():
    params, tokens = random_params(0), random_tokens(0)
    with pytest.raises(ValueError, match="'mlp_out'"):
        eager(params, tokens, edits={"mlp_out": lambda v, layer: 0.0})


@pytest.mark.parametrize(
    "bad, suggestion", [("resid_pst", "resid_post"), ("atn_pattern", "attn_pattern"), ("logit", "logits")]
)
def test_unknown_site_names_raise_site_error_with_a_suggestion(bad, suggestion):
    params, tokens = random_params(0), random_tokens(0)
    expected = rf"{bad!r}.*did you mean {suggestion!r}"
    with pytest.raises(tinygpt.SiteError, match=expected):
        tinygpt.forward(params, tokens, CFG, edits={bad: lambda v, layer: v})
    with pytest.raises(tinygpt.SiteError, match=expected):
        tinygpt.forward(params, tokens, CFG, keep=("resid_post", bad))
    with pytest.raises(tinygpt.SiteError, match=expected):
        tinygpt.make_forward(CFG, keep=(bad,))
    with pytest.raises(tinygpt.SiteError, match=expected):
        tinygpt.make_forward(CFG, edits={bad: lambda v, layer: v})
    assert issubclass(tinygpt.SiteError, ValueError)


def test_unknown_site_without_a_close_match_still_names_it():
    params, tokens = random_params(0), random_tokens(0)
    with pytest.raises(tinygpt.SiteError, match="'zzzz'") as info:
        tinygpt.forward(params, tokens, CFG, keep=("zzzz",))
    assert "did you mean" not in str(info.value)


def test_malformed_edits_raise_type_errors():
    params, tokens = random_params(0), random_tokens(0)
    with pytest.raises(TypeError, match="mapping"):
        tinygpt.forward(params, tokens, CFG, edits=[("mlp_out", lambda v, layer: v)])
    with pytest.raises(TypeError, match="'mlp_out'"):
        tinygpt.forward(params, tokens, CFG, edits={"mlp_out": [lambda v, layer: v, 3]})


def test_trace_getitem_of_an_unkept_site_raises_key_error_naming_it():
    params, tokens = random_params(0), random_tokens(0)
    tr = eager(params, tokens, keep=("logits", "resid_mid"))
    assert tr["logits"] is tr.logits and tr["resid_mid"] is tr.resid_mid
    with pytest.raises(KeyError, match="'resid_post'") as info:
        tr["resid_post"]
    assert "logits" in str(info.value)  # lists what was kept
    with pytest.raises(tinygpt.SiteError, match="did you mean 'resid_post'"):
        tr["resid_pst"]
