"""The trained organism's interpretability figures, measured with tinygpt's probes.

    python -m probes.organism_figures [DIR]       (default: the shipped organism, weights/organism_lm/)

`python -m weights.train_organism` trains the organism and records its Shakespeare loss; this module
measures what the organism's data call for and adds it to DIR/training.json's "results" (weights/ hands
back data and imports no probe, so the measuring lives here):

- fact recall: top-1 accuracy of the attribute after each held-out template (an unseen frame x phrase pair),
  over every fact; after the training templates; and after the novel templates worded outside the training
  grammar (`fact_recall`);
- induction: `probes.attention.induction_scores` of every head, and in-context copying (top-1 accuracy on
  the second copy of repeated random tokens) with the best head zero-ablated (`probes.ablation.ablate`),
  next to ablating each other head (`copying_figures`);
- causal tracing (`probes.tracing.causal_trace`, window 1) on recalled facts: the indirect effect of
  restoring resid_post, mlp_out and attn_out at each layer, averaged over prompts by ROME's position groups
  (`tracing_figures`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tinygpt.compiled import forward
from tinygpt.files import read_json, write_json
from weights import organisms
from weights import train_organism as to

from . import ablation, attention, tracing


def last_logits(params, config, prompts: list[dict], batch: int = 64) -> np.ndarray:
    """The next-token logits after each prompt: [n, vocab]. Prompts are right-padded (causal attention makes
    the padding irrelevant to the last real position) to one length per call, so one program compiles."""
    width = max(len(p["tokens"]) for p in prompts)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        tokens = np.zeros((batch, width), np.int32)
        ends = np.zeros(batch, np.int64)
        for row, p in enumerate(chunk):
            tokens[row, : len(p["tokens"])] = p["tokens"]
            ends[row] = len(p["tokens"]) - 1
        logits = np.asarray(forward(params, tokens, config, keep=("logits",)).logits)
        out.append(logits[np.arange(batch), ends][: len(chunk)])
    return np.concatenate(out)


def fact_recall(params, config, prompts: list[dict]) -> dict:
    """Top-1 accuracy of the attribute after each prompt: overall, per relation and per template; and the
    mean probability of the right attribute."""
    logits = last_logits(params, config, prompts)
    answers = np.asarray([p["answer"] for p in prompts])
    hit = logits.argmax(-1) == answers
    log_p = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    prob = np.exp(log_p[np.arange(len(prompts)), answers])

    def rate(select):
        select = np.asarray(select)
        return round(float(hit[select].mean()), 4)

    relations = sorted({p["relation"] for p in prompts})
    templates = list(dict.fromkeys(p["template"] for p in prompts))
    return {"top1": round(float(hit.mean()), 4), "mean_prob": round(float(prob.mean()), 4), "n": len(prompts),
            "by_relation": {r: rate([p["relation"] == r for p in prompts]) for r in relations},
            "by_template": {t: rate([p["template"] == t for p in prompts]) for t in templates},
            "hits": hit.tolist()}


def copying_accuracy(params, config, tokens: np.ndarray, *, layer=None, head=None) -> float:
    """Top-1 accuracy of predicting the second copy of repeated random tokens [batch, 2n] (targets n+1 .. 2n-1
    from positions n .. 2n-2), optionally with head (layer, head) zero-ablated."""
    from probes import ablation
    n = tokens.shape[1] // 2
    if layer is None:
        logits = forward(params, tokens, config, keep=("logits",)).logits
    else:
        logits = ablation.ablate(params, tokens, config, "z", layers=[layer], heads=[head]).logits
    predicted = np.asarray(logits)[:, n: 2 * n - 1].argmax(-1)
    return float((predicted == tokens[:, n + 1: 2 * n]).mean())


def copying_figures(params, config, *, n: int = 50, batch: int = 16, seed: int = 1) -> dict:
    """Induction scores of every head (`probes.attention.induction_scores`: 4 sequences of 50 random tokens
    repeated, seed 0), the best head, and in-context copying accuracy on `batch` other repeated sequences:
    intact, with the best head zero-ablated, and with each other head ablated."""
    scores = attention.induction_scores(params, config)
    layer, head = (int(i) for i in np.unravel_index(scores.argmax(), scores.shape))
    tokens = attention.repeated_random_tokens(config, n, batch, seed)
    others = {f"L{l}H{h}": round(copying_accuracy(params, config, tokens, layer=l, head=h), 4)
              for l in range(config.n_layer) for h in range(config.n_head) if (l, h) != (layer, head)}
    return {"induction_scores": np.round(scores, 4).tolist(), "best_head": [layer, head],
            "best_score": round(float(scores[layer, head]), 4),
            "copying": {"n": n, "batch": batch, "seed": seed,
                        "intact": round(copying_accuracy(params, config, tokens), 4),
                        "best_head_ablated": round(copying_accuracy(params, config, tokens, layer=layer, head=head), 4),
                        "other_heads_ablated": others}}


POSITION_GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
                   "further tokens", "last token")


def position_groups(seq: int, subject: list[int]) -> list[list[int]]:
    """ROME's six position groups for a prompt of `seq` tokens (some may be empty)."""
    first, last = subject[0], subject[-1]
    after = list(range(last + 1, seq - 1))
    return [[first], list(range(first + 1, last)), [last], after[:1], after[1:], [seq - 1]]


def tracing_figures(params, config, prompts: list[dict], *, window: int = 1, samples: int = 10) -> dict:
    """Causal tracing of each prompt (ROME's noise: 3 x the subject embeddings' std; `window` layers restored
    together), its indirect effects averaged over prompts in ROME's position groups: {kind: [group, layer]}.
    Only prompts the model answers right are traced (as ROME traces known facts)."""
    kinds = ("resid_post", "mlp_out", "attn_out")
    sums = {k: np.zeros((len(POSITION_GROUPS), config.n_layer)) for k in kinds}
    counts = np.zeros(len(POSITION_GROUPS))
    clean, corrupt = [], []
    for p in prompts:
        trace = tracing.causal_trace(params, np.asarray(p["tokens"], np.int32), config, p["subject_positions"],
                                     answer=p["answer"], kinds=kinds, window=window, samples=samples)
        clean.append(trace.clean_prob)
        corrupt.append(trace.corrupt_prob)
        groups = position_groups(len(p["tokens"]), p["subject_positions"])
        for kind in kinds:
            effect = trace.indirect_effect(kind)  # [layer, seq]
            for g, positions in enumerate(groups):
                if positions:
                    sums[kind][g] += effect[:, positions].mean(axis=1)
        counts += [bool(positions) for positions in groups]
    effects = {k: sums[k] / np.maximum(counts, 1)[:, None] for k in kinds}
    peaks = {}
    for kind, table in effects.items():
        g, layer = np.unravel_index(table.argmax(), table.shape)
        peaks[kind] = {"group": POSITION_GROUPS[g], "layer": int(layer), "effect": round(float(table[g, layer]), 4)}
    return {"n_prompts": len(prompts), "window": window, "samples": samples, "groups": list(POSITION_GROUPS),
            "clean_prob": round(float(np.mean(clean)), 4), "corrupt_prob": round(float(np.mean(corrupt)), 4),
            "indirect_effect": {k: np.round(v, 4).tolist() for k, v in effects.items()}, "peaks": peaks}


def measure(params, config, tokenizer, kb: dict, *, trace_prompts: int = 18, log=print) -> dict:
    """Every published figure but the Shakespeare loss: recall, induction and copying, causal tracing."""
    start = time.perf_counter()
    held_out = to.fact_prompts(tokenizer, kb, "held_out")
    recall = fact_recall(params, config, held_out)
    trained = fact_recall(params, config, to.fact_prompts(tokenizer, kb, "train"))
    novel = fact_recall(params, config, to.fact_prompts(tokenizer, kb, "novel"))
    log(f"fact recall, top-1: held-out templates {recall['top1']:.3f} ({recall['n']} prompts), training templates "
        f"{trained['top1']:.3f}, novel templates {novel['top1']:.3f}; held-out by relation {recall['by_relation']}")
    copying = copying_figures(params, config)
    log(f"best induction head L{copying['best_head'][0]}H{copying['best_head'][1]}, score {copying['best_score']:.3f}; "
        f"copying top-1 {copying['copying']['intact']:.3f}, with it ablated {copying['copying']['best_head_ablated']:.3f}")
    # trace the first recalled prompts of an evenly spaced sample of held-out prompts
    sample = [held_out[i] for i in np.linspace(0, len(held_out) - 1, 4 * trace_prompts).astype(int)]
    hits = set(np.flatnonzero(recall["hits"]).tolist())
    index = {id(p): i for i, p in enumerate(held_out)}
    known = [p for p in sample if index[id(p)] in hits][:trace_prompts]
    traced = tracing_figures(params, config, known) if known else {}
    if traced:
        log(f"causal tracing over {traced['n_prompts']} recalled prompts (window 1): peaks {traced['peaks']}")
    recall_summary = {k: v for k, v in recall.items() if k != "hits"}
    return {"fact_recall_held_out": recall_summary,
            "fact_recall_train_templates": {k: v for k, v in trained.items() if k != "hits"},
            "fact_recall_novel_templates": {k: v for k, v in novel.items() if k != "hits"},
            "induction": copying, "causal_tracing": traced, "measure_time_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> dict:
    """Measure the organism in DIR and add the figures to DIR/training.json's "results"."""
    import tinygpt

    parser = argparse.ArgumentParser(description="Measure the trained organism's interpretability figures.")
    parser.add_argument("directory", nargs="?", default=str(organisms.trained_path()),
                        help="the organism's directory (default: the shipped one)")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    model = tinygpt.load(directory)
    kb = read_json(directory / "facts.json", "the organism's facts.json")
    figures = measure(model.params, model.config, model.tokenizer, kb)
    record = read_json(directory / "training.json", "the organism's training.json")
    record["results"] = {**record.get("results", {}), **figures}
    write_json(directory / "training.json", record)
    return record


if __name__ == "__main__":
    main()
