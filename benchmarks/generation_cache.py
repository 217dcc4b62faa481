"""Generation tokens/s with the KV cache vs without it, in the same run, on the same model.

    python benchmarks/generation_cache.py [--model DIR] [--prompt-len 16] [--new 64] [--batch 1]

Both are one compiled XLA program: `tinygpt.generate` (prompt through the reference forward, then one token
per step over the cache) and a greedy loop that reruns the full forward over the whole (fixed-width) buffer
for every new token. Greedy, so both must produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt


def generate_without_cache(params, config, prompt, n_new):
    """Greedy decoding by a full forward per token over a [batch, prompt + n_new] buffer (causality makes
    the unfilled tail irrelevant), as one compiled loop."""
    batch, prompt_len = prompt.shape
    buffer = jnp.zeros((batch, prompt_len + n_new), prompt.dtype).at[:, :prompt_len].set(prompt)

    def step(t, buffer):
        logits = tinygpt.forward(params, buffer, config, keep=("logits",)).logits  # [batch, total, vocab]
        next_token = jnp.argmax(logits[:, t - 1], axis=-1).astype(buffer.dtype)
        return buffer.at[:, t].set(next_token)

    return jax.lax.fori_loop(prompt_len, prompt_len + n_new, step, buffer)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: embedded model)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    model = tinygpt.load(args.model)
    config, params = model.config, model.params
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.prompt_len)),
                         jnp.int32)
    with_cache = lambda: tinygpt.generate(params, config, prompt, args.new, temperature=0).sequences  # noqa: E731
    without = jax.jit(generate_without_cache, static_argnums=(1, 3))
    without_cache = lambda: without(params, config, prompt, args.new)  # noqa: E731

    np.testing.assert_array_equal(np.asarray(with_cache()), np.asarray(without_cache()))  # warm-up + check
    t_cache, t_full = median_time(with_cache, args.repeats), median_time(without_cache, args.repeats)
    tokens = args.batch * args.new
    print(f"{model.source or 'model'}: batch {args.batch}, {args.prompt_len} prompt + {args.new} new tokens, "
          f"{jax.devices()[0].platform}")
    print(f"  with KV cache   : {tokens / t_cache:8.1f} tokens/s ({t_cache:.3f} s)")
    print(f"  without cache   : {tokens / t_full:8.1f} tokens/s ({t_full:.3f} s)")
    print(f"  speed-up        : {t_full / t_cache:.1f}x (identical greedy tokens)")


if __name__ == "__main__":
    main()
