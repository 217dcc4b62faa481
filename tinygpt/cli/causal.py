"""`tinygpt ablate`, `tinygpt patch`, `tinygpt trace`, `tinygpt massive`: the causal probes of `probes.ablation`,
`probes.patching`, `probes.tracing` and `probes.massive`, rendered as tables, --json and --plot images."""

from __future__ import annotations

import argparse

import numpy as np

from .common import (
    CLIError,
    add_json_arg,
    add_model_args,
    add_process_args,
    add_plot_arg,
    decode,
    add_prompt_args,
    add_token_arg,
    count,
    integer,
    load_model,
    nonnegative,
    parse_token_list,
    pieces,
    positive,
    print_json,
    prompt_ids,
    real,
    save_plot,
    seed,
    table,
    token_arg,
)

CAUSAL_METRICS = ("logit_diff", "log_prob", "prob", "kl")


def register(subparsers) -> None:
    register_ablate(subparsers)
    register_patch(subparsers)
    register_trace(subparsers)
    register_massive(subparsers)


# ---------------------------------------------------------------------------------------------- arguments


def int_list(text: str | None, flag: str) -> list[int] | None:
    return None if text is None else parse_token_list(text, flag)


def check_range(values: list[int] | None, size: int, flag: str, what: str) -> None:
    for v in values or ():
        if not 0 <= v < size:
            raise CLIError(f"{flag} {v} is out of range: the model has {size} {what} (0..{size - 1})")




def piece(model, token_id: int) -> str:
    return pieces(model, [token_id])[0]


# ------------------------------------------------------------------------------------------------- ablate


def register_ablate(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="ablate heads, neurons, dims or whole components (zero / mean / resample), or sweep them",
        description="Ablate part of a site (zero, mean over reference prompts, or resample from them) and show "
        "how the next-token distribution changes. Whole components are sites: --site attn_out (all attention, "
        "residual kept), --site mlp_out --layers 3 (one layer's MLP). --sweep heads|neurons ablates each head / "
        "neuron of each layer in turn (one compiled program) and scores it with --metric. --neuron-action "
        "scale|set with --value studies one neuron (--layers L --neurons N).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_args(p)
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--site", default=None, help="site to ablate (default: z for heads, mlp_post for neurons, else "
                                                "mlp_out)")
    p.add_argument("--layers", default=None, metavar="L,..", help="layers (default: all)")
    p.add_argument("--heads", default=None, metavar="H,..", help="heads (sites with a head axis: z, q, k, v, ...)")
    p.add_argument("--neurons", default=None, metavar="N,..", help="MLP neurons (mlp_pre, mlp_post)")
    p.add_argument("--dims", default=None, metavar="D,..", help="residual dimensions (d_model sites)")
    p.add_argument("--positions", default=None, metavar="P,..", help="positions (default: all)")
    p.add_argument("--method", default="zero", choices=["zero", "mean", "resample"], help="ablation (default zero)")
    p.add_argument("--reference", action="append", default=None, metavar="TEXT",
                   help="reference prompt for mean / resample ablation (repeat for a batch)")
    p.add_argument("--reference-tokens", action="append", default=None, metavar="IDS",
                   help="reference prompt as token ids (repeatable)")
    p.add_argument("--mean-over-positions", action="store_true",
                   help="mean over the reference's positions too (needed when its length differs)")
    p.add_argument("--seed", type=seed, default=0, help="resample seed (default 0)")
    p.add_argument("--neuron-action", default=None, choices=["ablate", "scale", "set"],
                   help="study one neuron: zero it, scale it by --value, or set it to --value")
    p.add_argument("--value", type=real, default=None, help="factor (scale) or activation (set)")
    p.add_argument("--sweep", default=None, choices=["heads", "neurons"], help="ablate every head / neuron in turn")
    p.add_argument("--metric", default=None, choices=CAUSAL_METRICS,
                   help="sweep metric at the last position (default: log_prob with --answer, else kl)")
    add_token_arg(p, "answer", "the answer token for the sweep metric")
    add_token_arg(p, "wrong", "the wrong token for logit_diff")
    p.add_argument("--top", type=count, default=10, help="tokens / units to list (default 10)")
    add_plot_arg(p, "save the next-token probabilities before and after; with --sweep, a layer x unit heatmap "
                    "(the largest effects when there are more than 64 units)")
    add_json_arg(p)
    p.set_defaults(func=cmd_ablate)


def reference_batch(model, args, seq: int):
    """(tokens [ref_batch, ref_seq], mask or None, per_position) of the --reference prompts, left-padded."""
    refs = [prompt_ids(model, text, None, what="--reference") for text in args.reference or []]
    refs += [prompt_ids(model, None, ids, tokens_flag="--reference-tokens") for ids in args.reference_tokens or []]
    if not refs:
        if args.method != "zero":
            raise CLIError(f"{args.method} ablation needs --reference TEXT (or --reference-tokens IDS) prompts")
        return None, None, True
    width = max(len(r) for r in refs)
    same_length = all(len(r) == seq for r in refs)
    if args.method == "resample" and not same_length:
        raise CLIError(f"resample ablation needs reference prompts of the prompt's length ({seq} tokens)")
    per_position = not args.mean_over_positions
    if per_position and not same_length:
        raise CLIError(f"per-position mean ablation needs reference prompts of the prompt's length ({seq} tokens); "
                       "add --mean-over-positions")
    tokens = np.zeros((len(refs), width), np.int64)
    mask = np.zeros((len(refs), width), np.int64)
    for i, r in enumerate(refs):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return tokens, (None if mask.all() else mask), per_position


def cmd_ablate(args) -> None:
    from probes import ablation

    model = load_model(args)
    config = model.config
    ids = prompt_ids(model, args.prompt, args.tokens)
    tokens = np.asarray([ids])
    layers = int_list(args.layers, "--layers")
    check_range(layers, config.n_layer, "--layers", "layers")
    selection = {"heads": int_list(args.heads, "--heads"), "neurons": int_list(args.neurons, "--neurons"),
                 "dims": int_list(args.dims, "--dims"), "positions": int_list(args.positions, "--positions")}
    check_range(selection["heads"], config.n_head, "--heads", "heads")
    check_range(selection["neurons"], config.d_mlp, "--neurons", "neurons")
    check_range(selection["dims"], config.d_model, "--dims", "residual dimensions")
    check_range(selection["positions"], len(ids), "--positions", "positions in the prompt")
    if args.neuron_action:
        return ablate_neuron(model, args, tokens, layers, selection)
    reference, reference_mask, per_position = reference_batch(model, args, len(ids))
    if args.sweep:
        return ablate_sweep(model, args, tokens, layers, reference, reference_mask, per_position)
    site = args.site or ("z" if selection["heads"] else "mlp_post" if selection["neurons"] else "mlp_out")
    try:
        edited = ablation.ablate(model.params, tokens, config, site, layers=layers, method=args.method,
                                 reference=reference, reference_mask=reference_mask, per_position=per_position,
                                 seed=args.seed, **selection).logits
    except ValueError as e:
        raise CLIError(str(e)) from None
    original = model(tokens, keep=("logits",)).logits
    change = ablation.output_change(original, edited)
    result = {"site": site, "layers": layers if layers is not None else list(range(config.n_layer)),
              "method": args.method, **{k: v for k, v in selection.items() if v is not None},
              **distribution_change(model, change, args.top)}
    if args.plot:
        chosen = "".join(f", {k} {','.join(map(str, v))}" for k, v in selection.items() if v is not None)
        plot_change(model, ids, result, f"{args.method} ablation of {site} (layers "
                    f"{','.join(map(str, result['layers']))}{chosen})", args.plot)
    if args.json:
        print_json(result)
        return
    print(f"{model}\nprompt: {pieces(model, ids)}\nablating {site} ({args.method}) at layers {result['layers']}\n")
    print_change(result)


def distribution_change(model, change, top: int) -> dict:
    """The JSON of an OutputChange at the last position of a one-prompt batch."""
    before, after = np.exp(change.original[0]), np.exp(change.edited[0])
    (up, up_by), (down, down_by) = change.top_changes(top)
    return {
        "kl_last": float(change.kl[0, -1]),
        "kl_mean": float(change.kl[0].mean()),
        "kl_per_position": change.kl[0],
        "top_before": [{"token": int(t), "piece": piece(model, t), "probability": float(before[t]),
                        "probability_after": float(after[t])} for t in np.argsort(-before)[:top]],
        "top_after": [{"token": int(t), "piece": piece(model, t), "probability": float(after[t]),
                       "probability_before": float(before[t])} for t in np.argsort(-after)[:top]],
        "promoted": [{"token": int(t), "piece": piece(model, t), "log_prob_change": float(c)}
                     for t, c in zip(up, up_by)],
        "suppressed": [{"token": int(t), "piece": piece(model, t), "log_prob_change": float(c)}
                       for t, c in zip(down, down_by)],
    }


def plot_change(model, ids, result: dict, what: str, path: str) -> None:
    from probes import plots

    top = result["top_before"]
    save_plot(plots.distribution_change([t["piece"] for t in top], [t["probability"] for t in top],
                                        [t["probability_after"] for t in top], kl=result["kl_last"],
                                        what=f"next-token probabilities before and after {what}",
                                        model=model.source, prompt=decode(model, ids)), path)


def print_change(result: dict) -> None:
    print(f"KL(original || edited) at the last position: {result['kl_last']:.4g}, mean over positions: "
          f"{result['kl_mean']:.4g}\n")
    print(table([[repr(t["piece"]), t["token"], t["probability"], t["probability_after"]]
                 for t in result["top_before"]], ["next token", "id", "P before", "P after"]))
    print()
    print(table([[repr(u["piece"]), u["log_prob_change"], repr(d["piece"]), d["log_prob_change"]]
                 for u, d in zip(result["promoted"], result["suppressed"])],
                ["promoted", "d log P", "suppressed", "d log P"]))


def ablate_neuron(model, args, tokens, layers, selection) -> None:
    from probes import ablation

    if not layers or len(layers) != 1 or not selection["neurons"] or len(selection["neurons"]) != 1:
        raise CLIError("--neuron-action studies one neuron: give --layers L --neurons N (one of each)")
    if args.neuron_action != "ablate" and args.value is None:
        raise CLIError(f"--neuron-action {args.neuron_action} needs --value")
    layer, neuron = layers[0], selection["neurons"][0]
    study = ablation.neuron_study(model.params, tokens, model.config, layer, neuron, action=args.neuron_action,
                                  value=args.value, positions=selection["positions"])
    direct = np.argsort(-study.direct_logits)[:args.top]
    result = {"layer": layer, "neuron": neuron, "action": args.neuron_action, "value": args.value,
              "activation": study.activation[0],
              "direct_logits_top": [{"token": int(t), "piece": piece(model, t),
                                     "logit": float(study.direct_logits[t])} for t in direct],
              **distribution_change(model, study.change, args.top)}
    if args.plot:
        action = args.neuron_action + (f" {args.value:g}" if args.value is not None else "")
        plot_change(model, tokens[0].tolist(), result, f"neuron {neuron} of layer {layer} ({action})", args.plot)
    if args.json:
        print_json(result)
        return
    ids = tokens[0].tolist()
    print(f"{model}\nneuron {neuron} of layer {layer}: {args.neuron_action}"
          + (f" {args.value}" if args.value is not None else "") + "\n")
    print(table([[i, repr(p), float(a)] for i, (p, a) in enumerate(zip(pieces(model, ids), study.activation[0]))],
                ["position", "token", "activation"]))
    print("\nwrites directly (W_out row through the unembedding): "
          + ", ".join(repr(t["piece"]) for t in result["direct_logits_top"]) + "\n")
    print("output change:")
    print_change(result)


def ablate_sweep(model, args, tokens, layers, reference, reference_mask, per_position) -> None:
    from probes import ablation

    answer = token_arg(model, args.answer, args.answer_id, "answer")
    wrong = token_arg(model, args.wrong, args.wrong_id, "wrong")
    metric = args.metric or ("log_prob" if answer is not None else "kl")
    site, axis = {"heads": ("z", "head"), "neurons": ("mlp_post", "d_mlp")}[args.sweep]
    site = args.site or site
    try:
        result = ablation.ablation_sweep(model.params, tokens, model.config, site=site, axis=axis, metric=metric,
                                         answer=answer, wrong=wrong, method=args.method, reference=reference,
                                         reference_mask=reference_mask, per_position=per_position, seed=args.seed,
                                         layers=layers)
    except ValueError as e:
        raise CLIError(str(e)) from None
    unit = {"heads": "head", "neurons": "neuron"}[args.sweep]
    rows, columns = np.unravel_index(np.argsort(-np.abs(result.effect), axis=None)[:args.top], result.effect.shape)
    top = [{"layer": int(result.layers[r]), unit: int(result.units[c]), "value": float(result.values[r, c]),
            "effect": float(result.effect[r, c])} for r, c in zip(rows, columns)]
    if args.plot:
        from probes import plots

        save_plot(plots.layer_unit_grid(
            {f"{metric} change, {site}": result.effect}, result.layers, result.units, unit=unit,
            value_label=f"change in {metric} (ablated - baseline {result.baseline:.3g})",
            what=f"{args.method} ablation of each {unit}: change in {metric} at the last position",
            model=model.source, prompt=decode(model, tokens[0])), args.plot)
    out = {"sweep": args.sweep, "site": site, "method": args.method, "metric": metric, "answer": answer,
           "wrong": wrong, "baseline": result.baseline, "layers": result.layers, "units": result.units,
           "values": result.values, "effect": result.effect, "top": top}
    if args.json:
        print_json(out)
        return
    print(f"{model}\n{args.method}-ablating each {unit} ({site}), metric {metric} at the last position; "
          f"baseline {result.baseline:.4g}\n")
    print(table([[t["layer"], t[unit], t["value"], t["effect"]] for t in top], ["layer", unit, metric, "effect"]))


# -------------------------------------------------------------------------------------------------- patch


def register_patch(subparsers) -> None:
    p = subparsers.add_parser(
        "patch", help="activation patching between a clean and a corrupted prompt (and attribution patching)",
        description="Run the corrupted prompt with one activation from the clean run (--direction denoise, the "
        "default), or the reverse (noise), for every layer x position (--by position) of each --site, or every "
        "head / neuron / layer; report the metric and the normalised recovery (patched - corrupt) / (clean - "
        "corrupt). The prompts must have the same number of tokens. --attribution adds the gradient-based "
        "estimate of every patch from one backward pass.")
    p.add_argument("--clean", default=None, metavar="TEXT", help="the clean prompt")
    p.add_argument("--corrupt", default=None, metavar="TEXT", help="the corrupted prompt (same token count)")
    p.add_argument("--clean-tokens", default=None, metavar="IDS", help="the clean prompt as token ids")
    p.add_argument("--corrupt-tokens", default=None, metavar="IDS", help="the corrupted prompt as token ids")
    add_model_args(p)
    add_process_args(p)
    add_token_arg(p, "answer", "the answer token (default: the clean run's top token)")
    add_token_arg(p, "wrong", "the wrong token for logit_diff (default: the corrupted run's top token)")
    p.add_argument("--site", default=None, metavar="SITE,..",
                   help="sites (default: resid_pre,attn_out,mlp_out by position; z by head; mlp_post by neuron)")
    p.add_argument("--by", default="position", choices=["position", "head", "neuron", "dim", "layer"],
                   help="granularity (default position)")
    p.add_argument("--metric", default="logit_diff", choices=CAUSAL_METRICS, help="metric (default logit_diff)")
    p.add_argument("--direction", default="denoise", choices=["denoise", "noise"], help="default denoise")
    p.add_argument("--layers", default=None, metavar="L,..", help="layers (default: all)")
    p.add_argument("--attribution", action="store_true", help="also report attribution patching's estimates")
    add_plot_arg(p, "save a layer x unit heatmap per site")
    add_json_arg(p)
    p.set_defaults(func=cmd_patch)


def cmd_patch(args) -> None:
    import jax

    import tinygpt
    from probes import patching

    model = load_model(args)
    config = model.config
    clean = prompt_ids(model, args.clean, args.clean_tokens, what="--clean", tokens_flag="--clean-tokens")
    corrupt = prompt_ids(model, args.corrupt, args.corrupt_tokens, what="--corrupt",
                         tokens_flag="--corrupt-tokens")
    if len(clean) != len(corrupt):
        raise CLIError(f"the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupt)}: patching "
                       f"matches positions, so they must have the same length ({pieces(model, clean)} vs "
                       f"{pieces(model, corrupt)})")
    layers = int_list(args.layers, "--layers")
    check_range(layers, config.n_layer, "--layers", "layers")
    default_site = {"position": "resid_pre,attn_out,mlp_out", "head": "z", "neuron": "mlp_post", "dim": "resid_pre",
                    "layer": "resid_pre,attn_out,mlp_out"}[args.by]
    sites = [s for s in (args.site or default_site).split(",") if s]
    tokens = np.asarray([clean, corrupt])
    logits = tinygpt.forward(model.params, tokens, config, keep=("logits",)).logits[:, -1]
    answer = token_arg(model, args.answer, args.answer_id, "answer")
    wrong = token_arg(model, args.wrong, args.wrong_id, "wrong")
    answer = int(jax.numpy.argmax(logits[0])) if answer is None else answer
    wrong = int(jax.numpy.argmax(logits[1])) if wrong is None else wrong
    if args.metric == "logit_diff" and answer == wrong:
        raise CLIError(f"the answer and the wrong token are both {piece(model, answer)!r}; give --wrong, or use "
                       "--metric log_prob")
    results, estimates = {}, {}
    try:
        for site in sites:
            results[site] = patching.patching_sweep(
                model.params, [clean], [corrupt], config, site=site, by=args.by, metric=args.metric, answer=answer,
                wrong=wrong, direction=args.direction, layers=layers)
        if args.attribution:
            attribution = patching.attribution_patching(model.params, [clean], [corrupt], config, sites=tuple(sites),
                                                        metric=args.metric, answer=answer, wrong=wrong,
                                                        direction=args.direction)
            axis = patching.GRANULARITIES[args.by]
            for site in sites:
                grid = attribution.by_layer(site)[:, None] if axis is None else attribution.by(site, axis)
                estimates[site] = grid[results[site].layers][:, results[site].units]
    except ValueError as e:
        raise CLIError(str(e)) from None
    first = next(iter(results.values()))
    unit = {"position": "position", "head": "head", "neuron": "neuron", "dim": "dim", "layer": "layer"}[args.by]
    out = {"clean_tokens": clean, "corrupt_tokens": corrupt, "answer": answer, "answer_piece": piece(model, answer),
           "wrong": wrong, "wrong_piece": piece(model, wrong), "metric": args.metric, "direction": args.direction,
           "by": args.by, "clean_metric": first.clean, "corrupt_metric": first.corrupt,
           "layers": first.layers, "units": first.units,
           "results": {site: {"values": r.values, "recovery": r.recovery} for site, r in results.items()}}
    if args.attribution:
        out["attribution"] = {site: {"estimate": e, "exact_effect": results[site].values - (
            results[site].corrupt if args.direction == "denoise" else results[site].clean)}
            for site, e in estimates.items()}
    if args.plot:
        from probes import plots

        xticks = ([f"{i} {p}" for i, p in enumerate(plots.tokens(pieces(model, clean), 10))]
                  if args.by == "position" else [str(u) for u in first.units])
        metric = f"{args.metric} of {piece(model, answer)!r}" + (
            f" over {piece(model, wrong)!r}" if args.metric == "logit_diff" else "")
        save_plot(plots.layer_unit_grid(
            {site: r.recovery for site, r in results.items()}, first.layers, first.units, unit=unit,
            unit_labels=xticks, value_label="normalised recovery (patched - corrupt) / (clean - corrupt)",
            what=f"activation patching ({args.direction}) by {args.by}: recovery of {metric}",
            model=model.source, prompt=f"{decode(model, clean)}' vs '{decode(model, corrupt)}"), args.plot)
    if args.json:
        print_json(out)
        return
    print(f"{model}\nclean:   {pieces(model, clean)}\ncorrupt: {pieces(model, corrupt)}\n{args.metric} of "
          f"{piece(model, answer)!r}" + (f" over {piece(model, wrong)!r}" if args.metric == "logit_diff" else "")
          + f": clean {first.clean:.4g}, corrupt {first.corrupt:.4g}; {args.direction}, by {args.by}\n")
    labels = (pieces(model, clean) if args.by == "position" else [str(u) for u in first.units])
    for site, r in results.items():
        print(f"normalised recovery, {site} (rows: layers)")
        header = ["layer"] + [f"{u}" if args.by != "position" else f"{u}:{labels[u]!r}" for u in r.units]
        print(table([[int(l)] + [float(v) for v in row] for l, row in zip(r.layers, r.recovery)], header))
        if args.attribution:
            print(f"attribution estimate of {args.metric} change, {site}")
            print(table([[int(l)] + [float(v) for v in row] for l, row in zip(r.layers, estimates[site])], header))
        print()


# -------------------------------------------------------------------------------------------------- trace


def register_trace(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="causal tracing (ROME): where the state recalling a fact lives",
        description="Corrupt the subject's token embeddings (its first occurrence in the prompt, as ROME; "
        "--occurrence picks another) with Gaussian noise (--noise x the std of their embeddings, --samples seeded "
        "samples; --noise-draw rome draws them as ROME does), then restore the clean state at each layer x "
        "position for the residual stream, the MLP output and the attention output (the latter two over a --window "
        "of layers); report P(answer) restored, and the total and indirect effects. --plot draws ROME's heatmaps.")
    add_prompt_args(p)
    add_model_args(p)
    add_process_args(p)
    p.add_argument("--subject", default=None, metavar="TEXT", help="the subject, as it appears in PROMPT")
    p.add_argument("--subject-positions", default=None, metavar="P,..",
                   help="the subject's token positions (with --tokens)")
    p.add_argument("--occurrence", type=integer, default=None, metavar="N",
                   help="which occurrence of --subject to corrupt: 0 the first (default, as ROME), 1 the second, "
                        "-1 the last")
    add_token_arg(p, "answer", "the traced answer (default: the clean run's top token)")
    p.add_argument("--kinds", default="resid_post,mlp_out,attn_out", metavar="KIND,..",
                   help="restored sites, of resid_pre, resid_post, mlp_out, attn_out (default: "
                        "resid_post,mlp_out,attn_out: block outputs, as ROME's hidden-state trace)")
    p.add_argument("--window", type=count, default=10, help="layers restored together for mlp_out/attn_out (10)")
    p.add_argument("--samples", type=count, default=10, help="noise samples (default 10)")
    p.add_argument("--noise", type=positive, default=3.0, help="noise std as a multiple of the subject embeddings' "
                                                            "std (default 3)")
    p.add_argument("--noise-std", type=positive, default=None,
                   help="absolute noise std (overrides --noise); ROME fixes it for all prompts at 3 x the std of "
                        "the embeddings of all its subjects' tokens (probes.tracing.embedding_std)")
    p.add_argument("--seed", type=seed, default=0, help="noise seed (default 0)")
    p.add_argument("--noise-draw", choices=["jax", "rome"], default="jax",
                   help="jax: seeded jax.random (default); rome: ROME's numpy RandomState(1).randn draw, to "
                        "reproduce its numbers (--seed unused)")
    add_plot_arg(p, "save ROME's heatmaps (tokens x layers)")
    add_json_arg(p)
    p.set_defaults(func=cmd_trace)


def cmd_trace(args) -> None:
    from probes import tracing

    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    if (args.subject is None) == (args.subject_positions is None):
        raise CLIError("give the subject: --subject TEXT (as it appears in the prompt) or --subject-positions P,..")
    if args.subject is not None:
        if model.tokenizer is None:
            raise CLIError(f"model {model.source!r} has no tokenizer; use --subject-positions P,..")
        try:
            subject = tracing.find_subject(model.tokenizer, ids, args.subject, occurrence=args.occurrence or 0)
        except ValueError as e:
            raise CLIError(str(e).replace("occurrence=", "--occurrence ")) from None
    else:
        if args.occurrence is not None:
            raise CLIError("--occurrence picks an occurrence of --subject TEXT; leave it out with --subject-positions")
        subject = int_list(args.subject_positions, "--subject-positions")
        check_range(subject, len(ids), "--subject-positions", "positions in the prompt")
    answer = token_arg(model, args.answer, args.answer_id, "answer")
    kinds = [k for k in args.kinds.split(",") if k]
    if args.samples < 1 or args.window < 1:
        raise CLIError("--samples and --window must be at least 1")
    try:
        result = tracing.causal_trace(model.params, ids, model.config, subject, answer=answer, kinds=kinds,
                                      samples=args.samples, noise=args.noise, noise_std=args.noise_std,
                                      seed=args.seed, window=args.window,
                                      noise_values="rome" if args.noise_draw == "rome" else None)
    except ValueError as e:
        raise CLIError(str(e)) from None
    labels = pieces(model, ids)
    if args.plot:
        from probes import plots

        save_plot(plots.causal_trace(result, labels, answer=piece(model, result.answer), model=model.source,
                                     prompt=decode(model, ids)), args.plot)
    out = {"tokens": ids, "pieces": labels, "subject_positions": subject, "answer": result.answer,
           "answer_piece": piece(model, result.answer), "clean_prob": result.clean_prob,
           "corrupt_prob": result.corrupt_prob, "total_effect": result.total_effect, "noise_std": result.noise_std,
           "samples": result.samples, "window": result.window, "seed": result.seed,
           "noise_draw": result.noise_draw, "scores": result.scores,
           "indirect_effect": {k: result.indirect_effect(k) for k in result.scores}}
    if args.json:
        print_json(out)
        return
    print(f"{model}\nprompt: {labels}\nsubject: {[labels[i] for i in subject]} (positions {subject})\n"
          f"P({piece(model, result.answer)!r}): clean {result.clean_prob:.4g}, corrupted {result.corrupt_prob:.4g} "
          f"(noise std {result.noise_std:.3g}, {result.samples} samples, {result.noise_draw} draw); "
          f"total effect {result.total_effect:.4g}\n")
    for kind, scores in result.scores.items():
        print(f"P(answer) restoring {kind}" + ("" if kind in tracing.RESIDUAL_KINDS else
                                               f" (window {result.window})") + " (rows: tokens, columns: layers)")
        rows = [[f"{i}:{labels[i]!r}" + ("*" if i in subject else "")] + [float(v) for v in scores[:, i]]
                for i in range(len(ids))]
        print(table(rows, ["token"] + [str(l) for l in range(scores.shape[0])]))
        layer, position = np.unravel_index(np.argmax(scores), scores.shape)
        print(f"largest indirect effect {scores[layer, position] - result.corrupt_prob:.4g} at layer {layer}, "
              f"position {position} ({labels[position]!r})\n")


# ------------------------------------------------------------------------------------------------ massive


def register_massive(subparsers) -> None:
    p = subparsers.add_parser(
        "massive", help="massive activations: detect, exclusion tests, MLP stages, W_out geometry, intervention",
        description="Find residual activations with |value| > --threshold and >= --ratio x the median |value| of "
        "their hidden state (layer = the block whose output holds it), follow each dim across layers, rerun with "
        "attention and then MLPs disabled, look inside the MLP of the layer where they first appear (input, after "
        "W_in, after GELU, output), relate that layer's W_out spectrum to them, and set them to zero / to their "
        "mean to see the loss change.")
    p.add_argument("prompt", nargs="*", metavar="PROMPT", help="prompts (several give means over prompts)")
    p.add_argument("--tokens", action="append", default=None, metavar="IDS",
                   help="a prompt as comma-separated token ids (repeatable)")
    add_model_args(p)
    p.add_argument("--threshold", type=nonnegative, default=100.0, help="minimum |value| (default 100)")
    p.add_argument("--ratio", type=nonnegative, default=1000.0, help="minimum |value| / median |value| (default 1000)")
    p.add_argument("--top", type=count, default=4, help="activations followed in the exclusion test (default 4)")
    add_plot_arg(p, "save trajectories and the W_out regression")
    add_json_arg(p)
    p.set_defaults(func=cmd_massive)


def cmd_massive(args) -> None:
    from probes import massive

    model = load_model(args)
    prompts = [prompt_ids(model, text, None) for text in args.prompt]
    prompts += [prompt_ids(model, None, ids) for ids in args.tokens or []]
    if not prompts:
        raise CLIError("give at least one PROMPT or --tokens IDS")
    report = massive.investigate(model.params, model.config, prompts, threshold=args.threshold, ratio=args.ratio,
                                 top=args.top)
    out = massive_json(model, report)
    if args.plot:
        from probes import plots

        shown = decode(model, prompts[0]) + (f" (+{len(prompts) - 1} more)" if len(prompts) > 1 else "")
        save_plot(plots.massive(report, model=model.source, prompt=shown), args.plot)
    if args.json:
        print_json(out)
        return
    print_massive(model, report, out)


def massive_json(model, report) -> dict:
    out = {"threshold": report.threshold, "ratio": report.ratio, "prompts": report.prompts,
           "activations": [{"layer": a.layer, "dim": a.dim, "position": a.position, "token": a.token,
                            "piece": piece(model, a.token), "value": a.value, "ratio": a.ratio, "prompt": a.prompt}
                           for a in report.activations],
           "first_layer": report.first_layer,
           "trajectories": [{"dim": t.dim, "prompt": t.prompt, "position": t.position, "token": t.token,
                             "values": t.values} for t in report.trajectories],
           "exclusion": [{"dim": e.dim, "prompt": e.prompt, "position": e.position, "baseline": e.baseline,
                          "attention_off": e.attention_off, "mlp_off": e.mlp_off,
                          "attention_off_change_percent": e.attention_off_change,
                          "mlp_off_change_percent": e.mlp_off_change} for e in report.exclusion],
           "mlp": None, "geometry": None, "intervention": None}
    if report.mlp is not None:
        out["mlp"] = {"layer": report.mlp.layer, "massive_positions": report.mlp.massive,
                      "other_positions": report.mlp.others, "argmax": report.mlp.argmax}
    if report.geometry is not None:
        g = report.geometry
        out["geometry"] = {"layer": g.layer, "dim": g.dim, "sigma1": g.sigma1, "sigma2": g.sigma2,
                           "sigma_ratio": g.ratio, "slope": g.slope, "intercept": g.intercept, "r2": g.r2}
    if report.intervention is not None:
        i = report.intervention
        out["intervention"] = {"layer": i.layer, "loss": i.loss, "loss_zero": i.loss_zero, "loss_mean": i.loss_mean,
                               "change_zero": i.change_zero, "change_mean": i.change_mean,
                               "means": {str(d): v for d, v in i.means.items()}}
    return out


def print_massive(model, report, out: dict) -> None:
    print(f"{model}\nmassive activations: |value| > {report.threshold:g} and >= {report.ratio:g} x median\n")
    if not report.activations:
        print("none found")
        return
    print(table([[a["layer"], a["dim"], a["prompt"], a["position"], repr(a["piece"]), a["value"], a["ratio"]]
                 for a in out["activations"][:40]],
                ["layer", "dim", "prompt", "position", "token", "value", "ratio"]))
    if len(out["activations"]) > 40:
        print(f"... {len(out['activations']) - 40} more (--json lists all)")
    print("\ntrajectories (value at each block's output):")
    print(table([[t.dim, t.prompt, t.position] + [float(v) for v in t.values] for t in report.trajectories],
                ["dim", "prompt", "position"] + [f"L{l}" for l in range(model.config.n_layer)]))
    print("\nexclusion: percent change per layer with attention off / MLPs off (where the activation is massive)")
    rows = []
    for e in report.exclusion:
        massive_there = np.abs(e.baseline) > report.threshold

        def percents(change):
            return [f"{v:+.1f}%" if m else "-" for v, m in zip(change, massive_there)]

        rows.append([e.dim, e.position, "attention off"] + percents(e.attention_off_change))
        rows.append(["", "", "MLPs off"] + percents(e.mlp_off_change))
    print(table(rows, ["dim", "position", "run"] + [f"L{l}" for l in range(model.config.n_layer)]))
    m = report.mlp
    print(f"\ninside the MLP of layer {m.layer} (max |value|):")
    print(table([[stage, m.massive[stage], m.argmax[stage], m.others[stage] if m.others[stage] is not None else "-"]
                 for stage in m.massive], ["stage", "massive positions", "at index", "other positions"]))
    g = report.geometry
    print(f"\nW_out of layer {g.layer}: sigma1 {g.sigma1:.4g}, sigma2 {g.sigma2:.4g}, ratio {g.ratio:.4g}; "
          f"mlp_out[{g.dim}] = {g.slope:.4g} (h . v1) + {g.intercept:.4g}, R^2 {g.r2:.4f}")
    i = report.intervention
    print(f"\nloss {i.loss:.4f}; massive activations of layer {i.layer} set to zero: {i.loss_zero:.4f} "
          f"({i.change_zero:+.4f}), set to their mean: {i.loss_mean:.4f} ({i.change_mean:+.4f})")


