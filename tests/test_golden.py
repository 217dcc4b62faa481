"""tinygpt against Hugging Face's outputs stored in tests/golden/tiny (see tests/make_golden.py): runs
without torch, so parity is checked everywhere."""

from __future__ import annotations

import numpy as np
import pytest

import tinygpt
from conftest import GOLDEN_DIR

TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    directory = GOLDEN_DIR / "tiny"
    return tinygpt.load(directory), dict(np.load(directory / "outputs.npz"))


def test_logits_hidden_states_attentions(golden):
    model, ref = golden
    trace = model(ref["tokens"])
    np.testing.assert_allclose(trace.logits, ref["logits"], atol=TOL, rtol=0)
    n_layer = model.config.n_layer
    np.testing.assert_allclose(trace.resid_pre, ref["hidden_states"][:n_layer], atol=TOL, rtol=0)
    np.testing.assert_allclose(trace.ln_final, ref["hidden_states"][n_layer], atol=TOL, rtol=0)
    np.testing.assert_allclose(trace.attn_pattern, ref["attentions"], atol=TOL, rtol=0)


def test_left_padded_logits(golden):
    model, ref = golden
    logits = np.asarray(model(ref["padded_tokens"], attention_mask=ref["padded_mask"]).logits)
    real = ref["padded_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], ref["padded_logits"][real], atol=TOL, rtol=0)


def test_greedy_continuation(golden):
    model, ref = golden
    # a full forward per new token, on a fixed-width buffer (causality: the unfilled tail cannot matter)
    tokens = np.zeros_like(ref["greedy"])
    tokens[:, :4] = ref["greedy"][:, :4]
    for t in range(4, tokens.shape[1]):
        tokens[:, t] = np.asarray(model(tokens, keep="logits").logits[:, t - 1].argmax(-1))
    np.testing.assert_array_equal(tokens, ref["greedy"])
    generated = tinygpt.generate(model.params, model.config, ref["greedy"][:, :4], tokens.shape[1] - 4,
                                 temperature=0)
    np.testing.assert_array_equal(generated.sequences, ref["greedy"])


def test_golden_file_is_not_trivial(golden):
    """The stored outputs discriminate: a model with one weight perturbed disagrees with them."""
    model, ref = golden
    params = dict(model.params, blocks=dict(model.params["blocks"]))
    params["blocks"]["W_V"] = params["blocks"]["W_V"].at[1, 2, 0, 0].add(0.5)
    logits = tinygpt.forward(params, ref["tokens"], model.config).logits
    assert np.abs(np.asarray(logits) - ref["logits"]).max() > 10 * TOL
