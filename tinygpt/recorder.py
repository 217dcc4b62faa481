"""The site recorder: the one hook point of the forward, `value = site(name, value)`.

Edits are edit values (`tinygpt.edits`: Zero, Set, Scale, Add, Patch, Mean, Compose; each names its site) or
plain functions `(value, layer) -> value` keyed by site name. At each site the forward calls
`value = site(name, value)`, which applies the site's edits in order and keeps the result if asked. An edit
that declares a parameter named `positions`, `(value, layer, positions) -> value`, is also given each
sequence entry's absolute position, int [batch, seq] (the value's seq axis; the query axis of attention
scores and patterns): the token's index among the row's real tokens, as the position embedding counts it.
That is what ties an edit to a token when the value does not start at position 0: a left-padded row, or a
generation step, whose value holds only the new tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from .edits import Edit, check_registered, flatten, is_edit_value
from .errors import InputError, InputTypeError
from .sites import SITE_NAMES, SITES, check_site_names, site_of_tl

EditFn = Callable[[jax.Array, Any], jax.Array]
Edits = Union[Mapping[str, Union[EditFn, Sequence[EditFn]]], Edit, Sequence[Edit]]


def normalize_keep(keep: Iterable[str] | str | None) -> frozenset[str]:
    """`None` or "all" keeps every site; otherwise a collection of site names or TransformerLens hook names
    (`tinygpt.sites.TL_NAMES`). A per-layer TL name (`blocks.3.hook_resid_post`) keeps the whole site, every
    layer: a trace stacks a site's blocks."""
    if keep is None or keep == "all":
        return frozenset(SITE_NAMES)
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    check_site_names(keep, "keep", tl=True)
    return frozenset(name if name in SITES else site_of_tl(name)[0] for name in keep)


def _at_layer(fn, only: int, name: str):
    """`_wrap_at_layer`, the same wrapper for the same (fn, layer), so compile caches keyed by edits hit."""
    try:
        return _cached_at_layer(fn, only, name)
    except TypeError:  # an unhashable callable
        return _wrap_at_layer(fn, only, name)


def _wrap_at_layer(fn, only: int, name: str):
    """The edit fn, applied only at block `only` (the recorder's layer is a traced int inside the scan).
    `name` is the key it was given under (a per-layer TransformerLens hook name), for the error."""
    def at_layer(value, layer, new):
        new = jnp.asarray(new, value.dtype)
        if new.shape != value.shape:  # checked before jnp.where, which would broadcast it
            raise InputError(f"edit at site {name!r} returned shape {new.shape}, but the site's value has shape "
                             f"{value.shape}")
        return jnp.where(layer == only, new, value)

    if takes_positions(fn):
        def edit(value, layer, positions):
            if layer is None:
                return value
            return at_layer(value, layer, fn(value, layer, positions=positions))
    else:
        def edit(value, layer):
            if layer is None:
                return value
            return at_layer(value, layer, fn(value, layer))
    return edit


_cached_at_layer = functools.lru_cache(maxsize=256)(_wrap_at_layer)


def normalize_edits(edits: Edits | None) -> dict[str, tuple[EditFn, ...]]:
    """Check site names and make every entry a tuple of callables, in site order. `edits` is an edit value
    (`tinygpt.edits`), a sequence of them, or a mapping {site: function or edit value, or a sequence of
    them}. A TransformerLens hook name edits its site; a per-layer one (`blocks.3.hook_resid_post`) only at
    that block. An edit value keyed by a site must name that site."""
    if edits is None:
        return {}
    if is_edit_value(edits) or (isinstance(edits, (list, tuple)) and all(map(is_edit_value, edits))):
        edits = [(edit.site, edit) for edit in flatten(edits)]
    elif isinstance(edits, Mapping):
        check_site_names(edits.keys(), "edits", tl=True)
        edits = [(name, fn) for name, fns in edits.items() for fn in _entries(name, fns)]
    else:
        raise InputTypeError("edits must be an edit value (tinygpt.edits), a list of them, or a mapping from "
                             f"site name to function, got {type(edits).__name__}")
    out: dict[str, tuple[EditFn, ...]] = {}
    for name, fn in edits:
        site, layer = (name, None) if name in SITES else site_of_tl(name)
        if isinstance(fn, Edit):
            check_registered(fn)
            if fn.site != site or (layer is not None and fn.layer != layer):
                raise InputError(f"edits[{name!r}] holds an edit of site {fn.site!r}"
                                 + (f" at layer {fn.layer}" if fn.layer is not None else "")
                                 + "; an edit value names its own site: pass a list of edits instead")
        elif layer is not None:
            fn = _at_layer(fn, layer, name)
        out[site] = out.get(site, ()) + (fn,)
    return {n: out[n] for n in SITE_NAMES if n in out}


def _entries(name: str, fns) -> tuple:
    """The edits of one mapping entry: a function or edit value, or a sequence of them."""
    fns = (fns,) if callable(fns) or is_edit_value(fns) else tuple(fns)
    fns = tuple(e for fn in fns for e in (flatten(fn) if is_edit_value(fn) else (fn,)))
    for fn in fns:
        if not callable(fn):
            raise InputTypeError(f"edits[{name!r}] must be a function (value, layer) -> value or an edit value "
                                 f"(tinygpt.edits), got {fn!r}")
    return fns


def check_edits(edits: Mapping[str, tuple], config) -> None:
    """Raise InputError for an edit value whose layer, head, index or positions lie outside a model of
    `config`: it would silently change nothing."""
    for fns in edits.values():
        for fn in fns:
            if isinstance(fn, Edit):
                fn.check(config)


def values_only(edits: Mapping[str, tuple]) -> bool:
    """Whether normalized `edits` are all edit values, so their arrays can be a compiled program's arguments
    (and a forward with them can reuse a program compiled for their structure)."""
    return all(isinstance(fn, Edit) for fns in edits.values() for fn in fns)


def takes_positions(fn) -> bool:
    """Whether an edit declares a `positions` parameter (see the module docstring); an edit value, whether it
    selects positions."""
    if isinstance(fn, Edit):
        return fn.positions is not None
    try:
        return "positions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return False


class SiteRecorder:
    """Applies edits at a site and keeps its value if asked. One per block call (and one for the
    embedding / final sites), so `layer` is the block index (a traced int inside the scan) or None.
    `positions` [batch, seq] are the absolute positions of the values' seq entries, for the edits that take
    them (None where the caller has none to give)."""

    def __init__(self, edits: dict[str, tuple[EditFn, ...]], keep: frozenset[str], layer, positions=None):
        self.edits, self.keep, self.layer, self.positions = edits, keep, layer, positions
        self.kept: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        """Whether `name` is read (kept) or written (edited): the forward computes optional values, such as
        per-head outputs, only then."""
        return name in self.keep or name in self.edits

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        for fn in self.edits.get(name, ()):
            if takes_positions(fn):
                if self.positions is None:
                    raise InputError(f"the edit at site {name!r} takes positions, and this computation has none "
                                     "to give it (edits with positions run in forward and generate)")
                new = fn(value, self.layer, positions=self.positions)
            else:
                new = fn(value, self.layer)
            if new is value:
                continue
            new = jnp.asarray(new)
            if new.shape != value.shape:
                raise InputError(
                    f"edit at site {name!r} returned shape {new.shape}, but the site's value has shape "
                    f"{value.shape}"
                )
            value = new.astype(value.dtype)
        if name in self.keep:
            self.kept[name] = value
        return value
