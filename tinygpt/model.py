"""GPT-2's forward pass, the reference: one pure function per component, composed bottom-up.

Every intermediate passes through `site(name, value)` (`tinygpt.recorder`), which applies the caller's edits
and keeps what the caller asked for; the names are `tinygpt.sites`' table, the dimensions `tinygpt.config`'s.
Numerics, stated once: LayerNorm statistics, attention scores, softmax and logits in float32; GELU is GPT-2's
tanh approximation; masks are applied with `jnp.where`; matrix products run in the parameters' dtype.
`tinygpt.kernels` computes the same values faster; `attention` takes its fused kernel in one visible line.
`tinygpt.forward` is this `forward` with inputs checked, compiled once per shape, returned as a `Trace`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from . import kernels
from .config import Config
from .recorder import SiteRecorder, normalize_edits, normalize_keep

f32 = jnp.float32


def embedding(wte, tokens):
    """wte[tokens], an id outside [0, vocab) as NaN (see `tinygpt.inputs`).  [batch, seq] -> [batch, seq, d_model]"""
    return wte.at[tokens].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)


def gelu_new(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  Any shape."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ln_scale(x, eps):
    """LayerNorm's divisor sqrt(var + eps), in float32.  [..., d_model] -> [..., 1]"""
    return jnp.sqrt(jnp.var(x.astype(f32), axis=-1, keepdims=True) + eps)


def ln_apply(x, scale, w, b):
    """(x - mean) / scale * w + b, in float32, returned in x's dtype.  [..., d_model] -> [..., d_model]"""
    x32 = x.astype(f32)  # [..., d_model]
    normalized = (x32 - x32.mean(axis=-1, keepdims=True)) / scale  # [..., d_model]
    return (normalized * w.astype(f32) + b.astype(f32)).astype(x.dtype)


def project_heads(x, W, b):
    """x @ W + b for every head.  x [batch, seq, d_model], W [head, d_model, d_head] -> [batch, seq, head, d_head]"""
    return jnp.einsum("bsm,hmd->bshd", x, W) + b


def attention_scores(q, k):
    """q.k / sqrt(d_head) in float32.  q [batch, seq, head, d_head], k [batch, key, head, d_head]
    -> [batch, head, seq, key]"""
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=f32)  # [batch, head, seq, key]
    return scores / jnp.sqrt(jnp.asarray(q.shape[-1], f32))


def apply_mask(scores, mask):
    """-inf where the query may not attend the key.  scores [batch, head, seq, key], mask [batch, 1, seq, key]"""
    return jnp.where(mask, scores, -jnp.inf)


def softmax(scores):
    """Softmax over keys, in float32 (every row has at least its own position unmasked).  [..., key]"""
    return jax.nn.softmax(scores.astype(f32), axis=-1)


def mix_values(pattern, v):
    """z = pattern @ v.  pattern [batch, head, seq, key], v [batch, key, head, d_head] -> [batch, seq, head, d_head]"""
    return jnp.einsum("bhst,bthd->bshd", pattern.astype(v.dtype), v)


def attention_output(z, W_O, b_O):
    """The sum over heads of z @ W_O, plus b_O: one matmul of the heads side by side [head * d_head] with W_O
    stacked the same way (both reshapes are free).  z [batch, seq, head, d_head] -> [batch, seq, d_model]"""
    batch, seq, n_head, d_head = z.shape
    return z.reshape(batch, seq, n_head * d_head) @ W_O.reshape(n_head * d_head, -1) + b_O


def causal_mask(attention_mask):
    """Which keys each query may attend: the real keys at or before it (a padding query sees only itself, so
    every softmax row is defined).  attention_mask [batch, seq] (1 real, 0 padding) -> [batch, 1, seq, key]"""
    seq = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))  # [seq, key]
    real_key = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, key]
    return causal & (real_key | jnp.eye(seq, dtype=bool))  # [batch, 1, seq, key]


def positions_from_mask(attention_mask):
    """Position ids that skip left padding (a token's index among its row's real tokens).  [batch, seq]"""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def unembed(x, params):
    """Logits in float32: x @ wte.T (GPT-2 ties the unembedding to the token embedding), or x @ W_U + b_U for
    params with an explicit one (`probes.transforms` unties it).  x [..., d_model] -> [..., vocab]"""
    if "W_U" in params:
        return jnp.einsum("...m,mv->...v", x, params["W_U"], preferred_element_type=f32) + params["b_U"].astype(f32)
    return jnp.einsum("...m,vm->...v", x, params["wte"], preferred_element_type=f32)


def attention(q, k, v, mask, site: SiteRecorder, causal: bool = False):
    """Each query's mix of the values it may attend; `causal`: the queries are the keys' own positions (the
    forward; not a KV-cache step).  q [batch, seq, head, d_head], k, v [batch, key, head, d_head] -> z like q"""
    if not (site.wants("attn_scores") or site.wants("attn_pattern")):  # the pattern is not read: fast path
        return kernels.fused_attention(q, k, v, mask, causal)  # [batch, seq, head, d_head], same values
    attn_scores = site("attn_scores", apply_mask(attention_scores(q, k), mask))  # [batch, head, seq, key]
    attn_pattern = site("attn_pattern", softmax(attn_scores))  # [batch, head, seq, key]
    return mix_values(attn_pattern, v)  # [batch, seq, head, d_head]


def block_ln1(resid, p, site: SiteRecorder, eps: float):
    """The residual entering a block, and its LayerNorm 1.  -> resid_pre, ln1 [batch, seq, d_model]"""
    resid_pre = site("resid_pre", resid)  # [batch, seq, d_model]
    ln1_scale = site("ln1_scale", ln_scale(resid_pre, eps))  # [batch, seq, 1]
    ln1 = site("ln1", ln_apply(resid_pre, ln1_scale, p["ln1_w"], p["ln1_b"]))  # [batch, seq, d_model]
    return resid_pre, ln1


def block_qkv(resid, p, site: SiteRecorder, eps: float, project=project_heads):
    """A block's first half: LayerNorm 1, q, k, v (a decode step passes `kernels.project_heads_batched`)."""
    resid_pre, ln1 = block_ln1(resid, p, site, eps)  # [batch, seq, d_model] each
    q = site("q", project(ln1, p["W_Q"], p["b_Q"]))  # [batch, seq, head, d_head]
    k = site("k", project(ln1, p["W_K"], p["b_K"]))  # [batch, seq, head, d_head]
    v = site("v", project(ln1, p["W_V"], p["b_V"]))  # [batch, seq, head, d_head]
    return resid_pre, q, k, v


def block_after_attention(resid_pre, z, p, site: SiteRecorder, eps: float):
    """The rest of a block from the mixed values z: the heads' writes, LayerNorm 2, the MLP.  -> resid_post"""
    z = site("z", z)  # [batch, seq, head, d_head]
    attn_out = attention_output(z, p["W_O"], p["b_O"])  # [batch, seq, d_model]
    if site.wants("head_out"):  # per-head writes hold head x the memory: made only when read or edited
        computed = kernels.head_outputs_batched(z, p["W_O"])  # z @ W_O per head [batch, seq, head, d_model]
        head_out = site("head_out", computed)  # [batch, seq, head, d_model]
        if head_out is not computed:  # an edited head_out is what the residual receives
            attn_out = head_out.sum(axis=-2) + p["b_O"]  # [batch, seq, d_model]
    attn_out = site("attn_out", attn_out)  # [batch, seq, d_model]
    resid_mid = site("resid_mid", resid_pre + attn_out)  # [batch, seq, d_model]
    ln2_scale = site("ln2_scale", ln_scale(resid_mid, eps))  # [batch, seq, 1]
    ln2 = site("ln2", ln_apply(resid_mid, ln2_scale, p["ln2_w"], p["ln2_b"]))  # [batch, seq, d_model]
    mlp_pre = site("mlp_pre", ln2 @ p["W_in"] + p["b_in"])  # [batch, seq, d_mlp]
    mlp_post = site("mlp_post", gelu_new(mlp_pre))  # [batch, seq, d_mlp]
    mlp_out = site("mlp_out", mlp_post @ p["W_out"] + p["b_out"])  # [batch, seq, d_model]
    return site("resid_post", resid_mid + mlp_out)  # [batch, seq, d_model]


def block(resid, p, mask, site: SiteRecorder, eps: float):
    """One transformer block.  resid [batch, seq, d_model] -> [batch, seq, d_model]; p: one layer's params"""
    resid_pre, q, k, v = block_qkv(resid, p, site, eps)  # [batch, seq, d_model], [batch, seq, head, d_head]
    z = attention(q, k, v, mask, site, causal=True)  # [batch, seq, head, d_head]
    return block_after_attention(resid_pre, z, p, site, eps)


# ------------------------------------------------------------------------------------------------- forward


def run_blocks(blocks, resid, mask, config: Config, edits, keep, layers=None, positions=None):
    """`lax.scan` the stacked blocks over the residual.  -> resid, {kept per-layer site: [layer, ...]}. `layers`:
    the blocks' indices (default all); `positions` [batch, seq]: absolute positions, for edits that take them."""
    layers = jnp.arange(config.n_layer) if layers is None else layers  # [layer]

    def step(resid, xs):
        p, layer = xs
        site = SiteRecorder(edits, keep, layer, positions)
        return block(resid, p, mask, site, config.ln_eps), site.kept

    return lax.scan(step, resid, (blocks, layers))


def final_sites(resid, params, site: SiteRecorder, eps: float):
    """The final LayerNorm and the unembedding, computed only when one of them is read or edited."""
    if any(site.wants(name) for name in ("ln_final_scale", "ln_final", "logits")):
        ln_final_scale = site("ln_final_scale", ln_scale(resid, eps))  # [batch, seq, 1]
        ln_final = ln_apply(resid, ln_final_scale, params["lnf_w"], params["lnf_b"])  # [batch, seq, d_model]
        ln_final = site("ln_final", ln_final)  # [batch, seq, d_model]
        if site.wants("logits"):
            site("logits", unembed(ln_final, params))  # [batch, seq, vocab]


def forward(params, tokens, config: Config, *, attention_mask=None, edits=None, keep=None) -> dict:
    """GPT-2's forward pass.  tokens [batch, seq] -> the kept sites {name: value}, per-layer ones [layer, ...]
    attention_mask [batch, seq]: 1 real, 0 left padding (default all real); edits and keep as `tinygpt.forward`
    takes them. Pure and traceable (config and keep static); under jit, sites nobody needs are never computed."""
    edits, keep = normalize_edits(edits), normalize_keep(keep)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)  # [batch, seq]
    positions = positions_from_mask(attention_mask)  # [batch, seq]
    mask = causal_mask(attention_mask)  # [batch, 1, seq, key]
    site = SiteRecorder(edits, keep, None, positions)
    embed = site("embed", embedding(params["wte"], tokens))  # [batch, seq, d_model]
    pos_embed = site("pos_embed", params["wpe"][positions])  # [batch, seq, d_model]
    resid = embed + pos_embed  # [batch, seq, d_model]
    resid, per_layer = run_blocks(params["blocks"], resid, mask, config, edits, keep,
                                  positions=positions)  # [batch, seq, d_model], {site: [layer, ...]}
    final_sites(resid, params, site, config.ln_eps)
    return {**site.kept, **per_layer}
