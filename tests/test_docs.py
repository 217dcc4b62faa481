"""The documentation runs as written: every ```python block and every `$ tinygpt ...` command of README.md
and docs/**/*.md (subdirectories included, e.g. docs/studies/) is executed, on the embedded model, the output
a document shows is the output produced, and every relative link in them points to a file (and heading) that
exists.

Python blocks. The blocks of one document run in order in one namespace, as a reader goes through it top
to bottom: a block may use what an earlier block of the same document defined. A ```python block followed by
a ```text block (only blank lines between the two fences) shows its output: the text block must be what the
python block printed (stdout). A python block with no text block after it may print anything.

Commands. In a ```console (or ```bash, ```sh, ```shell) block, each line that starts with `$ ` is a command
and the lines after it, up to the next `$ ` line or the end of the block, are its output: what it printed on
stdout, exactly. A command is `tinygpt ARGS...` (split as a POSIX shell would, `\\` at the end of a line
continues it), run in-process through `tinygpt.cli.main(ARGS)`; it must exit with status 0 (a failure shows
its stderr, where progress bars and errors go). Another program after `$ ` is an error: show such commands
without the `$ ` prompt, and they are not run. Lines of a shell block without `$ ` (e.g. README's
`pip install ...`) are not run either.

Comparing output. Trailing whitespace and leading and trailing blank lines are ignored. A decimal number
(`0.04777`, `-1.5e-06`) matches the produced one up to float rounding on another CPU or XLA build: within
1.5 units of its last shown digit or 0.2 % of its value (`numbers_agree`); integers (token ids, counts) and
all other text match exactly. `...` stands for what differs from run to run (timings, temporary paths) or
is not worth showing, as doctest's ELLIPSIS: a line that is only `...` matches any number of lines (none
included), and `...` inside a line matches any text within that line. A mismatch names the document and the line of the block (or command) and shows a
diff, expected against produced. After a change that moves the output, rewrite what a document shows with

    python tests/test_docs.py --update docs/studies/fact-storage.md

which replaces every shown output that no longer matches with the one produced (outputs that still match,
`...` included, are left as written; a rewritten one is the output of this run, so put back the `...` where
it varies); read the diff before committing it.

The blocks and commands of a document share one temporary working directory, so a command may write a file
that a later block or command reads, and nothing lands in the repository. A block or console block that
needs the Hugging Face hub (and so a network) opts out with the line

    <!-- docs-test: skip (needs the Hugging Face hub) -->

right before its fence; a skipped python block is still compiled (a syntax error fails) and a skipped
command is still parsed by tinygpt's argument parser (an unknown option fails), and the output shown under
either is not checked. No other reason to skip is accepted. A failure names the document and the line where
the failing block (or command) starts; tracebacks point at the document's own lines."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import re
import os
import shlex
import sys
import tempfile
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
SHELL_INFO = {"console", "bash", "sh", "shell"}
OUTPUT_INFO = "text"
PROMPT = "$ "
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip\s*\((.+)\)\s*$")
HUB_REASON = "needs the Hugging Face hub"  # the one reason a block may skip: <!-- docs-test: skip (needs the Hugging Face hub) -->


def documents() -> list[Path]:
    return [README, REPO / "benchmarks" / "README.md", *sorted(DOCS_DIR.rglob("*.md"))]


def doc_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


class DocBlockError(AssertionError):
    """A documentation block failed to run, its output differs from the document's, or a docs-test marker
    is malformed."""


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the skip marker's reason, or None
    expected: str | None = None  # the output shown in the ```text block right after, or None
    expected_line: int | None = None  # the text block's opening fence


@dataclasses.dataclass
class Command:
    line: int  # 1-based line of the `$ ` line
    text: str  # the command after `$ `, continuation lines joined
    expected: str  # the lines after it, up to the next command or the end of the block


@dataclasses.dataclass
class Shell:
    line: int  # 1-based line of the opening fence
    commands: list[Command]
    skip: str | None


def fenced_blocks(text: str):
    """Every fenced block: (opening line number, info string, code lines, the line before the fence)."""
    for line, info, body, before, _ in _fences(text):
        yield line, info, body, before


def _fences(text: str):
    """As fenced_blocks, plus the 1-based line of the closing fence."""
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
        yield start + 1, info, body, lines[start - 1] if start else "", i


def shell_commands(body: list[str], first_line: int, name: str) -> list[Command]:
    """The `$ ` commands of a shell block's lines (the first at document line `first_line`), each with the
    output lines shown under it. Raises DocBlockError for a `$ ` command that is not `tinygpt ...`."""
    commands: list[Command] = []
    i = 0
    while i < len(body):
        stripped = body[i].strip()
        if not stripped.startswith(PROMPT):
            if commands:
                commands[-1].expected += body[i] + "\n"
            i += 1
            continue
        line, parts = first_line + i, [stripped[2:]]
        while parts[-1].endswith("\\") and i + 1 < len(body):
            parts[-1] = parts[-1][:-1]
            i += 1
            parts.append(body[i].strip().removeprefix("> "))
        command = " ".join(p.strip() for p in parts)
        words = shlex.split(command)
        if not words or words[0] != "tinygpt":
            raise DocBlockError(f"{name}:{line}: only `$ tinygpt ...` commands run in the docs test; show "
                                f"{command!r} without the `$ ` prompt")
        commands.append(Command(line, command, ""))
        i += 1
    return commands


def doc_blocks(text: str, name: str) -> list[Block | Shell]:
    """The ```python blocks (each with the ```text block shown after it) and the shell blocks with `$ `
    commands of a markdown text, in document order, with their skip markers. Raises DocBlockError for a
    docs-test marker that is not a skip for the hub right before a python or shell fence."""
    blocks: list[Block | Shell] = []
    marker_lines = set()
    previous_python, previous_end = None, None
    lines = text.splitlines()
    for line, info, body, before, end in _fences(text):
        marker = MARKER.search(before)
        skip = None
        if marker:
            marker_lines.add(line - 1)
            if info not in PYTHON_INFO | SHELL_INFO:
                raise DocBlockError(f"{name}:{line - 1}: a docs-test marker must stand right before a ```python "
                                    f"or ```console fence, not a ```{info} one")
            reason = SKIP.match(marker.group(1))
            if not reason:
                raise DocBlockError(f"{name}:{line - 1}: unknown docs-test marker {marker.group(0)!r}; the only "
                                    "one is <!-- docs-test: skip (needs the Hugging Face hub) -->")
            skip = reason.group(1).strip()
            if skip != HUB_REASON:
                raise DocBlockError(f"{name}:{line - 1}: a block may skip the docs test only when it needs the "
                                    f"Hugging Face hub; this marker's reason is {skip!r}")
        if info in PYTHON_INFO:
            previous_python = Block(line, "\n".join(body), skip)
            blocks.append(previous_python)
        elif info == OUTPUT_INFO and previous_python is not None and not marker and \
                all(not l.strip() for l in lines[previous_end:line - 1]):
            previous_python.expected, previous_python.expected_line = "\n".join(body), line
            previous_python = None
        elif info in SHELL_INFO:
            commands = shell_commands(body, line + 1, name)
            if commands:
                blocks.append(Shell(line, commands, skip))
            elif skip:
                raise DocBlockError(f"{name}:{line - 1}: a docs-test marker stands before a ```{info} block "
                                    "with no `$ tinygpt` command")
        if info != OUTPUT_INFO and info not in PYTHON_INFO:
            previous_python = None
        previous_end = end
    for number, text_line in enumerate(lines, 1):
        if MARKER.search(text_line) and number not in marker_lines:
            raise DocBlockError(f"{name}:{number}: a docs-test marker must be the line right before a ```python "
                                "or ```console fence")
    return blocks


def python_blocks(text: str, name: str) -> list[Block]:
    """The ```python blocks of a markdown text, with their skip markers and shown output (see doc_blocks)."""
    return [b for b in doc_blocks(text, name) if isinstance(b, Block)]


# ------------------------------------------------------------------------------------------ output matching

ELLIPSIS = "..."


def _clean(text: str) -> list[str]:
    lines = [l.rstrip() for l in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


DECIMAL = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")  # a printed float: compared with a tolerance
RELATIVE = 2e-3  # ... of a shown decimal, or 1.5 units of its last digit, whichever is larger


def _literal(piece: str) -> str:
    """A piece of an expected line as a regular expression: its text literal, each decimal number a group
    that matches any decimal (checked against the shown value by `numbers_agree`)."""
    out, at = [], 0
    for number in DECIMAL.finditer(piece):
        out += [re.escape(piece[at:number.start()]), f"({DECIMAL.pattern})"]
        at = number.end()
    return "".join(out) + re.escape(piece[at:])


def output_pattern(expected: str) -> re.Pattern:
    """The regular expression of an expected output: each line literal (decimal numbers aside), `...` alone on
    a line any number of lines, `...` within a line any text within the line."""
    parts = []
    for line in _clean(expected):
        if line.strip() == ELLIPSIS:
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*?".join(_literal(piece) for piece in line.split(ELLIPSIS)) + r"\n")
    return re.compile("".join(parts))


def numbers_agree(shown: str, produced: str) -> bool:
    """Whether a produced decimal is the shown one up to float rounding on another CPU: within 1.5 units of
    the shown last digit or RELATIVE of its value. Integers (token ids, counts) are compared exactly."""
    mantissa, _, exponent = shown.lower().partition("e")
    unit = 10.0 ** (-len(mantissa.split(".")[1]) + (int(exponent) if exponent else 0))
    return abs(float(produced) - float(shown)) <= max(1.5 * unit, RELATIVE * abs(float(shown)))


def output_matches(expected: str, produced: str) -> bool:
    produced_lines = _clean(produced)
    text = "".join(l + "\n" for l in produced_lines)
    found = output_pattern(expected).fullmatch(text)
    if found is None:
        return False
    shown = [n.group() for piece in _clean(expected) for n in DECIMAL.finditer(piece)]
    return all(numbers_agree(a, b) for a, b in zip(shown, found.groups()))


def check_output(expected: str, produced: str, where: str) -> None:
    """Raise DocBlockError (naming `where`) with a diff when `produced` does not match `expected`."""
    if output_matches(expected, produced):
        return
    diff = "\n".join(difflib.unified_diff(_clean(expected), _clean(produced), "shown in the document",
                                          "produced", lineterm="", n=2))
    raise DocBlockError(f"{where}: the output differs from the document (`...` matches anything):\n{diff}")


# -------------------------------------------------------------------------------------------------- running

def run_command(command: Command, name: str, *, skip: bool = False) -> str:
    """Run one `$ tinygpt ...` command in-process and return its stdout; with `skip`, only parse it."""
    from tinygpt.cli import build_parser, main

    argv = shlex.split(command.text)[1:]
    if skip:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                raise DocBlockError(f"{name}:{command.line}: `{command.text}` does not parse:\n"
                                    f"{stderr.getvalue().strip()}") from None
        return ""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a crash of the command is the test's failure
            if isinstance(e, KeyboardInterrupt):
                raise
            code = f"{type(e).__name__}:\n{traceback.format_exc()}"
    if code != 0:
        raise DocBlockError(f"{name}:{command.line}: `{command.text}` exited with {code}; stderr:\n"
                            f"{err.getvalue().strip()[-3000:]}")
    return out.getvalue()


def run_python(block: Block, namespace: dict, name: str, filename: str | None) -> str | None:
    """Compile a python block with the document's line numbers (so a traceback names the document's line)
    and run it unless skipped. Returns what it printed (None when skipped)."""
    source = "\n" * block.line + block.code  # line numbers as in the document
    try:
        code = compile(source, filename or name, "exec")
    except SyntaxError as e:
        raise DocBlockError(f"{name}: the python block at line {block.line} does not compile:\n"
                            + "".join(traceback.format_exception_only(type(e), e))) from None
    if block.skip:
        return None
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
    except BaseException as e:  # noqa: BLE001 - any failure of a block is the test's failure
        if isinstance(e, KeyboardInterrupt):
            raise
        shown = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        raise DocBlockError(f"{name}: the python block at line {block.line} raised "
                            f"{type(e).__name__}:\n{shown}") from None
    return out.getvalue()


def _output_lines(lines: list[str], first: int) -> range:
    """The 0-based indices of the output lines that start at index `first`: up to the next `$ ` command or
    closing fence."""
    end = first
    while end < len(lines) and not lines[end].strip().startswith(("```", "~~~", PROMPT)):
        end += 1
    return range(first, end)


def run_blocks(text: str, name: str, filename: str | None = None, *, mismatches: list | None = None) -> int:
    """Run a document's python blocks and `$ tinygpt` commands in order (python blocks in one namespace)
    and check the output each shows; returns how many blocks and commands ran. With a `mismatches` list,
    an output that differs is appended to it as (0-based line indices of the shown output, produced text)
    instead of failing."""
    namespace = {"__name__": "__docs__"}
    lines = text.splitlines()
    ran = 0

    def check(expected, produced, where, first_index):
        if mismatches is None:
            check_output(expected, produced, where)
        elif not output_matches(expected, produced):
            mismatches.append((_output_lines(lines, first_index), produced))

    for block in doc_blocks(text, name):
        if isinstance(block, Block):
            produced = run_python(block, namespace, name, filename)
            if produced is None:
                continue
            ran += 1
            if block.expected is not None:
                check(block.expected, produced, f"{name}:{block.expected_line}: the python block at line "
                      f"{block.line}", block.expected_line)
            continue
        for command in block.commands:
            produced = run_command(command, name, skip=bool(block.skip))
            if block.skip:
                continue
            first = command.line  # the line after the command (0-based), past its continuation lines
            while lines[first - 1].rstrip().endswith("\\"):
                first += 1
            check(command.expected, produced, f"{name}:{command.line}: `{command.text}`", first)
            ran += 1
    return ran


def update(path: Path) -> int:
    """Rewrite the outputs a document shows that no longer match what its blocks and commands produce (an
    output that matches, `...` included, is left as written); returns how many were rewritten."""
    text = path.read_text()
    mismatches: list = []
    with tempfile.TemporaryDirectory() as directory:
        cwd = os.getcwd()
        os.chdir(directory)
        try:
            name = doc_id(path) if path.is_relative_to(REPO) else str(path)
            run_blocks(text, name, str(path), mismatches=mismatches)
        finally:
            os.chdir(cwd)
    lines = text.splitlines()
    for indices, produced in sorted(mismatches, key=lambda m: -m[0].start):
        lines[indices.start:indices.stop] = _clean(produced)
    if mismatches:
        path.write_text("\n".join(lines) + "\n")
    return len(mismatches)


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
    in_docs = [b for p in sorted(DOCS_DIR.rglob("*.md")) for b in python_blocks(p.read_text(), doc_id(p))]
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


@pytest.mark.parametrize("path", documents(), ids=doc_id)
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
    ("<!-- docs-test: skip (too slow, see the github issue) -->", "only when it needs the Hugging Face hub"),
    ("<!-- docs-test: skip (the hub is slow here) -->", "only when it needs the Hugging Face hub"),
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


# ------------------------------------------------------------------------------------ shown output, commands

def test_a_text_block_after_a_python_block_is_its_output():
    text = "```python\nprint('a')\nprint('b', 1.5)\n```\n\n```text\na\nb 1.5\n```\n"
    assert run_blocks(text, "x.md") == 1
    with pytest.raises(DocBlockError) as failure:
        run_blocks(text.replace("b 1.5", "b 2.5"), "docs/x.md")
    message = str(failure.value)
    assert message.startswith("docs/x.md:6: the python block at line 1: the output differs")
    assert "-b 2.5\n+b 1.5" in message


def test_a_text_block_after_prose_is_not_output():
    assert run_blocks("```python\nprint('a')\n```\nProse.\n```text\nz\n```\n", "x.md") == 1


@pytest.mark.parametrize("expected, produced, matches", [
    ("took ... s", "took 1.25 s", True),
    ("took ... s", "took 1.25 ms\n", False),
    ("first\n...\nlast", "first\nlast", True),
    ("first\n...\nlast", "first\n2\n3\nlast\n", True),
    ("first\n...\nlast", "first\n2\nlast but one", False),
    ("\n  a  \nb\n\n", "a\nb   \n", False),  # leading spaces count
    ("\na\nb\n\n", "a\nb   \n", True),  # trailing spaces and outer blank lines do not
    ("a.b(c)", "a.b(c)", True),  # regex characters are literal
    ("a.b(c)", "axb(c)", False),
    # decimals agree up to float rounding on another CPU (1.5 units of the last digit, or 0.2 %)
    ("KL 0.04777, P 0.060", "KL 0.04778, P 0.061", True),
    ("KL 0.04777", "KL 0.04790", False),
    ("slope 38.70", "slope 38.75", True),  # 0.13 %
    ("slope 38.70", "slope 38.90", False),
    ("x 1.5e-06", "x 1.6e-06", True),
    ("x 1.5e-06", "x 1.8e-06", False),
    ("-0.5266", "-0.5267", True),
    ("ids 1911,25,198", "ids 1911,26,198", False),  # integers are exact
    ("0.25 of 4", "0.25 of 5", False),
])
def test_output_comparison(expected, produced, matches):
    assert output_matches(expected, produced) is matches


def test_console_commands_run_in_process_and_their_output_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = ("Text.\n\n```console\n$ tinygpt tokens 'ROMEO:' \\\n    --json\n...\n"
           '  "ROMEO",\n...\n```\n')
    assert run_blocks(doc, "x.md") == 1
    with pytest.raises(DocBlockError, match=r"^x\.md:4: `tinygpt tokens 'ROMEO:' --json`: the output differs"):
        run_blocks(doc.replace('"ROMEO"', '"JULIET"'), "x.md")
    failed = r"^x\.md:4: `tinygpt tokens --nope` exited with 2; stderr:\n.*required: TEXT"
    with pytest.raises(DocBlockError, match=failed):
        run_blocks("```console\n\n\n$ tinygpt tokens --nope\n```\n", "x.md")


def test_only_tinygpt_commands_take_the_prompt():
    with pytest.raises(DocBlockError, match=r"x\.md:3: only `\$ tinygpt \.\.\.` commands run"):
        doc_blocks("```bash\n$ tinygpt tokens a\n$ pip install tinygpt\n```\n", "x.md")
    assert doc_blocks("```bash\npip install tinygpt\n```\n", "x.md") == []  # shown, not run


def test_a_hub_command_is_parsed_not_run():
    marker = "<!-- docs-test: skip (needs the Hugging Face hub) -->"
    assert run_blocks(f"{marker}\n```console\n$ tinygpt lens 'a' --model gpt2\nanything\n```\n", "x.md") == 0
    with pytest.raises(DocBlockError, match="x.md:3: `tinygpt lens a --nope` does not parse"):
        run_blocks(f"{marker}\n```console\n$ tinygpt lens a --nope\n```\n", "x.md")


def test_update_rewrites_only_the_outputs_that_differ(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nprint('a')\nprint(1.5)\n```\n\n```text\nold\n```\n\n"
                   "```python\nprint('took 3 s')\n```\n```text\ntook ... s\n```\n")
    assert update(doc) == 1
    assert doc.read_text() == ("```python\nprint('a')\nprint(1.5)\n```\n\n```text\na\n1.5\n```\n\n"
                               "```python\nprint('took 3 s')\n```\n```text\ntook ... s\n```\n")
    assert update(doc) == 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Rewrite the outputs shown in documents where they no longer "
                                     "match what their blocks and commands produce (see this module's docstring).")
    parser.add_argument("--update", nargs="+", type=Path, required=True, metavar="DOC.md")
    sys.path.insert(0, str(REPO))
    for document in parser.parse_args().update:
        document = document.resolve()
        print(f"{document}: {update(document)} output(s) rewritten")
