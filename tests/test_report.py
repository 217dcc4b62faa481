"""The one-page HTML report (`probes.report`, `tinygpt report`): the page's content on the embedded model, the
CLI, and the page in a real browser (headless Chromium: no console errors, every figure drawn with a size,
the layer/head picker swapping the attention figure, a screenshot that is not blank).

The report is computed once per module (small settings: 3 tracing samples); the browser runs Debian's
`chromium`, installed here with apt-get where it is missing and we are root (else the browser tests skip,
saying why)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import tinygpt
from probes import report as reports
from tinygpt.cli import main

HOSTILE = "<script>alert(1)</script>"
PROMPT = f"ROMEO: {HOSTILE} But soft, what light"
ANSWER = " is"  # one token of the embedded tokenizer
SUBJECT = "ROMEO"
SAMPLES = 3


@pytest.fixture(scope="module")
def model():
    return tinygpt.load()


@pytest.fixture(scope="module")
def full(model):
    return reports.report(model, PROMPT, answer=ANSWER, subject=SUBJECT, trace_samples=SAMPLES, progress=False)


@pytest.fixture(scope="module")
def page(full, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert full.save(path) == path
    return path


# ------------------------------------------------------------------------------------------------ the page


VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "col", "area", "base", "embed"}


class Balance(HTMLParser):
    """Every element closed, in order (void elements excepted); collects <script>/<style> and attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.problems, self.attrs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(markup: str) -> Balance:
    parser = Balance()
    parser.feed(markup)
    parser.close()
    assert not parser.problems, parser.problems[:5]
    assert not parser.stack, f"unclosed: {parser.stack}"
    return parser


def without_images(markup: str) -> str:
    """The page without its images' data (and the report's random element id)."""
    markup = re.sub(r"tg-report-[0-9a-f]+", "tg-report-ID", markup)
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", markup)


def test_page_is_well_formed_and_self_contained(full, model):
    assert full.html.startswith("<!DOCTYPE html>")
    parsed = parse(full.html)
    text = without_images(full.html).lower()
    for reference in ("http://", "https://", "//cdn", "@import", "url(", "<link", "<iframe"):
        assert reference not in text, reference
    for tag, attrs in parsed.attrs:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith("data:image/png;base64,") or attrs[name].startswith("#"), (tag, attrs)
    assert [a["id"] for t, a in parsed.attrs if t == "section"] == list(reports.SECTIONS)
    # the model (source and sizes), the prompt, tinygpt's version
    page_text = "".join(parsed.text)
    assert "embedded" in page_text and "2 layers, 4 heads" in page_text and "d_model 128" in page_text
    assert PROMPT in page_text and full.prompt == PROMPT
    assert full.version == reports.version() and f"version {full.version}" in page_text
    assert re.fullmatch(r"\d+\.\d+.*", full.version)


def test_hostile_prompt_is_escaped(full):
    assert HOSTILE not in full.html and "alert(1)" in full.html
    assert html.escape(HOSTILE) in full.html
    assert full.html.count("<script>") == 1  # the page's own picker script only


def test_sections_hold_what_they_should(full, model):
    parsed = parse(full.html)
    page_text = "".join(parsed.text)
    ids = [int(i) for i in model.encode(PROMPT)[0]]
    assert full.tokens == ids and full.answer == model.tokenizer.encode(ANSWER)[0]
    for i, t in enumerate(ids):  # the tokenisation: every token's position and id
        assert f"{i}: id {t}" in page_text
    assert "Top next-token predictions" in page_text
    rank = int(re.search(r"has rank (\d+) \(0 = top\)", page_text).group(1))
    assert ("← answer" in page_text) == (rank < 10)  # marked in the top-10 table when it is there
    alts = [a.get("alt", "") for t, a in parsed.attrs if t == "img"]
    for alt in ("logit lens grid", "direct logit attribution bars", "massive activations per layer",
                "causal tracing heatmaps"):
        assert alt in alts
    assert sum(a.startswith("attention pattern of layer") for a in alts) == model.config.n_layer * model.config.n_head
    assert "rank of ' is'" in page_text  # the lens table's caption names the answer's rank
    assert re.search(r"#\d+", page_text)
    assert "clean" in page_text and "corrupted" in page_text  # tracing states the baseline
    selects = [a.get("class") for t, a in parsed.attrs if t == "select"]
    assert selects == ["tg-layer", "tg-head"]


def test_notebook_display_and_repr(full):
    assert full._repr_html_() == full.body and "<html" not in full.body and "tg-report" in full.body
    assert len(repr(full)) < 300 and "Report(" in repr(full)
    parse(full.body)


def test_without_answer_or_subject(model):
    steps = []
    bare = reports.report(model, PROMPT, progress=lambda step, done, total: steps.append((step, done)))
    assert steps[-1][0] == "done" and steps[-1][1] == len(steps) - 1
    parse(bare.html)
    assert bare.answer is None and bare.subject is None
    assert "--answer" in bare.html and "--subject" in bare.html  # the sections say what to give
    assert 'alt="direct logit attribution bars"' not in bare.html
    assert 'alt="causal tracing heatmaps"' not in bare.html


def test_api_errors(model):
    with pytest.raises(ValueError, match="answer ' is it' is 2 tokens"):
        reports.report(model, "ROMEO: hi", answer=" is it", progress=False)
    with pytest.raises(ValueError, match="subject 'JULIET' does not occur"):
        reports.report(model, "ROMEO: hi", subject="JULIET", progress=False)


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_writes_the_page(full, tmp_path, capsys):
    out = tmp_path / "r.html"
    code = main(["report", PROMPT, "--answer", ANSWER, "--subject", SUBJECT, "--samples", str(SAMPLES),
                 "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out)
    written = out.read_text()
    parse(written)
    assert without_images(written).split("computed in")[0] == without_images(full.html).split("computed in")[0]
    assert not [p for p in tmp_path.iterdir() if p.name != "r.html"]  # no temporary file left


@pytest.mark.parametrize("argv, flag", [
    (["--answer", " is it"], "--answer"),
    (["--subject", "JULIET"], "--subject"),
    (["--out", "{tmp}/r.txt"], "--out"),
    (["--out", "{tmp}/missing/r.html"], "--out"),
])
def test_cli_errors_are_one_line(argv, flag, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.html")]
    code = main(["report", "ROMEO: hi"] + argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error:") and flag in lines[0], err
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------------------------------------ a browser


INSTALL_TIMEOUT = 300


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    path, why = find_chromium(), "apt-get install chromium needs root and apt-get"
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:  # a bounded wait: CI has a 20-minute budget (a local mirror installs it in well under a minute)
            done = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                                  capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
            why = f"apt-get install chromium exited {done.returncode}: {(done.stderr or done.stdout).strip()[-200:]}"
        except subprocess.TimeoutExpired:
            why = f"apt-get install chromium took over {INSTALL_TIMEOUT} s"
        path = find_chromium()
    if path is None:
        pytest.skip(f"headless Chromium is not installed and could not be installed here ({why})")
    return path


def run_chromium(chromium, tmp_path, *args, timeout=60) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


# Installed first in the test copy's <head>: collects uncaught errors, console.error calls and alerts.
COLLECT = """<script>
window.__errors = [];
window.addEventListener('error', function(e){ window.__errors.push('error: ' + (e.message || e.type)); }, true);
window.addEventListener('unhandledrejection', function(e){ window.__errors.push('rejection: ' + e.reason); });
(function(){ var ce = console.error; console.error = function(){
  window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
window.alert = function(m){ window.__errors.push('alert: ' + m); };
</script>"""

# Appended to the test copy's <body>: measures every figure, drives the picker, writes the results into the DOM.
PROBE = """<script>
window.addEventListener('load', function(){
  var out = {figures: [], picker: [], errors: null};
  function size(fig){ var img = fig.querySelector('img'); var r = img.getBoundingClientRect();
    return {w: r.width, h: r.height, natural: img.naturalWidth, alt: img.alt, complete: img.complete}; }
  function visible(){ var figs = document.querySelectorAll('figure.tg-attn-fig'), on = [];
    for (var i = 0; i < figs.length; i++) if (!figs[i].hidden && figs[i].getBoundingClientRect().height > 0)
      on.push(figs[i].getAttribute('data-layer') + ',' + figs[i].getAttribute('data-head'));
    return on; }
  var figs = document.querySelectorAll('figure.tg-fig');
  for (var i = 0; i < figs.length; i++) if (!figs[i].hidden) out.figures.push(size(figs[i]));
  var layer = document.querySelector('select.tg-layer'), head = document.querySelector('select.tg-head');
  out.before = visible();
  for (var l = 0; l < layer.options.length; l++) for (var h = 0; h < head.options.length; h++) {
    layer.value = layer.options[l].value; layer.dispatchEvent(new Event('change'));
    head.value = head.options[h].value; head.dispatchEvent(new Event('change'));
    var shown = document.querySelector('figure.tg-attn-fig:not([hidden])');
    out.picker.push({want: layer.value + ',' + head.value, visible: visible(), size: shown ? size(shown) : null});
  }
  out.errors = window.__errors;
  var pre = document.createElement('pre'); pre.id = 'tg-test-results'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def browser_results(chromium, tmp_path, markup: str) -> tuple[dict, str]:
    copy = tmp_path / "probe.html"
    markup = markup.replace("<head>", "<head>" + COLLECT, 1).replace("</body>", PROBE + "</body>", 1)
    copy.write_text(markup)
    done = run_chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", copy.as_uri())
    found = re.search(r'<pre id="tg-test-results">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no results in the dumped DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1))), done.stderr


def test_the_error_collector_sees_errors(chromium, tmp_path):
    broken = "<!DOCTYPE html><html><head></head><body><script>undefinedFunction();</script>" \
             "<select class='tg-layer'></select><select class='tg-head'></select></body></html>"
    results, _ = browser_results(chromium, tmp_path, broken)
    assert any("undefinedFunction" in e for e in results["errors"]), results


def test_in_chromium(chromium, full, tmp_path, model):
    results, stderr = browser_results(chromium, tmp_path, full.html)
    # (1) no console errors: none collected in the page, no uncaught error in Chromium's log
    assert results["errors"] == [], results["errors"]
    assert "Uncaught" not in stderr, stderr[-2000:]
    # (2) every figure shown renders with a size: lens, one attention head, attribution, massive, tracing
    assert len(results["figures"]) == 5, results["figures"]
    for fig in results["figures"]:
        assert fig["complete"] and fig["natural"] > 0 and fig["w"] > 50 and fig["h"] > 50, fig
    # (3) the picker: one attention figure visible at a time, the one asked for, each drawn with a size
    assert results["before"] == ["0,0"]
    n_layer, n_head = model.config.n_layer, model.config.n_head
    assert [p["want"] for p in results["picker"]] == [f"{l},{h}" for l in range(n_layer) for h in range(n_head)]
    for p in results["picker"]:
        assert p["visible"] == [p["want"]], p
        assert p["size"]["w"] > 50 and p["size"]["h"] > 50 and p["size"]["natural"] > 0, p


def test_screenshot_is_not_blank(chromium, page, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    done = run_chromium(chromium, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 20, pixels.std()  # text, tables and figures, not an empty page
    assert (pixels < 128).mean() > 0.02  # a fair share of dark pixels (text, heatmaps)
