"""Patchscopes: a state patched at the last layer decides the next token on its own; patching a prompt's own
state changes nothing; generation patches the target prompt only (checked against a greedy loop that
recomputes the whole sequence); multi-hop is the last source state into the template's placeholder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from probes.lens import lens_logits
from probes.patchscope import IDENTITY_PROMPT, hidden_states, multihop, patchscope
from test_lens import CFG, K, random_params, random_tokens

SOURCE_SEQ = TARGET_SEQ = 6  # one shape for both: one compiled program


def prompts(seed):
    return random_tokens(seed, batch=1, seq=SOURCE_SEQ), random_tokens(seed + 1, batch=1, seq=TARGET_SEQ)


def source_next_token_probs(params, source):
    """The model's next-token probabilities at every position of a [1, seq] prompt.  -> [seq, vocab]"""
    resid = tinygpt.forward(params, source, CFG, keep=("resid_post",)).resid_post  # the program hidden_states uses
    return np.asarray(jax.nn.softmax(lens_logits(params, resid[-1, 0], CFG)), np.float64)


def test_state_patched_after_the_last_block_decodes_like_the_source():
    params = random_params(1)
    source, target = prompts(1)
    last = CFG.n_layer - 1
    result = patchscope(params, CFG, source, target, source_layers=[last], source_position=2, k=K)
    # after the last block only ln_f and the unembedding follow: the target's next token is the source's
    # prediction at position 2
    probs = source_next_token_probs(params, source)[2]
    np.testing.assert_array_equal(result.top_ids[0], np.argsort(-probs)[:K])
    np.testing.assert_allclose(result.top_probs[0], np.sort(probs)[::-1][:K], rtol=1e-4, atol=1e-6)
    assert (result.source_layers, result.target_layers, result.source_position, result.target_position) == (
        [last], [last], 2, TARGET_SEQ - 1)


def test_patching_a_prompts_own_state_changes_nothing_and_other_states_do():
    params = random_params(2)
    source, _ = prompts(2)
    own = patchscope(params, CFG, source, source, k=K)  # every layer, last position into itself
    expected = np.sort(source_next_token_probs(params, source)[-1])[::-1][:K]
    for row in own.top_probs:
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-6)
    other = patchscope(params, CFG, source, source, source_position=0, target_layer=0, k=K)
    assert np.abs(other.top_probs - own.top_probs).max() > 1e-4


@jax.jit
def reference_logits(params, buffer, vector, layer, position):
    """Logits of a whole buffer [1, total] with resid_post of `layer` at `position` replaced by `vector`."""

    def edit(value, at_layer):
        here = (at_layer == layer) & (jnp.arange(value.shape[1]) == position)[None, :, None]
        return jnp.where(here, vector, value)

    return tinygpt.forward(params, buffer, CFG, edits={"resid_post": edit}, keep=("logits",)).logits[0]


def greedy_reference(params, target, new, vector, layer, position):
    buffer = np.zeros((1, target.shape[1] + new), np.int32)
    buffer[:, : target.shape[1]] = target
    for i in range(new):
        logits = reference_logits(params, buffer, vector, layer, position)
        buffer[0, target.shape[1] + i] = int(np.argmax(logits[target.shape[1] + i - 1]))
    return buffer[0, target.shape[1]:]


@pytest.mark.parametrize("target_seq", [TARGET_SEQ, 1])
def test_generation_patches_the_target_prompt_only(target_seq):
    params = random_params(3)
    source, target = prompts(3)
    target = target[:, :target_seq]
    new = 4 + TARGET_SEQ - target_seq  # the same total length in both cases: one reference program
    result = patchscope(params, CFG, source, target, source_layers=[1], source_position=3, target_layer=0,
                        target_position=0, max_new_tokens=new)
    vector = hidden_states(params, CFG, source, 3)[1]
    expected = greedy_reference(params, target, new, vector, 0, 0)
    np.testing.assert_array_equal(result.generated[0], expected)
    np.testing.assert_array_equal(result.top_ids[0, 0], expected[0])


def test_multihop_patches_the_last_source_state_into_the_placeholder():
    params = random_params(4)
    first, template = prompts(4)
    hop = multihop(params, CFG, first, template, 2, k=K)  # every layer, as in the test above: one program
    direct = patchscope(params, CFG, first, template, source_position=SOURCE_SEQ - 1,
                        target_position=2, k=K)
    np.testing.assert_array_equal(hop.top_ids, direct.top_ids)
    assert (hop.source_position, hop.target_position) == (SOURCE_SEQ - 1, 2)


def test_identity_prompt_and_errors():
    assert IDENTITY_PROMPT == "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
    params = random_params(0)
    source, target = prompts(0)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        patchscope(params, CFG, source, target, source_layers=[3])
    with pytest.raises(ValueError, match="position 6 is outside the prompt of 6 tokens"):
        patchscope(params, CFG, source, target, target_position=6)
    with pytest.raises(ValueError, match="patchscope site must be one of"):
        patchscope(params, CFG, source, target, site="ln1")
