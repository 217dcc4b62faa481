"""Prompt-lookup decoding: the same tokens as plain greedy decoding, in fewer passes where text repeats.

The verifying pass must keep exactly the draft tokens greedy decoding would choose, whatever the draft:
checked with perfect, always-wrong and random drafts, with left-padded batches (rows advancing at their own
pace), edits, and a continuation that fills the context. The drafter itself is checked against a plain
Python reading of its rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinygpt
from tinygpt.generation import _generate_lookup, _row_phases, generate, lookup_draft
from tinygpt.params import layer_views


@pytest.fixture(scope="module")
def model():
    config = tinygpt.Config(n_layer=2, n_head=2, d_model=32, d_head=16, d_mlp=64, n_ctx=40, vocab_size=29)
    params = tinygpt.init_params(config, jax.random.PRNGKey(3))
    params = jax.tree_util.tree_map(lambda x: x * 4 if x.ndim > 1 else x, params)  # sharper argmax margins
    return config, params


def padded(prompts):
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return tokens, mask


def run_with_draft(params, config, tokens, mask, n_new, n_draft, draft, return_logits=False):
    run = jax.jit(lambda p, layers, t, m: _generate_lookup(p, layers, t, m, config, n_new, n_draft, {},
                                                          return_logits, draft=draft))
    return run(params, layer_views(params["blocks"]), jnp.asarray(tokens), jnp.asarray(mask))


@pytest.mark.parametrize("n_draft", [1, 3, 8])
def test_tokens_and_logits_equal_plain_greedy(model, n_draft):
    config, params = model
    rng = np.random.default_rng(n_draft)
    tokens, mask = padded([rng.integers(0, config.vocab_size, n) for n in (7, 2, 5)])
    plain = generate(params, config, tokens, 20, attention_mask=mask, temperature=0, return_logits=True)
    fast = generate(params, config, tokens, 20, attention_mask=mask, temperature=0, return_logits=True,
                    prompt_lookup=n_draft)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    np.testing.assert_array_equal(fast.sequences, plain.sequences)
    # a pass's matmuls have more rows than a one-token step: float32 rounding differs slightly
    np.testing.assert_allclose(fast.logits, plain.logits, atol=5e-5, rtol=0)
    assert int(plain.passes) == 20 and 1 < int(fast.passes) <= 20


def test_perfect_and_wrong_drafts_set_the_number_of_passes(model):
    """A perfect draft gains n_draft + 1 tokens a pass; an always-wrong one gains 1 (the verified token)."""
    config, params = model
    tokens, mask = padded([np.array([3, 1, 4, 1, 5]), np.array([9, 2])])
    n_new, n_draft = 17, 3
    plain = np.asarray(generate(params, config, tokens, n_new, attention_mask=mask, temperature=0).sequences)
    width = plain.shape[1]

    def oracle(seq, length, n):  # the true continuation after each row's `length` tokens
        at = length[:, None] + jnp.arange(n)
        return jnp.take_along_axis(jnp.asarray(plain), jnp.minimum(at, width - 1), axis=1)

    def wrong(seq, length, n):
        return (oracle(seq, length, n) + 1) % config.vocab_size

    perfect = run_with_draft(params, config, tokens, mask, n_new, n_draft, oracle)
    np.testing.assert_array_equal(perfect.sequences, plain)
    assert int(perfect.passes) == 1 + -(-(n_new - 1) // (n_draft + 1))  # the prompt's, then 4 passes
    miss = run_with_draft(params, config, tokens, mask, n_new, n_draft, wrong)
    np.testing.assert_array_equal(miss.sequences, plain)
    assert int(miss.passes) == n_new


@functools.lru_cache(maxsize=None)
def noisy_drafts_run(config, n_new, n_draft):
    """A lookup generation whose drafts are the true continuation `plain`, each token replaced by a wrong one
    with probability 1 - hit_rate (drawn per pass from `key`): compiled once per draft length."""

    def run(params, layers, tokens, mask, plain, key, hit_rate):
        def noisy(seq, length, n):
            at = jnp.minimum(length[:, None] + jnp.arange(n), plain.shape[1] - 1)
            truth = jnp.take_along_axis(plain, at, axis=1)
            hit = jax.random.bernoulli(jax.random.fold_in(key, length.sum()), hit_rate, truth.shape)
            return jnp.where(hit, truth, (truth + 1) % config.vocab_size)

        return _generate_lookup(params, layers, tokens, mask, config, n_new, n_draft, {}, True, draft=noisy)

    return jax.jit(run)


@settings(max_examples=8)  # each example compiles a lookup loop for its shapes (~2 s); CI's budget is 20 min
@given(seed=st.integers(0, 2**31 - 1), n_draft=st.sampled_from([1, 2, 5]), hit_rate=st.sampled_from([0.0, 0.5, 0.9]))
def test_random_drafts_give_greedy_tokens(model, seed, n_draft, hit_rate):
    """Drafts right with some probability at each token, per row: rows accept different counts each pass."""
    config, params = model
    rng = np.random.default_rng(seed)
    tokens, mask = padded([rng.integers(0, config.vocab_size, n) for n in [7, *rng.integers(1, 8, 2)]])
    n_new = 12
    plain = generate(params, config, tokens, n_new, attention_mask=mask, temperature=0, return_logits=True)
    run = noisy_drafts_run(config, n_new, n_draft)
    out = run(params, layer_views(params["blocks"]), jnp.asarray(tokens), jnp.asarray(mask),
              plain.sequences, jax.random.PRNGKey(seed), hit_rate)
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    np.testing.assert_allclose(out.logits, plain.logits, atol=5e-5, rtol=0)


def test_repetitive_text_takes_fewer_passes(model):
    """A continuation that repeats is drafted by lookup and accepted several tokens a pass. A model that
    always answers token 7 (the final LayerNorm's bias along the longest embedding, 7's) needs the prompt's
    pass, then ceil(23 / 7) passes of 6 drafts + 1 for 24 tokens; the random model, whose continuation
    wanders between a few tokens, fewer than its 24 steps."""
    config, params = model
    prompt = np.tile(np.array([5, 11, 3, 2]), 4)[None]  # no 7: after the first 7 drafts repeat it
    plain = generate(params, config, prompt, 24, temperature=0)
    fast = generate(params, config, prompt, 24, temperature=0, prompt_lookup=6)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    assert int(fast.passes) < 20

    wte = params["wte"].at[7].multiply(3.0)
    constant = dict(params, wte=wte, lnf_b=40.0 * wte[7] / jnp.linalg.norm(wte[7]))
    plain = generate(constant, config, prompt, 24, temperature=0)
    assert set(np.asarray(plain.tokens)[0].tolist()) == {7}
    fast = generate(constant, config, prompt, 24, temperature=0, prompt_lookup=6)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    assert int(fast.passes) == 1 + 4


def test_rows_finishing_apart_shrink_the_passes(model):
    """Rows drafted perfectly finish in a few passes, rows drafted wrongly take one pass a token: the passes
    after half the batch is done run on the unfinished rows only (gathered with their caches), and every row
    still gets greedy's tokens and logits, whichever phase it finished in."""
    config, params = model
    rng = np.random.default_rng(11)
    tokens, mask = padded([rng.integers(0, config.vocab_size, n) for n in (6, 3, 7, 2, 5)])
    n_new, n_draft = 15, 3
    plain = generate(params, config, tokens, n_new, attention_mask=mask, temperature=0, return_logits=True)
    truth = jnp.asarray(plain.sequences)
    right = jnp.array([True, False, True, True, False])  # rows 1 and 4 are drafted wrongly: last to finish

    def mixed(seq, length, n):
        at = jnp.minimum(length[:, None] + jnp.arange(n), truth.shape[1] - 1)
        true = jnp.take_along_axis(truth, at, axis=1)
        return jnp.where(right[:, None], true, (true + 1) % config.vocab_size)

    out = run_with_draft(params, config, tokens, mask, n_new, n_draft, mixed, return_logits=True)
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    np.testing.assert_allclose(out.logits, plain.logits, atol=5e-5, rtol=0)
    assert int(out.passes) == n_new  # the wrongly drafted rows set the count

    def phase_rows(edits):  # rows per pass of each while loop: the leading axis of the caches it carries
        jaxpr = jax.make_jaxpr(lambda p, layers, t, m: _generate_lookup(p, layers, t, m, config, n_new, n_draft,
                                                                        edits, False))(
            params, layer_views(params["blocks"]), jnp.asarray(tokens), jnp.asarray(mask)).jaxpr
        loops = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "while"]
        return [sorted({v.aval.shape[0] for v in eqn.outvars if v.aval.ndim == 4}) for eqn in loops]

    assert _row_phases(5) == (5, 3, 2, 1) and _row_phases(1) == (1,) and _row_phases(8) == (8, 4, 2, 1)
    assert phase_rows({}) == [[5], [3], [2], [1]]
    # with edits every pass runs the whole batch, in order
    assert phase_rows({"resid_post": (lambda x, layer: x,)}) == [[5]]


def test_context_filled_to_the_last_position(model):
    """Drafts running past n_ctx are dropped: a continuation ending exactly at n_ctx is still greedy's."""
    config, params = model
    prompt = np.random.default_rng(4).integers(0, config.vocab_size, (2, 10))
    n_new = config.n_ctx - 10
    plain = generate(params, config, prompt, n_new, temperature=0)
    fast = generate(params, config, prompt, n_new, temperature=0, prompt_lookup=8)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)


def test_edits_apply_to_every_pass(model):
    config, params = model
    direction = jax.random.normal(jax.random.PRNGKey(5), (config.d_model,))
    edit = {"resid_post": lambda x, layer: jnp.where(layer == 0, x + 2.0 * direction, x)}
    prompt = np.arange(6)[None]
    plain = generate(params, config, prompt, 12, temperature=0, edits=edit, return_logits=True)
    fast = generate(params, config, prompt, 12, temperature=0, edits=edit, return_logits=True, prompt_lookup=4)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    np.testing.assert_allclose(fast.logits, plain.logits, atol=5e-5, rtol=0)
    assert not np.array_equal(generate(params, config, prompt, 12, temperature=0).tokens, plain.tokens)


def test_edits_with_positions_apply_to_the_same_tokens_as_plain_greedy(model):
    """A pass feeds a row's last accepted token and its draft: an edit aimed at absolute positions (one in
    the prompt, two among the generated tokens) sees the same positions as in plain greedy decoding."""
    config, params = model
    direction = 3.0 * jax.random.normal(jax.random.PRNGKey(7), (config.d_model,))

    def edit(x, layer, positions):  # x [batch, seq, d_model], positions [batch, seq]
        hit = (positions == 2) | (positions == 9) | (positions == 13)
        return jnp.where((layer == 1) & hit[..., None], x + direction, x)

    tokens, mask = padded([np.arange(6) % 5, np.arange(4)])
    plain = generate(params, config, tokens, 12, temperature=0, edits={"resid_pre": edit}, return_logits=True,
                     attention_mask=mask)
    fast = generate(params, config, tokens, 12, temperature=0, edits={"resid_pre": edit}, return_logits=True,
                    attention_mask=mask, prompt_lookup=4)
    np.testing.assert_array_equal(fast.tokens, plain.tokens)
    np.testing.assert_allclose(fast.logits, plain.logits, atol=5e-5, rtol=0)
    unedited = generate(params, config, tokens, 12, temperature=0, attention_mask=mask, return_logits=True)
    assert not np.allclose(unedited.logits, plain.logits, atol=1e-3)


def test_inside_an_outer_jit(model):
    config, params = model
    prompt = np.random.default_rng(6).integers(0, config.vocab_size, (2, 5))
    inner = jax.jit(lambda p, t: generate(p, config, t, 9, temperature=0, prompt_lookup=3).tokens)(params, prompt)
    np.testing.assert_array_equal(inner, generate(params, config, prompt, 9, temperature=0).tokens)


def test_errors(model):
    config, params = model
    prompt = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match="temperature=0"):
        generate(params, config, prompt, 4, temperature=0.7, prompt_lookup=4)
    with pytest.raises(ValueError, match="keeps no traces"):
        generate(params, config, prompt, 4, temperature=0, keep="resid_post", prompt_lookup=4)
    with pytest.raises(ValueError, match="does not stream"):
        generate(params, config, prompt, 4, temperature=0, on_token=print, prompt_lookup=4)
    with pytest.raises(ValueError, match="prompt_lookup must be >= 1"):
        generate(params, config, prompt, 4, temperature=0, prompt_lookup=-2)


# ------------------------------------------------------------------------------------------- the drafter


def draft_by_rule(row, length, n_draft, max_ngram=3):
    """lookup_draft's rule read plainly: the most recent earlier occurrence of the longest matching tail
    n-gram; copy what followed, periodically; no match: repeat the last token."""
    row = list(row[:length])
    for n in range(max_ngram, 0, -1):
        if n >= length:
            continue
        tail = row[length - n:]
        starts = [j for j in range(length - n) if row[j:j + n] == tail]
        if starts:
            period = length - n - max(starts)
            return [row[length - period + i % period] for i in range(n_draft)]
    return [row[-1]] * n_draft


@given(data=st.data(), n_draft=st.integers(1, 9), vocab=st.integers(2, 6))
def test_lookup_draft_follows_its_rule(data, n_draft, vocab):
    rows = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=20), min_size=1, max_size=4))
    total = max(map(len, rows)) + 3
    seq = np.full((len(rows), total), 99, np.int32)  # anything past a row's length
    for i, r in enumerate(rows):
        seq[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    got = np.asarray(jax.jit(lookup_draft, static_argnums=2)(seq, lengths, n_draft))
    for i, r in enumerate(rows):
        assert got[i].tolist() == draft_by_rule(seq[i], len(r), n_draft), (r, got[i])


def test_lookup_draft_continues_a_loop():
    seq = np.array([[5, 6, 7, 5, 6, 7, 5, 0, 0]])
    assert np.asarray(lookup_draft(seq, np.array([7]), 5)).tolist() == [[6, 7, 5, 6, 7]]
    seq = np.array([[1, 2, 3, 4, 0]])  # nothing repeats: the last token
    assert np.asarray(lookup_draft(seq, np.array([4]), 3)).tolist() == [[4, 4, 4]]
