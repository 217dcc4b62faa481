"""Edit values (`tinygpt.edits`): each equals the same change written independently with `.at[]` indexing,
positions are absolute (padding and generation steps agree), new arrays reuse the compiled program, and
every bad selection is one error.

The reference edits below index the chosen entries with `np.ix_` (no masks, no `isin`), so they share no code
with `Edit.selected`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt import compiled
from tinygpt.edits import Add, Compose, Edit, Mean, Patch, Scale, Set, Zero
from tinygpt.errors import InputError, InputTypeError, SiteError
from tinygpt.generation import generate
from tinygpt.sites import SITES, TL_NAMES, tl_name
from tinygpt.testing import random_params

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=12, vocab_size=53)
BATCH, SEQ = 2, 7
PARAMS = random_params(CFG, 0)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, SEQ)).astype(np.int32)
SIZES = {"batch": BATCH, "seq": SEQ, "key": SEQ, "head": CFG.n_head, "d_head": CFG.d_head, "d_model": CFG.d_model,
         "d_mlp": CFG.d_mlp, "vocab": CFG.vocab_size, "1": 1}
EDITABLE = [s for s in SITES if s != "logits"]  # logits: edited like any other, but last-axis draws are vocab-sized


def logits(edits, tokens=TOKENS, mask=None):
    return np.asarray(tinygpt.forward(PARAMS, tokens, CFG, edits=edits, attention_mask=mask, keep=("logits",)).logits)


# ---------------------------------------------------------------------------------- independent reference


def reference(kind: str, site: str, layer, head, positions, index, array):
    """The edit as a function, choosing entries with np.ix_ (no padding: position p is seq index p)."""
    shape = SITES[site].shape

    def chosen(value):
        axes = [np.arange(n) for n in value.shape]
        if head is not None:
            axes[shape.index("head")] = np.asarray(head)
        if positions is not None:
            axes[shape.index("seq")] = np.asarray(positions)
        if index is not None:
            axes[-1] = np.asarray(index)
        return np.ix_(*axes)

    def fn(value, current):
        at = chosen(value)
        if kind == "zero":
            new = value.at[at].set(0.0)
        elif kind == "scale":
            new = value.at[at].multiply(array)
        elif kind == "add":
            new = value.at[at].add(jnp.broadcast_to(array, value.shape)[at])
        else:  # set
            new = value.at[at].set(jnp.broadcast_to(array, value.shape)[at])
        if layer is None or current is None:
            return new
        return jnp.where(current == layer, new, value)

    return fn


def value_edit(kind, site, layer, head, positions, index, array):
    selection = dict(layer=layer, head=head, positions=positions, index=index)
    return {"zero": lambda: Zero(site, **selection), "scale": lambda: Scale(site, array, **selection),
            "add": lambda: Add(site, array, 1.0, **selection), "set": lambda: Set(site, array, **selection)}[kind]()


def subset(draw, n):
    return draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(sorted))


@st.composite
def edits_drawn(draw):
    site = draw(st.sampled_from(EDITABLE))
    shape = SITES[site].shape
    layer = draw(st.none() | st.integers(0, CFG.n_layer - 1)) if SITES[site].per_layer else None
    head = subset(draw, CFG.n_head) if "head" in shape else None
    positions = subset(draw, SEQ)
    index = subset(draw, SIZES[shape[-1]]) if shape[-1] != "1" else draw(st.none() | st.just([0]))
    kind = draw(st.sampled_from(["zero", "scale", "add", "set"]))
    seed = draw(st.integers(0, 2**16))
    last = SIZES[shape[-1]]
    array = np.random.default_rng(seed).standard_normal(last).astype(np.float32)  # broadcasts on the last axis
    if kind == "scale":
        array = np.float32(1.5 + seed % 3)
    return kind, site, layer, head, positions, index, array


@settings(max_examples=12)  # each example compiles two forwards (~1.2 s); CI's budget is 20 min
@given(edits_drawn())
def test_each_edit_value_equals_the_same_edit_written_with_indexing(drawn):
    kind, site, *_ = drawn
    expected = logits({site: reference(*drawn)})
    actual = logits(value_edit(*drawn))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4, err_msg=str(drawn))


@settings(max_examples=5)
@given(edits_drawn(), st.integers(1, 3))
def test_positions_are_absolute_under_left_padding(drawn, pad):
    """An edit at absolute position p changes a left-padded row as it changes the unpadded row."""
    kind, site, layer, head, positions, index, array = drawn
    # the key axis of a padded row is shifted (and longer): key indices are not positions
    assume(not (site in ("attn_scores", "attn_pattern") and (index is not None or kind in ("set", "add"))))
    edit = value_edit(kind, site, layer, head, positions, index, array)
    tokens = TOKENS[:, : SEQ - pad]
    padded = np.concatenate([np.zeros((BATCH, pad), np.int32), tokens], axis=1)
    mask = np.concatenate([np.zeros((BATCH, pad), np.int32), np.ones_like(tokens)], axis=1)
    if positions is not None and max(positions) >= SEQ - pad:
        positions = [p for p in positions if p < SEQ - pad] or None
        edit = value_edit(kind, site, layer, head, positions, index, array)
    # an edit over every position also edits the padding's own values (harmless, but not equal)
    assume(not (site in ("embed", "pos_embed", "ln1_scale", "ln2_scale", "ln_final_scale") and positions is None))
    np.testing.assert_allclose(logits(edit, padded, mask)[:, pad:], logits(edit, tokens), rtol=1e-4, atol=2e-4)


def test_new_values_reuse_the_compiled_program():
    """Calls differing only in arrays run one compiled program; a new structure compiles another."""
    compiled.compiled_forward.cache_clear()
    direction = np.ones(CFG.d_model, np.float32)
    for coef in (1.0, 2.0, -3.0):
        logits([Zero("z", layer=1, head=2), Add("resid_pre", direction * coef, coef, layer=2)])
    program = compiled.compiled_forward(CFG, frozenset({"logits"}))
    assert program._cache_size() == 1
    logits([Zero("z", layer=1, head=1), Add("resid_pre", direction, 1.0, layer=2)])  # another head
    assert program._cache_size() == 2
    assert compiled.compiled_forward.cache_info().currsize == 1


def test_the_arrays_of_this_call_are_used():
    """No stale values: each call's coefficient shows in its output (a closure cache would reuse the first)."""
    direction = np.linspace(-1, 1, CFG.d_model).astype(np.float32)
    results = [logits(Add("resid_post", direction, c, layer=0)) for c in (0.0, 1.0, 2.0)]
    expected = [logits({"resid_post": reference("add", "resid_post", 0, None, None, None, c * direction)})
                for c in (0.0, 1.0, 2.0)]
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(results[1], results[2])


def test_patch_and_mean_from_a_trace():
    clean_tokens = np.roll(TOKENS, 1, axis=1)
    clean = tinygpt.forward(PARAMS, clean_tokens, CFG)
    # patching every layer's residual at every position from the clean run gives the clean run
    np.testing.assert_allclose(logits(Patch.from_trace(clean, "resid_pre")), np.asarray(clean.logits), atol=1e-4)
    # one layer, one head, one position: equal to the indexing reference with the clean value
    edit = Patch.from_trace(clean, "z", layer=1, head=2, positions=[3])
    want = logits({"z": reference("set", "z", 1, [2], [3], None, np.asarray(clean.z[1]))})
    np.testing.assert_allclose(logits(edit), want, rtol=1e-5, atol=1e-5)
    # the mean over the batch, padding left out
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[0, :2] = 0
    trace = tinygpt.forward(PARAMS, TOKENS, CFG, attention_mask=mask)
    mean = Mean.from_trace(trace, "mlp_post", over=("batch", "seq"), attention_mask=mask)
    assert mean.mean.shape == (CFG.n_layer, 1, 1, CFG.d_mlp)
    assert Mean.from_trace(trace, "mlp_post", over="seq").mean.shape == (CFG.n_layer, BATCH, 1, CFG.d_mlp)
    real = np.asarray(trace.mlp_post)[:, mask.astype(bool)]  # [layer, real tokens, d_mlp]
    np.testing.assert_allclose(np.asarray(mean.mean)[:, 0, 0], real.mean(axis=1), rtol=1e-5, atol=1e-6)
    want = logits({"mlp_post": lambda v, layer: jnp.broadcast_to(jnp.asarray(real.mean(1))[layer], v.shape)})
    np.testing.assert_allclose(logits(mean), want, rtol=1e-5, atol=1e-5)


def test_a_masked_mean_of_attention_scores_has_no_nan():
    """attn_scores hold -inf where masked: the padding is left out of the mean, not multiplied by 0 (NaN)."""
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[0, :2] = 0
    trace = tinygpt.forward(PARAMS, TOKENS, CFG, attention_mask=mask, keep=("attn_scores",))
    mean = np.asarray(Mean.from_trace(trace, "attn_scores", attention_mask=mask).mean)  # [layer, 1, head, seq, key]
    assert not np.isnan(mean).any()
    scores = np.asarray(trace.attn_scores)  # [layer, batch, head, seq, key]
    np.testing.assert_array_equal(mean[:, 0, :, :2], scores[:, 1, :, :2])  # row 0's padded queries left out
    np.testing.assert_allclose(mean[:, 0, :, 2:, 2:], scores[:, :, :, 2:, 2:].mean(1), rtol=1e-6)


def test_compose_and_lists_apply_in_order():
    d = np.ones(CFG.d_model, np.float32)
    one = logits(Compose(Add("resid_pre", d, 2.0, layer=1), Scale("resid_pre", 0.5, layer=1)))
    want = logits({"resid_pre": lambda v, layer: jnp.where(layer == 1, (v + 2.0 * d) * 0.5, v)})
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits([Add("resid_pre", d, 2.0, layer=1), Scale("resid_pre", 0.5, layer=1)]), want,
                               rtol=1e-5, atol=1e-5)
    swapped = logits([Scale("resid_pre", 0.5, layer=1), Add("resid_pre", d, 2.0, layer=1)])
    assert not np.allclose(swapped, want)


def test_transformer_lens_names_and_mappings():
    for site in ("z", "mlp_post", "resid_pre", "attn_pattern"):
        by_tl = Zero(tl_name(site, 2))
        assert (by_tl.site, by_tl.layer) == (site, 2)
        want = logits({site: reference("zero", site, 2, None, None, None, None)})  # independent of Zero
        np.testing.assert_allclose(logits(by_tl), want, rtol=1e-5, atol=1e-5, err_msg=site)
    assert Zero(TL_NAMES["embed"]).site == "embed"
    # a mapping may hold edit values under their own site, mixed with functions (the general path)
    mixed = {"z": [Zero("z", layer=0, head=0), lambda v, layer: v * 1.0]}
    np.testing.assert_allclose(logits(mixed), logits(Zero("z", layer=0, head=0)), atol=1e-5)


def test_jit_vmap_and_grad_through_edit_values():
    d = jnp.asarray(np.random.default_rng(2).standard_normal(CFG.d_model), jnp.float32)  # not ones: LayerNorm centres

    weights = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, SEQ, CFG.vocab_size)), jnp.float32)

    def loss(coef):
        out = tinygpt.forward(PARAMS, TOKENS, CFG, edits=Add("resid_mid", d, coef, layer=1), keep=("logits",))
        return (out.logits * weights).sum()

    coefs = jnp.arange(3.0)
    batched = jax.vmap(loss)(coefs)
    np.testing.assert_allclose(batched, [loss(c) for c in coefs], rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss)(2.0), loss(2.0), rtol=1e-5)
    grad = jax.grad(loss)(1.0)
    numeric = (loss(1.0 + 1e-2) - loss(1.0 - 1e-2)) / 2e-2
    assert abs(float(numeric)) > 1.0  # the check below has something to check
    np.testing.assert_allclose(grad, numeric, rtol=2e-2)
    # an edit is a pytree: its arrays are the leaves, its selection the structure
    edit = Add("z", jnp.ones(CFG.d_head), 2.0, layer=1, head=(0, 2), positions=[4])
    leaves, tree = jax.tree_util.tree_flatten(edit)
    assert len(leaves) == 2 and jax.tree_util.tree_unflatten(tree, leaves).head == (0, 2)


def test_generate_with_edit_values_equals_function_edits_and_forward():
    d = np.linspace(-2, 2, CFG.d_model).astype(np.float32)
    value = Add("resid_pre", d, 3.0, layer=1, positions=[8])
    fn = {"resid_pre": lambda v, layer, positions: jnp.where((layer == 1) & (positions == 8)[..., None],
                                                             v + 3.0 * d, v)}
    a = generate(PARAMS, CFG, TOKENS, 4, temperature=0, edits=value, return_logits=True)
    b = generate(PARAMS, CFG, TOKENS, 4, temperature=0, edits=fn, return_logits=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)
    # the edit at absolute position 8 (a generated token) matches forward on the final sequence
    full = logits(value, np.asarray(a.sequences)[:, :-1])
    np.testing.assert_allclose(np.asarray(a.logits), full[:, SEQ - 1:], atol=1e-4)
    lookup = generate(PARAMS, CFG, TOKENS, 4, temperature=0, edits=value, prompt_lookup=2)
    np.testing.assert_array_equal(np.asarray(lookup.tokens), np.asarray(a.tokens))


class Unregistered(Edit):  # an Edit subclass without @edit_value: not a pytree
    def change(self, value, layer):
        return value


BAD = [
    (lambda: Zero("zz"), SiteError, "unknown site 'zz'"),
    (lambda: Zero("embed", layer=0), InputError, "not per layer"),
    (lambda: Zero("resid_pre", head=1), InputError, "has no head axis"),
    (lambda: Zero("z", positions=-1), InputError, "non-negative"),
    (lambda: Zero("z", head=[]), InputError, "non-empty"),
    (lambda: Zero("z", index=1.5), InputError, "ints"),
    (lambda: Zero("z", layer=True), InputError, "layer must be a non-negative int"),
    (lambda: Zero("blocks.1.attn.hook_z", layer=0), InputError, "at layer 1"),
    (lambda: Zero("blocks.1.hook_resid_pre", layer=1.5), InputError, "layer must be a non-negative int, got 1.5"),
    (lambda: Zero("resid_pre", layer=-1), InputError, "layer must be a non-negative int, got -1"),
    (lambda: logits(Unregistered("resid_pre")), InputTypeError, "tinygpt.edits.edit_value"),
    (lambda: logits({"resid_pre": [Unregistered("resid_pre")]}), InputTypeError, "tinygpt.edits.edit_value"),
    (lambda: logits({"blocks.1.hook_resid_pre": lambda v, layer: v.mean(-1, keepdims=True)}), InputError,
     "edit at site 'blocks.1.hook_resid_pre' returned shape (2, 7, 1)"),
    (lambda: Compose(Zero("z"), "not an edit"), InputTypeError, "Compose takes edits"),
    (lambda: logits(Zero("z", layer=3)), InputError, "layer=3 is out of range for this model (n_layer = 3)"),
    (lambda: logits(Zero("z", head=3)), InputError, "head=3 is out of range"),
    (lambda: logits(Zero("mlp_post", index=40)), InputError, "index=40 is out of range for this model (d_mlp = 40)"),
    (lambda: logits(Zero("resid_pre", positions=[12])), InputError, "positions=12 is out of range"),
    (lambda: logits({"z": Zero("resid_pre")}), InputError, "edits['z'] holds an edit of site 'resid_pre'"),
    (lambda: logits({"blocks.0.attn.hook_z": Zero("z", layer=1)}), InputError, "at layer 1"),
    (lambda: logits(Set("resid_pre", np.ones(5))), InputError, "does not broadcast"),
    (lambda: logits(Patch("resid_pre", np.ones((BATCH, SEQ, CFG.d_model)))), InputError, "leading layer axis"),
    (lambda: logits(Mean("z", np.ones((2, 1, SEQ, 3, 8)), layer=1)), InputError, "does not broadcast"),
    (lambda: logits(42), InputTypeError, "edits must be an edit value"),
    (lambda: Mean.from_trace({"z": np.ones((1, 2, 3))}, "z", over=("batch", "batch")), InputError, "each once"),
    (lambda: Mean.from_trace({"z": np.ones((1, 2, 3))}, "z", over="sequence"), InputError, "got 'sequence'"),
    (lambda: generate(PARAMS, CFG, TOKENS, 2, edits=Zero("z", layer=7)), InputError, "out of range"),
]


@pytest.mark.parametrize("make, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_every_bad_selection_is_one_error(make, error, message):
    with pytest.raises(error) as caught:
        make()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_repr_is_short():
    assert repr(Add("resid_pre", jnp.ones(24), 4.0, layer=1)) == "Add('resid_pre', direction=f32[24], coef=4.0, layer=1)"
    assert repr(Zero("blocks.2.attn.hook_z", head=[2, 0])) == "Zero('z', layer=2, head=(0, 2))"


def test_an_saelens_sae_spliced_as_an_edit_value():
    """A SAELens SAE on the embedded model (written by sae-lens itself, tests/golden/saelens) spliced in as an
    edit value equals the function splice, and a second SAE of the same shapes reuses the compiled program."""
    from pathlib import Path

    from probes.sae import reconstruct, sae_edit, splice_edit
    from probes.saelens import load_saelens

    model = tinygpt.load()
    sae = load_saelens(Path(__file__).parent / "golden" / "saelens" / "shakespeare_resid", model.params)
    tokens = model.encode("To be, or not to be, that is the question")
    c = sae.config
    by_function = {c.site: splice_edit(lambda x: reconstruct(sae.params, x, c), c.layer)}
    want = model(tokens, edits=by_function, keep=["logits"]).logits
    assert isinstance(sae_edit(sae), tinygpt.edits.Edit)
    compiled.compiled_forward.cache_clear()  # a program with no SAE structure compiled yet
    program = compiled.compiled_forward(model.config, frozenset({"logits"}))
    assert program._cache_size() == 0
    got = model(tokens, edits=sae_edit(sae), keep=["logits"]).logits
    assert program._cache_size() == 1, "the SAE edit did not run the compiled program"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(model(tokens, keep=["logits"]).logits), atol=1e-3)
    before = program._cache_size()  # the unedited forward above added its own program
    other = type(sae)(c, jax.tree.map(lambda w: w * 0.5, sae.params))
    model(tokens, edits=sae_edit(other), keep=["logits"])
    assert compiled.compiled_forward(model.config, frozenset({"logits"})) is program
    assert program._cache_size() == before
