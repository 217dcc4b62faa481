"""`tinygpt generate`, `tinygpt tokens`, `tinygpt inspect`."""

from __future__ import annotations

import sys
import time

import numpy as np

from .common import (
    CLIError,
    add_json_arg,
    add_model_args,
    add_plot_arg,
    add_prompt_args,
    count,
    decode,
    load_model,
    natural,
    nonnegative,
    pieces,
    print_json,
    probability,
    prompt_ids,
    save_plot,
    seed,
    table,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a prompt (streams tokens as they come)",
        description="Continue PROMPT with the model, using a key-value cache; the whole continuation runs as "
        "one compiled program and tokens are printed as they are produced. Temperature 0 is greedy.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("-n", "--max-new-tokens", type=count, default=60, help="tokens to generate (default 60)")
    p.add_argument("--temperature", type=nonnegative, default=1.0,
                   help="sampling temperature; 0 = greedy (default 1.0, as tinygpt.generate's)")
    p.add_argument("--top-k", type=count, default=None, help="sample among the k most probable tokens")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--prompt-lookup", type=natural, default=0, metavar="K",
                   help="greedy only (--temperature 0): draft K tokens by prompt lookup and verify them in one "
                   "pass; the same tokens in fewer passes where text repeats, printed when complete (default off)")
    add_plot_arg(p, "save the probability the model gave each generated token")
    add_json_arg(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "tokens", help="show how a text is tokenised (ids and pieces)",
        description="Tokenise TEXT with the model's BPE tokenizer and show each token's id and piece.")
    p.add_argument("text", metavar="TEXT", help="text to tokenise")
    add_model_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_tokens)

    from tinygpt.sites import describe

    p = subparsers.add_parser(
        "inspect", help="every trace site's shape and per-layer statistics, and the top next tokens",
        description="Run PROMPT through the model keeping every site, and print each site's shape and, per "
        "layer, the mean L2 norm of its vectors, the max |value| and the index (last axis) where it occurs; then "
        "the most probable next tokens.\n\nSites:\n" + describe(),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--top", type=count, default=10, help="how many next-token predictions to show (default 10)")
    add_json_arg(p)
    p.set_defaults(func=cmd_inspect)


# ----------------------------------------------------------------------------------------------- generate


def cmd_generate(args) -> None:
    import tinygpt

    if args.prompt_lookup and args.temperature != 0:
        raise CLIError("--prompt-lookup verifies drafts against greedy choices: add --temperature 0")
    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    if len(ids) + args.max_new_tokens > model.config.n_ctx:
        raise CLIError(f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens exceeds the model's "
                       f"context n_ctx={model.config.n_ctx}; lower --max-new-tokens")
    stream = None if args.json else _Streamer(model, ids)
    if stream:
        stream.start()
    start = time.perf_counter()
    out = tinygpt.generate(model.params, model.config, np.asarray([ids]), args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           on_token=None if args.prompt_lookup else stream, prompt_lookup=args.prompt_lookup,
                           return_logits=bool(args.plot))
    new = np.asarray(out.tokens)[0].tolist()
    seconds = time.perf_counter() - start
    if args.json:
        print_json({"prompt_tokens": ids, "tokens": new, "text": decode(model, new),
                    "prompt": decode(model, ids), "passes": int(out.passes), "timing": {"seconds": seconds}})
    else:
        stream.finish(new)
    if args.plot:
        plot_generation(model, args, ids, new, np.asarray(out.logits, np.float64)[0])


def plot_generation(model, args, ids, new, logits) -> None:
    """The probability the model's distribution (before temperature, top-k, top-p) gave each chosen token."""
    from probes import plots

    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    chosen = np.exp(log_probs[np.arange(len(new)), new])
    sampling = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature:g}" + (
        f", top-k {args.top_k}" if args.top_k else "") + (f", top-p {args.top_p:g}" if args.top_p else "")
    save_plot(plots.generation(pieces(model, new), chosen, model=model.source, prompt=decode(model, ids),
                               sampling=sampling), args.plot)


class _Streamer:
    """Prints each new token's text as the compiled program produces it (holding back a partial UTF-8
    character until it is complete)."""

    def __init__(self, model, prompt):
        self.model, self.prompt, self.ids, self.printed, self.closed = model, prompt, [], "", False

    def write(self, text: str) -> None:
        """Print `text` now; once the reader has gone (`| head -1`), stop printing. The callback runs inside the
        compiled program, where an exception would surface as a JaxRuntimeError: none may escape it."""
        if self.closed:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            from . import _silence_stdout

            _silence_stdout()

    def start(self):
        self.write(decode(self.model, self.prompt))

    def __call__(self, step, ids):
        self.ids.append(int(ids[0]))
        text = decode(self.model, self.ids)
        if text.endswith("\ufffd") and self.model.tokenizer is not None:
            return  # wait for the rest of the character
        self.write(text[len(self.printed):] if self.model.tokenizer is not None else " " + text.split()[-1])
        self.printed = text

    def finish(self, new):
        import jax

        jax.effects_barrier()
        text = decode(self.model, new)
        if self.model.tokenizer is not None and len(text) > len(self.printed):
            self.write(text[len(self.printed):])
        elif self.model.tokenizer is None and not self.ids:  # nothing streamed (prompt lookup): all of it now
            self.write(" " + text)
        self.write("\n")


# ------------------------------------------------------------------------------------------------- tokens


def cmd_tokens(args) -> None:
    model = load_model(args)
    if model.tokenizer is None:
        raise CLIError(f"model {model.source!r} has no tokenizer (vocab.json/merges.txt)")
    ids = model.tokenizer.encode(args.text)
    parts = model.tokenizer.pieces(ids)
    if args.json:
        print_json({"tokens": ids, "pieces": parts})
        return
    print(table([[i, tid, repr(piece)] for i, (tid, piece) in enumerate(zip(ids, parts))],
                ["position", "id", "piece"]))
    print(f"{len(ids)} tokens, {len(args.text)} characters")


# ------------------------------------------------------------------------------------------------ inspect


def site_statistics(value: np.ndarray, per_layer: bool) -> list[dict]:
    """Per layer (or once for global sites): mean L2 norm over the last axis, max |value|, and the index on
    the last axis where max |value| occurs."""
    layers = value if per_layer else value[None]
    stats = []
    for i, v in enumerate(layers):
        v = np.asarray(v, np.float32)
        finite = np.where(np.isfinite(v), v, 0.0)
        flat = np.abs(finite).reshape(-1, v.shape[-1])
        stats.append({
            "layer": i if per_layer else None,
            "norm": float(np.linalg.norm(finite, axis=-1).mean()),
            "max_abs": float(flat.max()),
            "argmax_dim": int(np.unravel_index(flat.argmax(), flat.shape)[1]),
        })
    return stats


def inspect_prompt(model, ids, top: int = 10) -> dict:
    """The data `tinygpt inspect` shows: every site's shape and statistics, and the top next tokens."""
    import jax

    from tinygpt.sites import SITES

    trace = model(np.asarray([ids]))
    sites = {}
    for name, value in trace.items():
        value = np.asarray(value)
        sites[name] = {"shape": list(value.shape), "dims": (["layer"] if SITES[name].per_layer else [])
                       + list(SITES[name].shape), "stats": site_statistics(value, SITES[name].per_layer)}
    probs = np.asarray(jax.nn.softmax(trace.logits[0, -1]))
    best = np.argsort(-probs)[:top]
    return {
        "tokens": ids,
        "pieces": pieces(model, ids),
        "sites": sites,
        "top": [{"token": int(t), "piece": pieces(model, [t])[0], "probability": float(probs[t])} for t in best],
    }


def cmd_inspect(args) -> None:
    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    result = inspect_prompt(model, ids, args.top)
    if args.json:
        print_json(result)
        return
    print(f"{model}\nprompt: {result['pieces']}\n")
    rows = []
    for name, site in result["sites"].items():
        shape = "[" + ", ".join(f"{d}={n}" for d, n in zip(site["dims"], site["shape"])) + "]"
        for s in site["stats"]:
            rows.append([name if s["layer"] in (None, 0) else "", shape if s["layer"] in (None, 0) else "",
                         "" if s["layer"] is None else s["layer"], s["norm"], s["max_abs"], s["argmax_dim"]])
    print(table(rows, ["site", "shape", "layer", "norm", "max|value|", "argmax dim"]))
    print("\nnext token:")
    print(table([[repr(t["piece"]), t["token"], t["probability"]] for t in result["top"]],
                ["piece", "id", "probability"]))
