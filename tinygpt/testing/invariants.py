"""The engine's invariants as checks: plain functions that run the forward and raise AssertionError saying what
broke, where and by how much. They need only jax and numpy; call them inside a hypothesis test
(`tinygpt.testing.strategies`), a pytest test or a notebook.

Each takes `(params, config, tokens, mask=None, ...)` (the inputs of `tinygpt.forward(params, tokens, config,
attention_mask=mask)`, config second as in the strategies) and a tolerance:
values are compared in float64 with `assert_close` (relative and absolute tolerance, the absolute one a
fraction of the expected value's scale) or bitwise with `assert_bitwise`. Unedited forwards reuse
`tinygpt.forward`'s compiled program per (config, keep, input shape), so after the first example of a shape a
check costs milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import sweep
from ..compiled import forward, make_forward
from ..edits import is_edit_value
from ..errors import InputError
from ..sweep import AFTER_ATTENTION
from ..sites import SITE_NAMES, SITES

#: Edits at these sites make a forward that keeps neither of them compute the attention pattern by the
#: reference path instead of the fused kernel: equal to float32 rounding, not bitwise (docs/engine.md, Edits).
KERNEL_SWITCHING = frozenset({"attn_scores", "attn_pattern"})
ATTENTION_SITES = ("attn_scores", "attn_pattern")  # [layer, batch, head, seq, key]


# ------------------------------------------------------------------------------------------- comparisons


def _float64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def assert_close(actual, expected, *, rtol: float = 1e-5, atol_frac: float = 1e-5, what: str = "") -> None:
    """allclose in float64 with an absolute tolerance of atol_frac times the scale (max |finite value|) of
    `expected`; shapes must agree and infinities must match exactly. AssertionError names `what`."""
    actual, expected = _float64(actual), _float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    scale = float(np.max(np.abs(expected[finite]))) if finite.any() else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_frac * max(scale, 1e-6), err_msg=what)


def assert_bitwise(actual, expected, *, what: str = "") -> None:
    """The same dtype, shape and bytes; AssertionError with the largest difference otherwise."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype}{list(actual.shape)} != {expected.dtype}{list(expected.shape)}"
    if actual.view(np.uint8).tobytes() != expected.view(np.uint8).tobytes():
        diff = np.max(np.abs(_float64(actual) - _float64(expected))[np.isfinite(_float64(expected))], initial=0.0)
        raise AssertionError(f"{what}: not bitwise identical (max |diff| {diff:.3g})")


# ---------------------------------------------------------------------------------------- trace indexing


def seq_axis(name: str) -> int:
    """Axis of the query position in a trace value of site `name` (counting a per-layer site's layer axis)."""
    site = SITES[name]
    return site.shape.index("seq") + (1 if site.per_layer else 0)


def batch_axis(name: str) -> int:
    """Axis of the batch in a trace value of site `name`."""
    return 1 if SITES[name].per_layer else 0


def real_part(value, name: str, row: int, n_pad: int) -> np.ndarray:
    """Batch row `row` of a trace value at its real positions (after `n_pad` left padding), without the batch
    axis; the attention sites restricted to real queries and real keys."""
    value = np.take(np.asarray(value), row, axis=batch_axis(name))
    axis = seq_axis(name) - 1
    value = np.take(value, np.arange(n_pad, value.shape[axis]), axis=axis)
    return value[..., n_pad:] if name in ATTENTION_SITES else value


# ---------------------------------------------------------------------------------------------- the checks


def check_causal(params, config, tokens, mask=None, *, position: int | None = None, edits=None, seed: int = 0,
                 require_change: bool = True, tolerance: float = 1e-6) -> None:
    """Changing the tokens at `position` and after changes no site at earlier positions (the whole attention
    rows of earlier queries included). Every row's tokens from `position` on are replaced by other ids (drawn
    from `seed`).

    position        default: the middle of the sequence; 1 <= position < seq
    edits           applied to both runs: check that your own edits keep the forward causal
    require_change  also require that the new tokens change the logits from `position` on (else the check
                    proves nothing); turn it off for edits that may erase the tokens (e.g. zeroing embed)"""
    tokens = np.asarray(tokens)
    n_batch, n_seq = tokens.shape
    position = max(1, n_seq // 2) if position is None else position
    if not 1 <= position < n_seq:
        raise InputError(f"check_causal: position must be in [1, {n_seq}) for {n_seq} tokens, got {position}")
    if config.vocab_size < 2:
        raise InputError("check_causal: a vocabulary of one token cannot change a token")
    shift = np.random.default_rng(seed).integers(1, config.vocab_size, (n_batch, n_seq - position))
    changed = tokens.copy()
    changed[:, position:] = (tokens[:, position:] + shift) % config.vocab_size
    before = forward(params, tokens, config, attention_mask=mask, edits=edits)
    after = forward(params, changed, config, attention_mask=mask, edits=edits)
    past = np.arange(position)
    for name in before.kept():
        assert_close(np.take(np.asarray(after[name]), past, axis=seq_axis(name)),
                     np.take(np.asarray(before[name]), past, axis=seq_axis(name)), rtol=tolerance,
                     atol_frac=tolerance, what=f"{name} at positions < {position}, tokens changed from {position} on")
    assert not require_change or not np.allclose(np.asarray(before.logits)[:, position:],
                                                  np.asarray(after.logits)[:, position:]), \
        f"changing the tokens from position {position} on left the logits there unchanged: the check proves nothing"


def check_residual_decomposition(params, config, tokens, mask=None, *, edits=None, tolerance: float = 1e-5) -> None:
    """The residual stream is the sum of the writes into it: resid_pre[0] = embed + pos_embed; resid_mid =
    resid_pre + attn_out and resid_post = resid_mid + mlp_out in each block; each block's resid_pre is the
    previous resid_post, bitwise; and the last resid_post = embed + pos_embed + the sum of every attn_out and
    mlp_out. With `edits`, of the edited forward: an edit of the residual stream itself breaks it."""
    trace = forward(params, tokens, config, attention_mask=mask, edits=edits)
    total = _float64(trace.embed) + _float64(trace.pos_embed)
    close = functools.partial(assert_close, rtol=tolerance, atol_frac=tolerance)
    close(trace.resid_pre[0], total, what="resid_pre[0] = embed + pos_embed")
    for layer in range(config.n_layer):
        total = total + _float64(trace.attn_out[layer]) + _float64(trace.mlp_out[layer])
        close(trace.resid_mid[layer], _float64(trace.resid_pre[layer]) + _float64(trace.attn_out[layer]),
              what=f"resid_mid[{layer}] = resid_pre + attn_out")
        close(trace.resid_post[layer], _float64(trace.resid_mid[layer]) + _float64(trace.mlp_out[layer]),
              what=f"resid_post[{layer}] = resid_mid + mlp_out")
        if layer + 1 < config.n_layer:
            assert_bitwise(trace.resid_pre[layer + 1], trace.resid_post[layer],
                           what=f"resid_pre[{layer + 1}] = resid_post[{layer}]")
    close(trace.resid_post[-1], total, what="resid_post[-1] = embed + pos_embed + sum(attn_out + mlp_out)")


def check_head_sums(params, config, tokens, mask=None, *, edits=None, tolerance: float = 1e-5) -> None:
    """Each head's write is its z through its slice of W_O (head_out = z @ W_O per head), and the attention
    output is the sum of the heads' writes plus b_O (of the forward with `edits`, if given)."""
    trace = forward(params, tokens, config, attention_mask=mask, edits=edits)
    blocks = params["blocks"]
    for layer in range(config.n_layer):
        per_head = np.einsum("bshd,hdm->bshm", _float64(trace.z[layer]), _float64(blocks["W_O"][layer]))
        assert_close(trace.head_out[layer], per_head, rtol=tolerance, atol_frac=tolerance,
                     what=f"head_out[{layer}] = z @ W_O per head")
        heads_sum = _float64(trace.head_out[layer]).sum(axis=-2) + _float64(blocks["b_O"][layer])
        assert_close(trace.attn_out[layer], heads_sum, rtol=tolerance, atol_frac=tolerance,
                     what=f"attn_out[{layer}] = sum of head_out + b_O")


def check_attention_patterns(params, config, tokens, mask=None, *, edits=None, tolerance: float = 1e-5) -> None:
    """Every pattern row sums to 1 and is >= 0; entries above the diagonal are exactly 0 (their scores -inf);
    with a mask, a real query gives exactly 0 to padding keys (their scores -inf). With `edits`, of the edited
    forward."""
    trace = forward(params, tokens, config, attention_mask=mask, edits=edits)  # every site: one compiled program
    _check_patterns(trace.attn_pattern, trace.attn_scores, mask, tolerance)


def _check_patterns(pattern, scores, mask, tolerance: float) -> None:
    """check_attention_patterns on computed pattern and scores [layer, batch, head, seq, key]."""
    pattern, scores = np.asarray(pattern), np.asarray(scores)
    n_seq = pattern.shape[-1]
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=0, atol=tolerance, err_msg="pattern rows sum to 1")
    assert (pattern >= 0).all(), "the attention pattern has negative entries"
    above = np.triu(np.ones((n_seq, n_seq), bool), k=1)
    assert (pattern[..., above] == 0).all(), "the attention pattern is non-zero above the diagonal"
    assert (scores[..., above] == -np.inf).all(), "attention scores above the diagonal are not -inf"
    if mask is not None:
        real = np.asarray(mask).astype(bool)
        real_query_pad_key = real[:, None, :, None] & ~real[:, None, None, :]  # [batch, 1, seq, key]
        selected = np.broadcast_to(real_query_pad_key[None], pattern.shape)
        assert (pattern[selected] == 0).all(), "a real query attends a padding key"
        assert (scores[selected] == -np.inf).all(), "a padding key's score is not -inf for a real query"


def check_padding_invariance(params, config, tokens, mask, *, edits=None, tolerance: float = 1e-5) -> None:
    """Left padding changes nothing real: every row's real positions hold, at every site, the values of that
    row's real tokens run alone without padding (attention restricted to real queries and keys); every value,
    at padding positions too, is finite (but attn_scores' -inf); and the patterns pass
    `check_attention_patterns` with the mask. With `edits`, in every run: an edit that picks positions by their
    index in the array rather than by the token's position (see docs/engine.md, "Edits aimed at tokens") breaks it.

    The rows with the same number of real tokens run as one unpadded batch, repeated to the padded batch's
    size (batch rows are independent), so the reference runs share a compiled program per length."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    n_batch, n_seq = tokens.shape
    padded = forward(params, tokens, config, attention_mask=mask, edits=edits)
    n_real = mask.sum(axis=1)
    for length in np.unique(n_real):
        rows = np.flatnonzero(n_real == length)
        alone = forward(params, tokens[np.resize(rows, n_batch), n_seq - length:], config, edits=edits)
        for name in SITE_NAMES:
            for i, row in enumerate(rows):
                assert_close(real_part(padded[name], name, row, n_seq - length), real_part(alone[name], name, i, 0),
                             rtol=tolerance, atol_frac=tolerance,
                             what=f"{name}, batch row {row} ({length} real tokens after {n_seq - length} pads)")
    for name in SITE_NAMES:
        if name != "attn_scores":
            assert np.isfinite(np.asarray(padded[name])).all(), f"{name} has non-finite values"
    _check_patterns(padded.attn_pattern, padded.attn_scores, mask, tolerance)


def identity(value, layer):
    """The identity edit: returns its input."""
    return value


def _fresh_copy(value, layer):
    """An edit returning a new array equal to its input."""
    return value * 1 + 0


@functools.lru_cache(maxsize=32)
def _edited_forward(config, keep, sites, edit):
    """The compiled forward with `edit` at each of `sites` (cached: one compile per input shape)."""
    return make_forward(config, keep=keep, edits={name: edit for name in sites})


def check_identity_edit(params, config, tokens, mask=None, *, sites=SITE_NAMES, keep=None, edit=identity,
                        jit: bool = True, fresh: bool = False, baseline=None, tolerance: float = 1e-5) -> None:
    """An edit returning its input, at every site of `sites` at once, leaves every kept value bitwise equal to
    the unedited forward's; equal to float32 rounding (`tolerance`) where the edits switch the attention kernel
    (an edit at attn_scores or attn_pattern when neither is kept: KERNEL_SWITCHING).

    edit      the edit `(value, layer) -> value` that should change nothing (default: `identity`); under jit it
              is compiled once per (config, keep, sites, edit)
    jit       compare compiled forwards (True) or op-by-op ones (False, under jax.disable_jit)
    fresh     also check an edit returning a new array equal to its input (value * 1 + 0): equal within
              `tolerance`
    baseline  the unedited trace for these inputs and keep, computed the same way (jit or not), when you have
              it: saves a forward"""
    sites, keep = tuple(sites), None if keep is None else tuple(keep)

    def run(edit):
        if jit:
            if edit is None:
                return forward(params, tokens, config, attention_mask=mask, keep=keep)
            return _edited_forward(config, keep, sites, edit)(params, tokens, mask)
        with jax.disable_jit():
            return forward(params, tokens, config, attention_mask=mask, keep=keep,
                           edits=None if edit is None else {name: edit for name in sites})

    base = run(None) if baseline is None else baseline
    expected = SITE_NAMES if keep is None else tuple(name for name in SITE_NAMES if name in keep)
    assert base.kept() == expected, f"the unedited forward kept {base.kept()}, not {expected}"
    switches = keep is not None and bool(KERNEL_SWITCHING & set(sites)) and not KERNEL_SWITCHING & set(keep)
    same = run(edit)
    assert same.kept() == base.kept(), f"identity edits changed the kept sites: {same.kept()} != {base.kept()}"
    where = f"identity edits at {', '.join(sites) if len(sites) < 4 else f'{len(sites)} sites'}, keep={keep}"
    for name in base.kept():
        if switches:
            assert_close(same[name], base[name], rtol=tolerance, atol_frac=tolerance, what=f"{name}, {where}")
        else:
            assert_bitwise(same[name], base[name], what=f"{name}, {where}")
    if fresh:
        equal = run(_fresh_copy)
        for name in base.kept():
            assert_close(equal[name], base[name], rtol=tolerance, atol_frac=tolerance,
                         what=f"{name}, fresh-but-equal {where}")


def check_jit_equals_eager(params, config, tokens, mask=None, *, edits=None, tolerance: float = 1e-5) -> None:
    """The compiled forward and the op-by-op one (under jax.disable_jit) keep every site, with equal values.
    With `edits`, both run them: an edit that acts differently on a tracer and on an array breaks it."""
    if edits is None:
        jitted = forward(params, tokens, config, attention_mask=mask)  # the cached compiled program
    elif is_edit_value(edits) or (isinstance(edits, (list, tuple)) and all(map(is_edit_value, edits))):
        # edit values are pytrees: their arrays are arguments, their structure part of the cache key
        jitted = _jit_forward_values(params, tokens, mask, edits, config=config)
    else:
        key = _hashable_edits(edits)
        if key is not None:  # the same functions (equal, hashable) reuse one compiled program per shape
            jitted = _jit_forward_functions(params, tokens, mask, config=config, edits=key)
        else:  # closures that cannot be a cache key: compiled afresh
            jitted = jax.jit(lambda p, t, m: forward(p, t, config, attention_mask=m, edits=edits))(params, tokens,
                                                                                                 mask)
    with jax.disable_jit():
        eager = forward(params, tokens, config, attention_mask=mask, edits=edits)
    assert jitted.kept() == eager.kept() == SITE_NAMES, f"kept sites: jit {jitted.kept()}, eager {eager.kept()}"
    for name in SITE_NAMES:
        assert_close(jitted[name], eager[name], rtol=tolerance, atol_frac=tolerance, what=f"{name}: jit vs eager")


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_forward_values(params, tokens, mask, edits, *, config):
    """`forward` with edit values, compiled once per (config, edit structure, shapes)."""
    return forward(params, tokens, config, attention_mask=mask, edits=edits)


@functools.partial(jax.jit, static_argnames=("config", "edits"))
def _jit_forward_functions(params, tokens, mask, *, config, edits):
    """`forward` with function edits given as a hashable ((site, fn or fns), ...), compiled once per
    (config, edits, shapes)."""
    return forward(params, tokens, config, attention_mask=mask, edits=dict(edits))


def _hashable_edits(edits):
    """A mapping of edits as a hashable ((site, fn or tuple of fns), ...) a compile cache can key on (equal
    SiteEdits give equal keys), or None where an entry cannot be hashed."""
    if not isinstance(edits, Mapping):
        return None
    key = tuple((name, tuple(fns) if isinstance(fns, list) else fns) for name, fns in edits.items())
    try:
        hash(key)
    except TypeError:
        return None
    return key


# ------------------------------------------------------------------------------------ sweeps = single runs


def answer_log_prob(logits, answer):
    """The score the sweep checks compare: log P(answer) at the last read position.  logits [batch, n_read,
    vocab] -> [batch]"""
    return jax.nn.log_softmax(logits[:, -1])[:, answer]


@functools.partial(jax.jit, static_argnames=("config", "site", "axis", "chunk_size", "z"))
def unit_sweep(params, tokens, mask, source, answer, *, config, site, axis, chunk_size=None, z=False):
    """`tinygpt.sweep.sweep_units` replacing each unit on `axis` of `site` at each layer by `source`, scored by
    `answer_log_prob`, compiled once per static arguments and shapes.  -> [layer, unit, batch]"""
    cache = sweep.cache_run(params, tokens, config, attention_mask=mask, z=z)
    assert (cache.z is not None) == z, f"cache_run(z={z}) returned a cache {'without' if z else 'with'} z"
    units = jnp.arange(sweep.axis_size(site, axis, config, tokens.shape[1]))
    return sweep.sweep_units(params, config, cache, site, axis, source, lambda logits: answer_log_prob(logits, answer),
                             layers=jnp.arange(config.n_layer), units=units, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("config", "site", "axis"))
def single_unit_run(params, tokens, mask, source, answer, layer, unit, *, config, site, axis):
    """One plain `patched_forward` replacing one unit of `site` at one layer (both traced) by `source`; the
    score.  -> [batch]"""
    patch = sweep.Patch(layer, layer + 1, sweep.unit_where(site, axis, unit, config, tokens.shape[1]), source)
    return answer_log_prob(sweep.patched_forward(params, tokens, config, {site: patch}, attention_mask=mask), answer)


def check_sweep_equals_single_runs(params, config, tokens, mask=None, *, site: str = "z", axis: str = "head",
                                   source=None, answer: int = 0, entries=None, chunk_size: int | None = None,
                                   z: bool = False, tolerance: float = 1e-5) -> None:
    """A unit sweep (`tinygpt.sweep.sweep_units`: every head, neuron, ... of `site` at every layer, replaced by
    `source`) equals the plain patched forwards run one by one (`tinygpt.sweep.patched_forward`), within an
    absolute `tolerance` on log P(answer) at the last position.

    source      the replacement values, [layer, ...the site's shape], each axis full or 1; default zeros
                (zero ablation)
    entries     (layer, unit) pairs to compare (every one by default; the sweep always runs whole)
    chunk_size  runs vmapped at once (None: sweep's memory budget); z: sweep from a cache holding each
                block's z (sites after the attention start their first block there)"""
    n_seq = np.shape(tokens)[1]
    if source is None:
        source = jnp.zeros((config.n_layer,) + (1,) * len(SITES[site].shape))
    size = sweep.axis_size(site, axis, config, n_seq)
    values = unit_sweep(params, tokens, mask, source, answer, config=config, site=site, axis=axis,
                        chunk_size=chunk_size, z=z)
    assert values.shape == (config.n_layer, size, np.shape(tokens)[0]), f"unit sweep's shape {values.shape}"
    if entries is None:
        entries = [(layer, unit) for layer in range(config.n_layer) for unit in range(size)]
    for layer, unit in entries:
        single = single_unit_run(params, tokens, mask, source, answer, layer, unit, config=config, site=site, axis=axis)
        np.testing.assert_allclose(values[layer, unit], single, atol=tolerance, rtol=0,
                                   err_msg=f"sweep of {site} over {axis}: unit {unit} at layer {layer} "
                                           f"(z in the cache: {z}) vs its single run")


@functools.partial(jax.jit, static_argnames=("config", "sites", "windows", "unchanged_before", "buckets", "read", "z"))
def position_sweeps(params, clean, corrupt, noise, answer, *, config, sites, windows, unchanged_before, buckets,
                    read, z):
    """`tinygpt.sweep.sweep_positions` restoring each of `sites` of the clean run at every (layer, position) of
    the corrupted run (`noise` added to its embeddings), scored by `answer_log_prob`; with `z`, also from a cache
    holding z, of all `sites` and of those after the attention alone (their runs start from z).
    -> (values [site, layer, position, batch], {"z": ..., "after attention": ...}, the base run's score)"""
    sources = forward(params, clean, config, keep=sites)
    edits = None if noise is None else {"embed": lambda e, layer: e + noise}
    score = functools.partial(answer_log_prob, answer=answer)

    def run(cache, kinds):
        return sweep.sweep_positions(params, config, cache, {k: sources[k] for k in kinds}, score,
                                     layers=jnp.arange(config.n_layer), positions=np.arange(clean.shape[1]),
                                     windows=dict(windows), unchanged_before=unchanged_before, buckets=buckets,
                                     read=read)

    cache = sweep.cache_run(params, corrupt, config, edits=edits)
    variants = {}
    if z:
        z_cache = sweep.cache_run(params, corrupt, config, edits=edits, z=True)
        variants["z"] = run(z_cache, sites)
        late = tuple(site for site in sites if site in AFTER_ATTENTION)
        if late:
            variants["after attention"] = run(z_cache, late)
    return run(cache, sites), variants, score(sweep.base_logits(params, cache, read=read))


@functools.partial(jax.jit, static_argnames=("config", "sites", "windows", "read"))
def single_position_run(params, clean, corrupt, noise, answer, kind, layer, position, *, config, sites, windows,
                        read):
    """One plain `patched_forward` restoring site number `kind` of the clean run at `position` over the window
    of layers around `layer` (all three traced); the score.  -> [batch]"""
    sources = forward(params, clean, config, keep=sites)
    n_seq = clean.shape[1]
    patches = {}
    for i, site in enumerate(sites):
        lo, hi = sweep.window_layers(layer, dict(windows)[site], config.n_layer)
        off = config.n_layer  # an empty layer range: not the kind restored
        patches[site] = sweep.Patch(jnp.where(kind == i, lo, off), jnp.where(kind == i, hi, off),
                                    sweep.unit_where(site, "seq", position, config, n_seq), sources[site])
    edits = None if noise is None else {"embed": lambda e, layer: e + noise}
    return answer_log_prob(sweep.patched_forward(params, corrupt, config, patches, edits=edits, read=read), answer)


def check_position_sweep_equals_single_runs(params, config, clean, corrupt, *, sites=("resid_pre",), windows=1,
                                            noise=None, answer: int = 0, unchanged_before: int = 0,
                                            buckets: int = 2, read=(-1,), z: bool = True, entries=None,
                                            tolerance: float = 1e-5) -> None:
    """A position sweep (`tinygpt.sweep.sweep_positions`, ROME's causal tracing: each of `sites` of the `clean`
    run restored at each (layer, position) of the `corrupt` run) equals the plain patched forwards run one by
    one, within an absolute `tolerance` on log P(answer) at the last read position; positions before
    `unchanged_before` (where clean and corrupt agree) score as the unpatched corrupted run.

    windows  layers restored around each layer: an int, or {site: int}
    noise    added to the corrupted run's embeddings, [batch, seq, d_model] (ROME's noised subject)
    z        also check the sweeps from a cache holding z: of every site, and of the sites after the attention
             alone (whose runs start from z)
    entries  (site index, layer, position) triples to compare (every one by default)"""
    sites = tuple(sites)
    windows = tuple((site, windows if isinstance(windows, int) else windows[site]) for site in sites)
    read = tuple(np.atleast_1d(read).tolist())
    values, variants, base = position_sweeps(params, clean, corrupt, noise, answer, config=config, sites=sites,
                                             windows=windows, unchanged_before=unchanged_before, buckets=buckets,
                                             read=read, z=z)
    n_batch, n_seq = np.shape(clean)
    assert values.shape == (len(sites), config.n_layer, n_seq, n_batch), f"position sweep's shape {values.shape}"
    if entries is None:
        entries = [(k, layer, p) for k in range(len(sites)) for layer in range(config.n_layer) for p in range(n_seq)]
    late = [k for k, site in enumerate(sites) if site in AFTER_ATTENTION]
    for k, layer, position in entries:
        single = single_position_run(params, clean, corrupt, noise, answer, k, layer, position, config=config,
                                     sites=sites, windows=windows, read=read)
        what = f"{sites[k]} restored at layer {layer}, position {position}"
        np.testing.assert_allclose(values[k, layer, position], single, atol=tolerance, rtol=0, err_msg=what)
        if "z" in variants:
            np.testing.assert_allclose(variants["z"][k, layer, position], single, atol=tolerance, rtol=0,
                                       err_msg=f"{what}, from a cache with z")
        if "after attention" in variants and k in late:
            np.testing.assert_allclose(variants["after attention"][late.index(k), layer, position], single,
                                       atol=tolerance, rtol=0, err_msg=f"{what}, sweeping the sites after attention")
    unchanged = values[:, :, :unchanged_before]
    np.testing.assert_allclose(unchanged, np.broadcast_to(base, unchanged.shape), atol=tolerance, rtol=0,
                               err_msg=f"restoring before position {unchanged_before} (clean = corrupt there) "
                                       "should leave the corrupted run's score")
