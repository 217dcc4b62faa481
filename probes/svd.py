"""Weight geometry: singular value decompositions of weight matrices, read through the (un)embedding.

In tinygpt's x @ W layout a matrix W [d_in, d_out] = U S Vt maps the input direction U[:, i] to the output
direction Vt[i], scaled by S[i]. The matrices:

    W_Q, W_K, W_V [d_model, d_head]   per head, read the residual (after ln1)
    W_O [d_head, d_model]             per head, writes the residual
    OV = W_V @ W_O [d_model, d_model]     per head: what a head copies from the position it attends to
    QK = W_Q @ W_K.T [d_model, d_model]   per head: query direction (left) x key direction (right)
    W_in [d_model, d_mlp], W_out [d_mlp, d_model]   per layer

OV and QK have rank <= d_head and are never formed: the SVD of a product A @ B (A [m, r], B [r, n]) comes
from the QR decompositions A = Qa Ra and B.T = Qb Rb, since A @ B = Qa (Ra Rb.T) Qb.T, and the SVD of the
small core Ra Rb.T [r, r] = Uc S Vct gives U = Qa Uc, Vt = Vct Qb.T.

Centring. Every side of a matrix in the residual stream (d_model) is centred before the decomposition: the
input side of W_Q, W_K, W_V, W_in, OV and both sides of QK (W - mean over d_model, per column), the output
side of W_O, W_out and OV (each row minus its mean). Every reader of the residual stream sees it through a
LayerNorm, which subtracts the mean over d_model: a matrix reads n(x) with mean 0, so n(x) @ W = n(x) @ P W
(P = I - 11^T/d_model), and what a matrix writes is next read, or unembedded, after the same subtraction, so
W and W P have the same effect. The component along the all-ones direction is invisible to the model on both
sides; left in, it would show up as singular values and directions the model cannot use. This is
TransformerLens's default processing for OV and QK circuits (`fold_ln` centres the reading weights,
`center_writing_weights` the writing ones). It is exact once the LayerNorm weights are folded in
(`probes.transforms.fold_layer_norm`, `tinygpt svd --fold-ln`); unfolded, ln_w sits between the centred
input and the matrix, and the decomposition is of the matrix alone. d_head and d_mlp sides are not centred.
Where d_model is the smaller side (W_in, W_out), the last singular value is then 0, its direction the removed
all-ones one.

Directions in the residual stream are read as tokens: an input direction u through the embedding (wte @ u:
the tokens whose embeddings it reads most), an output direction v through the unembedding (v @ (lnf_w *
W_U): the logits it raises most). Both are centred (a no-op for the singular vectors, which are already), so
the embedding is read as LayerNorm passes it on: wte @ P u = (wte P) @ u. Singular vectors have arbitrary
signs (U[:, i] and Vt[i] flip together), so both ends of each direction are shown.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.errors import InputError

from .transforms import center, unembedding_matrix

f32 = jnp.float32

#: name -> (per head?, space of the input side, space of the output side)
MATRICES = {
    "W_Q": (True, "d_model", "d_head"),
    "W_K": (True, "d_model", "d_head"),
    "W_V": (True, "d_model", "d_head"),
    "W_O": (True, "d_head", "d_model"),
    "OV": (True, "d_model", "d_model"),
    "QK": (True, "d_model", "d_model"),
    "W_in": (False, "d_model", "d_mlp"),
    "W_out": (False, "d_mlp", "d_model"),
}


def factored_svd(A, B):
    """SVD of A @ B without forming it.  A [m, r], B [r, n] (r <= m, n) -> U [m, r], S [r], Vt [r, n]"""
    Qa, Ra = jnp.linalg.qr(A)  # [m, r], [r, r]
    Qb, Rb = jnp.linalg.qr(B.T)  # [n, r], [r, r]
    Uc, S, Vct = jnp.linalg.svd(Ra @ Rb.T)  # the core [r, r]
    return Qa @ Uc, S, Vct @ Qb.T


def dense_svd(W):
    """Reduced SVD.  W [m, n] -> U [m, k], S [k], Vt [k, n] with k = min(m, n)"""
    return jnp.linalg.svd(W, full_matrices=False)


def check_matrix(config: Config, name: str, layer: int, head: int | None) -> None:
    if name not in MATRICES:
        raise InputError(f"unknown matrix {name!r}; choose one of {', '.join(MATRICES)}")
    if not 0 <= layer < config.n_layer:
        raise InputError(f"layer {layer} is out of range: the model has {config.n_layer} layers (0-based)")
    per_head = MATRICES[name][0]
    if per_head and head is not None and not 0 <= head < config.n_head:
        raise InputError(f"head {head} is out of range: the model has {config.n_head} heads (0-based)")
    if not per_head and head is not None:
        raise InputError(f"{name} belongs to the MLP, which has no heads: leave out the head")


READING = ("W_Q", "W_K", "W_V", "W_in")  # read the residual stream: rows in d_model
WRITING = ("W_O", "W_out")  # write it: columns in d_model


def centred_matrices(blocks) -> dict:
    """One block's matrices with their d_model sides centred (see the module doc): the reading matrices minus
    their mean over d_model (axis -2), the writing ones minus their mean over d_model (axis -1)."""
    out = {name: blocks[name] - blocks[name].mean(axis=-2, keepdims=True) for name in READING}
    out.update({name: center(blocks[name]) for name in WRITING})
    return out


def layer_svd(params, name: str, layer: int):
    """SVD of matrix `name` of block `layer`, its d_model sides centred, in float32. Per-head matrices give
    every head at once, with a leading [head] axis on U, S and Vt."""
    blocks = centred_matrices(jax.tree.map(lambda x: jnp.asarray(x[layer], f32), params["blocks"]))
    if name == "OV":
        return jax.vmap(factored_svd)(blocks["W_V"], blocks["W_O"])  # [head, d_model, d_head] ...
    if name == "QK":
        return jax.vmap(factored_svd)(blocks["W_Q"], jnp.swapaxes(blocks["W_K"], -1, -2))
    if MATRICES[name][0]:
        return jax.vmap(dense_svd)(blocks[name])
    return dense_svd(blocks[name])


@displayable
@dataclasses.dataclass
class WeightSVD:
    name: str
    layer: int
    head: int | None
    U: np.ndarray  # [d_in, rank] input directions (columns)
    S: np.ndarray  # [rank] singular values, largest first
    Vt: np.ndarray  # [rank, d_out] output directions (rows)
    input_space: str  # "d_model", "d_head" or "d_mlp"
    output_space: str


def weight_svd(params, config: Config, name: str, layer: int, head: int | None = None) -> WeightSVD:
    """The SVD of one weight matrix, its d_model sides centred (one head's for per-head matrices; `head` is
    required for them)."""
    check_matrix(config, name, layer, head)
    per_head, input_space, output_space = MATRICES[name]
    if per_head and head is None:
        raise InputError(f"{name} is per head: give a head (0..{config.n_head - 1})")
    U, S, Vt = layer_svd(params, name, layer)
    if per_head:
        U, S, Vt = U[head], S[head], Vt[head]
    return WeightSVD(name=name, layer=layer, head=head, U=np.asarray(U), S=np.asarray(S), Vt=np.asarray(Vt),
                     input_space=input_space, output_space=output_space)


def spectra(params, config: Config, name: str, layer: int) -> np.ndarray:
    """Singular values of matrix `name` in block `layer`: [head, rank] for per-head matrices, else [1, rank]."""
    check_matrix(config, name, layer, None)
    _, S, _ = layer_svd(params, name, layer)
    S = np.asarray(S)
    return S if MATRICES[name][0] else S[None]


# ----------------------------------------------------------------------------------- reading as tokens


def embedding_scores(params, direction):
    """How much each token's embedding, centred as LayerNorm passes it on, points along a residual direction:
    wte @ centred u.  [d_model] -> [vocab]"""
    return jnp.asarray(params["wte"], f32) @ center(jnp.asarray(direction, f32))


def unembedding_scores(params, direction):
    """The logit change a write along the direction makes (per unit, before 1/ln_final_scale):
    centred v @ (lnf_w * W_U).  [d_model] -> [vocab]"""
    return center(jnp.asarray(direction, f32)) @ unembedding_matrix(params)


def top_tokens(scores, k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the k highest-scoring tokens, the k lowest), as (id, score) pairs, most extreme first."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    return ([(int(t), float(scores[t])) for t in order[:k]],
            [(int(t), float(scores[t])) for t in order[::-1][:k]])


def read_direction(params, direction, space: str, reader: str, k: int):
    """Top tokens of a residual-stream direction, through the embedding ("in") or unembedding ("out");
    None for directions that do not live in d_model."""
    if space != "d_model":
        return None
    scores = embedding_scores(params, direction) if reader == "in" else unembedding_scores(params, direction)
    positive, negative = top_tokens(scores, k)
    return {"positive": positive, "negative": negative}


def singular_tokens(params, svd: WeightSVD, n_vectors: int = 5, k: int = 5) -> list[dict]:
    """For the first `n_vectors` singular pairs: the singular value, and the top tokens of the input
    direction (through the embedding) and of the output direction (through the unembedding; for QK both
    sides read the residual, so the key side goes through the embedding too)."""
    output_reader = "in" if svd.name == "QK" else "out"
    rows = []
    for i in range(min(n_vectors, len(svd.S))):
        rows.append({
            "index": i,
            "singular_value": float(svd.S[i]),
            "input": read_direction(params, svd.U[:, i], svd.input_space, "in", k),
            "output": read_direction(params, svd.Vt[i], svd.output_space, output_reader, k),
        })
    return rows
