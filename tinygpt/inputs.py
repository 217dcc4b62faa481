"""Input checks: the one place that decides whether token ids and masks can be run, and the checked mode.

What is checked, and when:
- always (shapes and dtypes are static, so even under jit / vmap): tokens are an integer array
  [batch, seq] with batch >= 1 and 1 <= seq <= n_ctx; a mask has the tokens' shape;
- where the values are concrete (called outside jit / vmap, which is how every probe and the CLI call
  them): every id is in [0, vocab); the mask holds only 0 and 1, every row has a real token, and padding
  comes first (left padding: `[0, 0, 1, 1, 1]`, never `[1, 1, 1, 0, 0]`).
- inside a transformation (the values are tracers): the values cannot be looked at. The forward then embeds
  an id outside the vocabulary as NaN (`model.embedding`), so its whole sequence comes out NaN, never
  another token's (a plain `wte[ids]` would clamp id 2053 to 2047 and answer for the wrong token). To get an
  error instead, wrap the transformed function in `checked`: `tinygpt.checked(jax.jit(f))(tokens)` raises
  InputError naming the bad id. Masks are not checked inside a transformation.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from .arguments import SEED_RANGE, check_float, check_int, check_seed  # noqa: F401  (re-exported)
from .errors import InputError


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def as_token_array(tokens, argument: str = "tokens"):
    """`tokens` as an array with a shape and an integer dtype (lists and tuples converted), or InputError."""
    if isinstance(tokens, (list, tuple)):
        try:
            tokens = np.asarray(tokens)
        except ValueError:  # ragged nested lists
            raise InputError(f"{argument} must be a rectangular [batch, seq] array of token ids "
                             "(pad rows of unequal length on the left and pass attention_mask)") from None
        if tokens.size == 0:  # np.asarray([[]]) is float64: report it as empty, not as a dtype problem
            tokens = tokens.astype(np.int32)
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
        raise InputError(f"{argument} must be an integer array of shape [batch, seq], got {type(tokens).__name__}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"{argument} must be integer token ids, got dtype {tokens.dtype}")
    return tokens


def check_token_ids(tokens, vocab_size: int, argument: str = "tokens") -> None:
    """InputError naming the first id outside [0, vocab_size), where the values are concrete; any shape."""
    if not is_concrete(tokens):
        return
    values = np.asarray(tokens)
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0 or high >= vocab_size:
        bad = int(low) if low < 0 else int(high)
        where = "" if argument == "tokens" else f" in {argument}"
        raise InputError(f"token id {bad}{where} is outside the vocabulary [0, {vocab_size})")


def check_tokens(tokens, config, argument: str = "tokens", *, ndim: int = 2):
    """Token ids of shape [batch, seq] (or [seq] with ndim=1) that `config`'s model can run; returns them as
    an array. The probes call this on every token argument they take, before any jit of their own."""
    tokens = as_token_array(tokens, argument)
    if tokens.ndim != ndim:
        want = "[batch, seq]" if ndim == 2 else "[seq]"
        hint = " (use tokens[None] for a single sequence)" if ndim == 2 and tokens.ndim == 1 else ""
        raise InputError(f"{argument} must have shape {want}, got shape {tuple(tokens.shape)}{hint}")
    if ndim == 2 and tokens.shape[0] == 0:
        raise InputError(f"{argument} is a batch of 0 sequences: need at least one")
    seq = tokens.shape[-1]
    if seq == 0:
        raise InputError(f"{argument} is empty: need at least one position")
    if seq > config.n_ctx:
        raise InputError(f"sequence of {seq} tokens is longer than the model's context n_ctx={config.n_ctx}")
    check_token_ids(tokens, config.vocab_size, argument)
    return tokens


def check_mask(attention_mask, shape: tuple[int, int], argument: str = "attention_mask"):
    """A left-padding mask of `shape` (1 real, 0 padding): only 0s and 1s, padding before the tokens, and at
    least one real token per row (values checked where concrete). Returns it as a jax array."""
    if isinstance(attention_mask, (list, tuple)):
        attention_mask = np.asarray(attention_mask)
    if not hasattr(attention_mask, "shape"):
        raise InputError(f"{argument} must be an array [batch, seq] of 0 and 1, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"{argument} has shape {tuple(attention_mask.shape)}, tokens have shape {tuple(shape)}")
    if is_concrete(attention_mask):
        values = np.asarray(attention_mask)
        if not np.isin(values, (0, 1)).all():
            raise InputError(f"{argument} must hold only 0 (padding) and 1 (real token), got "
                             f"{values[~np.isin(values, (0, 1))][0]!r}")
        values = values.astype(bool)
        for row, real in enumerate(values):
            if not real.any():
                raise InputError(f"{argument} row {row} has no real token (all zeros): drop the row")
            if not real[real.argmax():].all():  # a 0 after the first 1: padding on the right or inside
                raise InputError(f"{argument} row {row} is {real.astype(int).tolist()}: tinygpt takes left padding "
                                 "(the 0s first, then the tokens), e.g. Tokenizer.encode_batch(texts) pads left")
    return jnp.asarray(attention_mask)


def check_inputs(tokens, attention_mask, config):
    """Tokens and mask for a forward pass: `check_tokens` and `check_mask`. Returns (tokens, mask) as jax
    arrays (the mask stays None when none is given)."""
    tokens = jnp.asarray(check_tokens(tokens, config))
    if attention_mask is not None:
        attention_mask = check_mask(attention_mask, tokens.shape)
    return tokens, attention_mask


def _id_arrays(value):
    """The integer arrays inside a token argument: an array, or (ragged) lists of them; text is skipped."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, np.ndarray, jax.Array)) for v in value):
        for item in value:
            yield from _id_arrays(item)
    elif not isinstance(value, (str, bytes)) and value is not None:
        array = value if hasattr(value, "dtype") else np.asarray(value)
        if jnp.issubdtype(array.dtype, jnp.integer):
            yield array


def checks_tokens(*arguments: str):
    """Decorator for public functions that take token ids: before the call, every id in the named arguments
    (arrays, or lists of prompts of any lengths) is checked against `config.vocab_size` (the function's
    `config` argument, or its `model`'s), and an `attention_mask` argument against `check_mask`, where the values
    are concrete. A probe that jits its own
    computation would otherwise see only tracers, and clamp a bad id to the last token's.

        @checks_tokens("clean_tokens", "corrupt_tokens")
        def patch(params, clean_tokens, corrupt_tokens, config, ...): ...
    """

    def decorate(fn):
        signature = inspect.signature(fn)
        unknown = [a for a in arguments if a not in signature.parameters]
        if unknown or not {"config", "model"} & set(signature.parameters):
            raise RuntimeError(f"checks_tokens: {fn.__qualname__} has no argument {(unknown or ['config'])[0]!r}")

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            config = bound.arguments.get("config") or getattr(bound.arguments.get("model"), "config", None)
            if config is not None:
                for name in arguments:
                    for ids in _id_arrays(bound.arguments.get(name)):
                        check_token_ids(ids, config.vocab_size, name)
            mask = bound.arguments.get("attention_mask")
            first = bound.arguments.get(arguments[0]) if arguments else None
            if mask is not None and hasattr(first, "shape") and len(first.shape) == 2:
                check_mask(mask, tuple(first.shape))
            return fn(*args, **kwargs)

        run.checks_tokens = arguments  # for tests that walk the public probes
        return run

    return decorate


def checked(fn):
    """`fn` with its token ids checked even under jit / vmap: calls `fn` through `jax.experimental.checkify`
    (index checks), and raises InputError when an index was out of bounds (an id outside the vocabulary
    embeds through an out-of-bounds lookup). Outside a transformation the ordinary checks already raise.

        logits = tinygpt.checked(jax.jit(lambda t: tinygpt.forward(params, t, config).logits))(tokens)
    """
    from jax.experimental import checkify

    checkified = checkify.checkify(fn, errors=checkify.index_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = checkified(*args, **kwargs)
        message = error.get()
        if message:
            raise InputError(f"an index was out of bounds (a token id outside the vocabulary?): {message.strip()}")
        return out

    return run
