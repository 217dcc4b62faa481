"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed, on the
embedded model, and every relative link in them points to a file (and heading) that exists.

The blocks of one document run in order in one namespace, as a reader goes through it top to bottom: a
block may use what an earlier block of the same document defined. The working directory is a temporary
one, so nothing a block writes lands in the repository. A block that needs the Hugging Face hub (and so a
network) opts out with the line

    <!-- docs-test: skip (needs the Hugging Face hub) -->

right before its fence; it is still compiled (a syntax error fails). No other reason to skip is accepted.
A failure names the document and the line where the failing block starts; tracebacks point at the
document's own lines."""

from __future__ import annotations

import dataclasses
import re
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS_DIR = REPO / "docs"
MAX_README_LINES = 150
EXPECTED_DOCS = ("engine.md", "weights.md", "generation.md", "probes.md")

FENCE_OPEN = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
PYTHON_INFO = {"python", "py", "python3"}
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip\s*\((.+)\)\s*$")


def documents() -> list[Path]:
    return [README, *sorted(DOCS_DIR.glob("*.md"))]


def doc_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


class DocBlockError(AssertionError):
    """A documentation block failed to run (or a docs-test marker is malformed)."""


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the skip marker's reason, or None


def fenced_blocks(text: str):
    """Every fenced block: (opening line number, info string, code lines, the line before the fence)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE_OPEN.match(lines[i].strip())
        if not match:
            i += 1
            continue
        fence, info = match.group(1), match.group(2).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and not lines[i].strip().strip(fence[0])):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence (or the end of the file)
        yield start + 1, info, body, lines[start - 1] if start else ""


def python_blocks(text: str, name: str) -> list[Block]:
    """The ```python blocks of a markdown text, with their skip markers. Raises DocBlockError for a
    docs-test marker that is not a skip for the hub right before a python fence."""
    blocks, marker_lines = [], set()
    for line, info, body, before in fenced_blocks(text):
        marker = MARKER.search(before)
        skip = None
        if marker:
            marker_lines.add(line - 1)
            if info not in PYTHON_INFO:
                raise DocBlockError(f"{name}:{line - 1}: a docs-test marker must stand right before a ```python "
                                    f"fence, not a ```{info} one")
            reason = SKIP.match(marker.group(1))
            if not reason:
                raise DocBlockError(f"{name}:{line - 1}: unknown docs-test marker {marker.group(0)!r}; the only "
                                    "one is <!-- docs-test: skip (needs the Hugging Face hub) -->")
            skip = reason.group(1).strip()
            if "hub" not in skip.lower():
                raise DocBlockError(f"{name}:{line - 1}: a block may skip the docs test only when it needs the "
                                    f"Hugging Face hub; this marker's reason is {skip!r}")
        if info in PYTHON_INFO:
            blocks.append(Block(line, "\n".join(body), skip))
    for number, text_line in enumerate(text.splitlines(), 1):
        if MARKER.search(text_line) and number not in marker_lines:
            raise DocBlockError(f"{name}:{number}: a docs-test marker must be the line right before a ```python "
                                "fence")
    return blocks


def run_blocks(text: str, name: str, filename: str | None = None) -> int:
    """Run a document's python blocks in order in one namespace; returns how many ran. Each block is compiled
    with the document's line numbers, so a traceback names the line in the document."""
    namespace = {"__name__": "__docs__"}
    ran = 0
    for block in python_blocks(text, name):
        source = "\n" * block.line + block.code  # line numbers as in the document
        try:
            code = compile(source, filename or name, "exec")
        except SyntaxError as e:
            raise DocBlockError(f"{name}: the python block at line {block.line} does not compile:\n"
                                + "".join(traceback.format_exception_only(type(e), e))) from None
        if block.skip:
            continue
        try:
            exec(code, namespace)
        except BaseException as e:  # noqa: BLE001 - any failure of a block is the test's failure
            if isinstance(e, KeyboardInterrupt):
                raise
            shown = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
            raise DocBlockError(f"{name}: the python block at line {block.line} raised "
                                f"{type(e).__name__}:\n{shown}") from None
        ran += 1
    return ran


@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # tinygpt, weights, probes, whatever the working directory
    monkeypatch.chdir(tmp_path)
    failure = None
    try:
        run_blocks(path.read_text(), doc_id(path), str(path))
    except DocBlockError as e:
        failure = str(e)
    if failure:
        pytest.fail(failure, pytrace=False)


def test_readme_and_docs_have_python_blocks():
    for name in EXPECTED_DOCS:
        assert (DOCS_DIR / name).is_file(), f"docs/{name} is missing"
    assert python_blocks(README.read_text(), "README.md"), "README.md has no ```python block"
    in_docs = [b for p in sorted(DOCS_DIR.glob("*.md")) for b in python_blocks(p.read_text(), doc_id(p))]
    assert in_docs, "docs/ has no ```python block"


def test_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it <= {MAX_README_LINES}, move depth to docs/"


# ------------------------------------------------------------------------------------------------------ links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
INLINE_CODE = re.compile(r"(`+).*?\1", re.S)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (links there are examples, not links)."""
    lines = text.splitlines()
    fenced = set()
    for line, _, body, _ in fenced_blocks(text):
        fenced.update(range(line - 1, line + len(body) + 1))
    kept = "\n".join(l for i, l in enumerate(lines) if i not in fenced)
    return INLINE_CODE.sub("", kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    text = prose(path.read_text())
    targets = [a or b for a, b in LINK.findall(text)] + IMAGE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # not http:, mailto:, ...


@pytest.mark.parametrize("path", [*documents(), REPO / "benchmarks" / "README.md"], ids=doc_id)
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor.lower() not in anchors(destination):
            broken.append(f"{target} (no heading #{anchor} in {destination.relative_to(REPO).as_posix()})")
    assert not broken, f"{doc_id(path)} has broken links: {', '.join(broken)}"


# ------------------------------------------------------------------------------- the checker itself can fail

SYNTHETIC = """# A document

Some prose.

```python
x = 1
```

```bash
echo not python
```

```python
y = x + 1
y.nope
```
"""


def test_a_failing_block_is_reported_with_its_document_and_line():
    with pytest.raises(DocBlockError) as failure:
        run_blocks(SYNTHETIC, "docs/synthetic.md")
    message = str(failure.value)
    assert "docs/synthetic.md: the python block at line 13 raised AttributeError" in message
    assert "'int' object has no attribute 'nope'" in message
    assert 'File "docs/synthetic.md", line 15' in message  # the traceback names the document's own line


def test_blocks_share_one_namespace_in_document_order():
    assert run_blocks(SYNTHETIC.replace("y.nope\n", "assert y == 2\n"), "ok.md") == 2


@pytest.mark.parametrize("marker, error", [
    ("<!-- docs-test: skip (slow) -->", "only when it needs the Hugging Face hub"),
    ("<!-- docs-test: ignore -->", "unknown docs-test marker"),
])
def test_only_the_hub_may_excuse_a_block(marker, error):
    text = f"{marker}\n```python\nraise RuntimeError\n```\n"
    with pytest.raises(DocBlockError, match=error):
        python_blocks(text, "x.md")


def test_a_hub_block_is_skipped_but_compiled():
    marker = "<!-- docs-test: skip (needs the Hugging Face hub) -->"
    assert run_blocks(f"{marker}\n```python\nraise RuntimeError\n```\n", "x.md") == 0
    with pytest.raises(DocBlockError, match="line 2 does not compile"):
        run_blocks(f"{marker}\n```python\nraise (\n```\n", "x.md")


def test_a_stray_marker_fails():
    with pytest.raises(DocBlockError, match="right before"):
        python_blocks("<!-- docs-test: skip (needs the Hugging Face hub) -->\n\n```python\nx = 1\n```\n", "x.md")


def test_links_are_checked():
    assert relative_links(README), "README.md links to nothing"
    assert slug("The `tinygpt` command") == "the-tinygpt-command"
    assert slug("Errors, inputs and files") == "errors-inputs-and-files"


# ----------------------------------------------------------------------------------------------- site table


def test_engine_doc_site_table_is_the_site_table():
    """docs/engine.md's site table lists every site of tinygpt.sites.SITES, in order, with its shape and
    meaning (regenerate it from `tinygpt.sites.SITES` when a site changes)."""
    from tinygpt.sites import SITES

    rows = re.findall(r"^\| `(\w+)` \| `\[([^\]]*)\]` \| (.*?) \|$", (DOCS_DIR / "engine.md").read_text(), re.M)
    expected = [(s.name, ", ".join(("layer",) * s.per_layer + s.shape), s.meaning) for s in SITES.values()]
    assert rows == expected
