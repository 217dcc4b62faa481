"""Every picture tinygpt draws: each function takes what a probe returned and gives back a matplotlib
`Figure`; `save(fig, path)` writes it (atomically, through `tinygpt.files.save_figure`) and `to_png_bytes(fig)`
gives the PNG for embedding (the HTML report, notebooks). The CLI's `--plot` options all come here.

Rendering sits above the probes: this module imports tinygpt and probes, never the CLI, and the engine never
imports it. matplotlib is the optional `plot` extra; importing this module needs it.

One style throughout:
- the figure's title says what was measured, and on which model and prompt;
- every axis is labelled (with units where there are any), every colour bar too;
- integer axes (layers, heads, positions, steps) have one tick per integer, labelled as layer / head / token
  strings, never fractional;
- signed effects use a diverging map centred at 0 (symmetric limits), probabilities a sequential one;
- token text the font cannot draw (emoji, control characters) is shown escaped (`\\U0001f600`, `\\n`);
- layouts are constrained (labels never cut off) and no side of a saved image exceeds `MAX_PIXELS`.

No pyplot: figures are `matplotlib.figure.Figure` objects, so nothing here touches a global backend or
figure registry (a notebook's inline backend keeps working, and nothing needs closing).
"""

from __future__ import annotations

import functools
import io
import json
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colors, font_manager, ticker
from matplotlib.figure import Figure

from tinygpt.files import save_figure

DPI = 110
MAX_PIXELS = 4000  # no side of a saved image is larger
MAX_INCHES = MAX_PIXELS / DPI
MIN_INCHES = 3.2
MAX_COLUMNS = 64  # wider layer x unit grids are shown as their largest cells instead
TOP_CELLS = 24
DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"


# ---------------------------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _drawable() -> frozenset[int]:
    """Code points the default font has glyphs for."""
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(FT2Font(path).get_charmap())


def text(value: str, limit: int | None = None) -> str:
    """`value` as matplotlib can draw it: characters the font lacks and non-printing ones escaped
    (`\\U0001f600`, `\\n`), `$` escaped so it is never read as mathtext; cut to `limit` characters (with ...)."""
    drawable = _drawable()
    out = []
    for ch in str(value):
        if ch == "$":
            out.append(r"\$")
        elif ch == " " or (ch.isprintable() and ord(ch) in drawable):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = result[: limit - 3] + "..."
    return result


def token(piece: str, limit: int = 14, *, quote: bool = True) -> str:
    """A token piece as a label: escaped (`text`), in quotes (so spaces and punctuation show) unless not
    `quote`, where only pieces with leading or trailing spaces are quoted."""
    shown = text(piece, limit)
    return f"'{shown}'" if quote or shown.strip() != shown else shown


def tokens(pieces, limit: int = 14, *, quote: bool = True) -> list[str]:
    return [token(p, limit, quote=quote) for p in pieces]


def _title(fig: Figure, what: str, *, model: str | None = None, prompt: str | None = None) -> None:
    context = []
    if model:
        context.append(f"model {text(model, 40)}")
    if prompt is not None:
        context.append(f"prompt '{text(prompt, 70)}'")
    width = fig.get_size_inches()[0]
    chars = max(30, int(width * 72 / (10 * 0.6)))  # characters of a 10 pt line across the figure
    lines = textwrap.wrap(what, chars, break_on_hyphens=False) + textwrap.wrap(", ".join(context), chars, break_on_hyphens=False)
    fig.suptitle("\n".join(lines), fontsize=10)


def _figure(width: float, height: float) -> Figure:
    width = float(np.clip(width, MIN_INCHES, MAX_INCHES))
    height = float(np.clip(height, MIN_INCHES, MAX_INCHES))
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _integer_ticks(axis, labels, *, rotation: float = 0, fontsize: float = 8, max_ticks: int = 64) -> None:
    """One tick per integer 0..len(labels)-1 (every k-th when there are more than max_ticks), labelled."""
    n = len(labels)
    step = max(1, -(-n // max_ticks))
    where = np.arange(0, n, step)
    axis.set_ticks(where, [labels[i] for i in where], fontsize=fontsize)
    if rotation:
        for label in axis.get_ticklabels():
            label.set_rotation(rotation)


def _symmetric(values) -> colors.Normalize:
    """A diverging norm centred at 0, symmetric limits."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    limit = limit or 1.0
    return colors.TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)


def _colorbar(fig: Figure, image, ax, label: str):
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    height = fig.get_size_inches()[1]
    chars = max(16, int(0.7 * height * 72 / (8 * 0.6)))  # an 8 pt line along most of the bar
    bar.set_label("\n".join(textwrap.wrap(label, chars)), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _note(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)


# ---------------------------------------------------------------------------------------- saving


def describe(fig: Figure) -> dict:
    """The figure's title and every axes' title and labels; colour bars as {"colorbar": label}."""
    axes = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        bar = getattr(ax, "_colorbar", None)
        if bar is not None:
            label = ax.get_ylabel() if bar.orientation == "vertical" else ax.get_xlabel()
            axes.append({"colorbar": label})
        else:
            axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()})
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return {"title": title, "axes": axes}


def _dpi(fig: Figure) -> float:
    width, height = fig.get_size_inches()
    return min(float(fig.dpi), MAX_PIXELS / max(width, height))


def _metadata(fig: Figure, fmt: str) -> dict | None:
    info = describe(fig)
    if fmt == "png":
        return {"Title": info["title"], "Description": json.dumps(info["axes"]), "Software": "tinygpt"}
    if fmt == "svg":
        return {"Title": info["title"], "Description": json.dumps(info["axes"])}
    if fmt == "pdf":
        return {"Title": info["title"], "Subject": json.dumps(info["axes"])}
    return None


def save(fig: Figure, path) -> None:
    """Write `fig` to `path` in the format its extension names, atomically (`tinygpt.files.save_figure`), at a
    dpi that keeps both sides within MAX_PIXELS; PNG/SVG/PDF carry the title and axis labels as metadata
    (`describe`)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    kwargs = {"dpi": _dpi(fig)}
    metadata = _metadata(fig, fmt)
    if metadata:
        kwargs["metadata"] = metadata
    save_figure(fig, path, **kwargs)


def to_png_bytes(fig: Figure) -> bytes:
    """The PNG of `fig` (for embedding in HTML or a notebook)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_dpi(fig), metadata=_metadata(fig, "png"))
    return buffer.getvalue()


# ------------------------------------------------------------------------------ layer x unit effects


def layer_unit_grid(grids: dict, layers, units, *, unit: str, value_label: str, what: str,
                    unit_labels=None, model: str | None = None, prompt: str | None = None) -> Figure:
    """Signed effects {panel name: [layer, unit]} (ablation sweeps, patching): a heatmap per panel, layers
    down, units across, a diverging map centred at 0 shared by the panels. Grids wider than MAX_COLUMNS
    units (neurons, residual dims) show their TOP_CELLS largest |effects| as bars instead."""
    layers = [int(l) for l in layers]
    units = list(units)
    unit_labels = [str(u) for u in units] if unit_labels is None else list(unit_labels)
    if len(units) > MAX_COLUMNS:
        return _top_cells(grids, layers, units, unit=unit, value_label=value_label, what=what, model=model,
                          prompt=prompt)
    n = len(grids)
    width = 1.6 + n * (1.4 + 0.32 * len(units))
    fig = _figure(width, 2.2 + 0.3 * len(layers) + 0.06 * max(len(u) for u in unit_labels))
    axes = fig.subplots(1, n, squeeze=False)[0]
    norm = _symmetric(np.concatenate([np.ravel(g) for g in grids.values()]))
    for ax, (name, grid) in zip(axes, grids.items()):
        image = ax.imshow(np.asarray(grid, np.float64), cmap=DIVERGING, norm=norm, aspect="auto",
                          interpolation="nearest")
        ax.set_title(text(name), fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylabel("layer")
        _integer_ticks(ax.xaxis, unit_labels, rotation=90 if max(map(len, unit_labels)) > 2 else 0)
        _integer_ticks(ax.yaxis, [str(l) for l in layers])
    _colorbar(fig, image, list(axes), value_label)
    _title(fig, what, model=model, prompt=prompt)
    return fig


def _top_cells(grids: dict, layers, units, *, unit, value_label, what, model, prompt) -> Figure:
    n = len(grids)
    fig = _figure(1.5 + 4.2 * n, 1.6 + 0.22 * TOP_CELLS)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, grid) in zip(axes, grids.items()):
        grid = np.asarray(grid, np.float64)
        flat = np.where(np.isfinite(grid), np.abs(grid), -1.0).ravel()
        order = np.argsort(-flat, kind="stable")[:TOP_CELLS]
        rows, cols = np.unravel_index(order, grid.shape)
        values = grid[rows, cols]
        labels = [f"L{layers[r]} {unit} {units[c]}" for r, c in zip(rows, cols)]
        ax.barh(np.arange(len(values)), values, color=_sign_colours(values))
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(np.arange(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(value_label)
        ax.set_ylabel(f"layer, {unit}")
        ax.set_title(f"{text(name)}: largest {len(values)} of {grid.size} by |effect|", fontsize=9)
    _title(fig, what, model=model, prompt=prompt)
    return fig


def _sign_colours(values) -> list:
    """Bar colours from the diverging map: red for positive, blue for negative."""
    from matplotlib import colormaps

    cmap = colormaps[DIVERGING]
    return [cmap(0.85 if v >= 0 else 0.15) for v in values]


# ----------------------------------------------------------------------------------------- tracing


TRACE_NAMES = {"resid_pre": "residual (block input)", "resid_post": "residual (block output)",
               "mlp_out": "MLP output", "attn_out": "attention output"}
TRACE_CMAPS = {"resid_pre": "Purples", "resid_post": "Purples", "mlp_out": "Greens", "attn_out": "Reds"}


def causal_trace(result, pieces, *, answer: str | None = None, model: str | None = None,
                 prompt: str | None = None) -> Figure:
    """ROME's figure from a `probes.tracing.CausalTrace`: a heatmap per restored site, tokens down (the
    subject's marked *), layers across, colour P(answer) with that state restored; the colour scale starts at
    the corrupted run's P(answer), marked on each colour bar."""
    subject = set(np.asarray(result.subject).tolist())
    rows = [f"{label}*" if i in subject else label for i, label in enumerate(tokens(pieces))]
    kinds = list(result.scores)
    n_layer = np.asarray(result.scores[kinds[0]]).shape[0]
    fig = _figure(1.4 + len(kinds) * (2.4 + 0.16 * n_layer), 1.9 + 0.3 * len(rows))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    # the scale spans the corrupted run's P(answer) (marked on the colour bar; ROME's figures start there) and
    # every restored value, even ones below it
    low = min([result.corrupt_prob] + [float(np.min(result.scores[k])) for k in kinds])
    high = max([result.corrupt_prob + 1e-6, result.clean_prob] + [float(np.max(result.scores[k])) for k in kinds])
    for ax, kind in zip(axes, kinds):
        scores = np.asarray(result.scores[kind], np.float64).T  # [token, layer]
        image = ax.imshow(scores, cmap=TRACE_CMAPS.get(kind, "Purples"), vmin=low, vmax=high, aspect="auto",
                          interpolation="nearest")
        _integer_ticks(ax.yaxis, rows, fontsize=8)
        _integer_ticks(ax.xaxis, [str(l) for l in range(n_layer)], max_ticks=16)
        window = "" if kind in ("resid_pre", "resid_post") else f", window of {result.window} layers"
        ax.set_xlabel(f"layer restored{window}")
        ax.set_ylabel("token (* = corrupted subject)")
        ax.set_title(f"restoring {TRACE_NAMES.get(kind, kind)}", fontsize=9)
        bar = _colorbar(fig, image, ax, "P(answer) restored (line: corrupted run)")
        bar.ax.axhline(result.corrupt_prob, color="k", lw=2)
    shown = f"'{text(answer)}'" if answer is not None else "the answer"
    _title(fig, f"causal tracing: P({shown}) after restoring each state (clean {result.clean_prob:.3g}, "
                f"corrupted {result.corrupt_prob:.3g})", model=model, prompt=prompt)
    return fig


# ----------------------------------------------------------------------------------------- massive


def massive(report, *, model: str | None = None, prompt: str | None = None) -> Figure:
    """A `probes.massive.MassiveReport`: each massive dim's |value| across layers, and (when one was found)
    the W_out geometry regression."""
    panels = 2 if report.geometry is not None else 1
    fig = _figure(1.0 + 4.6 * panels, 4.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    left = axes[0]
    if report.trajectories:
        for t in report.trajectories:
            left.plot(np.abs(t.values), marker="o", label=f"dim {t.dim} (prompt {t.prompt}, position {t.position})")
        n_layer = len(report.trajectories[0].values)
        _integer_ticks(left.xaxis, [str(l) for l in range(n_layer)], max_ticks=24)
        left.set_yscale("symlog")
        left.legend(fontsize=7)
        left.set_title("massive dims across layers", fontsize=9)
    else:
        _note(left, f"no activation with |value| > {report.threshold:g}\nand >= {report.ratio:g} x its state's "
                    "median |value|")
        left.set_title("no massive activations found", fontsize=9)
    left.set_xlabel("layer (block output)")
    left.set_ylabel("|resid_post[dim]| (activation units)")
    g = report.geometry
    if g is not None:
        right = axes[1]
        right.scatter(g.projection[~g.is_massive], g.output[~g.is_massive], s=10, label="other positions")
        right.scatter(g.projection[g.is_massive], g.output[g.is_massive], s=30, c="red", label="massive positions")
        line = np.linspace(g.projection.min(), g.projection.max(), 2)
        right.plot(line, g.slope * line + g.intercept, "k--", lw=1, label=f"slope {g.slope:.3g}, R^2 {g.r2:.3f}")
        right.set_xlabel("h . v1 (input along W_out's top singular direction)")
        right.set_ylabel(f"mlp_out[{g.dim}] at layer {g.layer}")
        right.set_title("W_out geometry", fontsize=9)
        right.legend(fontsize=7)
    _title(fig, "massive activations", model=model, prompt=prompt)
    return fig


def massive_layers(summary, pieces, *, model: str | None = None, prompt: str | None = None) -> Figure:
    """A `probes.massive.LayerSummary`: per layer, the largest |resid_post| (bars, red where some activation is
    massive; labelled with its dim and token) and the median |resid_post| (line), log scale, with the massive
    threshold dashed."""
    n_layer = len(summary.max_abs)
    x = np.arange(n_layer)
    fig = _figure(max(6.4, 2.4 + 0.55 * n_layer), 4.4)
    ax = fig.subplots()
    massive_there = np.asarray(summary.count) > 0
    ax.bar(x, summary.max_abs, color=["tab:red" if m else "tab:gray" for m in massive_there],
           label="largest |activation| (red: massive)")
    ax.plot(x, summary.median, "o-", color="tab:blue", label="median |activation|")
    ax.axhline(summary.threshold, color="k", ls="--", lw=0.8, label=f"threshold {summary.threshold:g}")
    labels = tokens(pieces, 8)
    if n_layer <= 24:
        for i in range(n_layer):
            ax.annotate(f"dim {int(summary.dim[i])}\n{labels[int(summary.position[i])]}", (x[i], summary.max_abs[i]),
                        textcoords="offset points", xytext=(0, 2), ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylim(top=max(float(np.max(summary.max_abs)), summary.threshold) * 4)
    _integer_ticks(ax.xaxis, [str(l) for l in range(n_layer)], max_ticks=48)
    ax.set_xlabel("layer (block output resid_post)")
    ax.set_ylabel("|resid_post| (activation units, log scale)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"massive = |value| > {summary.threshold:g} and >= {summary.ratio:g} x its state's median: "
                 f"{int(np.sum(summary.count))} found", fontsize=9)
    _title(fig, "massive activations per layer", model=model, prompt=prompt)
    return fig


# --------------------------------------------------------------------------------------- attention


def attention_patterns(pattern, pieces, *, layers=None, model: str | None = None,
                       prompt: str | None = None) -> Figure:
    """Attention patterns of one sequence, pattern [layer, head, seq, key]: a panel per layer (rows) and head
    (columns), queries down, keys across, one colour bar (probability, 0..1)."""
    pattern = np.asarray(pattern, np.float64)
    layers = list(range(pattern.shape[0])) if layers is None else [int(l) for l in layers]
    n_head, seq = pattern.shape[1], pattern.shape[2]
    labels = tokens(pieces, 10)
    panel = float(np.clip(1.6 + 0.16 * seq, 2.2, (MAX_INCHES - 1.5) / max(n_head, len(layers))))
    fig = _figure(1.5 + panel * n_head, 1.2 + panel * len(layers))
    axes = fig.subplots(len(layers), n_head, squeeze=False)
    max_ticks = max(4, int(panel * 7))
    for row, layer in enumerate(layers):
        for head in range(n_head):
            ax = axes[row, head]
            image = ax.imshow(pattern[layer, head], vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            _integer_ticks(ax.xaxis, labels, rotation=90, fontsize=6, max_ticks=max_ticks)
            _integer_ticks(ax.yaxis, labels, fontsize=6, max_ticks=max_ticks)
            ax.set_xlabel("key (attended to)", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
    _colorbar(fig, image, axes.ravel().tolist(), "attention probability")
    _title(fig, "attention patterns (rows: layers, columns: heads)", model=model, prompt=prompt)
    return fig


def head_scores(scores: dict, *, what: str, value_label: str, model: str | None = None,
                prompt: str | None = None) -> Figure:
    """Per-head scores in 0..1 {panel name: [layer, head]} (`probes.attention.HeadSummary`): a heatmap per
    score, layers down, heads across, one sequential colour bar; each cell's value written where there is
    room."""
    n = len(scores)
    n_layer, n_head = np.asarray(next(iter(scores.values()))).shape
    panel = float(np.clip(0.3 * n_head + 0.9, 1.8, 6.0))
    fig = _figure(1.4 + n * panel, 2.0 + 0.3 * n_layer)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, grid) in zip(axes, scores.items()):
        grid = np.asarray(grid, np.float64)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=SEQUENTIAL, aspect="auto", interpolation="nearest")
        if grid.size <= 400:
            for (layer, head), value in np.ndenumerate(grid):
                ax.text(head, layer, f"{value:.2f}"[1:] if 0 <= value < 1 else f"{value:.1f}", ha="center",
                        va="center", fontsize=7, color="white" if value < 0.6 else "black")
        ax.set_title(text(name), fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        _integer_ticks(ax.xaxis, [str(h) for h in range(n_head)], max_ticks=32)
        _integer_ticks(ax.yaxis, [str(l) for l in range(n_layer)], max_ticks=48)
    _colorbar(fig, image, list(axes), value_label)
    _title(fig, what, model=model, prompt=prompt)
    return fig


def attention_head(pattern, pieces, *, layer: int, head: int, model: str | None = None,
                   prompt: str | None = None) -> Figure:
    """One head's attention pattern [seq, key]: queries down, keys across, colour bar (probability, 0..1)."""
    pattern = np.asarray(pattern, np.float64)
    seq = pattern.shape[0]
    labels = tokens(pieces, 10)
    side = float(np.clip(2.4 + 0.2 * seq, 3.6, MAX_INCHES - 1.5))
    fig = _figure(side + 1.2, side + 0.6)
    ax = fig.subplots()
    image = ax.imshow(pattern, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    max_ticks = max(8, int(side * 6))
    _integer_ticks(ax.xaxis, labels, rotation=90, fontsize=7, max_ticks=max_ticks)
    _integer_ticks(ax.yaxis, labels, fontsize=7, max_ticks=max_ticks)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    _colorbar(fig, image, ax, "attention probability")
    _title(fig, f"attention pattern of layer {int(layer)} head {int(head)}", model=model, prompt=prompt)
    return fig


# -------------------------------------------------------------------------------------------- lens


def logit_lens(result, pieces, top_pieces, *, target: str | None = None, model: str | None = None,
               prompt: str | None = None, tuned: bool = False, ranks: bool = False,
               max_labels: int = 1200) -> Figure:
    """A `probes.lens.LensResult` of one prompt: rows (layer, site), columns positions; colour the top-1
    token's probability (0..1), text the token. `top_pieces` [site, layer, seq]: the top-1 token's piece.
    `ranks` (a result with a target): a second panel, the target's rank at each cell (0 = the top token).
    Cells carry text only where a panel has at most `max_labels` cells (text is what makes drawing slow)."""
    top_probs = np.asarray(result.top_probs)
    n_site, n_layer, _, seq, _ = top_probs.shape
    probs = top_probs[:, :, 0, :, 0].transpose(1, 0, 2).reshape(n_layer * n_site, seq)
    tops = np.asarray(top_pieces, dtype=object).transpose(1, 0, 2).reshape(n_layer * n_site, seq)
    rows = [f"{layer} {site}" for layer in range(n_layer) for site in result.sites]
    ranks = ranks and result.target_ranks is not None
    height = 1.7 + 0.3 * len(rows)
    fig = _figure(2.6 + 0.85 * seq, max(height, MIN_INCHES) + (0.9 + 0.3 * len(rows) if ranks else 0.0))
    if ranks:
        ax, below = fig.subplots(2, 1)
        _lens_ranks(fig, below, result, rows, pieces, target, max_labels)
    else:
        ax = fig.subplots()
    image = ax.imshow(probs, vmin=0.0, vmax=1.0, cmap=SEQUENTIAL, aspect="auto", interpolation="nearest")
    if seq * len(rows) <= max_labels:
        for r in range(probs.shape[0]):
            for pos in range(seq):
                ax.text(pos, r, token(tops[r, pos], 8, quote=False), ha="center", va="center", fontsize=6.5,
                        color="white" if probs[r, pos] < 0.6 else "black")
    _integer_ticks(ax.xaxis, [f"{i} {p}" for i, p in enumerate(tokens(pieces, 10))], rotation=90)
    _integer_ticks(ax.yaxis, rows)
    ax.set_xlabel("position and input token")
    ax.set_ylabel("layer and residual site")
    _colorbar(fig, image, ax, "probability of the top-1 token")
    what = f"{'tuned' if tuned else 'logit'} lens: each layer's top next-token prediction (text) and its probability"
    if target is not None:
        what += f"; target '{text(target)}'"
    _title(fig, what, model=model, prompt=prompt)
    return fig


def _lens_ranks(fig, ax, result, rows, pieces, target, max_labels: int = 1200) -> None:
    """The target's rank under the lens, [(layer, site), position], coloured on a log scale (0 = top token)."""
    ranks = np.asarray(result.target_ranks)[:, :, 0]  # [site, layer, seq]
    n_site, n_layer, seq = ranks.shape
    ranks = ranks.transpose(1, 0, 2).reshape(n_layer * n_site, seq).astype(np.float64)
    norm = colors.LogNorm(vmin=1, vmax=max(10.0, float(ranks.max()) + 1))
    image = ax.imshow(ranks + 1, cmap="magma_r", norm=norm, aspect="auto", interpolation="nearest")
    if seq * len(rows) <= max_labels:
        for r in range(ranks.shape[0]):
            for pos in range(seq):
                ax.text(pos, r, f"{int(ranks[r, pos])}", ha="center", va="center", fontsize=6.5,
                        color="white" if norm(ranks[r, pos] + 1) > 0.5 else "black")
    _integer_ticks(ax.xaxis, [f"{i} {p}" for i, p in enumerate(tokens(pieces, 10))], rotation=90)
    _integer_ticks(ax.yaxis, rows)
    ax.set_xlabel("position and input token")
    ax.set_ylabel("layer and residual site")
    shown = f"'{text(target)}'" if target is not None else "the target"
    ax.set_title(f"rank of {shown} (0 = top token)", fontsize=9)
    _colorbar(fig, image, ax, "rank + 1 of the target (log scale)")


# --------------------------------------------------------------------------------------------- svd


def spectrum(values, *, matrix: str, layer: int, heads=None, fold_ln: bool = False,
             model: str | None = None) -> Figure:
    """Singular values [row, rank] of a weight matrix (one row per head, or one), log scale."""
    values = np.asarray(values, np.float64)
    fig = _figure(6.2, 4.2)
    ax = fig.subplots()
    rows = range(len(values)) if heads is None else heads
    for row in rows:
        ax.plot(np.arange(values.shape[1]), values[row], marker=".",
                label=f"head {row}" if heads is not None or len(values) > 1 else matrix)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("singular value index (largest first)")
    ax.set_ylabel("singular value (log scale)")
    ax.legend(fontsize=7)
    _title(fig, f"singular values of {matrix}, layer {layer}" + (" (LayerNorm folded)" if fold_ln else ""),
           model=model)
    return fig


# ----------------------------------------------------------------------------------------- geometry


def superposition(results, eps: float, *, model: str | None = None) -> Figure:
    """Histograms of pairwise cosines (`probes.geometry.superposition`) next to Gaussian vectors'."""
    fig = _figure(7.0, 1.2 + 2.3 * len(results))
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, results):
        bins = np.linspace(-1, 1, int(np.clip(np.sqrt(len(r.cosines)), 20, 200)) + 1)
        ax.hist(r.gaussian_cosines, bins=bins, density=True, alpha=0.5, label=f"Gaussian, d={r.summary.d}")
        ax.hist(r.cosines, bins=bins, density=True, alpha=0.6, label=text(r.name))
        for x in (-eps, eps):
            ax.axvline(x, color="k", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{text(r.name)}: n={r.summary.n}, mean |cos| {r.summary.mean_abs:.3f} "
                     f"(random {r.gaussian.mean_abs:.3f})", fontsize=9)
        ax.set_xlabel("pairwise cosine")
        ax.set_ylabel("density (log scale)")
        ax.legend(fontsize=7)
    _title(fig, f"pairwise cosines vs random vectors (dashed: |cos| = {eps:.3f})", model=model)
    return fig


def manifold(report, *, model: str | None = None, corpus: str | None = None) -> Figure:
    """`probes.manifold.layer_geometry`: intrinsic dimension (and probe accuracy) across depth."""
    names = [g.name for g in report.layers]
    x = np.arange(len(names))
    rows = 2 if report.property else 1
    fig = _figure(max(6.0, 1.5 + 0.45 * len(names)), 1.2 + 3.0 * rows)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(x, [g.two_nn for g in report.layers], "o-", label="TwoNN (fit)")
    ax.plot(x, [g.two_nn_mle for g in report.layers], "s--", label="TwoNN (MLE)")
    ax.plot(x, [g.participation_ratio for g in report.layers], "^-", label="PCA participation ratio")
    ax.set_ylabel("dimension")
    ax.set_title(f"intrinsic dimension, {report.n_points} tokens", fontsize=9)
    ax.legend(fontsize=7)
    if report.property:
        ax = axes[1]
        ax.plot(x, [g.probe.test_accuracy for g in report.layers], "o-", label="linear probe (held out)")
        ax.plot(x, [g.probe.majority for g in report.layers], "k:", label="majority class")
        ax.set_ylabel("accuracy (fraction)")
        ax.set_title(f"linear probe for {text(report.property)}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes:
        _integer_ticks(ax.xaxis, names)
        ax.set_xlabel("depth (embed = entering block 0, Li = leaving block i)")
    _title(fig, "residual stream geometry across depth" + (f" on {text(corpus, 60)}" if corpus else ""),
           model=model)
    return fig


# -------------------------------------------------------------------------------------- attribution


def attribution(names, contributions, *, logit: float, what: str, model: str | None = None,
                prompt: str | None = None) -> Figure:
    """Direct logit attribution: one bar per component (as given, e.g. the largest |contribution| first),
    coloured by sign."""
    values = np.asarray(contributions, np.float64)
    fig = _figure(6.4, 1.6 + 0.26 * len(values))
    ax = fig.subplots()
    ax.barh(np.arange(len(values)), values, color=_sign_colours(values))
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(np.arange(len(values)), [text(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("direct contribution to the logit (logit units)")
    ax.set_ylabel("component")
    ax.set_title(f"total {logit:.3f} (with the final LayerNorm's bias term)", fontsize=9)
    _title(fig, f"direct logit attribution of {what}", model=model, prompt=prompt)
    return fig


# --------------------------------------------------------------------------------------- generation


def generation(pieces, probabilities, *, model: str | None = None, prompt: str | None = None,
               sampling: str = "") -> Figure:
    """The probability the model gave each generated token at its step (bars), tokens along x."""
    values = np.asarray(probabilities, np.float64)
    labels = tokens(pieces, 10)
    fig = _figure(2.0 + 0.22 * len(values), 4.0)
    ax = fig.subplots()
    ax.bar(np.arange(len(values)), values, color="tab:blue")
    ax.set_ylim(0, 1)
    _integer_ticks(ax.xaxis, labels, rotation=90, max_ticks=80)
    ax.set_xlabel("generated token (one per step)")
    ax.set_ylabel("P(token) under the model")
    ax.set_title(f"mean {values.mean():.3f}" + (f"; {sampling}" if sampling else ""), fontsize=9)
    _title(fig, "probability of each generated token", model=model, prompt=prompt)
    return fig


# ------------------------------------------------------------------------------------------ ablation


def distribution_change(pieces, before, after, *, what: str, kl: float | None = None, model: str | None = None,
                        prompt: str | None = None) -> Figure:
    """Next-token probabilities of some tokens before and after an edit (an ablation), as paired bars."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    y = np.arange(len(before))
    fig = _figure(6.4, 1.8 + 0.34 * len(before))
    ax = fig.subplots()
    ax.barh(y - 0.2, before, height=0.4, label="before", color="tab:gray")
    ax.barh(y + 0.2, after, height=0.4, label="after", color="tab:orange")
    ax.set_yticks(y, tokens(pieces), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1e-6, float(max(before.max(initial=0), after.max(initial=0)))) * 1.05)
    ax.set_xlabel("next-token probability at the last position")
    ax.set_ylabel("next token (most probable before)")
    ax.legend(fontsize=7)
    if kl is not None:
        ax.set_title(f"KL(original || edited) at the last position: {kl:.4g} nats", fontsize=9)
    _title(fig, what, model=model, prompt=prompt)
    return fig
