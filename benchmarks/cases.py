"""The benchmarks, one function per row of the report. Each loads nothing itself: `Bench` holds the
contenders (tinygpt's params, the HF model, the TransformerLens bridge), loaded once from one checkpoint.

Each function checks that the contenders computed the same thing (the max absolute difference of their
results is reported beside the times) and times them interleaved in one run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tinygpt
from tinygpt.sites import SITE_NAMES

from . import harness, peers
from .harness import Row, Target, interleaved, timed_row

EVERY_SITE = tuple(SITE_NAMES)
# TransformerLens caches every site but per-head outputs (its hook_result is off by default).
TL_SITES = tuple(s for s in SITE_NAMES if s != "head_out")
GEMMS = "XLA: the forward's matrix products alone"
EVERY = "tinygpt, every site (compact)"


@dataclasses.dataclass
class Sizes:
    """Problem sizes: the issue's (default), or a small model and small problems for building and
    debugging the suite (--quick)."""

    shape: dict = dataclasses.field(default_factory=lambda: dict(peers.GPT2_SMALL))
    forward: tuple[int, int] = (8, 128)
    sweep: tuple[int, int] = (8, 64)
    trace_positions: int = 16
    trace_rows: int = 11  # ROME: the clean run and 10 noised ones
    prompt: int = 16
    new_tokens: int = 64
    generation_batches: tuple[int, ...] = (1, 8)
    lookup_drafts: tuple[int, ...] = (4, 8, 16)  # prompt-lookup draft lengths offered to both sides
    memory_full: tuple[int, int] = (8, 512)
    memory_one_site: tuple[int, int] = (8, 1024)
    compile_layers: tuple[int, int] = (12, 48)
    gpu_throughput: tuple[int, int] = (64, 1024)
    gpu_naive: tuple[int, int] = (8, 1024)
    scaling_devices: tuple[int, ...] = (1, 2, 4)
    scaling_sweep: tuple[int, int] = (4, 32)
    reps: int = 5
    heavy_reps: int = 3  # the sweeps, whose peer loops take minutes on a CPU

    @classmethod
    def quick(cls) -> "Sizes":
        tiny = dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=4096)
        return cls(shape=tiny, forward=(2, 32), sweep=(2, 16), trace_positions=6, trace_rows=3, prompt=8,
                   new_tokens=8, lookup_drafts=(2, 4), memory_full=(2, 64), memory_one_site=(2, 128),
                   compile_layers=(2, 8),
                   gpu_throughput=(8, 256), gpu_naive=(2, 256), scaling_devices=(1, 2), scaling_sweep=(2, 16),
                   reps=2, heavy_reps=1)


@dataclasses.dataclass
class Bench:
    """Everything the rows share: one checkpoint loaded by every contender."""

    directory: Path
    sizes: Sizes
    backend: str  # jax's: "cpu" or "gpu"
    model: Any  # tinygpt.Model
    hf: Any
    tl: Any  # None when TransformerLens is not installed
    tl_version: str | None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> str:
        return peers.torch_device(self.backend)

    def tokens(self, batch: int, seq: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.config.vocab_size, (batch, seq)).astype(np.int32)

    def torch_call(self, fn):
        """A contender running torch code: under inference_mode, synchronised before returning."""
        import torch

        def call():
            with torch.inference_mode():
                out = fn()
            peers.synchronize(self.device)
            return out

        return call


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def fmt_diff(value: float) -> str:
    return f"{value:.1e}"


# ----------------------------------------------------------------------------------------- forward rows


def forward_full(bench: Bench) -> Row:
    batch, seq = bench.sizes.forward
    tokens = bench.tokens(batch, seq)
    tokens_t = peers.to_torch(tokens, bench.device)
    params, config = bench.model.params, bench.config
    every_site = tinygpt.make_forward(config, keep=EVERY_SITE, compact=True)
    tl_sites = tinygpt.make_forward(config, keep=TL_SITES, compact=True)
    every_site_stored = tinygpt.make_forward(config, keep=EVERY_SITE)
    gemms, gemm_flops = harness.gemm_skeleton(config, batch, seq, params["wte"].dtype)

    def read_every_site():  # the compact forward, then every derived site computed
        return jax.block_until_ready(every_site(params, tokens).materialized())

    contenders = {
        EVERY: lambda: jax.block_until_ready(every_site(params, tokens)),
        "tinygpt, TL's sites (compact)": lambda: jax.block_until_ready(tl_sites(params, tokens)),
        "tinygpt, every site (all stored)": lambda: jax.block_until_ready(every_site_stored(params, tokens)),
        "tinygpt, every site (compact, then all read)": read_every_site,
        "HF forward (logits only)": bench.torch_call(lambda: bench.hf(tokens_t).logits),
        GEMMS: gemms,
    }
    if bench.tl is not None:
        contenders["TL run_with_cache"] = bench.torch_call(lambda: bench.tl.run_with_cache(tokens_t))
    timings = interleaved(contenders, reps=bench.sizes.reps)

    trace = every_site(params, tokens)
    diffs = {"HF forward (logits only)": fmt_diff(max_abs(trace.logits, _hf_logits(bench, tokens_t)))}
    if bench.tl is not None:
        diffs["TL run_with_cache"] = fmt_diff(_tl_trace_diff(bench, trace, tokens_t))

    flops = harness.forward_flops(config, batch, seq)
    rate = gemm_flops / timings[GEMMS].median
    t_all = timings[EVERY].median
    targets = [Target("forward FLOP/s over XLA's rate on the forward's GEMMs alone", flops / t_all / rate, 0.85,
                      unit="%")]
    if bench.tl is not None:
        targets.insert(0, Target("TL run_with_cache time / tinygpt every-site time",
                                 timings["TL run_with_cache"].median / t_all, 1.0))
    notes = (f"{flops / 1e9:.3g} GFLOP per forward; XLA reaches {rate / 1e9:.3g} GFLOP/s on the forward's matrix "
             f"products alone; tinygpt every site {flops / t_all / 1e9:.3g} GFLOP/s, HF "
             f"{flops / timings['HF forward (logits only)'].median / 1e9:.3g} GFLOP/s. TL caches no per-head "
             "outputs (head_out), so 'TL's sites' is the like-for-like trace. A compact trace stores no site "
             "that is a cheap function of other kept ones (ln1, attn_scores, attn_pattern, head_out, resid_mid, "
             "ln2, mlp_post, resid_post) and computes those when read; 'then all read' times the forward and "
             "every such read.")
    return timed_row("forward_full", f"forward with the full trace, B={batch} x T={seq}", timings, diffs=diffs,
                     targets=targets, notes=notes)


def forward_one_site(bench: Bench) -> Row:
    batch, seq = bench.sizes.forward
    tokens = bench.tokens(batch, seq)
    tokens_t = peers.to_torch(tokens, bench.device)
    params, config = bench.model.params, bench.config
    resid_post = tinygpt.make_forward(config, keep=("resid_post",))
    names = lambda name: name.endswith("hook_resid_post")  # noqa: E731

    contenders = {
        "tinygpt, resid_post": lambda: jax.block_until_ready(resid_post(params, tokens)),
        "HF forward (logits only)": bench.torch_call(lambda: bench.hf(tokens_t).logits),
    }
    if bench.tl is not None:
        contenders["TL run_with_cache, resid_post"] = bench.torch_call(
            lambda: bench.tl.run_with_cache(tokens_t, names_filter=names))
    timings = interleaved(contenders, reps=bench.sizes.reps)

    ours = np.asarray(resid_post(params, tokens).resid_post)
    diffs = {}
    targets = []
    t_ours = timings["tinygpt, resid_post"].median
    if bench.tl is not None:
        with _torch_inference():
            _, cache = bench.tl.run_with_cache(tokens_t, names_filter=names)
        theirs = np.stack([cache[f"blocks.{i}.hook_resid_post"].float().cpu().numpy() for i in range(config.n_layer)])
        diffs["TL run_with_cache, resid_post"] = fmt_diff(max_abs(ours, theirs))
        targets.append(Target("TL time / tinygpt time", timings["TL run_with_cache, resid_post"].median / t_ours, 1.0))
    targets.append(Target("HF forward time / tinygpt time", timings["HF forward (logits only)"].median / t_ours, 1.0))
    return timed_row("forward_one_site", f"forward keeping one site (resid_post), B={batch} x T={seq}", timings,
                     diffs=diffs, targets=targets,
                     notes="tinygpt computes no logits when they are not kept; TL and HF always do.")


def _hf_logits(bench: Bench, tokens_t) -> np.ndarray:
    with _torch_inference():
        return bench.hf(tokens_t).logits.float().cpu().numpy()


def _tl_trace_diff(bench: Bench, trace, tokens_t) -> float:
    """Max |tinygpt - TL| over every site both expose, every layer, and the logits."""
    with _torch_inference():
        logits, cache = bench.tl.run_with_cache(tokens_t)
    worst = max_abs(trace.logits, logits.float().cpu().numpy())
    for site, pattern in peers.tl_sites(bench.config).items():
        ours = np.asarray(getattr(trace, site))
        if "{}" not in pattern:
            worst = max(worst, max_abs(ours, cache[pattern].float().cpu().numpy()))
            continue
        for layer in range(bench.config.n_layer):
            worst = max(worst, max_abs(ours[layer], cache[pattern.format(layer)].float().cpu().numpy()))
    return worst


def _torch_inference():
    import torch

    return torch.inference_mode()


# ------------------------------------------------------------------------------------------- generation


PLAIN = "tinygpt generate (KV cache)"
HF_PLAIN = "HF generate"


def generation(bench: Bench, batch: int) -> Row:
    """Greedy generation: tinygpt's KV-cache decode and its prompt-lookup decode (drafts verified in one pass)
    against HF generate, plain and with its prompt lookup (`prompt_lookup_num_tokens`, which HF runs at batch
    1 only), at the same draft lengths. All of them are exact greedy decoding; the target compares each
    side's fastest (a tinygpt prompt-lookup figure counts only if its tokens equal the one-token decode's).
    The drafters differ in detail: HF matches up to 2 tokens by default, tinygpt up to 3."""
    sizes = bench.sizes
    prompt = bench.tokens(batch, sizes.prompt, seed=batch)
    prompt_t = peers.to_torch(prompt, bench.device)
    params, config = bench.model.params, bench.config
    bench.hf.generation_config.eos_token_id = None  # random weights: never stop early, like tinygpt

    def ours(drafts=0):
        return lambda: jax.block_until_ready(
            tinygpt.generate(params, config, prompt, sizes.new_tokens, temperature=0.0, prompt_lookup=drafts))

    def hf(drafts=None):
        extra = {} if drafts is None else {"prompt_lookup_num_tokens": drafts}
        return lambda: bench.hf.generate(prompt_t, attention_mask=prompt_t.new_ones(prompt_t.shape), do_sample=False,
                                         max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens,
                                         pad_token_id=0, **extra)

    contenders = {PLAIN: ours()}
    contenders.update({f"tinygpt generate (prompt lookup, {k} drafts)": ours(k) for k in sizes.lookup_drafts})
    contenders[HF_PLAIN] = bench.torch_call(hf())
    hf_lookup = ""
    for k in sizes.lookup_drafts:
        try:
            with _torch_inference():
                hf(k)()
        except ValueError as error:  # transformers: "assisted generate is only supported for batch_size = 1"
            hf_lookup = f" HF prompt lookup at batch {batch}: {error}."
            break
        contenders[f"HF generate (prompt lookup, {k} drafts)"] = bench.torch_call(hf(k))
    timings = interleaved(contenders, reps=sizes.reps)
    new = batch * sizes.new_tokens
    figures = {name: new / t.median for name, t in timings.items()}

    reference = np.asarray(contenders[PLAIN]().tokens)
    diffs = {}
    for name, call in contenders.items():
        if name == PLAIN:
            continue
        if name.startswith("tinygpt"):
            tokens = np.asarray(call().tokens)
        else:
            with _torch_inference():
                tokens = call()[:, sizes.prompt:].cpu().numpy()
        diffs[name] = f"{int((tokens == reference).sum())}/{new} tokens equal"
    passes = {k: int(tinygpt.generate(params, config, prompt, sizes.new_tokens, temperature=0.0,
                                      prompt_lookup=k).passes) for k in sizes.lookup_drafts}

    exact = {name for name, text in diffs.items() if text.startswith(f"{new}/")}  # all tokens equal
    fastest_ours = max(v for name, v in figures.items() if name == PLAIN or (name.startswith("tinygpt") and
                                                                             name in exact))
    fastest_hf = max(v for name, v in figures.items() if name.startswith("HF"))
    plain_ratio = figures[PLAIN] / figures[HF_PLAIN]
    return harness.Row(
        f"generation_b{batch}", f"greedy generation, {sizes.new_tokens} tokens from {sizes.prompt}, batch {batch}",
        "tokens/s", figures, diffs=diffs,
        targets=[Target("fastest tinygpt greedy tokens/s / fastest HF greedy tokens/s", fastest_ours / fastest_hf,
                        1.5)],
        timings={name: t.as_dict() for name, t in timings.items()},
        notes=(f"One token per pass (KV cache) vs HF generate: {plain_ratio:.2f}x. Prompt lookup's model passes "
               f"for the {sizes.new_tokens} tokens (the prompt's included), by draft length: "
               + ", ".join(f"{k}: {p}" for k, p in passes.items())
               + ". Random weights make greedy text repeat, so lookup finds more here than in most real text."
               + hf_lookup + " Near-tied logits may flip an argmax between implementations."))


# ------------------------------------------------------------------------------------------- compile time


def compile_time(bench: Bench) -> Row:
    """Lowering + XLA compilation of the full-trace forward, for two depths (params as shapes only)."""
    batch, seq = bench.sizes.forward
    shallow, deep = bench.sizes.compile_layers
    dtype = bench.model.params["wte"].dtype
    figures = {}
    for layers in (shallow, deep):
        config = dataclasses.replace(bench.config, n_layer=layers)
        shapes = jax.eval_shape(lambda: tinygpt.init_params(config, jax.random.PRNGKey(0), dtype=str(dtype)))
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        times = []
        for _ in range(bench.sizes.heavy_reps):
            fresh = jax.jit(lambda p, t, c=config: tinygpt.forward(p, t, c))  # a new function: no cache hit
            start = _now()
            fresh.lower(shapes, tokens).compile()
            times.append(_now() - start)
        figures[f"tinygpt, {layers} layers"] = float(np.median(times))
    ratio = figures[f"tinygpt, {deep} layers"] / figures[f"tinygpt, {shallow} layers"]
    return harness.Row("compile_time", f"compile time of the full-trace forward, {shallow} vs {deep} layers", "s",
                       figures, targets=[Target(f"{deep}-layer / {shallow}-layer compile time (flat: lax.scan)",
                                                ratio, 1.5, at_least=False)])


def _now() -> float:
    import time

    return time.perf_counter()


# ----------------------------------------------------------------------------------------------- sweeps


def head_sweep(bench: Bench) -> Row:
    """Every single-head zero ablation (z of one head set to 0 at one layer), scored by the log-prob of a
    target token at the last position (mean over the batch): `probes.ablation.ablation_sweep`, one compiled
    program (prefix reuse, last block and unembedding at the last position only, vmapped heads), against
    TransformerLens's run_with_hooks loop."""
    from probes.ablation import ablation_sweep

    batch, seq = bench.sizes.sweep
    config, params = bench.config, bench.model.params
    tokens = bench.tokens(batch, seq, seed=3)
    answers = np.random.default_rng(4).integers(0, config.vocab_size, (batch,)).astype(np.int32)

    def ours():  # -> [layer, head]
        return ablation_sweep(params, tokens, config, site="z", axis="head", metric="log_prob", answer=answers,
                              method="zero").values

    contenders = {"tinygpt ablation_sweep": ours}
    diffs, targets, warm, last = {}, [], {}, {}
    if bench.tl is not None:
        tokens_t = peers.to_torch(tokens, bench.device)
        answers_t = peers.to_torch(answers, bench.device)

        def tl_loop():
            scores = peers.tl_head_sweep(bench.tl, tokens_t, answers_t, config.n_layer, config.n_head)
            peers.synchronize(bench.device)
            last["TL"] = scores.mean(axis=-1)  # compared below: the loop takes minutes, so it is not rerun

        contenders["TL run_with_hooks loop"] = tl_loop
        warm["TL run_with_hooks loop"] = bench.torch_call(lambda: bench.tl.run_with_hooks(tokens_t, fwd_hooks=[]))
    timings = interleaved(contenders, reps=bench.sizes.heavy_reps, warm=warm)
    if bench.tl is not None:
        diffs["TL run_with_hooks loop"] = fmt_diff(max_abs(ours(), last["TL"]))
        ratio = timings["TL run_with_hooks loop"].median / timings["tinygpt ablation_sweep"].median
        targets.append(Target("TL loop time / tinygpt sweep time", ratio, 20.0 if bench.backend == "gpu" else 2.5))
    n = config.n_layer * config.n_head
    return timed_row("head_sweep", f"all {n} single-head zero ablations, B={batch} x T={seq}, last-token log-prob",
                     timings, diffs=diffs, targets=targets,
                     notes="TL's loop runs the full forward (all positions' logits) once per head")


def causal_trace(bench: Bench) -> Row:
    """ROME's causal trace of one prompt: noise on the subject's embeddings (10 samples), every block output
    (resid_post) restored to its clean value at one (layer, position), scored by p(answer) at the last
    position averaged over the samples. `probes.tracing.causal_trace` (one compiled sweep: corrupted prefix
    reused, positions before the restored one reused through their cached keys and values, positions before
    the subject not run, logits at the last position only) against TransformerLens's loop, which runs ROME's
    11-row batch (the clean prompt and the 10 noised ones) for every (layer, position)."""
    from probes.tracing import causal_trace as trace, subject_noise

    rows, seq = bench.sizes.trace_rows, bench.sizes.trace_positions
    config, params = bench.config, bench.model.params
    prompt = bench.tokens(1, seq, seed=5)[0]
    subject = (1, 2, 3)
    answer = int(np.random.default_rng(6).integers(0, config.vocab_size))

    def ours():  # -> [layer, position]
        return trace(params, prompt, config, subject, answer=answer, kinds=("resid_post",), samples=rows - 1,
                     seed=0).scores["resid_post"]

    contenders = {"tinygpt causal_trace": ours}
    diffs, targets, warm, last = {}, [], {}, {}
    if bench.tl is not None:
        noise, _ = subject_noise(params, prompt, subject, samples=rows - 1, seed=0)  # the samples ours draws
        tokens_t = peers.to_torch(np.repeat(prompt[None], rows, axis=0), bench.device)
        noise_t = peers.to_torch_float(noise, bench.device)
        noised = slice(subject[0], subject[-1] + 1)

        def tl_loop():
            probs = peers.tl_causal_trace(bench.tl, tokens_t, noise_t, noised, answer, config.n_layer)
            peers.synchronize(bench.device)
            last["TL"] = probs[:, :, 1:].mean(axis=-1)  # the noised rows; compared below, not rerun

        contenders["TL run_with_hooks loop"] = tl_loop
        warm["TL run_with_hooks loop"] = bench.torch_call(lambda: bench.tl.run_with_hooks(tokens_t, fwd_hooks=[]))
    timings = interleaved(contenders, reps=bench.sizes.heavy_reps, warm=warm)
    if bench.tl is not None:
        diffs["TL run_with_hooks loop"] = fmt_diff(max_abs(ours(), last["TL"]))
        targets.append(Target("TL loop time / tinygpt trace time",
                              timings["TL run_with_hooks loop"].median / timings["tinygpt causal_trace"].median, 5.0))
    return timed_row("causal_trace", f"causal trace, {config.n_layer} layers x {seq} positions x {rows} rows",
                     timings, diffs=diffs, targets=targets,
                     notes="both include their clean run; scores are mean p(answer) over the noised rows")


# ------------------------------------------------------------------------------------------------ memory


def load_memory(bench: Bench) -> Row:
    """Peak RSS of loading the checkpoint, each contender in a fresh process."""
    figures, notes = {}, []
    who = {"tinygpt.load": "tinygpt", "HF from_pretrained": "hf"}
    if bench.tl is not None:
        who["TL boot_transformers"] = "tl"
    for name, key in who.items():
        r = harness.run_worker("benchmarks.peak_memory", ["load", key, str(bench.directory)])
        figures[name] = r["delta_mb"]
    weights_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(bench.model.params)) / 2**20
    return harness.Row("load_memory", "peak RSS of loading (beyond the process before it)", "MB", figures,
                       targets=[Target("tinygpt load peak / weights size", figures["tinygpt.load"] / weights_mb,
                                       1.1, at_least=False)],
                       notes=f"weights {weights_mb:.0f} MB in float32; torch loaders' figures include one read "
                             "of every weight (they may map the file lazily)")


def trace_memory(bench: Bench) -> list[Row]:
    """Peak RSS of a full-trace forward (vs TL's full cache) and of a resid_post-only forward."""
    directory = str(bench.directory)
    batch, seq = bench.sizes.memory_full
    runs = {"tinygpt, every site (compact)": ("tinygpt", "all:compact"),
            "tinygpt, TL's sites (compact)": ("tinygpt", "tl:compact"),
            "tinygpt, every site (all stored)": ("tinygpt", "all"),
            "tinygpt, TL's sites (all stored)": ("tinygpt", "tl")}
    if bench.tl is not None:
        runs["TL run_with_cache"] = ("tl", "tl")
    results = {name: _trace_peak(who, directory, batch, seq, sites) for name, (who, sites) in runs.items()}
    figures = {name: r["delta_mb"] for name, r in results.items()}
    targets = []
    if bench.tl is not None:
        for ours in ("tinygpt, every site (compact)", "tinygpt, TL's sites (compact)"):
            targets.append(Target(f"{ours} peak / TL's", figures[ours] / figures["TL run_with_cache"], 0.60,
                                  at_least=False, unit="%"))
    held = ", ".join(f"{name} {r['held_mb']:.0f} MB" for name, r in results.items())
    full = harness.Row("trace_memory", f"peak RSS of a full-trace forward, B={batch} x T={seq}", "MB", figures,
                       targets=targets, notes=f"beyond the loaded model; the traces returned hold: {held}. A compact "
                       "trace stores no site that is a cheap function of other kept ones (ln1, attn_scores, "
                       "attn_pattern, head_out, resid_mid, ln2, mlp_post, resid_post) and computes those when read.")

    batch, seq = bench.sizes.memory_one_site
    r = _trace_peak("tinygpt", directory, batch, seq, "resid_post")
    one = harness.Row("one_site_memory", f"peak RSS of a resid_post-only forward, B={batch} x T={seq}", "MB",
                      {"tinygpt, resid_post (beyond the model)": r["delta_mb"],
                       "tinygpt, resid_post (whole process)": r["peak_mb"]},
                      targets=[Target("whole-process peak, GB", r["peak_mb"] / 1024, 1.5, at_least=False, unit="GB")],
                      notes=f"the trace returned holds {r['held_mb']:.0f} MB")
    return [full, one]


def _trace_peak(who: str, directory: str, batch: int, seq: int, sites: str) -> dict:
    return harness.run_worker("benchmarks.peak_memory", ["trace", who, directory, str(batch), str(seq), sites])


# ------------------------------------------------------------------------------------------------- GPU

# Dense bf16 tensor-core peaks from the vendor's datasheets, FLOP/s (no sparsity).
BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12), ("L4", 121e12))


def bf16_peak(device_kind: str) -> float | None:
    for name, peak in BF16_PEAK:
        if name in device_kind:
            return peak
    return None


def gpu_throughput(bench: Bench) -> list[Row]:
    """GPT-2 small forward throughput in bf16: the fused (cuDNN flash) attention path when no pattern is
    read, against HF's bf16 forward (SDPA); then the naive path, which the pattern needs, against it."""
    from tinygpt.params import cast

    batch, seq = bench.sizes.gpu_throughput
    config = bench.config
    params = cast(bench.model.params, "bfloat16")
    hf16 = peers.load_hf(bench.directory, bench.device, "bfloat16")
    tokens = bench.tokens(batch, seq)
    tokens_t = peers.to_torch(tokens, bench.device)
    fused = tinygpt.make_forward(config, keep=("logits",))
    gemms, gemm_flops = harness.gemm_skeleton(config, batch, seq, jnp.bfloat16)
    timings = interleaved({
        "tinygpt bf16, fused attention": lambda: jax.block_until_ready(fused(params, tokens)),
        "HF bf16 (SDPA)": bench.torch_call(lambda: hf16(tokens_t).logits),
        GEMMS: gemms,
    }, reps=bench.sizes.reps)
    flops = harness.forward_flops(config, batch, seq)
    device_kind = jax.devices()[0].device_kind
    peak = bf16_peak(device_kind)
    rate = gemm_flops / timings[GEMMS].median
    ours = timings["tinygpt bf16, fused attention"].median
    with _torch_inference():
        theirs = hf16(tokens_t).logits.float().cpu().numpy()
    diff = max_abs(np.asarray(fused(params, tokens).logits), theirs)
    targets = [Target("forward FLOP/s / XLA's bf16 rate on the forward's GEMMs alone", flops / ours / rate, 0.40,
                      unit="%")]
    if peak is not None:
        targets.insert(0, Target(f"forward FLOP/s / {device_kind} bf16 peak ({peak / 1e12:.0f} TFLOP/s)",
                                 flops / ours / peak, 0.40, unit="%"))
    tokens_per_s = {name: batch * seq / t.median for name, t in timings.items() if name != GEMMS}
    throughput = harness.Row(
        "gpu_throughput", f"bf16 forward throughput, B={batch} x T={seq} (logits kept)", "tokens/s", tokens_per_s,
        diffs={"HF bf16 (SDPA)": fmt_diff(diff)}, targets=targets,
        timings={name: t.as_dict() for name, t in timings.items()},
        notes=f"{flops / 1e12:.1f} TFLOP per forward (attention counted dense); tinygpt "
              f"{flops / ours / 1e12:.0f} TFLOP/s; XLA's bf16 GEMMs of the same shapes alone {rate / 1e12:.0f} "
              "TFLOP/s; bf16 logits differ by bf16 rounding")

    batch, seq = bench.sizes.gpu_naive
    tokens = bench.tokens(batch, seq)
    naive = tinygpt.make_forward(config, keep=("logits", "attn_pattern"))
    small_fused = tinygpt.make_forward(config, keep=("logits",))
    timings = interleaved({
        "tinygpt bf16, pattern kept (naive attention)": lambda: jax.block_until_ready(naive(params, tokens)),
        "tinygpt bf16, fused attention": lambda: jax.block_until_ready(small_fused(params, tokens)),
    }, reps=bench.sizes.reps)
    diff = max_abs(naive(params, tokens).logits, small_fused(params, tokens).logits)
    naive_row = harness.Row(
        "gpu_naive_attention", f"bf16 forward with and without the attention pattern, B={batch} x T={seq}",
        "tokens/s", {name: batch * seq / t.median for name, t in timings.items()},
        diffs={"tinygpt bf16, fused attention": fmt_diff(diff)},
        timings={name: t.as_dict() for name, t in timings.items()},
        notes="the pattern [layer, batch, head, seq, key] is stored in float32")
    del hf16
    return [throughput, naive_row]


# ----------------------------------------------------------------------------------------------- scaling


def scaling(bench: Bench, scratch: Path) -> Row:
    """The sharded batched forward and head sweep on 1, 2, 4 devices (simulated host devices on a CPU, each
    run in its own process), checked equal to the one-device run."""
    batch, seq = bench.sizes.forward
    figures, diffs, reference = {}, {}, None
    for n in bench.sizes.scaling_devices:
        save = scratch / f"scaling-{n}.npz"
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        sweep_batch, sweep_seq = bench.sizes.scaling_sweep
        r = harness.run_worker("benchmarks.scaling", [str(bench.directory), str(batch), str(seq), str(sweep_batch),
                                                      str(sweep_seq), str(bench.sizes.heavy_reps), str(save)], env=env)
        figures[f"forward, {n} device{'s' * (n > 1)}"] = r["forward"]
        figures[f"head sweep, {n} device{'s' * (n > 1)}"] = r["sweep"]
        result = dict(np.load(save))
        if reference is None:
            reference = result
        else:
            diffs[f"forward, {n} devices"] = fmt_diff(max_abs(result["resid_post"], reference["resid_post"]))
            diffs[f"head sweep, {n} devices"] = fmt_diff(max_abs(result["scores"], reference["scores"]))
    heads = bench.config.n_layer * bench.config.n_head
    sweep_batch, sweep_seq = bench.sizes.scaling_sweep
    return harness.Row("scaling", f"sharded over N CPU devices: forward (resid_post) B={batch} x T={seq}, "
                                  f"{heads}-head sweep B={sweep_batch} x T={sweep_seq}", "s", figures, diffs=diffs,
                       notes="simulated host devices share this machine's cores: this checks that splitting is "
                             "correct and cheap; on N accelerators each gets 1/N of the batch or sweep. Diffs "
                             "are against the 1-device run")
