"""Peak resident memory of one load or one forward, each in a fresh process (run by `benchmarks.run`).

    python -m benchmarks.peak_memory load  {tinygpt,hf,tl} DIR
    python -m benchmarks.peak_memory trace {tinygpt,tl} DIR BATCH SEQ SITES

SITES is "all", "tl" (every site TransformerLens caches) or a comma-separated list of tinygpt sites, with
":compact" appended for a compact trace (derived sites computed on read, `tinygpt.forward(compact=True)`).
Prints one JSON object: the process's peak RSS over the measured region (`peak_mb`), the RSS before it
(`before_mb`), their difference (`delta_mb`) and, for a forward, the size of the trace it returned
(`held_mb`), in MB (2^20 bytes). For a forward, the region starts
after the model is loaded and the forward compiled (tinygpt) or warmed up (TransformerLens), so `delta_mb`
is what the forward itself needs: its stored trace plus its temporaries. A load's region is the load and
one read of every weight (torch loaders may leave weights memory-mapped until first used). jax runs on the
CPU here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .harness import PeakRSS  # noqa: E402


def measure_load(who: str, directory: Path) -> dict:
    if who == "tinygpt":
        import jax
        import jax.numpy as jnp

        import tinygpt

        jnp.zeros(8).block_until_ready()  # jax's runtime is up before the baseline
        with PeakRSS() as rss:
            model = tinygpt.load(directory)
            jax.block_until_ready(model.params)
    elif who == "hf":
        import torch  # noqa: F401

        from . import peers

        with PeakRSS() as rss:
            model = peers.load_hf(directory, "cpu")
            touch_every_weight(model)
    elif who == "tl":
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

        from . import peers

        with PeakRSS() as rss:
            model = peers.load_tl(directory, "cpu")
            touch_every_weight(model)
    else:
        raise SystemExit(f"unknown contender {who!r}")
    del model
    return {"peak_mb": rss.peak, "before_mb": rss.before, "delta_mb": rss.delta}


def touch_every_weight(module) -> None:
    """Read every parameter once: weights that a loader left memory-mapped to the file become resident,
    as they do at the first forward, so the load's figure is the memory the loaded model really takes."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.sum()


def measure_trace(who: str, directory: Path, batch: int, seq: int, sites: str) -> dict:
    import numpy as np

    from tinygpt.config import Config

    vocab_size = Config.from_json(directory / "config.json").vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab_size, (batch, seq)).astype(np.int32)
    if who == "tinygpt":
        import jax

        import tinygpt
        from tinygpt.sites import SITE_NAMES

        sites, compact = (sites[: -len(":compact")], True) if sites.endswith(":compact") else (sites, False)
        keep = {"all": SITE_NAMES, "tl": tuple(s for s in SITE_NAMES if s != "head_out")}.get(sites)
        keep = keep if keep is not None else tuple(sites.split(","))
        model = tinygpt.load(directory)
        # a compact trace returned from jit carries a copy of W_O (for head_out): counted in the figure
        forward = jax.jit(lambda p, t: tinygpt.forward(p, t, model.config, keep=keep, compact=compact))
        compiled = forward.lower(model.params, tokens).compile()
        with PeakRSS() as rss:
            trace = jax.block_until_ready(compiled(model.params, tokens))
        held = sum(x.nbytes for x in jax.tree_util.tree_leaves(trace)) / 2**20
        del trace
    elif who == "tl":
        import torch

        from . import peers

        if sites != "tl":
            raise SystemExit("TransformerLens is measured with its full cache only")
        bridge = peers.load_tl(directory, "cpu")
        with torch.inference_mode():
            bridge.run_with_cache(torch.as_tensor(tokens[:1, :8], dtype=torch.long))  # warm-up
            with PeakRSS() as rss:
                logits, cache = bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in [logits, *cache.values()]}  # hooks that alias one tensor count once
            held = sum(storages.values()) / 2**20
        del logits, cache
    else:
        raise SystemExit(f"unknown contender {who!r}")
    return {"peak_mb": rss.peak, "before_mb": rss.before, "delta_mb": rss.delta, "held_mb": held}


def main(argv: list[str]) -> None:
    what, who, directory, *rest = argv
    if what == "load":
        result = measure_load(who, Path(directory))
    elif what == "trace":
        batch, seq, sites = rest
        result = measure_trace(who, Path(directory), int(batch), int(seq), sites)
    else:
        raise SystemExit(f"unknown measurement {what!r}: load or trace")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
