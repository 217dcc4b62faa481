"""KV-cache generation: equal to the reference forward at every step, batched = single, seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from tinygpt.generation import generate, sample, Sampling


@pytest.fixture(scope="module")
def model():
    config = tinygpt.Config(n_layer=3, n_head=2, d_model=32, d_head=16, d_mlp=128, n_ctx=24, vocab_size=53)
    params = tinygpt.init_params(config, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x * 6 if x.ndim > 1 else x, params)  # peaked attention
    return config, params


def full_logits(params, config, sequences, mask=None):
    return np.asarray(tinygpt.forward(params, sequences, config, attention_mask=mask, keep="logits").logits)


def test_cached_logits_equal_full_forward_at_every_step(model):
    config, params = model
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 5))
    out = generate(params, config, prompt, 12, temperature=0.8, seed=1, return_logits=True)
    full = full_logits(params, config, out.sequences)
    # the logits that chose new token i are the full forward's logits at position prompt_len - 1 + i; the
    # cached steps' one-token kernels and the full forward's round differently: 1.8e-5 on this peaked model
    # (weights x6) with jax 0.10, whose float32 forward is itself ~3e-5 from a float64 evaluation
    np.testing.assert_allclose(out.logits, full[:, 4:-1], atol=5e-5, rtol=0)


def test_greedy_equals_argmax_of_repeated_full_forwards(model):
    config, params = model
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (3, 4))
    out = generate(params, config, tokens, 10, temperature=0)
    np.testing.assert_array_equal(out.sequences, greedy_by_full_forwards(params, config, tokens, 10))


def greedy_by_full_forwards(params, config, prompt, n_new):
    """Greedy decoding by a full forward per token, on a fixed-width buffer (causality makes the unfilled
    tail irrelevant), so one compiled program serves every step."""
    seq = np.zeros((prompt.shape[0], prompt.shape[1] + n_new), np.int32)
    seq[:, : prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], seq.shape[1]):
        seq[:, t] = full_logits(params, config, seq)[:, t - 1].argmax(-1)
    return seq


def test_left_padded_batch_equals_single_runs(model):
    config, params = model
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, config.vocab_size, n) for n in (6, 2, 4)]
    width = max(map(len, prompts))
    tokens = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = generate(params, config, tokens, 8, attention_mask=mask, temperature=0, return_logits=True)
    for i, p in enumerate(prompts):
        single = generate(params, config, p[None], 8, temperature=0, return_logits=True)
        np.testing.assert_array_equal(batched.tokens[i], single.tokens[0])
        # float32 rounding differs between batch sizes (XLA picks other kernels) and this peaked model (weights
        # x6) amplifies it: 2e-5 seen; its full float32 forward is itself 3e-5 from a float64 evaluation
        np.testing.assert_allclose(batched.logits[i], single.logits[0], atol=5e-5, rtol=0)
    # padded-batch logits equal the full forward on the padded sequences (positions skip the padding)
    out = batched
    full_mask = np.concatenate([mask, np.ones((3, 8), np.int32)], 1)
    full = full_logits(params, config, out.sequences, full_mask)
    # (same float32 rounding caveat: the step attends over a keys-last cache, the forward over its own k, v)
    np.testing.assert_allclose(out.logits, full[:, width - 1:-1], atol=3e-5, rtol=0)


def test_sampling_is_seeded(model):
    config, params = model
    prompt = np.zeros((2, 3), np.int32)
    a = generate(params, config, prompt, 10, temperature=1.0, seed=7).tokens
    b = generate(params, config, prompt, 10, temperature=1.0, seed=7).tokens
    c = generate(params, config, prompt, 10, temperature=1.0, seed=8).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    config, params = model
    prompt = np.arange(6).reshape(2, 3)
    greedy = generate(params, config, prompt, 8, temperature=0).tokens
    np.testing.assert_array_equal(generate(params, config, prompt, 8, temperature=1.5, top_k=1, seed=3).tokens,
                                  greedy)
    np.testing.assert_array_equal(generate(params, config, prompt, 8, temperature=1.5, top_p=1e-6, seed=3).tokens,
                                  greedy)


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    draws = lambda s: np.asarray(jax.vmap(lambda k: sample(logits, k, s)[0])(keys))  # noqa: E731
    assert set(draws(Sampling(1.0, top_k=2))) == {0, 1}
    assert set(draws(Sampling(1.0, top_p=0.8))) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(draws(Sampling(1.0, top_p=0.81))) == {0, 1, 2}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(-1.0)


def test_traces_of_prompt_and_steps_are_readable(model):
    """Step traces equal the full forward's trace at the generated positions."""
    config, params = model
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, (2, 5))
    keep = ("resid_post", "mlp_post", "attn_pattern", "embed")
    out = generate(params, config, prompt, 6, temperature=0, keep=keep)
    full = tinygpt.forward(params, out.sequences, config, keep=keep)
    # the prompt's 5 positions and the full forward's 11 take differently shaped kernels: up to 2.8e-5 here
    np.testing.assert_allclose(out.prompt_trace.resid_post, full.resid_post[:, :, :5], atol=5e-5)
    # step i feeds generated token i (position 5 + i); its trace is [step, layer, batch, 1, ...]. The decode
    # step's single-token kernels round differently from the full forward's: up to 2e-5 on this peaked model
    # (weights x6), whose float32 forward is itself 3e-5 from a float64 evaluation.
    steps = out.step_trace
    assert steps.resid_post.shape == (5, config.n_layer, 2, 1, config.d_model)
    for i in range(5):
        np.testing.assert_allclose(steps.resid_post[i, :, :, 0], full.resid_post[:, :, 5 + i], atol=5e-5, rtol=1e-5)
        np.testing.assert_allclose(steps.mlp_post[i, :, :, 0], full.mlp_post[:, :, 5 + i], atol=5e-5, rtol=1e-5)
        np.testing.assert_allclose(steps.embed[i, :, 0], full.embed[:, 5 + i], atol=1e-6)
        pattern = steps.attn_pattern[i, :, :, :, 0, : 6 + i]  # over the keys filled so far
        np.testing.assert_allclose(pattern, full.attn_pattern[:, :, :, 5 + i, : 6 + i], atol=1e-5)


def test_edits_apply_during_generation(model):
    """An edit on resid_post is applied to the prompt and to every step, exactly as in the full forward."""
    config, params = model
    direction = jax.random.normal(jax.random.PRNGKey(5), (config.d_model,))
    edit = {"resid_post": lambda x, layer: jnp.where(layer == 1, x + 3.0 * direction, x)}
    prompt = np.arange(4)[None]
    out = generate(params, config, prompt, 8, temperature=0, edits=edit, return_logits=True)
    full = np.asarray(tinygpt.forward(params, out.sequences, config, edits=edit, keep="logits").logits)
    np.testing.assert_allclose(out.logits, full[:, 3:-1], atol=1e-5)
    plain = generate(params, config, prompt, 8, temperature=0)
    assert not np.array_equal(plain.tokens, out.tokens)


def steer_at_positions(direction, layer, targets):
    """An edit adding `direction` to the residual entering block `layer` at the absolute `targets`."""
    def edit(x, at, positions):  # x [batch, seq, d_model], positions [batch, seq]
        hit = (positions[..., None] == jnp.asarray(targets)).any(-1)  # [batch, seq]
        return jnp.where((at == layer) & hit[..., None], x + direction, x)
    return {"resid_pre": edit}


def test_edits_with_positions_hit_the_same_tokens_in_the_prompt_and_the_steps(model):
    """An edit at absolute positions 2 (in the prompt) and 7 (a generated token) of left-padded rows:
    the continuation's tokens and logits are those of the full forward with that edit on the final
    sequence, and they differ from the unedited continuation."""
    config, params = model
    direction = 4.0 * jax.random.normal(jax.random.PRNGKey(6), (config.d_model,))
    edits = steer_at_positions(direction, 1, [2, 7])
    tokens = np.array([[0, 0, 5, 9, 2, 7], [3, 1, 4, 1, 5, 9]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    out = generate(params, config, tokens, 8, temperature=0, edits=edits, return_logits=True,
                   attention_mask=mask)
    full_mask = np.concatenate([mask, np.ones((2, 8), np.int32)], axis=1)
    full = np.asarray(tinygpt.forward(params, out.sequences, config, edits=edits, attention_mask=full_mask,
                                      keep="logits").logits)
    np.testing.assert_allclose(out.logits, full[:, 5:-1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.tokens, full[:, 5:-1].argmax(-1))
    # against the edit at position 2 alone: new logit i is read at position (last prompt position) + i, row 0's
    # 3 + i, row 1's 5 + i, so the edit at position 7 changes row 0's from i = 4 on and row 1's from i = 2 on
    prompt_only = generate(params, config, tokens, 8, temperature=0, edits=steer_at_positions(direction, 1, [2]),
                           attention_mask=mask, return_logits=True)
    changed = np.abs(out.logits - prompt_only.logits).max(-1) > 1e-4  # [batch, new]
    np.testing.assert_array_equal(changed, [[False] * 4 + [True] * 4, [False] * 2 + [True] * 6])


def test_streaming_callback_sees_every_token_in_order(model):
    config, params = model
    seen = []
    out = generate(params, config, np.arange(3)[None], 7, temperature=0,
                   on_token=lambda step, ids: seen.append((step, ids.tolist())))
    jax.effects_barrier()
    assert [s for s, _ in seen] == list(range(7))
    assert [ids[0] for _, ids in seen] == np.asarray(out.tokens)[0].tolist()


def test_errors(model):
    config, params = model
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=24"):
        generate(params, config, np.zeros((1, 20), np.int32), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, config, np.zeros((1, 2), np.int32), 0)
    with pytest.raises(tinygpt.InputError, match="outside the vocabulary"):
        generate(params, config, np.full((1, 2), 99), 3)
