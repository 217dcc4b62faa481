"""Measuring: interleaved timings with medians, the machine's own matrix-product rate, FLOP counts, peak
memory of a fresh process, and the rows the report is made of.

Every comparison times its contenders in the same run, interleaved (one call of each per repetition, the
order rotated so that none always runs first), after warm-up calls that compile and fill caches; the figure
is the median over repetitions. Peers measured in one run see the same machine load, so their ratios hold
even where absolute times drift.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Timing:
    """Seconds per call of one contender: the median of `times`, which were measured after warm-up."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repetitions: how noisy the machine was."""
        return (max(self.times) - min(self.times)) / self.median

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.times), "max_s": max(self.times), "times_s": self.times}


def interleaved(contenders: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 1,
                warm: dict[str, Callable[[], Any]] | None = None) -> dict[str, Timing]:
    """Time each contender `reps` times, one call of each per round, rotating the order each round, after
    `warmup` untimed calls of each (or of its cheaper stand-in in `warm`: a loop of torch runs needs one run
    to warm up, not the whole loop). Every callable must block until its result is ready."""
    names = list(contenders)
    warm = warm or {}
    for name in names:
        for _ in range(warmup):
            warm.get(name, contenders[name])()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(reps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------- machine


def machine_name(backend: str, device_kind: str) -> str:
    """A file-name-safe label for the results: the accelerator, or the CPU model and core count."""
    if backend == "cpu":
        label = f"cpu-{cpu_model()}-{os.cpu_count()}cores"
    else:
        label = f"{backend}-{device_kind}"
    return "".join(c if c.isalnum() or c in "-." else "-" for c in label).strip("-").lower().replace("--", "-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split()[:4])
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of everything measured."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "numpy", "torch", "transformers", "transformer-lens"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -------------------------------------------------------------------------------------------------- FLOPs


def forward_flops(config, batch: int, seq: int, *, logits: bool = True) -> float:
    """Multiply-adds x 2 of one GPT-2 forward: the weight matrices (q, k, v, o, MLP in and out, and the
    unembedding when logits are computed) applied to every token, plus attention's two [seq x seq]
    products per head (counted in full, as a dense kernel computes them)."""
    d, m, L = config.d_model, config.d_mlp, config.n_layer
    per_token = L * (4 * d * d + 2 * d * m) + (d * config.vocab_size if logits else 0)
    attention = L * 2 * seq * seq * d * batch
    return 2.0 * (per_token * batch * seq + attention)


def forward_gemms(config, batch: int, seq: int, *, logits: bool = True) -> list[tuple[int, int, int, int]]:
    """The forward's weight matrix products as (count, rows, inner, cols)."""
    d, m, L, tokens = config.d_model, config.d_mlp, config.n_layer, batch * seq
    gemms = [(L, tokens, d, 3 * d), (L, tokens, d, d), (L, tokens, d, m), (L, tokens, m, d)]
    if logits:
        gemms.append((1, tokens, d, config.vocab_size))
    return gemms


def gemm_skeleton(config, batch: int, seq: int, dtype, *, logits: bool = True):
    """The forward's matrix products and nothing else, as one compiled program: per layer (scanned, like
    the forward) [tokens, d_model] @ q/k/v, @ o, @ MLP in, @ MLP out, then the unembedding; random weights
    scaled to keep activations O(1). Returns (a zero-argument call that blocks, its FLOPs). Timed beside the
    forward, it is the ceiling the forward can approach on this machine, measured under the same load."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    d, m, L, tokens = config.d_model, config.d_mlp, config.n_layer, batch * seq
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 6))

    def weights(*shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) / shape[-2] ** 0.5).astype(dtype)

    stacked = (weights(L, d, 3 * d), weights(L, d, d), weights(L, d, m), weights(L, m, d))
    unembedding = weights(d, config.vocab_size)
    x = jax.random.normal(next(keys), (tokens, d), jnp.float32).astype(dtype)

    @jax.jit
    def products(x, stacked, unembedding):
        def layer(x, w):
            qkv = x @ w[0]
            out = qkv[:, :d] @ w[1]
            hidden = out @ w[2]
            return hidden @ w[3], None

        x, _ = lax.scan(layer, x, stacked)
        return x @ unembedding if logits else x

    flops = 2.0 * sum(count * rows * inner * cols for count, rows, inner, cols in
                      forward_gemms(config, batch, seq, logits=logits))
    return (lambda: products(x, stacked, unembedding).block_until_ready()), flops


# --------------------------------------------------------------------------------------- peak memory


def run_worker(module: str, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run `python -m module *args` in a fresh process (so its peak memory is its own) and return the
    JSON object it prints last."""
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class PeakRSS:
    """Peak resident memory of this process over a region, in MB, from Linux's VmHWM (reset on entry)."""

    def __enter__(self):
        self.before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM")
        self.after = _status("VmRSS")
        self.delta = self.peak - self.before
        return False


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Target:
    """A ratio we hold ourselves to: `value` compared with `threshold` (`at_least` or at most)."""

    what: str
    value: float
    threshold: float
    at_least: bool = True
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def as_dict(self) -> dict:
        return {"what": self.what, "value": self.value, "threshold": self.threshold,
                "at_least": self.at_least, "unit": self.unit, "met": self.met}


@dataclasses.dataclass
class Row:
    """One benchmark: what was measured, each contender's figure, the max numerical difference of each
    peer's result from tinygpt's, and the targets."""

    key: str
    title: str
    unit: str  # "s", "tokens/s", "MB"
    figures: dict[str, float]  # contender -> figure in `unit`
    diffs: dict[str, str] = dataclasses.field(default_factory=dict)  # contender -> max |difference|, as text
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: str = ""
    timings: dict[str, dict] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "unit": self.unit, "figures": self.figures,
                "diffs": self.diffs, "targets": [t.as_dict() for t in self.targets], "notes": self.notes,
                "timings": self.timings}


def timed_row(key, title, timings: dict[str, Timing], **kwargs) -> Row:
    return Row(key, title, "s", {name: t.median for name, t in timings.items()},
               timings={name: t.as_dict() for name, t in timings.items()}, **kwargs)
