"""Notebook displays: `_repr_html_` and short reprs for Model, Trace and probe results, by one mechanism.

`@displayable` on a dataclass gives it `_repr_html_` (a card: its class and docstring, a headline table, an
inline figure, then every field) and a short `__repr__` (headline scalars, arrays as `name[shape dtype]`,
never whole arrays). A class may define two hooks:

- `_headline()`: the rows that matter most, as a list of (label, value) pairs or a `Table`;
- `_figure()`: a matplotlib Figure, embedded as a PNG; called only where matplotlib is importable. Hooks
  draw through `probes.plots` (imported inside the method), label tokens with `pieces(ids)` (their text while
  a tokenizer is in use, else `#id`), and return None where the result lacks what the figure needs or is too
  large to draw quickly. A hook that raises costs the figure (a one-line note), not the display.

Axis names of array fields come from the decorator (`@displayable(axes={"values": "layer unit"})`); a Trace's
come from `tinygpt.sites`. Token ids show their text when displayed with a tokenizer: `model.show(result)`
(`show(result, tokenizer)`), or inside `with tokens_from(tokenizer):` (no global setting). Every string
is escaped with `html.escape`; the output is well-formed (every tag closed, `<img ... />` self-closed).

This module imports neither jax nor numpy at import time; `treescope_array` renders an array with named axes
through treescope where it is installed (optional).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import html
import importlib.util
import io
import math
import numbers
import sys
from typing import Any, Iterable, Sequence

MAX_STAT_ELEMENTS = 1 << 24  # larger arrays show shape and dtype only (no pass over the data)
MAX_ROWS = 24  # rows of a list or dict shown before "… n more"
REPR_LIMIT = 200

# The tokenizer of the display being rendered: set only for the duration of one rendering (`tokens_from`).
_TOKENIZER: contextvars.ContextVar = contextvars.ContextVar("tinygpt_display_tokenizer", default=None)


@contextlib.contextmanager
def tokens_from(tokenizer):
    """Within the block, displays show token ids with their text (`'text' (id)`); outside it, as `#id`."""
    previous = _TOKENIZER.set(tokenizer)
    try:
        yield
    finally:
        _TOKENIZER.reset(previous)


@dataclasses.dataclass(frozen=True)
class Shown:
    """`value` displayed with `tokenizer`, so its token ids show their text (what `show` returns)."""

    value: Any
    tokenizer: Any

    def _repr_html_(self) -> str:
        with tokens_from(self.tokenizer):
            return self.value._repr_html_()

    def __repr__(self) -> str:
        with tokens_from(self.tokenizer):
            return repr(self.value)


def show(value, tokenizer) -> Shown:
    """`value` (a result, a Trace, ...) for display with `tokenizer`: `Model.show(value)` passes the model's."""
    return Shown(value, tokenizer)


def token(token_id) -> str:
    """A token id as text for displays: `'text' (id)` while a tokenizer is in use (`tokens_from`), else `#id`."""
    token_id = int(token_id)
    tokenizer = _TOKENIZER.get()
    if tokenizer is not None:
        try:
            return f"{tokenizer.decode([token_id])!r} ({token_id})"
        except Exception:  # an id outside the vocabulary: show the id
            pass
    return f"#{token_id}"


def pieces(ids) -> list[str]:
    """Each token id's own text (`tokenizer.pieces`) while a tokenizer is in use (`tokens_from`), else `#id`
    (also for an id outside the vocabulary): labels for figures drawn by `_figure` hooks."""
    tokenizer = _TOKENIZER.get()
    out = []
    for token_id in ids:
        token_id = int(token_id)
        if tokenizer is not None:
            try:
                out.append(tokenizer.pieces([token_id])[0] if hasattr(tokenizer, "pieces")
                           else tokenizer.decode([token_id]))
                continue
            except Exception:  # an id outside the vocabulary: show the id
                pass
        out.append(f"#{token_id}")
    return out


def decode(ids) -> str | None:
    """The text of token ids while a tokenizer is in use (`tokens_from`), else None (a figure's title then
    names no prompt)."""
    tokenizer = _TOKENIZER.get()
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([int(i) for i in ids])
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- markup


class Html(str):
    """Markup that is already escaped (not escaped again when placed in a table)."""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


@dataclasses.dataclass
class Table:
    """A small table for a headline: column names and rows of values (formatted by `cell`)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""

    def _repr_html_(self) -> str:
        return table_html(self.columns, self.rows, caption=self.caption)


STYLE = """<style>
.tinygpt-card{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;line-height:1.35;
 border:1px solid #c8ccd2;border-radius:6px;padding:8px 12px;margin:4px 0;max-width:100%;overflow-x:auto}
.tinygpt-card .tg-title{font-weight:600;font-size:14px}
.tinygpt-card .tg-doc{color:#5a6270;margin-left:6px;font-weight:normal}
.tinygpt-card table{border-collapse:collapse;margin:6px 0}
.tinygpt-card th,.tinygpt-card td{border-bottom:1px solid #e3e6ea;padding:2px 10px 2px 0;text-align:left;
 vertical-align:top}
.tinygpt-card th{font-weight:600;color:#39404a}
.tinygpt-card td.tg-num{text-align:right;font-variant-numeric:tabular-nums}
.tinygpt-card code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
.tinygpt-card .tg-nowrap{white-space:nowrap}
.tinygpt-card .tg-dim{color:#6b7380}
.tinygpt-card .tg-small{font-size:12px;min-width:220px;display:inline-block}
.tinygpt-card .tg-bad{color:#b3261e;font-weight:600}
.tinygpt-card summary{cursor:pointer;color:#39404a;margin-top:4px}
.tinygpt-card .tg-caption{color:#5a6270;margin-top:6px}
</style>"""


def card(title: str, doc: str = "", body: Iterable[str] = ()) -> str:
    """The frame of every display: a title line (escaped), then the body's markup."""
    head = f'<div class="tg-title">{esc(title)}' + (f'<span class="tg-doc">{esc(doc)}</span>' if doc else "")
    return f'{STYLE}<div class="tinygpt-card">{head}</div>{"".join(body)}</div>'


def details(summary: str, body: str, open: bool = False) -> str:
    return f'<details{" open" if open else ""}><summary>{esc(summary)}</summary>{body}</details>'


def table_html(columns: Sequence[str] | None, rows: Iterable[Sequence[Any]], caption: str = "",
               labels: bool = False) -> str:
    """A table: a header of `columns` (None: none) and one row per sequence of values (formatted by `cell`);
    `labels`: each row's first value is its label (a <th>)."""
    out = [f'<div class="tg-caption">{esc(caption)}</div>' if caption else "", "<table>"]
    if columns:
        out.append("<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        row = list(row)
        head = ""
        if labels and row:
            label = row.pop(0)
            head = f"<th>{label if isinstance(label, Html) else esc(label)}</th>"
        out.append("<tr>" + head + "".join(cell(v) for v in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def cell(value) -> str:
    """One <td>: numbers right-aligned, everything else through `value_html`."""
    if _is_number(value):
        return f'<td class="tg-num">{esc(number(value))}</td>'
    return f"<td>{value_html(value)}</td>"


# ------------------------------------------------------------------------------------ values and arrays


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool) or (
        _is_array(value) and getattr(value, "ndim", 1) == 0 and value.dtype.kind in "iuf")


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def number(value, digits: int = 4) -> str:
    """A number, short: ints in full, floats to `digits` significant digits."""
    if _is_array(value):
        value = value.item()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}g}"


def axis_names(axes) -> tuple[str, ...] | None:
    if axes is None:
        return None
    return tuple(axes.split()) if isinstance(axes, str) else tuple(axes)


def shape_text(shape: Sequence[int], axes=None) -> str:
    """`[layer=2, batch=1, seq=8]` with axis names (extra leading axes unnamed), else `[2, 1, 8]`."""
    names = axis_names(axes)
    shape = tuple(int(n) for n in shape)
    if names is None or len(names) > len(shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    names = ("",) * (len(shape) - len(names)) + names
    return "[" + ", ".join(f"{a}={n}" if a and not a.isdigit() else str(n) for a, n in zip(names, shape)) + "]"


def array_stats(x) -> dict | None:
    """min, mean, max over the finite entries, and the counts of NaN and infinite entries; None for arrays too
    large to read (`MAX_STAT_ELEMENTS`), traced values and non-numeric dtypes."""
    is_float = x.dtype.kind == "f" or "float" in str(x.dtype)  # bfloat16 (ml_dtypes) has kind "V"
    if "Tracer" in type(x).__name__ or int(math.prod(x.shape)) > MAX_STAT_ELEMENTS or not (
            is_float or x.dtype.kind in "biu"):
        return None
    if int(math.prod(x.shape)) == 0:
        return {"size": 0}
    import numpy as xp

    x = xp.asarray(x)  # a jax array comes to the host once (one transfer beats a dispatch per statistic)
    if x.dtype.kind == "b":
        return {"true": int(xp.sum(x))}
    if x.dtype.kind in "iu":
        return {"min": int(xp.min(x)), "max": int(xp.max(x))}
    x32 = x if x.dtype.kind == "f" and x.dtype.itemsize >= 4 else x.astype(xp.float32)
    finite = xp.isfinite(x32)
    n_finite = int(xp.sum(finite))
    stats = {"nan": int(xp.sum(xp.isnan(x32))), "inf": int(x32.size - n_finite) - int(xp.sum(xp.isnan(x32)))}
    if n_finite:
        stats["min"] = float(xp.min(xp.where(finite, x32, xp.inf)))
        stats["mean"] = float(xp.sum(xp.where(finite, x32, 0), dtype=xp.float64) / n_finite)
        stats["max"] = float(xp.max(xp.where(finite, x32, -xp.inf)))
    return stats


def stats_text(stats: dict | None) -> str:
    if stats is None:
        return "not summarised"
    parts = [f"{k} {number(stats[k], 3)}" for k in ("min", "mean", "max", "true", "size") if k in stats]
    parts += [f"{stats[k]} {k}" for k in ("nan", "inf") if stats.get(k)]  # inf: -inf or inf entries
    return ", ".join(parts) or "no finite values"


def array_text(x, axes=None) -> str:
    """`float32[layer=2, seq=8]`: dtype and shape, for reprs."""
    return f"{x.dtype}{shape_text(x.shape, axes)}"


def array_html(x, axes=None) -> str:
    """An array's summary: dtype and shape with axis names, then its statistics (NaN and inf counts in red)."""
    return f"<code>{esc(array_text(x, axes))}</code> {stats_html(x)}"


def stats_html(x) -> str:
    """An array's statistics (`array_stats`), in red when it holds NaN (infinities are expected in places:
    masked attention scores are -inf)."""
    stats = array_stats(x)
    bad = stats and stats.get("nan")
    return f'<span class="{"tg-bad" if bad else "tg-dim"}">{esc(stats_text(stats))}</span>'


def value_html(value, axes=None) -> str:
    """Any field's value as markup: arrays summarised, displayable objects as their short repr, lists of
    dataclasses as a table, dicts as key/value tables; all text escaped."""
    if isinstance(value, Html):
        return str(value)
    if value is None or isinstance(value, (bool, str)):
        return f"<code>{esc(value if isinstance(value, str) else repr(value))}</code>"
    if _is_number(value):
        return esc(number(value))
    if _is_array(value):
        if getattr(value, "ndim", 1) == 0:
            return f"<code>{esc(value)}</code>"
        return array_html(value, axes)
    if hasattr(value, "_repr_html_") and hasattr(value, "_display_fields"):  # a nested result: its short repr
        return f"<code>{esc(repr(value))}</code>"
    if isinstance(value, dict):
        items = list(value.items())
        body = table_html(None, [(Html(f"<code>{esc(k)}</code>"), v) for k, v in items[:MAX_ROWS]])
        return body + _more(len(items))
    if isinstance(value, (list, tuple)):
        if value and all(dataclasses.is_dataclass(v) and not isinstance(v, type) for v in value):
            fields = [f.name for f in dataclasses.fields(value[0])]
            rows = [[getattr(v, f, None) for f in fields] for v in value[:MAX_ROWS]]
            return details(f"{len(value)} × {type(value[0]).__name__}", table_html(fields, rows) + _more(len(value)),
                           open=len(value) <= 8)
        text = repr(list(value[:MAX_ROWS]))
        return f"<code>{esc(text if len(text) < 400 else text[:400] + ' …')}</code>{_more(len(value))}"
    if dataclasses.is_dataclass(value):
        return f"<code>{esc(short_repr(value))}</code>"
    text = repr(value)
    return f"<code>{esc(text if len(text) < 400 else text[:400] + ' …')}</code>"


def _more(n: int) -> str:
    return f'<div class="tg-dim">… {n - MAX_ROWS} more</div>' if n > MAX_ROWS else ""


def value_text(value, axes=None) -> str:
    """A field's value for a short repr: scalars as they are, arrays `dtype[shape]`, lists by length."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if _is_number(value):
        return number(value)
    if _is_array(value):
        return array_text(value, axes)
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__}[{len(value)}]"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}(…)"
    return type(value).__name__


# ------------------------------------------------------------------------------------------------ figures


def has_matplotlib() -> bool:
    return "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None


def figure_html(fig, dpi: int = 100) -> str:
    """A matplotlib Figure as an inline PNG `<img ... />` (base64); closes the figure."""
    buffer = io.BytesIO()
    # a figure with a layout engine (probes.plots: constrained) already fits its labels: no second pass to crop
    tight = {} if getattr(fig, "get_layout_engine", lambda: None)() is not None else {"bbox_inches": "tight"}
    fig.savefig(buffer, format="png", dpi=dpi, **tight)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<div><img alt="figure" style="max-width:100%" src="data:image/png;base64,{data}" /></div>'


# ------------------------------------------------------------------------------------- the mechanism


def _headline_html(rows) -> str:
    if rows is None:
        return ""
    if isinstance(rows, Table):
        return rows._repr_html_()
    return table_html(None, rows, labels=True)


def result_html(obj) -> str:
    """The card of a `displayable` object: headline (`_headline`), figure (`_figure`), then every field."""
    cls = type(obj)
    doc = ""
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # not the dataclass's generated signature
        doc = " ".join(cls.__doc__.strip().split("\n\n")[0].split())  # the first paragraph, on one line
        doc = doc if len(doc) <= 240 else doc[:239] + "…"
    body = []
    headline = getattr(obj, "_headline", None)
    if headline is not None:
        body.append(_headline_html(headline()))
    figure = getattr(obj, "_figure", None)
    if figure is not None and has_matplotlib():
        try:
            fig = figure()
            if fig is not None:
                body.append(figure_html(fig))
        except Exception as e:  # a figure that fails costs the figure, not the rest of the display
            body.append(f'<div class="tg-bad">figure failed: {esc(type(e).__name__)}: {esc(e)}</div>')
    axes = getattr(cls, "_display_axes", {})
    rows = [(Html(f"<code>{esc(name)}</code>"), Html(value_html(getattr(obj, name), axes.get(name))))
            for name in obj._display_fields()]
    fields = table_html(None, rows, labels=True)
    body.append(details(f"{len(rows)} fields", fields, open=headline is None) if headline is not None else fields)
    return card(cls.__name__, doc, body)


def short_repr(obj, limit: int = REPR_LIMIT) -> str:
    """`Name(metric='kl', baseline=0.5, values[2x4 float32], items[3])`: scalar fields first, then arrays by shape
    and dtype and containers by length (None fields left out); cut at `limit` characters."""
    names = obj._display_fields() if hasattr(obj, "_display_fields") else [f.name for f in dataclasses.fields(obj)]
    scalars, others = [], []
    for name in names:
        value = getattr(obj, name)
        if value is None:  # an optional field not filled: left out
            continue
        if _is_array(value) and getattr(value, "ndim", 1) > 0:
            others.append(f"{name}[{'x'.join(str(int(n)) for n in value.shape)} {value.dtype}]")
        elif isinstance(value, (list, tuple, dict)):
            others.append(f"{name}[{len(value)}]")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            others.append(f"{name}={type(value).__name__}(…)")
        else:
            scalars.append(f"{name}={value_text(value)}")
    text = f"{type(obj).__name__}(" + ", ".join(scalars + others)
    return (text[:limit - 2] + "…)") if len(text) + 1 > limit else text + ")"


def _display_fields(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self)]


def displayable(cls=None, *, axes: dict[str, str | Sequence[str]] | None = None):
    """Give a dataclass `_repr_html_` and a short `__repr__` (see the module's docstring). `axes`: field name ->
    its axis names ("layer unit"), shown with the array's shape."""

    def wrap(cls):
        cls._display_axes = {**getattr(cls, "_display_axes", {}), **{k: axis_names(v) for k, v in (axes or {}).items()}}
        if "_display_fields" not in cls.__dict__:
            cls._display_fields = _display_fields
        cls._repr_html_ = result_html
        cls.__repr__ = short_repr
        return cls

    return wrap if cls is None else wrap(cls)


# ------------------------------------------------------------------------------------------- treescope


def has_treescope() -> bool:
    return importlib.util.find_spec("treescope") is not None


def treescope_array(x, axes=None, **kwargs):
    """`treescope.render_array` of `x` with its axes labelled by name (treescope is optional: ImportError
    naming it where it is not installed). Keyword arguments go to `render_array` (columns, rows, sliders, ...:
    by axis index)."""
    try:
        import treescope
    except ImportError as e:
        raise ImportError("tinygpt's treescope views need treescope: pip install treescope") from e
    names = axis_names(axes)
    labels = None
    if names is not None and len(names) <= x.ndim:
        names = ("",) * (x.ndim - len(names)) + names
        labels = {i: f"{a}" for i, a in enumerate(names) if a}
    return treescope.render_array(x, axis_labels=labels, **kwargs)
