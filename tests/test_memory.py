"""MLP neurons as key-value memories: keys are W_in columns, values W_out rows; the value read through the
unembedding, top activations over a corpus and the direct effect on a prompt agree with direct computations
and with the attribution probe. One definition of a neuron's activation (`neuron_activations`) and of its key
in the residual stream (`residual_keys`, centred), which every probe reporting them uses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from probes import memory
from probes.attribution import neuron_attribution
from test_lens import BATCH, CFG, KEEP, SEQ, random_params, random_tokens, seeds

layers = st.integers(0, CFG.n_layer - 1)
neurons = st.integers(0, CFG.d_mlp - 1)


@settings(max_examples=4)
@given(seed=seeds, layer=layers, neuron=neurons)
def test_key_is_read_and_value_is_written(seed, layer, neuron):
    params, tokens = random_params(seed), random_tokens(seed)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    key, value = memory.neuron_key(params, layer, neuron), memory.neuron_value(params, layer, neuron)
    b_in = params["blocks"]["b_in"][layer, neuron]
    np.testing.assert_allclose(trace.ln2[layer] @ key + b_in, trace.mlp_pre[layer][..., neuron], rtol=1e-4, atol=1e-4)
    # mlp_out is the sum of activation * value over neurons, plus b_out
    values = np.stack([memory.neuron_value(params, layer, i) for i in range(CFG.d_mlp)])
    np.testing.assert_array_equal(values[neuron], value)
    rebuilt = np.asarray(trace.mlp_post[layer]) @ values + np.asarray(params["blocks"]["b_out"][layer])
    np.testing.assert_allclose(rebuilt, trace.mlp_out[layer], rtol=1e-4, atol=1e-4)


def test_value_tokens_are_the_centered_value_through_the_unembedding():
    params = random_params(2)
    layer, neuron = 1, 5
    value = np.asarray(params["blocks"]["W_out"][layer, neuron], np.float64)
    expected = ((value - value.mean()) * np.asarray(params["lnf_w"])) @ np.asarray(params["wte"], np.float64).T
    np.testing.assert_allclose(memory.value_logits(params, layer, neuron), expected, rtol=1e-4, atol=1e-5)
    tokens = memory.value_tokens(params, layer, neuron, k=4)
    assert [t for t, _ in tokens.promoted] == list(np.argsort(-expected)[:4])
    assert [t for t, _ in tokens.suppressed] == list(np.argsort(expected)[:4])


def test_layer_mlp_post_runs_only_up_to_its_block_and_matches_the_forward():
    params, tokens = random_params(3), random_tokens(3)
    full = tinygpt.forward(params, tokens, CFG, keep=KEEP).mlp_post
    for layer in (0, CFG.n_layer - 1):  # no block before it; every block before it
        np.testing.assert_allclose(memory.compiled_layer_mlp_post(CFG, layer)(params, tokens), full[layer],
                                   rtol=1e-5, atol=1e-5)


def test_residual_key_is_the_direction_the_neuron_reads():
    """mlp_pre_i = resid_mid . key_i / ln2_scale + (ln2_b . W_in[:, i] + b_in[i]) with key_i the centred
    ln2_w * W_in[:, i]: LayerNorm subtracts resid_mid's mean, so the key's mean component is never read (the
    uncentred key gives another number wherever resid_mid's mean is not 0)."""
    params, tokens = random_params(6), random_tokens(6)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    for layer in range(CFG.n_layer):
        keys = memory.residual_keys(params, layer)  # [d_mlp, d_model]
        assert keys.shape == (CFG.d_mlp, CFG.d_model)
        np.testing.assert_allclose(keys.mean(axis=1), 0, atol=1e-12)
        blocks = {k: np.asarray(v[layer], np.float64) for k, v in params["blocks"].items()}
        constant = blocks["ln2_b"] @ blocks["W_in"] + blocks["b_in"]  # [d_mlp]
        resid = np.asarray(trace.resid_mid[layer], np.float64)  # [batch, seq, d_model]
        scale = np.asarray(trace.ln2_scale[layer], np.float64)  # [batch, seq, 1]
        np.testing.assert_allclose(resid @ keys.T / scale + constant, trace.mlp_pre[layer], rtol=1e-4, atol=1e-4)
        raw = blocks["W_in"].T * blocks["ln2_w"]
        assert np.abs(resid @ raw.T / scale + constant - np.asarray(trace.mlp_pre[layer])).max() > 1e-2


def test_neuron_activations_are_mlp_post_per_window():
    """The one definition: mlp_post (after GELU) at each token, each window run from its first token."""
    params = random_params(7)
    windows = random_tokens(7, batch=3, seq=SEQ)
    layer, neuron = 1, 9
    acts = memory.neuron_activations(params, CFG, windows, layer, neuron, batch=2)
    assert acts.shape == windows.shape and acts.dtype == np.float32
    for w in range(len(windows)):  # each window alone: its activations do not depend on the other windows
        alone = tinygpt.forward(params, windows[w:w + 1], CFG, keep=KEEP).mlp_post[layer, 0, :, neuron]
        np.testing.assert_allclose(acts[w], alone, rtol=1e-5, atol=1e-6)
    # a prompt is one window: neuron_on_prompt reports the same numbers, bit for bit
    on_prompt = memory.neuron_on_prompt(params, CFG, windows[1:2], layer, neuron)
    np.testing.assert_array_equal(on_prompt.activations, memory.neuron_activations(params, CFG, windows[1:2], layer,
                                                                                    neuron)[0])
    top = memory.top_activations(params, CFG, windows, layer, neuron, k=4, batch=2)
    np.testing.assert_array_equal(top.activations, acts[top.windows, top.positions])


def test_top_activations_are_the_largest_over_the_corpus():
    params = random_params(4)
    windows = random_tokens(4, batch=2 * BATCH, seq=SEQ)
    layer, neuron = CFG.n_layer - 1, 7
    top = memory.top_activations(params, CFG, windows, layer, neuron, k=6, batch=BATCH)  # in 2 chunks
    acts = np.concatenate([np.asarray(tinygpt.forward(params, windows[i:i + BATCH], CFG, keep=KEEP).mlp_post)[layer]
                           for i in range(0, len(windows), BATCH)])[..., neuron]  # [window, seq]
    np.testing.assert_allclose(top.activations, np.sort(acts, axis=None)[::-1][:6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts[top.windows, top.positions], top.activations, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(top.tokens, windows[top.windows, top.positions])


def test_effect_on_a_prompt_is_the_neurons_direct_logit_attribution():
    params, tokens = random_params(5), random_tokens(5)  # the prompt is row 0
    layer, neuron = 1, 3
    result = memory.neuron_on_prompt(params, CFG, tokens[:1], layer, neuron, k=3)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    np.testing.assert_allclose(result.activations, trace.mlp_post[layer, 0, :, neuron], rtol=1e-5, atol=1e-6)
    effects = [e for _, e in result.promoted]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0 > result.suppressed[0][1]
    # the neuron's share of a logit difference, from the attribution probe, is the difference of its effects
    (promoted, up), (suppressed, down) = result.promoted[0], result.suppressed[0]
    per_neuron = neuron_attribution(params, CFG, tokens, layer, promoted, baseline=suppressed)
    np.testing.assert_allclose(per_neuron.neurons[neuron, 0], up - down, rtol=1e-4, atol=1e-6)


def test_out_of_range_neuron_is_a_clear_error():
    with pytest.raises(ValueError, match="d_mlp=40"):
        memory.top_activations(random_params(0), CFG, random_tokens(0), 0, CFG.d_mlp)
    with pytest.raises(ValueError, match="3 layers"):
        memory.neuron_on_prompt(random_params(0), CFG, random_tokens(0)[:1], 3, 0)
