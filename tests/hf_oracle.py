"""Helpers for tests that use Hugging Face transformers as the oracle (imported only by those tests)."""

from __future__ import annotations

import numpy as np


def make_hf_checkpoint(directory, *, n_layer, n_head, n_embd, n_positions, vocab_size, n_inner=None, seed=0,
                       init_std=0.2):
    """Write a random-weight GPT2LMHeadModel with `save_pretrained` (official names, Conv1D layout).

    Weights use a larger init than GPT-2's (std `init_std`, random LayerNorm params and biases) so that
    attention patterns are far from uniform and every parameter matters to the outputs."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size,
        n_inner=n_inner, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_eager(directory):
    """The checkpoint loaded by transformers with eager attention (so attention patterns are returned)."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
    model.eval()
    return model


def hf_outputs(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None):
    """logits [batch, seq, vocab], hidden_states (n_layer + 1) x [batch, seq, d_model], attentions n_layer x
    [batch, head, seq, key], all as numpy float32."""
    import torch

    with torch.no_grad():
        out = model(
            torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
            output_hidden_states=True,
            output_attentions=True,
        )
    return (
        out.logits.float().numpy(),
        [h.float().numpy() for h in out.hidden_states],
        [a.float().numpy() for a in out.attentions],
    )
