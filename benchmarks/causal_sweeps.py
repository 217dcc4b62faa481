"""Vectorised causal sweeps against the naive loop of single jitted runs, measured in one run on one checkpoint.

    python benchmarks/causal_sweeps.py [--batch 8] [--seq 64] [--trace-seq 16] [--samples 10]
                                       [--subject 1,2,3] [--torch] [--json]

On a random GPT-2-small-shaped model (12 layers, 12 heads, d_model 768, vocab 50257; tinygpt.init_params):

1. Head sweep: zero-ablate each of the 144 heads (z of one head, every position) of a [batch, seq] batch and
   score the mean log-prob of a fixed answer token per row at the last position.
     vectorised  `probes.ablation.ablation_sweep`: one compiled program; each layer's runs start from its
                 cached input, vmapped over heads; only the last position is unembedded
     naive       144 calls of one jitted full forward with the head zeroed by an edit (logits at the last
                 position only, so the naive loop is not charged for a full unembedding)
2. Causal trace (ROME), residual stream (resid_pre) only: noise on the subject's embeddings (10 samples),
   clean state restored at each of 12 layers x `trace-seq` positions, P(answer) averaged over the samples.
     vectorised  `probes.tracing.causal_trace(kinds=("resid_pre",))`
     naive       ROME's loop: per (layer, position) one jitted forward of 11 rows (clean row 0 + 10 noised
                 rows, restored from row 0 in the batch)

Reported: seconds for the first call (compile + run) and the steady state (second call) of the vectorised
program, the naive loop (after compiling its single run once), their ratio, and the max |difference|.
--torch adds the same loops with plain PyTorch forward hooks on Hugging Face's GPT2LMHeadModel (full logits,
as TransformerLens's run_with_hooks computes them), timed on a subset of runs and scaled to the full count,
as an estimate of a hooks-based library's loop on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt
from probes import ablation, metrics, tracing
from tinygpt.model import unembed


def seconds(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------------------------- head sweep


def naive_head_run(config):
    @jax.jit
    def run(params, tokens, answer, layer, head):
        def zero_head(z, at_layer):  # z [batch, seq, head, d_head]
            hit = (at_layer == layer) & (jnp.arange(config.n_head) == head)[:, None]
            return jnp.where(hit, 0.0, z)

        trace = tinygpt.forward(params, tokens, config, edits={"z": zero_head}, keep=("ln_final",))
        logits = unembed(trace.ln_final[:, -1:], params["wte"])[:, 0]  # [batch, vocab]
        return metrics.log_prob(logits, answer).mean()

    return run


def bench_heads(params, config, batch, seq, rng):
    tokens = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    answer = rng.integers(0, config.vocab_size, (batch,)).astype(np.int32)
    sweep = lambda: ablation.ablation_sweep(params, tokens, config, metric="log_prob", answer=answer).values  # noqa
    first, _ = seconds(sweep)
    steady, values = seconds(sweep)
    run = naive_head_run(config)
    compile_naive, _ = seconds(lambda: run(params, tokens, answer, 0, 0))
    naive_time, naive = seconds(lambda: np.array([[run(params, tokens, answer, l, h) for h in range(config.n_head)]
                                                  for l in range(config.n_layer)]))
    return {"runs": config.n_layer * config.n_head, "batch": batch, "seq": seq,
            "vectorised_first_s": first, "vectorised_s": steady, "naive_compile_s": compile_naive,
            "naive_s": naive_time, "speedup": naive_time / steady,
            "max_abs_diff": float(np.abs(np.asarray(values) - naive).max())}, tokens, answer


# ------------------------------------------------------------------------------------------- causal trace


def naive_trace_run(config, tokens, subject, samples):
    seq = len(tokens)

    @jax.jit
    def run(params, noise, answer, layer, position):
        rows = jnp.broadcast_to(jnp.asarray(tokens), (samples + 1, seq))
        full_noise = jnp.zeros((samples + 1, seq, config.d_model)).at[1:, jnp.asarray(subject)].set(noise)

        def restore(resid, at_layer):  # rows 1.. take row 0's (clean) state at `position`
            restored = resid.at[1:, position].set(resid[0, position])
            return jnp.where(at_layer == layer, restored, resid)

        edits = {"embed": lambda e, at_layer: e + full_noise, "resid_pre": restore}
        trace = tinygpt.forward(params, rows, config, edits=edits, keep=("ln_final",))
        logits = unembed(trace.ln_final[:, -1:], params["wte"])[:, 0]  # [rows, vocab]
        return metrics.prob(logits[1:], answer).mean()

    return run


def bench_trace(params, config, seq, samples, subject, rng):
    tokens = rng.integers(0, config.vocab_size, seq).astype(np.int32)
    trace = lambda: tracing.causal_trace(params, tokens, config, subject, kinds=("resid_pre",),  # noqa: E731
                                         samples=samples)
    first, _ = seconds(trace)
    steady, result = seconds(trace)
    noise, _ = tracing.subject_noise(params, tokens, subject, samples=samples)
    run = naive_trace_run(config, tokens, subject, samples)
    compile_naive, _ = seconds(lambda: run(params, noise, result.answer, 0, 0))
    naive_time, naive = seconds(lambda: np.array([[run(params, noise, result.answer, l, p) for p in range(seq)]
                                                  for l in range(config.n_layer)]))
    return {"runs": config.n_layer * seq, "rows": samples + 1, "seq": seq, "subject": list(subject),
            "vectorised_first_s": first, "vectorised_s": steady, "naive_compile_s": compile_naive,
            "naive_s": naive_time, "speedup": naive_time / steady,
            "max_abs_diff": float(np.abs(result.scores["resid_pre"] - naive).max()),
            "clean_prob": result.clean_prob, "corrupt_prob": result.corrupt_prob}, tokens, result.answer


# ------------------------------------------------------------------------------------ torch hooks estimate


def torch_estimates(head_tokens, head_answer, trace_tokens, subject, samples, noise_std, subset_heads=12,
                    subset_trace=16):
    """Seconds of the two loops with forward hooks on HF's GPT2LMHeadModel (full logits), timed on a subset of
    runs and scaled to 144 heads / 12 x seq (layer, position) runs."""
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_pdrop=0, embd_pdrop=0, resid_pdrop=0))
    model.eval()
    n_layer, n_head, d_head = 12, 12, 64
    tokens = torch.as_tensor(head_tokens, dtype=torch.long)
    answer = torch.as_tensor(head_answer, dtype=torch.long)

    def head_run(layer, head):
        def zero(module, args):
            z = args[0].clone()
            z[..., head * d_head:(head + 1) * d_head] = 0
            return (z,)

        handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero)
        try:
            logits = model(tokens).logits  # [batch, seq, vocab], as run_with_hooks returns
            return torch.log_softmax(logits[:, -1], -1).gather(1, answer[:, None]).mean()
        finally:
            handle.remove()

    pairs = [(i % n_layer, (5 * i) % n_head) for i in range(subset_heads)]
    with torch.no_grad():
        head_run(0, 0)
        start = time.perf_counter()
        for layer, head in pairs:
            head_run(layer, head)
        heads_s = (time.perf_counter() - start) * n_layer * n_head / len(pairs)

        seq = len(trace_tokens)
        rows = torch.as_tensor(np.broadcast_to(trace_tokens, (samples + 1, seq)).copy(), dtype=torch.long)
        noise = torch.randn(samples, len(subject), 768) * noise_std

        def noise_hook(module, args, output):
            output = output.clone()
            output[1:, subject] += noise
            return output

        def trace_run(layer, position):
            def restore(module, args):
                h = args[0].clone()
                h[1:, position] = h[0, position]
                return (h,) + tuple(args[1:])

            handles = [model.transformer.wte.register_forward_hook(noise_hook),
                       model.transformer.h[layer].register_forward_pre_hook(restore)]
            try:
                return torch.softmax(model(rows).logits[1:, -1], -1).mean(0)
            finally:
                for h in handles:
                    h.remove()

        runs = [(i % n_layer, (7 * i) % seq) for i in range(subset_trace)]
        trace_run(0, 0)
        start = time.perf_counter()
        for layer, position in runs:
            trace_run(layer, position)
        trace_s = (time.perf_counter() - start) * n_layer * seq / len(runs)
    return {"heads_s": heads_s, "heads_timed_runs": len(pairs), "trace_s": trace_s, "trace_timed_runs": len(runs),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--trace-seq", type=int, default=16)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--subject", default="1,2,3", help="subject positions of the traced prompt")
    parser.add_argument("--torch", action="store_true", help="also estimate the PyTorch forward-hook loops")
    parser.add_argument("--skip-heads", action="store_true")
    parser.add_argument("--skip-trace", action="store_true")
    parser.add_argument("--precision", default="highest", choices=["highest", "default"],
                        help="float32 matmul precision (default highest: true float32, also on GPUs, where "
                             "'default' allows TF32)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.precision)

    config = tinygpt.Config.small()
    params = tinygpt.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    subject = [int(s) for s in args.subject.split(",")]
    result = {"device": str(jax.devices()[0]), "precision": args.precision,
              "platform": platform.processor() or platform.machine(),
              "cpus": len(os.sched_getaffinity(0)), "load_average_before": os.getloadavg()}
    if not args.skip_heads:
        result["heads"], head_tokens, head_answer = bench_heads(params, config, args.batch, args.seq, rng)
        print(f"heads: {json.dumps(result['heads'])}", flush=True)
    if not args.skip_trace:
        result["trace"], trace_tokens, _ = bench_trace(params, config, args.trace_seq, args.samples, subject, rng)
        print(f"trace: {json.dumps(result['trace'])}", flush=True)
    if args.torch and not (args.skip_heads or args.skip_trace):
        _, std = tracing.subject_noise(params, trace_tokens, subject, samples=args.samples)
        result["torch_hooks_estimate"] = torch_estimates(head_tokens, head_answer, trace_tokens, subject,
                                                         args.samples, std)
        print(f"torch: {json.dumps(result['torch_hooks_estimate'])}", flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name in ("heads", "trace"):
        if name in result:
            r = result[name]
            print(f"{name}: {r['runs']} runs; vectorised {r['vectorised_s']:.2f} s (first call with compile "
                  f"{r['vectorised_first_s']:.2f} s), naive loop {r['naive_s']:.2f} s (+ {r['naive_compile_s']:.2f} s "
                  f"compile): {r['speedup']:.2f}x; max |difference| {r['max_abs_diff']:.2e}")
    if "torch_hooks_estimate" in result:
        t = result["torch_hooks_estimate"]
        for name, key in (("heads", "heads_s"), ("trace", "trace_s")):
            print(f"{name}: torch forward-hook loop ~{t[key]:.1f} s (scaled from {t[name + '_timed_runs']} runs): "
                  f"vectorised is {t[key] / result[name]['vectorised_s']:.2f}x faster")
    print(f"device {result['device']}, {result['cpus']} cpus, load average before {result['load_average_before']}, "
          f"after {result['load_average_after']}")


if __name__ == "__main__":
    main()
