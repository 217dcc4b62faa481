"""One of the processes of tests/test_distributed.py's multi-process runs (not a test file itself).

    python tests/distributed_worker.py TASK OUT_DIR

The process settings come from the environment (TINYGPT_COORDINATOR, TINYGPT_NUM_PROCESSES,
TINYGPT_PROCESS_ID), the devices from XLA_FLAGS (2 CPU devices each); tinygpt.distributed.initialize joins
the processes. TASK is

    killed   harvest into OUT_DIR/resumed; process 1 kills itself (SIGKILL) as soon as its first chunk is
             safely written, leaving an interrupted harvest; process 0 finishes its shard and then fails
             at the barrier when the heartbeat reports its peer dead
    main     the computations the test compares with one process: a head sweep, a causal trace, a harvest
             resumed (OUT_DIR/resumed) and one from scratch (OUT_DIR/fresh), a few SAE steps on it, and
             `tinygpt sae train` on it (OUT_DIR/sae.safetensors); each process saves its results to
             OUT_DIR/result-<process id>.npz

Everything both sides compute from is in `inputs()`, imported by the test too.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = dict(n_layer=2, n_head=4, d_model=32, d_head=8, d_mlp=64, n_ctx=8, vocab_size=97)
HARVEST = dict(site="mlp_post", layer=1, seq=8, batch=2)  # 10 windows: 5 per process, chunks of 2
SUBJECT = (1, 2)


def inputs():
    """(config, params, sweep tokens [3, 8], trace prompt [8], corpus stream, SAE config): what both the
    worker and the single-process reference compute from."""
    import tinygpt
    from probes.sae import SAEConfig
    from tinygpt.testing import random_params

    config = tinygpt.Config(**CONFIG)
    params = random_params(config, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (3, 8)).astype(np.int32)
    stream = rng.integers(0, config.vocab_size, 85).astype(np.int32)  # 10 windows of 8 and a dropped tail
    # resampling at step 4 (dead_steps 2 makes some latents dead by then): the resampling path runs too
    sae_config = SAEConfig(d_in=config.d_mlp, d_sae=48, batch_size=8, steps=8, warmup_steps=2, dead_steps=2,
                           resample_every=4, lr=3e-3, seed=1, site="mlp_post", layer=1)
    return config, params, tokens, tokens[0], stream, sae_config


def shifted_logits(shifts, params, tokens, *, config):
    """For each shift s: the largest last-position logit of each row with every token id moved by s.
    shifts [n] -> [n, batch]"""
    import jax

    import tinygpt

    def one(shift):
        moved = (tokens + shift) % config.vocab_size
        return tinygpt.forward(params, moved, config, keep=("logits",)).logits[:, -1].max(-1)

    return jax.vmap(one)(shifts)


def computations(config, params, tokens, prompt, stream, sae_config, harvest_dir: Path | None = None):
    """The results compared across process counts: {name: array}. With `harvest_dir`, the harvest goes
    there (resuming what is there); otherwise it is kept in memory."""
    from probes.ablation import ablation_sweep
    from probes.harvest import harvest
    from probes.sae import train_sae
    from probes.tracing import causal_trace
    from tinygpt import sharding

    results = {"sweep": ablation_sweep(params, tokens, config, metric="log_prob", answer=3).values}
    # called eagerly: 7 runs, padded to 8 over 4 devices, gathered to this process
    sweep = functools.partial(shifted_logits, config=config)
    results["sharded_sweep"] = np.asarray(sharding.sharded_sweep(sweep, np.arange(7), params, tokens))
    trace = causal_trace(params, prompt, config, SUBJECT, kinds=("resid_post",), samples=2, buckets=1)
    results["trace"] = trace.scores["resid_post"]
    store = harvest(params, config, stream, progress=False, path=harvest_dir, **HARVEST)
    results["harvest"] = np.asarray(store.acts)
    sae, history = train_sae(store.acts, sae_config, progress=False, log_every=2)
    results["sae_loss"] = np.array([h["loss"] for h in history])
    results.update({f"sae_{name}": np.asarray(value) for name, value in sae.params.items()})
    return results


def train_sae_cli(harvest_dir: Path, sae_file: Path) -> int:
    """`tinygpt sae train` on the harvest, in this process: with several processes each runs it (the process
    settings from the environment) and process 0 alone writes the file."""
    from tinygpt.cli import main as cli

    return cli(["sae", "train", str(harvest_dir), "--out", str(sae_file), "--d-sae", "48", "--k", "8", "--steps",
                "4", "--batch-size", "8", "--resample-every", "0", "--json"])


def main(task: str, out: Path) -> None:
    import jax

    from tinygpt import distributed

    processes = distributed.initialize(timeout_s=60, heartbeat_timeout_s=5)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets it
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    config, params, tokens, prompt, stream, sae_config = inputs()
    if task == "killed":
        from probes.harvest import harvest

        def die_after_first_chunk(rows_done, n_rows):
            if processes.process_id == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        harvest(params, config, stream, progress=False, path=out / "resumed", on_chunk=die_after_first_chunk,
                **HARVEST)
        return
    from probes.harvest import harvest

    results = computations(config, params, tokens, prompt, stream, sae_config, out / "resumed")
    fresh = harvest(params, config, stream, progress=False, path=out / "fresh", **HARVEST)
    results["fresh"] = np.asarray(fresh.acts)
    results["cli_exit_code"] = np.array(train_sae_cli(out / "fresh", out / "sae.safetensors"))
    np.savez(out / f"result-{processes.process_id}.npz", **results)
    distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1], Path(sys.argv[2]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # at once: the peer's heartbeat then reports this process dead
