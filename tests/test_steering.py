"""Steering: the vector is added exactly at the requested layer, site and positions and nowhere else, in a
forward and during generation (checked against a greedy loop that recomputes the whole sequence); the
difference-of-means and function vectors are the means they claim to be; embedding arithmetic finds the
constructed answer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from probes import steering
from test_lens import CFG, KEEP, SEQ, random_params, random_tokens, seeds

SITES = ("resid_pre", "resid_mid", "resid_post")


@functools.partial(jax.jit, static_argnames=("all_positions",))
def steered_trace(params, tokens, vector, layer, coefficient, positions, all_positions=False):
    edit = steering.steering_edit(vector, layer, coefficient, None if all_positions else positions)
    return tinygpt.forward(params, tokens, CFG, edits={"resid_mid": edit}, keep=SITES)


@settings(max_examples=6)
@given(seed=seeds, layer=st.integers(0, CFG.n_layer - 1), coefficient=st.floats(0.5, 4.0),
       positions=st.lists(st.integers(0, SEQ - 1), min_size=1, max_size=3), all_positions=st.booleans())
def test_vector_is_added_exactly_at_the_layer_site_and_positions(seed, layer, coefficient, positions, all_positions):
    params, tokens = random_params(seed), random_tokens(seed)
    vector = np.random.default_rng(seed).standard_normal(CFG.d_model).astype(np.float32)
    positions = (positions + positions[:1] * 3)[:3]  # a fixed length (3) so that one program compiles
    clean = steered_trace(params, tokens, vector, 0, 0.0, jnp.asarray(positions), all_positions)
    steered = steered_trace(params, tokens, vector, layer, coefficient, jnp.asarray(positions), all_positions)
    chosen = np.ones(SEQ, bool) if all_positions else np.isin(np.arange(SEQ), positions)

    for site in SITES:  # every block before the layer is untouched
        np.testing.assert_array_equal(steered[site][:layer], clean[site][:layer])
    np.testing.assert_array_equal(steered.resid_pre[layer], clean.resid_pre[layer])  # the site before, same block
    difference = np.asarray(steered.resid_mid[layer] - clean.resid_mid[layer], np.float64)  # [batch, seq, d_model]
    added = np.broadcast_to(coefficient * vector, difference[:, chosen].shape)
    np.testing.assert_allclose(difference[:, chosen], added, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(difference[:, ~chosen], 0.0)
    if layer + 1 < CFG.n_layer and not all_positions:  # later, attention spreads it to later positions only
        before_first = np.arange(SEQ) < min(positions)
        np.testing.assert_array_equal(steered.resid_pre[layer + 1][:, before_first],
                                      clean.resid_pre[layer + 1][:, before_first])


# ------------------------------------------------------------------------------------------------ generation


@jax.jit
def reference_logits(params, buffer, vector, layer, coefficient, chosen):
    """Logits of a whole buffer [1, total] with the vector added at resid_pre of `layer` where chosen [total]."""

    def edit(value, at_layer):
        return jnp.where((at_layer == layer) & chosen[None, :, None], value + coefficient * vector, value)

    return tinygpt.forward(params, buffer, CFG, edits={"resid_pre": edit}, keep=("logits",)).logits[0]


def greedy_reference(params, prompt, new, vector, layer, coefficient, chosen):
    """Greedy decoding by recomputing the whole (fixed-size) buffer every step; causal attention makes the
    unfilled tail irrelevant. `chosen` marks the absolute positions that get the vector."""
    buffer = np.zeros((1, len(prompt) + new), np.int32)
    buffer[0, : len(prompt)] = prompt
    for i in range(new):
        logits = reference_logits(params, buffer, vector, layer, coefficient, jnp.asarray(chosen))
        buffer[0, len(prompt) + i] = int(np.argmax(logits[len(prompt) + i - 1]))
    return buffer[0, len(prompt):]


NEW = 5


def steering_case(seed):
    params = random_params(seed)
    vector = 3.0 * np.random.default_rng(seed).standard_normal(CFG.d_model).astype(np.float32)
    return params, vector


def test_generation_steers_every_position_or_only_the_given_prompt_positions():
    params, vector = steering_case(11)
    prompt = random_tokens(11, batch=1, seq=4)[0]
    total = len(prompt) + NEW
    everywhere = steering.steer(params, CFG, prompt[None], vector, 1, 2.0, max_new_tokens=NEW)
    assert everywhere.positions is None
    np.testing.assert_array_equal(everywhere.tokens[0], greedy_reference(params, prompt, NEW, vector, 1, 2.0,
                                                                         np.ones(total, bool)))
    np.testing.assert_array_equal(everywhere.baseline[0], greedy_reference(params, prompt, NEW, vector, 1, 0.0,
                                                                           np.ones(total, bool)))
    at_prompt = steering.steer(params, CFG, prompt[None], vector, 1, 2.0, positions=[1, -1], max_new_tokens=NEW)
    assert at_prompt.positions == [1, 3]
    np.testing.assert_array_equal(at_prompt.tokens[0], greedy_reference(params, prompt, NEW, vector, 1, 2.0,
                                                                        np.isin(np.arange(total), [1, 3])))
    # the three continuations differ, so the comparisons above can tell where the vector was added
    assert len({tuple(everywhere.tokens[0]), tuple(at_prompt.tokens[0]), tuple(everywhere.baseline[0])}) == 3


def test_one_token_prompt_is_steered_at_its_position_only():
    params, vector = steering_case(12)
    prompt = random_tokens(12, batch=1, seq=1)[0]
    new = NEW + 3  # the same total length as the 4-token prompt's test: one reference program
    result = steering.steer(params, CFG, prompt[None], vector, 0, 2.0, positions=[0], max_new_tokens=new,
                            compare=False)
    assert result.positions == [0] and result.baseline is None
    chosen = np.arange(1 + new) == 0
    np.testing.assert_array_equal(result.tokens[0], greedy_reference(params, prompt, new, vector, 0, 2.0, chosen))


def test_generated_tokens_only():
    """positions="generated" (contrastive activation addition's placement): the prompt is the unsteered
    model's, every generated token gets the vector."""
    params, vector = steering_case(13)
    prompt = random_tokens(13, batch=1, seq=4)[0]
    total = len(prompt) + NEW
    result = steering.steer(params, CFG, prompt[None], vector, 1, 2.0, positions="generated", max_new_tokens=NEW)
    assert result.positions == "generated"
    np.testing.assert_array_equal(result.tokens[0], greedy_reference(params, prompt, NEW, vector, 1, 2.0,
                                                                     np.arange(total) >= len(prompt)))
    assert not np.array_equal(result.tokens[0], result.baseline[0])  # the vector changed the continuation
    with pytest.raises(ValueError, match="'generated' or prompt positions"):
        steering.steer(params, CFG, prompt[None], vector, 1, positions="prompt")
    with pytest.raises(ValueError, match="positions or start, not both"):
        steering.steering_edit(vector, 1, positions=[0], start=4)


def test_positions_outside_the_prompt_are_a_clear_error():
    params, vector = steering_case(0)
    with pytest.raises(ValueError, match="position 4 is outside the prompt of 4 tokens"):
        steering.steer(params, CFG, random_tokens(0, batch=1, seq=4), vector, 0, positions=[4])
    with pytest.raises(ValueError, match="steering site must be one of"):
        steering.steer(params, CFG, random_tokens(0, batch=1, seq=4), vector, 0, site="mlp_out")


# ------------------------------------------------------------------------------------------------- vectors


def test_mean_difference_is_the_difference_of_last_token_means():
    params, tokens = random_params(5), random_tokens(5)
    layer, site = 1, "resid_pre"
    positive = [list(tokens[0]), list(tokens[1])]
    negative = [list(tokens[0, :4])]  # shorter: left-padded in the probe's batch
    vector = steering.mean_difference(params, CFG, positive, negative, layer, site)
    resid = np.asarray(tinygpt.forward(params, tokens, CFG, keep=KEEP)[site][layer])  # [batch, seq, d_model]
    # causal attention: the prefix's last state is the full row's state at that position
    expected = (resid[0, -1] + resid[1, -1]) / 2 - resid[0, 3]
    np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5)


def test_function_vector_means_effects_and_sum():
    params, clean = random_params(6), random_tokens(6)
    corrupted = np.concatenate([clean[:, :2], clean[:, 3:4], clean[:, 2:3], clean[:, 4:]], axis=1)  # answers swapped
    answers = [5, 17]
    fv = steering.function_vector(params, CFG, clean.tolist(), corrupted.tolist(), answers, n_heads=3)

    head_out = tinygpt.forward(params, clean, CFG, keep=KEEP).head_out  # [layer, batch, seq, head, d_model]
    np.testing.assert_allclose(fv.mean_head_out, np.asarray(head_out[:, :, -1]).mean(1), rtol=1e-4, atol=1e-5)

    @jax.jit
    def answer_prob(layer, head, vector):  # a head's output at the last position replaced by `vector`
        def patch(value, at_layer):
            return jnp.where(at_layer == layer, value.at[:, -1, head].set(vector), value)

        logits = tinygpt.forward(params, corrupted, CFG, edits={"head_out": patch}, keep=("logits",)).logits[:, -1]
        return jax.nn.softmax(logits)[jnp.arange(len(answers)), jnp.asarray(answers)].mean()

    for layer, head in [(0, 1), (2, 2)]:
        unpatched = answer_prob(-1, head, fv.mean_head_out[layer, head])  # no block is -1: nothing patched
        effect = answer_prob(layer, head, fv.mean_head_out[layer, head]) - unpatched
        np.testing.assert_allclose(fv.indirect_effect[layer, head], effect, rtol=1e-3, atol=1e-6)
    effects = [fv.indirect_effect[l, h] for l, h in fv.heads]
    assert len(fv.heads) == 3 and effects == sorted(effects, reverse=True)
    assert effects[0] == fv.indirect_effect.max()
    np.testing.assert_allclose(fv.vector, sum(fv.mean_head_out[l, h] for l, h in fv.heads), rtol=1e-6)


def test_embedding_arithmetic_finds_the_constructed_token():
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((CFG.vocab_size, CFG.d_model)).astype(np.float32)
    king, man, woman, queen = 3, 7, 11, 20
    wte[queen] = wte[king] - wte[man] + wte[woman]
    result = steering.embedding_arithmetic({"wte": wte}, [king, woman], [man], k=3)
    assert result[0][0] == queen and result[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(t not in (king, man, woman) for t, _ in result)
    assert steering.embedding_arithmetic({"wte": wte}, [queen], k=1, exclude_inputs=False)[0][0] == queen
