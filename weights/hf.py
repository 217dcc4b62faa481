"""Hugging Face GPT-2 tensor names and layout  <->  tinygpt's params pytree.

Official GPT-2 checkpoints store (Conv1D, so already in `x @ W` layout), for each block i:

    h.{i}.ln_1.weight / bias                [d_model]
    h.{i}.attn.c_attn.weight                [d_model, 3 * d_model]   (q | k | v, heads contiguous)
    h.{i}.attn.c_attn.bias                  [3 * d_model]
    h.{i}.attn.c_proj.weight / bias         [d_model, d_model] / [d_model]
    h.{i}.ln_2.weight / bias                [d_model]
    h.{i}.mlp.c_fc.weight / bias            [d_model, d_mlp] / [d_mlp]
    h.{i}.mlp.c_proj.weight / bias          [d_mlp, d_model] / [d_model]

plus wte.weight [vocab, d_model], wpe.weight [n_ctx, d_model], ln_f.weight / bias. Names carry a
`transformer.` prefix when saved from GPT2LMHeadModel; `lm_head.weight` (tied to wte) and the
`attn.bias` / `attn.masked_bias` buffers are ignored.
"""

from __future__ import annotations

import numpy as np

from tinygpt.config import Config

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
IGNORED_NAMES = ("lm_head.weight",)


def expected_tensors(config: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name (without prefix) a GPT-2 checkpoint of this config must hold, with its shape."""
    D, M = config.d_model, config.d_mlp
    shapes = {
        "wte.weight": (config.vocab_size, D),
        "wpe.weight": (config.n_ctx, D),
        "ln_f.weight": (D,),
        "ln_f.bias": (D,),
    }
    for i in range(config.n_layer):
        shapes.update(
            {
                f"h.{i}.ln_1.weight": (D,),
                f"h.{i}.ln_1.bias": (D,),
                f"h.{i}.attn.c_attn.weight": (D, 3 * D),
                f"h.{i}.attn.c_attn.bias": (3 * D,),
                f"h.{i}.attn.c_proj.weight": (D, D),
                f"h.{i}.attn.c_proj.bias": (D,),
                f"h.{i}.ln_2.weight": (D,),
                f"h.{i}.ln_2.bias": (D,),
                f"h.{i}.mlp.c_fc.weight": (D, M),
                f"h.{i}.mlp.c_fc.bias": (M,),
                f"h.{i}.mlp.c_proj.weight": (M, D),
                f"h.{i}.mlp.c_proj.bias": (D,),
            }
        )
    return shapes


def strip_prefix(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def is_ignored(name: str) -> bool:
    return name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


# Per-block conversion: one HF block's tensors -> the tinygpt per-layer arrays (no layer axis), and back.


def block_from_hf(get, i: int, config: Config) -> dict[str, np.ndarray]:
    """`get(name)` returns the numpy tensor of HF name `name` (unprefixed). Returns one layer's params."""
    H, D, Dh = config.n_head, config.d_model, config.d_head
    c_attn_w = get(f"h.{i}.attn.c_attn.weight")  # [d_model, 3 * d_model]
    c_attn_b = get(f"h.{i}.attn.c_attn.bias")  # [3 * d_model]
    # [d_model, (qkv, head, d_head)] -> [qkv, head, d_model, d_head]
    W_qkv = c_attn_w.reshape(D, 3, H, Dh).transpose(1, 2, 0, 3)
    b_qkv = c_attn_b.reshape(3, H, Dh)
    return {
        "ln1_w": get(f"h.{i}.ln_1.weight"),
        "ln1_b": get(f"h.{i}.ln_1.bias"),
        "W_Q": W_qkv[0],
        "b_Q": b_qkv[0],
        "W_K": W_qkv[1],
        "b_K": b_qkv[1],
        "W_V": W_qkv[2],
        "b_V": b_qkv[2],
        "W_O": get(f"h.{i}.attn.c_proj.weight").reshape(H, Dh, D),  # rows are (head, d_head)
        "b_O": get(f"h.{i}.attn.c_proj.bias"),
        "ln2_w": get(f"h.{i}.ln_2.weight"),
        "ln2_b": get(f"h.{i}.ln_2.bias"),
        "W_in": get(f"h.{i}.mlp.c_fc.weight"),
        "b_in": get(f"h.{i}.mlp.c_fc.bias"),
        "W_out": get(f"h.{i}.mlp.c_proj.weight"),
        "b_out": get(f"h.{i}.mlp.c_proj.bias"),
    }


def block_to_hf(p: dict[str, np.ndarray], i: int, config: Config) -> dict[str, np.ndarray]:
    """Inverse of `block_from_hf`: one layer's params (no layer axis) -> HF tensors (unprefixed)."""
    H, D, Dh = config.n_head, config.d_model, config.d_head
    W_qkv = np.stack([p["W_Q"], p["W_K"], p["W_V"]])  # [3, head, d_model, d_head]
    b_qkv = np.stack([p["b_Q"], p["b_K"], p["b_V"]])  # [3, head, d_head]
    return {
        f"h.{i}.ln_1.weight": p["ln1_w"],
        f"h.{i}.ln_1.bias": p["ln1_b"],
        f"h.{i}.attn.c_attn.weight": W_qkv.transpose(2, 0, 1, 3).reshape(D, 3 * D),
        f"h.{i}.attn.c_attn.bias": b_qkv.reshape(3 * D),
        f"h.{i}.attn.c_proj.weight": p["W_O"].reshape(H * Dh, D),
        f"h.{i}.attn.c_proj.bias": p["b_O"],
        f"h.{i}.ln_2.weight": p["ln2_w"],
        f"h.{i}.ln_2.bias": p["ln2_b"],
        f"h.{i}.mlp.c_fc.weight": p["W_in"],
        f"h.{i}.mlp.c_fc.bias": p["b_in"],
        f"h.{i}.mlp.c_proj.weight": p["W_out"],
        f"h.{i}.mlp.c_proj.bias": p["b_out"],
    }


GLOBAL_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "lnf_w": "ln_f.weight", "lnf_b": "ln_f.bias"}
