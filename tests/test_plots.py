"""probes.plots, the one plotting module: every subcommand's --plot on the embedded model (2 layers, 4 heads)
writes an image of a sane pixel size whose metadata (written by plots.save) names a title and labelled axes;
integer axes have integer ticks; token text the font lacks is escaped without matplotlib's warning; and no
module but probes/plots.py (and tinygpt/files.py, which writes a figure it is handed) imports matplotlib.

The commands run in-process (`tinygpt.cli.main`) with small settings, so compiled programs are shared."""

from __future__ import annotations

import ast
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (pillow comes with matplotlib)

from probes import plots  # noqa: E402
from tinygpt.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO: But soft"
MIN_SIDE, MAX_SIDE = 300, plots.MAX_PIXELS

COMMANDS = {
    "generate": ["generate", "ROMEO:", "-n", "6", "--temperature", "0"],
    "attribute": ["attribute", PROMPT],
    "lens": ["lens", "crab 🦀 and 漢字", "--site", "resid_post"],  # glyphs the default font lacks
    "attention": ["attention", PROMPT, "--induction-n", "4"],
    "svd": ["svd", "OV", "--layer", "0"],
    "ablate": ["ablate", PROMPT, "--layers", "0", "--heads", "1"],
    "ablate --sweep neurons": ["ablate", PROMPT, "--sweep", "neurons"],
    "patch --by head": ["patch", "--clean", "ROMEO: my lord", "--corrupt", "HAMLET: my lord", "--metric",
                        "log_prob", "--by", "head"],
    "trace": ["trace", PROMPT, "--subject", "ROMEO", "--samples", "1", "--kinds", "resid_post"],
    "massive": ["massive", "ROMEO: But", "--threshold", "5", "--ratio", "5", "--top", "1"],
    "superposition": ["superposition", "--pairs", "2000"],
    "manifold": ["manifold", "--points", "60", "--max-tokens", "600", "--seq", "32"],
}


# ------------------------------------------------------------------------------------------ the checker


def check_image(path) -> dict:
    """The PNG's pixel size is sane and its metadata names a title, every plotting axes' x and y labels and
    every colour bar's label; returns the metadata's description."""
    image = Image.open(path)
    width, height = image.size
    assert MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE, f"{path}: {width} x {height} px"
    title = image.info.get("Title", "")
    assert title.strip(), f"{path}: no title"
    axes = json.loads(image.info.get("Description", "[]"))
    plotting = [a for a in axes if "colorbar" not in a]
    assert plotting, f"{path}: no axes"
    for a in plotting:
        assert a["xlabel"].strip() and a["ylabel"].strip(), f"{path}: unlabelled axes {a}"
    for a in axes:
        if "colorbar" in a:
            assert a["colorbar"].strip(), f"{path}: unlabelled colour bar"
    return {"title": title, "axes": axes}


def outside(fig) -> list[str]:
    """Texts (titles, axis and tick labels, colour-bar labels) drawn partly outside the figure: cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    bounds = fig.bbox

    def out(box):
        return box is not None and (box.x0 < bounds.x0 - 1 or box.y0 < bounds.y0 - 1 or box.x1 > bounds.x1 + 1
                                    or box.y1 > bounds.y1 + 1)

    cut = []
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):  # the tick labels drawn (those in view)
            if out(axis.get_tightbbox(renderer)):
                cut.append(f"{name} tick labels of {ax.get_title() or ax.get_ylabel()!r}")
    cut += [t.get_text() for t in texts if t.get_visible() and t.get_text() and out(t.get_window_extent(renderer))]
    return cut


def bare_figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_the_checker_fails_a_figure_without_title_or_labels(tmp_path):
    fig = bare_figure()
    plots.save(fig, tmp_path / "bare.png")
    with pytest.raises(AssertionError, match="no title"):
        check_image(tmp_path / "bare.png")
    fig.suptitle("a title")
    plots.save(fig, tmp_path / "titled.png")
    with pytest.raises(AssertionError, match="unlabelled axes"):
        check_image(tmp_path / "titled.png")
    fig.axes[0].set_xlabel("x")
    fig.axes[0].set_ylabel("y")
    image = fig.axes[0].imshow(np.eye(2))
    fig.colorbar(image, ax=fig.axes[0])
    plots.save(fig, tmp_path / "bar.png")
    with pytest.raises(AssertionError, match="unlabelled colour bar"):
        check_image(tmp_path / "bar.png")


def test_the_checker_fails_a_tiny_or_huge_image_and_save_caps_the_size(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=100)
    ax = fig.subplots()
    fig.suptitle("t")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    plots.save(fig, tmp_path / "tiny.png")
    with pytest.raises(AssertionError, match="200 x 200 px"):
        check_image(tmp_path / "tiny.png")
    fig.set_size_inches(280, 2.5)  # the old neuron sweep's shape: 28000 px wide at 100 dpi
    plots.save(fig, tmp_path / "wide.png")
    assert max(Image.open(tmp_path / "wide.png").size) <= plots.MAX_PIXELS


def test_the_cut_off_check_sees_a_label_outside_the_figure():
    fig = bare_figure()
    fig.axes[0].set_ylabel("a label", labelpad=400)
    assert "a label" in outside(fig)


# -------------------------------------------------------------------------------- every command's --plot


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_plot_is_a_sane_labelled_picture(name, tmp_path, capsys, caplog, monkeypatch):
    """Also: no missing-glyph warning (the lens runs on a prompt with an emoji and CJK characters)."""
    path = tmp_path / "plot.png"
    figures, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, where: (figures.append(fig), save(fig, where)))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert main([*COMMANDS[name], "--json", "--plot", str(path)]) == 0
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing from" in m or "Glyph" in m], messages  # no missing glyphs
    assert len(figures) == 1 and outside(figures[0]) == []  # no label cut off
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays the JSON
    assert captured.err == f"plot written to {path}\n"  # the one confirmation line, the same everywhere
    info = check_image(path)
    if name == "lens":  # the emoji prompt: the title shows it escaped
        assert "\\U0001f980" in info["title"] and "\\u6f22" in info["title"]


def test_every_plotting_subcommand_is_exercised():
    from test_cli_options import PLOTTING

    assert {p[0] for p, _, _ in PLOTTING} <= {argv[0] for argv in COMMANDS.values()}


# ------------------------------------------------------------------------------------ figure-level checks


def effect_grid(n_layer=2, n_unit=4):
    return {"z": np.linspace(-1, 2, n_layer * n_unit).reshape(n_layer, n_unit)}


def tick_texts(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_two_layer_heatmaps_tick_the_layers_as_integers():
    fig = plots.layer_unit_grid(effect_grid(), [0, 1], [0, 1, 2, 3], unit="head", value_label="change in kl",
                                what="zero ablation of each head", model="embedded", prompt=PROMPT)
    ax = fig.axes[0]
    assert tick_texts(ax.yaxis) == ["0", "1"] and list(ax.get_yticks()) == [0, 1]
    assert tick_texts(ax.xaxis) == ["0", "1", "2", "3"]
    norm = ax.images[0].norm
    assert norm.vmin == -norm.vmax and norm(0.0) == 0.5  # diverging, centred at 0
    assert outside(fig) == []


def test_wide_grids_show_their_largest_cells():
    grid = np.zeros((2, 3072))
    grid[1, 7], grid[0, 3000] = 5.0, -4.0
    fig = plots.layer_unit_grid({"mlp_post": grid}, [0, 1], range(3072), unit="neuron", value_label="change",
                                what="sweep")
    labels = tick_texts(fig.axes[0].yaxis)
    assert labels[:2] == ["L1 neuron 7", "L0 neuron 3000"] and len(labels) == plots.TOP_CELLS
    assert max(fig.get_size_inches() * fig.dpi) <= plots.MAX_PIXELS


def test_the_lens_colour_bar_label_is_not_cut(tmp_path):
    from probes.lens import logit_lens
    from tinygpt import load

    model = load()
    ids = model.tokenizer.encode(PROMPT)
    result = logit_lens(model.params, model.config, np.asarray([ids]), sites=("resid_post",))
    top = np.asarray(result.top_ids)[:, :, 0, :, 0]
    pieces = np.asarray(model.tokenizer.pieces(top.ravel().tolist()), dtype=object).reshape(top.shape)
    fig = plots.logit_lens(result, model.tokenizer.pieces(ids), pieces, model="embedded", prompt=PROMPT)
    assert outside(fig) == []
    bar = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None][0]
    assert bar.get_ylabel() and tick_texts(fig.axes[0].yaxis) == ["0 resid_post", "1 resid_post"]


def test_text_the_font_lacks_is_escaped():
    assert plots.text("crab 🦀 \n $5") == "crab \\U0001f980 \\n \\$5"
    assert plots.token(" the") == "' the'" and plots.token(" the", quote=False) == "' the'"


# --------------------------------------------------------------------------------- who imports matplotlib


def matplotlib_importers(root: Path = REPO) -> set[str]:
    found = set()
    for package in ("tinygpt", "weights", "probes"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(n == "matplotlib" or n.startswith("matplotlib.") for n in names):
                    found.add(str(path.relative_to(root)))
    return found


def test_only_the_plotting_module_imports_matplotlib():
    assert matplotlib_importers() <= {"probes/plots.py", "tinygpt/files.py"}
    assert "probes/plots.py" in matplotlib_importers()


def test_the_import_check_sees_a_stray_import(tmp_path):
    (tmp_path / "tinygpt" / "cli").mkdir(parents=True)
    (tmp_path / "tinygpt" / "cli" / "x.py").write_text("def f():\n    import matplotlib.pyplot as plt\n")
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "y.py").write_text("from matplotlib.figure import Figure\n")
    assert matplotlib_importers(tmp_path) == {"tinygpt/cli/x.py", "probes/y.py"}
