"""Fast paths beside the reference: the same values as `tinygpt.model`'s functions, with less memory or time.

Each function says which reference computation it equals and why it is faster; tests/test_attention_chunked.py
and tests/test_kernels.py hold each equal to the reference on random inputs. The reference forward takes
them in plain sight: `fused_attention` where nobody reads or edits the attention pattern (the one line in
`model.attention`), `head_outputs_batched` for the per-head writes, and generation's decode step
`project_heads_batched`.

Reference, for one query row (model.py): pattern = softmax(where(mask, q.k / sqrt(d_head), -inf)) in
float32; z = pattern @ v. The helper `_pattern` below is that row's softmax, written with the same jnp
operations as `model.apply_mask` and `model.softmax` (this module imports nothing of the model, which
imports it), so each row gives the reference's bits wherever its keys fit one chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32

# Queries attended at once by `chunked_attention` and `causal_attention`. GPT-2 small, batch 8 x seq 1024,
# resid_post only, on CPU: whole-process peak 1.41 GB at 128 (1.47 at 256, 2.33 unchunked); 64 saves
# 0.06 GB but is slower.
ATTENTION_CHUNK = 128


def _pattern(scores, mask):
    """softmax(where(mask, scores, -inf)) over keys, in float32: `model.softmax(model.apply_mask(...))`."""
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf).astype(f32), axis=-1)


def chunked_attention(q, k, v, mask, chunk: int = ATTENTION_CHUNK):
    """softmax(q.k / sqrt(d_head)) @ v written for one query and mapped over the queries `chunk` at a time:
    `lax.map` vmaps each chunk and runs the chunks one after another (the last one ragged), so the float32
    temporaries are [batch, head, chunk, key], not [batch, head, seq, key]. Each query's row is computed as in
    the reference path (`attention_scores`, `apply_mask`, `softmax`, `mix_values`), so any mask is exact:
    causal, padded, or queries that are the last seq of the key positions. Keys and values are laid out
    [batch, head, d_head, key] once, outside the loop (XLA would otherwise transpose them in every chunk).
    On CPU this is also faster than the whole-sequence einsums of the reference path, whose softmax XLA
    fuses into the value product.
    q [batch, seq, head, d_head], k, v [batch, key, head, d_head], mask [batch, 1, seq, key]
    -> [batch, seq, head, d_head]"""
    k_t = k.transpose(0, 2, 3, 1)  # [batch, head, d_head, key]
    v_t = v.transpose(0, 2, 3, 1)  # [batch, head, d_head, key]
    scale = jnp.sqrt(jnp.asarray(q.shape[-1], f32))

    def one_query(query_and_mask):  # q [batch, head, d_head], mask [batch, 1, key]
        q, mask = query_and_mask
        scores = jnp.einsum("bhd,bhdt->bht", q, k_t, preferred_element_type=f32) / scale  # [batch, head, key]
        pattern = _pattern(scores, mask)  # [batch, head, key]
        return jnp.einsum("bht,bhdt->bhd", pattern.astype(v.dtype), v_t)  # [batch, head, d_head]

    queries = (q.swapaxes(0, 1), mask.transpose(2, 0, 1, 3))  # [seq, batch, head, d_head], [seq, batch, 1, key]
    z = lax.map(one_query, queries, batch_size=chunk)  # [seq, batch, head, d_head]
    return z.swapaxes(0, 1)


def causal_attention(q, k, v, mask, chunk: int = ATTENTION_CHUNK):
    """A sequence's attention over itself (query i is key i), as the forward computes it on CPU: one
    sequence and one head at a time and, within a head, `chunk` queries at a time against only the keys up to
    the chunk's last query (by causality the later keys are masked anyway). A head's float32 temporaries
    [chunk, key] stay in the CPU's cache, where `chunked_attention`'s [batch, head, chunk, key] stream through
    memory: a `resid_post`-only forward of GPT-2 small at batch 8 x 1024 tokens takes 10.5 s instead of 13.5 s
    on a 2-core CPU (most of it from the layout, the rest from the skipped keys). Each row is computed as in
    the reference path (`attention_scores`, `apply_mask`, `softmax`, `mix_values`), to the same bits where the
    whole row fits one chunk.
    q, k, v [batch, seq, head, d_head]; mask [batch, 1, seq, seq], allowing no key after its query (as
    `model.causal_mask` builds it, padding or not)  -> [batch, seq, head, d_head]"""
    seq = q.shape[1]
    scale = jnp.sqrt(jnp.asarray(q.shape[-1], f32))

    def one_head(q, k, v_t, mask):  # q, k [seq, d_head], v_t [d_head, key], mask [seq, key]
        z = []
        for start in range(0, seq, chunk):
            stop = min(start + chunk, seq)  # the chunk's queries see keys [0, stop) at most
            scores = jnp.einsum("sd,td->st", q[start:stop], k[:stop], preferred_element_type=f32) / scale
            pattern = _pattern(scores, mask[start:stop, :stop])  # [chunk, stop]
            z.append(jnp.einsum("st,dt->sd", pattern.astype(v_t.dtype), v_t[:, :stop]))  # [chunk, d_head]
        return jnp.concatenate(z)  # [seq, d_head]

    def one_sequence(args):  # q, k [head, seq, d_head], v_t [head, d_head, key], mask [seq, key]
        q, k, v_t, mask = args
        return lax.map(lambda qkv: one_head(*qkv, mask), (q, k, v_t))  # [head, seq, d_head]

    # heads first: [batch, head, seq, d_head]; values keys-last [batch, head, d_head, key], the layout in
    # which the value product sums its terms in the reference path's order (the same bits)
    q_h, k_h, v_t = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
    z = lax.map(one_sequence, (q_h, k_h, v_t, mask[:, 0]))  # [batch, head, seq, d_head]
    return z.transpose(0, 2, 1, 3)


def fused_attention(q, k, v, mask, causal: bool = False):
    """softmax(q.k / sqrt(d_head)) @ v without materialising the whole pattern, used when no one reads or
    edits the pattern. On GPUs `jax.nn.dot_product_attention` (cuDNN's flash attention for 16-bit dtypes,
    XLA's fused kernel otherwise: one large batched launch beats a sequential loop there); elsewhere
    `causal_attention` when the queries are the keys' own positions (`causal`: the forward), and
    `chunked_attention` for any other queries (a generation step, a sweep's suffix), whose temporaries stay
    [batch, head, chunk, key].
    q [batch, seq, head, d_head], k, v [batch, key, head, d_head], mask [batch, 1, seq, key]
    -> [batch, seq, head, d_head]"""
    if jax.default_backend() == "gpu":
        implementation = "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if causal:
        return causal_attention(q, k, v, mask)
    return chunked_attention(q, k, v, mask)


def project_heads_batched(x, W, b):
    """`model.project_heads` (x @ W + b per head) as a matmul batched over heads, reading W [head, d_model,
    d_head] where it lies. The reference contraction makes XLA transpose W to [d_model, head, d_head] first,
    which costs nothing next to a long sequence's matmul but dominates a step of one token per sequence (the
    KV-cache decode); this form broadcasts the few tokens over heads instead. Same values.
    x [batch, seq, d_model] -> [batch, seq, head, d_head]"""
    batch, seq, d_model = x.shape
    tokens = jnp.broadcast_to(x.reshape(1, batch * seq, d_model), (W.shape[0], batch * seq, d_model))
    per_head = lax.dot_general(tokens, W, (((2,), (1,)), ((0,), (0,))))  # [head, batch * seq, d_head]
    return jnp.moveaxis(per_head, 0, 1).reshape(batch, seq, W.shape[0], W.shape[2]) + b


def head_outputs_batched(z, W_O):
    """Each head's write into the residual stream, z @ W_O per head (the site head_out), as a matmul batched
    over heads: XLA's CPU backend runs the plain einsum "bshd,hdm->bshm" ~1.2-1.5x slower (a forward of GPT-2
    small keeping head_out at batch 8 x 128: 2.0 s against 2.9 s on 2 cores). Same values.
    z [batch, seq, head, d_head], W_O [head, d_head, d_model] -> [batch, seq, head, d_model]"""
    batch, seq, n_head, d_head = z.shape
    per_head = z.reshape(batch * seq, n_head, d_head).swapaxes(0, 1)  # [head, batch * seq, d_head]
    out = lax.dot_general(per_head, W_O, (((2,), (1,)), ((0,), (0,))))  # [head, batch * seq, d_model]
    return jnp.moveaxis(out, 0, 1).reshape(batch, seq, n_head, -1)
