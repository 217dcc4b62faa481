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
`transformer.` prefix when saved from GPT2LMHeadModel; the `h.{i}.attn.bias` / `attn.masked_bias` buffers
(causal masks, not weights) are ignored, and `lm_head.weight`, when present, must equal wte (GPT-2 ties them).
Any other name is unexpected.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from tinygpt.config import Config

IGNORED_BUFFERS = ("attn.bias", "attn.masked_bias")  # per block: the causal mask and its fill value
LM_HEAD = "lm_head.weight"  # the unembedding; tied to wte in GPT-2

_BLOCK_NAME = re.compile(r"h\.(0|[1-9][0-9]*)\.(.+)")


def expected_block_tensors(config: Config) -> dict[str, tuple[int, ...]]:
    """The tensors of one block (names after `h.{i}.`), with their shapes."""
    D, M = config.d_model, config.d_mlp
    return {
        "ln_1.weight": (D,),
        "ln_1.bias": (D,),
        "attn.c_attn.weight": (D, 3 * D),
        "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D),
        "attn.c_proj.bias": (D,),
        "ln_2.weight": (D,),
        "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, M),
        "mlp.c_fc.bias": (M,),
        "mlp.c_proj.weight": (M, D),
        "mlp.c_proj.bias": (D,),
    }


def global_tensors(config: Config) -> dict[str, tuple[int, ...]]:
    """The tensors outside the blocks, with their shapes."""
    D = config.d_model
    return {"wte.weight": (config.vocab_size, D), "wpe.weight": (config.n_ctx, D), "ln_f.weight": (D,),
            "ln_f.bias": (D,)}


def n_tensors(config: Config) -> int:
    """How many tensors a GPT-2 checkpoint of this config holds (buffers and lm_head not counted)."""
    return 4 + 12 * config.n_layer


def tensor_names(config: Config) -> Iterator[str]:
    """Every tensor name (without prefix) a GPT-2 checkpoint of this config must hold, in file order; a
    generator, so a config.json with n_layer 1e9 costs nothing until the names are asked for."""
    yield from global_tensors(config)
    for i in range(config.n_layer):
        for name in expected_block_tensors(config):
            yield f"h.{i}.{name}"


def layer_of(name: str) -> int | None:
    """i for a name `h.{i}.*` (unprefixed), else None."""
    match = _BLOCK_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def expected_shape(name: str, config: Config) -> tuple[int, ...] | None:
    """The shape of tensor `name` (unprefixed) in a checkpoint of this config, or None if such a checkpoint
    has no tensor of that name. Constant time: nothing is enumerated."""
    if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        return global_tensors(config)[name]
    match = _BLOCK_NAME.fullmatch(name)
    if match and int(match.group(1)) < config.n_layer:
        return expected_block_tensors(config).get(match.group(2))
    return None


def strip_prefix(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def is_ignored_buffer(name: str, config: Config) -> bool:
    """`h.{i}.attn.bias` / `h.{i}.attn.masked_bias` (unprefixed) of a block this config has."""
    match = _BLOCK_NAME.fullmatch(name)
    return bool(match) and int(match.group(1)) < config.n_layer and match.group(2) in IGNORED_BUFFERS


# Per-block conversion: one HF block's tensors <-> the tinygpt per-layer arrays (no layer axis).

# HF block tensors (after `h.{i}.`) that hold exactly one tinygpt parameter's values in the same order (a
# reshape at most: c_proj's rows are (head, d_head), so it is W_O [head, d_head, d_model] as it stands).
# Only c_attn needs more: it is split into W_Q/W_K/W_V and b_Q/b_K/b_V (see `split_qkv`).
BLOCK_NAMES = {
    "ln_1.weight": "ln1_w",
    "ln_1.bias": "ln1_b",
    "attn.c_proj.weight": "W_O",
    "attn.c_proj.bias": "b_O",
    "ln_2.weight": "ln2_w",
    "ln_2.bias": "ln2_b",
    "mlp.c_fc.weight": "W_in",
    "mlp.c_fc.bias": "b_in",
    "mlp.c_proj.weight": "W_out",
    "mlp.c_proj.bias": "b_out",
}


def split_qkv(c_attn_w: np.ndarray, c_attn_b: np.ndarray, config: Config) -> dict[str, np.ndarray]:
    """c_attn's weight [d_model, 3 * d_model] and bias [3 * d_model] -> W_Q/W_K/W_V [head, d_model, d_head]
    and b_Q/b_K/b_V [head, d_head] (views)."""
    H, D, Dh = config.n_head, config.d_model, config.d_head
    # [d_model, (qkv, head, d_head)] -> [qkv, head, d_model, d_head]
    W_qkv = c_attn_w.reshape(D, 3, H, Dh).transpose(1, 2, 0, 3)
    b_qkv = c_attn_b.reshape(3, H, Dh)
    return {"W_Q": W_qkv[0], "W_K": W_qkv[1], "W_V": W_qkv[2], "b_Q": b_qkv[0], "b_K": b_qkv[1], "b_V": b_qkv[2]}


def block_to_hf(p: dict[str, np.ndarray], i: int, config: Config) -> dict[str, np.ndarray]:
    """One layer's params (no layer axis) -> HF tensors (unprefixed): the inverse of reading a block through
    `BLOCK_NAMES` and `split_qkv`."""
    D = config.d_model
    W_qkv = np.stack([p["W_Q"], p["W_K"], p["W_V"]])  # [3, head, d_model, d_head]
    b_qkv = np.stack([p["b_Q"], p["b_K"], p["b_V"]])  # [3, head, d_head]
    shapes = expected_block_tensors(config)
    out = {f"h.{i}.{theirs}": p[ours].reshape(shapes[theirs]) for theirs, ours in BLOCK_NAMES.items()}
    out[f"h.{i}.attn.c_attn.weight"] = W_qkv.transpose(2, 0, 1, 3).reshape(D, 3 * D)
    out[f"h.{i}.attn.c_attn.bias"] = b_qkv.reshape(3 * D)
    return out


GLOBAL_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "lnf_w": "ln_f.weight", "lnf_b": "ln_f.bias"}

# tinygpt's block parameter -> the HF block tensor (after `h.{i}.`) its values come from
SOURCE_OF = {ours: theirs for theirs, ours in BLOCK_NAMES.items()} | {
    "W_Q": "attn.c_attn.weight", "W_K": "attn.c_attn.weight", "W_V": "attn.c_attn.weight",
    "b_Q": "attn.c_attn.bias", "b_K": "attn.c_attn.bias", "b_V": "attn.c_attn.bias",
}
