"""Parity with Hugging Face transformers' GPT2LMHeadModel on random checkpoints written by save_pretrained:
logits, every hidden state and every attention pattern within 1e-4 (float32), and greedy continuations
identical."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is the oracle for HF parity (golden-file tests run without it)")
pytest.importorskip("transformers", reason="transformers is the oracle for HF parity")

import tinygpt  # noqa: E402
from hf_oracle import hf_eager, hf_outputs, make_hf_checkpoint  # noqa: E402

TOL = 1e-4

SHAPES = {
    # the odd one: 3 heads, d_model 96, 5 layers, context 37, vocab 1000
    "odd": dict(n_layer=5, n_head=3, n_embd=96, n_positions=37, vocab_size=1000),
    "square": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=512),
    "one_head": dict(n_layer=1, n_head=1, n_embd=32, n_positions=16, vocab_size=97, n_inner=50),
    "narrow_mlp": dict(n_layer=3, n_head=2, n_embd=48, n_positions=24, vocab_size=300, n_inner=100),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(directory, seed=len(request.param), init_std=0.1, **SHAPES[request.param])
    return request.param, directory, hf_eager(directory), tinygpt.load(directory)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_logits_hidden_states_attentions(checkpoint):
    name, _, hf, model = checkpoint
    cfg = model.config
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, cfg.n_ctx))  # full context
    logits, hidden, attentions = hf_outputs(hf, tokens)
    trace = model(tokens)
    assert max_diff(trace.logits, logits) < TOL, name
    assert len(hidden) == cfg.n_layer + 1 and len(attentions) == cfg.n_layer
    for layer in range(cfg.n_layer):  # HF's hidden_states[i] is the input of block i ...
        assert max_diff(trace.resid_pre[layer], hidden[layer]) < TOL, (name, layer)
        assert max_diff(trace.attn_pattern[layer], attentions[layer]) < TOL, (name, layer)
    # ... and its last entry has the final LayerNorm applied
    assert max_diff(trace.ln_final, hidden[-1]) < TOL, name


def test_left_padded_batch_matches_hf_at_real_positions(checkpoint):
    """HF with attention_mask and the matching position_ids (as its generate() computes them)."""
    import torch

    name, _, hf, model = checkpoint
    cfg = model.config
    rng = np.random.default_rng(2)
    seq = min(cfg.n_ctx, 12)
    lengths = [seq, seq - 3, 1]
    tokens = np.full((3, seq), 7)
    mask = np.zeros((3, seq), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, seq - n:] = rng.integers(0, cfg.vocab_size, n)
        mask[i, seq - n:] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions)).logits.numpy()
    ours = np.asarray(model(tokens, attention_mask=mask).logits)
    for i, n in enumerate(lengths):
        assert max_diff(ours[i, seq - n:], ref[i, seq - n:]) < TOL, (name, i)


def test_greedy_continuation_identical(checkpoint):
    """Greedy decoding by repeated full forwards picks the same tokens as HF's generate."""
    import torch

    name, _, hf, model = checkpoint
    cfg = model.config
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 4))
    n_new = min(8, cfg.n_ctx - 4)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=n_new, do_sample=False,
                          attention_mask=torch.ones(prompt.shape, dtype=torch.long), pad_token_id=0).numpy()
    tokens = np.zeros((2, 4 + n_new), np.int64)
    tokens[:, :4] = prompt
    for t in range(4, 4 + n_new):  # fixed-width buffer: causality makes the unfilled tail irrelevant
        tokens[:, t] = np.asarray(model(tokens, keep="logits").logits[:, t - 1].argmax(-1))
    np.testing.assert_array_equal(tokens, ref, err_msg=name)
    cached = tinygpt.generate(model.params, model.config, prompt, n_new, temperature=0)
    np.testing.assert_array_equal(cached.sequences, ref, err_msg=name)
