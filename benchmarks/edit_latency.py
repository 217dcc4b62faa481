"""Latency of an interactive edit: a forward with edits, called again and again as a notebook user does.

    python -m benchmarks.edit_latency [--reps 7] [--seq 32] [--batch 1]

For each model (the embedded model, and GPT-2 small's shape with random weights), in the same run, with the
same tokens, each timed `reps` times after a warm-up call (interleaved rounds, medians):

    unedited      `tinygpt.forward(..., keep=("logits",))`: one compiled program, cached
    edit values   the same forward with `edits=[Zero(z, layer, head), Add(resid_pre, direction, coef)]`,
                  each call with a new coefficient and a new direction (new arrays, same structure)
    function edits the same edits written as plain functions, a new closure per call (what a notebook
                  loop does): traced again and run op by op every call

and prints the ratios against the unedited call. Target (issue 20): the second call of an edited forward
<= 1.5x the unedited compiled call. Both edited forms are checked to give the same logits.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt
from tinygpt.config import Config
from tinygpt.edits import Add, Zero
from tinygpt.params import init_params

from .harness import interleaved

TARGET = 1.5


def models():
    """(name, params, config): the embedded model and GPT-2 small's shape with random weights."""
    embedded = tinygpt.load()
    yield "embedded model", embedded.params, embedded.config
    small = Config.small()
    yield "GPT-2 small shape (random)", init_params(small, jax.random.PRNGKey(0)), small


def contenders(params, config: Config, tokens):
    """The three calls, each making new edit arrays per call as an interactive loop would."""
    layer, head = config.n_layer - 1, 0
    rng = np.random.default_rng(0)

    def new_arrays():
        return jnp.asarray(rng.standard_normal(config.d_model), jnp.float32), float(rng.uniform(1, 4))

    def unedited():
        return tinygpt.forward(params, tokens, config, keep=("logits",)).logits.block_until_ready()

    def values():
        direction, coef = new_arrays()
        edits = [Zero("z", layer=layer, head=head), Add("resid_pre", direction, coef, layer=layer)]
        return tinygpt.forward(params, tokens, config, edits=edits, keep=("logits",)).logits.block_until_ready()

    def functions():
        direction, coef = new_arrays()
        edits = {"z": lambda z, l: jnp.where(l == layer, z.at[:, :, head].set(0.0), z),
                 "resid_pre": lambda r, l: jnp.where(l == layer, r + coef * direction, r)}
        return tinygpt.forward(params, tokens, config, edits=edits, keep=("logits",)).logits.block_until_ready()

    return {"unedited": unedited, "edit values": values, "function edits": functions}


def same_logits(params, config: Config, tokens) -> float:
    """Max |difference| between the two edited forms' logits for the same arrays."""
    direction, coef, layer = jnp.linspace(-1, 1, config.d_model), 2.5, config.n_layer - 1
    as_values = [Zero("z", layer=layer, head=0), Add("resid_pre", direction, coef, layer=layer)]
    as_functions = {"z": lambda z, l: jnp.where(l == layer, z.at[:, :, 0].set(0.0), z),
                    "resid_pre": lambda r, l: jnp.where(l == layer, r + coef * direction, r)}
    a = tinygpt.forward(params, tokens, config, edits=as_values, keep=("logits",)).logits
    b = tinygpt.forward(params, tokens, config, edits=as_functions, keep=("logits",)).logits
    return float(jnp.max(jnp.abs(a - b)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {args.batch} x {args.seq} tokens, "
          f"median of {args.reps} calls after one warm-up call")
    print(f"| model | unedited | edit values (ratio) | function edits (ratio) | max diff | target <= {TARGET}x |")
    print("|---|---|---|---|---|---|")
    met = True
    for name, params, config in models():
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (args.batch, args.seq)))
        timings = interleaved(contenders(params, config, tokens), reps=args.reps)
        base = timings["unedited"].median
        ratio = timings["edit values"].median / base
        met &= ratio <= TARGET
        print(f"| {name} | {base * 1e3:.2f} ms | {timings['edit values'].median * 1e3:.2f} ms ({ratio:.2f}x) | "
              f"{timings['function edits'].median * 1e3:.1f} ms "
              f"({timings['function edits'].median / base:.0f}x) | {same_logits(params, config, tokens):.1e} | "
              f"{'met' if ratio <= TARGET else 'MISSED'} |")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
