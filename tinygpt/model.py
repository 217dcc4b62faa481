"""The reference GPT-2 forward pass.

One pure function per component, composed bottom-up; every intermediate goes through `site(name, value)`
(see `tinygpt.trace`), which applies the caller's edits and keeps what the caller asked for. Shapes use
the dimension names of `tinygpt.config`.

Numerics, stated once: LayerNorm statistics and softmax in float32; attention scores in float32; GELU is
GPT-2's tanh approximation (`gelu_new`); masks are applied with `jnp.where`; logits in float32. All
matrix products run in the parameters' dtype (float32, bfloat16 or float16).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import Config
from .errors import InputError
from .inputs import check_inputs, is_concrete as _is_concrete  # noqa: F401
from .params import Params
from .sites import DERIVED
from .trace import Edits, SiteRecorder, Trace, derived_sites, normalize_edits, normalize_keep

f32 = jnp.float32


# ----------------------------------------------------------------------------------------------- components


def embedding(wte, tokens):
    """wte[tokens]; an id outside [0, vocab) embeds as NaN, so whatever depends on it is NaN rather than another
    token's value (a plain gather would clamp it: see `tinygpt.inputs`).  tokens [batch, seq] -> [batch, seq, d_model]"""
    return wte.at[tokens].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)


def gelu_new(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ln_scale(x, eps):
    """LayerNorm's divisor sqrt(var + eps), in float32.  [..., d_model] -> [..., 1]"""
    return jnp.sqrt(jnp.var(x.astype(f32), axis=-1, keepdims=True) + eps)


def ln_apply(x, scale, w, b):
    """(x - mean) / scale * w + b, computed in float32, returned in x's dtype.  [..., d_model]"""
    x32 = x.astype(f32)
    normalized = (x32 - x32.mean(axis=-1, keepdims=True)) / scale
    return (normalized * w.astype(f32) + b.astype(f32)).astype(x.dtype)


def project_heads(x, W, b):
    """Per-head projection. x [batch, seq, d_model], W [head, d_model, d_head] -> [batch, seq, head, d_head]"""
    return jnp.einsum("bsm,hmd->bshd", x, W) + b


def project_heads_batched(x, W, b):
    """`project_heads` as a matmul batched over heads, reading W [head, d_model, d_head] where it lies.
    The reference contraction makes XLA transpose W to [d_model, head, d_head] first, which costs nothing
    next to a long sequence's matmul but dominates a step of one token per sequence (the KV-cache decode);
    this form broadcasts the few tokens over heads instead. Same values.
    x [batch, seq, d_model] -> [batch, seq, head, d_head]"""
    batch, seq, d_model = x.shape
    tokens = jnp.broadcast_to(x.reshape(1, batch * seq, d_model), (W.shape[0], batch * seq, d_model))
    per_head = lax.dot_general(tokens, W, (((2,), (1,)), ((0,), (0,))))  # [head, batch * seq, d_head]
    return jnp.moveaxis(per_head, 0, 1).reshape(batch, seq, W.shape[0], W.shape[2]) + b


def attention_scores(q, k):
    """q.k / sqrt(d_head) in float32.  q [batch, seq, head, d_head], k [batch, key, head, d_head]
    -> [batch, head, seq, key]"""
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=f32)
    return scores / jnp.sqrt(jnp.asarray(q.shape[-1], f32))


def apply_mask(scores, mask):
    """-inf where the query may not attend the key.  scores [batch, head, seq, key], mask [batch, 1, seq, key]"""
    return jnp.where(mask, scores, -jnp.inf)


def softmax(scores):
    """Softmax over keys in float32 (every row has at least its own position unmasked)."""
    return jax.nn.softmax(scores.astype(f32), axis=-1)


def mix_values(pattern, v):
    """z = pattern @ v.  pattern [batch, head, seq, key], v [batch, key, head, d_head] -> [batch, seq, head, d_head]"""
    return jnp.einsum("bhst,bthd->bshd", pattern.astype(v.dtype), v)


# Queries attended at once by `chunked_attention`. GPT-2 small, batch 8 x seq 1024, resid_post only, on CPU:
# whole-process peak 1.41 GB at 128 (1.47 at 256, 2.33 unchunked); 64 saves 0.06 GB but is slower.
ATTENTION_CHUNK = 128


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
        pattern = softmax(apply_mask(scores, mask))  # [batch, head, key]
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
    `causal_mask` builds it, padding or not)  -> [batch, seq, head, d_head]"""
    seq = q.shape[1]
    scale = jnp.sqrt(jnp.asarray(q.shape[-1], f32))

    def one_head(q, k, v_t, mask):  # q, k [seq, d_head], v_t [d_head, key], mask [seq, key]
        z = []
        for start in range(0, seq, chunk):
            stop = min(start + chunk, seq)  # the chunk's queries see keys [0, stop) at most
            scores = jnp.einsum("sd,td->st", q[start:stop], k[:stop], preferred_element_type=f32) / scale
            pattern = softmax(apply_mask(scores, mask[start:stop, :stop]))  # [chunk, stop]
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
    q [batch, seq, head, d_head], k, v [batch, key, head, d_head], mask [batch, 1, seq, key]"""
    if jax.default_backend() == "gpu":
        implementation = "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if causal:
        return causal_attention(q, k, v, mask)
    return chunked_attention(q, k, v, mask)


def head_outputs(z, W_O):
    """Each head's write into the residual, z @ W_O per head, as a matmul batched over heads (XLA's CPU
    backend runs the plain einsum "bshd,hdm->bshm" ~1.2-1.5x slower; same values).
    z [batch, seq, head, d_head], W_O [head, d_head, d_model] -> [batch, seq, head, d_model]"""
    batch, seq, n_head, d_head = z.shape
    per_head = z.reshape(batch * seq, n_head, d_head).swapaxes(0, 1)  # [head, batch * seq, d_head]
    out = lax.dot_general(per_head, W_O, (((2,), (1,)), ((0,), (0,))))  # [head, batch * seq, d_model]
    return jnp.moveaxis(out, 0, 1).reshape(batch, seq, n_head, -1)


def attention_output(z, W_O, b_O):
    """sum over heads of z @ W_O, plus b_O, as one matmul of the heads side by side [head * d_head] with W_O
    stacked the same way (both reshapes are free: the head axes are adjacent).  -> [batch, seq, d_model]"""
    batch, seq, n_head, d_head = z.shape
    return z.reshape(batch, seq, n_head * d_head) @ W_O.reshape(n_head * d_head, -1) + b_O


def causal_mask(attention_mask):
    """Which keys each query may attend.  attention_mask [batch, seq] (1 real, 0 padding) -> [batch, 1, seq, key]

    A query sees real keys at or before its position; a padding query sees only itself, so every softmax
    row is well defined and the pattern stays zero above the diagonal."""
    seq = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))  # [seq, key]
    real_key = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, key]
    return causal & (real_key | jnp.eye(seq, dtype=bool))


def positions_from_mask(attention_mask):
    """Position ids that skip left padding: a real token's position is the number of real tokens before it.
    [batch, seq] -> [batch, seq]"""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def unembed(x, params: Params):
    """Logits in float32 through the unembedding: x @ wte.T (GPT-2 ties it to the token embedding), or
    x @ W_U + b_U for params that carry an explicit one (`probes.transforms` unties it to fold or center
    weights).  x [..., d_model] -> [..., vocab]"""
    if "W_U" in params:
        logits = jnp.einsum("...m,mv->...v", x, params["W_U"], preferred_element_type=f32)
        return logits + params["b_U"].astype(f32)
    return jnp.einsum("...m,vm->...v", x, params["wte"], preferred_element_type=f32)


# --------------------------------------------------------------------------------------------------- block


def block(resid, p, mask, site: SiteRecorder, eps: float):
    """One transformer block. resid [batch, seq, d_model]; p holds one layer's parameters (no layer axis)."""
    resid_pre, q, k, v = block_qkv(resid, p, site, eps)
    return block_attend_mlp(resid_pre, q, k, v, mask, p, site, eps, causal=True)


def block_ln1(resid, p, site: SiteRecorder, eps: float):
    """The residual entering a block and its LayerNorm 1.  -> (resid_pre, ln1), each [batch, seq, d_model]"""
    resid_pre = site("resid_pre", resid)
    ln1_scale = site("ln1_scale", ln_scale(resid_pre, eps))
    ln1 = site("ln1", ln_apply(resid_pre, ln1_scale, p["ln1_w"], p["ln1_b"]))
    return resid_pre, ln1


def block_qkv(resid, p, site: SiteRecorder, eps: float, project=project_heads):
    """First half of a block: the residual entering it, LayerNorm 1, queries, keys and values.
    `project` is `project_heads` or, for a single-token decode step, `project_heads_batched` (same values)."""
    resid_pre, ln1 = block_ln1(resid, p, site, eps)
    q = site("q", project(ln1, p["W_Q"], p["b_Q"]))
    k = site("k", project(ln1, p["W_K"], p["b_K"]))
    v = site("v", project(ln1, p["W_V"], p["b_V"]))
    return resid_pre, q, k, v


def block_attend_mlp(resid_pre, q, k, v, mask, p, site: SiteRecorder, eps: float, causal: bool = False):
    """Second half of a block: attention of q over the keys/values k, v (this sequence's own in the forward,
    `causal`: query i is key i; a KV cache in generation), then the MLP.
    mask [batch, 1, seq, key] -> resid_post [batch, seq, d_model]"""
    if site.wants("attn_scores") or site.wants("attn_pattern"):
        attn_scores = site("attn_scores", apply_mask(attention_scores(q, k), mask))
        attn_pattern = site("attn_pattern", softmax(attn_scores))
        z = mix_values(attn_pattern, v)
    else:  # nobody reads the pattern: fused attention (flash / cuDNN where available), same values
        z = fused_attention(q, k, v, mask, causal)
    return block_after_attention(resid_pre, z, p, site, eps)


def block_after_attention(resid_pre, z, p, site: SiteRecorder, eps: float):
    """The rest of a block from its attention's mixed values z [batch, seq, head, d_head]: the heads'
    output, the MLP.  -> resid_post [batch, seq, d_model]"""
    z = site("z", z)
    attn_out = attention_output(z, p["W_O"], p["b_O"])
    if site.wants("head_out"):  # per-head writes cost head x memory: computed only when read or edited
        computed = head_outputs(z, p["W_O"])
        head_out = site("head_out", computed)
        if head_out is not computed:  # an edited head_out is what the residual receives
            attn_out = head_out.sum(axis=-2) + p["b_O"]
    attn_out = site("attn_out", attn_out)
    resid_mid = site("resid_mid", resid_pre + attn_out)

    ln2_scale = site("ln2_scale", ln_scale(resid_mid, eps))
    ln2 = site("ln2", ln_apply(resid_mid, ln2_scale, p["ln2_w"], p["ln2_b"]))
    mlp_pre = site("mlp_pre", ln2 @ p["W_in"] + p["b_in"])
    mlp_post = site("mlp_post", gelu_new(mlp_pre))
    mlp_out = site("mlp_out", mlp_post @ p["W_out"] + p["b_out"])
    resid_post = site("resid_post", resid_mid + mlp_out)
    return resid_post


def run_blocks(blocks: Params, resid, mask, config: Config, edits, keep, layers=None, positions=None):
    """`lax.scan` the stacked blocks over the residual stream; returns (final resid, kept per-layer sites
    stacked as [layer, ...]). `layers` are the block indices the stacked params belong to (default all);
    `positions` [batch, seq], the tokens' absolute positions, are given to the edits that take them."""
    if layers is None:
        layers = jnp.arange(config.n_layer)

    def step(resid, xs):
        p, layer = xs
        site = SiteRecorder(edits, keep, layer, positions)
        resid = block(resid, p, mask, site, config.ln_eps)
        return resid, site.kept

    return lax.scan(step, resid, (blocks, layers))


def final_sites(resid, params, site: SiteRecorder, eps: float):
    """The final LayerNorm and the unembedding, computed only when one of them is read or edited."""
    if any(site.wants(n) for n in ("ln_final_scale", "ln_final", "logits")):
        ln_final_scale = site("ln_final_scale", ln_scale(resid, eps))
        ln_final = site("ln_final", ln_apply(resid, ln_final_scale, params["lnf_w"], params["lnf_b"]))
        if site.wants("logits"):
            site("logits", unembed(ln_final, params))


# ------------------------------------------------------------------------------------- derived trace sites


def _derived_ln(resid, scale, w, b):
    """A LayerNorm output from its input and kept divisor. resid, scale [..., layer, batch, seq, d_model | 1],
    w, b [..., layer, d_model] (the same leading axes: a trace stacked by vmap or scan carries its weights so)"""
    return ln_apply(resid, scale, w[..., None, None, :], b[..., None, None, :])


def _each_layer(fn, args, ranks):
    """fn applied to one layer's values, mapped over the layer axis and any axes stacked in front of it (a
    trace stacked by vmap or scan). ranks: each argument's rank without those axes."""
    lead = args[0].shape[:args[0].ndim - ranks[0]]
    flat = jax.vmap(fn)(*(a.reshape(-1, *a.shape[a.ndim - r:]) for a, r in zip(args, ranks)))
    return flat.reshape(*lead, *flat.shape[1:])


def _derived_head_out(z, W_O):
    """Per-head writes.  z [..., layer, batch, seq, head, d_head], W_O [..., layer, head, d_head, d_model]"""
    return _each_layer(head_outputs, (z, W_O), (4, 3))


def _derived_scores(q, k, attention_mask):
    """Masked attention scores.  q, k [..., layer, batch, seq, head, d_head], attention_mask [..., layer,
    batch, seq] (the forward's input, repeated per layer) -> [..., layer, batch, head, seq, key]"""
    return _each_layer(lambda q, k, real: apply_mask(attention_scores(q, k), causal_mask(real)),
                       (q, k, attention_mask), (4, 4, 2))


# How each site of `DERIVED` is computed from its sources and weights (in `DERIVED`'s order), exactly as
# the forward computes it.
DERIVATIONS = {
    "ln1": lambda s, w: _derived_ln(s["resid_pre"], s["ln1_scale"], w["ln1_w"], w["ln1_b"]),
    "attn_scores": lambda s, w: _derived_scores(s["q"], s["k"], w["attention_mask"]),
    "attn_pattern": lambda s, w: softmax(s["attn_scores"]),
    "head_out": lambda s, w: _derived_head_out(s["z"], w["W_O"]),
    "resid_mid": lambda s, w: s["resid_pre"] + s["attn_out"],
    "ln2": lambda s, w: _derived_ln(s["resid_mid"], s["ln2_scale"], w["ln2_w"], w["ln2_b"]),
    "mlp_post": lambda s, w: gelu_new(s["mlp_pre"]),
    "resid_post": lambda s, w: s["resid_mid"] + s["mlp_out"],
}
assert tuple(DERIVATIONS) == tuple(DERIVED)


@functools.partial(jax.jit, static_argnums=0)
def _derive(name: str, sources: dict, weights: dict):
    return DERIVATIONS[name](sources, weights)


def derive_site(name: str, trace: Trace, weights: dict):
    """Compute a compact trace's derived site `name` from the trace's kept sites (called by `Trace`)."""
    sources, needs = DERIVED[name]
    values = {s: getattr(trace, s) for s in sources}
    missing = [s for s in sources if values[s] is None] + [w for w in needs if w not in weights]
    if missing:
        raise InputError(f"the derived site {name!r} is computed from {', '.join(sources + needs)}, and this trace "
                         f"no longer holds {', '.join(missing)}")
    return _derive(name, values, {w: weights[w] for w in needs})


def attach_weights(trace: Trace, params: Params, attention_mask) -> Trace:
    """Give a compact trace the per-layer weights its derived sites read (W_O for head_out), and the input's
    attention_mask [batch, seq] for the scores, repeated per layer [layer, batch, seq] so that the trace's
    leaves share their leading axes."""
    needs = {w for name in trace.derived() for w in DERIVED[name][1]}
    if not needs:
        return trace
    weights = {w: params["blocks"][w] for w in sorted(needs - {"attention_mask"})}
    if "attention_mask" in needs:
        weights["attention_mask"] = jnp.broadcast_to(attention_mask.astype(bool),
                                                     (trace.q.shape[0], *attention_mask.shape))
    return trace.with_weights(weights)


# ------------------------------------------------------------------------------------------------- forward


def forward(
    params: Params,
    tokens,
    config: Config,
    *,
    edits: Edits | None = None,
    attention_mask=None,
    keep=None,
    compact: bool = False,
) -> Trace:
    """GPT-2's forward pass, returning a `Trace` of every kept site.

    params          the params pytree (`tinygpt.params`)
    tokens          int [batch, seq] token ids
    config          static `Config`
    edits           {site: fn(value, layer) -> value} (or a sequence of fns, applied in order); `layer` is the
                    block index (a traced int inside the scan) for per-layer sites, None for the others. An
                    edit with a `positions` parameter, fn(value, layer, positions), also gets the tokens'
                    absolute positions [batch, seq] (padding skipped, as the position embedding counts)
    attention_mask  [batch, seq], 1 for real tokens and 0 for (left) padding; positions skip the padding
    keep            site names to return (default: all). Under `jit`, values neither kept nor needed are
                    never computed or stored; logits are computed only when kept or edited.
    compact         store only the kept sites that are not cheap functions of other kept sites; the trace
                    computes the others (`tinygpt.sites.DERIVED`: ln1, attn_scores, attn_pattern, head_out,
                    resid_mid, ln2, mlp_post, resid_post) when they are read. A full trace then holds about a
                    third of the bytes, and the forward skips the per-head writes and, the scores not being
                    stored, takes the fused attention; see `Trace` for what that means for tree_map.

    Pure and traceable: jit it with `config` and `keep` static (see `tinygpt.make_forward`).
    """
    edits = normalize_edits(edits)
    keep = normalize_keep(keep)
    tokens, attention_mask = check_inputs(tokens, attention_mask, config)
    derived = derived_sites(keep, edits) if compact else frozenset()
    if not edits and _at_top_level():  # called eagerly: reuse one compiled program per (config, keep, shape)
        trace = _compiled_forward(config, keep, derived)(params, tokens, attention_mask)
    else:
        trace = _forward(params, tokens, attention_mask, config, edits, keep, derived)
    return attach_weights(trace, params, _or_all_real(attention_mask, tokens))


def _or_all_real(attention_mask, tokens):
    return jnp.ones(jnp.shape(tokens), jnp.int32) if attention_mask is None else attention_mask


def _forward(params, tokens, attention_mask, config: Config, edits, keep, derived=frozenset()) -> Trace:
    """The forward, storing the kept sites except the `derived` ones (the returned trace derives those)."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    else:
        positions = positions_from_mask(attention_mask)
    mask = causal_mask(attention_mask)  # [batch, 1, seq, key]
    store = keep - derived

    outer = SiteRecorder(edits, store, None, positions)
    embed = outer("embed", embedding(params["wte"], tokens))  # [batch, seq, d_model]
    pos_embed = outer("pos_embed", params["wpe"][positions])  # [batch, seq, d_model]
    resid, per_layer = run_blocks(params["blocks"], embed + pos_embed, mask, config, edits, store,
                                  positions=positions)

    final_sites(resid, params, outer, config.ln_eps)
    return Trace(derived=derived, **outer.kept, **per_layer)


def _at_top_level() -> bool:
    """True when no jax transformation (jit, vmap, grad, ...) is tracing, so a cached compiled forward may be
    used. Forward with edits always runs as written: their closures may hold arrays that change between
    calls, and a cache keyed on the function would silently reuse stale values."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # private API moved: run as written (correct, only slower)
        return False
    return trace_state_clean()


@functools.lru_cache(maxsize=64)
def _compiled_forward(config: Config, keep: frozenset, derived: frozenset):
    return jax.jit(lambda params, tokens, mask: _forward(params, tokens, mask, config, {}, keep, derived))


def make_forward(config: Config, *, keep=None, edits: Edits | None = None, compact: bool = False):
    """A jit-compiled `(params, tokens, attention_mask=None) -> Trace` for a fixed config, keep, edits and
    compact (see `forward`). Inputs are checked (concretely) before entering the compiled function."""
    keep_set = normalize_keep(keep)
    edits_dict = normalize_edits(edits)
    derived = derived_sites(keep_set, edits_dict) if compact else frozenset()

    @jax.jit
    def compiled(params, tokens, attention_mask):
        return _forward(params, tokens, attention_mask, config, edits_dict, keep_set, derived)

    def run(params, tokens, attention_mask=None):
        tokens, attention_mask = check_inputs(tokens, attention_mask, config)
        return attach_weights(compiled(params, tokens, attention_mask), params,
                              _or_all_real(attention_mask, tokens))

    return run
