"""Train the trained organism: a 4-layer GPT-2 on Shakespeare mixed with synthetic data whose mechanisms are
known by construction.

    python -m weights.train_organism [--steps N] [--out DIR] [--seed S] ...   (needs `pip install tinygpt[train]`)

The embedded model (`weights.train_tiny`) is a 2-layer Shakespeare model: it has no facts to recall and no
induction heads. This organism is trained by the same code (`train_tiny.train`: the same model, optimiser,
schedule and jit-compiled step) on a different batch source. Every batch of 16 windows of 129 tokens holds
(`--rows`, default 6,4,6; the shipped model's measured figures and what they show: docs/organisms.md):

1. Shakespeare (`SHAKESPEARE_ROWS` windows): random contiguous windows of the 35 training plays, tokenized
   by the embedded model's BPE (the organism reuses its vocab.json + merges.txt, so the same text gives the
   same ids). The three held-out plays are evaluated, never trained on.
2. Facts (`FACT_ROWS` windows): a knowledge base of `N_SUBJECTS` invented people (`make_knowledge_base`),
   each a first name and a last name made of vocabulary pieces (" Bel" + " Karven", five BPE tokens), with three
   attributes (`RELATIONS`: where they live, what they are, what they love), each attribute value a single
   token of the vocabulary (" Rome", " knight", " sword"). First names are shared by four subjects and last
   names by two, so no single name token identifies a subject: the pair does. A fact window is
   `<|endoftext|>` then statements separated by newlines, each one fact in one of the relation's training
   templates (" Bel Karven dwells in Rome."); every statement opens with a space so that the subject's
   tokens are the same in every template. The templates are a frame (" They say {s} ...") around a phrase of
   the relation (" dwells in"): every frame x phrase pair is one (`template_split`). A fixed eighth of the pairs
   is held out, chosen so that each frame and each phrase is trained in other pairs: recall on them asks for
   the fact in a combination training never showed (as ROME's paraphrase prompts put unseen text before a
   statement). Recall after templates worded outside the grammar (`NOVEL`) is measured too.
3. Repeated spans (`INDUCTION_ROWS` windows): spans of 8-64 tokens, each followed at once by itself, until the
   window is full. A span is uniformly random tokens, or (with probability `TEXT_SPAN_SHARE`, `--text-spans`)
   a contiguous excerpt of the Shakespeare training stream. The second copy is predictable only by looking
   back for the previous occurrence of the current token and copying what followed it: an induction head.
   Random spans ask for exactly that; excerpts give the same task on tokens whose statistics the model
   already learns from the text, which is where induction heads first form in language models.

Everything derives from `--seed`: the knowledge base and its template split (`make_knowledge_base(seed)`),
the initialisation, and the batches (one numpy Generator draws the rows of every kind in a fixed order).

After training it records in training.json the held-out Shakespeare loss vs the unigram baseline
(`train_tiny.make_eval`, `train_tiny.unigram_baseline`). The figures that need tinygpt's probes (fact
recall, induction and copying, causal tracing) are measured by `python -m probes.organism_figures DIR`
(weights/ hands back data and imports no probe), which adds them to training.json's "results".

Output (default `weights/organism_lm/`): config.json + model.safetensors (`weights.write`), vocab.json +
merges.txt (copied from `weights/embedded/`), facts.json (the knowledge base and the template split) and
training.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from tinygpt.errors import InputError

from . import train_tiny as tt

DEFAULT_OUT = Path(__file__).resolve().parent / "organism_lm"
EMBEDDED = Path(__file__).resolve().parent / "embedded"

# The model: twice the embedded model's depth (enough layers for a previous-token head, an induction head and a
# fact lookup to sit in different layers), the same width and vocabulary.
ORGANISM_DEFAULTS = dict(n_layer=4, n_head=4, d_model=128, n_ctx=128, vocab_size=2048, steps=8000, batch_size=16,
                         lr=3e-3, warmup_steps=150, eval_every=500)

# Rows of each kind in a batch of 16 windows.
SHAKESPEARE_ROWS, FACT_ROWS, INDUCTION_ROWS = 6, 4, 6
SPAN_LENGTHS = (8, 64)  # repeated spans: length drawn uniformly from this closed range
TEXT_SPAN_SHARE = 0.5  # the share of repeated spans that are Shakespeare excerpts (the rest: random tokens)

N_SUBJECTS, N_FIRST, N_LAST = 200, 50, 100

# Attribute values: single tokens of the embedded BPE vocabulary (checked by `make_knowledge_base`).
RELATIONS = {
    "home": (" Rome", " York", " France", " England", " Warwick", " court", " town", " prison"),
    "rank": (" king", " queen", " fool", " knight", " duke", " lord", " lady", " prince", " knave", " villain"),
    "love": (" gold", " horse", " sword", " crown", " music", " money", " letter", " honour"),
}

# Templates are a small grammar: a frame ("{s}" the subject, "{p}" the phrase) around one of the relation's
# phrases, the attribute following the phrase. Every frame x phrase pair is a template; the held-out ones are
# the pairs with (frame + 3 * phrase) % len(FRAMES) == 0: one frame for each phrase, one or two phrases for each
# frame, so every frame and every phrase is trained with other partners and each held-out template is a
# combination training never saw. NOVEL templates are worded outside the grammar (a frame or a phrase that no
# template of training has): recall on them measures more than recombination (published beside the held-out
# figure, not a goal).
FRAMES = (" {s} {p}", " They say {s} {p}", " Everyone says that {s} {p}", " I know that {s} {p}",
          " It is true that {s} {p}", " In the old tale, {s} {p}", " Some believe {s} {p}",
          " As all men know, {s} {p}")
PHRASES = {
    "home": ("lives in", "dwells in", "was born in", "resides in", "comes from", "grew up in",
             "has always lived in", "makes a home in", "now lives in"),
    "rank": ("is a", "works as a", "was made a", "serves as a", "became a", "was once a", "has always been a",
             "is known as a", "is now a"),
    "love": ("loves", "dearly loves", "longs for", "dreams of", "cares most for", "has always loved",
             "truly loves", "speaks often of", "would die for"),
}
NOVEL = {
    "home": (" {s} has settled in", " The home of {s} is in"),
    "rank": (" {s} was born a", " By trade, {s} is a"),
    "love": (" {s} sighs for", " What {s} loves most is"),
}


def held_out_pair(frame: int, phrase: int) -> bool:
    """Whether the template of FRAMES[frame] x PHRASES[relation][phrase] is held out of training."""
    return (frame + 3 * phrase) % len(FRAMES) == 0


def template_split(relation: str) -> dict[str, list[str]]:
    """The relation's templates: {"held_out": [...], "train": [...], "novel": [...]}, each with "{s}"."""
    split = {"held_out": [], "train": [], "novel": list(NOVEL[relation])}
    for f, frame in enumerate(FRAMES):
        for q, phrase in enumerate(PHRASES[relation]):
            split["held_out" if held_out_pair(f, q) else "train"].append(frame.replace("{p}", phrase))
    return split


# Invented names are built from tokens of the vocabulary, so each name has a known number of tokens: a
# capital letter (" B"), a piece opening with a vowel ("el") and, for last names, a piece opening with a
# consonant ("ven"). First names have two tokens (" Bel"), last names three (" Karven"): every subject is
# five tokens, first / three middle / last as ROME's position groups count them.
LETTERS = ("B", "C", "D", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W")
VOWEL_PIECES = ("ab", "ad", "al", "am", "an", "ar", "as", "av", "az", "ed", "el", "em", "en", "er", "es", "et",
                "ic", "id", "il", "im", "in", "ir", "is", "it", "ix", "od", "ol", "om", "on", "or", "os", "ot",
                "ud", "ul", "um", "un", "ur", "us", "ut")
CONSONANT_PIECES = ("ber", "der", "dom", "gel", "ger", "ken", "les", "man", "mer", "ner", "pen", "per", "ran",
                    "rel", "ren", "ret", "rom", "sel", "ter", "tun", "vel", "ven", "ver", "vil")


# ------------------------------------------------------------------------------------- knowledge base


def _name(rng: np.random.Generator, last: bool) -> tuple[str, int]:
    """An invented name and the number of tokens it should have after a space."""
    name = LETTERS[rng.integers(len(LETTERS))] + VOWEL_PIECES[rng.integers(len(VOWEL_PIECES))]
    if last:
        name += CONSONANT_PIECES[rng.integers(len(CONSONANT_PIECES))]
    return name, 3 if last else 2


def make_knowledge_base(seed: int = 0) -> dict:
    """The invented knowledge base, a pure function of `seed` (and of the embedded vocabulary): subjects with one value per relation, and each
    relation's templates split into held-out and training. Plain JSON data (written as facts.json)."""
    tokenizer = load_tokenizer()
    rng = np.random.default_rng([seed, 21])
    names: set[str] = set()

    def fresh(last: bool) -> str:
        while True:  # a new name that tokenizes into the intended pieces (no merge across them)
            name, n_tokens = _name(rng, last)
            if name not in names and len(tokenizer.encode(" " + name)) == n_tokens:
                names.add(name)
                return name

    firsts = [fresh(False) for _ in range(N_FIRST)]
    lasts = [fresh(True) for _ in range(N_LAST)]
    # Each first name in N_SUBJECTS / N_FIRST subjects, each last name in N_SUBJECTS / N_LAST, no pair twice.
    while True:
        first_ids = rng.permutation(np.repeat(np.arange(N_FIRST), N_SUBJECTS // N_FIRST))
        last_ids = rng.permutation(np.repeat(np.arange(N_LAST), N_SUBJECTS // N_LAST))
        if len(set(zip(first_ids.tolist(), last_ids.tolist()))) == N_SUBJECTS:
            break
    subjects = []
    for f, l in zip(first_ids.tolist(), last_ids.tolist()):
        values = {relation: options[int(rng.integers(len(options)))] for relation, options in RELATIONS.items()}
        subjects.append({"name": f"{firsts[f]} {lasts[l]}", **values})
    templates = {relation: template_split(relation) for relation in RELATIONS}
    return {"seed": seed, "relations": {r: list(v) for r, v in RELATIONS.items()}, "templates": templates,
            "subjects": subjects}


def encode_statement(tokenizer, template: str, subject: str) -> tuple[list[int], list[int]]:
    """(token ids of the template filled with `subject`, the subject's positions in them). The template is
    encoded in its three pieces (text before the subject, the subject, text after), which equals encoding
    the whole because every piece starts with a space (GPT-2's pre-tokenisation splits there)."""
    before, after = template.split("{s}")
    if not before.endswith(" "):
        raise InputError(f"template {template!r}: the subject must follow a space")
    head, subj, tail = tokenizer.encode(before[:-1]), tokenizer.encode(" " + subject), tokenizer.encode(after)
    ids = head + subj + tail
    if ids != tokenizer.encode(template.format(s=subject)):
        raise InputError(f"template {template!r} does not tokenize in pieces for {subject!r}")
    return ids, list(range(len(head), len(head) + len(subj)))


def fact_prompts(tokenizer, kb: dict, split: str = "held_out", *, limit: int | None = None):
    """Every (fact, template) of `split` as a prompt for recall: a list of dicts with `tokens` (int list,
    `<|endoftext|>` first, as a fact window starts), `subject_positions`, `answer` (the attribute's id),
    `subject`, `relation`, `template`. Ordered template by template; `limit` keeps an evenly spaced sample."""
    prompts = []
    for relation, split_templates in kb["templates"].items():
        for template in split_templates[split]:
            for subject in kb["subjects"]:
                ids, positions = encode_statement(tokenizer, template, subject["name"])
                answer = tokenizer.encode(subject[relation])
                prompts.append({"tokens": [tokenizer.eos_id] + ids, "subject_positions": [p + 1 for p in positions],
                                "answer": answer[0], "subject": subject["name"], "relation": relation,
                                "template": template})
    if limit is not None and limit < len(prompts):
        prompts = [prompts[i] for i in np.linspace(0, len(prompts) - 1, limit).astype(int)]
    return prompts


class MixedBatches:
    """The batch source: `draw(rng)` -> [16, n_ctx + 1] int32, rows in a fixed order (Shakespeare, facts,
    repeated spans). Deterministic given the Generator's state."""

    def __init__(self, tokenizer, kb: dict, shakespeare: np.ndarray, length: int, *,
                 rows: tuple[int, int, int] = (SHAKESPEARE_ROWS, FACT_ROWS, INDUCTION_ROWS), span_copies: int = 2,
                 text_spans: float = TEXT_SPAN_SHARE):
        self.shakespeare, self.length, self.rows, self.span_copies = shakespeare, length, rows, span_copies
        self.text_spans = text_spans
        self.eos, self.vocab_size = tokenizer.eos_id, tokenizer.vocab_size
        self.newline = tokenizer.encode("\n")
        statements = []  # every training (fact, template) pair, tokenized, ending "<value>.\n"
        for relation, split_templates in kb["templates"].items():
            for template in split_templates["train"]:
                for subject in kb["subjects"]:
                    ids, _ = encode_statement(tokenizer, template + subject[relation] + ".", subject["name"])
                    statements.append(np.asarray(ids + self.newline, np.int32))
        self.statements = statements
        for relation, values in kb["relations"].items():
            for value in values:
                if len(tokenizer.encode(value)) != 1:
                    raise InputError(f"attribute {value!r} of {relation!r} is not one token")

    def fact_window(self, rng: np.random.Generator) -> np.ndarray:
        parts, n = [np.asarray([self.eos], np.int32)], 1
        while n < self.length:
            s = self.statements[int(rng.integers(len(self.statements)))]
            parts.append(s)
            n += len(s)
        return np.concatenate(parts)[: self.length]

    def span_window(self, rng: np.random.Generator) -> np.ndarray:
        parts, n = [], 0
        while n < self.length:
            n_span = int(rng.integers(SPAN_LENGTHS[0], SPAN_LENGTHS[1] + 1))
            if rng.random() < self.text_spans:  # an excerpt of the text
                start = int(rng.integers(0, len(self.shakespeare) - n_span))
                span = self.shakespeare[start: start + n_span]
            else:  # random tokens
                span = rng.integers(0, self.vocab_size, n_span)
            copies = 2 if self.span_copies == 2 else int(rng.integers(2, self.span_copies + 1))
            parts += [span] * copies
            n += copies * len(span)
        return np.concatenate(parts)[: self.length].astype(np.int32)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        n_text, n_facts, n_spans = self.rows
        text = tt.random_windows(rng, self.shakespeare, n_text, self.length)
        facts = [self.fact_window(rng) for _ in range(n_facts)]
        spans = [self.span_window(rng) for _ in range(n_spans)]
        return np.concatenate([text, np.stack(facts + spans)]).astype(np.int32)


def load_tokenizer(directory: Path = EMBEDDED):
    from tinygpt.tokenizer import Tokenizer

    return Tokenizer.from_files(Path(directory) / "vocab.json", Path(directory) / "merges.txt")


def shakespeare_streams(tokenizer):
    """(train stream, held-out stream, corpus info), as train_tiny makes them, with the embedded tokenizer."""
    from . import corpus

    train_plays, val_plays = corpus.split()
    info = {"train_chars": sum(len(t) for t in train_plays.values()),
            "val_chars": sum(len(t) for t in val_plays.values()), "held_out_plays": list(val_plays)}
    return tt.token_stream(tokenizer, train_plays.values()), tt.token_stream(tokenizer, val_plays.values()), info


# -------------------------------------------------------------------------------------------- the run


def parse_args(argv=None):
    parser = tt.config_parser(tt.TrainConfig(**ORGANISM_DEFAULTS), "Train tinygpt's trained organism (Shakespeare "
                              "+ invented facts + repeated spans).", DEFAULT_OUT)
    parser.add_argument("--rows", default=f"{SHAKESPEARE_ROWS},{FACT_ROWS},{INDUCTION_ROWS}",
                        help="rows per batch of Shakespeare, facts and repeated spans, summing to --batch-size "
                             f"(default {SHAKESPEARE_ROWS},{FACT_ROWS},{INDUCTION_ROWS})")
    parser.add_argument("--span-copies", type=int, default=2,
                        help="each random span appears 2 to this many times in a row (default 2)")
    parser.add_argument("--text-spans", type=float, default=TEXT_SPAN_SHARE, metavar="SHARE",
                        help="the share of repeated spans that are Shakespeare excerpts rather than random tokens "
                             f"(default {TEXT_SPAN_SHARE})")
    args = parser.parse_args(argv)
    if not 0.0 <= args.text_spans <= 1.0:
        parser.error(f"--text-spans takes a share between 0 and 1, got {args.text_spans}")
    args.rows = tuple(int(r) for r in args.rows.split(","))
    tc = tt.config_from_args(args)
    if len(args.rows) != 3 or sum(args.rows) != tc.batch_size:
        parser.error(f"--rows takes three counts summing to --batch-size {tc.batch_size}, got {args.rows}")
    return tc, args


def main(argv=None) -> dict:
    import weights
    from tinygpt.params import n_params

    tc, args = parse_args(argv)
    wall_start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {tc}", flush=True)
    tokenizer = load_tokenizer()
    train_stream, val_stream, corpus_info = shakespeare_streams(tokenizer)
    kb = make_knowledge_base(tc.seed)
    batches = MixedBatches(tokenizer, kb, train_stream, tc.n_ctx + 1, rows=args.rows,
                           span_copies=args.span_copies, text_spans=args.text_spans)
    print(f"data: {len(train_stream):,} Shakespeare training tokens; {len(kb['subjects'])} subjects x "
          f"{len(RELATIONS)} relations, {len(batches.statements):,} training statements; rows per batch "
          f"{args.rows[0]} text / {args.rows[1]} facts / {args.rows[2]} repeated spans", flush=True)
    config, params, history = tt.train(tc, train_stream, val_stream, tokenizer.vocab_size,
                                       progress=not args.no_progress, draw=batches)

    val_windows = tt.tiled_windows(val_stream, tc.n_ctx + 1)
    val_loss = tt.make_eval(config, tc.batch_size)(params, val_windows)
    baseline = tt.unigram_baseline(train_stream, val_windows[:, 1:].ravel(), tokenizer.vocab_size)
    print(f"held-out Shakespeare loss {val_loss:.4f} vs unigram {baseline:.4f} (ratio {val_loss / baseline:.3f})",
          flush=True)
    out = args.out
    weights.write(out, config, params)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(EMBEDDED / name, out / name)
    (out / "facts.json").write_text(json.dumps(kb, indent=1) + "\n")
    shipped = sum((out / n).stat().st_size for n in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                                                      "facts.json"))
    tokens_seen = tc.steps * tc.batch_size * tc.n_ctx
    record = {
        "hyperparameters": dataclasses.asdict(tc),
        "seed": tc.seed,
        "command": "python -m weights.train_organism" + (" " + " ".join(argv) if argv else ""),
        "model": {"n_layer": config.n_layer, "n_head": config.n_head, "d_model": config.d_model,
                  "d_mlp": config.d_mlp, "n_ctx": config.n_ctx, "vocab_size": config.vocab_size,
                  "n_params": n_params(params)},
        "data": {**corpus_info, "tokenizer": "weights/embedded (vocab.json + merges.txt)",
                 "rows_per_batch": {"shakespeare": args.rows[0], "facts": args.rows[1],
                                    "repeated_spans": args.rows[2]},
                 "span_lengths": list(SPAN_LENGTHS), "span_copies": [2, args.span_copies],
                 "text_span_share": args.text_spans, "subjects": len(kb["subjects"]),
                 "facts": len(kb["subjects"]) * len(RELATIONS), "training_statements": len(batches.statements),
                 "train_tokens": int(len(train_stream)), "val_tokens": int(len(val_stream)),
                 "tokens_seen": tokens_seen,
                 "shakespeare_epochs": round(tokens_seen * args.rows[0] / tc.batch_size / len(train_stream), 2)},
        "results": {"val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
                    "unigram_val_loss": round(baseline, 4), "val_over_unigram": round(val_loss / baseline, 4)},
        "history": history,
        "wall_time_s": round(time.perf_counter() - wall_start, 1),
        "checkpoint_bytes": shipped,
        "environment": tt.environment(),
    }
    record = tt.write_record(out, record)
    print(f"measure the interpretability figures with: python -m probes.organism_figures {out}", flush=True)
    return record


if __name__ == "__main__":
    main()
