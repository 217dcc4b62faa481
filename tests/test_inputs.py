"""Bad inputs raise `tinygpt.InputError` (a ValueError) naming the problem; good ones in any reasonable form run,
and the forward stays traceable under an outer jit / vmap, where the static checks still apply."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
from tinygpt import InputError
from tinygpt.params import param_shapes

CFG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=40, n_ctx=8, vocab_size=37)
V = CFG.vocab_size
# random weights from numpy: init_params' jax.random draws would compile once per parameter shape
PARAMS = jax.tree_util.tree_map(
    lambda shape: jnp.asarray(0.5 * np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32),
    param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
TOKENS = np.random.default_rng(0).integers(0, V, (2, 5)).astype(np.int32)
MASK = np.array([[1] * 5, [0, 0, 1, 1, 1]], np.int32)
KEEP = ("logits",)


@functools.lru_cache(maxsize=None)
def reference_logits(masked=False):
    """Logits of TOKENS (with MASK if `masked`), computed once."""
    return np.asarray(run(TOKENS, MASK if masked else None).logits)


def run(tokens, attention_mask=None):
    """The checks run before any computation, so failing calls cost nothing."""
    return tinygpt.forward(PARAMS, tokens, CFG, attention_mask=attention_mask, keep=KEEP)


@jax.jit
def jitted_logits(tokens, attention_mask=None):
    """forward under an outer jit (tokens traced: no concrete-value checks possible)."""
    return tinygpt.forward(PARAMS, tokens, CFG, attention_mask=attention_mask, keep=KEEP).logits


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# ------------------------------------------------------------------------------------------- token ids


@given(bad=st.one_of(st.integers(V, V + 10_000), st.integers(-10_000, -1)), row=st.integers(0, 1),
       col=st.integers(0, 4))
def test_token_ids_outside_the_vocabulary(bad, row, col):
    tokens = TOKENS.copy()
    tokens[row, col] = bad
    msg = rf"token id {bad}\b.*\b{V}\b"  # names the id and the vocabulary size
    with pytest.raises(InputError, match=msg):
        run(tokens)
    with pytest.raises(InputError, match=msg):
        run(tokens.tolist())
    with pytest.raises(InputError, match=msg):
        run(jnp.asarray(tokens))
    with pytest.raises(InputError, match=msg):  # make_forward checks concretely before the compiled call
        tinygpt.make_forward(CFG, keep=KEEP)(PARAMS, tokens)


def test_boundary_ids_are_accepted():
    tokens = np.array([[0, V - 1, 0, V - 1]], np.int32)
    assert run(tokens).logits.shape == (1, 4, V)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
def test_float_tokens(dtype):
    with pytest.raises(InputError, match=r"integer.*" + re.escape(str(jnp.dtype(dtype)))):
        run(TOKENS.astype(dtype))
    with pytest.raises(InputError, match="integer"):
        run(jnp.asarray(TOKENS, jnp.float32))
    with pytest.raises(InputError, match="integer"):
        run(TOKENS.astype(np.float32).tolist())  # a list of floats


def test_non_array_tokens():
    with pytest.raises(InputError, match="tokens"):
        run("hello")
    with pytest.raises(InputError, match="tokens"):
        run(None)


# ---------------------------------------------------------------------------------------------- shapes


def test_one_dimensional_tokens_hint_at_adding_a_batch_axis():
    with pytest.raises(InputError, match=r"\(5,\).*tokens\[None\]"):
        run(TOKENS[0])
    with pytest.raises(InputError, match=r"tokens\[None\]"):
        run(TOKENS[0].tolist())


def test_three_dimensional_tokens():
    with pytest.raises(InputError, match=r"\[batch, seq\].*\(1, 2, 5\)") as info:
        run(TOKENS[None])
    assert "tokens[None]" not in str(info.value)  # the hint is for 1-D tokens only
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        run(np.int32(3))  # 0-D


def test_sequence_longer_than_the_context_names_both_lengths():
    tokens = np.zeros((1, CFG.n_ctx + 3), np.int32)
    with pytest.raises(InputError, match=rf"\b{CFG.n_ctx + 3}\b.*\b{CFG.n_ctx}\b"):
        run(tokens)
    assert run(tokens[:, : CFG.n_ctx]).logits.shape == (1, CFG.n_ctx, V)  # exactly n_ctx is fine


def test_empty_sequence():
    with pytest.raises(InputError, match="empty"):
        run(np.zeros((1, 0), np.int32))
    with pytest.raises(InputError, match="empty"):
        run(np.zeros((3, 0), np.int64))


def test_empty_python_list_is_reported_as_empty():
    # `[tokenizer.encode("")]` is `[[]]`; numpy makes that a float64 array, which must not surface as a
    # confusing "tokens must be integer token ids, got dtype float64"
    with pytest.raises(InputError, match="empty"):
        run([[]])


@pytest.mark.parametrize("shape", [(2, 4), (2, 6), (1, 5), (5,), (2, 5, 1), (5, 2)])
def test_attention_mask_of_the_wrong_shape(shape):
    with pytest.raises(InputError, match=re.escape(str(shape)) + r".*\(2, 5\)"):
        run(TOKENS, np.ones(shape, np.int32))


# ------------------------------------------------------------------------------------- accepted inputs


def test_python_lists_are_accepted():
    np.testing.assert_array_equal(np.asarray(run(TOKENS.tolist()).logits), reference_logits())
    np.testing.assert_array_equal(np.asarray(run(TOKENS.tolist(), MASK.tolist()).logits), reference_logits(True))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_other_integer_dtypes_are_accepted(dtype):
    np.testing.assert_array_equal(np.asarray(run(TOKENS.astype(dtype)).logits), reference_logits())


# ------------------------------------------------------------------------------ under an outer jit / vmap


def test_forward_is_traceable_under_jit():
    np.testing.assert_allclose(np.asarray(jitted_logits(TOKENS, MASK)), reference_logits(True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted_logits(jnp.asarray(TOKENS))), reference_logits(), rtol=1e-5,
                               atol=1e-5)


def test_forward_is_traceable_under_vmap():
    tokens = np.stack([TOKENS, TOKENS[::-1], (TOKENS + 1) % V])  # [3, batch, seq]
    masks = np.ones(tokens.shape, np.int32)
    masks[1, 0, :2] = 0
    vmapped = jax.vmap(lambda t, m: tinygpt.forward(PARAMS, t, CFG, attention_mask=m, keep=KEEP).logits)
    out = vmapped(tokens, masks)
    # the same sequences as one flat batch (batch rows are independent)
    flat = jitted_logits(tokens.reshape(-1, tokens.shape[-1]), masks.reshape(-1, tokens.shape[-1]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(flat).reshape(out.shape), rtol=1e-5, atol=1e-5)


def test_static_checks_still_raise_under_jit():
    with pytest.raises(InputError, match=rf"\b{CFG.n_ctx + 1}\b.*\b{CFG.n_ctx}\b"):
        jitted_logits(np.zeros((1, CFG.n_ctx + 1), np.int32))
    with pytest.raises(InputError, match="integer"):
        jitted_logits(TOKENS.astype(np.float32))
    with pytest.raises(InputError, match=r"tokens\[None\]"):
        jitted_logits(TOKENS[0])
    with pytest.raises(InputError, match="empty"):
        jitted_logits(np.zeros((1, 0), np.int32))
    with pytest.raises(InputError, match="attention_mask"):
        jitted_logits(TOKENS, np.ones((2, 4), np.int32))


def test_static_checks_still_raise_under_vmap():
    def logits(t):
        return tinygpt.forward(PARAMS, t, CFG, keep=KEEP).logits

    with pytest.raises(InputError, match=rf"\b{CFG.n_ctx + 1}\b.*\b{CFG.n_ctx}\b"):
        jax.vmap(logits)(np.zeros((2, 1, CFG.n_ctx + 1), np.int32))
    with pytest.raises(InputError, match=r"tokens\[None\]"):
        jax.vmap(logits)(TOKENS)  # each mapped slice is 1-D
    with pytest.raises(InputError, match="integer"):
        jax.vmap(logits)(np.zeros((2, 1, 3), np.float32))


# ------------------------------------------------------------------------- issue 17: batches and masks


def test_a_batch_of_zero_sequences_is_an_input_error():
    """It was a ZeroDivisionError."""
    with pytest.raises(InputError, match="batch of 0"):
        run(np.zeros((0, 4), np.int32))
    with pytest.raises(InputError, match="batch of 0"):
        tinygpt.generate(PARAMS, CFG, np.zeros((0, 4), np.int32), 2)


@pytest.mark.parametrize("mask, message", [
    ([1, 1, 1, 0, 0], r"row 1 is \[1, 1, 1, 0, 0\].*left padding"),
    ([1, 0, 1, 1, 1], "left padding"),
    ([0, 1, 1, 0, 1], "left padding"),
    ([0, 0, 0, 0, 0], "row 1 has no real token"),
    ([0, 2, 1, 1, 1], "only 0 .* and 1"),
    ([0, -1, 1, 1, 1], "only 0 .* and 1"),
])
def test_masks_must_be_left_padding_with_a_real_token_per_row(mask, message):
    """A right-padded mask made generate continue from the padding, silently; an empty row was accepted."""
    masks = np.array([[1, 1, 1, 1, 1], mask], np.int32)
    with pytest.raises(InputError, match=message):
        run(TOKENS, masks)
    with pytest.raises(InputError, match=message):
        tinygpt.generate(PARAMS, CFG, TOKENS, 2, attention_mask=masks)
    with pytest.raises(InputError, match=message):
        tinygpt.make_forward(CFG, keep=KEEP)(PARAMS, TOKENS, masks)


@given(st.lists(st.integers(0, 1), min_size=5, max_size=5))
def test_any_mask_is_accepted_exactly_when_it_is_left_padding(row):
    is_left_padding = any(row) and row == sorted(row)
    masks = np.array([[1] * 5, row], np.int32)
    try:
        tinygpt.inputs.check_mask(masks, (2, 5))
        accepted = True
    except InputError:
        accepted = False
    assert accepted == is_left_padding


# -------------------------------------------------------- issue 17: ids out of range inside a transformation


@pytest.mark.parametrize("bad", [V, V + 16, 2053, -1])
def test_under_jit_a_bad_id_gives_nan_never_another_tokens_logits(bad):
    """Under jit the ids cannot be looked at; jnp's gather clamped id 2053 to the last row (and -1 wrapped to
    it), answering for the wrong token. Now the sequence holding it is NaN (the masked attention weights times
    its NaN value reach every position), and the other rows are exact."""
    tokens = TOKENS.copy()
    tokens[1, 2] = bad
    logits = np.asarray(jitted_logits(tokens))
    assert np.isnan(logits[1]).all()
    np.testing.assert_allclose(logits[0], reference_logits()[0], rtol=1e-5, atol=1e-5)
    vmapped = jax.vmap(lambda t: tinygpt.forward(PARAMS, t[None], CFG, keep=KEEP).logits[0])(tokens)
    assert np.isnan(np.asarray(vmapped)[1]).all() and not np.isnan(np.asarray(vmapped)[0]).any()


@pytest.mark.parametrize("bad", [V, -1])
def test_checked_mode_raises_under_jit_and_vmap(bad):
    tokens = TOKENS.copy()
    tokens[0, 1] = bad
    with pytest.raises(InputError, match=rf"index {bad} is out of bounds"):
        tinygpt.checked(jitted_logits)(tokens)
    with pytest.raises(InputError, match="out of bounds"):
        tinygpt.checked(jax.vmap(lambda t: tinygpt.forward(PARAMS, t[None], CFG, keep=KEEP).logits))(tokens)
    good = tinygpt.checked(jitted_logits)(TOKENS)  # a good input runs and gives the same logits
    np.testing.assert_allclose(np.asarray(good), reference_logits(), rtol=1e-5, atol=1e-5)


def test_generate_under_jit_with_a_bad_id_gives_minus_one_never_a_real_token():
    tokens = TOKENS.copy()
    tokens[1, 4] = V + 3

    @jax.jit
    def greedy(t):
        return tinygpt.generate(PARAMS, CFG, t, 3, temperature=0).tokens

    out = np.asarray(greedy(tokens))
    assert (out[1] == -1).all()
    np.testing.assert_array_equal(out[0], np.asarray(greedy(TOKENS))[0])
    with pytest.raises(InputError, match="out of bounds"):
        tinygpt.checked(greedy)(tokens)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"top_p": 1.5}, r"top_p must be a finite number in \(0.0, 1.0\]"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"seed": 2**64}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),  # it silently equalled seed 0
])
def test_generate_checks_its_arguments_with_named_errors(kwargs, message):
    """These raised plain ValueErrors (or none: NaN passed and sampled token 0s; 2**64 overflowed in jax)."""
    with pytest.raises(InputError, match=message):
        tinygpt.generate(PARAMS, CFG, TOKENS, 2, **kwargs)
    with pytest.raises(InputError, match="max_new_tokens"):
        tinygpt.generate(PARAMS, CFG, TOKENS, 0)
