"""The Trace: every kept intermediate of a forward pass, returned as a value; and compact traces' derivations.

A `Trace` is a pytree with one field per site of `tinygpt.sites.SITES`; a field is `None` when it was not
kept. Per-layer sites are stacked over blocks: `trace.resid_post[3]` is block 3's output. The forward fills
it through the site recorder (`tinygpt.recorder`), where edits apply.

A compact trace stores only the kept sites that are not cheap functions of other kept sites, and computes the
others (`tinygpt.sites.DERIVED`) when they are read, with the reference forward's own functions
(`tinygpt.model`, and the kernel the forward uses for head_out): `DERIVATIONS` below says how.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from .errors import InputError
from .kernels import head_outputs_batched
from .model import apply_mask, attention_scores, causal_mask, gelu_new, ln_apply, softmax
from .sites import DERIVED, SITE_NAMES, SITES, check_site_names


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

    def to_transformer_lens(self) -> dict[str, Any]:
        """The kept sites keyed by TransformerLens hook names (`tinygpt.sites.TL_NAMES`), in TL's layouts: one
        key per block for per-layer sites (`blocks.3.hook_resid_post` is `trace.resid_post[3]`). ln1, ln2 and
        ln_final become TL's `hook_normalized`, (x - mean) / scale before the LayerNorm weight and bias,
        computed from the LayerNorm's kept input (resid_pre, resid_mid, the last resid_post) and kept divisor
        (ln*_scale); without both the key is left out. Masked attention scores hold the float32 minimum
        (-3.4e38), as TL 4.x's TransformerBridge does, where the trace holds -inf. logits (TL returns them)
        are left out.
        See `tinygpt.sites.TL_DIFFERENCES`."""
        from .sites import TL_NAMES, tl_name

        kept = set(self.kept())
        ln_inputs = {"ln1": ("resid_pre", "ln1_scale"), "ln2": ("resid_mid", "ln2_scale"),
                     "ln_final": ("resid_post", "ln_final_scale")}
        out: dict[str, Any] = {}
        for name in self.kept():
            if name not in TL_NAMES:
                continue
            if name in ln_inputs:
                source, scale = ln_inputs[name]
                if not {source, scale} <= kept:
                    continue
                x = getattr(self, source)
                if name == "ln_final":
                    x = x[-1]
                value = (x - x.mean(-1, keepdims=True)) / getattr(self, scale)
            elif name == "attn_scores":  # TL 4.x fills masked scores with the dtype's min (HF's mask), not -inf
                value = getattr(self, name)
                value = jnp.where(jnp.isneginf(value), jnp.finfo(value.dtype).min, value)
            else:
                value = getattr(self, name)
            if SITES[name].per_layer:
                for layer in range(value.shape[0]):
                    out[tl_name(name, layer)] = value[layer]
            else:
                out[tl_name(name)] = value
        return out

    # ---------------------------------------------------------------------------------- displays

    def axes(self, name: str) -> tuple[str, ...]:
        """The axis names of site `name` in this trace: `("layer", "batch", "seq", "d_model")` for resid_post
        (axes stacked in front by vmap or scan are not named)."""
        check_site_names([name], "Trace.axes")
        return site_axes(name)

    def _sizes(self) -> dict[str, int]:
        """Axis name -> size, read off the stored sites."""
        sizes = {}
        for name, value in self._stored.items():
            names = site_axes(name)
            if hasattr(value, "shape") and len(value.shape) >= len(names):
                for axis, n in zip(names, value.shape[len(value.shape) - len(names):]):
                    if not axis.isdigit():
                        sizes.setdefault(axis, int(n))
        order = ("layer", "batch", "seq", "key", "head", "d_model", "d_head", "d_mlp", "vocab")
        return dict(sorted(sizes.items(), key=lambda item: order.index(item[0]) if item[0] in order else 99))

    def _struct(self, name: str):
        """Shape and dtype of a kept site without computing it (a derived one by `jax.eval_shape`); None when
        it cannot be known."""
        if name in self._stored or name in self._cache:
            value = self._stored.get(name, self._cache.get(name))
            return jax.ShapeDtypeStruct(value.shape, value.dtype) if hasattr(value, "dtype") else None
        sources, needs = DERIVED[name]
        structs = {s: self._struct(s) for s in sources}
        if any(v is None for v in structs.values()) or any(w not in self._weights for w in needs):
            return None
        weights = {w: jax.ShapeDtypeStruct(self._weights[w].shape, self._weights[w].dtype) for w in needs}
        return jax.eval_shape(DERIVATIONS[name], structs, weights)

    def __repr__(self):
        kept, sizes = self.kept(), self._sizes()
        names = "all sites" if len(kept) == len(SITE_NAMES) else ", ".join(kept) or "no sites"
        if len(names) > 120:
            names = names[:names.rfind(",", 0, 110)] + f", … ({len(kept)} sites)"
        dims = " ".join(f"{a}={sizes[a]}" for a in ("layer", "batch", "seq") if a in sizes)
        dtypes = "/".join(sorted({str(v.dtype) for v in self._stored.values() if hasattr(v, "dtype")}))
        derived = f"; {len(self.derived())} derived on read" if self.derived() else ""
        return f"Trace({names}; {dims}; {dtypes}{derived})"

    def _repr_html_(self) -> str:
        from .display import Html, card, esc, shape_text, stats_html, table_html

        rows, derived = [], set(self.derived())
        for name in self.kept():
            axes = site_axes(name)
            if name in derived and name not in self._cache:
                struct = self._struct(name)
                shape = shape_text(struct.shape, axes) if struct is not None else "[" + ", ".join(axes) + "]"
                dtype = str(struct.dtype) if struct is not None else ""
                summary = Html('<span class="tg-dim"><i>derived on read</i> (not computed)</span>')
            else:
                value = getattr(self, name)
                shape, dtype = shape_text(value.shape, axes), str(value.dtype)
                summary = Html(stats_html(value))
            rows.append((Html(f"<code>{esc(name)}</code>"), Html(f"<code>{esc(shape)}</code>"), dtype,
                         Html(f'<span class="tg-nowrap">{summary}</span>'),
                         Html(f'<span class="tg-dim tg-small">{esc(SITES[name].meaning)}</span>')))
        title = f"Trace: {len(rows)} sites" + (f", {len(derived)} derived on read" if derived else "")
        dims = ", ".join(f"{a}={n}" for a, n in self._sizes().items())
        return card(title, dims, [table_html(["site", "shape", "dtype", "summary", "meaning"], rows, labels=True)])

    def treescope(self, name: str, **kwargs):
        """Site `name` rendered by treescope (optional: `pip install treescope`) with its axes named;
        keyword arguments go to `treescope.render_array`."""
        from .display import treescope_array

        return treescope_array(self[name], self.axes(name), **kwargs)


def site_axes(name: str) -> tuple[str, ...]:
    """A site's axis names in a trace: a leading `layer` for per-layer sites, then `SITES[name].shape`."""
    site = SITES[name]
    return (("layer",) if site.per_layer else ()) + site.shape


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
    return _each_layer(head_outputs_batched, (z, W_O), (4, 3))


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


def forward_trace(sites: Mapping[str, Any], derived: frozenset, params, attention_mask) -> Trace:
    """The Trace of a forward's kept `sites` (`model.forward`'s result), deriving the `derived` ones on read.
    Attaches the per-layer weights the derivations read (W_O for head_out, the LayerNorm weights) and the
    input's attention_mask [batch, seq] (None: all real) for the scores, repeated per layer [layer, batch, seq]
    so that the trace's leaves share their leading axes. Called outside a compiled forward, so that a jitted
    call does not copy the weights into its outputs."""
    trace = Trace(derived=derived, **sites)
    needs = {w for name in trace.derived() for w in DERIVED[name][1]}
    if not needs:
        return trace
    weights = {w: params["blocks"][w] for w in sorted(needs - {"attention_mask"})}
    if "attention_mask" in needs:
        if attention_mask is None:
            attention_mask = jnp.ones(trace.q.shape[1:3], jnp.int32)  # [batch, seq]
        weights["attention_mask"] = jnp.broadcast_to(attention_mask.astype(bool),
                                                     (trace.q.shape[0], *attention_mask.shape))
    return trace.with_weights(weights)
