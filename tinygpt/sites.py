"""The table of named sites: every intermediate value of the forward pass, named once.

Docs, `keep=`, `edits=`, errors and the CLI all read this table. Shapes are given for one forward call;
per-layer sites are stacked over blocks in the trace, with a leading `layer` axis:
`trace.resid_pre` has shape `[layer, batch, seq, d_model]`.

The forward pass of one block, in site names (x is the residual stream):

    resid_pre  = x
    ln1_scale  = sqrt(var(resid_pre) + eps)
    ln1        = (resid_pre - mean) / ln1_scale * ln1_w + ln1_b
    q, k, v    = ln1 @ W_Q + b_Q, ln1 @ W_K + b_K, ln1 @ W_V + b_V          (per head)
    attn_scores  = q . k / sqrt(d_head), -inf where the query may not see the key
    attn_pattern = softmax(attn_scores) over keys                          (float32)
    z          = attn_pattern @ v                                          (per head)
    head_out   = z @ W_O                                                   (per head)
    attn_out   = sum over heads of head_out + b_O
    resid_mid  = resid_pre + attn_out
    ln2_scale, ln2 as above on resid_mid
    mlp_pre    = ln2 @ W_in + b_in
    mlp_post   = gelu_new(mlp_pre)
    mlp_out    = mlp_post @ W_out + b_out
    resid_post = resid_mid + mlp_out

and around the blocks: `embed = wte[tokens]`, `pos_embed = wpe[positions]`, the first block's resid_pre is
embed + pos_embed; after the last block `ln_final_scale`, `ln_final` and `logits = ln_final @ wte.T`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .errors import InputError, SiteError


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    shape: tuple[str, ...]  # dimension names, without the leading `layer` axis of per-layer sites
    per_layer: bool
    meaning: str


def _site(name, shape, per_layer, meaning):
    return name, Site(name, tuple(shape.split()), per_layer, meaning)


SITES: dict[str, Site] = dict(
    [
        _site("embed", "batch seq d_model", False, "token embedding wte[tokens]"),
        _site("pos_embed", "batch seq d_model", False, "position embedding wpe[positions]"),
        _site("resid_pre", "batch seq d_model", True, "residual stream entering the block"),
        _site("ln1_scale", "batch seq 1", True, "sqrt(var + eps) of resid_pre (LayerNorm 1 divisor)"),
        _site("ln1", "batch seq d_model", True, "LayerNorm 1 output, input of attention"),
        _site("q", "batch seq head d_head", True, "queries, ln1 @ W_Q + b_Q"),
        _site("k", "batch seq head d_head", True, "keys, ln1 @ W_K + b_K"),
        _site("v", "batch seq head d_head", True, "values, ln1 @ W_V + b_V"),
        _site("attn_scores", "batch head seq key", True, "q.k / sqrt(d_head), -inf where masked (float32)"),
        _site("attn_pattern", "batch head seq key", True, "softmax of attn_scores over keys (float32)"),
        _site("z", "batch seq head d_head", True, "attention-weighted values, pattern @ v"),
        _site("head_out", "batch seq head d_model", True, "each head's write into the residual, z @ W_O"),
        _site("attn_out", "batch seq d_model", True, "attention output, sum of head_out + b_O"),
        _site("resid_mid", "batch seq d_model", True, "resid_pre + attn_out"),
        _site("ln2_scale", "batch seq 1", True, "sqrt(var + eps) of resid_mid (LayerNorm 2 divisor)"),
        _site("ln2", "batch seq d_model", True, "LayerNorm 2 output, input of the MLP"),
        _site("mlp_pre", "batch seq d_mlp", True, "MLP pre-activation, ln2 @ W_in + b_in"),
        _site("mlp_post", "batch seq d_mlp", True, "MLP activation, gelu_new(mlp_pre)"),
        _site("mlp_out", "batch seq d_model", True, "MLP output, mlp_post @ W_out + b_out"),
        _site("resid_post", "batch seq d_model", True, "residual stream leaving the block, resid_mid + mlp_out"),
        _site("ln_final_scale", "batch seq 1", False, "sqrt(var + eps) of the last resid_post"),
        _site("ln_final", "batch seq d_model", False, "final LayerNorm output"),
        _site("logits", "batch seq vocab", False, "ln_final @ wte.T (float32)"),
    ]
)

SITE_NAMES: tuple[str, ...] = tuple(SITES)

# Sites a compact trace computes from other kept sites instead of storing them (see `tinygpt.trace.Trace`):
# site -> (the sites it is computed from, the weights it reads). Each is how the forward computes it.
# "attention_mask" is not a weight but the forward's input [batch, seq], carried per layer like one.
DERIVED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ln1": (("resid_pre", "ln1_scale"), ("ln1_w", "ln1_b")),  # LayerNorm 1 from its kept divisor
    "attn_scores": (("q", "k"), ("attention_mask",)),  # q.k / sqrt(d_head), masked (the input's padding)
    "attn_pattern": (("attn_scores",), ()),  # softmax(attn_scores)
    "head_out": (("z",), ("W_O",)),  # z @ W_O per head
    "resid_mid": (("resid_pre", "attn_out"), ()),  # resid_pre + attn_out
    "ln2": (("resid_mid", "ln2_scale"), ("ln2_w", "ln2_b")),  # LayerNorm 2 from its kept divisor
    "mlp_post": (("mlp_pre",), ()),  # gelu_new(mlp_pre)
    "resid_post": (("resid_mid", "mlp_out"), ()),  # resid_mid + mlp_out
}
LAYER_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.per_layer)
GLOBAL_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if not s.per_layer)




def check_site_names(names: Iterable[str], argument: str, tl: bool = False) -> None:
    """Raise SiteError naming the first unknown site (and listing the known ones). tl: also accept
    TransformerLens hook names (`TL_NAMES`)."""
    for name in names:
        if name in SITES or (tl and is_tl_name(name)):
            continue
        if is_tl_name(name):  # a TransformerLens name where only tinygpt's site names are taken
            site, layer = _parse_tl(name)
            raise SiteError(f"{argument} takes tinygpt site names, not TransformerLens hook names: {name!r} is "
                            f"site {site!r}" + (f" at layer {layer}" if layer is not None else ""))
        hint = _closest(name, tl)
        raise SiteError(
            f"unknown site {name!r} in {argument}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; known sites: {', '.join(SITE_NAMES)}"
            + (" (or their TransformerLens hook names, tinygpt.sites.TL_NAMES)" if tl else "")
        )


def _closest(name: str, tl: bool = True) -> str | None:
    """The known name closest to `name`: a site name, or (tl) a TransformerLens hook name, at the layer the
    user wrote (`blocks.3.hook_resid_pos` -> `blocks.3.hook_resid_post`)."""
    import difflib

    name = str(name)
    parts = name.split(".", 2)
    layer = parts[1] if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() else "0"
    vocabulary = SITE_NAMES + ((tuple(_TL_GLOBAL) + tuple(
        TL_NAMES[s].replace("{l}", layer) for s in TL_NAMES if SITES[s].per_layer)) if tl else ())
    match = difflib.get_close_matches(name, vocabulary, n=1)
    return match[0] if match else None


def describe() -> str:
    """The site table as text (used by docs and `tinygpt inspect --help`)."""
    rows = []
    for s in SITES.values():
        shape = ("[layer, " if s.per_layer else "[") + ", ".join(s.shape) + "]"
        rows.append(f"{s.name:<15} {shape:<38} {s.meaning}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------ TransformerLens names

# Each site's TransformerLens hook name ("{l}" is the block index); logits have no hook (TL returns them).
TL_NAMES: dict[str, str] = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "ln1_scale": "blocks.{l}.ln1.hook_scale",
    "ln1": "blocks.{l}.ln1.hook_normalized",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "attn_scores": "blocks.{l}.attn.hook_attn_scores",
    "attn_pattern": "blocks.{l}.attn.hook_pattern",
    "z": "blocks.{l}.attn.hook_z",
    "head_out": "blocks.{l}.attn.hook_result",
    "attn_out": "blocks.{l}.hook_attn_out",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "ln2_scale": "blocks.{l}.ln2.hook_scale",
    "ln2": "blocks.{l}.ln2.hook_normalized",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "resid_post": "blocks.{l}.hook_resid_post",
    "ln_final_scale": "ln_final.hook_scale",
    "ln_final": "ln_final.hook_normalized",
}

# Where a TL hook's value differs from the site's (layouts are otherwise the same, per layer: TL has one hook
# per block where a trace stacks blocks on a leading `layer` axis). `Trace.to_transformer_lens` converts.
_LN_NOTE = ("TL's hook_normalized is (x - mean) / scale, before the LayerNorm weight and bias (as in TL's "
            "LayerNormPre, the weight-processed model); the site is after them")
TL_DIFFERENCES: dict[str, str] = {
    "ln1": _LN_NOTE,
    "ln2": _LN_NOTE,
    "ln_final": _LN_NOTE,
    "attn_scores": "masked entries: the site holds -inf, TL 4.x's TransformerBridge holds the float32 minimum "
                   "(-3.4e38, Hugging Face's mask value; TL 2-3's HookedTransformer used -inf, its IGNORE buffer); "
                   "to_transformer_lens writes the float32 minimum. Both [batch, head, query, key]",
    "head_out": "TL computes hook_result only with use_attn_result; same layout [batch, pos, head, d_model]",
}


def tl_name(site: str, layer: int | None = None) -> str:
    """The TransformerLens hook name of `site` (at block `layer` for per-layer sites)."""
    check_site_names([site], "tl_name")
    if layer is not None and (isinstance(layer, bool) or not hasattr(layer, "__index__") or layer < 0):
        raise InputError(f"tl_name: layer must be a non-negative int, got {layer!r}")
    if site not in TL_NAMES:
        raise SiteError(f"site {site!r} has no TransformerLens hook (TL returns the logits)")
    if SITES[site].per_layer:
        if layer is None:
            raise SiteError(f"site {site!r} is per layer: give tl_name a layer")
        return TL_NAMES[site].format(l=int(layer))
    if layer is not None:
        raise SiteError(f"site {site!r} is not per layer: tl_name takes no layer for it")
    return TL_NAMES[site]


_TL_GLOBAL = {TL_NAMES[s]: s for s in TL_NAMES if not SITES[s].per_layer}
_TL_LAYER = {TL_NAMES[s].split("{l}.", 1)[1]: s for s in TL_NAMES if SITES[s].per_layer}


def site_of_tl(name: str) -> tuple[str, int | None]:
    """(site, layer) of a TransformerLens hook name: `blocks.3.hook_resid_post` -> ("resid_post", 3),
    `hook_embed` -> ("embed", None). Raises SiteError for a name that is not in the table."""
    found = _parse_tl(name)
    if found is None:
        hint = _closest(name)
        raise SiteError(f"unknown TransformerLens hook name {name!r}"
                        + (f" (did you mean {hint!r}?)" if hint else ""))
    return found


def _parse_tl(name) -> tuple[str, int | None] | None:
    name = str(name)
    if name in _TL_GLOBAL:
        return _TL_GLOBAL[name], None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _TL_LAYER:
        return _TL_LAYER[parts[2]], int(parts[1])
    return None


def is_tl_name(name) -> bool:
    return _parse_tl(name) is not None
