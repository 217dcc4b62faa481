"""Direct logit attribution: the residual components sum to the final residual, and their contributions
plus the final LayerNorm's bias term sum to the logit (difference) exactly; per-neuron contributions sum
to the MLP's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from probes import transforms
from probes.attribution import (
    component_labels,
    direct_logit_attribution,
    neuron_attribution,
    residual_decomposition,
)
from test_lens import CFG, KEEP, SEQ, random_params, random_tokens, seeds

tokens_ids = st.integers(0, CFG.vocab_size - 1)
positions = st.integers(-SEQ, SEQ - 1)


def test_labels_name_every_component_once():
    labels, layers, heads = component_labels(CFG)
    assert len(labels) == 2 + CFG.n_layer * (CFG.n_head + 2) == len(set(labels))
    assert labels[:2] == ["embed", "pos_embed"]
    assert labels[2:2 + CFG.n_head + 2] == ["L0H0", "L0H1", "L0H2", "L0.b_O", "L0.mlp"]
    assert (layers[labels.index("L2H1")], heads[labels.index("L2H1")]) == (2, 1)
    assert (layers[labels.index("L1.mlp")], heads[labels.index("L1.mlp")]) == (1, None)


@settings(max_examples=4)
@given(seed=seeds)
def test_components_sum_to_the_final_residual(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    labels, vectors = residual_decomposition(params, CFG, tokens)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    assert vectors.shape == (len(labels), *tokens.shape, CFG.d_model)
    np.testing.assert_allclose(vectors.sum(0), trace.resid_post[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(vectors[0], trace.embed)


@settings(max_examples=8)
@given(seed=seeds, target=tokens_ids, baseline=st.none() | tokens_ids, position=positions)
def test_contributions_plus_bias_term_are_the_logit(seed, target, baseline, position):
    params, tokens = random_params(seed), random_tokens(seed)
    result = direct_logit_attribution(params, CFG, tokens, target, baseline=baseline, position=position)
    logits = np.asarray(tinygpt.forward(params, tokens, CFG, keep=KEEP).logits[:, position], np.float64)
    expected = logits[:, target] - (0.0 if baseline is None else logits[:, baseline])
    np.testing.assert_allclose(result.logit, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.contributions.sum(0) + result.bias_term, expected, rtol=1e-4, atol=1e-4)
    # the bias term is the final LayerNorm's bias read by the unembedding, and nothing else
    wte, lnf_b = np.asarray(params["wte"], np.float64), np.asarray(params["lnf_b"], np.float64)
    direction = wte[target] - (0.0 if baseline is None else wte[baseline])
    np.testing.assert_allclose(result.bias_term, lnf_b @ direction, rtol=1e-5, atol=1e-5)


@settings(max_examples=4)
@given(seed=seeds, target=tokens_ids)
def test_each_contribution_is_its_centered_vector_over_the_frozen_scale(seed, target):
    params, tokens = random_params(seed), random_tokens(seed)
    result = direct_logit_attribution(params, CFG, tokens, target)
    labels, vectors = residual_decomposition(params, CFG, tokens)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    scale = np.asarray(trace.ln_final_scale[:, -1, 0], np.float64)  # [batch]
    np.testing.assert_allclose(result.ln_final_scale, scale, rtol=1e-5)
    c = np.asarray(vectors[:, :, -1], np.float64)  # [component, batch, d_model]
    c = c - c.mean(-1, keepdims=True)
    direction = np.asarray(params["lnf_w"], np.float64) * np.asarray(params["wte"], np.float64)[target]
    np.testing.assert_allclose(result.contributions, c @ direction / scale, rtol=1e-4, atol=1e-5)


@settings(max_examples=4)
@given(seed=seeds, layer=st.integers(0, CFG.n_layer - 1), target=tokens_ids, baseline=tokens_ids)
def test_neurons_sum_to_their_mlps_contribution(seed, layer, target, baseline):
    params, tokens = random_params(seed), random_tokens(seed)
    neurons = neuron_attribution(params, CFG, tokens, layer, target, baseline=baseline)
    assert neurons.neurons.shape == (CFG.d_mlp, tokens.shape[0])
    np.testing.assert_allclose(neurons.neurons.sum(0) + neurons.bias, neurons.total, rtol=1e-4, atol=1e-4)
    dla = direct_logit_attribution(params, CFG, tokens, target, baseline=baseline)
    np.testing.assert_allclose(neurons.total, dla.contributions[dla.labels.index(f"L{layer}.mlp")], rtol=1e-4,
                               atol=1e-5)
    mlp_post = tinygpt.forward(params, tokens, CFG, keep=KEEP).mlp_post[layer][:, -1]
    np.testing.assert_allclose(neurons.activations, np.asarray(mlp_post).T, rtol=1e-5, atol=1e-6)


def test_folded_params_give_the_same_attribution():
    params, tokens = random_params(7), random_tokens(7)
    folded = transforms.fold_layer_norm(params)
    original = direct_logit_attribution(params, CFG, tokens, 11, baseline=4)
    after = direct_logit_attribution(folded, CFG, tokens, 11, baseline=4)
    np.testing.assert_allclose(after.contributions, original.contributions, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(after.bias_term, original.bias_term, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after.logit, original.logit, rtol=1e-4, atol=1e-4)


def test_a_position_or_token_out_of_range_is_named():
    """Inside jit an out-of-range index is clamped: position SEQ would silently read position SEQ - 1."""
    import pytest

    params, tokens = random_params(8), random_tokens(8)
    for call in (lambda **kw: direct_logit_attribution(params, CFG, tokens, **kw),
                 lambda **kw: neuron_attribution(params, CFG, tokens, 0, **kw)):
        with pytest.raises(ValueError, match=f"position {SEQ} is outside a sequence of {SEQ} tokens"):
            call(target=3, position=SEQ)
        with pytest.raises(ValueError, match=f"position {-SEQ - 1} is outside"):
            call(target=3, position=-SEQ - 1)
        with pytest.raises(ValueError, match=f"target token id {CFG.vocab_size} is outside the vocabulary"):
            call(target=CFG.vocab_size)
        with pytest.raises(ValueError, match="baseline token id -1 is outside"):
            call(target=3, baseline=-1)
