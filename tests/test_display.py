"""Notebook displays (tinygpt/display.py): well-formed, escaped HTML naming what it shows; short reprs; every
probe result dataclass is displayable; the optional treescope view."""

from __future__ import annotations

import dataclasses
import html.parser
import importlib
import pkgutil

import numpy as np
import pytest

import probes
import tinygpt
from tinygpt import display

VOID = {"img", "br", "hr", "meta", "input", "col", "wbr"}


class _Checker(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.scripts += tag == "script"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.scripts += tag == "script"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def well_formed(markup: str) -> _Checker:
    checker = _Checker()
    checker.feed(markup)
    checker.close()
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    assert checker.scripts == 0, "a <script> element in the display"
    return checker


@pytest.fixture(scope="module")
def model():
    return tinygpt.load()


@pytest.fixture(scope="module")
def trace(model):
    return model("ROMEO: But soft, what light")


def test_model_display_names_its_config(model):
    markup = model._repr_html_()
    well_formed(markup)
    for text in ("embedded", "n_layer", "n_head", "d_model", "d_mlp", "n_ctx", "vocab", "2048", "675,328",
                 "float32", "tokenizer"):
        assert text in markup
    assert len(repr(model)) < 200


def test_trace_display_shows_every_site_with_named_axes(trace):
    markup = trace._repr_html_()
    well_formed(markup)
    for name in tinygpt.SITE_NAMES:
        assert f"<code>{name}</code>" in markup
    assert "[layer=2, batch=1, seq=8, d_model=128]" in markup
    assert "[layer=2, batch=1, head=4, seq=8, key=8]" in markup
    assert "[batch=1, seq=8, vocab=2048]" in markup
    assert "float32" in markup and "mean" in markup


def test_trace_repr_is_short_and_informative(trace):
    text = repr(trace)
    assert len(text) < 300, text
    assert "all sites" in text and "layer=2" in text and "seq=8" in text
    partial = tinygpt.Trace(logits=trace.logits, resid_post=trace.resid_post)
    assert "resid_post" in repr(partial) and "logits" in repr(partial)


def test_compact_trace_marks_derived_sites_without_computing_them(model):
    compact = model("ROMEO: But soft", compact=True)
    markup = compact._repr_html_()
    well_formed(markup)
    assert compact._cache == {}  # nothing was derived to display it
    assert markup.count("derived on read") == len(compact.derived()) + 1  # each row and the title
    assert "[layer=2, batch=1, head=4, seq=5, key=5]" in markup  # a derived site's shape, by eval_shape
    assert "derived on read" in repr(compact)


def test_nan_counts_show():
    x = np.array([[1.0, np.nan], [np.inf, -2.0]], np.float32)
    assert display.array_stats(x) == {"nan": 1, "inf": 1, "min": -2.0, "mean": -0.5, "max": 1.0}
    assert "tg-bad" in display.array_html(x, "seq d_model")
    assert "float32[seq=2, d_model=2]" in display.array_html(x, "seq d_model")


@display.displayable(axes={"values": "layer head"})
@dataclasses.dataclass
class _Hostile:
    """A <b>result</b> & co."""

    label: str
    values: np.ndarray
    tokens: list
    note: dict

    def _headline(self):
        return display.Table(["<th>", "value"], [(self.label, 1.5), ("<script>alert(2)</script>", self.values)],
                             caption="<i>caption</i>")


def test_hostile_strings_are_escaped():
    result = _Hostile("<script>alert(1)</script>", np.zeros((2, 4), np.float32), ["<img src=x onerror=1>"],
                      {"<k>": "</td></tr>"})
    markup = result._repr_html_()
    checker = well_formed(markup)
    assert "<script>" not in markup and "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    assert "<img src=x" not in markup and "<i>" not in markup and "<b>" not in markup
    assert "img" not in checker.tags  # no figure hook here, and no injected image
    assert "float32[layer=2, head=4]" in markup
    assert len(repr(result)) < 200 and "values[2x4 float32]" in repr(result)


def test_token_text_is_escaped(model):
    with display.tokens_from(model.tokenizer):
        lt = model.tokenizer.encode("<")[0]
        markup = display.table_html(["token"], [(display.token(lt),)])
        well_formed(markup)
        assert "&lt;" in markup and "'<'" not in markup
    assert display.token(5) == "#5"  # the tokenizer was in use only inside the block: no global setting


def test_a_result_shown_with_the_models_tokenizer_names_its_tokens(model):
    from probes import attribution

    tokens = model.encode("ROMEO: But soft")
    result = attribution.direct_logit_attribution(model.params, model.config, tokens, 25)
    assert "&#x27;:&#x27; (25)" in model.show(result)._repr_html_()
    assert "&#x27;:&#x27; (25)" not in result._repr_html_() and "#25" in result._repr_html_()


def test_a_figure_hook_is_embedded_as_png():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    @display.displayable
    @dataclasses.dataclass
    class WithFigure:
        x: float

        def _figure(self):
            fig = Figure(figsize=(2, 1))
            fig.add_subplot().plot([0, 1], [0, self.x])
            return fig

    checker = well_formed(WithFigure(1.0)._repr_html_())
    assert "img" in checker.tags
    assert 'src="data:image/png;base64,' in WithFigure(1.0)._repr_html_()


def probe_dataclasses():
    """Every result dataclass of probes/ (edit values, such as probes.sae.Splice, are inputs with their own
    short repr: tinygpt.edits)."""
    from tinygpt.edits import Edit

    found = []
    for info in pkgutil.iter_modules(probes.__path__):
        module = importlib.import_module(f"probes.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
                    and not issubclass(value, Edit)):
                found.append(value)
    return found


def test_every_probe_dataclass_is_displayable():
    classes = probe_dataclasses()
    assert len(classes) > 30
    missing = [f"{c.__module__}.{c.__qualname__}" for c in classes
               if "_repr_html_" not in vars(c) or vars(c).get("__repr__") is not display.short_repr]
    assert not missing, f"probe result dataclasses without @displayable: {missing}"


def test_probe_results_render(model):
    from probes import attribution, lens

    tokens = model.encode("ROMEO: But soft, what light")
    dla = attribution.direct_logit_attribution(model.params, model.config, tokens, 11)
    grid = lens.logit_lens(model.params, model.config, tokens)
    for result, names in ((dla, ["Attribution", "component", "direct logit", "embed"]),
                          (grid, ["LensSummary", "resid_post L1", "pos 7", "&#x27;:&#x27; (25)"])):
        markup = model.show(result)._repr_html_()
        well_formed(markup)
        for name in names:
            assert name in markup, name
        assert len(repr(result)) <= 200


def test_treescope_view_names_the_axes(trace, monkeypatch):
    treescope = pytest.importorskip("treescope")
    figure = trace.treescope("attn_pattern")
    assert len(figure._repr_html_()) > 1000  # treescope's own (compressed) page
    seen = {}
    monkeypatch.setattr(treescope, "render_array", lambda array, **kwargs: seen.update(kwargs, shape=array.shape))
    trace.treescope("attn_pattern")
    assert seen["axis_labels"] == dict(enumerate(("layer", "batch", "head", "seq", "key")))
    assert seen["shape"] == (2, 1, 4, 8, 8)


# ------------------------------------------------------------------------------ inline figures and headlines


FIGURE_PROMPT = "ROMEO: But soft, what light"  # the prompt of test_probe_results_render: its programs are reused


@pytest.fixture(scope="module")
def figure_results(model):
    """Each probe result that draws a figure, computed once with small settings on the embedded model."""
    from probes import ablation, attention, attribution, lens, massive, patching, tracing

    tokens = np.asarray(model.encode(FIGURE_PROMPT))
    ids = tokens[0]
    params, config = model.params, model.config
    clean, corrupt = (np.asarray(model.encode(p))[0] for p in ("ROMEO: my lord", "HAMLET: my lord"))
    return {
        "lens": lens.logit_lens(params, config, tokens),
        "attribution": attribution.direct_logit_attribution(params, config, tokens, 11),
        "heads": attention.head_summary(params, config, tokens, induction_n=4),
        "trace": tracing.causal_trace(params, ids, config, tracing.find_subject(model.tokenizer, ids, "ROMEO"),
                                      samples=1, window=1, kinds=("resid_post",), buckets=1),
        "massive": massive.investigate(params, config, [ids], threshold=5, ratio=5, top=1),
        "layers": massive.layer_summary(params, config, ids, threshold=5, ratio=5),
        "sweep": ablation.ablation_sweep(params, tokens, config, metric="kl"),
        "patch": patching.patching_sweep(params, [clean], [corrupt], config, metric="log_prob", answer=11,
                                         by="head", site="z"),
    }


def headline_texts(name, result) -> list[str]:
    """Texts each result's display must show: its headline (and, where it names tokens, their text)."""
    if name == "lens":
        return ["resid_post L1", "pos 7", "&#x27;:&#x27; (25)"]
    if name == "attribution":
        return ["direct logit", "L0.mlp"]
    if name == "heads":
        first = result.first
        layer, head = np.unravel_index(np.argmax(first), first.shape)
        return ["top 3 heads", "previous position", "induction", f"L{layer}H{head} {first[layer, head]:.2f}"]
    if name == "trace":
        effect = np.abs(result.indirect_effect("resid_post"))
        layer, position = np.unravel_index(np.argmax(effect), effect.shape)
        return ["indirect effect", f"clean {result.clean_prob:.4g}", f"corrupted {result.corrupt_prob:.4g}",
                "resid_post", display.number(float(result.indirect_effect("resid_post")[layer, position]))]
    if name == "massive":
        assert result.activations, "the settings should find massive activations"
        largest = max(result.activations, key=lambda a: abs(a.value))
        return [f"{len(result.activations)} massive activations on 1 prompt", "largest value",
                display.number(largest.value)]
    if name == "layers":
        return ["LayerSummary", "max_abs"]
    if name == "sweep":
        return ["largest effects on kl"]
    if name == "patch":
        return ["largest recoveries", "clean"]
    raise AssertionError(name)


def png_images(markup: str) -> int:
    return markup.count('<img alt="figure" style="max-width:100%" src="data:image/png;base64,iVBORw0KGgo')


@pytest.mark.parametrize("name", ["lens", "attribution", "heads", "trace", "massive", "layers", "sweep", "patch"])
def test_results_show_their_headline_and_figure_inline(model, figure_results, name):
    pytest.importorskip("matplotlib")
    result = figure_results[name]
    markup = model.show(result)._repr_html_()
    well_formed(markup)
    assert png_images(markup) == 1 and "figure failed" not in markup
    for text in headline_texts(name, result):
        assert text in markup, text


@pytest.mark.parametrize("name", ["lens", "trace", "massive"])
def test_figures_label_tokens_by_id_without_a_tokenizer(figure_results, name):
    """The figure needs no tokenizer: token labels are `#id` (display.pieces) and the title names no prompt."""
    pytest.importorskip("matplotlib")
    assert display.pieces([25, 10**9]) == ["#25", "#1000000000"] and display.decode([25]) is None
    markup = figure_results[name]._repr_html_()
    well_formed(markup)
    assert png_images(markup) == 1 and "figure failed" not in markup


def test_pieces_use_the_tokenizer_only_while_rendering(model):
    with display.tokens_from(model.tokenizer):
        assert display.pieces([25, 10**9]) == [":", "#1000000000"]  # an id outside the vocabulary: its id
        assert display.decode(model.encode("ROMEO: But")[0]) == "ROMEO: But"
    assert display.pieces([25]) == ["#25"]


def test_without_matplotlib_there_is_no_figure_and_no_error(model, figure_results, monkeypatch):
    monkeypatch.setattr(display, "has_matplotlib", lambda: False)
    for name, result in figure_results.items():
        markup = model.show(result)._repr_html_()
        well_formed(markup)
        assert "<img" not in markup and "figure failed" not in markup
        for text in headline_texts(name, result):
            assert text in markup, (name, text)


def test_results_without_what_their_figure_needs_have_none(figure_results):
    import dataclasses as dc

    assert dc.replace(figure_results["lens"], tokens=None)._figure() is None  # no prompt ids: no figure
    assert dc.replace(figure_results["layers"], tokens=None)._figure() is None
    assert figure_results["lens"]._figure(max_cells=10) is None  # too large to draw quickly: no figure


def test_a_failing_figure_costs_the_figure_not_the_display():
    pytest.importorskip("matplotlib")

    @display.displayable
    @dataclasses.dataclass
    class Broken:
        x: float

        def _headline(self):
            return [("x", self.x)]

        def _figure(self):
            raise ValueError("<no picture>")

    markup = Broken(2.5)._repr_html_()
    well_formed(markup)
    assert "figure failed: ValueError: &lt;no picture&gt;" in markup and "2.5" in markup
