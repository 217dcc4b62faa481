"""The Trace (every named intermediate, returned as a value) and the site recorder used by the forward.

A `Trace` is a pytree with one field per site of `tinygpt.sites.SITES`; a field is `None` when it was not
kept. Per-layer sites are stacked over blocks: `trace.resid_post[3]` is block 3's output.

Edits are plain functions `(value, layer) -> value` keyed by site name. At each site the forward calls
`value = site(name, value)`, which applies the site's edits in order and keeps the result if asked. An edit
that declares a parameter named `positions`, `(value, layer, positions) -> value`, is also given each
sequence entry's absolute position, int [batch, seq] (the value's seq axis; the query axis of attention
scores and patterns): the token's index among the row's real tokens, as the position embedding counts it.
That is what ties an edit to a token when the value does not start at position 0: a left-padded row, or a
generation step, whose value holds only the new tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from .sites import DERIVED, GLOBAL_SITES, LAYER_SITES, SITE_NAMES, SITES, check_site_names
from .errors import InputError, InputTypeError

Edit = Callable[[jax.Array, Any], jax.Array]
Edits = Mapping[str, Union[Edit, Sequence[Edit]]]


@jax.tree_util.register_pytree_node_class
class Trace:
    """The kept sites of one forward pass: `trace.resid_post`, `trace["resid_post"]`; None for a site that
    was not kept.

    A compact trace (`forward(..., compact=True)`) does not store the kept sites that are cheap functions of
    other kept sites (`tinygpt.sites.DERIVED`: attn_scores from q, k and the input's attention mask,
    attn_pattern = softmax(attn_scores), mlp_post = gelu_new(mlp_pre), resid_mid and resid_post as sums, ln1
    and ln2 from the residual and the kept LayerNorm divisor, head_out = z @ W_O per head). It computes them,
    with the forward's own functions, when first read, and keeps them. As a pytree its leaves are the stored
    sites and what the derivations read (W_O, the LayerNorm weights, the attention mask repeated per layer),
    so `jax.tree.map` over a compact trace maps those too: exact for maps along the leading layer axis, for
    jit, vmap or scan adding leading axes (each leaf gets them) and for device transfers; for anything else
    (slicing the batch, reductions) map `trace.materialized()` instead."""

    def __init__(self, *, derived: Iterable[str] = (), weights: Mapping[str, Any] | None = None, **sites):
        check_site_names(sites, "Trace")
        derived = frozenset(derived)
        check_site_names(derived, "Trace(derived=...)")
        self._stored = {n: sites[n] for n in SITE_NAMES if sites.get(n) is not None}
        self._derived = tuple(n for n in SITE_NAMES if n in derived)  # a stored value wins on read
        self._weights = dict(weights or {})
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str):  # called only for names that are not ordinary attributes
        if name not in SITES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name in self._stored:
            return self._stored[name]
        if name not in self._derived:
            return None
        if name in self._cache:
            return self._cache[name]
        from .model import derive_site  # the model's own functions compute a derived site

        value = derive_site(name, self, self._weights)
        if not _leaks(value, self._stored):  # a value traced inside jit/vmap is not kept for reads outside
            self._cache[name] = value
        return value

    def tree_flatten(self):
        return (tuple(self._stored.get(n) for n in SITE_NAMES), self._weights), self._derived

    @classmethod
    def tree_unflatten(cls, derived, children):
        sites, weights = children
        return cls(derived=derived, weights=weights, **dict(zip(SITE_NAMES, sites)))

    def __getitem__(self, name: str):
        check_site_names([name], "Trace[...]")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"site {name!r} was not kept in this trace; kept: {', '.join(self.kept()) or 'none'}")
        return value

    def kept(self) -> tuple[str, ...]:
        """Names of the sites this trace holds (stored or derived)."""
        return tuple(n for n in SITE_NAMES if n in self._stored or n in self._derived)

    def stored(self) -> tuple[str, ...]:
        """Names of the sites this trace stores (a compact trace derives the others on read)."""
        return tuple(self._stored)

    def derived(self) -> tuple[str, ...]:
        """Names of the kept sites this trace computes when read."""
        return tuple(n for n in self._derived if n not in self._stored)

    def items(self):
        return [(n, getattr(self, n)) for n in self.kept()]

    def materialized(self) -> "Trace":
        """The same trace with every kept site stored (derived sites computed now)."""
        return Trace(**dict(self.items()))

    def replace(self, **sites) -> "Trace":
        """This trace with the given sites set to new values (None: not kept). Every other site reads as
        before: a derived site computed from a replaced one is computed (and stored) first."""
        check_site_names(sites, "Trace.replace")
        changed, keep_values = set(sites), {}
        for name in self.derived():  # in forward order, so a derived source is handled before its users
            if name not in sites and changed & set(DERIVED[name][0]):
                keep_values[name] = getattr(self, name)
                changed.add(name)
        derived = [n for n in self._derived if n not in sites and n not in keep_values]
        return Trace(derived=derived, weights=self._weights, **{**self._stored, **keep_values, **sites})

    def with_weights(self, weights: Mapping[str, Any]) -> "Trace":
        """This trace with the weights its derivations read (attached outside a compiled forward, so a
        jitted call does not copy them into its outputs)."""
        return Trace(derived=self._derived, weights=weights, **self._stored)

    def __repr__(self):
        shapes = ", ".join(
            f"{n}={tuple(getattr(v, 'shape', ()))}" for n, v in self._stored.items()
        )
        derived = f"; derived on read: {', '.join(self._derived)}" if self._derived else ""
        return f"Trace({shapes}{derived})"


def normalize_keep(keep: Iterable[str] | str | None) -> frozenset[str]:
    """`None` or "all" keeps every site; otherwise a collection of site names."""
    if keep is None or keep == "all":
        return frozenset(SITE_NAMES)
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    check_site_names(keep, "keep")
    return frozenset(keep)


def _leaks(value, stored: Mapping[str, Any]) -> bool:
    """Whether `value` is a tracer of a transformation the trace's stored values are not part of."""
    tracer = jax.core.Tracer
    return isinstance(value, tracer) and not any(isinstance(v, tracer) for v in stored.values())


def derived_sites(keep: frozenset[str], edits: Mapping[str, Any]) -> frozenset[str]:
    """The kept sites a compact trace derives instead of storing: those of `DERIVED` whose sources are all
    kept and which are not edited themselves (an edited value is not a function of its sources). Edits of
    the sources are fine: a site is derived from their kept, edited values, as the forward computed it."""
    derived = set()
    for name, (sources, _) in DERIVED.items():
        if name in keep and name not in edits and all(s in keep for s in sources):
            derived.add(name)
    return frozenset(derived)


def normalize_edits(edits: Edits | None) -> dict[str, tuple[Edit, ...]]:
    """Check site names and make every entry a tuple of callables."""
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise InputTypeError(f"edits must be a mapping from site name to function, got {type(edits).__name__}")
    check_site_names(edits.keys(), "edits")
    out = {}
    for name, fns in edits.items():
        fns = (fns,) if callable(fns) else tuple(fns)
        for fn in fns:
            if not callable(fn):
                raise InputTypeError(f"edits[{name!r}] must be a function (value, layer) -> value, got {fn!r}")
        out[name] = fns
    return out


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


def layer_sites_kept(keep: frozenset[str]) -> tuple[str, ...]:
    return tuple(n for n in LAYER_SITES if n in keep)


def global_sites_kept(keep: frozenset[str]) -> tuple[str, ...]:
    return tuple(n for n in GLOBAL_SITES if n in keep)
