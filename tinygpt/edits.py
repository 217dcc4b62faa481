"""Edits as values: small frozen pytrees that say what to change at a site, so a compiled forward is reused.

    forward(params, tokens, config, edits=[Zero("z", layer=1, head=3), Add("resid_pre", v, 4.0, layer=1)])

An edit is a frozen dataclass. Its *structure* — the site, and which entries it touches (`layer`, `head`,
`positions`, `index`) — is static: it is part of the pytree's definition, so `forward`, `generate` and the
sweeps compile one program per structure. Its *arrays* — the direction of an `Add`, its coefficient, the
source of a `Patch` — are the pytree's leaves, passed to that program as arguments: calling again with new
values (another coefficient, another source run) runs at compiled speed, without tracing again. Edits also
pass through `jit`, `vmap` and `scan` like any pytree (vmap over a batch of directions, for instance).

A plain function `fn(value, layer) -> value` still works as an edit and stays the most general one; a
forward with function edits is traced again and run op by op on every eager call (a closure cannot be a
cache key: it may hold arrays that change between calls), so it is the slower path.

Which entries an edit touches (each `None` = all of them):

    layer      the block (per-layer sites only; None = every block)
    head       int or ints, on sites with a head axis (q, k, v, z, head_out, attn_scores, attn_pattern)
    positions  int or ints, absolute positions: a token's index among its row's real tokens, as the position
               embedding counts it (left padding skipped). The same token in a prompt, a padded batch and a
               generation step. Non-negative.
    index      int or ints on the site's last axis, taken as is: a neuron of mlp_post, a residual dimension,
               a component of d_head, or a key column of attn_scores / attn_pattern. Unlike `positions`, it
               is an index into the array, not an absolute position: on the key axis, column j is the j-th
               entry of the row as padded (with left padding, or in a generation step whose keys are the
               cache, the same column holds a different token in each row)

`site` may be a tinygpt site name (`tinygpt.sites.SITES`) or a TransformerLens hook name; a per-layer one
(`blocks.1.attn.hook_z`) also fixes the layer.

The edits, each applied where the selection holds (the value elsewhere unchanged):

    Zero(site)                     value -> 0
    Set(site, to)                  value -> to (broadcast to the value's shape)
    Scale(site, factor)            value -> factor * value
    Add(site, direction, coef=1)   value -> value + coef * direction
    Patch(site, source)            value -> source: another run's value (`Patch.from_trace`)
    Mean(site, mean)               value -> mean: the mean over a batch (`Mean.from_trace`)
    Compose(*edits)                the edits, in order

`edit_value` makes a new kind of edit value from an `Edit` subclass (e.g. `probes.sae.Splice`, the site's
value replaced by an SAE's reconstruction).

The arrays of `Patch` and `Mean` have the site's per-layer shape ([batch, seq, ...], axes of size 1
broadcast), or, when `layer` is None on a per-layer site, a leading layer axis (a trace's stacked value)
from which each block takes its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError, InputTypeError
from .sites import SITES, check_site_names, is_tl_name, site_of_tl

def _indices(value, name: str) -> tuple[int, ...] | None:
    """An int or ints as a sorted tuple of non-negative ints (a hashable, static selection), or None."""
    if value is None:
        return None
    items = np.atleast_1d(np.asarray(value))
    if items.ndim != 1 or items.size == 0 or not np.issubdtype(items.dtype, np.integer):
        raise InputError(f"{name} must be an int or a non-empty sequence of ints, got {value!r}")
    if items.min() < 0:
        raise InputError(f"{name} must be non-negative, got {value!r}"
                         + (" (positions are absolute: a token's index among its row's real tokens)"
                            if name.endswith("positions") else ""))
    return tuple(int(i) for i in np.unique(items))


def _any_of(axis_values, chosen: tuple[int, ...]):
    """Whether each entry of `axis_values` (an int array) is one of `chosen`."""
    return jnp.isin(axis_values, jnp.asarray(chosen))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Edit:
    """What every edit shares: the site and the selection (static, keyword-only), and applying the change
    where the selection holds. Subclasses define `change(value, layer)`, the edited value everywhere."""

    site: str
    layer: int | None = dataclasses.field(default=None, kw_only=True)
    head: Any = dataclasses.field(default=None, kw_only=True)  # int or ints -> sorted tuple
    positions: Any = dataclasses.field(default=None, kw_only=True)
    index: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        site, layer = self.site, self.layer
        if not isinstance(site, str):
            raise InputTypeError(f"{type(self).__name__}: site must be a site name, got {site!r}")
        check_site_names([site], f"{type(self).__name__}(site=...)", tl=True)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0):
            raise InputError(f"{type(self).__name__}: layer must be a non-negative int, got {layer!r}")
        if site not in SITES:
            site, tl_layer = site_of_tl(site)
            if tl_layer is not None and layer is not None and int(layer) != tl_layer:
                raise InputError(f"{type(self).__name__}: the hook name {self.site!r} is at layer {tl_layer}, "
                                 f"but layer={layer} was given")
            layer = tl_layer if tl_layer is not None else layer
        shape = SITES[site].shape
        if layer is not None:
            if not SITES[site].per_layer:
                raise InputError(f"{type(self).__name__}: site {site!r} is not per layer; give no layer")
            layer = int(layer)
        if self.head is not None and "head" not in shape:
            raise InputError(f"{type(self).__name__}: site {site!r} has no head axis ({' '.join(shape)}); "
                             "give no head")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "layer", layer)
        for name in ("head", "positions", "index"):
            object.__setattr__(self, name, _indices(getattr(self, name), f"{type(self).__name__}: {name}"))

    def check(self, config) -> None:
        """Raise InputError if the selection is outside a model of `config` (where it would change nothing)."""
        sizes = _axis_sizes(config)
        shape = SITES[self.site].shape
        bounds = [("layer", self.layer and (self.layer,), config.n_layer, "n_layer"),
                  ("head", self.head, config.n_head, "n_head"),
                  ("positions", self.positions, config.n_ctx, "n_ctx"),
                  ("index", self.index, sizes.get(shape[-1]), shape[-1])]
        for name, chosen, size, what in bounds:
            if chosen and size is not None and max(chosen) >= size:
                raise InputError(f"{type(self).__name__} at site {self.site!r}: {name}={max(chosen)} is out of "
                                 f"range for this model ({what} = {size})")

    def __repr__(self):
        """`Add('resid_pre', direction=f32[64], coef=4.0, layer=1)`: arrays by dtype and shape."""
        parts = [repr(self.site)]
        fields = [f.name for f in dataclasses.fields(self)[1:]]
        for name in [f for f in fields if f not in _SELECTION] + [f for f in fields if f in _SELECTION]:
            value = getattr(self, name)
            if value is not None or name not in _SELECTION:
                parts.append(f"{name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # --------------------------------------------------------------------------------------- applying

    def selected(self, value, layer, positions):
        """Where the edit applies: bool, broadcastable to value's shape (True = everywhere)."""
        shape = SITES[self.site].shape  # dimension names of the value, e.g. ("batch", "seq", "head", "d_head")
        where = jnp.ones((1,) * len(shape), bool)  # [1, ..., 1]
        if self.layer is not None and layer is not None:
            where = where & (layer == self.layer)
        if self.head is not None:
            axis = shape.index("head")
            where = where & _along(_any_of(jnp.arange(value.shape[axis]), self.head), axis, len(shape))
        if self.index is not None:
            axis = len(shape) - 1
            where = where & _along(_any_of(jnp.arange(value.shape[axis]), self.index), axis, len(shape))
        if self.positions is not None:
            at = _any_of(positions, self.positions)  # [batch, seq]
            batch, seq = shape.index("batch"), shape.index("seq")
            keep = [batch, seq]
            at = jnp.expand_dims(at, [a for a in range(len(shape)) if a not in keep])  # seq axis in place
            where = where & at
        return where

    def __call__(self, value, layer, positions=None):
        """The edited value: `change` where the selection holds, the value elsewhere."""
        if self.positions is not None and positions is None:
            raise InputError(f"{type(self).__name__} at site {self.site!r} selects positions, and this "
                             "computation gives none (position edits run in forward and generate)")
        new = jnp.asarray(self.change(value, layer), value.dtype)
        if new.shape != value.shape:
            raise InputError(f"{type(self).__name__} at site {self.site!r}: its array broadcasts to {new.shape},"
                             f" and the site's value has shape {value.shape}")
        return jnp.where(self.selected(value, layer, positions), new, value)

    def change(self, value, layer):
        raise NotImplementedError

    def per_layer(self, array, layer):
        """`array` for this block: its entry `layer` when it carries a leading layer axis (layer None on a
        per-layer site), else itself."""
        array = jnp.asarray(array)
        if self.layer is None and layer is not None:
            if array.ndim != len(SITES[self.site].shape) + 1:
                raise InputError(f"{type(self).__name__} at site {self.site!r} with no layer: its array needs a "
                                 f"leading layer axis (a trace's stacked value), got shape {array.shape}; or "
                                 "give the layer")
            return array[layer]
        return array

    def _broadcast(self, array, value):
        try:
            return jnp.broadcast_to(array, value.shape)
        except ValueError:
            raise InputError(f"{type(self).__name__} at site {self.site!r}: an array of shape "
                             f"{jnp.shape(array)} does not broadcast to the site's value {value.shape}") from None


_SELECTION = ("layer", "head", "positions", "index")


def _short(value) -> str:
    """An array as dtype[shape] (a scalar as its value), a dict of arrays likewise, anything else as repr."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in value.items()) + "}"
    shape = getattr(value, "shape", None)
    if shape is None or not hasattr(value, "dtype"):
        return repr(value)
    if shape == ():
        return repr(value.item()) if not isinstance(value, jax.core.Tracer) else f"{value.dtype}[]"
    kind = {"f": "f", "i": "i", "u": "u", "b": "bool"}.get(np.dtype(value.dtype).kind, str(value.dtype))
    size = np.dtype(value.dtype).itemsize * 8
    return f"{kind}{size if kind != 'bool' else ''}[{','.join(map(str, shape))}]"


def _axis_sizes(config) -> dict[str, int]:
    """The size of each dimension name of the site table in a model of `config`."""
    return {"d_model": config.d_model, "d_head": config.d_head, "d_mlp": config.d_mlp, "head": config.n_head,
            "vocab": config.vocab_size, "key": config.n_ctx, "1": 1}


def _along(mask, axis: int, ndim: int):
    """A 1-d mask placed on `axis` of an ndim-dimensional broadcastable array."""
    return mask.reshape([-1 if a == axis else 1 for a in range(ndim)])


def edit_value(*data_fields: str, static: tuple[str, ...] = ()):
    """Class decorator making an `Edit` subclass an edit value: a frozen dataclass registered as a pytree whose
    `data_fields` are its leaves (arrays) and whose selection (site, layer, head, positions, index) and
    `static` fields are its structure (hashable: part of the compile-cache key). Define `change(value,
    layer)`, the edited value everywhere; the selection picks where it applies. For instance an SAE splice
    (`probes.sae.Splice`): its weights are the leaves, its SAEConfig static."""
    def register(cls):
        cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)  # eq by identity: fields hold arrays
        meta = ("site", "layer", "head", "positions", "index", *static)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta))
    return register


@edit_value()
class Zero(Edit):
    """Set the selected entries to zero (zero-ablation)."""

    def change(self, value, layer):
        return jnp.zeros_like(value)


@edit_value("to")
class Set(Edit):
    """Set the selected entries to `to` (an array broadcast to the site's value, or a number)."""

    to: Any

    def change(self, value, layer):
        return self._broadcast(self.to, value)


@edit_value("factor")
class Scale(Edit):
    """Multiply the selected entries by `factor` (a number, or an array broadcast to the value)."""

    factor: Any

    def change(self, value, layer):
        return self._broadcast(value * jnp.asarray(self.factor, value.dtype), value)


@edit_value("direction", "coef")
class Add(Edit):
    """Add `coef * direction` to the selected entries (steering): direction broadcasts to the value, e.g.
    [d_model] on a residual site."""

    direction: Any
    coef: Any = 1.0

    def change(self, value, layer):
        added = jnp.asarray(self.coef, value.dtype) * jnp.asarray(self.direction, value.dtype)
        return self._broadcast(value + added, value)


@edit_value("source")
class Patch(Edit):
    """Replace the selected entries by `source`: another run's value of the site (activation patching).
    `source` has the site's per-layer shape, or a leading layer axis when layer is None on a per-layer site."""

    source: Any

    def change(self, value, layer):
        return self._broadcast(self.per_layer(self.source, layer), value)

    @classmethod
    def from_trace(cls, trace, site: str, **selection) -> "Patch":
        """Patch `site` from a trace of another run (e.g. the clean run): its value at `layer`, or all of
        them stacked when layer is None."""
        return cls(site, _from_trace(trace, site, selection.get("layer")), **selection)


@edit_value("mean")
class Mean(Edit):
    """Replace the selected entries by `mean` (mean-ablation): an average value of the site, e.g. over a
    batch of prompts (`Mean.from_trace`). Same shapes as `Patch`'s source."""

    mean: Any

    def change(self, value, layer):
        return self._broadcast(self.per_layer(self.mean, layer), value)

    @classmethod
    def from_trace(cls, trace, site: str, *, over: Iterable[str] = ("batch",), attention_mask=None,
                   **selection) -> "Mean":
        """The mean of a trace's `site` over the named axes (`over`: "batch", "seq" or both), kept as axes
        of size 1 so it broadcasts. With `attention_mask` [batch, seq], padding is left out of the mean.

        The mean over "batch" is taken per array column, as the arrays lie: entry [b, s] is averaged with the
        other rows' entries at column s, not at the same absolute position. With left padding the rows are
        shifted (column s is a different token position in each row), so align them first (e.g. pad on the
        right, or take the rows one length at a time) when a mean per absolute position is wanted. Masked
        entries (-inf in attn_scores) are left out of a masked mean; a column no row fills is 0."""
        value = jnp.asarray(_from_trace(trace, site, selection.get("layer")), jnp.float32)  # [(layer,) batch, ...]
        shape = SITES[site if site in SITES else site_of_tl(site)[0]].shape
        lead = value.ndim - len(shape)  # 1 with a layer axis, else 0
        over = (over,) if isinstance(over, str) else tuple(over)
        for name in over:
            if name not in ("batch", "seq"):
                raise InputError(f"Mean.from_trace: over must name 'batch' and/or 'seq', got {name!r}")
        if not over or len(set(over)) != len(over):
            raise InputError(f"Mean.from_trace: over must name 'batch' and/or 'seq', each once, got {over!r}")
        axes = tuple(lead + shape.index(name) for name in over)
        if attention_mask is None:
            return cls(site, value.mean(axis=axes, keepdims=True), **selection)  # value's shape, `over` axes 1
        weight = jnp.asarray(attention_mask, jnp.float32)  # [batch, seq]
        weight = jnp.expand_dims(weight, [a for a in range(value.ndim)  # [batch, seq] in place, 1 elsewhere
                                          if a not in (lead + shape.index("batch"), lead + shape.index("seq"))])
        # padding gives no weight, and its value may be -inf (attn_scores): -inf * 0 would be NaN
        total = jnp.where(weight > 0, value, 0.0).sum(axis=axes, keepdims=True)  # value's shape, `over` axes 1
        count = jnp.maximum(weight.sum(axis=axes, keepdims=True), 1.0)  # weight's shape, `over` axes 1
        return cls(site, total / count, **selection)


def _from_trace(trace, site: str, layer):
    name = site if site in SITES else site_of_tl(site)[0]
    if is_tl_name(site) and site_of_tl(site)[1] is not None:
        layer = site_of_tl(site)[1]
    value = trace[name] if not hasattr(trace, "materialized") else getattr(trace, name)
    if value is None:
        raise InputError(f"the trace holds no {name!r}: keep it in the run the edit reads from")
    return value if layer is None or not SITES[name].per_layer else value[layer]


@jax.tree_util.register_pytree_node_class
class Compose:
    """Several edits, applied in order (each at its own site): `Compose(Zero(...), Add(...))`."""

    def __init__(self, *edits):
        flat = []
        for edit in edits:
            if isinstance(edit, Compose):
                flat.extend(edit.edits)
            elif isinstance(edit, Edit):
                flat.append(edit)
            else:
                raise InputTypeError(f"Compose takes edits (Zero, Set, Scale, Add, Patch, Mean), got {edit!r}")
        object.__setattr__(self, "edits", tuple(flat))

    def tree_flatten(self):
        return self.edits, None

    @classmethod
    def tree_unflatten(cls, _, children):  # jax may rebuild with placeholders: no checks
        compose = object.__new__(cls)
        object.__setattr__(compose, "edits", tuple(children))
        return compose

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __repr__(self):
        return f"Compose({', '.join(map(repr, self.edits))})"


def check_registered(edit) -> None:
    """InputTypeError for an `Edit` whose class is not an edit value (a subclass without `@edit_value`): JAX
    would take it for one opaque leaf and fail with its own TypeError."""
    if isinstance(edit, Edit) and jax.tree_util.all_leaves([edit]):
        raise InputTypeError(f"edits: {type(edit).__name__} is an Edit subclass that is not an edit value: decorate "
                             "it with @tinygpt.edits.edit_value(...) (naming its array fields)")


def is_edit_value(edit) -> bool:
    """Whether `edit` is an edit value (static structure, array leaves), rather than a plain function."""
    return isinstance(edit, (Edit, Compose))


def flatten(edits) -> tuple[Edit, ...]:
    """An edit value, or a sequence of them, as a flat tuple of edits in order."""
    if isinstance(edits, Edit):
        return (edits,)
    if isinstance(edits, Compose):
        return edits.edits
    if isinstance(edits, (list, tuple)):  # a list of edit values (normalize_edits admits no nesting)
        return tuple(e for item in edits for e in (item.edits if isinstance(item, Compose) else (item,)))
    return (edits,)
