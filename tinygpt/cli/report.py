"""`tinygpt report`: the one-page HTML report of a prompt (`probes.report`), written to --out."""

from __future__ import annotations

import sys

from .common import (
    CLIError,
    add_json_arg,
    add_model_args,
    add_prompt_args,
    add_token_arg,
    count,
    integer,
    load_model,
    output_file,
    print_json,
    prompt_ids,
    seed,
    token_arg,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="a one-page HTML report of a prompt (lens, attention, attribution, tracing, ...)",
        description="Write one self-contained HTML page (no network needed to view it) about PROMPT: its tokens, "
        "the top next-token predictions, the logit lens, every head's attention pattern (with a layer/head picker), "
        "massive activations per layer; with --answer the answer's rank in the lens and its direct logit "
        "attribution; with --subject ROME's causal trace (of --answer, else of the model's top token). A progress "
        "bar goes to stderr; the path written is printed.")
    add_prompt_args(p)
    add_model_args(p)
    p.add_argument("--out", type=output_file("--out", (".html", ".htm")), default="report.html", metavar="PATH.html",
                   help="the page to write (default report.html)")
    add_token_arg(p, "answer", "the answer to explain")
    p.add_argument("--subject", default=None, metavar="TEXT",
                   help="the subject, as it appears in PROMPT: adds ROME's causal trace")
    p.add_argument("--occurrence", type=integer, default=0, metavar="N",
                   help="which occurrence of --subject to corrupt: 0 the first (default, as ROME), -1 the last")
    p.add_argument("--samples", type=count, default=10, help="causal tracing's noise samples (default 10)")
    p.add_argument("--window", type=count, default=10,
                   help="layers restored together for the MLP and attention traces (default 10)")
    p.add_argument("--seed", type=seed, default=0, help="causal tracing's noise seed (default 0)")
    p.add_argument("--top", type=count, default=10, help="next-token predictions listed (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_arg(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from tinygpt.errors import require

    require("matplotlib", "plot", "tinygpt report")  # its figures (probes.plots): one line, before any work
    from probes import report as reports
    from probes import tracing

    model = load_model(args)
    ids = prompt_ids(model, args.prompt, args.tokens)
    answer = token_arg(model, args.answer, args.answer_id, "answer")
    if args.subject is not None:  # checked here, before any work, naming the flag (as `tinygpt trace`)
        if model.tokenizer is None:
            raise CLIError(f"--subject: model {model.source!r} has no tokenizer to find the subject in")
        try:
            tracing.find_subject(model.tokenizer, ids, args.subject, occurrence=args.occurrence)
        except ValueError as e:
            raise CLIError("--subject: " + str(e).replace("occurrence=", "--occurrence ")) from None
    try:
        result = reports.report(model, args.prompt if args.prompt is not None else ids, answer=answer,
                                subject=args.subject, occurrence=args.occurrence, top_k=args.top,
                                trace_samples=args.samples, trace_window=args.window, seed=args.seed,
                                progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    result.save(args.out)
    if args.json:
        print_json({"path": args.out, "prompt": result.prompt, "model": result.model, "version": result.version,
                    "tokens": result.tokens, "answer": result.answer, "subject": result.subject,
                    "sections": result.sections, "bytes": len(result.html.encode("utf-8"))})
    else:
        print(args.out)
    sys.stdout.flush()
