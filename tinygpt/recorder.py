"""The site recorder: the one hook point of the forward, `value = site(name, value)`.

Edits are plain functions `(value, layer) -> value` keyed by site name. At each site the forward calls
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

from .errors import InputError, InputTypeError
from .sites import SITE_NAMES, SITES, check_site_names, site_of_tl

Edit = Callable[[jax.Array, Any], jax.Array]
Edits = Mapping[str, Union[Edit, Sequence[Edit]]]


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


def _at_layer(fn, only: int):
    """`_wrap_at_layer`, the same wrapper for the same (fn, layer), so compile caches keyed by edits hit."""
    try:
        return _cached_at_layer(fn, only)
    except TypeError:  # an unhashable callable
        return _wrap_at_layer(fn, only)


def _wrap_at_layer(fn, only: int):
    """The edit fn, applied only at block `only` (the recorder's layer is a traced int inside the scan)."""
    if takes_positions(fn):
        def edit(value, layer, positions):
            if layer is None:
                return value
            return jnp.where(layer == only, jnp.asarray(fn(value, layer, positions=positions), value.dtype), value)
    else:
        def edit(value, layer):
            if layer is None:
                return value
            return jnp.where(layer == only, jnp.asarray(fn(value, layer), value.dtype), value)
    return edit


_cached_at_layer = functools.lru_cache(maxsize=256)(_wrap_at_layer)


def normalize_edits(edits: Edits | None) -> dict[str, tuple[Edit, ...]]:
    """Check site names and make every entry a tuple of callables. A TransformerLens hook name edits its
    site; a per-layer one (`blocks.3.hook_resid_post`) only at that block."""
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise InputTypeError(f"edits must be a mapping from site name to function, got {type(edits).__name__}")
    check_site_names(edits.keys(), "edits", tl=True)
    out: dict[str, tuple[Edit, ...]] = {}
    for name, fns in edits.items():
        fns = (fns,) if callable(fns) else tuple(fns)
        for fn in fns:
            if not callable(fn):
                raise InputTypeError(f"edits[{name!r}] must be a function (value, layer) -> value, got {fn!r}")
        site, layer = (name, None) if name in SITES else site_of_tl(name)
        if layer is not None:
            fns = tuple(_at_layer(fn, layer) for fn in fns)
        out[site] = out.get(site, ()) + fns
    return {n: out[n] for n in SITE_NAMES if n in out}


def takes_positions(fn) -> bool:
    """Whether an edit declares a `positions` parameter (see the module docstring)."""
    try:
        return "positions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return False


class SiteRecorder:
    """Applies edits at a site and keeps its value if asked. One per block call (and one for the
    embedding / final sites), so `layer` is the block index (a traced int inside the scan) or None.
    `positions` [batch, seq] are the absolute positions of the values' seq entries, for the edits that take
    them (None where the caller has none to give)."""

    def __init__(self, edits: dict[str, tuple[Edit, ...]], keep: frozenset[str], layer, positions=None):
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
