"""Attention heads at a glance: what each head's pattern does, summarised as a few numbers.

For a pattern [layer, batch, head, seq, key] (`attn_pattern`, rows sum to one over the keys a query sees):

    first     mean attention to the first position (key 0), over queries 1.. (query 0 can only see itself)
    previous  mean attention to the previous position (key q - 1), over queries 1..
    diagonal  mean attention to the query's own position (key q), over queries 1..
    induction on a repeated sequence of random tokens r r (r of length n), the mean attention from each
              query q in the second copy to key q - n + 1: the token that followed the previous occurrence
              of the current token (Olsson et al., 2022). Copying heads score ~1; others ~1/q.

Summaries are averaged over the batch. The induction score uses its own random tokens (seeded), not a prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

import tinygpt
from tinygpt.config import Config
from tinygpt.display import Table, displayable
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError



@checks_tokens("tokens")
def attention_patterns(params, config: Config, tokens, attention_mask=None):
    """The attention pattern of every head.  tokens [batch, seq] -> [layer, batch, head, seq, key] float32"""
    return tinygpt.forward(params, tokens, config, attention_mask=attention_mask, keep=("attn_pattern",)).attn_pattern


def diagonal_mean(pattern, offset: int):
    """Mean of pattern[..., q, q - offset] over the queries q >= max(offset, 1).
    pattern [..., seq, key] -> [...]"""
    seq = pattern.shape[-1]
    queries = np.arange(max(offset, 1), seq)
    return pattern[..., queries, queries - offset].mean(axis=-1)


def first_token_score(pattern):
    """Mean attention to key 0 over queries 1...  [..., seq, key] -> [...]"""
    return pattern[..., 1:, 0].mean(axis=-1)


def previous_token_score(pattern):
    """Mean attention to key q - 1 over queries 1...  [..., seq, key] -> [...]"""
    return diagonal_mean(pattern, 1)


def self_score(pattern):
    """Mean attention of each query to itself over queries 1...  [..., seq, key] -> [...]"""
    return diagonal_mean(pattern, 0)


def induction_score(pattern, n: int):
    """Mean attention from query q to key q - n + 1, over the second copy q in [n, 2n) of a sequence that
    repeats a block of n tokens.  [..., 2n, 2n] -> [...]"""
    queries = np.arange(n, 2 * n)
    return pattern[..., queries, queries - n + 1].mean(axis=-1)


def repeated_random_tokens(config: Config, n: int, batch: int, seed: int = 0) -> np.ndarray:
    """[batch, 2n] random tokens, each row a block of n tokens followed by the same block."""
    block = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, n))
    return np.concatenate([block, block], axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _induction_scores(params, tokens, config: Config):
    pattern = attention_patterns(params, config, tokens)  # [layer, batch, head, seq, key]
    return induction_score(pattern, tokens.shape[1] // 2).mean(axis=1)  # [layer, head]


def induction_scores(params, config: Config, *, n: int | None = None, batch: int = 4, seed: int = 0) -> np.ndarray:
    """Induction score of every head on `batch` sequences of n random tokens repeated once (default n: half
    the context, at most 50).  -> [layer, head]"""
    n = min(config.n_ctx // 2, 50) if n is None else n
    if not 2 <= n <= config.n_ctx // 2:
        raise InputError(f"the repeated block needs 2 <= n <= n_ctx / 2 = {config.n_ctx // 2} tokens, got {n}")
    return np.asarray(_induction_scores(params, repeated_random_tokens(config, n, batch, seed), config))


SCORES = {"first": "first position", "previous": "previous position", "diagonal": "own position (self)",
          "induction": "induction (repeated random tokens)"}


@displayable(axes={"first": "layer head", "previous": "layer head", "diagonal": "layer head", "induction": "layer head"})
@dataclasses.dataclass
class HeadSummary:
    """Per-head attention scores [layer, head], each a mean attention probability (0..1): to the first, the
    previous and the own position on the prompt, and the induction score on repeated random tokens."""

    first: np.ndarray  # [layer, head] mean attention to the first position
    previous: np.ndarray  # [layer, head] mean attention to the previous position
    diagonal: np.ndarray  # [layer, head] mean attention to the query's own position
    induction: np.ndarray  # [layer, head] induction score on repeated random tokens

    def _headline(self, top: int = 3):
        """The `top` heads by each score."""
        rows = []
        for name, label in SCORES.items():
            scores = np.asarray(getattr(self, name))
            order = np.argsort(-scores, axis=None, kind="stable")[:top]
            heads = np.unravel_index(order, scores.shape)
            rows.append((label, ", ".join(f"L{l}H{h} {float(scores[l, h]):.2f}" for l, h in zip(*heads))))
        return Table(["attention to", f"top {top} heads (score)"], rows,
                     caption=f"{self.first.shape[0]} layers x {self.first.shape[1]} heads; scores are mean "
                             "attention probabilities (0..1)")

    def _figure(self, max_heads: int = 4096):
        """`probes.plots.head_scores`: each score as a layer x head heatmap (None beyond `max_heads` heads)."""
        if self.first.size > max_heads:
            return None
        from probes import plots

        return plots.head_scores({label: getattr(self, name) for name, label in SCORES.items()},
                                 value_label="mean attention probability",
                                 what="attention head summaries: where each head looks (induction on repeated "
                                      "random tokens)")

    def rows(self) -> list[dict]:
        n_layer, n_head = self.first.shape
        return [{"layer": layer, "head": head, "first": float(self.first[layer, head]),
                 "previous": float(self.previous[layer, head]), "diagonal": float(self.diagonal[layer, head]),
                 "induction": float(self.induction[layer, head])}
                for layer in range(n_layer) for head in range(n_head)]


@checks_tokens("tokens")
def head_summary(params, config: Config, tokens, *, induction_n: int | None = None, seed: int = 0) -> HeadSummary:
    """Per-head pattern summaries on tokens [batch, seq] (at least 2 positions, no padding), and each head's
    induction score on repeated random tokens."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError("head summaries need tokens [batch, seq] with at least 2 positions")
    pattern = np.asarray(attention_patterns(params, config, tokens), np.float64)  # [layer, batch, head, seq, key]
    mean_over_batch = lambda score: score.mean(axis=1)  # noqa: E731  [layer, batch, head] -> [layer, head]
    return HeadSummary(
        first=mean_over_batch(first_token_score(pattern)),
        previous=mean_over_batch(previous_token_score(pattern)),
        diagonal=mean_over_batch(self_score(pattern)),
        induction=induction_scores(params, config, n=induction_n, seed=seed),
    )
