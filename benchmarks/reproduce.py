"""Reproducing published GPT-2 figures: `python -m benchmarks.reproduce [--model gpt2] [--only ...] [--out F]`.

tinygpt equals Hugging Face's GPT-2 on random checkpoints (tests/test_hf_parity.py), and its probes equal
independent implementations. This script asks the next question: run on the official gpt2 weights, do they
give the figures that others published? Each check runs one probe the way the publication describes and sets
what it measures beside the published value:

    greedy   HF transformers' own test of GPT-2 (`test_lm_generate_gpt2`): greedy decoding of "The dog"
             ([464, 3290]) to 20 tokens gives [464, 3290, 373, 1043, ..., 464, 3290].
    massive  Sun et al. 2024, "Massive Activations in Large Language Models": a few residual activations
             with |value| > 100 and >= 1000x the median |value| of their hidden state, in GPT-2 on the
             starting token only. The project's seed brief (quoted in issue 21) puts them in dims 447 and 138
             from layer 2 on (read here as tinygpt's 0-based block index, as probes/massive.py does), with
             layer 2's W_out having sigma1 ~38.3 and sigma2 ~15.2, and dim 447's MLP output a linear function
             of h . v1 with slope ~38.7 and R^2 ~0.998 (`probes.massive.geometry`).
    ioi      Wang et al. 2022, "Interpretability in the Wild" (arXiv:2211.00593), section 3.1 and Fig. 3: path
             patching each head's output from the p_ABC distribution (three unrelated names) into the IOI
             prompt along the direct path to the logits; the name movers 9.9, 9.6 and 10.0 are the heads
             whose direct effect on the logit difference IO - S is largest.
    trace    Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME), Fig. 1 and
             section 2 (GPT-2 XL): restoring the MLP output has its largest indirect effect at the last
             subject token in the early-middle layers; restoring the attention output has its largest at the
             last token in the late layers. Traced here on "The Space Needle is located in the city of" ->
             " Seattle" and "Megan Rapinoe plays the sport of" -> " soccer".

Each row says "matches" (within the tolerance it states), "differs", or "n/a (why)" where the figure cannot
exist on the model given (too few layers for layer 10, too narrow for dim 447, no tokenizer for a prompt). On
a checkpoint other than official gpt2 the rows are expected to differ: that is how `tests/test_reproduce.py`
exercises the logic, on random checkpoints, since the hub is out of reach where this was written.

What is published and what is an assumption of the check, stated where it matters:
- ROME's figures are for GPT-2 XL (48 layers). Its picture is scaled to the model's depth: the MLP peak is
  asked to lie in the first half of the layers, the attention peak in the second half, and ROME's restoring
  window of 10 layers (of 48) becomes ceil(10 x n_layer / 48) layers (3 for gpt2). No number of ROME's is
  compared, only where the peaks are.
- The massive activations' slope and R^2 are fitted over the tokens of the prompts below; the seed's prompts
  are not known, so those two rows carry a looser tolerance than the weight-only sigmas.
- probes/patching.py patches activations (every path from a head); Wang et al.'s name movers are defined by
  the head's direct path to the logits, which this file computes from the two runs' head outputs
  (`direct_path_effects`): the patched final residual is the clean one plus the head's output difference,
  then the final LayerNorm (recomputed) and the unembedding.

Exit status: 0 when the checks ran (whatever their status; with --strict, 1 if any row differs), 2 for a bad
argument or an unreadable checkpoint, 3 when the checkpoint must come from the Hugging Face hub and the hub
cannot provide it (one line on stderr, nothing measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np

MATCHES, DIFFERS = "matches", "differs"
EXIT_OK, EXIT_DIFFERS, EXIT_ERROR, EXIT_NO_HUB = 0, 1, 2, 3


@dataclasses.dataclass
class Row:
    """One published figure and what the model gives."""

    check: str  # the family: greedy, massive, ioi, trace
    name: str  # what is compared
    measured: str  # the measurement, as text for the table
    published: str  # the published figure, as text
    status: str  # "matches", "differs" or "n/a (reason)"
    tolerance: str  # the rule that decides the status
    source: str  # where the published figure comes from
    value: Any = None  # the measurement as JSON data (numbers, lists), None when nothing was measured
    detail: str = ""  # more of the measurement (the runner-up heads, P(answer), ...)


def not_applicable(why: str) -> str:
    return f"n/a ({why})"


def status_of(ok: bool) -> str:
    return MATCHES if ok else DIFFERS


# ------------------------------------------------------------------------------------------ greedy "The dog"

DOG_PROMPT = [464, 3290]  # "The dog"
DOG_CONTINUATION = [373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262, 13, 198, 198, 464,
                    3290]  # " was found in a field near the intersection of West and West Streets.\n\nThe dog"
DOG_SOURCE = ("Hugging Face transformers, tests/models/gpt2/test_modeling_gpt2.py, test_lm_generate_gpt2: "
              "openai-community/gpt2, generate(do_sample=False, max_length=20)")


def compare_greedy(generated) -> Row:
    """The row for a greedy continuation of [464, 3290] (its 18 new ids)."""
    generated = [int(t) for t in generated]
    equal = sum(a == b for a, b in zip(generated, DOG_CONTINUATION))
    first = next((i for i, (a, b) in enumerate(zip(generated, DOG_CONTINUATION)) if a != b), None)
    detail = "" if first is None else f"first difference at new token {first}"
    return Row("greedy", 'greedy continuation of "The dog" [464, 3290], 18 new tokens',
               f"{generated} ({equal}/{len(DOG_CONTINUATION)} equal)", str(DOG_CONTINUATION),
               status_of(generated == DOG_CONTINUATION), "exact: every id equal", DOG_SOURCE, generated, detail)


def greedy_dog(model) -> list[Row]:
    import tinygpt

    needed = max(DOG_PROMPT + DOG_CONTINUATION) + 1
    if model.config.vocab_size < needed:
        return [Row("greedy", 'greedy continuation of "The dog" [464, 3290], 18 new tokens', "-",
                    str(DOG_CONTINUATION), not_applicable(f"vocabulary of {model.config.vocab_size} < {needed}"),
                    "exact: every id equal", DOG_SOURCE)]
    out = tinygpt.generate(model.params, model.config, np.asarray([DOG_PROMPT], np.int32), len(DOG_CONTINUATION),
                           temperature=0.0)
    return [compare_greedy(np.asarray(out.tokens)[0])]


# ---------------------------------------------------------------------------------------- massive activations

MASSIVE_PROMPTS = [  # plain English (Sun et al. sample RedPajama; the seed's prompts are not known), 14 GPT-2
    # tokens each, so that each stage of the investigation is one compiled program
    "Paris is the capital of France and Rome is the capital of Italy.",
    "The quick brown fox jumps over the lazy dog in the green field.",
    "She opened the door, and the cold air rushed into the room.",
    "We walked along the river until the sun went down behind the hills.",
]
MASSIVE_LAYER, MASSIVE_DIMS = 2, (447, 138)
SIGMA1, SIGMA2, SLOPE, R2 = 38.3, 15.2, 38.7, 0.998
SUN = "Sun et al. 2024, Massive Activations in Large Language Models (arXiv:2402.17762), section 2"
SEED = "the project's seed brief, as quoted in issue 21 (probes/massive.py: 0-based block index)"


@dataclasses.dataclass
class MassiveMeasurement:
    """What `massive_activations` measures; None where the model cannot have it."""

    n_layer: int
    d_model: int
    activations: list  # (layer, dim, position, value, ratio) of every massive activation found
    first_layer: int | None
    sigma1: float | None  # of W_out at MASSIVE_LAYER, as probes.massive.geometry computes it
    sigma2: float | None
    sigma1_centred: float | None  # the same with W_out's d_model side centred (probes.svd.spectra)
    slope: float | None  # of mlp_out[447] on h . v1 at MASSIVE_LAYER
    r2: float | None


def compare_massive(m: MassiveMeasurement) -> list[Row]:
    """The rows for a massive-activation measurement."""
    rows = []
    found = m.activations
    positions = sorted({a[2] for a in found})
    largest = max(found, key=lambda a: abs(a[3])) if found else None
    rows.append(Row(
        "massive", "massive activations (|x| > 100, >= 1000x median) sit on the first token only",
        (f"{len(found)} found, at positions {positions}; largest {largest[3]:.1f} (layer {largest[0]}, dim "
         f"{largest[1]}, {largest[4]:.0f}x median)") if found else "none found",
        "present, on the starting token only (GPT-2)", status_of(bool(found) and positions == [0]),
        "at least one found, every one at position 0", SUN,
        [list(a) for a in found[:64]]))
    too_shallow = m.n_layer <= MASSIVE_LAYER
    shallow = not_applicable(f"model too small: {m.n_layer} layers, layer {MASSIVE_LAYER} needed")
    narrow = not_applicable(f"model too small: d_model {m.d_model}, dim {max(MASSIVE_DIMS)} needed")
    rows.append(Row(
        "massive", "first layer holding a massive activation", "none found" if m.first_layer is None else
        str(m.first_layer), str(MASSIVE_LAYER), shallow if too_shallow else status_of(m.first_layer == MASSIVE_LAYER),
        "exact", SEED, m.first_layer))
    dims = sorted({a[1] for a in found if a[0] == m.first_layer})
    rows.append(Row(
        "massive", "massive dims at that layer", str(dims) if found else "none found", str(sorted(MASSIVE_DIMS)),
        narrow if m.d_model <= max(MASSIVE_DIMS) else status_of(dims == sorted(MASSIVE_DIMS)), "the same set",
        SEED, dims))
    for name, value, published, tol, extra in (
            ("sigma1 of W_out, layer 2", m.sigma1, SIGMA1, 0.05, m.sigma1_centred),
            ("sigma2 of W_out, layer 2", m.sigma2, SIGMA2, 0.05, None)):
        rows.append(Row(
            "massive", name, "-" if value is None else f"{value:.3f}", f"~{published}",
            shallow if too_shallow else status_of(abs(value - published) <= tol + 1e-9),
            f"|measured - published| <= {tol} (the published rounding)", SEED, value,
            "" if extra is None else f"with W_out's d_model side centred (probes.svd): {extra:.3f}"))
    for name, value, published, tol, why in (
            ("slope of mlp_out[447] on h . v1, layer 2", m.slope, SLOPE, 0.01 * SLOPE, "1% (prompt-dependent fit)"),
            ("R^2 of that fit", m.r2, R2, 0.002, "0.002 (prompt-dependent fit)")):
        status = shallow if too_shallow else narrow if m.d_model <= max(MASSIVE_DIMS) else status_of(
            abs(value - published) <= tol + 1e-12)
        rows.append(Row("massive", name, "-" if value is None else f"{value:.4g}", f"~{published}", status,
                        f"|measured - published| <= {why}", SEED, value))
    return rows


def massive_activations(model) -> list[Row]:
    from probes import massive, svd

    if model.tokenizer is None:
        return no_tokenizer("massive", "massive activations", SUN)
    params, config = model.params, model.config
    prompts = [model.tokenizer.encode(p) for p in MASSIVE_PROMPTS]
    report = massive.investigate(params, config, prompts)
    found = [(a.layer, a.dim, a.position, a.value, a.ratio) for a in report.activations]
    sigma1 = sigma2 = centred = slope = r2 = None
    if config.n_layer > MASSIVE_LAYER:
        dim = MASSIVE_DIMS[0] if config.d_model > max(MASSIVE_DIMS) else 0
        geometry = massive.geometry(params, config, prompts, report.activations, MASSIVE_LAYER, dim)
        sigma1, sigma2 = geometry.sigma1, geometry.sigma2
        centred = float(svd.spectra(params, config, "W_out", MASSIVE_LAYER)[0, 0])
        if config.d_model > max(MASSIVE_DIMS):
            slope, r2 = geometry.slope, geometry.r2
    return compare_massive(MassiveMeasurement(config.n_layer, config.d_model, found, report.first_layer, sigma1,
                                              sigma2, centred, slope, r2))


# ----------------------------------------------------------------------------------------- IOI name movers

IOI_TEMPLATES = [  # in the style of Wang et al.'s p_IOI: {A} and {B} introduce two names, {S} repeats one; each
    # 14 GPT-2 tokens with one-token names, so that all the prompts are one batch
    "When {A} and {B} went to the store, {S} gave a drink to",
    "After {A} and {B} went to the office, {S} gave a book to",
    "While {A} and {B} were at the garden, {S} gave a flower to",
    "Friends {A} and {B} went to the school. {S} gave a pen to",
    "While {A} and {B} were in the kitchen, {S} gave a knife to",
]
IOI_NAMES = ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Lisa", "Paul", "Kate", "Mark"]
NAME_MOVERS = ((9, 9), (9, 6), (10, 0))
IOI_SOURCE = ("Wang et al. 2022, Interpretability in the Wild (arXiv:2211.00593), section 3.1, Fig. 3: path "
              "patching from p_ABC, each head to the logits")


def ioi_prompts(tokenizer):
    """Batches (clean [n, seq], corrupted p_ABC [n, seq], io ids [n], s ids [n]), one per prompt length: every
    template with every pair of names in both orders (ABBA and BABA), the ABC prompt putting three other names
    where the two were. Names are those of IOI_NAMES that are one token with a leading space."""
    names = [n for n in IOI_NAMES if len(tokenizer.encode(" " + n)) == 1]
    if len(names) < 5:
        return []
    pairs = [(names[i], names[i + 1]) for i in range(0, len(names) - 1, 2)]
    by_length = {}
    for template in IOI_TEMPLATES:
        for k, (first, second) in enumerate(pairs):
            others = [n for n in names if n not in (first, second)]
            a, b, c = (others[(3 * k + j) % len(others)] for j in range(3))
            for io_name, s_name, order in ((first, second, "ABBA"), (second, first, "BABA")):
                x, y = (io_name, s_name) if order == "ABBA" else (s_name, io_name)
                clean = tokenizer.encode(template.format(A=x, B=y, S=s_name))
                corrupt = tokenizer.encode(template.format(A=a, B=b, S=c))
                if len(clean) != len(corrupt):
                    continue
                batch = by_length.setdefault(len(clean), ([], [], [], []))
                for part, value in zip(batch, (clean, corrupt, tokenizer.encode(" " + io_name)[0],
                                               tokenizer.encode(" " + s_name)[0])):
                    part.append(value)
    return [tuple(np.asarray(part) for part in batch) for _, batch in sorted(by_length.items())]


def direct_path_effects(params, config, batches) -> tuple[np.ndarray, float]:
    """(effects [layer, head], the clean logit difference IO - S averaged over prompts). An effect is the
    relative change of the mean logit difference IO - S (patched mean / clean mean - 1, not the mean of each
    prompt's relative change), when one head's output at the last position is taken from the p_ABC run and passed to the logits alone (Wang et al.'s path
    patching with the logits as receiver): final residual r' = r + head_out_abc - head_out_clean, then the
    final LayerNorm, recomputed on r', and the unembedding."""
    from tinygpt import forward

    w = np.asarray(params["lnf_w"], np.float64)
    b = np.asarray(params["lnf_b"], np.float64)
    unembedding = (np.asarray(params["W_U"], np.float64) if "W_U" in params
                   else np.asarray(params["wte"], np.float64).T)  # [d_model, vocab]
    bias = np.asarray(params["b_U"], np.float64) if "W_U" in params else None

    def logit_diff(resid, io, s):  # resid [..., n, d_model] -> [..., n]
        centred = resid - resid.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + config.ln_eps) * w + b
        diff = np.einsum("...nm,mn->...n", normed, unembedding[:, io] - unembedding[:, s])
        return diff if bias is None else diff + (bias[io] - bias[s])

    clean_total, patched_total, count = 0.0, np.zeros((config.n_layer, config.n_head)), 0
    chunks = []  # at most 16 prompts at a time (head_out of gpt2 is 12 x 12 x 768 per token), equal sizes
    for batch in batches:
        size = math.ceil(len(batch[0]) / math.ceil(len(batch[0]) / 16))
        chunks += [tuple(part[i:i + size] for part in batch) for i in range(0, len(batch[0]), size)]
    for clean, corrupt, io, s in chunks:
        runs = [forward(params, tokens, config, keep=("head_out", "resid_post")) for tokens in (clean, corrupt)]
        resid = np.asarray(runs[0].resid_post[-1, :, -1], np.float64)  # [n, d_model]
        heads = [np.asarray(r.head_out[:, :, -1], np.float64) for r in runs]  # [layer, n, head, d_model]
        delta = (heads[1] - heads[0]).transpose(0, 2, 1, 3)  # [layer, head, n, d_model]
        clean_total += logit_diff(resid, io, s).sum()
        patched_total += logit_diff(resid + delta, io, s).sum(-1)
        count += len(io)
    return patched_total / clean_total - 1.0, clean_total / count


def compare_ioi(effects: np.ndarray, n_prompts: int, clean_logit_diff: float | None = None) -> Row:
    """The row for direct-path effects [layer, head]: are the three largest drops 9.9, 9.6 and 10.0?"""
    n_layer, n_head = effects.shape
    order = np.argsort(effects, axis=None, kind="stable")  # most negative (largest drop) first
    ranked = [tuple(int(i) for i in np.unravel_index(k, effects.shape)) for k in order]
    top = ranked[:3]
    label = lambda lh: f"{lh[0]}.{lh[1]}"  # noqa: E731
    measured = ", ".join(f"{label(lh)} ({100 * effects[lh]:+.0f}%)" for lh in top)
    fits = all(l < n_layer and h < n_head for l, h in NAME_MOVERS)
    status = (status_of(set(top) == set(NAME_MOVERS)) if fits
              else not_applicable(f"model too small: {n_layer} layers x {n_head} heads, 11 x 10 needed"))
    ranks = {label(lh): ranked.index(lh) + 1 for lh in NAME_MOVERS if lh[0] < n_layer and lh[1] < n_head}
    detail = (f"{n_prompts} prompts; rank of each name mover by drop: {ranks}"
              + ("" if clean_logit_diff is None else f"; clean logit difference {clean_logit_diff:.3f}"))
    return Row("ioi", "IOI name movers: the 3 heads whose direct path to the logits carries most of IO - S",
               measured, "9.9, 9.6, 10.0", status, "the same three heads, in any order", IOI_SOURCE,
               [[l, h, float(effects[l, h])] for l, h in top], detail)


def ioi_name_movers(model) -> list[Row]:
    if model.tokenizer is None:
        return no_tokenizer("ioi", "IOI name movers", IOI_SOURCE)
    batches = ioi_prompts(model.tokenizer)
    if not batches:
        return [Row("ioi", "IOI name movers", "-", "9.9, 9.6, 10.0",
                    not_applicable("the tokenizer has too few one-token names"), "-", IOI_SOURCE)]
    effects, clean_logit_diff = direct_path_effects(model.params, model.config, batches)
    return [compare_ioi(effects, sum(len(b[0]) for b in batches), clean_logit_diff)]


# ---------------------------------------------------------------------------------------- causal traces

FACTS = [("The Space Needle is located in the city of", "Space Needle", " Seattle"),
         ("Megan Rapinoe plays the sport of", "Megan Rapinoe", " soccer")]
ROME_SOURCE = ("Meng et al. 2022, Locating and Editing Factual Associations in GPT (ROME, arXiv:2202.05262), "
               "Fig. 1 and section 2 (GPT-2 XL, 48 layers)")


def rome_window(n_layer: int) -> int:
    """ROME's window of 10 restored layers of GPT-2 XL's 48, scaled to `n_layer` layers."""
    return max(1, math.ceil(10 * n_layer / 48))


def compare_trace(prompt: str, kind: str, effect: np.ndarray, last_subject: int, total_effect: float,
                  detail: str = "") -> Row:
    """The row for one kind's indirect effects [layer, seq]: is the peak where ROME's picture puts it? mlp_out:
    at the last subject token, in the first half of the layers; attn_out: at the last token, in the second.
    A peak means something only where noising the subject lowers P(answer) (total effect > 0: ROME traces facts
    the model recalls) and restoring raises it (peak > 0); both are part of the check."""
    n_layer, seq = effect.shape
    layer, position = (int(i) for i in np.unravel_index(np.argmax(effect), effect.shape))
    half = n_layer / 2
    if kind == "mlp_out":
        where, expected = last_subject, f"last subject token (position {last_subject}), layer < {half:g}"
        ok = position == last_subject and layer < half
        published = "peak at the last subject token, early-middle layers"
    else:
        where, expected = seq - 1, f"last token (position {seq - 1}), layer >= {half:g}"
        ok = position == seq - 1 and layer >= half
        published = "peak at the last token, late layers"
    ok = ok and total_effect > 0 and effect[layer, position] > 0
    status = status_of(ok) if n_layer >= 2 else not_applicable("model too small: one layer has no halves")
    return Row("trace", f'causal trace "{prompt}": {kind} indirect effect',
               f"peak at position {position}{' (last subject token)' if position == last_subject else ''}"
               f"{' (last token)' if position == seq - 1 else ''}, layer {layer}: {effect[layer, position]:+.3g}",
               published, status, f"argmax at the {expected} (ROME's picture scaled to this depth), total and peak "
               "effects > 0",
               ROME_SOURCE, {"layer": layer, "position": position, "effect": float(effect[layer, position]),
                             "expected_position": where, "total_effect": float(total_effect)}, detail)


def causal_traces(model) -> list[Row]:
    from probes.tracing import causal_trace, find_subject

    if model.tokenizer is None:
        return no_tokenizer("trace", "causal traces", ROME_SOURCE)
    rows = []
    window = rome_window(model.config.n_layer)
    for prompt, subject, answer in FACTS:
        tokens = np.asarray(model.tokenizer.encode(prompt))
        positions = find_subject(model.tokenizer, tokens, subject)
        answer_id = model.tokenizer.encode(answer)[0]
        trace = causal_trace(model.params, tokens, model.config, positions, answer=answer_id,
                             kinds=("mlp_out", "attn_out"), noise_values="rome", window=window)
        top = int(np.argmax(np.asarray(model(tokens[None], keep=("logits",)).logits)[0, -1]))
        detail = (f"P({answer!r}) clean {trace.clean_prob:.3g}, corrupted {trace.corrupt_prob:.3g} (total effect "
                  f"{trace.total_effect:+.3g}); the model's "
                  f"top next token {model.tokenizer.decode([top])!r}; window {window}, 10 noise samples (ROME's "
                  "draw), noise 3x the subject embeddings' std")
        for kind in ("mlp_out", "attn_out"):
            rows.append(compare_trace(prompt, kind, trace.indirect_effect(kind), int(positions[-1]),
                                      trace.total_effect, detail))
    return rows


# ------------------------------------------------------------------------------------------------ running

CHECKS = {"greedy": greedy_dog, "massive": massive_activations, "ioi": ioi_name_movers, "trace": causal_traces}


def no_tokenizer(check: str, name: str, source: str) -> list[Row]:
    return [Row(check, name, "-", "-", not_applicable("the checkpoint has no tokenizer; the prompts are text"), "-",
                source)]


def run_checks(model, only=None, progress=None) -> list[Row]:
    rows = []
    for name in only or CHECKS:
        started = time.perf_counter()
        rows += CHECKS[name](model)
        if progress:
            progress(f"{name}: {time.perf_counter() - started:.1f} s")
    return rows


def summary(rows: list[Row]) -> dict:
    counts = {MATCHES: 0, DIFFERS: 0, "n/a": 0}
    for row in rows:
        counts[row.status if row.status in (MATCHES, DIFFERS) else "n/a"] += 1
    return counts


def table(rows: list[Row]) -> str:
    """Measured beside published, one row per figure, then each row's tolerance and source."""
    lines = ["| # | figure | measured | published | status |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        cells = (str(i), row.name, row.measured, row.published, row.status)
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", "\\n") for c in cells) + " |")
    lines.append("")
    for i, row in enumerate(rows, 1):
        lines.append(f"[{i}] tolerance: {row.tolerance}; source: {row.source}"
                     + (f"; {row.detail}" if row.detail else ""))
    return "\n".join(lines)


def report(model, rows: list[Row], seconds: float) -> dict:
    import tinygpt

    c = model.config
    return {"model": model.source, "config": {"n_layer": c.n_layer, "n_head": c.n_head, "d_model": c.d_model,
                                              "vocab_size": c.vocab_size},
            "tinygpt": tinygpt.version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(seconds, 1), "summary": summary(rows), "rows": [dataclasses.asdict(r) for r in rows]}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=(
        "Run the checks whose published GPT-2 values are known and print measured beside published."))
    parser.add_argument("--model", default="gpt2", help="hub id or local checkpoint directory (default: gpt2)")
    parser.add_argument("--only", default=None, help=f"comma-separated checks among {','.join(CHECKS)}")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file (atomically)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any row differs")
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in CHECKS]
        if unknown or not args.only:
            parser.error(f"--only: unknown check {unknown[0] if unknown else '(none given)'!r}; choose from "
                         f"{', '.join(CHECKS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import tinygpt
    from tinygpt import files
    from tinygpt.errors import TinyGPTError
    from weights.hub import HubError

    try:
        if args.out is not None:
            files.check_output_file(args.out, "--out", suffixes=(".json",))
        model = tinygpt.load(args.model)
    except HubError as e:
        print(f"reproduce: the Hugging Face hub cannot provide {args.model!r}, so nothing was measured: {e}",
              file=sys.stderr)
        return EXIT_NO_HUB
    except TinyGPTError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    c = model.config
    print(f"reproduce: {model.source} ({c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, vocab "
          f"{c.vocab_size}), tinygpt {tinygpt.version()}", file=sys.stderr)
    started = time.perf_counter()
    rows = run_checks(model, args.only, progress=lambda line: print(f"  {line}", file=sys.stderr))
    seconds = time.perf_counter() - started
    print(table(rows))
    counts = summary(rows)
    print(f"\n{counts[MATCHES]} match, {counts[DIFFERS]} differ, {counts['n/a']} n/a ({seconds:.1f} s)")
    if args.out is not None:
        files.write_json(args.out, report(model, rows, seconds))
    return EXIT_DIFFERS if args.strict and counts[DIFFERS] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
