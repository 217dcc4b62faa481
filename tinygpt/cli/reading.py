"""Reading probes: `tinygpt lens`, `tunedlens train|eval`, `patchscope`, `attribute`, `neuron`, `svd`, `steer`,
`attention`. Each parses its arguments, calls a probe in `probes/`, and renders the result (a table, --json,
a --plot image)."""

from __future__ import annotations

import numpy as np

from .common import (
    CLIError,
    InterruptLatch,
    add_json_arg,
    add_model_args,
    add_plot_arg,
    add_prompt_args,
    add_token_arg,
    cli_message,
    count,
    decode,
    integer,
    load_model,
    natural,
    nonnegative,
    parse_token_list,
    pieces,
    positive,
    print_json,
    probe_errors,
    prompt_ids,
    real,
    save_plot,
    seed,
    table,
    token_arg,
)

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


def register(subparsers) -> None:
    register_lens(subparsers)
    register_tuned_lens(subparsers)
    register_patchscope(subparsers)
    register_attribute(subparsers)
    register_neuron(subparsers)
    register_svd(subparsers)
    register_steer(subparsers)
    register_attention(subparsers)


# ------------------------------------------------------------------------------------------------ helpers




def layer_list(text: str | None, config, flag: str = "--layers") -> list[int] | None:
    """'all' / None -> None (every layer); '0,2' -> [0, 2], checked against the model."""
    if text is None or text == "all":
        return None
    layers = parse_token_list(text, flag) if text else []
    for layer in layers:
        if not 0 <= layer < config.n_layer:
            raise CLIError(f"{flag}: layer {layer} is out of range (the model has {config.n_layer} layers, 0-based)")
    return layers


def check_layer(layer: int, config, flag: str = "--layer") -> int:
    if not 0 <= layer < config.n_layer:
        raise CLIError(f"{flag} {layer} is out of range: the model has {config.n_layer} layers (0-based)")
    return layer


def check_position(position: int, length: int, flag: str = "--position") -> int:
    if not -length <= position < length:
        raise CLIError(f"{flag} {position} is outside the prompt of {length} tokens")
    return position % length


def piece(model, token_id) -> str:
    return pieces(model, [int(token_id)])[0]


def token_pairs(model, pairs) -> list[dict]:
    return [{"token": int(t), "piece": piece(model, t), "value": float(v)} for t, v in pairs]


# -------------------------------------------------------------------------------------------------- lens


def register_lens(subparsers) -> None:
    p = subparsers.add_parser(
        "lens", help="logit lens: what each layer's residual stream predicts, at every position",
        description="Read each block's residual stream (resid_pre, resid_mid, resid_post) through the final "
        "LayerNorm and the unembedding, at every position: the top tokens, their probability, the KL divergence "
        "from the model's final distribution, and a target token's probability and rank. With --tuned, the tuned "
        "lens (block inputs, resid_pre) from `tinygpt tunedlens train`.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--site", default="all", choices=["all", *RESID_SITES],
                   help="residual site(s) to read (default all)")
    p.add_argument("--top", type=count, default=5, help="top tokens per cell in --json (default 5)")
    add_token_arg(p, "target", "a token whose probability and rank to report")
    p.add_argument("--tuned", default=None, metavar="PATH", help="a tuned lens (.safetensors) to read with instead")
    add_plot_arg(p, "save a layer x position grid image")
    add_json_arg(p)
    p.set_defaults(func=cmd_lens)


def cmd_lens(args) -> None:
    from probes.lens import LENS_SITES, logit_lens

    if args.top < 1:
        raise CLIError("--top must be at least 1")
    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    target = token_arg(model, args.target, args.target_id, "target")
    tokens = np.asarray([ids])
    if args.tuned:
        from probes.tuned_lens import tuned_lens

        if args.site not in ("all", "resid_pre"):
            raise CLIError("the tuned lens reads block inputs: --site must be resid_pre (or left out) with --tuned")
        result = tuned_lens(model.params, model.config, load_lens(args.tuned, model.config, model.params), tokens,
                            target=target, k=args.top)
    else:
        sites = LENS_SITES if args.site == "all" else (args.site,)
        result = logit_lens(model.params, model.config, tokens, sites=sites, target=target, k=args.top)
    rows = result.rows()
    final = [{"position": pos, "top": [[int(t), float(q)] for t, q in zip(result.final_top_ids[0, pos],
                                                                          result.final_top_probs[0, pos])]}
             for pos in range(len(ids))]
    if args.plot:
        plot_lens(model, result, ids, args)
    if args.json:
        print_json({"lens": "tuned" if args.tuned else "logit", "tokens": ids, "pieces": pieces(model, ids),
                    "sites": list(result.sites), "target": target, "rows": rows, "final": final})
        return
    print(f"{model}\n{'tuned' if args.tuned else 'logit'} lens; cell: top token (probability); "
          f"kl: KL(final || lens) at the last position, nats\n")
    print(lens_table(model, result, ids))
    if target is not None:
        last = [r for r in rows if r["position"] == len(ids) - 1]
        print(f"\ntarget {piece(model, target)!r} (id {target}) at the last position:")
        print(table([[r["layer"], r["site"], r["target_prob"], r["target_rank"]] for r in last],
                    ["layer", "site", "probability", "rank"]))


def lens_table(model, result, ids) -> str:
    seq = len(ids)
    header = ["layer", "site", *[f"{i}:{p!r}" for i, p in enumerate(pieces(model, ids))], "kl"]
    rows = []
    n_site, n_layer = result.top_ids.shape[:2]
    for layer in range(n_layer):
        for s in range(n_site):
            cells = [top_cell(model, result.top_ids[s, layer, 0, pos, 0], result.top_probs[s, layer, 0, pos, 0])
                     for pos in range(seq)]
            rows.append([layer, result.sites[s], *cells, float(result.kl[s, layer, 0, -1])])
    model_cells = [top_cell(model, result.final_top_ids[0, pos, 0], result.final_top_probs[0, pos, 0])
                   for pos in range(seq)]
    rows.append(["model", "logits", *model_cells, 0.0])
    return table(rows, header)


def top_cell(model, token_id, probability) -> str:
    return f"{piece(model, token_id)!r} {probability:.2f}"


def plot_lens(model, result, ids, args) -> None:
    from probes import plots

    top_ids = np.asarray(result.top_ids)[:, :, 0, :, 0]  # [site, layer, seq]
    top_pieces = np.asarray([piece(model, t) for t in top_ids.ravel()], dtype=object).reshape(top_ids.shape)
    target = token_arg(model, args.target, args.target_id, "target")
    save_plot(plots.logit_lens(result, pieces(model, ids), top_pieces, tuned=bool(args.tuned), model=model.source,
                               target=None if target is None else piece(model, target),
                               prompt=decode(model, ids)), args.plot)


# ---------------------------------------------------------------------------------------------- tunedlens


def register_tuned_lens(subparsers) -> None:
    p = subparsers.add_parser(
        "tunedlens", help="train or evaluate a tuned lens (per-layer affine translators)",
        description="A tuned lens maps block l's input h to h + h A_l + b_l before the logit lens; `train` fits A, "
        "b to minimise KL(final || lens) on a token stream and saves them (safetensors); `eval` compares it with "
        "the logit lens per layer (KL and perplexity). The default stream for the embedded model is its corpus: "
        "the training plays for `train`, the held-out plays for `eval`; other models need --text or --stream.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    train = sub.add_parser("train", help="train translators and save them",
                           description="Train tuned-lens translators with Adam on random windows of a token stream. "
                           "--out is replaced only when training completes (Ctrl-C leaves it as it was); --json "
                           "reports the wall time under 'timing', the one key that differs between identical runs.")
    add_stream_args(train)
    add_model_args(train)
    train.add_argument("--out", required=True, metavar="PATH", help="where to save the translators (.safetensors)")
    train.add_argument("--steps", type=count, default=300, help="optimisation steps (default 300)")
    train.add_argument("--batch", type=count, default=8, help="windows per step (default 8)")
    train.add_argument("--seq", type=count, default=64, help="window length in tokens (default 64)")
    train.add_argument("--lr", type=positive, default=1e-3, help="Adam learning rate (default 1e-3)")
    train.add_argument("--seed", type=seed, default=0, help="seed of the window sampling (default 0)")
    add_json_arg(train)
    train.set_defaults(func=cmd_tuned_lens_train)

    ev = sub.add_parser("eval", help="compare a tuned lens with the logit lens",
                        description="Per layer, KL(final || lens) and next-token perplexity of the logit lens and "
                        "the tuned lens on non-overlapping windows of a token stream.")
    add_stream_args(ev)
    add_model_args(ev)
    ev.add_argument("--lens", required=True, metavar="PATH", help="translators saved by `tunedlens train`")
    ev.add_argument("--seq", type=count, default=64, help="window length in tokens (default 64)")
    ev.add_argument("--windows", type=count, default=64, help="at most this many windows (default 64)")
    add_json_arg(ev)
    ev.set_defaults(func=cmd_tuned_lens_eval)
    p.set_defaults(func=cmd_tuned_lens_no_action)


def cmd_tuned_lens_no_action(args) -> None:
    raise CLIError("choose an action: tinygpt tunedlens train ... or tinygpt tunedlens eval ...")


def add_stream_args(parser) -> None:
    parser.add_argument("--text", default=None, metavar="FILE", help="a UTF-8 text file to tokenise")
    parser.add_argument("--stream", default=None, metavar="IDS", help="comma-separated token ids instead of --text")
    parser.add_argument("--max-chars", type=count, default=300_000,
                        help="use at most this many characters of text (default 300000)")


def stream_of(model, args, split: str) -> np.ndarray:
    """The token stream of --stream, --text, or (embedded model) the corpus split `split` ("train"/"held_out")."""
    from probes.tuned_lens import token_stream

    if args.stream is not None and args.text is not None:
        raise CLIError("give either --text or --stream, not both")
    if args.stream is not None:
        ids = parse_token_list(args.stream, "--stream")
        if max(ids) >= model.config.vocab_size or min(ids) < 0:
            raise CLIError(f"--stream has ids outside the vocabulary [0, {model.config.vocab_size})")
        return np.asarray(ids, np.int32)
    if args.text is None and model.source != "embedded":
        raise CLIError(f"give a token stream with --text FILE or --stream IDS (only the embedded model has a "
                       f"default corpus; this is {model.source!r})")
    if model.tokenizer is None:
        raise CLIError(f"model {model.source!r} has no tokenizer: use --stream IDS")
    if args.text is not None:
        from probes.harvest import read_text

        texts = [read_text(args.text, "--text", error=CLIError)]
    else:
        texts = corpus_texts(split)
    return token_stream(model.tokenizer, texts, args.max_chars)


def corpus_texts(split: str) -> list[str]:
    """The embedded model's corpus plays, "train" or "held_out" (`weights.corpus`)."""
    from weights import corpus

    try:
        train, held_out = corpus.split()
    except corpus.CorpusError as e:
        raise CLIError(str(e)) from None
    return list((train if split == "train" else held_out).values())


def load_lens(path: str, config, params=None) -> dict:
    """The tuned lens at `path`, checked against the model (its config; its fingerprint given `params`)."""
    from probes.tuned_lens import TunedLensError, load_translators

    try:
        return load_translators(path, config, params)
    except TunedLensError as e:
        raise CLIError(str(e)) from None


TUNED_LENS_FLAGS = {"steps": "--steps", "batch": "--batch", "seq": "--seq", "lr": "--lr"}


@probe_errors(flags=TUNED_LENS_FLAGS)
def cmd_tuned_lens_train(args) -> None:
    """Holds --out's writer lock throughout; writes --out only after the whole training ran uninterrupted.
    --json keeps the run's wall time under "timing" (the one field two identical runs differ in)."""
    import time

    from probes.tuned_lens import save_translators, train_tuned_lens
    from tinygpt.files import check_output_file, remove_own_temporaries, writer_lock

    out = check_output_file(args.out, "--out")
    with writer_lock(out, "--out"), InterruptLatch() as latch:
        remove_own_temporaries(out)
        model = load_model(args)
        stream = stream_of(model, args, "train")
        start = time.perf_counter()
        trained = train_tuned_lens(model.params, model.config, stream, steps=args.steps, batch=args.batch,
                                   seq=args.seq, lr=args.lr, seed=args.seed, progress=not args.json,
                                   on_step=latch.check)
        seconds = time.perf_counter() - start
        latch.check()
        save_translators(out, trained.translators, model.config, params=model.params, model=model.source,
                         steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
                         stream_tokens=len(stream))
    losses = trained.losses
    tail = max(1, len(losses) // 10)
    result = {"out": args.out, "steps": args.steps, "stream_tokens": int(len(stream)), "first_loss": float(losses[0]),
              "final_loss": float(losses[-tail:].mean()), "timing": {"seconds": seconds}}
    if args.json:
        print_json(result)
        return
    print(f"trained {args.steps} steps on {len(stream):,} tokens in {seconds:.1f}s: mean KL over layers "
          f"{result['first_loss']:.4f} -> {result['final_loss']:.4f} nats (last {tail} steps); wrote {args.out}")


@probe_errors(flags={"seq": "--seq"})
def cmd_tuned_lens_eval(args) -> None:
    from probes.tuned_lens import evaluate_lenses

    model = load_model(args)
    translators = load_lens(args.lens, model.config, model.params)
    stream = stream_of(model, args, "held_out")
    result = evaluate_lenses(model.params, model.config, translators, stream, seq=args.seq, max_windows=args.windows)
    if args.json:
        print_json({"rows": result.rows(), "ppl_model": result.ppl_model, "n_tokens": result.n_tokens})
        return
    print(f"{model}\nper layer (block input, resid_pre) on {result.n_tokens:,} tokens; model perplexity "
          f"{result.ppl_model:.2f}\n")
    print(table([[r["layer"], r["kl_logit"], r["kl_tuned"], r["ppl_logit"], r["ppl_tuned"]] for r in result.rows()],
                ["layer", "KL logit lens", "KL tuned lens", "ppl logit lens", "ppl tuned lens"]))


# ---------------------------------------------------------------------------------------------- patchscope


def register_patchscope(subparsers) -> None:
    from probes.patchscope import IDENTITY_PROMPT

    p = subparsers.add_parser(
        "patchscope", help="decode a hidden state by patching it into another prompt",
        description="Take the residual at (SOURCE, --position, each of --layers) and patch it into a target prompt "
        "at (--target-position, --target-layer; default the same layer), then decode the next token (and "
        "-n tokens greedily). The default target is the identity prompt " + repr(IDENTITY_PROMPT) + ". For "
        "multi-hop, use SOURCE's last state and a --target-prompt template with a placeholder at "
        "--target-position.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--position", type=integer, default=-1, help="source position (default -1, the last)")
    p.add_argument("--layers", default="all", help="source layers, e.g. 0,2 (default all)")
    p.add_argument("--target-prompt", default=None, metavar="TEXT", help="target prompt (default: identity prompt)")
    p.add_argument("--target-tokens", default=None, metavar="IDS", help="target prompt as token ids")
    p.add_argument("--target-position", type=integer, default=-1, help="target position (default -1, the last)")
    p.add_argument("--target-layer", type=natural, default=None, help="target layer (default: the source layer)")
    p.add_argument("--site", default="resid_post", choices=RESID_SITES, help="residual site (default resid_post)")
    p.add_argument("--top", type=count, default=5, help="next-token candidates to show (default 5)")
    p.add_argument("-n", "--max-new-tokens", type=natural, default=0, help="greedy tokens to generate (default 0)")
    add_json_arg(p)
    p.set_defaults(func=cmd_patchscope)


def cmd_patchscope(args) -> None:
    from probes.patchscope import IDENTITY_PROMPT, patchscope

    model = load_model(args)
    source = prompt_ids(model, args.prompt, args.tokens, what="SOURCE")
    if args.target_prompt is None and args.target_tokens is None and model.tokenizer is None:
        raise CLIError(f"model {model.source!r} has no tokenizer for the identity prompt: give --target-tokens")
    target_text = IDENTITY_PROMPT if args.target_prompt is None and args.target_tokens is None else args.target_prompt
    target = prompt_ids(model, target_text, args.target_tokens, what="--target-prompt",
                        tokens_flag="--target-tokens")
    layers = layer_list(args.layers, model.config)
    if args.target_layer is not None:
        check_layer(args.target_layer, model.config, "--target-layer")
    source_position = check_position(args.position, len(source))
    target_position = check_position(args.target_position, len(target), "--target-position")
    if args.max_new_tokens < 0 or len(target) + args.max_new_tokens > model.config.n_ctx:
        raise CLIError(f"--max-new-tokens must be >= 0 and fit the context with the target prompt of "
                       f"{len(target)} tokens (n_ctx={model.config.n_ctx})")
    result = patchscope(model.params, model.config, np.asarray([source]), np.asarray([target]),
                        source_layers=layers, source_position=source_position, target_layer=args.target_layer,
                        target_position=target_position, site=args.site, k=args.top,
                        max_new_tokens=args.max_new_tokens)
    rows = []
    for i, (source_layer, target_layer) in enumerate(zip(result.source_layers, result.target_layers)):
        row = {"source_layer": source_layer, "target_layer": target_layer,
               "top": [[int(t), float(q)] for t, q in zip(result.top_ids[i], result.top_probs[i])]}
        if result.generated is not None:
            row["generated"] = result.generated[i].tolist()
            row["text"] = decode(model, result.generated[i])
        rows.append(row)
    if args.json:
        print_json({"source_tokens": source, "target_tokens": target, "site": args.site,
                    "source_position": result.source_position, "target_position": result.target_position,
                    "rows": rows})
        return
    src, tgt = pieces(model, source), pieces(model, target)
    print(f"{model}\nsource {src[result.source_position]!r} (position {result.source_position}) -> target "
          f"{tgt[result.target_position]!r} (position {result.target_position}) of {decode(model, target)!r}, "
          f"site {args.site}\n")
    header = ["source layer", "target layer", "next tokens"] + (["generated"] if result.generated is not None else [])
    print(table([[r["source_layer"], r["target_layer"],
                  " ".join(f"{piece(model, t)!r} {q:.2f}" for t, q in r["top"])]
                 + ([repr(r["text"])] if "text" in r else []) for r in rows], header))


# ----------------------------------------------------------------------------------------------- attribute


def register_attribute(subparsers) -> None:
    p = subparsers.add_parser(
        "attribute", help="direct logit attribution: each head's, MLP's and embedding's share of a logit",
        description="Split a logit (or a logit difference with --baseline) at one position into the direct "
        "contributions of the embeddings, every attention head, every attention bias b_O and every MLP, through "
        "the final LayerNorm with its scale frozen at its value on the prompt. The contributions plus the "
        "final LayerNorm's bias term (lnf_b . W_U[:, t]) add up to the logit exactly.")
    add_prompt_args(p)
    add_model_args(p)
    add_token_arg(p, "target", "the token whose logit to explain (default: the model's top prediction)")
    add_token_arg(p, "baseline", "explain target's logit minus this token's")
    p.add_argument("--position", type=integer, default=-1, help="position (default -1, the last)")
    p.add_argument("--top", type=count, default=12, help="components to list, largest |contribution| first (default 12)")
    p.add_argument("--neurons", type=natural, default=None, metavar="LAYER", help="also split MLP LAYER over its neurons")
    add_plot_arg(p, "save bars of the --top components' contributions")
    add_json_arg(p)
    p.set_defaults(func=cmd_attribute)


def cmd_attribute(args) -> None:
    import tinygpt
    from probes.attribution import direct_logit_attribution, neuron_attribution

    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    position = check_position(args.position, len(ids))
    tokens = np.asarray([ids])
    target = token_arg(model, args.target, args.target_id, "target")
    if target is None:
        logits = tinygpt.forward(model.params, tokens, model.config, keep=("logits",)).logits  # [1, seq, vocab]
        target = int(np.argmax(logits[0, position]))
    baseline = token_arg(model, args.baseline, args.baseline_id, "baseline")
    result = direct_logit_attribution(model.params, model.config, tokens, target, baseline=baseline,
                                      position=position)
    components = [{"name": name, "layer": layer, "head": head, "contribution": float(c)} for name, layer, head, c
                  in zip(result.labels, result.layers, result.heads, result.contributions[:, 0])]
    out = {"tokens": ids, "position": position, "target": target, "baseline": baseline,
           "logit": float(result.logit[0]), "bias_term": float(result.bias_term[0]),
           "ln_final_scale": float(result.ln_final_scale[0]), "components": components}
    if args.neurons is not None:
        check_layer(args.neurons, model.config, "--neurons")
        neurons = neuron_attribution(model.params, model.config, tokens, args.neurons, target, baseline=baseline,
                                     position=position)
        order = np.argsort(-np.abs(neurons.neurons[:, 0]), kind="stable")[: args.top]
        out["neurons"] = {"layer": args.neurons, "b_out": float(neurons.bias[0]), "total": float(neurons.total[0]),
                          "top": [{"neuron": int(i), "activation": float(neurons.activations[i, 0]),
                                   "contribution": float(neurons.neurons[i, 0])} for i in order]}
    what = f"the logit of {piece(model, target)!r}"
    if baseline is not None:
        what += f" - the logit of {piece(model, baseline)!r}"
    ranked = sorted(components, key=lambda c: -abs(c["contribution"]))[: args.top]
    if args.plot:
        from probes import plots

        save_plot(plots.attribution([c["name"] for c in ranked], [c["contribution"] for c in ranked],
                                    logit=out["logit"], model=model.source, prompt=decode(model, ids),
                                    what=f"{what} at position {position} ({pieces(model, ids)[position]!r}), "
                                         f"largest {len(ranked)} of {len(components)} components"), args.plot)
    if args.json:
        print_json(out)
        return
    print(f"{model}\n{what[4:]} at position {position} ({pieces(model, ids)[position]!r}): {out['logit']:.4f}")
    print(f"= sum of {len(components)} components {float(result.contributions[:, 0].sum()):.4f} + final LayerNorm "
          f"bias term {out['bias_term']:.4f}   (final LayerNorm scale frozen at {out['ln_final_scale']:.4f})\n")
    print(table([[c["name"], c["contribution"]] for c in ranked], ["component", "contribution"]))
    if "neurons" in out:
        n = out["neurons"]
        print(f"\nMLP {n['layer']}: {n['total']:.4f} = neurons + b_out {n['b_out']:.4f}")
        print(table([[r["neuron"], r["activation"], r["contribution"]] for r in n["top"]],
                    ["neuron", "activation", "contribution"]))


# -------------------------------------------------------------------------------------------------- neuron


def register_neuron(subparsers) -> None:
    p = subparsers.add_parser(
        "neuron", help="an MLP neuron as a key-value memory: tokens it promotes, where it fires",
        description="Neuron INDEX of MLP LAYER: its value vector (row of W_out) read through the unembedding (the "
        "tokens it promotes and suppresses per unit of activation); with PROMPT, its activation at every position "
        "and its direct effect on the logits at the last position; with --corpus (default for the embedded model: "
        "its held-out plays), the tokens where it is most active. An activation is mlp_post (after GELU) at a "
        "token, its window run from the window's first token (probes.memory.neuron_activations): PROMPT is run "
        "as one document, <|endoftext|> first, as each document of a corpus, which is cut into windows of --seq "
        "tokens exactly as `tinygpt polysemantic` cuts it, so both report the same numbers.")
    p.add_argument("neuron", metavar="LAYER.INDEX", help="e.g. 2.137")
    add_prompt_args(p)
    add_model_args(p)
    from .geometry import add_corpus_args

    add_corpus_args(p, 50_000)
    p.add_argument("--top", type=count, default=10, help="tokens / activations to list (default 10)")
    add_json_arg(p)
    p.set_defaults(func=cmd_neuron)


def parse_neuron(text: str, config) -> tuple[int, int]:
    try:
        layer, index = (int(x) for x in text.split("."))
    except ValueError:
        raise CLIError(f"neuron must be LAYER.INDEX, e.g. 2.137, got {text!r}") from None
    check_layer(layer, config, "neuron layer")
    if not 0 <= index < config.d_mlp:
        raise CLIError(f"neuron index {index} is out of range: each MLP has d_mlp={config.d_mlp} neurons")
    return layer, index


def document_ids(model, args) -> list[int]:
    """The prompt's token ids as one document: PROMPT text with <|endoftext|> first (when the vocabulary has it),
    as `probes.harvest.text_stream` puts it before each document of a corpus; --tokens as given."""
    ids = prompt_ids(model, args.prompt, args.tokens)
    if args.prompt is None or model.tokenizer.eos_id is None:
        return ids
    if len(ids) + 1 > model.config.n_ctx:
        raise CLIError(f"prompt of {len(ids)} tokens and <|endoftext|> before it is longer than the model's context "
                       f"n_ctx={model.config.n_ctx}")
    return [model.tokenizer.eos_id] + ids


def cmd_neuron(args) -> None:
    from probes.harvest import HarvestError
    from probes.memory import neuron_on_prompt, top_activations, value_tokens

    from .geometry import corpus_windows

    model = load_model(args)
    layer, index = parse_neuron(args.neuron, model.config)
    values = value_tokens(model.params, layer, index, args.top)
    out = {"layer": layer, "neuron": index, "promoted": token_pairs(model, values.promoted),
           "suppressed": token_pairs(model, values.suppressed)}
    if args.prompt is not None or args.tokens is not None:
        ids = document_ids(model, args)
        on_prompt = neuron_on_prompt(model.params, model.config, np.asarray([ids]), layer, index, k=args.top)
        out["prompt"] = {"tokens": ids, "activations": on_prompt.activations.tolist(),
                         "promoted": token_pairs(model, on_prompt.promoted),
                         "suppressed": token_pairs(model, on_prompt.suppressed)}
    if args.corpus is not None or (model.source == "embedded" and model.tokenizer is not None):
        try:
            windows, out["corpus"] = corpus_windows(model, args)
        except HarvestError as e:
            raise CLIError(str(e)) from None
        out["seq"] = windows.shape[1]
        top = top_activations(model.params, model.config, windows, layer, index, k=args.top, batch=args.batch or 16)
        out["top_activations"] = [
            {"activation": float(a), "token": int(t), "piece": piece(model, t), "window": int(w), "position": int(p),
             "context": decode(model, windows[w, max(0, p - 7): p + 1])}
            for a, w, p, t in zip(top.activations, top.windows, top.positions, top.tokens)]
    if args.json:
        print_json(out)
        return
    print(f"{model}\nneuron {layer}.{index}: value vector (W_out row) through the unembedding, per unit activation\n")
    print(table([[repr(a["piece"]), a["value"], repr(b["piece"]), b["value"]]
                 for a, b in zip(out["promoted"], out["suppressed"])],
                ["promoted", "logit", "suppressed", "logit"]))
    if "prompt" in out:
        p = out["prompt"]
        print("\non the prompt (activation = mlp_post after GELU, the prompt run as one document"
              + (", <|endoftext|> first" if args.prompt is not None and model.tokenizer.eos_id is not None else "")
              + "):")
        print(table([[i, repr(s), a] for i, (s, a) in enumerate(zip(pieces(model, p["tokens"]), p["activations"]))],
                    ["position", "token", "activation"]))
        print("direct effect on the last position's logits: "
              + ", ".join(f"{t['piece']!r} {t['value']:+.3f}" for t in p["promoted"][:5]))
    if "top_activations" in out:
        print(f"\ntop activations in {out['corpus']} (mlp_post after GELU, each window of {out['seq']} tokens run "
              f"from its start, as `tinygpt polysemantic`):")
        print(table([[a["activation"], repr(a["piece"]), repr(a["context"])] for a in out["top_activations"]],
                    ["activation", "token", "context (its last 8 tokens)"]))


# ----------------------------------------------------------------------------------------------------- svd


def register_svd(subparsers) -> None:
    from probes.svd import MATRICES

    p = subparsers.add_parser(
        "svd", help="singular values and vectors of a weight matrix, read as tokens",
        description="SVD of a weight matrix of block --layer: W_Q, W_K, W_V, W_O, OV = W_V W_O, QK = W_Q W_K^T "
        "(per head; OV and QK from their factors, never formed), W_in, W_out. With --head (or for W_in/W_out): "
        "the top singular directions read through the embedding (input side) and unembedding (output side). "
        "Without --head for a per-head matrix: every head's spectrum. Every d_model side is centred first (the "
        "mean over d_model removed, as TransformerLens's processed weights): LayerNorm removes it from whatever "
        "reads the residual stream, so the model cannot see it; exact with --fold-ln (probes.svd).")
    p.add_argument("matrix", choices=list(MATRICES), help="which matrix")
    add_model_args(p)
    p.add_argument("--layer", type=natural, required=True, help="block (0-based)")
    p.add_argument("--head", type=natural, default=None, help="head (0-based), for per-head matrices")
    p.add_argument("--vectors", type=count, default=5, help="singular directions to read (default 5)")
    p.add_argument("--top", type=count, default=5, help="tokens per direction end (default 5)")
    p.add_argument("--fold-ln", action="store_true", help="fold LayerNorm weights into the matrices first")
    add_plot_arg(p, "save the singular value spectrum")
    add_json_arg(p)
    p.set_defaults(func=cmd_svd)


def cmd_svd(args) -> None:
    from probes.svd import MATRICES, singular_tokens, spectra, weight_svd
    from probes.transforms import fold_layer_norm

    model = load_model(args)
    config = model.config
    check_layer(args.layer, config)
    per_head = MATRICES[args.matrix][0]
    if args.head is not None and not per_head:
        raise CLIError(f"{args.matrix} belongs to the MLP: leave out --head")
    if args.head is not None and not 0 <= args.head < config.n_head:
        raise CLIError(f"--head {args.head} is out of range: the model has {config.n_head} heads (0-based)")
    params = fold_layer_norm(model.params) if args.fold_ln else model.params
    spectrum = spectra(params, config, args.matrix, args.layer)  # [head or 1, rank]
    out = {"matrix": args.matrix, "layer": args.layer, "head": args.head, "fold_ln": args.fold_ln,
           "centred": "d_model sides", "singular_values": spectrum.tolist() if per_head else spectrum[0].tolist()}
    if args.head is not None or not per_head:
        svd = weight_svd(params, config, args.matrix, args.layer, args.head)
        out["singular_values"] = svd.S.tolist()
        out["directions"] = [
            {**row, **{side: None if row[side] is None else
                       {end: token_pairs(model, pairs) for end, pairs in row[side].items()}
                       for side in ("input", "output")}}
            for row in singular_tokens(params, svd, args.vectors, args.top)]
    if args.plot:
        plot_spectrum(model, spectrum, args, per_head)
    if args.json:
        print_json(out)
        return
    name = f"{args.matrix} of layer {args.layer}" + (f" head {args.head}" if args.head is not None else "")
    print(f"{model}\n{name}{' (LayerNorm folded)' if args.fold_ln else ''}, d_model sides centred "
          f"(LayerNorm removes the mean)\n")
    if "directions" not in out:
        rank = spectrum.shape[1]
        shown = min(rank, 8)
        print(table([[h, *spectrum[h, :shown]] for h in range(len(spectrum))],
                    ["head", *[f"s{i}" for i in range(shown)]]))
        return
    print("singular values: " + " ".join(f"{s:.3g}" for s in out["singular_values"][:12])
          + (" ..." if len(out["singular_values"]) > 12 else ""))
    rows = []
    for d in out["directions"]:
        def ends(side):
            if d[side] is None:
                return "-", "-"
            return tuple(" ".join(repr(t["piece"]) for t in d[side][end]) for end in ("positive", "negative"))

        rows.append([d["index"], d["singular_value"], *ends("input"), *ends("output")])
    print(table(rows, ["i", "singular value", "input +", "input -", "output +", "output -"]))


def plot_spectrum(model, spectrum, args, per_head: bool) -> None:
    from probes import plots

    heads = None if not per_head else ([args.head] if args.head is not None else list(range(len(spectrum))))
    save_plot(plots.spectrum(spectrum, matrix=args.matrix, layer=args.layer, heads=heads, fold_ln=args.fold_ln,
                             model=model.source), args.plot)


# -------------------------------------------------------------------------------------------------- steer


def register_steer(subparsers) -> None:
    p = subparsers.add_parser(
        "steer", help="generate with a difference-of-means vector added to the residual stream",
        description="Build a steering vector as the mean residual (at the last token) of --positive prompts minus "
        "that of --negative prompts, at --site of block --layer, and generate from PROMPT with --coef times it "
        "added there (at every position, generated ones included, at the generated tokens only, or at --positions "
        "of the prompt), next to the unsteered continuation.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--positive", action="append", default=[], metavar="TEXT", help="a positive prompt (repeatable)")
    p.add_argument("--negative", action="append", default=[], metavar="TEXT", help="a negative prompt (repeatable)")
    p.add_argument("--positive-tokens", action="append", default=[], metavar="IDS", help="a positive prompt as ids")
    p.add_argument("--negative-tokens", action="append", default=[], metavar="IDS", help="a negative prompt as ids")
    p.add_argument("--layer", type=natural, required=True, help="block to add the vector at (0-based)")
    p.add_argument("--site", default="resid_pre", choices=RESID_SITES, help="residual site (default resid_pre)")
    p.add_argument("--coef", type=real, default=4.0, help="coefficient of the vector (default 4)")
    p.add_argument("--positions", default="all",
                   help="'all' (prompt and generated tokens), 'generated' (generated tokens only) or prompt "
                        "positions, e.g. 0,1 (default all)")
    p.add_argument("-n", "--max-new-tokens", type=count, default=None,
                   help="tokens to generate (default 30, or as many as the context has room for)")
    p.add_argument("--temperature", type=nonnegative, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    add_json_arg(p)
    p.set_defaults(func=cmd_steer)


def contrast_prompts(model, texts, token_lists, flag: str) -> list[list[int]]:
    prompts = [prompt_ids(model, text, None, what=f"--{flag}") for text in texts]
    prompts += [prompt_ids(model, None, ids, tokens_flag=f"--{flag}-tokens") for ids in token_lists]
    if not prompts:
        raise CLIError(f"give at least one --{flag} prompt (or --{flag}-tokens)")
    return prompts


def cmd_steer(args) -> None:
    from probes.steering import mean_difference, steer

    model = load_model(args)
    config = model.config
    ids = prompt_ids(model, args.prompt, args.tokens)
    check_layer(args.layer, config)
    new = min(30, config.n_ctx - len(ids)) if args.max_new_tokens is None else args.max_new_tokens
    if new < 1 or len(ids) + new > config.n_ctx:
        raise CLIError(f"--max-new-tokens must be >= 1 and fit the context with the prompt of {len(ids)} tokens "
                       f"(n_ctx={config.n_ctx})")
    if args.positions in ("all", "generated"):
        positions = None if args.positions == "all" else "generated"
    else:
        positions = [check_position(p, len(ids), "--positions") for p in parse_token_list(args.positions, "--positions")]
    positive = contrast_prompts(model, args.positive, args.positive_tokens, "positive")
    negative = contrast_prompts(model, args.negative, args.negative_tokens, "negative")
    vector = mean_difference(model.params, config, positive, negative, args.layer, args.site)
    result = steer(model.params, config, np.asarray([ids]), vector, args.layer, args.coef, site=args.site,
                   positions=positions, max_new_tokens=new, temperature=args.temperature,
                   seed=args.seed)
    out = {"prompt_tokens": ids, "layer": args.layer, "site": args.site, "coef": args.coef,
           "positions": result.positions, "vector_norm": float(np.linalg.norm(np.asarray(vector))),
           "steered": result.tokens[0].tolist(), "steered_text": decode(model, result.tokens[0]),
           "baseline": result.baseline[0].tolist(), "baseline_text": decode(model, result.baseline[0])}
    if args.json:
        print_json(out)
        return
    if result.positions is None:
        where = "every position"
    elif result.positions == "generated":
        where = "the generated tokens"
    else:
        where = f"prompt positions {result.positions}"
    print(f"{model}\nvector: mean difference at {args.site} of block {args.layer} (norm {out['vector_norm']:.3f}), "
          f"x {args.coef:g} at {where}\n")
    prompt = decode(model, ids)
    print(f"--- steered ---\n{prompt}{out['steered_text']}\n--- unsteered ---\n{prompt}{out['baseline_text']}")


# ----------------------------------------------------------------------------------------------- attention


def register_attention(subparsers) -> None:
    p = subparsers.add_parser(
        "attention", help="per-head attention summaries and pattern images",
        description="For every head, on PROMPT: mean attention to the first position, to the previous position and "
        "to itself; and its induction score on repeated random tokens (attention from a token's second occurrence "
        "to the token after its first). --plot saves the patterns on PROMPT.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--induction-n", type=count, default=None, help="length of the repeated random block "
                   "(default: half the context, at most 50)")
    p.add_argument("--layers", default="all", help="layers to plot, e.g. 0,1 (default all)")
    add_plot_arg(p, "save the attention patterns on PROMPT")
    add_json_arg(p)
    p.set_defaults(func=cmd_attention)


def cmd_attention(args) -> None:
    from probes.attention import attention_patterns, head_summary

    model = load_model(args)
    config = model.config
    ids = prompt_ids(model, args.prompt, args.tokens)
    if len(ids) < 2:
        raise CLIError("the prompt needs at least 2 tokens")
    if args.induction_n is not None and not 2 <= args.induction_n <= config.n_ctx // 2:
        raise CLIError(f"--induction-n must be between 2 and n_ctx / 2 = {config.n_ctx // 2}")
    layers = layer_list(args.layers, config)
    summary = head_summary(model.params, config, np.asarray([ids]), induction_n=args.induction_n)
    if args.plot:
        pattern = np.asarray(attention_patterns(model.params, config, np.asarray([ids])))[:, 0]
        from probes import plots

        save_plot(plots.attention_patterns(pattern, pieces(model, ids), layers=layers, model=model.source,
                                           prompt=decode(model, ids)), args.plot)
    rows = summary.rows()
    if args.json:
        print_json({"tokens": ids, "heads": rows})
        return
    print(f"{model}\nmean attention on the prompt ({len(ids)} tokens) to the first / previous / own position; "
          "induction score on repeated random tokens\n")
    print(table([[r["layer"], r["head"], r["first"], r["previous"], r["diagonal"], r["induction"]] for r in rows],
                ["layer", "head", "first", "previous", "self", "induction"]))
