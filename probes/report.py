"""A one-page HTML report of one prompt: what the model predicts and a first look at how.

`report(model, prompt, answer=..., subject=...)` runs the existing probes and draws their figures through
`probes.plots`:

    tokens       the tokenisation: each token's text (escaped) and id
    predictions  the model's top next tokens at the last position (`probes.lens`, the model's own logits)
    lens         the logit lens (`probes.lens.logit_lens`): each layer's top token and its probability at every
                 position, and the answer's rank when `answer` is given
    attention    every head's pattern (`probes.attention.attention_patterns`), one image per (layer, head),
                 picked with a layer and a head menu
    attribution  direct logit attribution of the answer at the last position
                 (`probes.attribution.direct_logit_attribution`; only with `answer`)
    massive      per layer, the largest residual activation against the massive threshold
                 (`probes.massive.layer_summary`)
    tracing      ROME's causal trace (`probes.tracing.causal_trace`): restoring the residual stream, the MLP
                 output and the attention output; the corrupted run's P(answer) marked on each colour bar
                 (only with `subject`; the answer defaults to the model's top token)

The page is one self-contained file: inline CSS and JS, figures as base64 PNGs, no URL of any kind, so it
opens without a network. It states the model (source and sizes), the prompt and tinygpt's version.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from tinygpt import version  # tinygpt's version, stated on the page
from tinygpt.display import Html, displayable, esc, number, table_html
from tinygpt.errors import InputError
from tinygpt.files import atomic_write
from tinygpt.inputs import check_tokens, checks_tokens

SECTIONS = ("tokens", "predictions", "lens", "attention", "attribution", "massive", "tracing")


@displayable
@dataclasses.dataclass
class Report:
    """A one-page HTML report of one prompt (`report`): `.save(path)` writes `html`, a notebook shows `body`."""

    prompt: str
    model: str  # the model's source ("embedded", a hub id, a directory)
    version: str  # tinygpt's
    tokens: list[int]
    answer: int | None
    subject: str | None
    sections: list[str]  # the ids of the page's sections, in order
    body: str  # the page's content: one <div> with its style and script, for a notebook
    html: str  # the whole page

    def save(self, path) -> Path:
        """Write the page to `path` atomically (`tinygpt.files.atomic_write`); returns the path."""
        path = Path(path)
        with atomic_write(path, "w") as f:
            f.write(self.html)
        return path

    def _display_fields(self):
        return ["prompt", "model", "version", "tokens", "answer", "subject", "sections"]


Report._repr_html_ = lambda self: self.body  # the page itself, not the field table `displayable` gives


# ---------------------------------------------------------------------------------------------- compute


class _Progress:
    """Steps of the computation: a tqdm bar on stderr (`progress=True`), a callback(step, done, total), or
    nothing."""

    def __init__(self, progress, total: int):
        self.callback, self.bar, self.done, self.total = None, None, 0, total
        if callable(progress):
            self.callback = progress
        elif progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="report", unit="step", file=sys.stderr, leave=False)

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        if self.callback is not None:
            self.callback(name, self.done, self.total)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.callback is not None:
            self.callback("done", self.done, self.total)


def _answer_id(model, answer) -> int | None:
    """`answer` as one token id: an int (checked against the vocabulary) or text that is exactly one token."""
    if answer is None:
        return None
    if isinstance(answer, (int, np.integer)):
        if not 0 <= int(answer) < model.config.vocab_size:
            raise InputError(f"answer token id {int(answer)} is outside the vocabulary [0, {model.config.vocab_size})")
        return int(answer)
    if model.tokenizer is None:
        raise InputError(f"model {model.source!r} has no tokenizer: give answer as a token id")
    ids = model.tokenizer.encode(str(answer))
    if len(ids) != 1:
        raise InputError(f"answer {answer!r} is {len(ids)} tokens {model.tokenizer.pieces(ids)}; give one token "
                         "(mind the leading space) or its id")
    return ids[0]


@checks_tokens("prompt")
def report(model, prompt, *, answer=None, subject: str | None = None, occurrence: int = 0, top_k: int = 10,
           lens_sites=("resid_post",), trace_samples: int = 10, trace_window: int = 10, seed: int = 0,
           trace_buckets: int | None = None,
           massive_threshold: float = 100.0, massive_ratio: float = 1000.0, progress=True) -> Report:
    """The HTML report of `prompt` (text, or token ids [seq]) on `model` (`tinygpt.load`).
    answer         the token to explain: text that is one token (" light") or a token id; adds its rank to the
                   lens, the direct logit attribution, and is the traced answer
    subject        text in the prompt: adds ROME's causal trace (of `answer`, else of the model's top token),
                   corrupting its `occurrence`-th occurrence (0: the first, as ROME)
    top_k          next-token predictions listed
    lens_sites     the residual sites the lens reads (`probes.lens.LENS_SITES`)
    trace_samples, trace_window, seed   the causal trace's noise samples, MLP/attention window, noise seed
    trace_buckets  compiled position groups of the trace (`probes.tracing.causal_trace`'s buckets; the same
                   numbers either way): default 1 for prompts up to 32 tokens (less to compile), else 2
    massive_threshold, massive_ratio    what counts as massive (`probes.massive.massive_mask`)
    progress       True: a tqdm bar on stderr; False: none; a callable: called (step, done, total)"""
    import jax

    from probes import attribution, lens, massive, plots, tracing
    from probes.attention import attention_patterns

    config, params = model.config, model.params
    if isinstance(prompt, str):
        ids = [int(i) for i in np.asarray(model.encode(prompt)).reshape(-1)]
        text = prompt
    else:
        ids = [int(i) for i in check_tokens(np.asarray(prompt).reshape(1, -1), config, "prompt")[0]]
        text = model.text(ids)
    if not ids:
        raise InputError("the prompt is empty")
    if len(ids) > config.n_ctx:
        raise InputError(f"the prompt's {len(ids)} tokens are longer than the model's context n_ctx={config.n_ctx}")
    answer_id = _answer_id(model, answer)
    subject_positions = None
    if subject is not None:
        if model.tokenizer is None:
            raise InputError(f"model {model.source!r} has no tokenizer to find the subject {subject!r} in")
        subject_positions = tracing.find_subject(model.tokenizer, ids, subject, occurrence=occurrence)

    tokens = np.asarray([ids], np.int32)
    pieces = model.token_texts(ids)
    source = model.source or "unnamed"
    where = dict(model=source, prompt=text)
    n_layer, n_head = config.n_layer, config.n_head
    steps = 4 + (answer_id is not None) + (subject is not None) + n_layer * n_head
    bar = _Progress(progress, steps)
    sections, started = [], time.perf_counter()
    try:
        bar.step("logit lens")
        result = lens.logit_lens(params, config, tokens, sites=lens_sites, target=answer_id, k=max(top_k, 1))
        top_pieces = np.vectorize(lambda t: model.token_texts([t])[0], otypes=[object])(result.top_ids[:, :, 0, :, 0])
        answer_piece = None if answer_id is None else model.token_texts([answer_id])[0]
        sections.append(_tokens_section(ids, pieces, subject_positions))
        sections.append(_predictions_section(model, result, top_k, answer_id))
        lens_fig = plots.logit_lens(result, pieces, top_pieces, target=answer_piece, ranks=answer_id is not None,
                                    **where)
        sections.append(_lens_section(result, pieces, top_pieces, lens_fig, answer_piece))
        bar.advance()

        bar.step("attention")
        pattern = np.asarray(jax.device_get(attention_patterns(params, config, tokens)))[:, 0]  # [layer, head, seq, key]
        bar.advance()
        images = {}
        for layer in range(n_layer):
            for head in range(n_head):
                bar.step(f"attention L{layer}H{head}")
                images[layer, head] = plots.to_png_bytes(
                    plots.attention_head(pattern[layer, head], pieces, layer=layer, head=head, **where))
                bar.advance()
        sections.append(_attention_section(images, n_layer, n_head))

        if answer_id is not None:
            bar.step("direct logit attribution")
            dla = attribution.direct_logit_attribution(params, config, tokens, answer_id)
            sections.append(_attribution_section(dla, answer_piece, plots, where))
            bar.advance()
        else:
            sections.append(_section("attribution", "Direct logit attribution",
                                     "<p class='tg-note'>Give an answer token (<code>answer=</code>, "
                                     "<code>--answer</code>) to split its logit over the model's components.</p>"))

        bar.step("massive activations")
        summary = massive.layer_summary(params, config, ids, threshold=massive_threshold, ratio=massive_ratio)
        sections.append(_massive_section(summary, pieces, plots.massive_layers(summary, pieces, **where)))
        bar.advance()

        if subject is not None:
            bar.step("causal tracing")
            trace = tracing.causal_trace(params, ids, config, subject_positions, answer=answer_id,
                                         samples=trace_samples, window=trace_window, seed=seed,
                                         buckets=trace_buckets or (1 if len(ids) <= 32 else 2))
            fig = plots.causal_trace(trace, pieces, answer=model.token_texts([trace.answer])[0], **where)
            sections.append(_tracing_section(trace, subject, model.token_texts([trace.answer])[0], answer_id is None, fig))
            bar.advance()
        else:
            sections.append(_section("tracing", "Causal tracing",
                                     "<p class='tg-note'>Give a subject in the prompt (<code>subject=</code>, "
                                     "<code>--subject</code>) for ROME's causal trace.</p>"))
        bar.step("page")
        bar.advance()
    finally:
        bar.close()

    tinygpt_version = version()
    header = _header(model, text, ids, answer_id, subject, tinygpt_version, time.perf_counter() - started)
    uid = f"tg-report-{np.random.default_rng().integers(1 << 62):x}"
    body = (f'<style>{CSS}</style><div class="tg-report" id="{uid}">{header}{_nav()}'
            + "".join(sections) + f"</div><script>{JS}</script>")
    title = f"tinygpt report: {text[:80]}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title></head><body>{body}</body></html>\n")
    return Report(prompt=text, model=source, version=tinygpt_version, tokens=ids, answer=answer_id, subject=subject,
                  sections=list(SECTIONS), body=body, html=page)


# ------------------------------------------------------------------------------------------------ markup


CSS = """
.tg-report{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:14px;line-height:1.4;
 color:#1d2129;max-width:1180px;margin:0 auto;padding:12px 16px}
.tg-report h1{font-size:20px;margin:4px 0 8px}
.tg-report h2{font-size:16px;margin:0 0 6px;border-bottom:1px solid #d5d9de;padding-bottom:3px}
.tg-report section{margin:18px 0}
.tg-report .tg-meta td,.tg-report .tg-meta th{padding:1px 12px 1px 0;text-align:left;vertical-align:top}
.tg-report .tg-meta th{color:#4b5361;font-weight:600}
.tg-report .tg-prompt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;background:#f4f6f8;
 padding:2px 6px;border-radius:4px}
.tg-report nav a{margin-right:12px;color:#1f5fbf;text-decoration:none}
.tg-report .tg-tokens{display:flex;flex-wrap:wrap;gap:4px}
.tg-report .tg-token{border:1px solid #c3c9d1;border-radius:4px;padding:2px 5px;text-align:center;background:#fafbfc}
.tg-report .tg-token.tg-subject{border-color:#b3261e;background:#fdeceb}
.tg-report code.tg-tok{white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;
 background:#e6eefb;border-radius:2px;padding:0 1px}
.tg-report .tg-token .tg-id,.tg-report .tg-dim{color:#6b7380;font-size:11px}
.tg-report table{border-collapse:collapse;margin:4px 0}
.tg-report table th,.tg-report table td{border-bottom:1px solid #e3e6ea;padding:2px 10px 2px 0;text-align:left}
.tg-report td.tg-num{text-align:right;font-variant-numeric:tabular-nums}
.tg-report .tg-bar{display:inline-block;height:9px;background:#3b7dd8;vertical-align:middle}
.tg-report figure.tg-fig{margin:6px 0}
.tg-report figure.tg-fig img{max-width:100%;height:auto;display:block}
.tg-report figure.tg-fig[hidden]{display:none}
.tg-report figcaption{color:#4b5361;font-size:12px;margin-top:2px}
.tg-report .tg-picker{margin:4px 0 6px}
.tg-report .tg-picker label{margin-right:14px}
.tg-report .tg-note{color:#4b5361;font-style:italic}
.tg-report .tg-scroll{overflow-x:auto}
"""

# Wires every report on the page once (a notebook may show several): the layer and head menus show the one
# attention figure whose data-layer / data-head match, and hide the others.
JS = """
(function(){
  var reports = document.querySelectorAll('.tg-report');
  for (var r = 0; r < reports.length; r++) {
    var root = reports[r];
    if (root.getAttribute('data-wired')) continue;
    root.setAttribute('data-wired', '1');
    var pickers = root.querySelectorAll('.tg-attention');
    for (var p = 0; p < pickers.length; p++) (function(box){
      var layer = box.querySelector('select.tg-layer'), head = box.querySelector('select.tg-head');
      function show(){
        var figs = box.querySelectorAll('figure.tg-attn-fig');
        for (var i = 0; i < figs.length; i++) {
          var on = figs[i].getAttribute('data-layer') === layer.value &&
                   figs[i].getAttribute('data-head') === head.value;
          if (on) figs[i].removeAttribute('hidden'); else figs[i].setAttribute('hidden', '');
        }
      }
      layer.addEventListener('change', show);
      head.addEventListener('change', show);
      show();
    })(pickers[p]);
  }
})();
"""


def _section(key: str, title: str, inner: str) -> str:
    return f'<section id="{key}" data-section="{key}"><h2>{esc(title)}</h2>{inner}</section>'


def _figure(png: bytes, alt: str, caption: str = "", attrs: str = "", cls: str = "tg-fig") -> str:
    import base64

    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure class="{cls}"{attrs}><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
            f"{cap}</figure>")


def _fig(fig, alt: str, caption: str = "") -> str:
    from probes import plots

    return _figure(plots.to_png_bytes(fig), alt, caption)


def _shown(piece: str) -> str:
    """A token's text for the page: repr-like (quotes show its spaces; newlines as \\n), escaped."""
    return esc(repr(piece)[1:-1] if not piece.isprintable() else piece)


def _header(model, text, ids, answer_id, subject, tinygpt_version, seconds) -> str:
    from tinygpt.params import n_params

    c = model.config
    sizes = (f"{c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, d_mlp {c.d_mlp}, n_ctx {c.n_ctx}, "
             f"vocab {c.vocab_size}, {n_params(model.params):,} parameters, {model.params['wte'].dtype}")
    rows = [("model", f"<code>{esc(model.source or 'unnamed')}</code>: {esc(sizes)}"),
            ("prompt", f'<span class="tg-prompt">{esc(text)}</span> ({len(ids)} tokens)')]
    if answer_id is not None:
        rows.append(("answer", f"<code class='tg-tok'>{_shown(model.token_texts([answer_id])[0])}</code> (id {answer_id})"))
    if subject is not None:
        rows.append(("subject", f'<span class="tg-prompt">{esc(subject)}</span>'))
    rows.append(("tinygpt", f"version <code>{esc(tinygpt_version)}</code>; computed in {seconds:.1f} s"))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<h1>tinygpt report</h1><table class="tg-meta">{body}</table>'


def _nav() -> str:
    names = {"tokens": "tokens", "predictions": "predictions", "lens": "logit lens", "attention": "attention",
             "attribution": "attribution", "massive": "massive activations", "tracing": "causal tracing"}
    return "<nav>" + "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in names.items()) + "</nav>"


def _tokens_section(ids, pieces, subject_positions) -> str:
    subject = set(subject_positions or [])
    cells = "".join(
        f'<div class="tg-token{" tg-subject" if i in subject else ""}" title="position {i}">'
        f'<code class="tg-tok">{_shown(p)}</code><div class="tg-id">{i}: id {t}</div></div>'
        for i, (t, p) in enumerate(zip(ids, pieces)))
    note = " Subject tokens are outlined in red." if subject else ""
    return _section("tokens", "Tokens",
                    f'<p class="tg-dim">{len(ids)} tokens: text (escaped) and id, by position.{note}</p>'
                    f'<div class="tg-tokens">{cells}</div>')


def _predictions_section(model, result, top_k, answer_id) -> str:
    ids = result.final_top_ids[0, -1][:top_k]
    probs = result.final_top_probs[0, -1][:top_k]
    rows = []
    for rank, (t, p) in enumerate(zip(ids, probs)):
        mark = " ← answer" if answer_id is not None and int(t) == answer_id else ""
        bar = f'<span class="tg-bar" style="width:{max(1, int(round(200 * float(p))))}px"></span>'
        rows.append((rank, Html(f"<code class='tg-tok'>{_shown(model.token_texts([t])[0])}</code>{esc(mark)}"), int(t),
                     Html(f'{bar} {esc(number(float(p), 3))}')))
    extra = ""
    if answer_id is not None:
        rank = int(result.target_ranks[-1, -1, 0, -1])
        prob = float(result.target_probs[-1, -1, 0, -1])
        extra = (f"<p>The answer <code class='tg-tok'>{_shown(model.token_texts([answer_id])[0])}</code> has rank {rank} (0 = top) and "
                 f"probability {esc(number(prob, 3))} at the last layer of the lens"
                 f"{' (the model’s output)' if result.sites[-1] == 'resid_post' else ''}.</p>")
    return _section("predictions", "Top next-token predictions",
                    table_html(["rank", "token", "id", "probability"], rows,
                               caption="the model's next-token distribution after the last token") + extra)


def _lens_section(result, pieces, top_pieces, fig, answer_piece) -> str:
    n_site, n_layer, _, seq, _ = result.top_ids.shape
    header = ["layer, site"] + [f"{i} {p!r}" for i, p in enumerate(pieces)]
    rows = []
    for layer in range(n_layer):
        for s, site in enumerate(result.sites):
            cells = []
            for pos in range(seq):
                cell = f"<code class='tg-tok'>{_shown(top_pieces[s, layer, pos])}</code> {number(float(result.top_probs[s, layer, 0, pos, 0]), 2)}"
                if result.target_ranks is not None:
                    cell += f' <span class="tg-dim">#{int(result.target_ranks[s, layer, 0, pos])}</span>'
                cells.append(Html(cell))
            rows.append([f"{layer} {site}"] + cells)
    what = ("each cell: the lens's top token, its probability"
            + (f", and after # the rank of {answer_piece!r} (0 = top)" if answer_piece is not None else ""))
    caption = ("Each layer's residual stream read through the final LayerNorm and the unembedding"
               + (f"; below: the rank of {answer_piece!r} at each cell." if answer_piece is not None else "."))
    return _section("lens", "Logit lens",
                    _fig(fig, "logit lens grid", caption)
                    + f'<div class="tg-scroll">{table_html(header, rows, caption=what, labels=True)}</div>')


def _attention_section(images, n_layer, n_head) -> str:
    layers = "".join(f'<option value="{l}">{l}</option>' for l in range(n_layer))
    heads = "".join(f'<option value="{h}">{h}</option>' for h in range(n_head))
    figs = "".join(
        _figure(png, f"attention pattern of layer {l} head {h}", cls="tg-fig tg-attn-fig",
                attrs=f' data-layer="{l}" data-head="{h}"' + ("" if (l, h) == (0, 0) else " hidden"))
        for (l, h), png in images.items())
    picker = (f'<div class="tg-picker"><label>layer <select class="tg-layer" aria-label="layer">{layers}</select>'
              f'</label><label>head <select class="tg-head" aria-label="head">{heads}</select></label></div>')
    return _section("attention", "Attention patterns",
                    f'<div class="tg-attention">{picker}{figs}</div><p class="tg-dim">Each row is a query '
                    "position, each column a key it can attend to; rows sum to 1.</p>")


def _attribution_section(dla, answer_piece, plots, where) -> str:
    values = np.asarray(dla.contributions)[:, 0]
    order = np.argsort(-np.abs(values), kind="stable")[:24]
    fig = plots.attribution([dla.labels[i] for i in order], values[order], logit=float(dla.logit[0]),
                            what=f"the logit of '{plots.text(answer_piece)}' at the last position "
                                 f"(largest {len(order)} of {len(values)} components)", **where)
    rows = [(dla.labels[i], float(values[i])) for i in order[:10]]
    total = (f"<p>logit {number(float(dla.logit[0]))} = sum of the components' contributions "
             f"{number(float(values.sum()))} + the final LayerNorm's bias term {number(float(dla.bias_term[0]))}."
             "</p>")
    return _section("attribution", "Direct logit attribution",
                    _fig(fig, "direct logit attribution bars",
                         "each component's direct write to the answer's logit, final LayerNorm scale frozen")
                    + total + table_html(["component", "direct contribution"], rows, caption="the largest 10"))


def _massive_section(summary, pieces, fig) -> str:
    rows = [(layer, float(summary.max_abs[layer]), int(summary.dim[layer]),
             Html(f"{int(summary.position[layer])} <code class='tg-tok'>{_shown(pieces[int(summary.position[layer])])}</code>"),
             float(summary.to_median[layer]), float(summary.median[layer]), int(summary.count[layer]))
            for layer in range(len(summary.max_abs))]
    table = table_html(["layer", "largest |value|", "dim", "position", "x median", "median |value|", "massive"],
                       rows, caption=f"resid_post per layer; massive: |value| > {summary.threshold:g} and >= "
                                     f"{summary.ratio:g} x its hidden state's median |value| (Sun et al. 2024)")
    return _section("massive", "Massive activations", _fig(fig, "massive activations per layer") + table)


def _tracing_section(trace, subject, answer_piece, defaulted, fig) -> str:
    which = " (the model's top token: no answer was given)" if defaulted else ""
    info = (f"<p>Subject <span class='tg-prompt'>{esc(subject)}</span> (positions "
            f"{esc(', '.join(map(str, trace.subject.tolist())))}) corrupted with Gaussian noise of std "
            f"{number(trace.noise_std, 3)} ({trace.samples} samples); P(<code class='tg-tok'>{_shown(answer_piece)}</code>){esc(which)}: "
            f"clean {number(trace.clean_prob, 3)}, corrupted {number(trace.corrupt_prob, 3)} (the line on each colour "
            f"bar). MLP and attention restore a window of {trace.window} layers.</p>")
    return _section("tracing", "Causal tracing (ROME)",
                    info + _fig(fig, "causal tracing heatmaps",
                                "P(answer) after restoring the clean state at each (token, layer): hidden state, "
                                "MLP output, attention output"))
