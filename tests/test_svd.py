"""Weight SVDs: the factored SVD of a product equals the SVD of the formed product; every matrix's SVD
reconstructs it with its d_model sides centred (LayerNorm makes the mean over d_model invisible, on the input
side as on the output side), so a mean component added to a matrix changes neither its SVD nor its token
readings, nor the folded model's logits; singular directions are read through the (un)embedding as documented."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from probes import svd
from probes.transforms import fold_layer_norm
from test_lens import CFG, random_params, random_tokens, seeds


@settings(max_examples=8)
@given(seed=seeds, shape=st.sampled_from([(12, 4, 9), (5, 1, 10)]))  # few shapes: each compiles once
def test_factored_svd_is_the_svd_of_the_product(seed, shape):
    m, r, n = shape
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, r)).astype(np.float32)
    B = rng.standard_normal((r, n)).astype(np.float32)
    U, S, Vt = (np.asarray(x, np.float64) for x in svd.factored_svd(A, B))
    assert U.shape == (m, r) and S.shape == (r,) and Vt.shape == (r, n)
    product = A.astype(np.float64) @ B
    np.testing.assert_allclose((U * S) @ Vt, product, rtol=1e-4, atol=1e-4 * np.abs(product).max())
    np.testing.assert_allclose(S, np.linalg.svd(product, compute_uv=False)[:r], rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(S) <= 1e-6)  # largest first
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(r), atol=1e-5)


def read_centred(W):
    """A matrix reading the residual stream [..., d_model, d_out] minus its mean over d_model."""
    return W - W.mean(axis=-2, keepdims=True)


def write_centred(W):
    """A matrix writing the residual stream [..., d_in, d_model] minus its mean over d_model."""
    return W - W.mean(axis=-1, keepdims=True)


def dense(params, name, layer, head):
    """The matrix as documented: formed in float64, its d_model sides centred."""
    b = {k: np.asarray(v[layer], np.float64) for k, v in params["blocks"].items()}
    b.update({k: read_centred(b[k]) for k in ("W_Q", "W_K", "W_V", "W_in")})
    b.update({k: write_centred(b[k]) for k in ("W_O", "W_out")})
    if name == "OV":
        return b["W_V"][head] @ b["W_O"][head]
    if name == "QK":
        return b["W_Q"][head] @ b["W_K"][head].T
    return b[name][head] if svd.MATRICES[name][0] else b[name]


@pytest.mark.parametrize("name", list(svd.MATRICES))
def test_every_matrix_is_reconstructed_from_its_svd(name):
    params = random_params(1)
    per_head = svd.MATRICES[name][0]
    layer, head = 1, (2 if per_head else None)
    result = svd.weight_svd(params, CFG, name, layer, head)
    W = dense(params, name, layer, head)
    np.testing.assert_allclose((result.U * result.S) @ result.Vt, W, rtol=1e-4, atol=1e-4 * np.abs(W).max())
    rank = min(CFG.d_head, *W.shape) if name in ("OV", "QK") else min(W.shape)
    assert result.S.shape == (rank,)
    np.testing.assert_allclose(result.S, np.linalg.svd(W, compute_uv=False)[:rank], rtol=1e-4, atol=1e-5)
    spectrum = svd.spectra(params, CFG, name, layer)
    assert spectrum.shape == ((CFG.n_head if per_head else 1), rank)
    np.testing.assert_allclose(spectrum[head if per_head else 0], result.S, rtol=1e-5)


def test_singular_directions_read_as_tokens():
    params = fold_layer_norm(random_params(2))
    result = svd.weight_svd(params, CFG, "OV", 0, 1)
    rows = svd.singular_tokens(params, result, n_vectors=2, k=3)
    assert [r["index"] for r in rows] == [0, 1]
    wte = np.asarray(params["wte"], np.float64)
    u, v = result.U[:, 0].astype(np.float64), result.Vt[0].astype(np.float64)
    input_scores = wte @ (u - u.mean())  # the embeddings as LayerNorm passes them on: centred
    assert [t for t, _ in rows[0]["input"]["positive"]] == list(np.argsort(-input_scores)[:3])
    assert [t for t, _ in rows[0]["input"]["negative"]] == list(np.argsort(input_scores)[:3])
    output_scores = (v - v.mean()) @ np.asarray(params["W_U"], np.float64)  # folded: lnf_w is inside W_U
    assert [t for t, _ in rows[0]["output"]["positive"]] == list(np.argsort(-output_scores)[:3])
    np.testing.assert_allclose([s for _, s in rows[0]["output"]["positive"]], np.sort(output_scores)[::-1][:3],
                               rtol=1e-4)
    # a d_head side has no token reading; QK's key side reads through the embedding
    w_v = svd.singular_tokens(params, svd.weight_svd(params, CFG, "W_V", 0, 0), 1, 3)[0]
    assert w_v["input"] is not None and w_v["output"] is None
    qk = svd.weight_svd(params, CFG, "QK", 0, 0)
    key_side = svd.singular_tokens(params, qk, 1, 3)[0]["output"]["positive"]
    key = qk.Vt[0].astype(np.float64)
    assert [t for t, _ in key_side] == list(np.argsort(-(wte @ (key - key.mean())))[:3])


@pytest.mark.parametrize("name", list(svd.MATRICES))
def test_d_model_sides_are_centred_so_an_invisible_mean_changes_nothing(name):
    """Adding a component along the all-ones direction to the d_model side of every matrix (W_Q, W_K, W_V,
    W_in: + 1 c^T; W_O, W_out: + c 1^T) leaves the folded model's logits unchanged, since every reader of the
    residual stream sees it through a LayerNorm; the SVDs and the tokens read from them are unchanged too, and
    the singular vectors on d_model sides have mean 0 (the input side is centred as the output side is)."""
    params = fold_layer_norm(random_params(3))
    rng = np.random.default_rng(0)
    blocks = dict(params["blocks"])
    for key in ("W_Q", "W_K", "W_V", "W_in"):  # [..., d_model, d_out]: every column shifted by a constant
        W = np.asarray(blocks[key], np.float32)
        blocks[key] = W + 0.5 * rng.standard_normal(W.shape[:-2] + (1, W.shape[-1])).astype(np.float32)
    for key in ("W_O", "W_out"):  # [..., d_in, d_model]: every row shifted by a constant
        W = np.asarray(blocks[key], np.float32)
        blocks[key] = W + 0.5 * rng.standard_normal(W.shape[:-1] + (1,)).astype(np.float32)
    shifted = {**params, "blocks": blocks}
    tokens = random_tokens(3)
    np.testing.assert_allclose(tinygpt.forward(shifted, tokens, CFG, keep=("logits",)).logits,
                               tinygpt.forward(params, tokens, CFG, keep=("logits",)).logits, rtol=1e-4, atol=1e-4)

    per_head = svd.MATRICES[name][0]
    layer, head = 1, (2 if per_head else None)
    before, after = svd.weight_svd(params, CFG, name, layer, head), svd.weight_svd(shifted, CFG, name, layer, head)
    np.testing.assert_allclose(after.S, before.S, rtol=1e-4, atol=1e-4 * before.S.max())
    n = 2  # the leading singular pairs (well separated on these weights): equal up to a shared sign
    signs = np.sign((after.U[:, :n] * before.U[:, :n]).sum(0))
    np.testing.assert_allclose(after.U[:, :n] * signs, before.U[:, :n], atol=2e-3)
    np.testing.assert_allclose(after.Vt[:n] * signs[:, None], before.Vt[:n], atol=2e-3)
    kept = after.S > 1e-4 * after.S.max()  # W_in, W_out: the last triple is the all-ones direction, S = 0
    assert kept.sum() == (len(after.S) - 1 if name in ("W_in", "W_out") else len(after.S))
    for side, vectors in (("input", after.U.T), ("output", after.Vt)):
        if getattr(after, f"{side}_space") == "d_model":
            np.testing.assert_allclose(vectors[kept].mean(axis=1), 0, atol=1e-6)
    rows = zip(svd.singular_tokens(params, before, n, 3), svd.singular_tokens(shifted, after, n, 3))
    for row_before, row_after in rows:
        for side in ("input", "output"):
            if row_before[side] is not None:
                ends = {end: [t for t, _ in row_before[side][end]] for end in ("positive", "negative")}
                if signs[row_before["index"]] < 0:
                    ends = {"positive": ends["negative"], "negative": ends["positive"]}
                assert {end: [t for t, _ in row_after[side][end]] for end in ends} == ends


def test_bad_matrix_head_or_layer_is_a_clear_error():
    params = random_params(0)
    with pytest.raises(ValueError, match="unknown matrix 'W_X'; choose one of W_Q"):
        svd.weight_svd(params, CFG, "W_X", 0, 0)
    with pytest.raises(ValueError, match="per head: give a head"):
        svd.weight_svd(params, CFG, "OV", 0)
    with pytest.raises(ValueError, match="MLP, which has no heads"):
        svd.weight_svd(params, CFG, "W_in", 0, 1)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        svd.spectra(params, CFG, "W_out", 3)
