"""Steering: add a vector to the residual stream at one layer, at chosen positions, during generation.

Three ways to get a vector:

- difference of means: the mean residual at the last token of "positive" prompts minus that of "negative"
  prompts, at the layer and site it will be added to, as contrastive activation addition (Rimsky et al.
  2024) builds its vectors from many contrasting prompts (activation addition, Turner et al. 2023, takes
  the difference of one pair, "Love" - "Hate", at every position of the pair and adds it at the first
  positions of the prompt: `steer(..., positions=[0, 1, ...])` with that vector);
- function vectors (Todd et al., 2024): the mean output of attention heads at the last token of in-context
  prompts (`x -> y` pairs), for the heads with the largest indirect effect: patching a head's mean output
  into prompts whose examples were shuffled raises the probability of the right answer; their sum, added
  at one layer, makes a zero-shot prompt act as if it had the examples;
- embedding arithmetic: wte[king] - wte[man] + wte[woman], and its nearest tokens.

The edit adds `coefficient * vector` at the site (resid_pre, resid_mid or resid_post) of block `layer` and
leaves every other layer, site and position alone. During `tinygpt.generate` the edit runs on the prompt and
then on every generated token, and is given each token's absolute position (`tinygpt.forward`'s
`positions`), so it steers every position, chosen token positions (prompt or generated), or every position
from one on: `positions="generated"` steers the generated tokens only, as contrastive activation addition
does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt
from tinygpt.config import Config
from tinygpt.display import Table, displayable
from tinygpt.inputs import checks_tokens
from tinygpt.errors import InputError

f32 = jnp.float32

#: Sites a steering vector can be read from and added to.
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


def check_site_layer(config: Config, site: str, layer: int) -> None:
    if site not in RESID_SITES:
        raise InputError(f"steering site must be one of {', '.join(RESID_SITES)}, got {site!r}")
    if not 0 <= layer < config.n_layer:
        raise InputError(f"layer {layer} is out of range: the model has {config.n_layer} layers (0-based)")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Prompts of different lengths as one left-padded batch: tokens [batch, seq] and attention_mask
    [batch, seq] (1 real, 0 padding). Every prompt's last token is at position seq - 1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("need at least one prompt, and no empty prompt")
    seq = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), seq), pad_id, np.int32)
    mask = np.zeros((len(prompts), seq), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, seq - len(prompt):] = prompt
        mask[row, seq - len(prompt):] = 1
    return tokens, mask


# ---------------------------------------------------------------------------------------- difference of means


@checks_tokens("prompts")
def mean_last_resid(params, config: Config, prompts: Sequence[Sequence[int]], layer: int,
                    site: str = "resid_pre"):
    """The mean over prompts of the residual at `site` of block `layer`, at each prompt's last token.
    -> [d_model] float32"""
    check_site_layer(config, site, layer)
    tokens, mask = left_pad(prompts)
    trace = tinygpt.forward(params, tokens, config, attention_mask=mask, keep=(site,))
    return trace[site][layer, :, -1].astype(f32).mean(axis=0)


@checks_tokens("positive", "negative")
def mean_difference(params, config: Config, positive, negative, layer: int, site: str = "resid_pre"):
    """Difference-of-means steering vector: mean last-token residual of `positive` prompts minus that of
    `negative` prompts (lists of token-id lists), at `site` of block `layer`.  -> [d_model]"""
    return (mean_last_resid(params, config, positive, layer, site)
            - mean_last_resid(params, config, negative, layer, site))


# ----------------------------------------------------------------------------------------------- the edit


def steering_edit(vector, layer: int, coefficient: float = 1.0, positions=None, *, start=None):
    """An edit fn(value, at_layer, positions) adding coefficient * vector at block `layer`, for a residual site.

    positions   None: every position; or token positions (as the position embedding counts them: prompt
                positions 0 .. prompt_len - 1, then the generated tokens')
    start       instead of positions: every position >= start (the prompt's length: generated tokens only)
    """
    if positions is not None and start is not None:
        raise InputError("give positions or start, not both")
    vector = jnp.asarray(vector)
    steered = None if positions is None else jnp.asarray(positions)

    def edit(value, at_layer, positions):  # value [batch, seq, d_model], positions [batch, seq]
        if steered is not None:
            chosen = (positions[..., None] == steered).any(-1)  # [batch, seq]
        elif start is not None:
            chosen = positions >= start
        else:
            chosen = jnp.ones(positions.shape, bool)
        here = (at_layer == layer) & chosen[..., None]  # [batch, seq, 1]
        return jnp.where(here, value + coefficient * vector.astype(value.dtype), value)

    return edit


def resolve_positions(positions, prompt_len: int) -> list[int] | None:
    """None stays None; prompt positions (negative ones count from the end) become sorted indices."""
    if positions is None:
        return None
    resolved = set()
    for p in positions:
        if not -prompt_len <= p < prompt_len:
            raise InputError(f"position {p} is outside the prompt of {prompt_len} tokens")
        resolved.add(p % prompt_len)
    if not resolved:
        raise InputError("positions is empty: give prompt positions, or None for every position")
    return sorted(resolved)


@displayable(axes={"tokens": "batch new", "baseline": "batch new"})
@dataclasses.dataclass
class Steered:
    tokens: np.ndarray  # [batch, new] generated with the vector added
    baseline: np.ndarray | None  # [batch, new] generated without it (same sampling seed), when compared
    positions: list[int] | str | None  # the prompt positions steered, "generated", or None (every position)


@functools.partial(jax.jit, static_argnames=("config", "site", "max_new_tokens", "temperature", "top_k"))
def _steered_generations(params, tokens, vector, layer, coefficients, positions, start, seed, config: Config,
                         site: str, max_new_tokens: int, temperature: float, top_k: int | None):
    """One generation per coefficient, vmapped (a coefficient of 0 is the unsteered model, same random draws).
    positions: None or prompt positions [n]; start: None or the first steered position.
    -> [coefficient, batch, new]"""

    def one(coefficient):
        edit = steering_edit(vector, layer, coefficient, positions, start=start)
        return tinygpt.generate(params, config, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                                seed=seed, edits={site: edit}).tokens

    return jax.vmap(one)(coefficients)


@checks_tokens("tokens")
def steer(params, config: Config, tokens, vector, layer: int, coefficient: float = 1.0, *,
          site: str = "resid_pre", positions=None, max_new_tokens: int = 20, temperature: float = 0.0,
          top_k: int | None = None, seed: int = 0, compare: bool = True) -> Steered:
    """Generate from tokens [batch, seq] with coefficient * vector added at `site` of block `layer`, at
    `positions` (None: every position, generated tokens included; "generated": the generated tokens only;
    else prompt positions), and (compare) without it. Both run as one compiled program, reused across calls
    of the same shapes."""
    check_site_layer(config, site, layer)
    tokens = np.asarray(tokens, np.int32)
    start = None
    if isinstance(positions, str):
        if positions != "generated":
            raise InputError(f"positions must be None, 'generated' or prompt positions, got {positions!r}")
        start = jnp.asarray(tokens.shape[1])
    else:
        positions = resolve_positions(positions, tokens.shape[1])
    prompt_positions = None if positions is None or start is not None else jnp.asarray(positions)
    coefficients = jnp.asarray([coefficient, 0.0] if compare else [coefficient], f32)
    generated = _steered_generations(params, tokens, jnp.asarray(vector), layer, coefficients, prompt_positions,
                                     start, seed, config, site, max_new_tokens, float(temperature), top_k)
    generated = np.asarray(generated)
    return Steered(tokens=generated[0], baseline=generated[1] if compare else None, positions=positions)


# ------------------------------------------------------------------------------------------ function vectors


@functools.partial(jax.jit, static_argnames=("config",))
def mean_head_outputs(params, tokens, attention_mask, config: Config):
    """Each head's output at the last position, averaged over prompts [batch, seq] (left-padded, so the last
    position is every prompt's last token).  -> [layer, head, d_model] float32"""
    trace = tinygpt.forward(params, tokens, config, attention_mask=attention_mask, keep=("head_out",))
    return trace.head_out[:, :, -1].astype(f32).mean(axis=1)  # [layer, head, d_model]


def head_patch_edit(layer, head, vector):
    """An edit of head_out replacing head `head` of block `layer` at the last position with `vector`
    (layer and head may be traced)."""

    def edit(value, at_layer):  # value [batch, seq, head, d_model]
        _, seq, n_head, _ = value.shape
        last = (jnp.arange(seq) == seq - 1)[None, :, None, None]
        this_head = (jnp.arange(n_head) == head)[None, None, :, None]
        return jnp.where((at_layer == layer) & last & this_head, vector.astype(value.dtype), value)

    return edit


@functools.partial(jax.jit, static_argnames=("config",))
def indirect_effects(params, tokens, attention_mask, answers, mean_head_out, config: Config):
    """For every head: the mean over prompts of p(answer) at the last position when the head's output there
    is replaced by its mean over clean prompts, minus p(answer) unpatched. tokens [batch, seq] are the
    corrupted prompts (examples' answers shuffled), answers [batch].  -> [layer, head]"""

    def answer_prob(edits):
        logits = tinygpt.forward(params, tokens, config, edits=edits, attention_mask=attention_mask,
                                 keep=("logits",)).logits[:, -1]  # [batch, vocab]
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.take_along_axis(probs, answers[:, None], axis=-1).mean()

    layers, heads = jnp.divmod(jnp.arange(config.n_layer * config.n_head), config.n_head)
    patched = jax.lax.map(lambda lh: answer_prob({"head_out": head_patch_edit(lh[0], lh[1], mean_head_out[lh])}),
                          (layers, heads))  # [layer * head]
    return (patched - answer_prob(None)).reshape(config.n_layer, config.n_head)


@displayable(axes={"mean_head_out": "layer head d_model", "indirect_effect": "layer head", "vector": "d_model"})
@dataclasses.dataclass
class FunctionVector:
    mean_head_out: np.ndarray  # [layer, head, d_model] mean head outputs at the last token of clean prompts
    indirect_effect: np.ndarray  # [layer, head] mean rise of p(answer) when patched into corrupted prompts
    heads: list[tuple[int, int]]  # the chosen heads (layer, head), largest indirect effect first
    vector: np.ndarray  # [d_model] sum of the chosen heads' mean outputs

    def _headline(self):
        return Table(["head", "indirect effect"],
                     [(f"L{layer}.H{head}", float(self.indirect_effect[layer, head])) for layer, head in self.heads],
                     caption="the chosen heads, largest indirect effect first")


@checks_tokens("clean", "corrupted")
def function_vector(params, config: Config, clean, corrupted, answers, *, n_heads: int = 10) -> FunctionVector:
    """A function vector from in-context prompts: `clean` and `corrupted` are lists of token-id prompts
    (corrupted: the same prompts with the examples' answers shuffled), `answers` the id each should predict
    next. The `n_heads` heads with the largest indirect effect are summed."""
    if len(clean) != len(corrupted) or len(corrupted) != len(answers):
        raise InputError("clean, corrupted and answers must have the same number of prompts")
    clean_tokens, clean_mask = left_pad(clean)
    corrupted_tokens, corrupted_mask = left_pad(corrupted)
    means = mean_head_outputs(params, clean_tokens, clean_mask, config)
    effects = indirect_effects(params, corrupted_tokens, corrupted_mask, jnp.asarray(answers, jnp.int32), means,
                               config)
    effects = np.asarray(effects)
    order = np.argsort(-effects, axis=None, kind="stable")[:n_heads]
    heads = [tuple(int(i) for i in np.unravel_index(flat, effects.shape)) for flat in order]
    means = np.asarray(means)
    vector = np.sum([means[layer, head] for layer, head in heads], axis=0)
    return FunctionVector(mean_head_out=means, indirect_effect=effects, heads=heads, vector=vector)


# ------------------------------------------------------------------------------------- embedding arithmetic


def embedding_arithmetic(params, plus: Sequence[int], minus: Sequence[int] = (), *, k: int = 10,
                         exclude_inputs: bool = True) -> list[tuple[int, float]]:
    """The k tokens whose embeddings have the highest cosine similarity with sum wte[plus] - sum wte[minus]
    (e.g. king - man + woman), as (id, cosine); the input tokens themselves are left out by default."""
    wte = np.asarray(params["wte"], np.float32)  # [vocab, d_model]
    vector = wte[list(plus)].sum(axis=0) - (wte[list(minus)].sum(axis=0) if len(minus) else 0.0)  # [d_model]
    cosine = wte @ vector / (np.linalg.norm(wte, axis=-1) * np.linalg.norm(vector) + 1e-12)  # [vocab]
    if exclude_inputs:
        cosine[list(plus) + list(minus)] = -np.inf
    order = np.argsort(-cosine, kind="stable")[:k]
    return [(int(t), float(cosine[t])) for t in order]
