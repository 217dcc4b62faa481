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


def test_pages_load_nothing_from_the_network(built):
    out, _ = built
    remote = re.compile(r"""<(?:script|img|iframe)[^>]*\ssrc=["']https?:|<link[^>]*\shref=["']https?:""", re.I)
    offenders = [p.relative_to(out).as_posix() for p in out.rglob("*.html") if remote.search(p.read_text())]
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
