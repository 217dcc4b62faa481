"""One point of the scaling benchmark: a sharded batched forward and a sharded head sweep on N devices,
in a fresh process (run by `benchmarks.run`, which sets the device count before jax starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=N \
        python -m benchmarks.scaling DIR BATCH SEQ SWEEP_BATCH SWEEP_SEQ REPS SAVE

On a CPU, N simulated devices share the machine's cores, so the figures show what splitting costs or saves
there; on N accelerators the same call splits the work over N chips. Saves the results to SAVE (.npz) so
the caller can check they equal the one-device run, and prints one JSON object of median seconds.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt
from tinygpt import sharding

from .harness import interleaved


def head_sweep(params, tokens, targets, config):
    """tinygpt.sweep's head-ablation sweep: `sweep_units` splits its swept axis (the heads) over every
    device itself (`tinygpt.sweep.sweep_grid` calls `sharding.sharded_sweep` when there are several).
    Every device reuses the prefix and reads the last position only, as on one device."""
    from tinygpt import sweep

    zeros = jnp.zeros((config.n_layer, 1, 1, 1, 1), params["wte"].dtype)

    def score(logits):  # [batch, 1, vocab] -> [batch]
        logprobs = jax.nn.log_softmax(logits[:, 0], axis=-1)
        return jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]

    cache = sweep.cache_run(params, tokens, config)
    return sweep.sweep_units(params, config, cache, "z", "head", zeros, score,
                             layers=jnp.arange(config.n_layer), units=jnp.arange(config.n_head))


def main(argv: list[str]) -> None:
    directory, save = argv[0], argv[-1]
    batch, seq, sweep_batch, sweep_seq, reps = map(int, argv[1:-1])
    model = tinygpt.load(directory)
    config = model.config
    mesh = sharding.device_mesh()
    params = sharding.replicate(model.params, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    sweep_tokens = rng.integers(0, config.vocab_size, (sweep_batch, sweep_seq)).astype(np.int32)
    targets = rng.integers(0, config.vocab_size, (sweep_batch,)).astype(np.int32)
    sharded_head_sweep = jax.jit(lambda params, tokens, targets: head_sweep(params, tokens, targets, config))

    def forward():
        return jax.block_until_ready(sharding.sharded_forward(params, tokens, config, keep=("resid_post",), mesh=mesh))

    def sweep():
        return jax.block_until_ready(sharded_head_sweep(params, sweep_tokens, targets))

    timings = interleaved({"forward": forward, "sweep": sweep}, reps=reps)
    np.savez(save, resid_post=np.asarray(forward().resid_post), scores=np.asarray(sweep()))
    print(json.dumps({"devices": mesh.size, **{name: t.median for name, t in timings.items()}}))


if __name__ == "__main__":
    main(sys.argv[1:])
