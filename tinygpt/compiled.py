"""The forward as the API runs it: `tinygpt.forward` and `tinygpt.make_forward`.

Both are the reference `tinygpt.model.forward` plus three things a caller wants around it: the inputs are
checked first (`tinygpt.inputs`: one error naming the problem, never a silently clamped id), the compiled
program is cached per (config, keep, input shapes, and the structure of edit values), and the result is a
`Trace`, compact on request.
"""

from __future__ import annotations

import functools

import jax

from . import model
from .config import Config
from .inputs import check_inputs
from .recorder import Edits, check_edits, normalize_edits, normalize_keep, values_only
from .trace import Trace, derived_sites, forward_trace


def forward(params, tokens, config: Config, *, edits: Edits | None = None, attention_mask=None, keep=None,
            compact: bool = False) -> Trace:
    """GPT-2's forward pass, returning a `Trace` of every kept site.

    params          the params pytree (`tinygpt.params`)
    tokens          int [batch, seq] token ids
    config          static `Config`
    edits           edit values (`tinygpt.edits`: Zero, Set, Scale, Add, Patch, Mean, or a list / Compose of
                    them), or {site: fn(value, layer) -> value} (or a sequence of fns, applied in order);
                    `layer` is the block index (a traced int inside the scan) for per-layer sites, None for
                    the others. An edit with a `positions` parameter, fn(value, layer, positions), also gets
                    the tokens' absolute positions [batch, seq] (padding skipped, as the position embedding
                    counts). Edit values run in a program compiled once per their structure, their arrays
                    passed in; function edits are traced again on every call (the slower, general path).
    attention_mask  [batch, seq], 1 for real tokens and 0 for (left) padding; positions skip the padding
    keep            site names to return (default: all). Under `jit`, values neither kept nor needed are
                    never computed or stored; logits are computed only when kept or edited.
    compact         store only the kept sites that are not cheap functions of other kept sites; the trace
                    computes the others (`tinygpt.sites.DERIVED`: ln1, attn_scores, attn_pattern, head_out,
                    resid_mid, ln2, mlp_post, resid_post) when they are read. A full trace then holds about a
                    third of the bytes, and the forward skips the per-head writes and, the scores not being
                    stored, takes the fused attention; see `Trace` for what that means for tree_map.

    Pure and traceable: jit it with `config` and `keep` static (see `tinygpt.make_forward`). Called eagerly
    without edits or with edit values only, it runs one compiled program per (config, keep, compact, input
    shapes, edits' structure).
    """
    edits, keep = normalize_edits(edits), normalize_keep(keep)
    check_edits(edits, config)
    tokens, attention_mask = check_inputs(tokens, attention_mask, config)
    derived = derived_sites(keep, edits) if compact else frozenset()  # computed on read, not stored
    if values_only(edits) and at_top_level():  # eager: one compiled program per (config, keep, shapes, edits)
        sites = compiled_forward(config, keep - derived)(params, tokens, attention_mask, edits)
    else:
        sites = model.forward(params, tokens, config, attention_mask=attention_mask, edits=edits, keep=keep - derived)
    return forward_trace(sites, derived, params, attention_mask)


def make_forward(config: Config, *, keep=None, edits: Edits | None = None, compact: bool = False):
    """A jit-compiled `(params, tokens, attention_mask=None) -> Trace` for a fixed config, keep, edits and
    compact (see `forward`). Inputs are checked (concretely) before entering the compiled function."""
    keep, edits = normalize_keep(keep), normalize_edits(edits)
    check_edits(edits, config)
    derived = derived_sites(keep, edits) if compact else frozenset()

    @jax.jit
    def compiled(params, tokens, attention_mask):
        return model.forward(params, tokens, config, attention_mask=attention_mask, edits=edits, keep=keep - derived)

    def run(params, tokens, attention_mask=None):
        tokens, attention_mask = check_inputs(tokens, attention_mask, config)
        return forward_trace(compiled(params, tokens, attention_mask), derived, params, attention_mask)

    return run


@functools.lru_cache(maxsize=64)
def compiled_forward(config: Config, keep: frozenset):
    """`model.forward` jit-compiled for `config` and the stored sites `keep` (cached): `(params, tokens,
    attention_mask, edits)`, with normalized edit values as an argument (jit compiles once per their
    structure and takes their arrays as inputs; {} for none)."""
    return jax.jit(lambda params, tokens, attention_mask, edits: model.forward(
        params, tokens, config, attention_mask=attention_mask, edits=edits, keep=keep))


def at_top_level() -> bool:
    """True when no jax transformation (jit, vmap, grad, ...) is tracing, so a cached compiled program may be
    used. A forward with function edits always runs as written: their closures may hold arrays that change
    between calls, and a cache keyed on the function would silently reuse stale values. (Edit values carry
    their arrays as pytree leaves, so a cached program is given the current ones.)"""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # private API moved: run as written (correct, only slower)
        return False
    return trace_state_clean()
