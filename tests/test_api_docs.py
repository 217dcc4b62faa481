"""The API reference (docs/build_api.py, pdoc) builds offline into a temporary directory: every public module
of tinygpt, weights and probes has a page, every module imports, the front page's site table is
tinygpt.sites.SITES and its glossary names every dimension the site table uses, and no page loads anything
from the network."""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("pdoc", reason="pdoc builds the API reference: pip install -e '.[test]'")


def _build_api():
    spec = importlib.util.spec_from_file_location("build_api", REPO / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_api = _build_api()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    result = build_api.build(out)  # raises, naming the modules, when one fails to import
    return out, result


def public_modules_on_disk() -> set[str]:
    """Every importable .py file of the packages whose dotted name has no part with a leading underscore,
    counted here independently of build_api.modules()."""
    found = set()
    for package in build_api.PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            in_packages = all((REPO.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts)))
            if in_packages and not any(p.startswith("_") for p in parts):
                found.add(".".join(parts))
    return found


def test_every_public_module_has_a_page(built):
    out, result = built
    expected = public_modules_on_disk()
    assert {"tinygpt", "tinygpt.sites", "weights", "probes", "probes.lens"} <= expected
    assert set(result["modules"]) == expected
    missing = [m for m in sorted(expected) if not (out / (m.replace(".", "/") + ".html")).is_file()]
    assert not missing, f"modules without a page: {missing}"


def test_pages_carry_the_docstrings(built):
    out, _ = built
    sites = (out / "tinygpt" / "sites.html").read_text()
    assert "The table of named sites" in sites
    assert "causal_trace" in (out / "probes" / "tracing.html").read_text()


def test_front_page_site_table_is_the_site_table(built):
    from tinygpt.sites import SITES

    page = (out := built[0]) / "index.html"
    text = page.read_text()
    section = text[text.index('id="sites"'):]
    rows = re.findall(r"<tr><td><code>([^<]*)</code></td><td><code>([^<]*)</code></td><td>([^<]*)</td></tr>", section)
    expected = [(s.name, "[" + ", ".join(("layer",) * s.per_layer + s.shape) + "]", s.meaning)
                for s in SITES.values()]
    assert [(n, html.unescape(s), html.unescape(m)) for n, s, m in rows] == expected
    assert out.is_dir()


def test_front_page_glossary_names_every_dimension(built):
    from tinygpt.sites import SITES

    text = (built[0] / "index.html").read_text()
    section = text[text.index('id="glossary"'):text.index('id="sites"')]
    named = set(re.findall(r"<tr><td><code>([^<]*)</code></td>", section))
    used = {"layer"} | {d for s in SITES.values() for d in s.shape}
    assert used <= named, f"dimension names missing from the glossary: {sorted(used - named)}"


BODY = re.compile(r"<(script|style)\b[^>]*>(.*?)</\1\s*>", re.I | re.S)
BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
LINE_COMMENT = re.compile(r"(?m)(^|[\s;{}])//[^\n]*")  # a JS line comment; a URL's // follows a quote, ( or :
DATA_URI = re.compile(r"data:[^\"')\s]+", re.I)  # inline data (an SVG's xmlns inside it is a name, not a load)
REMOTE = re.compile(r"(?:https?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.I)
ATTRIBUTE = re.compile(r"""<(?!a[\s>])[a-z][\w-]*\b[^>]*?\s(?:src|href|srcset|data|action|poster)\s*=\s*["']?\s*"""
                       r"""(?:https?:)?//""", re.I)  # any tag but a plain link <a href>
STYLE_ATTRIBUTE = re.compile(r"""\sstyle\s*=\s*["'][^"']*url\(\s*["']?(?:https?:)?//""", re.I)


def remote_loads(text: str, kind: str = "html") -> list[str]:
    """What a page (or a .js file) would fetch from another host: a src / href (but <a href>) / srcset / style
    url() with http(s):// or a protocol-relative //host, and any such URL in a <script> or <style> body
    (import ... from "https://...", @import, url(...)), comments and data: URIs aside."""
    found = [m.group(0)[:80] for pattern in (ATTRIBUTE, STYLE_ATTRIBUTE) for m in pattern.finditer(text)]
    bodies = [("script", text)] if kind == "js" else [(m.group(1).lower(), m.group(2)) for m in BODY.finditer(text)]
    for tag, body in bodies:
        body = DATA_URI.sub("", BLOCK_COMMENT.sub("", body))
        if tag == "script":
            body = LINE_COMMENT.sub(r"\1", body)
        found += [m.group(0) for m in REMOTE.finditer(body)]
    return found


@pytest.mark.parametrize("page, remote", [
    ('<script src="//cdn.example.com/a.js"></script>', True),
    ("<link rel=stylesheet href=//fonts.example.com/css>", True),
    ('<style>@import url(http://example.org/a.css);</style>', True),
    ('<style>a{background:url("//example.org/i.png")}</style>', True),
    ('<script type="module">import m from "https://esm.example/mathjax";</script>', True),
    ('<img srcset="https://example.org/i.png 2x">', True),
    ('<div style="background: url(//example.org/i.png)">', True),
    ('<a href="https://github.com/x">a link</a>', False),
    ("<script>// see https://example.org\nvar a = 1;</script>", False),
    ('<style>/* https://getbootstrap.com */ a{background:url("data:image/svg+xml,http%3A//www.w3.org")}</style>',
     False),
])
def test_the_network_check_sees_every_remote_load(page, remote):
    assert bool(remote_loads(page)) == remote


def test_pages_load_nothing_from_the_network(built):
    out, _ = built
    offenders = {p.relative_to(out).as_posix(): found[:3] for p in out.rglob("*.html") if (found := remote_loads(
        p.read_text()))}
    offenders.update({p.relative_to(out).as_posix(): found[:3] for p in out.rglob("*.js")
                      if (found := remote_loads(p.read_text(), "js"))})
    assert not offenders, f"pages that load from the network: {offenders}"


def test_the_build_is_fast(built):
    assert built[1]["seconds"] < 60, f"the API reference took {built[1]['seconds']:.1f} s to build"


def test_an_import_failure_fails_the_build(tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "bad.py").write_text('"""Fails."""\nraise ImportError("no such dependency")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(build_api, "REPO", tmp_path)
    monkeypatch.setattr(build_api, "PACKAGES", ("brokenpkg",))
    monkeypatch.setattr(build_api, "front_page", lambda names: "")
    with pytest.raises(RuntimeError, match=r"could not import every module:\n.*brokenpkg\.bad"):
        build_api.build(tmp_path / "out")
    sys.modules.pop("brokenpkg", None)


def test_the_command_line_writes_the_reference(tmp_path, capsys):
    # the same build as the fixture's, through main(): only the summary line is checked
    assert build_api.main(["--out", str(tmp_path / "api")]) == 0
    assert re.match(r"wrote \d+ module pages and index.html to .* in [\d.]+ s", capsys.readouterr().out)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        build_api.main(["--out", str(tmp_path / "file")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_api: error: --out ") and "\n" not in err and "Traceback" not in err, err


def test_index_is_written_atomically_through_tinygpt_files(tmp_path, monkeypatch):
    import tinygpt.files

    written = []
    monkeypatch.setattr(tinygpt.files, "write_bytes", lambda path, data: written.append(Path(path)))
    monkeypatch.setattr(build_api, "modules", lambda: [])
    monkeypatch.setattr(build_api, "front_page", lambda names: "")
    monkeypatch.setattr("pdoc.pdoc", lambda *names, output_directory: None)
    build_api.build(tmp_path / "out")
    assert written == [tmp_path / "out" / "index.html"]
