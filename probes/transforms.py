"""Explicit, optional weight transforms that leave the model's function unchanged, for reading weights.

GPT-2 ties its unembedding to the token embedding (logits = ln_final @ wte.T). Both transforms below need
the unembedding as a matrix of its own, so they first *untie* it: the returned params carry

    W_U [d_model, vocab]   the unembedding (initially wte.T, a copy)
    b_U [vocab]            its bias (initially zero)

next to the engine's keys. The engine unembeds through them whenever params carry them
(`tinygpt.model.unembed`), so `tinygpt.forward`, `generate`, the sweeps and every probe run transformed
params as they are.

fold_layer_norm
    A LayerNorm is ln(x) = n(x) * w + b with n(x) = (x - mean(x)) / sqrt(var(x) + eps). Whatever reads
    ln(x) through a matrix W and bias c sees

        ln(x) @ W + c = n(x) @ (w[:, None] * W) + (b @ W + c)

    so w and b fold into the reading weights and LayerNorm becomes pure normalisation (w = 1, b = 0):
    ln1 into W_Q, W_K, W_V (and b_Q, b_K, b_V), ln2 into W_in (and b_in), ln_f into W_U (and b_U).
    Every value after the reading matrices (q, k, v, mlp_pre, logits, ...) is unchanged; the LayerNorm
    output sites (ln1, ln2, ln_final) now hold n(x).

center_writing_weights
    Subtract the mean over d_model from every vector written into the residual stream: the rows of wte and
    wpe, W_O, b_O, W_out and b_out. The residual stream then has zero mean at every position; every reader
    sees it only through a LayerNorm, which subtracts the mean anyway, so every LayerNorm output, and
    therefore the logits, are unchanged. (The residual sites themselves change by their mean.) The
    unembedding is untied first, so centering the embedding does not move the logits.

center_unembedding
    Subtract the mean over vocab from W_U (and b_U): every logit at a position shifts by the same amount
    (the documented shift: minus the mean logit of the original model at that position), so
    probabilities and log-probabilities are unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from tinygpt.params import Params

f32 = jnp.float32


def untie_unembedding(params: Params) -> Params:
    """Params with an explicit unembedding W_U = wte.T [d_model, vocab] and b_U = 0 [vocab] (unchanged if
    they already have one)."""
    if "W_U" in params:
        return params
    W_U = jnp.asarray(params["wte"]).T  # [d_model, vocab]
    b_U = jnp.zeros(W_U.shape[1], W_U.dtype)  # [vocab]
    return {**params, "W_U": W_U, "b_U": b_U}


def unembedding_weight(params: Params) -> jnp.ndarray:
    """The unembedding as a matrix [d_model, vocab]: W_U where params carry one, else wte.T."""
    return params["W_U"] if "W_U" in params else jnp.asarray(params["wte"]).T


def unembedding_matrix(params: Params) -> jnp.ndarray:
    """The map from the normalised final residual n(x) to the logits, without bias: lnf_w[:, None] * W_U,
    in float32 [d_model, vocab]. The same for original params (W_U = wte.T) and folded ones (lnf_w = 1).
    Reading a residual direction through it gives that direction's direct effect on every logit, up to the
    positive factor 1 / ln_final_scale."""
    W_U = unembedding_weight(params)  # [d_model, vocab]
    return params["lnf_w"].astype(f32)[:, None] * W_U.astype(f32)


def unembedding_bias(params: Params) -> jnp.ndarray:
    """The logits' constant part, lnf_b @ W_U + b_U, in float32 [vocab]: what the final LayerNorm's bias
    (and an explicit b_U) adds to every logit whatever the residual."""
    W_U = unembedding_weight(params)  # [d_model, vocab]
    b_U = params["b_U"].astype(f32) if "b_U" in params else 0.0
    return params["lnf_b"].astype(f32) @ W_U.astype(f32) + b_U


def fold_layer_norm(params: Params) -> Params:
    """Fold every LayerNorm's weight and bias into the matrices that read its output (see the module doc).
    Returns untied params with ln1_w = ln2_w = lnf_w = 1 and ln1_b = ln2_b = lnf_b = 0."""
    params = untie_unembedding(params)
    blocks = dict(params["blocks"])
    ln1_w, ln1_b = blocks["ln1_w"], blocks["ln1_b"]  # [layer, d_model]
    for name in ("Q", "K", "V"):
        W = blocks[f"W_{name}"]  # [layer, head, d_model, d_head]
        blocks[f"b_{name}"] = blocks[f"b_{name}"] + jnp.einsum("lm,lhmd->lhd", ln1_b, W)  # [layer, head, d_head]
        blocks[f"W_{name}"] = ln1_w[:, None, :, None] * W
    ln2_w, ln2_b = blocks["ln2_w"], blocks["ln2_b"]  # [layer, d_model]
    blocks["b_in"] = blocks["b_in"] + jnp.einsum("lm,lmf->lf", ln2_b, blocks["W_in"])  # [layer, d_mlp]
    blocks["W_in"] = ln2_w[:, :, None] * blocks["W_in"]  # [layer, d_model, d_mlp]
    for name in ("ln1_w", "ln2_w"):
        blocks[name] = jnp.ones_like(blocks[name])
    for name in ("ln1_b", "ln2_b"):
        blocks[name] = jnp.zeros_like(blocks[name])

    lnf_w, lnf_b, W_U = params["lnf_w"], params["lnf_b"], params["W_U"]
    return {
        **params,
        "blocks": blocks,
        "W_U": lnf_w[:, None] * W_U,  # [d_model, vocab]
        "b_U": params["b_U"] + lnf_b @ W_U,  # [vocab]
        "lnf_w": jnp.ones_like(lnf_w),
        "lnf_b": jnp.zeros_like(lnf_b),
    }


def center(x):
    """x minus its mean over the last axis (d_model)."""
    return x - x.mean(axis=-1, keepdims=True)


def center_writing_weights(params: Params) -> Params:
    """Remove the mean over d_model from everything written into the residual stream (wte, wpe, W_O, b_O,
    W_out, b_out). Untied first, so the unembedding keeps the original wte."""
    params = untie_unembedding(params)
    blocks = dict(params["blocks"])
    for name in ("W_O", "b_O", "W_out", "b_out"):  # the last axis of each is d_model
        blocks[name] = center(blocks[name])
    return {**params, "blocks": blocks, "wte": center(params["wte"]), "wpe": center(params["wpe"])}


def center_unembedding(params: Params) -> Params:
    """Remove the mean over vocab from W_U and b_U: each position's logits all shift by one constant."""
    params = untie_unembedding(params)
    W_U, b_U = params["W_U"], params["b_U"]
    return {**params, "W_U": W_U - W_U.mean(axis=-1, keepdims=True), "b_U": b_U - b_U.mean()}
