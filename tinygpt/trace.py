"""The Trace (every named intermediate, returned as a value) and the site recorder used by the forward.

A `Trace` is a pytree with one field per site of `tinygpt.sites.SITES`; a field is `None` when it was not
kept. Per-layer sites are stacked over blocks: `trace.resid_post[3]` is block 3's output.

Edits are plain functions `(value, layer) -> value` keyed by site name. At each site the forward calls
`value = site(name, value)`, which applies the site's edits in order and keeps the result if asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from .sites import GLOBAL_SITES, LAYER_SITES, SITE_NAMES, check_site_names

Edit = Callable[[jax.Array, Any], jax.Array]
Edits = Mapping[str, Union[Edit, Sequence[Edit]]]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Trace:
    embed: Any = None
    pos_embed: Any = None
    resid_pre: Any = None
    ln1_scale: Any = None
    ln1: Any = None
    q: Any = None
    k: Any = None
    v: Any = None
    attn_scores: Any = None
    attn_pattern: Any = None
    z: Any = None
    head_out: Any = None
    attn_out: Any = None
    resid_mid: Any = None
    ln2_scale: Any = None
    ln2: Any = None
    mlp_pre: Any = None
    mlp_post: Any = None
    mlp_out: Any = None
    resid_post: Any = None
    ln_final_scale: Any = None
    ln_final: Any = None
    logits: Any = None

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in SITE_NAMES), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __getitem__(self, name: str):
        check_site_names([name], "Trace[...]")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"site {name!r} was not kept in this trace; kept: {', '.join(self.kept()) or 'none'}")
        return value

    def kept(self) -> tuple[str, ...]:
        """Names of the sites this trace holds."""
        return tuple(n for n in SITE_NAMES if getattr(self, n) is not None)

    def items(self):
        return [(n, getattr(self, n)) for n in self.kept()]


assert tuple(f.name for f in dataclasses.fields(Trace)) == SITE_NAMES


def normalize_keep(keep: Iterable[str] | str | None) -> frozenset[str]:
    """`None` or "all" keeps every site; otherwise a collection of site names."""
    if keep is None or keep == "all":
        return frozenset(SITE_NAMES)
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    check_site_names(keep, "keep")
    return frozenset(keep)


def normalize_edits(edits: Edits | None) -> dict[str, tuple[Edit, ...]]:
    """Check site names and make every entry a tuple of callables."""
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise TypeError(f"edits must be a mapping from site name to function, got {type(edits).__name__}")
    check_site_names(edits.keys(), "edits")
    out = {}
    for name, fns in edits.items():
        fns = (fns,) if callable(fns) else tuple(fns)
        for fn in fns:
            if not callable(fn):
                raise TypeError(f"edits[{name!r}] must be a function (value, layer) -> value, got {fn!r}")
        out[name] = fns
    return out


class SiteRecorder:
    """Applies edits at a site and keeps its value if asked. One per block call (and one for the
    embedding / final sites), so `layer` is the block index (a traced int inside the scan) or None."""

    def __init__(self, edits: dict[str, tuple[Edit, ...]], keep: frozenset[str], layer):
        self.edits, self.keep, self.layer = edits, keep, layer
        self.kept: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        """Whether `name` is read (kept) or written (edited): the forward computes optional values, such as
        per-head outputs, only then."""
        return name in self.keep or name in self.edits

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        for fn in self.edits.get(name, ()):
            new = fn(value, self.layer)
            if new is value:
                continue
            new = jnp.asarray(new)
            if new.shape != value.shape:
                raise ValueError(
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
