"""Logit lens: read the residual stream of every layer through the final LayerNorm and the unembedding.

    lens_logits(h) = ln_f(h) @ W_U          W_U = wte.T (tied); ln_f with h's own statistics

applied to each block's resid_pre, resid_mid and resid_post at every position (nostalgebraist, 2020). It
shows what the residual stream would predict if the remaining blocks were skipped. The lens at the last
block's resid_post is exactly the model's logits (the forward computes the same thing).

Each (site, layer, position) is summarised on the device, so the [site, layer, batch, seq, vocab] logits
never have to exist at once: the top-k tokens and their probabilities, a target token's probability and
rank, and the KL divergence from the model's final distribution, KL(final || lens) in nats.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.model import ln_apply, ln_scale, unembed
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError

f32 = jnp.float32

#: The residual-stream sites the lens reads, in the order they occur within a block.
LENS_SITES = ("resid_pre", "resid_mid", "resid_post")


def final_layer_norm(params, resid, config: Config):
    """The model's final LayerNorm applied to residual vectors.  [..., d_model] -> [..., d_model]"""
    scale = ln_scale(resid, config.ln_eps)  # [..., 1]
    return ln_apply(resid, scale, params["lnf_w"], params["lnf_b"])


def lens_logits(params, resid, config: Config):
    """The logit lens, ln_f(h) @ W_U (wte.T, or the explicit W_U + b_U of transformed params), in float32.
    resid [..., d_model] -> [..., vocab]"""
    return unembed(final_layer_norm(params, resid, config), params)


def kl_divergence(final_log_probs, lens_log_probs):
    """KL(final || lens) = sum_v p_final (log p_final - log p_lens), in nats.  [..., vocab] -> [...]"""
    return jnp.sum(jnp.exp(final_log_probs) * (final_log_probs - lens_log_probs), axis=-1)


def target_rank(log_probs, target):
    """How many tokens are more probable than the target (0 = the top token).  [..., vocab], [...] -> [...]"""
    target_log_prob = jnp.take_along_axis(log_probs, target[..., None], axis=-1)  # [..., 1]
    return jnp.sum(log_probs > target_log_prob, axis=-1)


@displayable(axes={"top_ids": "site layer batch seq k", "top_probs": "site layer batch seq k", "kl": "site layer batch seq", "final_top_ids": "batch seq k", "final_top_probs": "batch seq k", "target": "batch seq", "target_probs": "site layer batch seq", "target_ranks": "site layer batch seq"})
@dataclasses.dataclass
class LensSummary:
    """A lens read at every (site, layer, position). Arrays are numpy, indexed [site, layer, batch, seq, ...]."""

    sites: tuple[str, ...]
    top_ids: np.ndarray  # [site, layer, batch, seq, k] most probable tokens, most probable first
    top_probs: np.ndarray  # [site, layer, batch, seq, k] their probabilities
    kl: np.ndarray  # [site, layer, batch, seq] KL(final || lens) in nats
    final_top_ids: np.ndarray  # [batch, seq, k] the model's own top tokens
    final_top_probs: np.ndarray  # [batch, seq, k]
    target: np.ndarray | None = None  # [batch, seq] target token ids (None when no target was given)
    target_probs: np.ndarray | None = None  # [site, layer, batch, seq]
    target_ranks: np.ndarray | None = None  # [site, layer, batch, seq] 0 = most probable
    tokens: np.ndarray | None = None  # [batch, seq] the prompts' ids (labels the figure; None: no figure)
    tuned: bool = False  # read through the tuned lens's translators (`probes.tuned_lens`)

    def _headline(self, batch: int = 0, max_positions: int = 12):
        """The lens grid of sequence `batch`: top token and probability at each (site, layer) and position."""
        seq = self.top_ids.shape[3]
        positions = range(max(0, seq - max_positions), seq)
        rows = [[f"{site} L{layer}"] + [f"{token(self.top_ids[s, layer, batch, p, 0])} "
                                         f"{float(self.top_probs[s, layer, batch, p, 0]):.2f}" for p in positions]
                for layer in range(self.top_ids.shape[1]) for s, site in enumerate(self.sites)]
        rows.append(["model"] + [f"{token(self.final_top_ids[batch, p, 0])} {float(self.final_top_probs[batch, p, 0]):.2f}"
                                 for p in positions])
        return Table(["site, layer"] + [f"pos {p}" for p in positions], rows,
                     caption=f"top token and its probability (sequence {batch})")

    def _figure(self, batch: int = 0, max_cells: int = 4096, max_labels: int = 240):
        """`probes.plots.logit_lens` of sequence `batch` (with the target's ranks when there is a target), kept
        cheap to draw: beyond `max_labels` labelled cells only the last site's rows (resid_post), with text only
        within `max_labels`; None without the prompt's ids or beyond `max_cells` cells."""
        n_site, n_layer, _, seq, _ = self.top_ids.shape
        panels = 2 if self.target is not None else 1
        sites = range(n_site) if n_site * n_layer * seq * panels <= max_labels else [n_site - 1]
        if self.tokens is None or len(sites) * n_layer * seq > max_cells:
            return None
        from probes import plots
        from tinygpt import display

        def part(x):  # [site, layer, batch, ...] -> the sites shown, sequence `batch`
            return None if x is None else x[list(sites)][:, :, batch:batch + 1]

        shown = dataclasses.replace(self, sites=tuple(self.sites[s] for s in sites), top_ids=part(self.top_ids),
                                    top_probs=part(self.top_probs), target_ranks=part(self.target_ranks))
        top = shown.top_ids[:, :, 0, :, 0]  # [site, layer, seq]
        top_pieces = np.asarray(display.pieces(top.ravel()), dtype=object).reshape(top.shape)
        target = None
        if self.target is not None and np.all(self.target[batch] == self.target[batch, 0]):
            target = display.pieces([self.target[batch, 0]])[0]
        ids = self.tokens[batch]
        return plots.logit_lens(shown, display.pieces(ids), top_pieces, target=target, tuned=self.tuned,
                                ranks=self.target is not None, prompt=display.decode(ids),
                                max_labels=max_labels // panels)

    def rows(self, batch: int = 0) -> list[dict]:
        """One dict per (layer, site, position) of sequence `batch`, in layer, then site, then position order:
        layer (0-based block), site, position, top ([token_id, probability] pairs), kl, and the target's
        probability and rank when there is a target."""
        rows = []
        n_site, n_layer, _, seq, _ = self.top_ids.shape
        for layer in range(n_layer):
            for s in range(n_site):
                for pos in range(seq):
                    row = {
                        "layer": layer,
                        "site": self.sites[s],
                        "position": pos,
                        "top": [[int(t), float(p)] for t, p in
                                zip(self.top_ids[s, layer, batch, pos], self.top_probs[s, layer, batch, pos])],
                        "kl": float(self.kl[s, layer, batch, pos]),
                    }
                    if self.target is not None:
                        row["target"] = int(self.target[batch, pos])
                        row["target_prob"] = float(self.target_probs[s, layer, batch, pos])
                        row["target_rank"] = int(self.target_ranks[s, layer, batch, pos])
                    rows.append(row)
        return rows


def summarize(read, rows, final_logits, target, k: int):
    """Read rows through a lens one at a time (`lax.map`), keeping only summaries. `rows` is a pytree with a
    leading [row] axis (for the logit lens, residuals [row, batch, seq, d_model]); `read(row)` gives a row's
    lens logits [batch, seq, vocab]. final_logits [batch, seq, vocab], target [batch, seq] or None.
    Returns a dict of [row, batch, seq, ...] arrays."""
    final_log_probs = jax.nn.log_softmax(final_logits, axis=-1)  # [batch, seq, vocab]

    def one_row(row):
        log_probs = jax.nn.log_softmax(read(row), axis=-1)  # [batch, seq, vocab]
        top_log_probs, top_ids = lax.top_k(log_probs, k)  # [batch, seq, k]
        out = {"top_ids": top_ids, "top_probs": jnp.exp(top_log_probs),
               "kl": kl_divergence(final_log_probs, log_probs)}
        if target is not None:
            out["target_probs"] = jnp.exp(jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0])
            out["target_ranks"] = target_rank(log_probs, target)
        return out

    return lax.map(one_row, rows)


@functools.partial(jax.jit, static_argnames=("config", "sites", "k"))
def _logit_lens(params, tokens, attention_mask, target, config: Config, sites: tuple[str, ...], k: int):
    trace = forward(params, tokens, config, attention_mask=attention_mask, keep=sites + ("logits",))
    resid = jnp.stack([trace[s] for s in sites])  # [site, layer, batch, seq, d_model]
    n_site, n_layer = resid.shape[:2]
    rows = resid.reshape(n_site * n_layer, *resid.shape[2:])  # [site * layer, batch, seq, d_model]
    out = summarize(lambda h: lens_logits(params, h, config), rows, trace.logits, target, k)
    out = jax.tree.map(lambda x: x.reshape(n_site, n_layer, *x.shape[1:]), out)  # [site, layer, batch, seq, ...]
    return {**out, **final_top(trace.logits, k)}


def final_top(logits, k: int) -> dict:
    """The model's own top-k tokens and probabilities.  [batch, seq, vocab] -> [batch, seq, k] each"""
    top_log_probs, top_ids = lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
    return {"final_top_ids": top_ids, "final_top_probs": jnp.exp(top_log_probs)}


def check_sites(sites) -> tuple[str, ...]:
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    bad = [s for s in sites if s not in LENS_SITES]
    if bad or not sites:
        raise InputError(f"lens sites must be among {', '.join(LENS_SITES)}, got {bad or 'none'}")
    return sites


def broadcast_target(target, tokens) -> jnp.ndarray | None:
    """None, one token id for every position, or ids [batch, seq] (or broadcastable to it: [batch, 1] for one
    per row)  ->  int32 [batch, seq] or None. A 1-d target is refused: it could mean one id per row or one
    per position (the same shape when batch == seq)."""
    if target is None:
        return None
    target = jnp.asarray(target, jnp.int32)
    shape = tuple(jnp.shape(tokens))
    if target.ndim not in (0, 2) or any(t not in (1, s) for t, s in zip(target.shape, shape)):
        raise InputError(f"target must be one token id or ids broadcastable to the tokens' shape {shape} "
                         f"(one per row: [batch, 1]), got shape {tuple(target.shape)}")
    return jnp.broadcast_to(target, shape)


@checks_tokens("tokens")
def logit_lens(params, config: Config, tokens, *, sites=LENS_SITES, target=None, k: int = 5,
               attention_mask=None) -> LensSummary:
    """The logit lens at every layer of `sites` and every position of tokens [batch, seq].

    target  optional token id (or ids [batch, seq], e.g. the next tokens) whose probability and rank to report
    k       how many top tokens to keep per (site, layer, position)
    """
    sites = check_sites(sites)
    tokens = jnp.asarray(tokens)
    target = broadcast_target(target, tokens)
    out = _logit_lens(params, tokens, attention_mask, target, config, sites, min(k, config.vocab_size))
    out = jax.tree.map(np.asarray, out)
    return LensSummary(sites=sites, target=None if target is None else np.asarray(target), tokens=np.asarray(tokens),
                       **out)
