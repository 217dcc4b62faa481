"""One notebook run end to end (nbclient, the current Python's kernel) on the embedded model: every cell runs,
and the model, a trace and two probe results display as HTML naming what they show."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]

CELLS = [
    "import tinygpt, tinygpt.display\n"
    "print(tinygpt.__file__)\n"
    "model = tinygpt.load()\n"
    "model",
    'trace = model("ROMEO: But soft, what light")\ntrace',
    'model("ROMEO: But soft", compact=True)',
    "from probes import attribution, lens\n"
    'tokens = model.encode("ROMEO: But soft, what light")\n'
    "model.show(lens.logit_lens(model.params, model.config, tokens))",
    "answer = int(trace.logits[0, -1].argmax())\n"
    "attribution.direct_logit_attribution(model.params, model.config, tokens, answer)",
]


KERNEL = "tinygpt-test-python"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec of this very Python (sys.executable -m ipykernel_launcher), found first on JUPYTER_PATH."""
    import json

    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tinygpt test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL


def test_the_tour_notebook_runs_and_displays_html(kernel):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name=kernel,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    outputs = [cell.outputs for cell in notebook.cells]
    for cell, out in zip(notebook.cells, outputs):
        assert not [o for o in out if o.output_type == "error"], (cell.source, out)
    assert str(REPO / "tinygpt") in outputs[0][0]["text"]  # this checkout's tinygpt, not an installed one

    def html(i):
        shown = [o for o in outputs[i] if o.output_type == "execute_result"]
        assert shown and "text/html" in shown[0]["data"], outputs[i]
        assert "text/plain" in shown[0]["data"]
        return shown[0]["data"]["text/html"]

    for text in ("Model: embedded", "n_layer", "675,328"):
        assert text in html(0)
    for text in ("Trace: 23 sites", "resid_post", "[layer=2, batch=1, seq=8, d_model=128]"):
        assert text in html(1)
    assert "derived on read" in html(2)
    for text in ("LensSummary", "resid_post L1", "pos 7", "&#x27;:&#x27; (25)"):  # model.show: token text
        assert text in html(3)
    for text in ("Attribution", "direct logit", "embed"):
        assert text in html(4)
