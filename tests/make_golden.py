"""Write the committed golden file: a tiny random GPT-2 checkpoint and Hugging Face's outputs on it.

    python tests/make_golden.py        # needs torch + transformers; rewrites tests/golden/tiny/

The checkpoint is written by `transformers.GPT2LMHeadModel(GPT2Config(...)).save_pretrained` (official names,
Conv1D layout); outputs.npz holds HF's logits, hidden_states, attentions (eager attention) on fixed tokens,
HF's logits on a left-padded batch (with the position ids HF's generate uses), and HF's greedy
continuation. tests/test_golden.py checks tinygpt against these without needing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_oracle import hf_eager, hf_outputs, make_hf_checkpoint  # noqa: E402

GOLDEN = HERE / "golden" / "tiny"
SHAPE = dict(n_layer=3, n_head=3, n_embd=24, n_positions=16, vocab_size=61, n_inner=40)


def main():
    import torch

    GOLDEN.mkdir(parents=True, exist_ok=True)
    make_hf_checkpoint(GOLDEN, seed=1234, init_std=0.2, **SHAPE)
    (GOLDEN / "generation_config.json").unlink(missing_ok=True)
    model = hf_eager(GOLDEN)
    rng = np.random.default_rng(1234)
    tokens = rng.integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    logits, hidden, attentions = hf_outputs(model, tokens)

    mask = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    padded = np.where(mask == 1, rng.integers(0, SHAPE["vocab_size"], mask.shape), 0)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        padded_logits = model(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask),
                              position_ids=torch.as_tensor(positions)).logits.numpy()
        prompt = tokens[:, :4]
        greedy = model.generate(torch.as_tensor(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    np.savez_compressed(
        GOLDEN / "outputs.npz",
        tokens=tokens, logits=logits, hidden_states=np.stack(hidden), attentions=np.stack(attentions),
        padded_tokens=padded, padded_mask=mask, padded_logits=padded_logits, greedy=greedy,
    )
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
