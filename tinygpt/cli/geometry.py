"""Superposition and geometry: `tinygpt harvest`, `sae train|eval`, `superposition`, `polysemantic`, `manifold`.

Each parses its arguments, calls a probe in `probes/` (harvest, sae, geometry, polysemantic, manifold) and
renders the result: a table, --json (the probe's result), a --plot image. Commands that read a corpus take
--corpus FILE (a text file, or a .npy array of token ids for models without a tokenizer); with the embedded
model they default to its own Shakespeare corpus (--split val, the held-out plays, or train).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .common import (
    CLIError,
    InterruptLatch,
    Number,
    add_json_arg,
    add_model_args,
    add_process_args,
    add_plot_arg,
    count,
    join_processes,
    load_model,
    natural,
    nonnegative,
    pieces,
    positive,
    print_json,
    probe_errors,
    save_plot,
    seed,
    table,
)


def register(subparsers) -> None:
    register_harvest(subparsers)
    register_sae(subparsers)
    register_superposition(subparsers)
    register_polysemantic(subparsers)
    register_manifold(subparsers)


# ------------------------------------------------------------------------------------------------ helpers


def add_corpus_args(parser, max_tokens: int | None) -> None:
    parser.add_argument("--corpus", default=None, metavar="FILE",
                        help="text file (or .npy of token ids); default with the embedded model: its Shakespeare "
                             "corpus")
    parser.add_argument("--split", default="val", choices=["val", "train"],
                        help="which part of the embedded corpus: val (held-out plays, default) or train")
    parser.add_argument("--max-tokens", type=count, default=max_tokens, metavar="N",
                        help="use the first N tokens of the corpus" + (f" (default {max_tokens})" if max_tokens
                                                                         else " (default: all)"))
    parser.add_argument("--seq", type=count, default=None, metavar="N",
                        help="window length in tokens (default: the model's context n_ctx)")
    parser.add_argument("--batch", type=count, default=None, metavar="N", help="windows per forward call")


def corpus_windows(model, args) -> tuple[np.ndarray, str]:
    """The corpus as token windows [n_windows, seq], and its description."""
    from probes.harvest import corpus_stream, token_windows

    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError("--max-tokens must be at least 1")
    seq = args.seq or model.config.n_ctx
    if not 1 <= seq <= model.config.n_ctx:
        raise CLIError(f"--seq {seq} must be in [1, n_ctx={model.config.n_ctx}]")
    stream, description = corpus_stream(model, args.corpus, split=args.split, max_tokens=args.max_tokens)
    return token_windows(stream, seq), description


def check_layer_arg(model, layer: int) -> None:
    if not 0 <= layer < model.config.n_layer:
        raise CLIError(f"layer {layer} is outside [0, {model.config.n_layer})")


# ------------------------------------------------------------------------------------------------ harvest


def register_harvest(subparsers) -> None:
    from tinygpt.sites import SITE_NAMES

    p = subparsers.add_parser(
        "harvest", help="store a site's activations over a corpus (memory-mapped, resumable)",
        description="Run the corpus through the model in windows and store SITE's activation at every token "
        "(one row per token) in OUT_DIR/activations.npy, a memory-mapped float32 [tokens, width] array, with the "
        "windows in tokens.npy and progress in harvest.json. Only the blocks up to --layer run. Interrupted, the "
        "same command resumes where it stopped. OUT_DIR must be new, empty, or a harvest to resume: tinygpt never "
        "writes over or deletes a file it did not create, and a second harvest into OUT_DIR while one runs fails "
        "at once, naming the first.")
    p.add_argument("out", metavar="OUT_DIR", help="directory for the harvest (new, empty, or one to resume)")
    p.add_argument("--site", required=True, choices=SITE_NAMES, metavar="SITE", help="site name, e.g. resid_post")
    p.add_argument("--layer", type=natural, default=None, help="block index (for per-layer sites)")
    add_corpus_args(p, None)
    add_model_args(p)
    add_process_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_harvest)


HARVEST_FLAGS = {"layer": "--layer", "seq": "--seq", "batch": "--batch", "corpus": "--corpus"}


@probe_errors(flags=HARVEST_FLAGS)
def cmd_harvest(args) -> None:
    from probes.harvest import check_not_written, harvest

    check_not_written(args.corpus, args.out, "corpus")
    with InterruptLatch() as latch:
        model = load_model(args)
        windows, description = corpus_windows(model, args)
        store = harvest(model.params, model.config, windows.reshape(-1), args.site, args.layer, seq=windows.shape[1],
                        batch=args.batch, path=args.out, source=model.source, on_chunk=latch.check)
    result = {"path": str(store.path), "site": store.site, "layer": store.layer, "rows": int(store.acts.shape[0]),
              "width": int(store.acts.shape[1]), "windows": int(len(store.windows)), "seq": int(store.windows.shape[1]),
              "corpus": description, "model": model.source}
    if args.json:
        print_json(result)
        return
    print(f"{result['rows']:,} rows x {result['width']} of {store.site}"
          + ("" if store.layer is None else f" at layer {store.layer}")
          + f" ({result['windows']} windows of {result['seq']} tokens from {description}) in {store.path}")


# ---------------------------------------------------------------------------------------------------- sae


def register_sae(subparsers) -> None:
    p = subparsers.add_parser(
        "sae", help="sparse autoencoders: train on a harvest, evaluate on a corpus",
        description="Sparse autoencoders over a site's activations (probes.sae).")
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    t = actions.add_parser(
        "train", help="train an SAE on a harvest directory",
        description="Train a sparse autoencoder (ReLU + L1, or TopK) on the activations of a harvest made with "
        "`tinygpt harvest`, save it as safetensors with its config, and report L0, the fraction of variance "
        "explained and the dead fraction on the training activations. --out is replaced only when training "
        "completes (Ctrl-C leaves it as it was), and two runs writing the same --out are refused.")
    t.add_argument("harvest", metavar="HARVEST_DIR", help="a finished harvest (tinygpt harvest)")
    t.add_argument("--out", required=True, metavar="SAE.safetensors", help="where to save the SAE")
    t.add_argument("--kind", default="topk", choices=["relu", "topk"], help="relu (L1 penalty) or topk (default)")
    t.add_argument("--expansion", type=count, default=8, help="latents per input dimension (default 8)")
    t.add_argument("--d-sae", type=count, default=None, help="number of latents (overrides --expansion)")
    t.add_argument("--k", type=count, default=32, help="active latents per token for topk (default 32)")
    t.add_argument("--l1", type=nonnegative, default=2.0, help="L1 coefficient for relu (default 2.0)")
    t.add_argument("--steps", type=count, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=count, default=1024, help="rows per step (default 1024)")
    t.add_argument("--lr", type=positive, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--resample-every", type=natural, default=500, help="resample dead latents every N steps (0: never)")
    t.add_argument("--seed", type=seed, default=0)
    add_json_arg(t)
    add_process_args(t)
    t.set_defaults(func=cmd_sae_train)

    e = actions.add_parser(
        "eval", help="L0, variance explained, dead fraction and loss recovered of an SAE on a corpus",
        description="Harvest the SAE's site over a corpus and report L0, the fraction of variance explained, the "
        "dead fraction, and the loss recovered when the SAE's reconstruction replaces the site in the forward "
        "pass: (CE_ablated - CE_sae) / (CE_ablated - CE_clean), against zero and mean ablation.")
    e.add_argument("sae", metavar="SAE", help="an SAE file (tinygpt sae train) or a SAELens directory (cfg.json + "
                   "sae_weights.safetensors)")
    add_corpus_args(e, 32768)
    add_model_args(e)
    add_json_arg(e)
    e.set_defaults(func=cmd_sae_eval)
    p.set_defaults(func=cmd_sae_missing)


def cmd_sae_missing(args) -> None:
    raise CLIError("give an action: tinygpt sae train HARVEST_DIR --out SAE.safetensors, or tinygpt sae eval SAE")


SAE_TRAIN_FLAGS = {"out": "--out", "d_sae": "--d-sae", "k": "--k", "l1_coeff": "--l1", "steps": "--steps",
                   "batch_size": "--batch-size", "lr": "--lr", "resample_every": "--resample-every", "seed": "--seed"}


@probe_errors(flags=SAE_TRAIN_FLAGS)
def cmd_sae_train(args) -> None:
    """Holds --out's writer lock throughout; writes --out only after the whole training ran uninterrupted.
    With several processes (data parallel, the same SAE on each), process 0 alone locks and writes --out."""
    import contextlib

    from probes import sae as saes
    from probes.harvest import check_not_written, load_harvest
    from tinygpt import distributed
    from tinygpt.files import check_output_file, remove_own_temporaries, writer_lock

    join_processes(args)
    out = check_output_file(args.out, "--out")
    check_not_written(out, args.harvest, "out")
    writes = distributed.processes().is_main
    with writer_lock(out, "--out") if writes else contextlib.nullcontext(), InterruptLatch() as latch:
        if writes:
            remove_own_temporaries(out)
        store = load_harvest(args.harvest)
        d_in = store.acts.shape[1]
        config = saes.SAEConfig(d_in=d_in, d_sae=args.d_sae or args.expansion * d_in, kind=args.kind, k=args.k,
                                l1_coeff=args.l1, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                resample_every=args.resample_every, seed=args.seed, site=store.site,
                                layer=store.layer)
        sae, history = saes.train_sae(store.acts, config, on_round=latch.check)
        metrics = saes.evaluate(sae, store.acts)
        latch.check()
        if writes:
            saes.save_sae(sae, out, extra={"harvest": str(store.path), "model": store.info.get("source", ""),
                                           "model_fingerprint": store.info.get("model")})
    result = {"path": args.out, "config": dataclasses.asdict(sae.config), "metrics": dataclasses.asdict(metrics),
              "history": history}
    if args.json:
        print_json(result)
        return
    print(f"saved {args.out}: {config.kind} SAE, {config.d_in} -> {config.d_sae} latents on {store.site}"
          + ("" if store.layer is None else f" L{store.layer}"))
    print(table([[m["step"], m["loss"], m["mse"], m["l0"], m["dead_fraction"]] for m in history[-5:]],
                ["step", "loss", "mse (scaled)", "L0", "dead"]))
    print(f"on the {metrics.n_rows:,} training rows: L0 {metrics.l0:.1f}, variance explained {metrics.fve:.3f}, "
          f"dead {metrics.dead_fraction:.3f}")


@probe_errors(flags={"seq": "--seq", "batch": "--batch"})
def cmd_sae_eval(args) -> None:
    from probes import sae as saes
    from probes.harvest import harvest
    from probes.saelens import load_any

    sae = load_any(args.sae)
    if sae.config.site is None:
        raise CLIError(f"{args.sae} records no site: it was not trained on model activations")
    model = load_model(args)
    saes.check_sae_model(sae, model.params, f"SAE file {args.sae!r}")
    windows, description = corpus_windows(model, args)
    store = harvest(model.params, model.config, windows.reshape(-1), sae.config.site, sae.config.layer,
                    seq=windows.shape[1], batch=args.batch)
    if store.acts.shape[1] != sae.config.d_in:
        raise CLIError(f"the SAE reads {sae.config.d_in}-wide vectors but {sae.config.site} of {model.source} is "
                       f"{store.acts.shape[1]} wide")
    metrics = saes.evaluate(sae, store.acts)
    recovered = saes.loss_recovered(model.params, model.config, sae, windows, mean_activation=store.acts.mean(0),
                                    batch=args.batch or 8)
    result = {"sae": args.sae, "site": sae.config.site, "layer": sae.config.layer, "corpus": description,
              "metrics": dataclasses.asdict(metrics), "loss_recovered": dataclasses.asdict(recovered)}
    if args.json:
        print_json(result)
        return
    r = recovered
    print(f"{args.sae} on {sae.config.site}" + ("" if sae.config.layer is None else f" L{sae.config.layer}")
          + f", {metrics.n_rows:,} tokens of {description}")
    print(table([["L0", metrics.l0], ["variance explained", metrics.fve], ["dead fraction", metrics.dead_fraction],
                 ["CE clean", r.ce_clean], ["CE with SAE", r.ce_sae], ["CE zero-ablated", r.ce_zero],
                 ["CE mean-ablated", r.ce_mean], ["loss recovered (vs zero)", r.recovered],
                 ["loss recovered (vs mean)", r.recovered_vs_mean]], ["metric", "value"]))


# ------------------------------------------------------------------------------------------ superposition


def register_superposition(subparsers) -> None:
    p = subparsers.add_parser(
        "superposition", help="pairwise cosines of embeddings, neurons and SAE features vs random vectors",
        description="Distribution of pairwise cosines among token embeddings, a layer's neuron keys (W_in "
        "columns x ln2_w, centred: the residual direction each neuron reads, probes.memory.residual_keys, as "
        "`tinygpt polysemantic` uses it) and values (W_out rows), and an SAE's decoder rows, each next to as many "
        "Gaussian random vectors of the same dimension; and the Johnson-Lindenstrauss view: how many directions "
        "fit in d_model dims pairwise within --angle degrees of orthogonal.")
    p.add_argument("--layer", type=natural, default=0, help="block whose neurons to measure (default 0)")
    p.add_argument("--sae", default=None, metavar="SAE", help="also measure this SAE's decoder rows (a tinygpt SAE "
                   "file or a SAELens directory)")
    p.add_argument("--angle", type=Number(float, 0.0, 90.0, low_open=True, high_open=True, name="angle"), default=15.0,
                   help="degrees from orthogonal counted as 'nearly orthogonal' (default 15: |cos| <= sin 15)")
    p.add_argument("--pairs", type=count, default=200_000, help="pairs sampled per set (default 200000)")
    p.add_argument("--seed", type=seed, default=0)
    add_plot_arg(p, "save histograms of the cosines")
    add_model_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_superposition)


@probe_errors
def cmd_superposition(args) -> None:
    from probes import geometry

    if not 0 < args.angle < 90:
        raise CLIError(f"--angle must be in (0, 90) degrees, got {args.angle}")
    if args.pairs < 1:
        raise CLIError("--pairs must be at least 1")
    model = load_model(args)
    check_layer_arg(model, args.layer)
    sets = geometry.model_vector_sets(model.params, args.layer)
    if args.sae:
        from probes.saelens import load_any

        sae = load_any(args.sae, model.params)
        name = "sae_decoder" + (f" {sae.config.site} L{sae.config.layer}" if sae.config.site else "")
        sets[name] = sae.params["W_dec"]
    eps = geometry.epsilon_for_angle(args.angle)
    results = geometry.superposition(sets, eps=eps, max_pairs=args.pairs, seed=args.seed)
    capacity = geometry.capacity(model.config.d_model, args.angle, seed=args.seed)
    if args.plot:
        plot_superposition(model, results, eps, args.plot)
    if args.json:
        print_json({"sets": [r.to_dict() for r in results], "capacity": dataclasses.asdict(capacity),
                    "angle": args.angle, "eps": eps})
        return
    rows = []
    for r in results:
        for label, s in ((r.name, r.summary), ("  gaussian", r.gaussian)):
            rows.append([label, s.n, s.d, s.mean, s.mean_abs, s.std, s.abs_quantiles["0.99"], s.max_abs, s.within])
    print(table(rows, ["set", "n", "d", "mean cos", "mean |cos|", "std", "q99 |cos|", "max |cos|",
                       f"within {args.angle:g} deg"]))
    c = capacity
    print(f"\nin d={c.d} dims, directions pairwise within {c.angle_degrees:g} deg of orthogonal (|cos| <= {c.eps:.3f}):"
          f" union bound exp(d eps^2/4) = {c.jl_bound:.3g}; random vectors before the first pair beyond: "
          f"{c.birthday_estimate:.3g} expected (birthday, p = {c.pair_beyond_probability:.2e} per pair), "
          f"{'>= ' if c.measured_capped else ''}{c.measured:.0f} measured")


def plot_superposition(model, results, eps: float, path: str) -> None:
    from probes import plots

    save_plot(plots.superposition(results, eps, model=model.source), path)


# ------------------------------------------------------------------------------------------- polysemantic


def register_polysemantic(subparsers) -> None:
    p = subparsers.add_parser(
        "polysemantic", help="a neuron's top contexts, their token-type entropy, and the SAE features behind it",
        description="For MLP neuron LAYER.INDEX: its top activating tokens over a corpus with their context, the "
        "entropy (bits) of the token types at those positions and of the tokens just before them (0: one type; "
        "compare with the entropy of as many random tokens), and with --sae the SAE features most correlated "
        "with the neuron (their share of its top activations for SAEs on that layer's mlp_post, the cosine of "
        "their direction with the neuron's key for SAEs on the residual stream). An activation is mlp_post (after "
        "GELU) at a token, its window of --seq tokens run from the window's start (probes.memory."
        "neuron_activations), as `tinygpt neuron` reports it; the neuron's key is the centred ln2_w x W_in column "
        "(probes.memory.residual_keys), as `tinygpt superposition` measures it.")
    p.add_argument("neuron", metavar="LAYER.INDEX", help="the neuron, e.g. 2.317")
    p.add_argument("--top", type=count, default=20, help="top activating contexts (default 20)")
    p.add_argument("--context", type=natural, default=8, help="tokens of context shown (default 8)")
    p.add_argument("--sae", default=None, metavar="SAE", help="explain the neuron with this SAE's features (a tinygpt "
                   "SAE file or a SAELens directory)")
    p.add_argument("--features", type=count, default=5, help="SAE features shown (default 5)")
    add_corpus_args(p, 50_000)
    add_model_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_polysemantic)


def parse_neuron(text: str) -> tuple[int, int]:
    try:
        layer, index = (int(part) for part in text.split("."))
    except ValueError:
        raise CLIError(f"the neuron must be LAYER.INDEX (e.g. 2.317), got {text!r}") from None
    return layer, index


@probe_errors
def cmd_polysemantic(args) -> None:
    from probes.polysemantic import neuron_report

    layer, neuron = parse_neuron(args.neuron)
    if args.top < 1 or args.context < 1 or args.features < 1:
        raise CLIError("--top, --context and --features must be at least 1")
    model = load_model(args)
    check_layer_arg(model, layer)
    if not 0 <= neuron < model.config.d_mlp:
        raise CLIError(f"neuron {neuron} is outside [0, d_mlp={model.config.d_mlp})")
    sae = None
    if args.sae:
        from probes.saelens import load_any

        sae = load_any(args.sae, model.params)
    windows, description = corpus_windows(model, args)
    try:
        report = neuron_report(model.params, model.config, windows, layer, neuron, k=args.top, context=args.context,
                               sae=sae, n_features=args.features, batch=args.batch or 8)
    except ValueError as e:
        raise CLIError(str(e)) from None
    result = dataclasses.asdict(report)
    for c in result["top"]:
        c["piece"] = pieces(model, [c["token"]])[0]
        c["text"] = "".join(pieces(model, c["context"]))
    if args.json:
        print_json({**result, "corpus": description, "seq": windows.shape[1]})
        return
    print(f"neuron {layer}.{neuron} over {report.n_tokens:,} tokens of {description}: max {report.max_activation:.3f},"
          f" active (> 0) on {report.fire_rate:.1%}\n(activation: mlp_post after GELU, each window of "
          f"{windows.shape[1]} tokens run from its start, as `tinygpt neuron`; the context is its last "
          f"{args.context} tokens)")
    print(table([[c["activation"], repr(c["piece"]), repr(c["text"])] for c in result["top"]],
                ["activation", "token", "context"]))
    print(f"\ntop {len(report.top)}: {report.distinct_tokens} token types, entropy {report.token_entropy:.2f} bits; "
          f"{report.distinct_previous} previous-token types, entropy {report.previous_entropy:.2f} bits "
          f"(random tokens: {report.random_entropy:.2f} bits)")
    if report.features:
        print(table([[f.feature, f.correlation, "" if f.share is None else f.share,
                      "" if f.key_cosine is None else f.key_cosine] for f in report.features],
                    ["SAE feature", "correlation", "share of top activations", "cos with neuron key"]))


# ----------------------------------------------------------------------------------------------- manifold


def register_manifold(subparsers) -> None:
    from probes.manifold import PROPERTIES

    p = subparsers.add_parser(
        "manifold", help="intrinsic dimension and linear-probe accuracy of the residual stream at every layer",
        description="At the same sampled tokens, the residual stream entering block 0 and leaving every block: "
        "its TwoNN intrinsic dimension (Facco et al. 2017; linear fit with the 10% largest ratios discarded, and "
        "the MLE), its PCA participation ratio, and the held-out accuracy of a logistic-regression probe for "
        "--property. Properties: " + "; ".join(f"{k}: {v}" for k, v in PROPERTIES.items()) + ".")
    p.add_argument("--points", type=count, default=2000, help="tokens sampled (default 2000)")
    p.add_argument("--property", default=None, choices=[*PROPERTIES, "none"],
                   help="labelled property for the linear probe (default: line_end with a tokenizer, else "
                        "repeated; none: no probe)")
    p.add_argument("--seed", type=seed, default=0)
    add_plot_arg(p, "save the curves across depth")
    add_corpus_args(p, 20_000)
    add_model_args(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_manifold)


@probe_errors
def cmd_manifold(args) -> None:
    from probes.manifold import layer_geometry

    if args.points < 10:
        raise CLIError("--points must be at least 10")
    model = load_model(args)
    prop = args.property or ("line_end" if model.tokenizer is not None else "repeated")
    prop = None if prop == "none" else prop
    if prop not in (None, "repeated") and model.tokenizer is None:
        raise CLIError(f"--property {prop} reads token text: model {model.source!r} has no tokenizer (use repeated)")
    windows, description = corpus_windows(model, args)
    if windows.shape[1] < 2:
        raise CLIError("--seq must be at least 2 (position 0 is not sampled)")
    try:
        report = layer_geometry(model.params, model.config, windows, n_points=args.points, property=prop,
                                tokenizer=model.tokenizer, seed=args.seed)
    except ValueError as e:  # too few tokens for the probe's held-out split or for TwoNN
        raise CLIError(str(e)) from None
    if args.plot:
        plot_manifold(model, report, description, args.plot)
    if args.json:
        print_json({**dataclasses.asdict(report), "corpus": description})
        return
    print(f"{report.n_points} tokens of {description}"
          + (f"; property {prop!r} holds for {report.positive_rate:.1%}" if prop else ""))
    rows = []
    for g in report.layers:
        probe = [g.probe.test_accuracy, g.probe.majority] if g.probe else ["", ""]
        rows.append([g.name, g.two_nn, g.two_nn_mle, g.participation_ratio, *probe])
    print(table(rows, ["depth", "TwoNN (fit)", "TwoNN (MLE)", "participation ratio", "probe accuracy", "majority"]))


def plot_manifold(model, report, description: str, path: str) -> None:
    from probes import plots

    save_plot(plots.manifold(report, model=model.source, corpus=description), path)
