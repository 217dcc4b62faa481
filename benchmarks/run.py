"""tinygpt against its peers, side by side on the same weights, in one run.

    python -m benchmarks [--quick] [--only ROWS] [--reps N] [--checkpoint DIR] [--note TEXT]

Builds (once) a random-weight GPT-2-small checkpoint in the official format, written by transformers;
loads it into tinygpt, Hugging Face transformers (PyTorch) and TransformerLens 4.x (when installed: the
`bench` extra); measures every row of the report interleaved, medians after warm-up, with the max
numerical difference of each peer's result from tinygpt's; writes `benchmarks/results/<machine>.json` and
`.md`, and puts the table into `benchmarks/README.md`. `--quick` runs small sizes (for development) and
writes to a temporary directory instead.

Float32 everywhere except the GPU throughput rows (bf16). On a GPU, float32 matrix products use TF32 in
both frameworks (jax's default precision; torch's `allow_tf32` is switched on to match).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax and torch share the GPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import jax  # noqa: E402

from . import cases, harness, peers, report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinygpt-bench"

# In the order they run (and are reported): the minutes-long peer loop of the head sweep last, so an
# interrupted run on a slow machine keeps every other row.
ROWS = ("forward_full", "forward_one_site", "causal_trace", "generation", "compile_time", "load_memory",
        "trace_memory", "scaling", "head_sweep", "gpu_throughput")
CPU_ONLY = ("load_memory", "trace_memory", "scaling")  # host memory; simulated host devices
GPU_ONLY = ("gpu_throughput",)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small model and sizes, for development; results to a temporary directory")
    parser.add_argument("--only", help=f"comma-separated rows to run, of: {', '.join(ROWS)}")
    parser.add_argument("--reps", type=int, help="timed repetitions per contender (default 5; sweeps 3)")
    parser.add_argument("--checkpoint", type=Path,
                        help=f"where the random checkpoint is written once and reused (default {CHECKPOINTS}/...)")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    parser.add_argument("--note", default="", help="a remark printed with the table (e.g. the machine's load)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(ROWS)
        if unknown:
            parser.error(f"unknown rows {', '.join(sorted(unknown))}; rows: {', '.join(ROWS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = cases.Sizes.quick() if args.quick else cases.Sizes()
    if args.reps:
        sizes.reps = sizes.heavy_reps = args.reps
    backend = jax.default_backend()
    selected = [r for r in (args.only.split(",") if args.only else ROWS)
                if not (backend != "cpu" and r in CPU_ONLY) and not (backend == "cpu" and r in GPU_ONLY)]
    if backend == "gpu":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    shape_name = "gpt2-small-random" if not args.quick else "tiny-random"
    directory = peers.ensure_checkpoint(args.checkpoint or CHECKPOINTS / shape_name, sizes.shape)
    bench = load_contenders(directory, sizes, backend)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="tinygpt-bench-")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)

    device_kind = jax.devices()[0].device_kind
    machine = harness.machine_name(backend, device_kind)
    rows, failures = [], {}

    def save() -> dict:  # after every row, so an interrupted run keeps what it measured
        results = {**header(bench, args), "rows": [r.as_dict() for r in rows], "failed": failures}
        (out_dir / f"{machine}.json").write_text(json.dumps(results, indent=1))
        (out_dir / f"{machine}.md").write_text(report.table(results) + "\n")
        return results

    for key in selected:
        print(f"[benchmarks] {key} ...", flush=True)
        try:
            produced = run_row(key, bench)
        except Exception:  # one broken row must not lose the others' minutes of measurements
            failure = traceback.format_exc()
            failures[key] = failure.strip().splitlines()[-1]
            print(failure, file=sys.stderr, flush=True)
        else:
            for row in produced if isinstance(produced, list) else [produced]:
                rows.append(row)
                print(report.table({**header(bench, args), "rows": [row.as_dict()]}).split("\n\n")[1], flush=True)
        results = save()

    if out_dir == RESULTS and not args.only:
        report.update_readme(RESULTS)
    print(report.table(results))
    print(f"[benchmarks] wrote {out_dir / machine}.json and .md")
    return 1 if failures else 0


def header(bench: cases.Bench, args) -> dict:
    device = jax.devices()[0]
    return {
        "machine": harness.machine_name(bench.backend, device.device_kind),
        "device": f"{bench.backend}: {device.device_kind}, {len(jax.devices())} device(s), {os.cpu_count()} CPU cores",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": "float32 (bf16 where a row says so)" + ("; TF32 matmuls on GPU" if bench.backend == "gpu" else ""),
        "note": args.note,
        "quick": args.quick,
        "versions": harness.versions(),
        "command": " ".join(["python -m benchmarks", *(["--quick"] if args.quick else []),
                             *([f"--reps {args.reps}"] if args.reps else []),
                             *([f"--only {args.only}"] if args.only else [])]),
    }


def load_contenders(directory: Path, sizes: cases.Sizes, backend: str) -> cases.Bench:
    import tinygpt

    device = peers.torch_device(backend)
    tl_version = peers.transformer_lens_version()
    if tl_version is None:
        print("[benchmarks] TransformerLens 4.x is not installed (pip install -e '.[bench]'): "
              "its rows are skipped", flush=True)
    model = tinygpt.load(directory)
    return cases.Bench(directory=directory, sizes=sizes, backend=backend, model=model,
                       hf=peers.load_hf(directory, device), tl=peers.load_tl(directory, device) if tl_version else None,
                       tl_version=tl_version)


def run_row(key: str, bench: cases.Bench):
    if key == "forward_full":
        return cases.forward_full(bench)
    if key == "forward_one_site":
        return cases.forward_one_site(bench)
    if key == "head_sweep":
        return cases.head_sweep(bench)
    if key == "causal_trace":
        return cases.causal_trace(bench)
    if key == "generation":
        return [cases.generation(bench, batch) for batch in bench.sizes.generation_batches]
    if key == "compile_time":
        return cases.compile_time(bench)
    if key == "load_memory":
        return cases.load_memory(bench)
    if key == "trace_memory":
        return cases.trace_memory(bench)
    if key == "scaling":
        with tempfile.TemporaryDirectory(prefix="tinygpt-scaling-") as scratch:
            return cases.scaling(bench, Path(scratch))
    if key == "gpu_throughput":
        return cases.gpu_throughput(bench)
    raise ValueError(f"unknown row {key!r}")


if __name__ == "__main__":
    sys.exit(main())
