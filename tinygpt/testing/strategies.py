"""Hypothesis strategies for GPT-2 property tests: configs, params, token batches and edits.

Every strategy draws small shapes by default, so an example runs in milliseconds once compiled. JAX compiles
one program per (config, input shape): a test that draws its config and shapes afresh compiles at almost every
example (about a second each on a laptop CPU), so give such tests a few examples (`@settings(max_examples=10)`),
or fix the shapes (`configs(n_layer=2, ...)`, `token_batches(config, batch=2, seq=8)`) and draw only values,
which reuses one compiled program for every example.

Needs hypothesis (the test extra): importing this module without it raises `MissingDependencyError` (an
ImportError) naming the install command.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .. import edits as edit_classes
from ..edits import _axis_sizes  # the size of each site axis name (key: the context; a sequence may be shorter)
from ..config import Config
from ..errors import InputError, require
from ..sites import SITE_NAMES, SITES
from .arrays import left_padding_mask, random_params

st = require("hypothesis.strategies", "test", "tinygpt.testing's strategies")

SEEDS = st.integers(0, 2**32 - 1)

#: The sites `edits` and `edit_values` draw from by default: every site where zeroing, scaling or adding a
#: constant keeps the forward finite and causal. Left out: the LayerNorm divisors (zero divides by zero),
#: attn_scores (its masked entries are -inf: a scale by zero or a negative number makes NaN or +inf) and
#: attn_pattern (adding to its zeros above the diagonal attends to later tokens).
EDITABLE_SITES = tuple(name for name in SITE_NAMES
                       if not name.endswith("_scale") and name not in ("attn_scores", "attn_pattern"))


def _bounds(name: str, value) -> tuple[int, int]:
    """(lo, hi) from an int (a fixed value) or a (lo, hi) pair, inclusive; InputError naming the argument."""
    def whole(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if whole(value):
        lo = hi = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(whole, value)):
        lo, hi = map(int, value)
    else:
        raise InputError(f"{name} must be a positive int or a (lo, hi) pair of ints, got {value!r}")
    if not 1 <= lo <= hi:
        raise InputError(f"{name} must be a positive int or a (lo, hi) pair with 1 <= lo <= hi, "
                         f"got {value!r}")
    return lo, hi


def _integers(name: str, value):
    """Integers within `value`'s bounds (see _bounds)."""
    return st.integers(*_bounds(name, value))


@st.composite
def configs(draw, *, n_layer=(1, 3), n_head=(1, 3), d_head=(4, 8), d_mlp=(1, 32), vocab_size=(2, 64),
            n_ctx=(2, 16)):
    """GPT-2 `Config`s: each dimension an int (fixed) or an inclusive (lo, hi) range; d_model = n_head * d_head.
    The defaults are tiny (d_model 4 .. 24): a forward compiles in well under a second. (A d_model of 1 or 2
    leaves LayerNorm almost nothing to pass on: the tokens then barely reach the logits.)"""
    heads, width = draw(_integers("n_head", n_head), label="n_head"), draw(_integers("d_head", d_head), label="d_head")
    return Config(n_layer=draw(_integers("n_layer", n_layer), label="n_layer"), n_head=heads, d_model=heads * width,
                  d_head=width, d_mlp=draw(_integers("d_mlp", d_mlp), label="d_mlp"),
                  n_ctx=draw(_integers("n_ctx", n_ctx), label="n_ctx"),
                  vocab_size=draw(_integers("vocab_size", vocab_size), label="vocab_size"))


def params(config: Config, *, spread: float = 0.2, wte_std: float = 1.0):
    """Random params for `config` in the official layout (`tinygpt.testing.random_params`: O(1) activations,
    sharp attention, random LayerNorm weights, non-zero biases), from a drawn seed. A failing example prints as
    `random_params(Config(...), seed)`, which rebuilds the same params."""
    return st.builds(random_params, st.just(config), SEEDS, spread=st.just(spread), wte_std=st.just(wte_std))


@st.composite
def token_batches(draw, config: Config, *, batch=(1, 3), seq=None, padding: bool = True):
    """(tokens, attention_mask): int32 [batch, seq] each, as `forward(..., attention_mask=)` takes them.

    batch, seq  an int or an inclusive (lo, hi) range; seq defaults to (1, 12), and is at most n_ctx
    padding     draw left padding: each row 0 .. seq-1 padding positions (at least one real token per row),
                shrinking to none; the padding positions hold drawn ids too, which must change nothing.
                False: every mask entry is 1.
    Token ids are drawn one by one over the whole vocabulary (shrinking to 0)."""
    lo, hi = _bounds("seq", (1, 12) if seq is None else seq)
    if lo > config.n_ctx:
        raise InputError(f"token_batches: seq {seq} is longer than the config's n_ctx {config.n_ctx}")
    n_batch = draw(_integers("batch", batch), label="batch")
    n_seq = draw(st.integers(lo, min(hi, config.n_ctx)), label="seq")
    ids = draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=n_batch * n_seq, max_size=n_batch * n_seq),
               label="ids")
    tokens = np.asarray(ids, np.int32).reshape(n_batch, n_seq)
    pads = [0] * n_batch
    if padding:
        pads = draw(st.lists(st.integers(0, n_seq - 1), min_size=n_batch, max_size=n_batch), label="pads")
    return tokens, left_padding_mask(pads, n_seq)


@dataclasses.dataclass(frozen=True)
class SiteEdit:
    """An edit function `(value, layer) -> value` that `edits` draws, printed as what it does.

    kind    "identity" (returns its input), "zero", "scale" (value * amount) or "add" (value + amount)
    layer   the one block it edits, or None for every block (and for the sites outside the blocks)"""

    kind: str
    amount: float = 0.0
    layer: int | None = None

    def __call__(self, value, layer):
        if self.kind == "identity":
            return value
        changed = {"zero": lambda: jnp.zeros_like(value), "scale": lambda: value * self.amount,
                   "add": lambda: value + self.amount}[self.kind]()
        if self.layer is None or layer is None:
            return changed
        return jnp.where(layer == self.layer, changed, value)


def _site_edits(config: Config, site: str, kinds):
    """One SiteEdit for `site`: a kind of `kinds`, an amount in [-2, 2], every block or one."""
    kind = st.sampled_from(kinds)
    amount = st.floats(-2.0, 2.0, allow_nan=False, width=32)
    layer = (st.none() | st.integers(0, config.n_layer - 1)) if SITES[site].per_layer else st.none()
    return st.builds(SiteEdit, kind, amount, layer)


def _names(chosen) -> tuple:
    """A string as one name (not its letters), any other collection as a tuple."""
    return (chosen,) if isinstance(chosen, str) else tuple(chosen)


def _check_choices(what: str, chosen, allowed) -> None:
    """InputError naming the entries of `chosen` that are not in `allowed`, and the allowed ones."""
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise InputError(f"unknown {what} {unknown}; the {what} are {', '.join(allowed)}")


@st.composite
def edits(draw, config: Config, *, sites=EDITABLE_SITES, kinds=("identity", "zero", "scale", "add"), max_sites=2):
    """Function edits `{site: SiteEdit}` for `forward(..., edits=)`: 1 .. max_sites distinct sites from `sites`,
    each edited by a drawn kind (zero, scale or add a constant in [-2, 2], or the identity) at every block or
    at one drawn block. Every kind keeps the value's shape; at the default sites the forward stays finite and
    causal (see EDITABLE_SITES)."""
    sites, kinds = _names(sites), _names(kinds)
    _check_choices("sites", sites, SITE_NAMES)
    _check_choices("kinds", kinds, ("identity", "zero", "scale", "add"))
    chosen = draw(st.lists(st.sampled_from(tuple(sites)), min_size=1, max_size=max_sites, unique=True), label="sites")
    return {site: draw(_site_edits(config, site, kinds), label=site) for site in chosen}


def _some(size: int):
    """None (everything), or 1 .. 2 distinct indices below `size`."""
    return st.none() | st.lists(st.integers(0, size - 1), min_size=1, max_size=2, unique=True)


@st.composite
def _edit_value(draw, config: Config, site: str, kinds):
    """One edit value of a drawn kind at `site`, with a drawn selection and drawn numbers."""
    shape = SITES[site].shape
    selection = dict(layer=draw(st.none() | st.integers(0, config.n_layer - 1), label="layer")
                     if SITES[site].per_layer else None,
                     head=draw(_some(config.n_head), label="head") if "head" in shape else None,
                     positions=draw(_some(config.n_ctx), label="positions"),
                     index=draw(_some(_axis_sizes(config)[shape[-1]]), label="index"))
    number = st.floats(-2.0, 2.0, allow_nan=False, width=32)
    kind = draw(st.sampled_from(kinds), label="kind")
    if kind == "Zero":
        return edit_classes.Zero(site, **selection)
    if kind == "Set":
        return edit_classes.Set(site, np.float32(draw(number, label="to")), **selection)
    if kind == "Scale":
        return edit_classes.Scale(site, np.float32(draw(number, label="factor")), **selection)
    # a vector along the last axis; one number where that axis is the keys (as long as the sequence) or size 1
    length = () if shape[-1] in ("key", "1") else (_axis_sizes(config)[shape[-1]],)
    direction = np.random.default_rng(draw(SEEDS, label="direction seed")).standard_normal(length).astype(np.float32)
    return edit_classes.Add(site, direction, np.float32(draw(number, label="coef")), **selection)


@st.composite
def edit_values(draw, config: Config, *, sites=EDITABLE_SITES, kinds=("Zero", "Set", "Scale", "Add"), max_edits=2):
    """A list of 1 .. max_edits edit values (`tinygpt.edits`: Zero, Set, Scale, Add) for `forward(..., edits=)`,
    each at a site of `sites` with a drawn selection: every block or one, every head or one or two (sites with a
    head axis), every position or one or two absolute positions, every entry of the last axis or one or two;
    Set's value, Scale's factor and Add's coefficient in [-2, 2], Add's direction a random vector along the last
    axis. A forward compiles once per structure (kinds, sites and selections), and the numbers are arguments of
    that program. At the default sites the forward stays finite and causal (see EDITABLE_SITES)."""
    sites, kinds = _names(sites), _names(kinds)
    _check_choices("sites", sites, SITE_NAMES)
    _check_choices("kinds", kinds, ("Zero", "Set", "Scale", "Add"))
    chosen = draw(st.lists(st.sampled_from(tuple(sites)), min_size=1, max_size=max_edits), label="sites")
    return [draw(_edit_value(config, site, tuple(kinds)), label=site) for site in chosen]
