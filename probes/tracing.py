"""Causal tracing (Meng et al. 2022, ROME): where in the network is the state that recalls a fact?

1. Clean run: the prompt ("The Eiffel Tower is in the city of"); the answer is its most likely next token
   (" Paris") unless given.
2. Corrupted runs: Gaussian noise is added to the token embeddings of the subject ("The Eiffel Tower"; its
   first occurrence in the prompt by default, as ROME's `find_token_range`), one sample per row, std `noise`
   x the std of the subject tokens' embeddings. ROME fixes one std for all its prompts, 3 x the std over the
   embeddings of every subject token of its dataset: pass `noise_std=3 * embedding_std(params, subjects)` to
   compare prompts at one noise level (the default takes this prompt's subject alone, so noise levels, and
   averages of effects over prompts, differ). The samples are a seeded `jax.random` draw by default;
   `noise_values="rome"` draws them as ROME does (numpy `RandomState(1).randn`, see `rome_unit_noise`), and
   an explicit array [samples, subject tokens, d_model] is added as given: with ROME's draw and std the
   trace reproduces ROME's numbers to float32 rounding.
3. Restored runs: each corrupted run with the clean value of one site put back at one (layer, position):
   the residual stream (window 1), or the MLP / attention output at the layers of a window around it
   (ROME's window, 10 by default). ROME's hidden-state trace restores block outputs, `resid_post` (the
   default); `resid_pre` of block l is `resid_post` of block l - 1, the same map shifted by one layer with
   the embeddings first.

Reported, P(answer) averaged over the noise samples: clean (`clean_prob`), corrupted (`corrupt_prob`),
restored at each (layer, position) (`scores[kind]`); the total effect is clean - corrupt, the indirect effect
of a state is restored - corrupt.

The restored runs of one kind are one compiled sweep (`tinygpt.sweep.sweep_positions`): a run restored at
layer l starts from the corrupted run's cached input of its first restored layer, recomputes only positions
from the restored one on, and positions before the subject are not run (the noise has not reached them:
restoring there changes nothing). The noise samples are the rows of one batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from probes import metrics
from tinygpt import forward
from tinygpt.config import Config
from tinygpt.display import Table, displayable, token
from tinygpt.errors import InputError
from tinygpt.inputs import checks_tokens
from tinygpt.model import unembed
from tinygpt.sweep import base_logits, cache_run, starts_from_z, sweep_positions

KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
RESIDUAL_KINDS = ("resid_pre", "resid_post")  # restored alone (window 1), as in ROME


@displayable(axes={"tokens": "seq"})
@dataclasses.dataclass
class CausalTrace:
    """ROME's causal trace of one prompt: P(answer) on the clean prompt, with the subject's embeddings
    noised, and with each clean state restored into the noised run."""

    tokens: np.ndarray  # [seq] the prompt
    subject: np.ndarray  # positions of the subject's tokens
    answer: int  # the token whose probability is traced
    clean_prob: float  # P(answer) on the clean prompt
    corrupt_prob: float  # P(answer) with the subject noised (mean over samples)
    scores: dict  # kind -> [layer, seq] P(answer) with the clean state restored there (mean over samples)
    noise_std: float  # std of the added noise
    samples: int
    window: int  # layers restored around each layer for mlp_out / attn_out (1 for the residual kinds)
    seed: int  # the jax draw's seed (1 for ROME's draw, which always seeds numpy with 1)
    noise_draw: str = "jax"  # "jax" (seeded jax.random), "rome" (numpy RandomState(1)) or "explicit" (given)

    @property
    def total_effect(self) -> float:
        """P(answer) clean - corrupted."""
        return self.clean_prob - self.corrupt_prob

    def indirect_effect(self, kind: str) -> np.ndarray:
        """P(answer) restored - corrupted, [layer, seq]."""
        return self.scores[kind] - self.corrupt_prob

    def _headline(self, top: int = 3):
        """P(answer) clean and corrupted (the caption), and the `top` largest indirect effects of each kind."""
        subject = {int(p) for p in np.asarray(self.subject)}
        rows = []
        for kind, scores in self.scores.items():
            effect = np.asarray(scores, np.float64) - self.corrupt_prob  # [layer, seq]
            order = np.argsort(-np.abs(effect), axis=None, kind="stable")[:top]
            rows += [(kind, l, p, token(self.tokens[p]) + (" (subject)" if p in subject else ""),
                      float(scores[l, p]), float(effect[l, p]))
                     for l, p in zip(*(a.tolist() for a in np.unravel_index(order, effect.shape)))]
        return Table(["restored", "layer", "position", "token", "P(answer)", "indirect effect"], rows,
                     caption=f"P({token(self.answer)}): clean {self.clean_prob:.4g}, corrupted {self.corrupt_prob:.4g}"
                             f" (total effect {self.total_effect:.4g}, {self.samples} noise samples); largest "
                             "indirect effects (restored - corrupted)")

    def _figure(self, max_cells: int = 4096):
        """`probes.plots.causal_trace` (ROME's heatmaps); None beyond `max_cells` layer x position cells per
        kind."""
        n_layer = np.asarray(next(iter(self.scores.values()))).shape[0]
        if n_layer * len(self.tokens) > max_cells:
            return None
        from probes import plots
        from tinygpt import display

        return plots.causal_trace(self, display.pieces(self.tokens), answer=display.pieces([self.answer])[0],
                                  prompt=display.decode(self.tokens))


def check_subject(subject_positions, seq: int) -> tuple[int, ...]:
    subject = tuple(sorted({int(p) for p in np.atleast_1d(subject_positions)}))
    if not subject:
        raise InputError("the subject must cover at least one token position")
    if subject[0] < 0 or subject[-1] >= seq:
        raise InputError(f"subject positions {list(subject)} are outside the prompt of {seq} tokens")
    return subject


def embedding_std(params, subjects) -> float:
    """ROME's `collect_embedding_std`: the standard deviation of the token embeddings' values (the rows of
    wte) over every token of `subjects` (token-id lists, repeats counted), with torch's `.std()` convention,
    the unbiased estimator (divides by n - 1). ROME gathers the embeddings of each subject string encoded by
    itself (`tokenizer.encode(subject)`, no leading space); its noise std is 3 x this over its dataset."""
    ids = np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in subjects]) if len(subjects) else []
    if len(ids) == 0:
        raise InputError("embedding_std needs at least one subject token")
    values = np.asarray(params["wte"], np.float32)[ids].astype(np.float64)  # [tokens, d_model]
    return float(values.std(ddof=1))


NOISE_DRAWS = ("jax", "rome")


def rome_unit_noise(samples: int, n_subject: int, d_model: int) -> np.ndarray:
    """ROME's standard-normal draw, float64 [samples, n_subject, d_model]: `trace_with_patch` seeds a fresh
    `numpy.random.RandomState(1)` in every run and draws `randn(batch - 1, subject tokens, d_model)` for the
    noised rows 1.. of its batch (row 0 is the clean run), so every run of a trace adds the same values."""
    return np.random.RandomState(1).randn(samples, n_subject, d_model)


def subject_noise(params, tokens, subject_positions, *, samples: int = 10, noise: float = 3.0,
                  noise_std: float | None = None, seed: int = 0, draw: str = "jax"):
    """(noise [samples, n_subject, d_model] float32, std): Gaussian noise for the subject's embeddings, std
    `noise_std`, or `noise` x the std of the subject tokens' embedding values (`embedding_std`).

    draw  "jax": `jax.random.normal(PRNGKey(seed))`; "rome": ROME's `rome_unit_noise` (seed unused), scaled as
          ROME scales it (std x the float64 draw, rounded to float32 when added to the float32 embeddings)"""
    tokens = np.asarray(tokens).reshape(-1)
    subject = check_subject(subject_positions, len(tokens))
    if draw not in NOISE_DRAWS:
        raise InputError(f"unknown noise draw {draw!r}; choose from {', '.join(NOISE_DRAWS)}")
    if noise_std is None:
        noise_std = noise * embedding_std(params, [tokens[list(subject)]])
    shape = (samples, len(subject), params["wte"].shape[1])
    if draw == "rome":
        return jnp.asarray(noise_std * rome_unit_noise(*shape), jnp.float32), noise_std
    return noise_std * jax.random.normal(jax.random.PRNGKey(seed), shape), noise_std


def check_noise_values(values, samples: int | None, n_subject: int, d_model: int) -> np.ndarray:
    """Explicit noise as float32 [samples, n_subject, d_model], or a one-line ValueError naming noise_values."""
    try:
        values = np.asarray(values, np.float32)
    except (TypeError, ValueError):
        raise InputError(f"noise_values must be None, 'rome' or an array of numbers [samples, {n_subject} subject "
                         f"tokens, d_model={d_model}], got {type(values).__name__}") from None
    rows = samples if samples is not None else "samples"
    if values.ndim != 3 or values.shape[1:] != (n_subject, d_model) or values.shape[0] < 1 or (
            samples is not None and values.shape[0] != samples):
        raise InputError(f"noise_values must have shape [{rows}, {n_subject} subject tokens, d_model={d_model}], "
                         f"got {list(values.shape)}")
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise InputError(f"noise_values must be finite, got {bad} NaN or infinite entries")
    return values


def trace_noise(params, tokens, subject: tuple, noise_values, *, samples: int | None, noise: float,
                noise_std: float | None, seed: int):
    """(noise [samples, n_subject, d_model] float32, its std, the seed recorded, the draw) for `causal_trace`'s
    `noise_values`: None (the seeded jax draw), "rome" (ROME's draw, seed 1) or an explicit array."""
    if isinstance(noise_values, str) and noise_values != "rome":
        raise InputError(f"noise_values must be None, 'rome' or an array [samples, subject tokens, d_model], "
                         f"got {noise_values!r}")
    if noise_values is None or isinstance(noise_values, str):
        draw = "jax" if noise_values is None else "rome"
        values, std = subject_noise(params, tokens, subject, samples=10 if samples is None else samples,
                                    noise=noise, noise_std=noise_std, seed=seed, draw=draw)
        return values, std, 1 if draw == "rome" else seed, draw
    values = check_noise_values(noise_values, samples, len(subject), params["wte"].shape[1])
    return values, float(values.std()), seed, "explicit"


def noise_edit(noise, subject, seq: int):
    """The `embed` edit adding noise [samples, n_subject, d_model] at the subject positions of each row."""
    full = jnp.zeros((noise.shape[0], seq, noise.shape[2]), noise.dtype).at[:, jnp.asarray(subject)].set(noise)

    def edit(embed, layer):
        return embed + full.astype(embed.dtype)

    return edit


def trace_scores(params, tokens, noise, answer, *, config: Config, subject: tuple, kinds: tuple, window: int,
                 buckets: int, chunk_size: int | None):
    """(scores {kind: [layer, seq]}, clean P(answer), corrupted P(answer)): traceable; see `causal_trace`."""
    samples, seq = noise.shape[0], tokens.shape[0]
    clean = forward(params, tokens[None], config, keep=kinds + ("ln_final",))
    clean_logits = unembed(clean.ln_final[:, -1:], params)[:, 0]  # [1, vocab]
    corrupt_tokens = jnp.broadcast_to(tokens, (samples, seq))
    cache = cache_run(params, corrupt_tokens, config, edits={"embed": noise_edit(noise, subject, seq)},
                      z=starts_from_z(kinds))

    def score(logits):  # [samples, 1, vocab] -> mean P(answer) over the samples
        return metrics.prob(logits[:, 0], answer).mean()

    windows = {kind: 1 if kind in RESIDUAL_KINDS else window for kind in kinds}
    scores = sweep_positions(params, config, cache, {kind: clean[kind] for kind in kinds}, score,
                             layers=jnp.arange(config.n_layer), positions=np.arange(seq), windows=windows,
                             unchanged_before=subject[0], buckets=buckets, chunk_size=chunk_size)
    corrupt = score(base_logits(params, cache))
    return dict(zip(kinds, scores)), metrics.prob(clean_logits, answer)[0], corrupt


compiled_trace = jax.jit(trace_scores, static_argnames=("config", "subject", "kinds", "window", "buckets",
                                                        "chunk_size"))


@checks_tokens("tokens")
def causal_trace(params, tokens, config: Config, subject_positions, *, answer: int | None = None,
                 kinds=("resid_post", "mlp_out", "attn_out"), samples: int | None = None, noise: float = 3.0,
                 noise_std: float | None = None, seed: int = 0, noise_values=None, window: int = 10,
                 buckets: int = 2, chunk_size: int | None = None) -> CausalTrace:
    """ROME's causal trace of one prompt (see the module doc).

    tokens             int [seq] (or [1, seq]) the prompt
    subject_positions  the positions of the subject's tokens (`find_subject`)
    answer             the traced token (default: the clean run's most likely next token)
    kinds              sites restored: "resid_pre", "resid_post", "mlp_out", "attn_out"
    samples, noise, noise_std, seed   the corruption: `samples` rows (default 10) of Gaussian noise of std
                       noise_std, or noise x the subject embeddings' std (ROME's: noise_std =
                       3 * embedding_std(params, all the dataset's subjects)); seed seeds the jax draw
    noise_values       None: the seeded jax draw; "rome": ROME's draw (`rome_unit_noise`, numpy RandomState(1),
                       x the std, as `trace_with_patch` adds it; seed unused); or an explicit array
                       [samples, subject tokens, d_model] added to the subject's embeddings as given
                       (samples, noise, noise_std and seed unused; the recorded noise_std is its std)
    window             layers restored together for mlp_out / attn_out, centred on each layer"""
    tokens = np.asarray(tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise InputError(f"causal tracing takes one prompt (token ids [seq]), got shape {tokens.shape}")
    subject = check_subject(subject_positions, len(tokens))
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InputError(f"unknown kind {unknown[0] if unknown else None!r}; choose from {', '.join(KINDS)}")
    if (samples is not None and samples < 1) or window < 1:
        raise InputError("samples and window must be at least 1")
    values, std, seed, draw = trace_noise(params, tokens, subject, noise_values, samples=samples, noise=noise,
                                          noise_std=noise_std, seed=seed)
    if answer is None:
        answer = int(jnp.argmax(forward(params, tokens[None], config, keep=("logits",)).logits[0, -1]))
    if not 0 <= answer < config.vocab_size:
        raise InputError(f"answer token {answer} is outside the vocabulary [0, {config.vocab_size})")
    scores, clean_prob, corrupt_prob = compiled_trace(
        params, jnp.asarray(tokens), jnp.asarray(values), jnp.asarray(answer), config=config, subject=subject,
        kinds=kinds, window=window, buckets=buckets, chunk_size=chunk_size)
    return CausalTrace(tokens, np.asarray(subject), int(answer), float(clean_prob), float(corrupt_prob),
                       {k: np.asarray(scores[k]) for k in kinds}, float(std), len(values), window, seed, draw)


def subject_occurrences(tokenizer, tokens, subject: str) -> list[list[int]]:
    """The token positions covering each occurrence of `subject` in the prompt, left to right (occurrences
    counted as `str.count` counts them, without overlaps; matched on the tokens' bytes, so a character split
    across tokens is found too, and a token only partly inside the subject is included, as ROME's
    `find_token_range` does)."""
    token_bytes = [tokenizer.token_bytes(int(t)) for t in np.asarray(tokens).reshape(-1)]
    data, target = b"".join(token_bytes), subject.encode("utf-8")
    ends = np.cumsum([len(b) for b in token_bytes])  # byte offset where each token ends
    begins = ends - np.asarray([len(b) for b in token_bytes])
    found, start = [], data.find(target) if target else -1
    while start >= 0:
        end = start + len(target)
        found.append([i for i in range(len(token_bytes)) if begins[i] < end and ends[i] > start])
        start = data.find(target, end)
    return found


def find_subject(tokenizer, tokens, subject: str, occurrence: int = 0) -> list[int]:
    """Positions of the tokens covering one occurrence of `subject` in the prompt (`subject_occurrences`):
    the first by default, as ROME's `find_token_range` (`str.index`); `occurrence` counts from 0, negative
    values from the end (-1: the last)."""
    found = subject_occurrences(tokenizer, tokens, subject)
    if not found:
        text = b"".join(tokenizer.token_bytes(int(t)) for t in np.asarray(tokens).reshape(-1))
        raise InputError(f"subject {subject!r} does not occur in the prompt {text.decode('utf-8', 'replace')!r}")
    if not -len(found) <= occurrence < len(found):
        raise InputError(f"occurrence={occurrence} is out of range: subject {subject!r} occurs {len(found)} "
                         f"time{'s' if len(found) > 1 else ''} in the prompt (occurrence counts from 0, negative "
                         f"from the end)")
    return found[occurrence]
