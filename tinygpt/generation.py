"""Text generation with a key-value cache, compiled so a whole continuation is one XLA program.

The prompt runs through the reference `forward` (keeping its keys and values); each new token then runs
through `decode_step`, which is the same block (`block_qkv`, `attention`, `block_after_attention`) attending
over the cache. Edits apply to the prompt and to every step, and any sites can be kept for both: the prompt's
trace is a normal `Trace`, the steps' trace is stacked over steps, `[step, layer, batch, 1, ...]`.

Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus), seeded by an explicit seed.
Left-padded batches give the same tokens as single runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from .config import Config
from .errors import InputError
from .arguments import check_float, check_int, check_seed
from .compiled import at_top_level, forward
from .inputs import check_inputs
from .kernels import project_heads_batched
from .model import attention, block_after_attention, block_qkv, embedding, final_sites, positions_from_mask, unembed
from .params import layer_views
from .recorder import Edits, SiteRecorder, check_edits, normalize_edits, normalize_keep, values_only
from .trace import Trace


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", check_float(self.temperature, "temperature", low=0.0))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", check_int(self.top_k, "top_k", low=1))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", check_float(self.top_p, "top_p", low=0.0, high=1.0, low_open=True))


def sample(logits, key, sampling: Sampling):
    """Next token ids from logits [batch, vocab] (float32). -> [batch]

    A row whose logits are NaN (its prompt held an id outside the vocabulary, fed under jit where it cannot be
    checked: see `tinygpt.inputs`) gets -1, never a real token."""
    return jnp.where(jnp.isnan(logits).any(axis=-1), -1, choose(logits, key, sampling))  # [batch]


def choose(logits, key, sampling: Sampling):
    """Greedy, temperature, top-k and top-p choice of the next token ids.  logits [batch, vocab] -> [batch]"""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        # keep the smallest set of most probable tokens whose probability reaches top_p
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop_sorted = mass_before >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@dataclasses.dataclass
class Generation:
    tokens: Any  # [batch, new] the generated ids
    sequences: Any  # [batch, prompt + new] prompt (with its padding) followed by the generated ids
    logits: Any = None  # [batch, new, vocab] the logits each new token was chosen from (return_logits=True)
    prompt_trace: Trace | None = None  # kept sites of the prompt
    step_trace: Trace | None = None  # kept sites of generated tokens fed back: [step, layer, batch, 1, ...]
    passes: Any = None  # [] model passes it took: the prompt's, then one per step (or per verified draft)


def decode_step(params, layers, tokens, positions, cache, index, mask, config: Config, edits, keep):
    """Run a few new tokens per sequence through the model, attending over the KV cache.

    layers: one params dict per block (`tinygpt.params.layer_views`); tokens, positions [batch, new];
    cache: per block a pair (k, v) laid out keys-last, [batch, head, d_head, total], the layout the CPU
    attention reads (`chunked_attention`), so a step writes its few new slots and never transposes the whole
    cache (with [batch, total, head, d_head] every layer copied its cache twice a step: ~0.4 s of a 64-token
    batch-8 continuation of GPT-2 small on a 2-core CPU); index: cache slot of the first new token,
    one int for the whole batch or one per row [batch]; mask [batch, 1, new, total] which slots each new
    token attends (its own included). Plain decoding feeds one token (new = 1); prompt-lookup decoding feeds
    the last accepted token and its draft.
    Returns (logits [batch, new, vocab], new cache, Trace of this step with per-layer sites stacked [layer, ...]).

    The blocks run in a Python loop over per-layer weights rather than a `lax.scan` over the stacked ones:
    a step of one token per sequence reads every weight once and does little else, and a scan's per-layer
    slice of the stacked weights is a copy on XLA's CPU backend (measured: the step ~1.5x slower). The price
    is a compile time that grows with depth (a 12-layer model's `generate` compiles in ~3 s on CPU, a
    48-layer one in ~11 s); the prompt's forward still scans."""
    outer = SiteRecorder(edits, keep | {"logits"}, None, positions)
    embed = outer("embed", embedding(params["wte"], tokens))  # [batch, new, d_model]
    pos_embed = outer("pos_embed", params["wpe"][positions])  # [batch, new, d_model]

    resid = embed + pos_embed  # [batch, new, d_model]
    new_cache, per_layer = [], []
    for layer, (p, (layer_k, layer_v)) in enumerate(zip(layers, cache)):
        site = SiteRecorder(edits, keep, jnp.asarray(layer, jnp.int32), positions)
        resid_pre, q, k, v = block_qkv(resid, p, site, config.ln_eps, project_heads_batched)
        layer_k = _write_slots(layer_k, k.transpose(0, 2, 3, 1).astype(layer_k.dtype), index, axis=3)
        layer_v = _write_slots(layer_v, v.transpose(0, 2, 3, 1).astype(layer_v.dtype), index, axis=3)
        # the block reads [batch, total, head, d_head]; XLA cancels this transpose against the CPU attention's
        # own (`chunked_attention`), so no step copies the cache
        k_view, v_view = layer_k.transpose(0, 3, 1, 2), layer_v.transpose(0, 3, 1, 2)
        z = attention(q, k_view, v_view, mask, site)  # [batch, new, head, d_head]
        resid = block_after_attention(resid_pre, z, p, site, config.ln_eps)
        new_cache.append((layer_k, layer_v))
        per_layer.append(site.kept)
    final_sites(resid, params, outer, config.ln_eps)
    logits = outer.kept["logits"]
    kept = {name: value for name, value in outer.kept.items() if name in keep}
    stacked = jax.tree_util.tree_map(lambda *values: jnp.stack(values), *per_layer)  # [layer, batch, new, ...]
    return logits, tuple(new_cache), Trace(**kept, **stacked)


def _write_slots(buffer, new, index, axis=1):
    """buffer [batch, ..., total, ...] with new [batch, ..., new, ...] written along `axis` from slot `index`
    on: one int for every row, or one per row [batch]."""
    if jnp.ndim(index) == 0:
        return lax.dynamic_update_slice_in_dim(buffer, new, index, axis=axis)
    return jax.vmap(lambda row, values, at: lax.dynamic_update_slice_in_dim(row, values, at, axis=axis - 1))(
        buffer, new, index)


def generate(
    params,
    config: Config,
    tokens,
    max_new_tokens: int,
    *,
    attention_mask=None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    edits: Edits | None = None,
    keep=(),
    return_logits: bool = False,
    on_token: Callable[[int, np.ndarray], None] | None = None,
    prompt_lookup: int = 0,
) -> Generation:
    """Continue `tokens` [batch, seq] (left-padded if `attention_mask` [batch, seq] is given) by
    `max_new_tokens` tokens, with a KV cache, as one compiled program.

    temperature 0 is greedy; top_k / top_p filter before sampling; `seed` fixes the random draws.
    edits  edit values (`tinygpt.edits`) or {site: fn(value, layer)}, applied to the prompt and to every
           generated step (edit values run in a program compiled once per their structure; function edits
           compile once per function object, so a new closure per call compiles again). The prompt's value is
           [batch, seq, ...], a step's [batch, 1, ...] and a prompt-lookup pass's [batch, prompt_lookup + 1,
           ...], so an index into the seq axis means a different token in each: an edit aimed at particular
           tokens takes `positions`, fn(value, layer, positions), their absolute positions [batch, seq]
           (padding skipped), the same in the prompt and the steps. Generating with edits then gives the
           tokens and logits of `forward` with those edits on the final sequence.
    keep   sites to keep for the prompt and the steps (default none)
    on_token  called on the host as `on_token(step, ids[batch])` while the program runs (streaming)
    prompt_lookup  greedy only: draft this many tokens per row by prompt lookup (`lookup_draft`) and verify
              them in one pass (`_generate_lookup`). The tokens are greedy decoding's; the passes are fewer
              where the continuation repeats earlier text (`Generation.passes` counts them), and once half
              the rows are done passes run on the unfinished ones only (one compiled pass per halving of the
              batch, so a batch of 8 compiles 4). No step traces or streaming: a pass feeds tokens that may be
              rejected."""
    sampling = Sampling(temperature, top_k, top_p)
    if prompt_lookup:
        _check_lookup(prompt_lookup, sampling, keep, on_token)
    tokens, attention_mask = check_inputs(tokens, attention_mask, config)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
    seed = check_seed(seed)
    total = tokens.shape[1] + max_new_tokens
    if total > config.n_ctx:
        raise InputError(
            f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens = {total} exceeds the model's "
            f"context n_ctx={config.n_ctx}"
        )
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    edits = normalize_edits(edits)
    check_edits(edits, config)
    keep = normalize_keep(keep) if keep else frozenset()
    layers = layer_views(params["blocks"])
    if not at_top_level():  # inside an outer jit/vmap: trace inline (a cache keyed on closures over tracers
        # would only grow)
        if prompt_lookup:
            return _generate_lookup(params, layers, tokens, attention_mask, config, max_new_tokens, prompt_lookup,
                                    edits, return_logits)
        return _generate(params, layers, tokens, attention_mask, jax.random.PRNGKey(seed), config, max_new_tokens,
                         sampling, edits, keep, return_logits, on_token)
    edits_key, given, baked = _edit_arguments(edits)
    if prompt_lookup:
        run = _cached_jit(("lookup", config, max_new_tokens, prompt_lookup, edits_key, return_logits),
                          lambda p, layers, t, m, given: _generate_lookup(
                              p, layers, t, m, config, max_new_tokens, prompt_lookup,
                              given if baked is None else baked, return_logits))
        return run(params, layers, tokens, attention_mask, given)
    run = _cached_jit((config, max_new_tokens, sampling, edits_key, keep, return_logits, _Static(on_token)),
                      lambda p, layers, t, m, key, given: _generate(
                          p, layers, t, m, key, config, max_new_tokens, sampling, given if baked is None else baked,
                          keep, return_logits, on_token))
    return run(params, layers, tokens, attention_mask, jax.random.PRNGKey(seed), given)


def _edit_arguments(edits):
    """How normalized edits enter the cached compiled program: (cache key, argument, baked-in edits).
    Edit values are an argument: one program per their structure, run with the arrays they hold now.
    Function edits are baked in: one program per the functions (by identity), their closures as traced."""
    if values_only(edits):
        return ("values", jax.tree_util.tree_structure(edits)), edits, None
    return _Static(edits), {}, edits


def _check_lookup(n_draft, sampling: Sampling, keep, on_token):
    check_int(n_draft, "prompt_lookup", low=1)
    if sampling.temperature != 0:
        raise InputError("prompt_lookup verifies drafts against greedy choices: it needs temperature=0")
    if keep:
        raise InputError("prompt_lookup keeps no traces (a pass feeds draft tokens that may be rejected); "
                         "generate without it to keep sites")
    if on_token is not None:
        raise InputError("prompt_lookup does not stream (rows gain several tokens per pass); generate "
                         "without it to use on_token")


class _Static:
    """Wraps an unhashable static value (edits dict, callback) for jit's cache by identity."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value) if not isinstance(self.value, dict) else hash(
            tuple((k, tuple(map(id, v))) for k, v in self.value.items()))

    def __eq__(self, other):
        return isinstance(other, _Static) and hash(self) == hash(other)


_CACHE: dict = {}


def _cached_jit(key, fn):
    """jit(fn), kept under `key` (the static arguments fn closes over); the 64 most recent are kept."""
    if key not in _CACHE:
        _CACHE[key] = jax.jit(fn)
        if len(_CACHE) > 64:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def _generate(params, layers, tokens, attention_mask, key, config, max_new_tokens, sampling, edits, keep,
              return_logits, on_token):
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens

    prompt, cache, first_logits, next_position = _prefill(params, tokens, attention_mask, config, edits, keep,
                                                          max_new_tokens)
    key_valid = jnp.pad(attention_mask.astype(bool), [(0, 0), (0, max_new_tokens)])  # [batch, total]
    key, subkey = jax.random.split(key)
    first = sample(first_logits, subkey, sampling)
    _stream(on_token, 0, first)

    def step(carry, i):
        token, cache, key_valid, key = carry
        index = prompt_len + i - 1  # cache slot of the token being fed
        key_valid = key_valid.at[:, index].set(True)
        logits, cache, trace = decode_step(
            params, layers, token[:, None], (next_position + i - 1)[:, None], cache, index,
            key_valid[:, None, None, :], config, edits, keep)
        logits = logits[:, 0]  # [batch, vocab]
        key, subkey = jax.random.split(key)
        token = sample(logits, subkey, sampling)
        _stream(on_token, i, token)
        out = (token, logits if return_logits else None, trace)
        return (token, cache, key_valid, key), out

    carry = (first, cache, key_valid, key)
    _, (rest, rest_logits, step_trace) = lax.scan(step, carry, jnp.arange(1, max_new_tokens))
    new_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [batch, new]
    logits = None
    if return_logits:
        logits = jnp.concatenate([first_logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    prompt_kept = Trace(**{name: getattr(prompt, name) for name in keep})
    return Generation(
        tokens=new_tokens,
        sequences=jnp.concatenate([tokens, new_tokens.astype(tokens.dtype)], axis=1),
        logits=logits,
        prompt_trace=prompt_kept if keep else None,
        step_trace=step_trace if keep else None,
        passes=jnp.asarray(max_new_tokens, jnp.int32),
    )


# -------------------------------------------------------------------------------- prompt-lookup decoding


def lookup_draft(seq, length, n_draft: int, max_ngram: int = 3):
    """Draft the next `n_draft` tokens of each row by prompt lookup (Saxena, 2023): find the most recent
    earlier occurrence of the row's last n tokens (n = max_ngram down to 1, longest match first) and copy what
    followed it, continued periodically when the copy reaches the end (so a loop of period p is drafted as
    the loop). A row with no match drafts its last token repeated. Any draft is safe: the verifying pass
    keeps only the tokens greedy decoding would have chosen.
    seq [batch, total] the tokens so far (past `length` anything), length [batch] -> [batch, n_draft]"""

    def one_row(row, length):
        starts = jnp.arange(row.shape[0])
        period = jnp.ones((), jnp.int32)  # no match: repeat the last token
        found = jnp.zeros((), bool)
        for n in range(max_ngram, 0, -1):
            tail = lax.dynamic_slice_in_dim(row, length - n, n)  # [n] the last n tokens
            rolled = jnp.stack([jnp.roll(row, -i) for i in range(n)], axis=-1)  # [total, n]: row[j + i]
            match = (rolled == tail).all(-1) & (starts + n < length) & (length - n > 0)  # strictly earlier
            latest = jnp.max(jnp.where(match, starts, -1))
            use = (latest >= 0) & ~found
            period = jnp.where(use, length - n - latest, period)
            found = found | (latest >= 0)
        return row[length - period + jnp.arange(n_draft) % period]

    return jax.vmap(one_row)(seq, length)


def _generate_lookup(params, layers, tokens, attention_mask, config, max_new_tokens, n_draft, edits,
                     return_logits, draft=lookup_draft):
    """Greedy decoding that verifies a draft of `n_draft` tokens per row in each pass.

    Each pass feeds every row its last accepted token and its draft, n_draft + 1 tokens at once; the logits
    at those positions give the greedy choice after each, so the draft's leading tokens that equal those
    choices are accepted, plus one more greedy token. Every row gains 1 to n_draft + 1 tokens per pass, each
    the argmax of the logits that plain greedy decoding computes at that position (so the same tokens up to
    float rounding: the pass's matmuls have more rows than a one-token step). Rows advance independently:
    each has its own cache slot and length; a row that has its tokens stops changing.

    Rows finish at different passes (how much of a row's text repeats decides its pace), so passes run on a
    shrinking set of rows (`_row_phases`): the whole batch while more than half of it is unfinished, then the
    unfinished rows gathered into half as many (their caches with them, once), and so on down to one. A pass's
    cost grows with its rows, and without this the slowest row kept the whole batch running (GPT-2 small,
    batch 8, 4 drafts: 25 passes, the last 10 with one or two rows unfinished). With edits every pass runs
    the whole batch in order, so an edit sees the rows it was written for."""
    batch, prompt_len = tokens.shape
    width = n_draft + 1  # tokens fed per pass
    total = prompt_len + max_new_tokens + n_draft  # cache slots: a pass may run past the last token

    _, cache, first_logits, next_position = _prefill(params, tokens, attention_mask, config, edits, frozenset(),
                                                     total - prompt_len)
    first = jnp.argmax(first_logits, axis=-1)  # [batch]

    seq = jnp.pad(tokens.astype(jnp.int32), [(0, 0), (0, total - prompt_len)])  # [batch, total]
    seq = seq.at[:, prompt_len].set(first.astype(jnp.int32))
    count = jnp.ones(batch, jnp.int32)  # new tokens so far, per row
    out_logits = None
    if return_logits:
        out_logits = jnp.zeros((batch, max_new_tokens + n_draft, config.vocab_size), jnp.float32)
        out_logits = out_logits.at[:, 0].set(first_logits.astype(jnp.float32))
    real_prompt_key = jnp.pad(attention_mask.astype(bool), [(0, 0), (0, total - prompt_len)])  # [batch, total]
    slot = jnp.arange(total)  # [total]
    offset = jnp.arange(width)  # [width]

    def one_pass(rows, state):
        """A pass over the batch rows `rows` [n] (the phase's), whose caches are `cache` [n, ...]."""
        cache, seq, count, out_logits, passes = state
        length = prompt_len + count  # [batch] tokens in seq (prompt with its padding, then the new ones)
        drafts = draft(seq, length, n_draft)[rows]  # [n, n_draft] (the drafter sees the whole batch)
        seq_r, count_r, length = seq[rows], count[rows], length[rows]  # [n, total], [n], [n]
        fed = jnp.concatenate([seq_r[jnp.arange(rows.shape[0]), length - 1][:, None], drafts], axis=1)  # [n, width]
        index = length - 1  # [n] cache slot of the first fed token
        # positions past the context only feed drafts beyond max_new_tokens, which are dropped
        positions = jnp.minimum(next_position[rows, None] + count_r[:, None] - 1 + offset, config.n_ctx - 1)
        # fed token i sees the real prompt keys and the new ones up to itself
        sees = real_prompt_key[rows, None, :] | ((slot >= prompt_len) & (slot <= (index[:, None] + offset)[..., None]))
        logits, cache, _ = decode_step(params, layers, fed, positions, cache, index, sees[:, None], config, edits,
                                       frozenset())  # logits [n, width, vocab]
        choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [n, width] greedy token after each fed one
        accepted = jnp.cumprod(fed[:, 1:] == choice[:, :-1], axis=1).sum(axis=1)  # [n] leading draft hits
        active = count_r < max_new_tokens  # [n]; finished rows (a phase's padding) change nothing
        seq = seq.at[rows].set(jnp.where(active[:, None], _write_slots(seq_r, choice, length), seq_r))
        if out_logits is not None:
            mine = out_logits[rows]
            written = _write_slots(mine, logits.astype(jnp.float32), count_r)
            out_logits = out_logits.at[rows].set(jnp.where(active[:, None, None], written, mine))
        count = count.at[rows].set(jnp.where(active, count_r + accepted + 1, count_r))
        return cache, seq, count, out_logits, passes + 1

    passes = jnp.zeros((), jnp.int32)
    rows = jnp.arange(batch)  # [n] the batch rows the phase's passes run, n = its size
    phases = _row_phases(batch) if not edits else (batch,)
    for size, next_size in zip(phases, phases[1:] + (0,)):
        if size < rows.shape[0]:  # gather the unfinished rows first, finished ones after as padding
            pick = jnp.argsort(count[rows] >= max_new_tokens, stable=True)[:size]  # [size] indices into rows
            rows = rows[pick]
            cache = jax.tree_util.tree_map(lambda c: c[pick], cache)
        cache, seq, count, out_logits, passes = lax.while_loop(
            lambda state: jnp.sum(state[2] < max_new_tokens) > next_size, functools.partial(one_pass, rows),
            (cache, seq, count, out_logits, passes))
    new_tokens = seq[:, prompt_len: prompt_len + max_new_tokens]  # [batch, new]
    return Generation(
        tokens=new_tokens,
        sequences=jnp.concatenate([tokens, new_tokens.astype(tokens.dtype)], axis=1),
        logits=out_logits[:, :max_new_tokens] if return_logits else None,
        passes=passes + 1,
    )


def _row_phases(batch: int) -> tuple[int, ...]:
    """Rows per pass in each phase of prompt-lookup decoding: the batch, then halved (rounded up) down to one.
    A phase runs while more rows are unfinished than the next one holds."""
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return tuple(sizes)


def _prefill(params, tokens, attention_mask, config, edits, keep, room):
    """The prompt through the reference forward, keeping its keys and values. Returns (the prompt's trace,
    per block (k, v) [batch, head, d_head, prompt + room]: the prompt's, then `room` empty slots, the logits
    of the first new token [batch, vocab], its position [batch]). Only the last position's logits are
    computed (all of them when the caller reads or edits logits)."""
    full_logits = "logits" in keep or "logits" in edits
    prompt = forward(params, tokens, config, edits=edits, attention_mask=attention_mask,
                     keep=keep | {"k", "v", "logits" if full_logits else "ln_final"})
    def slots(kept):  # [batch, prompt, head, d_head] -> [batch, head, d_head, prompt + room]
        return jnp.pad(kept.transpose(0, 2, 3, 1), [(0, 0), (0, 0), (0, 0), (0, room)])

    cache = tuple((slots(prompt.k[layer]), slots(prompt.v[layer])) for layer in range(config.n_layer))
    if full_logits:
        first_logits = prompt.logits[:, -1]
    else:
        first_logits = unembed(prompt.ln_final[:, -1:], params)[:, 0]
    next_position = positions_from_mask(attention_mask)[:, -1] + 1
    return prompt, cache, first_logits, next_position


def _stream(on_token, step, token):
    if on_token is not None:
        io_callback(lambda s, t: on_token(int(s), np.asarray(t)), None, step, token,
                                     ordered=True)


jax.tree_util.register_dataclass(
    Generation, data_fields=["tokens", "sequences", "logits", "prompt_trace", "step_trace", "passes"], meta_fields=[]
)
