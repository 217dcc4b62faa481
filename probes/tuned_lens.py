"""Tuned lens: a learned affine translator per layer before the logit lens (Belrose et al., 2023).

The logit lens reads a layer's residual as if it were the last one; the tuned lens first maps it with

    translate_l(h) = h + h @ A_l + b_l          A_l [d_model, d_model], b_l [d_model], both zero at init

so at initialisation the tuned lens *is* the logit lens. Translator l reads block l's resid_pre (the input
of block l: the embeddings for l = 0, block l-1's output after), so every translator reads an intermediate
state; the last block's output needs none (its lens is the model). The translators are trained with optax
Adam to minimise KL(final || tuned lens), averaged over positions and layers, on windows of a token stream;
the model's weights are fixed.

Translators are a dict {"A": [layer, d_model, d_model], "b": [layer, d_model]}, saved as safetensors
(atomically, with sorted metadata: two identical runs give identical bytes) with the model's config and its
fingerprint (`probes.harvest.fingerprint`) in the file's metadata; `load_translators` checks the shapes,
dtypes and finiteness of the tensors and that they were trained for the model at hand.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.errors import ArtifactError
from tinygpt.files import save_safetensors
from tinygpt.inputs import checks_tokens

from .harvest import argument_error, check_model, check_tensors, fingerprint, is_integer, metadata_json, \
    read_safetensors
from .lens import LensSummary, broadcast_target, final_top, kl_divergence, lens_logits, summarize

#: The site the translators read: block l's input.
SITE = "resid_pre"
FORMAT = "tinygpt.tuned_lens"


class TunedLensError(ArtifactError):
    """A tuned-lens file that cannot be used with this model, or a token stream too short to train on."""


def init_translators(config: Config) -> dict:
    """Identity translators: A = 0 [layer, d_model, d_model], b = 0 [layer, d_model]."""
    return {"A": jnp.zeros((config.n_layer, config.d_model, config.d_model), jnp.float32),
            "b": jnp.zeros((config.n_layer, config.d_model), jnp.float32)}


def translate(A, b, resid):
    """One layer's translator, h + h @ A + b.  A [d_model, d_model], b [d_model], resid [batch, seq, d_model]"""
    resid = resid.astype(jnp.float32)
    return resid + resid @ A + b


def activations(params, tokens, config: Config):
    """The translators' inputs and the model's logits: resid_pre [layer, batch, seq, d_model] and
    logits [batch, seq, vocab]."""
    trace = forward(params, tokens, config, keep=(SITE, "logits"))
    return trace[SITE], trace.logits


def per_layer_kl(translators, params, resid, final_log_probs, config: Config):
    """Mean KL(final || tuned lens) over batch and seq, per layer, one layer's logits at a time (and
    recomputed in the backward pass), so memory holds one [batch, seq, vocab] at a time.  -> [layer]"""

    @jax.checkpoint
    def one_layer(xs):
        A, b, h = xs
        log_probs = jax.nn.log_softmax(lens_logits(params, translate(A, b, h), config), axis=-1)
        return kl_divergence(final_log_probs, log_probs).mean()

    return lax.map(one_layer, (translators["A"], translators["b"], resid))


def loss_fn(translators, params, tokens, config: Config):
    """The training loss: KL(final || tuned lens), mean over layers, batch and positions."""
    resid, logits = activations(params, tokens, config)
    resid = lax.stop_gradient(resid)
    final_log_probs = jax.nn.log_softmax(logits, axis=-1)  # [batch, seq, vocab]
    return per_layer_kl(translators, params, resid, final_log_probs, config).mean()


@functools.lru_cache(maxsize=8)
def make_trainer(config: Config, lr: float):
    """Adam with learning rate `lr`, and its jitted step (translators, opt_state, params, tokens) ->
    (translators, opt_state, loss). Cached, so repeated training runs reuse the compiled step."""
    optimizer = optax.adam(lr)

    @jax.jit
    def train_step(translators, opt_state, params, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(translators, params, tokens, config)
        updates, opt_state = optimizer.update(grads, opt_state, translators)
        return optax.apply_updates(translators, updates), opt_state, loss

    return optimizer, train_step


def random_windows(rng: np.random.Generator, stream: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """[batch, seq] random contiguous windows of a token stream."""
    starts = rng.integers(0, len(stream) - seq + 1, size=batch)
    return stream[starts[:, None] + np.arange(seq)]


def tiled_windows(stream: np.ndarray, seq: int, max_windows: int | None = None) -> np.ndarray:
    """[n, seq] non-overlapping windows covering the stream (the tail shorter than a window is dropped)."""
    n = len(stream) // seq
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq].reshape(n, seq)


def token_stream(tokenizer, texts, max_chars: int | None = None) -> np.ndarray:
    """One int32 stream of texts, each preceded by the end-of-text token when the tokenizer has one;
    at most `max_chars` characters of text in all (later texts are cut or left out)."""
    parts = []
    budget = max_chars
    for text in texts:
        if budget is not None:
            if budget <= 0:
                break
            text, budget = text[:budget], budget - len(text)
        if tokenizer.eos_id is not None:
            parts.append([tokenizer.eos_id])
        parts.append(tokenizer.encode(text))
    return np.concatenate([np.asarray(p, np.int32) for p in parts]) if parts else np.zeros(0, np.int32)


def check_stream(stream, seq: int, config: Config) -> np.ndarray:
    stream = np.asarray(stream, np.int32).reshape(-1)
    if not is_integer(seq) or seq < 2 or seq > config.n_ctx:
        raise argument_error(TunedLensError, "seq", "{argument} (the window length) {seq!r} must be between 2 and "
                             "the model's context n_ctx={n_ctx}", seq=seq, n_ctx=config.n_ctx)
    if len(stream) < seq:
        raise TunedLensError(f"the token stream has {len(stream)} tokens, fewer than one window of {seq}")
    if stream.min() < 0 or stream.max() >= config.vocab_size:
        raise TunedLensError(f"the token stream has ids outside the vocabulary [0, {config.vocab_size})")
    return stream


@displayable(axes={"losses": "step"})
@dataclasses.dataclass
class TrainedLens:
    translators: dict  # {"A": [layer, d_model, d_model], "b": [layer, d_model]}
    losses: np.ndarray  # [steps] training loss (mean KL over layers, nats) at each step


@checks_tokens("stream")
def train_tuned_lens(params, config: Config, stream, *, steps: int = 300, batch: int = 8, seq: int = 64,
                     lr: float = 1e-3, seed: int = 0, translators=None, progress: bool = False,
                     on_step: Callable[[int], None] | None = None) -> TrainedLens:
    """Train translators on random windows [batch, seq] of a token stream with Adam (learning rate `lr`),
    starting from identity (or from `translators`). on_step(steps done) is called after each step."""
    for name, value in (("steps", steps), ("batch", batch)):
        if not is_integer(value) or value < 1:
            raise argument_error(TunedLensError, name, "{argument} must be at least 1, got {value!r}", value=value)
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise argument_error(TunedLensError, "lr", "{argument} must be a finite number > 0, got {value!r}", value=lr)
    stream = check_stream(stream, seq, config)
    optimizer, train_step = make_trainer(config, float(lr))
    translators = init_translators(config) if translators is None else translators
    opt_state = optimizer.init(translators)
    rng = np.random.default_rng(seed)
    losses = []
    steps_iter = range(steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, desc="tuned lens", unit="step")
    for step in steps_iter:
        tokens = jnp.asarray(random_windows(rng, stream, batch, seq))
        translators, opt_state, loss = train_step(translators, opt_state, params, tokens)
        losses.append(loss)
        if on_step is not None:
            on_step(step + 1)
    return TrainedLens(translators=translators, losses=np.asarray(jax.device_get(losses), np.float32))


# ---------------------------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("config",))
def _window_metrics(translators, params, tokens, config: Config):
    """Per layer, summed over the window's positions that have a next token: KL(final || lens) and the
    cross-entropy of the next token, for the logit lens and the tuned lens; and the model's own CE."""
    resid, logits = activations(params, tokens, config)
    resid, logits, targets = resid[:, :, :-1], logits[:, :-1], tokens[:, 1:]
    final_log_probs = jax.nn.log_softmax(logits, axis=-1)  # [batch, seq - 1, vocab]

    def cross_entropy(log_probs):
        return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).sum()

    def one_layer(xs):
        A, b, h = xs
        logit_lp = jax.nn.log_softmax(lens_logits(params, h, config), axis=-1)
        tuned_lp = jax.nn.log_softmax(lens_logits(params, translate(A, b, h), config), axis=-1)
        return {"kl_logit": kl_divergence(final_log_probs, logit_lp).sum(),
                "kl_tuned": kl_divergence(final_log_probs, tuned_lp).sum(),
                "ce_logit": cross_entropy(logit_lp), "ce_tuned": cross_entropy(tuned_lp)}

    per_layer = lax.map(one_layer, (translators["A"], translators["b"], resid))
    return per_layer, cross_entropy(final_log_probs)


@displayable(axes={"kl_logit": "layer", "kl_tuned": "layer", "ppl_logit": "layer", "ppl_tuned": "layer"})
@dataclasses.dataclass
class LensComparison:
    """Logit lens vs tuned lens on a token stream, per layer (block l's resid_pre), averaged over tokens."""

    kl_logit: np.ndarray  # [layer] KL(final || logit lens), nats per token
    kl_tuned: np.ndarray  # [layer] KL(final || tuned lens)
    ppl_logit: np.ndarray  # [layer] perplexity of the next token under the logit lens
    ppl_tuned: np.ndarray  # [layer]
    ppl_model: float  # the model's own perplexity on the same tokens
    n_tokens: int

    def rows(self) -> list[dict]:
        return [{"layer": layer, "site": SITE, "kl_logit": float(self.kl_logit[layer]),
                 "kl_tuned": float(self.kl_tuned[layer]), "ppl_logit": float(self.ppl_logit[layer]),
                 "ppl_tuned": float(self.ppl_tuned[layer])} for layer in range(len(self.kl_logit))]


@checks_tokens("stream")
def evaluate_lenses(params, config: Config, translators, stream, *, seq: int = 64, batch: int = 8,
                    max_windows: int | None = 64) -> LensComparison:
    """Compare the tuned lens with the logit lens on non-overlapping windows [seq] of a token stream, in
    batches of `batch` windows (a tail of fewer than `batch` windows is dropped, so one shape compiles)."""
    stream = check_stream(stream, seq, config)
    windows = tiled_windows(stream, seq, max_windows)  # [n, seq]
    batch = min(batch, len(windows))
    windows = windows[: len(windows) // batch * batch]
    totals, model_ce = None, 0.0
    for start in range(0, len(windows), batch):
        sums, ce = _window_metrics(translators, params, jnp.asarray(windows[start:start + batch]), config)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        model_ce += float(ce)
    n_tokens = len(windows) * (seq - 1)
    mean = {name: np.asarray(value, np.float64) / n_tokens for name, value in totals.items()}
    return LensComparison(kl_logit=mean["kl_logit"], kl_tuned=mean["kl_tuned"], ppl_logit=np.exp(mean["ce_logit"]),
                          ppl_tuned=np.exp(mean["ce_tuned"]), ppl_model=float(np.exp(model_ce / n_tokens)),
                          n_tokens=n_tokens)


# ------------------------------------------------------------------------------------------ on a prompt


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _tuned_lens(translators, params, tokens, attention_mask, target, config: Config, k: int):
    trace = forward(params, tokens, config, attention_mask=attention_mask, keep=(SITE, "logits"))
    rows = (translators["A"], translators["b"], trace[SITE])  # [layer, ...] each

    def read(row):
        A, b, h = row
        return lens_logits(params, translate(A, b, h), config)

    out = summarize(read, rows, trace.logits, target, k)  # [layer, batch, seq, ...]
    return {**jax.tree.map(lambda x: x[None], out), **final_top(trace.logits, k)}  # a [site] axis of 1


@checks_tokens("tokens")
def tuned_lens(params, config: Config, translators, tokens, *, target=None, k: int = 5,
               attention_mask=None) -> LensSummary:
    """The tuned lens at every layer (block l's resid_pre) and position of tokens [batch, seq], summarised as
    `probes.lens.logit_lens` does (site "resid_pre")."""
    tokens = jnp.asarray(tokens)
    target = broadcast_target(target, tokens)
    out = _tuned_lens(translators, params, tokens, attention_mask, target, config, min(k, config.vocab_size))
    out = jax.tree.map(np.asarray, out)
    return LensSummary(sites=(SITE,), target=None if target is None else np.asarray(target),
                       tokens=np.asarray(tokens), tuned=True, **out)


# ------------------------------------------------------------------------------------------------ save/load


def config_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_translators(path, translators, config: Config, *, params=None, **info) -> None:
    """Write translators to a safetensors file, atomically; the metadata holds the format, site, config,
    the model fingerprint (given the model's `params`) and `info` (JSON, sorted keys)."""
    tensors = {name: np.ascontiguousarray(np.asarray(value, np.float32)) for name, value in translators.items()}
    metadata = {"format": FORMAT, "site": SITE, "config": json.dumps(config_dict(config), sort_keys=True),
                "info": json.dumps(info, sort_keys=True)}
    if params is not None:
        metadata["model_fingerprint"] = fingerprint(params)
    save_safetensors(path, tensors, metadata)


def load_translators(path, config: Config, params=None) -> dict:
    """Read translators written by `save_translators`, checked: the format and site, the config they were
    trained for equal to `config`, tensors A [layer, d_model, d_model] and b [layer, d_model] float32 and
    finite, and (given the model's `params`, when the file records one) the model fingerprint."""
    where = f"tuned lens {str(path)!r}"
    try:
        tensors, metadata = read_safetensors(path, "tuned lens", error=TunedLensError)
    except TunedLensError:
        if not os.path.lexists(path):
            raise TunedLensError(f"no tuned lens at {path}") from None
        raise
    if metadata.get("format") != FORMAT:
        raise TunedLensError(f"{where} is not a tuned lens written by tinygpt (format {metadata.get('format')!r})")
    if metadata.get("site") != SITE:
        raise TunedLensError(f"{where} reads the unknown site {metadata.get('site')!r}; tinygpt's tuned lens reads "
                             f"{SITE!r}")
    saved = metadata_json(metadata, "config", where, error=TunedLensError)
    if not isinstance(saved, dict):
        raise TunedLensError(f"{where}: metadata 'config' is not a JSON object")
    if saved != config_dict(config):
        differ = ", ".join(f"{k}={saved.get(k)} (model: {v})" for k, v in config_dict(config).items()
                           if saved.get(k) != v)
        raise TunedLensError(f"the tuned lens in {path} was trained for another model: {differ}")
    metadata_json(metadata, "info", where, error=TunedLensError)  # must parse
    L, d = config.n_layer, config.d_model
    check_tensors(tensors, {"A": (L, d, d), "b": (L, d)}, where, error=TunedLensError)
    check_model(metadata.get("model_fingerprint"), params, where, error=TunedLensError)
    return {name: jnp.asarray(value) for name, value in tensors.items()}
