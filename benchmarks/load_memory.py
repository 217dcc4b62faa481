"""Peak memory of `tinygpt.load` on a GPT-2-small-sized checkpoint (124M parameters).

    python benchmarks/load_memory.py [--dtype float32|bfloat16|float16] [--dir DIR] [--keep]

1. A random GPT2LMHeadModel of GPT-2 small's shape is written with transformers' `save_pretrained` (the
   official layout) by a subprocess, so torch's memory never counts (skipped when --dir already holds one).
2. A fresh subprocess imports jax and tinygpt, warms jax up, records its resident memory, resets the kernel's
   peak-RSS counter (VmHWM, via /proc/self/clear_refs), runs `tinygpt.load(dir)` + `block_until_ready`, and
   reports peak RSS minus the baseline, compared with the size of the loaded weights.

jax runs on the CPU here (JAX_PLATFORMS=cpu), so the loaded weights live in this process's memory and the
figure is the whole cost of a load. The peak counts every resident page, file pages memory-mapped by a
reader included. A ratio near 1.0 means the load holds little beyond the final copy of the weights (before
`_read_params` read straight into its buffers and handed them to jax uncopied it was about 1.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)

WRITE = textwrap.dedent(
    """
    import sys, torch, transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{shape})
    transformers.GPT2LMHeadModel(config).save_pretrained(sys.argv[1])
    """
)

MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import jax, jax.numpy as jnp
    import tinygpt

    def status():
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024  # kB -> MB
        return fields

    jnp.zeros(8).block_until_ready()  # jax's backend is initialised before the baseline
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), so it measures the peak during the load only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    before = status()
    start = time.perf_counter()
    model = tinygpt.load(sys.argv[1], dtype=sys.argv[2])
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    after = status()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    leaves = jax.tree_util.tree_leaves(model.params)
    print(json.dumps(dict(
        rss_before=before["VmRSS"], rss_after=after["VmRSS"],
        peak=after["VmHWM"] if hwm_reset else maxrss_after, hwm_reset=hwm_reset,
        maxrss_before=maxrss_before, maxrss_after=maxrss_after,
        weights_mb=sum(x.nbytes for x in leaves) / 2**20,
        n_params=sum(x.size for x in leaves), seconds=seconds,
    )))
    """
)


def write_checkpoint(directory: Path) -> None:
    code = WRITE.format(shape=repr(SMALL))
    subprocess.run([sys.executable, "-c", code, str(directory)], check=True, cwd=REPO,
                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


def measure(directory: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory), dtype], check=True, cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dir", type=Path, help="checkpoint directory (written there first if empty)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    args = parser.parse_args(argv)

    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="tinygpt-load-memory-")
        directory = Path(tmp)
    if not (directory / "model.safetensors").is_file():
        write_checkpoint(directory)
    try:
        file_mb = (directory / "model.safetensors").stat().st_size / 2**20
        r = measure(directory, args.dtype)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp)
    peak_delta = r["peak"] - r["rss_before"]
    held = r["rss_after"] - r["rss_before"]
    print(
        f"load_memory: {r['n_params'] / 1e6:.1f}M params ({args.dtype}), weights {r['weights_mb']:.0f} MB; "
        f"peak RSS +{peak_delta:.0f} MB during load = {peak_delta / r['weights_mb']:.2f}x the weights; "
        f"held after load +{held:.0f} MB = {held / r['weights_mb']:.2f}x; load {r['seconds']:.2f} s"
        + f"; file {file_mb:.0f} MB"
        + ("" if r["hwm_reset"] else " (peak from ru_maxrss: VmHWM could not be reset)")
    )


if __name__ == "__main__":
    main()
