"""Intervention sweeps: the same forward run many times, each time with one thing changed (a head, a neuron,
a (layer, position)), as one compiled program.

Every swept run is "the base run, with each patched site replaced by its `source` where `where` holds, at
the layers lo <= layer < hi" (a `Patch` per site). `patched_forward` is that run done plainly: one full
forward with edits. `sweep_units` and `sweep_positions` compute the same numbers (to float rounding) for
every (layer, unit) or (layer, position) at once, doing only the work that differs between runs:

    prefix reuse   the layers before `lo` are the base run's, so a run starts from the cached resid_pre[lo].
                   `lo` is a traced int: one compiled loop serves every start layer.
    suffix reuse   a patch at position p leaves every position before p untouched at every layer (attention is
                   causal): the run recomputes positions >= first (first <= p) only and reads the earlier
                   positions' keys and values from the base run's cache. Swept positions are grouped into a
                   few buckets, each with one `first` (one shape, so one compiled loop per bucket).
    block skipping a restored resid_post[l] is the next block's resid_pre: the run starts at block l + 1 (the
                   last block's output, l = n_layer - 1, is patched after the last block, which is rerun);
                   a patch of a site after the attention (z, head_out, attn_out, the MLP's) leaves its first
                   block's attention unchanged: with z in the cache, that block starts from the base run's z.
    read only      the last block's queries, attention and MLP, the final LayerNorm and the unembedding are
                   computed only at the positions the score reads.
    vmapped        runs are vmapped over the swept unit or position, `chunk_size` at a time (lax.map over
                   chunks), inside a lax.map over layers; all of it traces into one program under `jax.jit`.

Arrays are indexed by absolute position throughout; the functions that run part of the sequence slice them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import Config
from .compiled import forward
from .model import attention, block_after_attention, block_ln1, causal_mask, ln_apply, ln_scale, project_heads, unembed
from .recorder import SiteRecorder, normalize_edits
from .sharding import sharded_sweep
from .sites import SITES, check_site_names
from .errors import InputError

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations one vmapped chunk of runs may hold


# --------------------------------------------------------------------------------------------- the base run


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """What every swept run reads from the base run."""

    resid_pre: jax.Array  # [layer, batch, seq, d_model]  residual entering each block
    k: jax.Array  # [layer, batch, seq, head, d_head]
    v: jax.Array  # [layer, batch, seq, head, d_head]
    ln_final: jax.Array  # [batch, seq, d_model]  the base run's final LayerNorm output
    attention_mask: jax.Array  # [batch, seq]  1 real, 0 padding
    z: jax.Array | None = None  # [layer, batch, seq, head, d_head]  each block's mixed values, if kept


# Sites a block computes from its attention's z on: a run patching only these starts its first block from
# the base run's z (that block's q, k, v and attention read nothing patched).
AFTER_ATTENTION = ("z", "head_out", "attn_out", "resid_mid", "ln2_scale", "ln2", "mlp_pre", "mlp_post", "mlp_out")


def starts_from_z(sites) -> bool:
    """Whether runs patching only `sites` can start their first block from a cached z (`cache_run(z=...)`)."""
    return all(site in AFTER_ATTENTION for site in sites)


def cache_run(params, tokens, config: Config, *, attention_mask=None, edits=None, z: bool = False) -> Cache:
    """The base run: one forward keeping the residual entering each block, each block's keys and values,
    the final LayerNorm output and, with `z=True`, each block's z (for sweeps of `AFTER_ATTENTION` sites:
    their runs skip their first block's q/k/v and attention).

    `edits` may change the embedding sites only (embed, pos_embed), e.g. noise on the subject tokens in
    causal tracing: the swept runs start from cached block inputs, which already hold them."""
    edits = normalize_edits(edits)
    later = [name for name in edits if name not in ("embed", "pos_embed")]
    if later:
        raise InputError(f"a sweep's base run may edit embed / pos_embed only (its runs start from cached block "
                         f"inputs); got an edit at {later[0]!r}")
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(tokens), jnp.int32)
    trace = forward(params, tokens, config, edits=edits, attention_mask=attention_mask,
                    keep=("resid_pre", "k", "v", "ln_final") + (("z",) if z else ()))
    return Cache(trace.resid_pre, trace.k, trace.v, trace.ln_final, jnp.asarray(attention_mask), trace.z)


def base_logits(params, cache: Cache, *, read=(-1,)):
    """The base run's logits at the `read` positions.  -> [batch, n_read, vocab]"""
    read = read_positions(read, cache.attention_mask.shape[1])
    return unembed(cache.ln_final[:, read], params)


# ------------------------------------------------------------------------------------------------ patches


class Patch(NamedTuple):
    """Replace a site's value by `source` where `where` holds, at the layers lo <= layer < hi.

    where   bool, the site's shape without the layer axis, each axis its full size or 1 (broadcast):
            e.g. [1, 1, head, 1] for one head of `z`, [1, seq, 1] for one position of `resid_pre`
    source  the site's shape with the leading layer axis, each other axis full or 1:
            e.g. zeros [layer, 1, 1, 1, 1], or the clean run's `resid_pre` [layer, 1, seq, d_model]
    """

    lo: jax.Array  # int, first patched layer
    hi: jax.Array  # int, one past the last patched layer
    where: jax.Array
    source: jax.Array


Patches = Mapping[str, Patch]  # site -> its patch


def seq_axis(site: str) -> int:
    """Index of the query-position axis in a site's value (without the layer axis)."""
    return SITES[site].shape.index("seq")


def at_positions(x, positions: np.ndarray, axis: int):
    """x restricted to the absolute `positions` along `axis` (an axis of size 1 broadcasts and is kept)."""
    if x.shape[axis] == 1:
        return x
    return jnp.take(x, positions, axis=axis)


def patch_edit(site: str, patch: Patch, positions: np.ndarray):
    """The edit `(value, layer) -> value` applying `patch` to a value of `site` that covers the absolute
    `positions` on its seq axis."""
    where = at_positions(patch.where, positions, seq_axis(site))
    source = at_positions(patch.source, positions, seq_axis(site) + 1)

    def edit(value, layer):
        active = (layer >= patch.lo) & (layer < patch.hi)
        return jnp.where(active & where, source[layer], value)

    return edit


def patch_edits(patches: Patches, positions: np.ndarray) -> dict:
    return {site: (patch_edit(site, patch, positions),) for site, patch in patches.items()}


def resid_post_as_resid_pre(patches: Patches) -> tuple[dict[str, tuple[Patch, ...]], tuple[Patch, ...]]:
    """The patches per site, with resid_post's moved to resid_pre: the output of block l is the input of
    block l + 1, so patching resid_post at layers [lo, hi) is patching resid_pre at [lo + 1, hi + 1), and a
    run restored at layer l need not rerun block l. Its source moves up a layer ([layer + 1, ...]: entry
    n_layer is the last block's output, the final residual). A shifted patch goes before the site's own
    resid_pre patch, as resid_post[l] is written before resid_pre[l + 1] reads it.
    -> (patches per site, the shifted patches: applied also to the final residual, "resid_pre" n_layer)"""
    by_site: dict[str, tuple[Patch, ...]] = {}
    shifted = ()
    for site, patch in patches.items():
        if site == "resid_post":
            source = jnp.concatenate([patch.source[:1], patch.source])  # source[j] is now layer j - 1's
            shifted = (Patch(jnp.asarray(patch.lo) + 1, jnp.asarray(patch.hi) + 1, patch.where, source),)
            by_site["resid_pre"] = shifted + by_site.get("resid_pre", ())
        else:
            by_site[site] = by_site.get(site, ()) + (patch,)
    return by_site, shifted


def site_edits(by_site: Mapping[str, tuple[Patch, ...]], positions: np.ndarray) -> dict:
    """The edits applying each site's patches, in order, to values covering the absolute `positions`."""
    return {site: tuple(patch_edit(site, p, positions) for p in patches) for site, patches in by_site.items()}


def check_patch_site(site: str) -> None:
    check_site_names([site], "site")
    if not SITES[site].per_layer:
        raise InputError(f"sweeps patch per-layer sites; {site!r} is global (patch resid_pre at layer 0 instead)")


def read_positions(read, seq: int) -> np.ndarray:
    """Absolute positions from ints (negative counts from the end), checked against seq."""
    read = np.atleast_1d(np.asarray(read, np.int64))
    if read.size == 0 or read.min() < -seq or read.max() >= seq:
        raise InputError(f"positions {read.tolist()} are outside a sequence of {seq} tokens")
    return np.where(read < 0, read + seq, read)


# ------------------------------------------------------------------------------------------ one patched run


def patched_forward(params, tokens, config: Config, patches: Patches, *, attention_mask=None, edits=None,
                    read=(-1,)):
    """One patched run done plainly: the full forward with the patches as edits (after `edits`), logits at
    the `read` positions.  -> [batch, n_read, vocab]

    This is the definition every sweep is tested against."""
    for site in patches:
        check_patch_site(site)
    seq = jnp.shape(tokens)[1]
    read = read_positions(read, seq)
    all_edits = dict(normalize_edits(edits))
    for site, edit in patch_edits(patches, np.arange(seq)).items():
        all_edits[site] = all_edits.get(site, ()) + edit
    trace = forward(params, tokens, config, edits=all_edits, attention_mask=attention_mask, keep=("ln_final",))
    return unembed(trace.ln_final[:, read], params)


def block_suffix(resid, p, k_prefix, v_prefix, mask, out_index, site_in: SiteRecorder, site_out: SiteRecorder,
                 eps: float):
    """One block over positions first.. of the sequence, attending also to the earlier positions' cached keys
    and values. resid [batch, S, d_model] (S = seq - first), k_prefix, v_prefix [batch, first, head, d_head],
    mask [batch, 1, S, key]. The queries, attention and MLP are computed only at `out_index` (indices into
    the S positions; the keys and values at all S), or at all S when it is None. `site_in` records the sites
    at all S positions, `site_out` those at the computed ones (the same recorder when out_index is None).
    -> [batch, S or len(out_index), d_model]"""
    resid_pre, ln1 = block_ln1(resid, p, site_in, eps)
    ln1_q = ln1
    if out_index is not None:
        resid_pre, ln1_q, mask = resid_pre[:, out_index], ln1[:, out_index], mask[:, :, out_index]
    q = site_out("q", project_heads(ln1_q, p["W_Q"], p["b_Q"]))  # [batch, S or len(out_index), head, d_head]
    k = site_in("k", project_heads(ln1, p["W_K"], p["b_K"]))
    v = site_in("v", project_heads(ln1, p["W_V"], p["b_V"]))
    k = jnp.concatenate([k_prefix, k], axis=1)  # [batch, key, head, d_head]
    v = jnp.concatenate([v_prefix, v], axis=1)  # [batch, key, head, d_head]
    z = attention(q, k, v, mask, site_out)  # [batch, S or len(out_index), head, d_head]
    return block_after_attention(resid_pre, z, p, site_out, eps)


def run_patched(params, config: Config, cache: Cache, patches: Patches, *, first: int = 0, read=(-1,)):
    """The patched run from the cache: blocks min(lo).. on positions first.. only, the last block's attention
    and MLP at the `read` positions only; logits there.  -> [batch, n_read, vocab]

    Equal to `patched_forward` (to float rounding) when the patches change nothing before position `first`.
    `first` and `read` are static; the patches may be traced (and vmapped). A resid_post patch is applied
    as the next block's resid_pre patch (`resid_post_as_resid_pre`), so the patched block is not rerun;
    when the cache holds z and every patch is of an `AFTER_ATTENTION` site, the first block starts from the
    base run's z."""
    for site in patches:
        check_patch_site(site)
    blocks, eps, last = params["blocks"], config.ln_eps, config.n_layer - 1
    seq = cache.attention_mask.shape[1]
    read = read_positions(read, seq)
    if read.min() < first:
        raise InputError(f"read positions {read.tolist()} precede the first recomputed position {first}")
    by_site, shifted = resid_post_as_resid_pre(patches)
    edits_suffix = site_edits(by_site, np.arange(first, seq))
    edits_read = site_edits(by_site, read)
    final_edits = site_edits({"resid_pre": shifted}, read)["resid_pre"]
    mask = causal_mask(cache.attention_mask)[:, :, first:]  # [batch, 1, seq - first, key]

    def layer_params(layer):
        return jax.tree.map(lambda w: w[layer], blocks)

    def prefix_kv(layer):
        return cache.k[layer][:, :first], cache.v[layer][:, :first]  # [batch, first, head, d_head]

    def step(layer, resid):
        site = SiteRecorder(edits_suffix, frozenset(), layer)
        return block_suffix(resid, layer_params(layer), *prefix_kv(layer), mask, None, site, site, eps)

    start = jnp.minimum(last, jnp.min(jnp.stack([jnp.asarray(p.lo) for ps in by_site.values() for p in ps])))

    def blocks_from(begin, resid):  # blocks begin.. on positions first.., the last one at `read` only
        resid = lax.fori_loop(begin, last, step, resid)
        site_in = SiteRecorder(edits_suffix, frozenset(), last)
        site_out = SiteRecorder(edits_read, frozenset(), last)
        return block_suffix(resid, layer_params(last), *prefix_kv(last), mask, read - first, site_in, site_out,
                            eps)  # [batch, n_read, d_model]

    if cache.z is not None and starts_from_z(by_site):
        # block `start`'s attention reads nothing patched: it starts from the base run's z
        def after_attention(positions, edits):  # block `start` at the absolute `positions`
            site = SiteRecorder(edits, frozenset(), start)
            return block_after_attention(cache.resid_pre[start][:, positions], cache.z[start][:, positions],
                                         layer_params(start), site, eps)

        resid = lax.cond(start < last,
                         lambda: blocks_from(start + 1, after_attention(np.arange(first, seq), edits_suffix)),
                         lambda: after_attention(read, edits_read))  # the last block: at `read` only
    else:
        resid = blocks_from(start, cache.resid_pre[start][:, first:])
    for edit in final_edits:  # a resid_post patch of the last block: "resid_pre" of layer n_layer
        resid = edit(resid, config.n_layer)  # [batch, n_read, d_model]
    ln_final = ln_apply(resid, ln_scale(resid, eps), params["lnf_w"], params["lnf_b"])  # [batch, n_read, d_model]
    return unembed(ln_final, params)  # [batch, n_read, vocab]


# ------------------------------------------------------------------------------------------------ the sweeps


def chunked_vmap(fn: Callable, xs, chunk_size: int):
    """`jax.vmap(fn)(xs)` computed `chunk_size` entries at a time (lax.map over chunks); xs' leading axis is
    padded with its last entry to a whole number of chunks, so every chunk has one shape."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk_size >= n:
        return jax.vmap(fn)(xs)
    n_chunks = -(-n // chunk_size)

    def to_chunks(x):
        padded = jnp.concatenate([x, jnp.repeat(x[-1:], n_chunks * chunk_size - n, axis=0)])
        return padded.reshape(n_chunks, chunk_size, *x.shape[1:])

    out = lax.map(jax.vmap(fn), jax.tree.map(to_chunks, xs))
    return jax.tree.map(lambda y: y.reshape(n_chunks * chunk_size, *y.shape[2:])[:n], out)


def sweep_grid(run: Callable, outer, inner, chunk_size: int):
    """run(o, i) for every o in `outer` (lax.map: sequential, so `o` may set a loop bound) and i in `inner`
    (chunked vmap); outer and inner are arrays or pytrees of arrays.  -> [len(outer), len(inner), ...]

    With several devices the `inner` (swept) axis is split over all of them (`tinygpt.sharding`)."""
    def grid(part):
        return lax.map(lambda o: chunked_vmap(lambda i: run(o, i), part, chunk_size), outer)

    if jax.device_count() == 1:
        return grid(inner)
    return sharded_sweep(grid, inner, out_axis=1)


def run_bytes(config: Config, batch: int, seq: int, n_read: int = 1) -> int:
    """Rough peak activation bytes of one run (float32): a block's widest intermediates, attention scores,
    and the logits read."""
    per_position = 2 * config.d_mlp + 10 * config.d_model + 2 * config.n_head * seq
    return 4 * batch * (seq * per_position + 2 * n_read * config.vocab_size)


def chunk_size_for(config: Config, batch: int, seq: int, n_runs: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                   n_read: int = 1) -> int:
    """How many runs one vmapped chunk may hold within `memory_budget` bytes (at least 1, at most n_runs)."""
    return int(max(1, min(n_runs, memory_budget // run_bytes(config, batch, seq, n_read))))


def axis_size(site: str, axis: str, config: Config, seq: int) -> int:
    """Size of the named axis of a site's value; ValueError when the site has no such axis to index."""
    sizes = {"seq": seq, "key": seq, "head": config.n_head, "d_model": config.d_model, "d_head": config.d_head,
             "d_mlp": config.d_mlp}
    shape = SITES[site].shape
    if axis not in shape or axis not in sizes:
        axes = [a for a in shape if a in sizes]
        raise InputError(f"site {site!r} has no axis {axis!r} to sweep; its axes are {', '.join(axes)}")
    return sizes[axis]


def unit_where(site: str, axis: str | None, unit, config: Config, seq: int):
    """bool mask selecting index `unit` on the named `axis` of a site's value, size 1 on the other axes
    (axis None: the whole value)."""
    shape = SITES[site].shape
    if axis is None:
        return jnp.ones((1,) * len(shape), bool)
    size = axis_size(site, axis, config, seq)
    index = shape.index(axis)
    hot = jnp.arange(size) == unit
    return hot.reshape([size if i == index else 1 for i in range(len(shape))])


def sweep_units(params, config: Config, cache: Cache, site: str, axis: str | None, source, score: Callable, *,
                layers, units, read=(-1,), chunk_size: int | None = None):
    """score(logits) of every run that replaces unit `u` (an index on `axis`: "head", "d_mlp", "d_model",
    "seq", ...; None for the whole site) of `site` at layer `l` by `source`, at every position, for every l in
    `layers` and u in `units`.  score: logits [batch, n_read, vocab] -> any array.
    -> [len(layers), len(units), ...score's shape]"""
    check_patch_site(site)
    batch, seq = cache.attention_mask.shape
    if chunk_size is None:
        chunk_size = chunk_size_for(config, batch, seq, len(units), n_read=len(np.atleast_1d(read)))

    def run(layer, unit):
        patch = Patch(layer, layer + 1, unit_where(site, axis, unit, config, seq), source)
        return score(run_patched(params, config, cache, {site: patch}, read=read))

    return sweep_grid(run, jnp.asarray(layers), jnp.asarray(units), chunk_size)


def window_layers(layer, window: int, n_layer: int):
    """ROME's window of restored layers around `layer`: [layer - window//2, layer + ceil(window/2)), clipped."""
    lo = jnp.maximum(0, layer - window // 2)
    hi = jnp.minimum(n_layer, layer - (-window // 2))
    return lo, hi


def position_buckets(positions: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """Sorted distinct positions split into at most n_buckets contiguous groups of near-equal size."""
    positions = np.unique(positions)
    return [b for b in np.array_split(positions, max(1, min(n_buckets, len(positions)))) if len(b)]


def sweep_positions(params, config: Config, cache: Cache, sources: Mapping, score: Callable, *, layers,
                    positions, windows: Mapping | int = 1, unchanged_before: int = 0, buckets: int = 2,
                    read=(-1,), chunk_size: int | None = None):
    """For each site of `sources` (site -> its replacement values [layer, batch|1, seq, ...]), each l in
    `layers` and each p in `positions`: score(logits) of the run that replaces the site at position p by its
    source at the layers of the window around l (window 1: layer l alone).
    -> [len(sources), len(layers), len(positions), ...score's shape]

    windows           window per site (a dict), or one for all
    unchanged_before  positions before it hold the same values in the base run and in the sources (e.g.
                      tokens before the first corrupted one): patching there changes nothing, so their runs
                      are the base run, not rerun
    buckets           swept positions are split into this many groups; a group recomputes positions from its
                      first one on (more groups: less work, one more compiled loop each)
    All sites share one compiled loop per bucket: the site patched is a traced index."""
    sites = tuple(sources)
    for site in sites:
        check_patch_site(site)
    windows = {site: windows if isinstance(windows, int) else windows[site] for site in sites}
    batch, seq = cache.attention_mask.shape
    read = read_positions(read, seq)
    positions = read_positions(positions, seq)
    n_layer = config.n_layer
    layers = jnp.asarray(layers)
    kinds = jnp.repeat(jnp.arange(len(sites)), len(layers))  # the outer loop: (site, layer) pairs
    outer = (kinds, jnp.tile(layers, len(sites)))

    def run(first, kind_layer, position):
        kind, layer = kind_layer
        patches = {}
        for i, site in enumerate(sites):
            lo, hi = window_layers(layer, windows[site], n_layer)
            chosen = kind == i  # the other sites' patches never become active
            where = unit_where(site, "seq", position, config, seq)
            patches[site] = Patch(jnp.where(chosen, lo, n_layer), jnp.where(chosen, hi, n_layer), where,
                                  sources[site])
        return score(run_patched(params, config, cache, patches, first=first, read=read))

    base = score(base_logits(params, cache, read=read))
    columns = {}
    for group in position_buckets(positions[positions >= unchanged_before], buckets):
        first = int(min(group[0], read.min()))
        size = chunk_size or chunk_size_for(config, batch, seq - first, len(group), n_read=len(read))
        values = sweep_grid(lambda o, p, first=first: run(first, o, p), outer, jnp.asarray(group), size)
        columns.update({int(p): values[:, i] for i, p in enumerate(group)})
    unchanged = jnp.broadcast_to(base, (len(sites) * len(layers),) + jnp.shape(base))
    values = jnp.stack([columns.get(int(p), unchanged) for p in positions], axis=1)
    return values.reshape((len(sites), len(layers)) + values.shape[1:])
