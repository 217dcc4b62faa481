"""Metrics of a model's output, as pure functions of logits at one position.

logits are [..., vocab] (e.g. [batch, vocab] at the position read); token ids are ints or int arrays that
broadcast against the leading axes. Every metric returns one value per leading index ([batch]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tinygpt.errors import InputError

METRICS = ("logit_diff", "log_prob", "prob", "kl")


def pick(x, ids):
    """x[..., ids]: the entries of the token ids (one per leading index).  x [..., vocab] -> [...]"""
    ids = jnp.broadcast_to(jnp.asarray(ids), x.shape[:-1])
    return jnp.take_along_axis(x, ids[..., None], axis=-1)[..., 0]


def log_probs(logits):
    """log softmax over the vocabulary, in float32.  [..., vocab]"""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def logit_diff(logits, answer, wrong):
    """logit[answer] - logit[wrong]: how much the model prefers the answer to the wrong token."""
    return pick(logits, answer) - pick(logits, wrong)


def log_prob(logits, answer):
    """log P(answer)."""
    return pick(log_probs(logits), answer)


def prob(logits, answer):
    """P(answer)."""
    return jnp.exp(log_prob(logits, answer))


def kl_div(reference_logits, logits):
    """KL(reference || model) = sum_v p_ref (log p_ref - log p): how far the output moved from the reference
    distribution (0 when equal)."""
    reference = log_probs(reference_logits)
    return jnp.sum(jnp.exp(reference) * (reference - log_probs(logits)), axis=-1)


def normalized_recovery(patched, corrupt, clean):
    """(patched - corrupt) / (clean - corrupt): 0 where patching recovers nothing of the clean behaviour,
    1 where it recovers all of it (NaN-free only when clean != corrupt)."""
    return (patched - corrupt) / (clean - corrupt)


def metric(name: str, logits, *, answer=None, wrong=None, reference=None):
    """The metric `name` (one of METRICS) of logits [..., vocab]; `answer` for logit_diff / log_prob / prob,
    `wrong` for logit_diff, `reference` logits for kl."""
    check_metric(name, answer=answer, wrong=wrong, reference=reference)
    if name == "logit_diff":
        return logit_diff(logits, answer, wrong)
    if name == "log_prob":
        return log_prob(logits, answer)
    if name == "prob":
        return prob(logits, answer)
    return kl_div(reference, logits)


def check_metric(name: str, *, answer=None, wrong=None, reference=None) -> None:
    """ValueError naming what a metric is missing."""
    if name not in METRICS:
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    if name in ("logit_diff", "log_prob", "prob") and answer is None:
        raise InputError(f"metric {name!r} needs the answer token")
    if name == "logit_diff" and wrong is None:
        raise InputError("metric 'logit_diff' needs the wrong token as well as the answer")
    if name == "kl" and reference is None:
        raise InputError("metric 'kl' needs reference logits (the unpatched run's)")
