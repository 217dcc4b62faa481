"""A byte-level BPE tokenizer that reproduces GPT-2's tokenization exactly.

This is a dependency-free re-implementation (standard library plus numpy for
``encode_batch``) of the tokenizer OpenAI released with GPT-2 and that Hugging
Face ships as ``GPT2Tokenizer`` / ``GPT2TokenizerFast``.  Encoding a string
happens in four steps:

1. **Special tokens.**  Literal occurrences of special tokens (by default
   ``<|endoftext|>``) are cut out of the text first and map straight to their
   ids.  The text between them is tokenized independently, exactly as Hugging
   Face does for "added tokens": nothing is stripped, so ``"a <|endoftext|>"``
   becomes ``["a", " ", "<|endoftext|>"]``.

2. **Pre-tokenization.**  Each remaining chunk is split into "pre-tokens" by
   GPT-2's regular expression::

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   Python's :mod:`re` has no ``\\p{...}`` classes, so we spell the classes out
   as explicit character ranges computed from :mod:`unicodedata` (see
   :func:`pretokenize_pattern`).  BPE merges never cross pre-token borders.

3. **Bytes to symbols.**  Each pre-token is UTF-8 encoded and every byte is
   mapped to one printable unicode character (:func:`bytes_to_unicode`), the
   alphabet in which ``vocab.json`` and ``merges.txt`` are written.

4. **BPE.**  Adjacent symbols are merged, always choosing the pair with the
   best (lowest) rank in ``merges.txt``, until no ranked pair remains.  The
   final symbols are looked up in the vocabulary.  Results are cached per
   pre-token, which is what makes encoding large texts fast.

Decoding maps ids back to bytes and decodes them as UTF-8 with
``errors="replace"``.

A note on Unicode versions: the letter/number classes come from the running
Python's Unicode database (``unicodedata.unidata_version``; 14.0 on Python
3.11).  Hugging Face's ``tokenizers`` uses Oniguruma with its own, possibly
newer, tables, so code points that were *unassigned* in Python's database but
became letters or numbers later (e.g. CJK Extension H) can pre-tokenize
differently.  Every character assigned in Python's database behaves the same.
"""

from __future__ import annotations

import functools
import heapq
import json
import operator
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError, InputTypeError, WeightsError
from .files import atomic_write, parse_json, read_bytes

__all__ = [
    "ENDOFTEXT",
    "WHITESPACE",
    "Tokenizer",
    "bytes_to_unicode",
    "pretokenize",
    "pretokenize_pattern",
]

#: GPT-2's end-of-text / document separator token.
ENDOFTEXT = "<|endoftext|>"

#: The characters of the Unicode ``White_Space`` property.  This is what
#: ``\\s`` means in the ``regex`` module (used by OpenAI's original encoder) and
#: in Oniguruma (used by Hugging Face ``tokenizers``).  It is *not* the same as
#: Python's ``str.isspace`` / ``re``'s ``\\s``, which additionally count the
#: information separators U+001C..U+001F as whitespace; for GPT-2 those are
#: ordinary "other" characters.
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


# --------------------------------------------------------------------------
# Bytes <-> printable unicode symbols
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are already printable, non-space Latin-1 characters (``!`` to
    ``~``, ``¡`` to ``¬``, ``®`` to ``ÿ``) map to themselves.  The remaining 68
    bytes (controls, space, ``\\xa0``, soft hyphen, ...) map, in order, to
    ``chr(256)``, ``chr(257)``, ...  So the space byte becomes ``"Ġ"`` and the
    newline byte becomes ``"Ċ"``, which is why those characters appear in the
    vocabulary.  The returned dict must not be mutated.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_code_point)
            next_code_point += 1
    return mapping


@functools.lru_cache(maxsize=None)
def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {symbol: b for b, symbol in bytes_to_unicode().items()}


# --------------------------------------------------------------------------
# Pre-tokenization (GPT-2's regex, with \p{L}, \p{N} and \s spelled out)
# --------------------------------------------------------------------------


def _ranges_to_class_body(code_points: Iterable[int]) -> str:
    """Render sorted code points as the inside of a regex ``[...]`` class.

    Consecutive code points are collapsed into ``a-b`` ranges, and every code
    point is written as a ``\\UXXXXXXXX`` escape so no character needs quoting.
    """
    parts: list[str] = []
    start = prev = None
    for cp in code_points:
        if prev is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append(_range_text(start, prev))
        start = prev = cp
    if start is not None:
        parts.append(_range_text(start, prev))
    return "".join(parts)


def _range_text(first: int, last: int) -> str:
    if first == last:
        return f"\\U{first:08x}"
    return f"\\U{first:08x}-\\U{last:08x}"


@functools.lru_cache(maxsize=1)
def pretokenize_pattern() -> re.Pattern[str]:
    """Compile GPT-2's pre-tokenization regex for Python's :mod:`re`.

    The original pattern (for the ``regex`` module) is::

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    ``\\p{L}`` (letters) is every code point whose general category starts with
    ``L``, ``\\p{N}`` (numbers) every one starting with ``N`` and ``\\s`` is the
    Unicode ``White_Space`` set (:data:`WHITESPACE`).  Substituting those
    explicit classes leaves the pattern's meaning unchanged: :mod:`re` and
    ``regex`` both try the alternatives left to right at each position, take
    the first that matches, and backtrack inside ``\\s+(?!\\S)`` the same way.
    (That alternative is why ``"a   b"`` splits into ``"a"``, ``"  "``, ``" b"``:
    a run of whitespace gives up its last character so that it can start the
    next word.)

    Building the classes scans all 1.1M code points once (~0.3 s); the result
    is cached for the lifetime of the process.
    """
    letters: list[int] = []
    numbers: list[int] = []
    for cp in range(0x110000):
        major_category = unicodedata.category(chr(cp))[0]
        if major_category == "L":
            letters.append(cp)
        elif major_category == "N":
            numbers.append(cp)
    L = _ranges_to_class_body(letters)
    N = _ranges_to_class_body(numbers)
    S = _ranges_to_class_body(sorted(ord(c) for c in WHITESPACE))
    pattern = "|".join(
        [
            "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",  # common English contractions
            f" ?[{L}]+",                                  # letters, with optional leading space
            f" ?[{N}]+",                                  # numbers, with optional leading space
            f" ?[^{S}{L}{N}]+",                           # anything else (punctuation, emoji, ...)
            f"[{S}]+(?![^{S}])",                          # whitespace not followed by a non-space
            f"[{S}]+",                                    # any other whitespace
        ]
    )  # fmt: skip
    return re.compile(pattern)


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into GPT-2 pre-tokens (without special-token handling).

    The pieces always concatenate back to ``text``:

    >>> pretokenize("Hello world!  I'll  go\\n\\n")
    ['Hello', ' world', '!', ' ', ' I', "'ll", ' ', ' go', '\\n\\n']
    """
    return pretokenize_pattern().findall(text)


# --------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------


class Tokenizer:
    """GPT-2 style byte-level BPE tokenizer.

    Args:
        vocab: maps token strings (in the :func:`bytes_to_unicode` alphabet,
            e.g. ``"Ġthe"``) to the ids ``0 .. len(vocab) - 1``, each used
            once.  Special tokens are stored verbatim (e.g. ``"<|endoftext|>"``).
        merges: the BPE merge rules ``(left, right)`` in priority order: the
            first pair has rank 0 and is merged first.  Both halves and their
            concatenation must be in ``vocab``.
        special_tokens: strings that are matched literally in the input before
            any other processing and map to a single id each.  Each must be in
            ``vocab``.  Defaults to ``["<|endoftext|>"]`` when that token is in
            the vocabulary and to no special tokens otherwise.
        cache_size: maximum number of pre-tokens whose BPE result is memoised;
            the cache is emptied when it fills up.

    Most users want :meth:`from_dir` or :meth:`from_files` instead.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Iterable[str] | None = None,
        *,
        cache_size: int = 100_000,
    ) -> None:
        self._token_to_id: dict[str, int] = _validated_vocab(vocab)
        self._merges: list[tuple[str, str]] = _validated_merges(merges, self._token_to_id)
        self._merge_ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(self._merges):
            self._merge_ranks[pair] = rank  # a later duplicate wins, as in Hugging Face

        if special_tokens is None:
            special_tokens = [ENDOFTEXT] if ENDOFTEXT in self._token_to_id else []
        self._special_tokens: tuple[str, ...] = tuple(dict.fromkeys(special_tokens))
        for token in self._special_tokens:
            if not isinstance(token, str) or not token:
                raise InputError(f"special tokens must be non-empty strings, got {token!r}")
            if token not in self._token_to_id:
                raise InputError(f"special token {token!r} is not in the vocabulary")
        # Longest first, so that at any position the longest special token wins
        # (Hugging Face matches added tokens leftmost-longest).
        by_length = sorted(self._special_tokens, key=len, reverse=True)
        self._special_pattern: re.Pattern[str] | None = (
            re.compile("|".join(re.escape(t) for t in by_length)) if by_length else None
        )

        # id -> raw bytes, used by decode() and pieces(). The ids are exactly 0 .. len(vocab) - 1.
        self._vocab_size = len(self._token_to_id)
        self._id_to_token: list[str | None] = [None] * self._vocab_size
        self._id_to_bytes: list[bytes | None] = [None] * self._vocab_size
        for token, token_id in self._token_to_id.items():
            self._id_to_token[token_id] = token
            self._id_to_bytes[token_id] = self._token_bytes_of(token)

        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size
        self._pattern = pretokenize_pattern()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_files(
        cls,
        vocab_json_path: str | Path,
        merges_txt_path: str | Path,
        special_tokens: Iterable[str] | None = None,
    ) -> "Tokenizer":
        """Load a tokenizer from Hugging Face GPT-2 style files.

        ``vocab.json`` is a JSON object mapping token strings to the ids
        ``0 .. N-1``, each used once.  ``merges.txt`` holds one merge
        ``"left right"`` per line, best rank first, optionally preceded by a
        ``#version: ...`` header line (as Hugging Face ``tokenizers`` reads
        it); blank lines are ignored; both halves of a merge and their
        concatenation must be in the vocabulary.  Anything else (a missing,
        unreadable, empty or oversized file, a FIFO or directory, bad UTF-8 or
        JSON, a bad entry) is a :class:`~tinygpt.errors.WeightsError` naming
        the file (and line) at fault.
        """
        vocab_path, merges_path = Path(vocab_json_path), Path(merges_txt_path)
        vocab = _read_vocab(vocab_path)
        merges = _read_merges(merges_path, vocab)
        return cls(vocab, merges, special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write `vocab.json` (ids in order) + `merges.txt` in GPT-2's format into `directory`, each file
        written whole or not at all (`tinygpt.files.atomic_write`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self._token_to_id.items(), key=lambda item: item[1]))
        lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in self._merges]
        with atomic_write(directory / "vocab.json", "w") as vocab_file:
            vocab_file.write(json.dumps(vocab, ensure_ascii=False))
            with atomic_write(directory / "merges.txt", "w") as merges_file:
                merges_file.write("\n".join(lines) + "\n")

    @classmethod
    def from_dir(cls, path: str | Path, special_tokens: Iterable[str] | None = None) -> "Tokenizer":
        """Load ``vocab.json`` and ``merges.txt`` from the directory ``path``."""
        directory = Path(path)
        if not directory.is_dir():
            raise WeightsError(f"tokenizer directory not found: {directory}")
        return cls.from_files(directory / "vocab.json", directory / "merges.txt", special_tokens)

    # --------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Size of the id space: ``max id + 1`` (50257 for GPT-2)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int | None:
        """Id of ``<|endoftext|>`` if it is in the vocabulary, else ``None``."""
        return self._token_to_id.get(ENDOFTEXT)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens recognised literally in the input."""
        return self._special_tokens

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (byte-mapped form, e.g. ``"Ġthe"``), or ``None``."""
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary string of an id, in byte-mapped form (e.g. ``"Ġthe"``)."""
        token_id = self._check_id(token_id)
        return self._id_to_token[token_id]  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merge_ranks)}, "
            f"special_tokens={list(self._special_tokens)})"
        )

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, *, split_special_tokens: bool = False) -> list[int]:
        """Encode ``text`` to a list of token ids.

        Special tokens written literally in ``text`` become their single id;
        pass ``split_special_tokens=True`` to tokenize them as ordinary text
        instead (Hugging Face's option of the same name).
        """
        if not isinstance(text, str):
            raise InputTypeError(f"encode() expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for chunk, is_special in self._split_special(text, split_special_tokens):
            if is_special:
                ids.append(self._token_to_id[chunk])
            else:
                for pretoken in self._pattern.findall(chunk):
                    ids.extend(self._encode_pretoken(pretoken))
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        pad_id: int | None = None,
        padding_side: str = "left",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode several texts into a padded ``[batch, seq]`` array.

        Returns ``(ids, attention_mask)``, both ``int32`` of shape
        ``[len(texts), longest encoding]``.  The mask is 1 at real tokens and 0
        at padding.  Padding goes on the left by default, so that the last
        column holds every sequence's last real token (what autoregressive
        generation wants).  ``pad_id`` defaults to :attr:`eos_id`.
        """
        if isinstance(texts, str):
            raise InputTypeError("encode_batch() expects a sequence of strings, not a single str")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_id is None:
            pad_id = self.eos_id
            if pad_id is None:
                raise InputError("no pad_id given and the vocabulary has no <|endoftext|> token")
        pad_id = self._check_id(pad_id)

        encoded = [self.encode(t) for t in texts]
        seq_len = max((len(e) for e in encoded), default=0)
        ids = np.full((len(encoded), seq_len), pad_id, dtype=np.int32)
        mask = np.zeros((len(encoded), seq_len), dtype=np.int32)
        for row, seq in enumerate(encoded):
            if not seq:
                continue
            start = seq_len - len(seq) if padding_side == "left" else 0
            ids[row, start : start + len(seq)] = seq
            mask[row, start : start + len(seq)] = 1
        return ids, mask

    # ----------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text (invalid UTF-8 becomes U+FFFD, as in Hugging Face).

        ``decode(encode(s)) == s`` for every string ``s``.  Special tokens are
        kept in the output.
        """
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The human-readable text of each token, e.g. ``["Hello", " world"]``.

        Each token's bytes are decoded on their own, so a character whose UTF-8
        bytes are split across tokens shows up as ``"\\ufffd"`` pieces.
        """
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    #: Alias of :meth:`pieces`.
    decode_tokens = pieces

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a single token stands for."""
        token_id = self._check_id(token_id)
        return self._id_to_bytes[token_id]  # type: ignore[return-value]

    # ---------------------------------------------------------------- internals

    def _check_id(self, token_id: int) -> int:
        try:
            index = operator.index(token_id)  # accepts numpy / jax integer scalars too
        except TypeError:
            raise InputTypeError(f"token ids must be integers, got {token_id!r}") from None
        if not 0 <= index < self._vocab_size or self._id_to_bytes[index] is None:
            raise InputError(
                f"token id {index} is not in the vocabulary (vocab_size={self._vocab_size})"
            )
        return index

    def _token_bytes_of(self, token: str) -> bytes:
        """Bytes represented by a vocabulary string."""
        if token in self._special_tokens:
            return token.encode("utf-8")
        # Characters outside the byte alphabet never come out of BPE; if a
        # vocabulary contains them anyway, fall back to their UTF-8 bytes (as
        # Hugging Face's ByteLevel decoder does).
        byte_of = _unicode_to_bytes()
        out = bytearray()
        for ch in token:
            b = byte_of.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)

    def _split_special(self, text: str, split_special_tokens: bool) -> list[tuple[str, bool]]:
        """Cut ``text`` into ``(chunk, is_special_token)`` pieces, in order.

        Empty ordinary chunks are dropped; the text around a special token is
        left untouched (no whitespace stripping), matching Hugging Face.
        """
        if self._special_pattern is None or split_special_tokens:
            return [(text, False)]
        chunks: list[tuple[str, bool]] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            if match.start() > position:
                chunks.append((text[position : match.start()], False))
            chunks.append((match.group(), True))
            position = match.end()
        if position < len(text):
            chunks.append((text[position:], False))
        return chunks

    def _encode_pretoken(self, pretoken: str) -> tuple[int, ...]:
        """Ids of one pre-token (memoised)."""
        ids = self._cache.get(pretoken)
        if ids is None:
            byte_to_symbol = bytes_to_unicode()
            symbols = [byte_to_symbol[b] for b in pretoken.encode("utf-8")]
            try:
                ids = tuple(self._token_to_id[s] for s in self._bpe(symbols))
            except KeyError as e:
                raise InputError(
                    f"BPE of {pretoken!r} produced {e.args[0]!r}, which is not in the vocabulary"
                ) from None
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[pretoken] = ids
        return ids

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Apply the merge rules to a list of byte symbols.

        Semantics (those of GPT-2's reference ``bpe`` function): repeatedly
        find the adjacent pair with the lowest merge rank and merge it; equal
        pairs are merged left to right.  Stop when no adjacent pair has a rank.

        Implementation: the symbols form a doubly linked list and candidate
        pairs sit in a heap keyed by ``(rank, position)``, so a word of ``n``
        bytes costs ``O(n log n)`` rather than the ``O(n^2)`` of rescanning all
        pairs after every merge.  A heap entry is stale, and skipped, when
        either of its two symbols has changed since it was pushed; symbols only
        ever grow by merging, so comparing the strings detects that exactly.
        """
        n = len(symbols)
        if n < 2:
            return symbols
        ranks = self._merge_ranks
        current: list[str | None] = list(symbols)  # None once merged into its left neighbour
        prev = list(range(-1, n - 1))  # index of the left neighbour, -1 at the start
        next_ = list(range(1, n + 1))  # index of the right neighbour, n at the end

        heap: list[tuple[int, int, str, str]] = []

        def push(i: int) -> None:
            """Push the pair starting at ``i`` if it is a known merge."""
            j = next_[i]
            if j < n:
                rank = ranks.get((current[i], current[j]))  # type: ignore[arg-type]
                if rank is not None:
                    heapq.heappush(heap, (rank, i, current[i], current[j]))  # type: ignore[arg-type]

        for i in range(n - 1):
            push(i)

        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = next_[i]
            if current[i] != left or j >= n or current[j] != right:
                continue  # stale entry
            # Merge symbol j into symbol i and unlink j.
            current[i] = left + right
            current[j] = None
            next_[i] = next_[j]
            if next_[j] < n:
                prev[next_[j]] = i
            # The merged symbol forms new pairs with both its neighbours.
            if prev[i] >= 0:
                push(prev[i])
            push(i)

        return [s for s in current if s is not None]


# --------------------------------------------------------------------------
# File parsing helpers
# --------------------------------------------------------------------------


def _validated_vocab(vocab: Mapping[str, int], where: str = "vocabulary", error=ValueError) -> dict[str, int]:
    """Check that ``vocab`` maps non-empty strings to the ids ``0 .. len(vocab) - 1``, each used once;
    ``error`` (naming ``where``) if not.  Nothing is allocated per id, so an id of 10**10 costs nothing."""
    checked: dict[str, int] = {}
    owner_of_id: dict[int, str] = {}
    size = len(vocab)
    for token, token_id in vocab.items():
        if not isinstance(token, str) or not token:
            raise error(f"{where}: tokens must be non-empty strings, got {_show(token)}")
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise error(f"{where}: token {_show(token)} has the id {_show(token_id)}; ids must be integers")
        if not 0 <= token_id < size:
            raise error(
                f"{where}: token {_show(token)} has the id {token_id}, outside 0..{size - 1} (the ids of "
                f"{size:,} tokens are 0 to {size - 1:,}, each used once)"
            )
        if token_id in owner_of_id:
            raise error(f"{where}: tokens {_show(owner_of_id[token_id])} and {_show(token)} share the id {token_id}")
        owner_of_id[token_id] = token
        checked[token] = token_id
    return checked


def _validated_merges(merges: Iterable[tuple[str, str]], vocab: Mapping[str, int], where=None,
                      error=ValueError) -> list[tuple[str, str]]:
    """Check that each merge is a pair of strings whose halves and concatenation are in ``vocab``;
    ``error`` naming ``where(rank)`` (default: ``merge #rank``) if not."""
    checked: list[tuple[str, str]] = []
    for rank, pair in enumerate(merges):
        place = where(rank) if where is not None else f"merge #{rank}"
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise error(f"{place}: a merge is two non-empty strings, got {_show(pair)}")
        left, right = pair
        for piece in (left, right, left + right):
            if piece not in vocab:
                raise error(f"{place} {_show(left)} {_show(right)}: token {_show(piece)} is not in the vocabulary")
        checked.append((left, right))
    return checked


def _show(value) -> str:
    """repr(value), cut to 40 characters (a damaged file may hold a megabyte on one line)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


MAX_TOKENIZER_BYTES = 64 << 20  # GPT-2's vocab.json is 1 MB, its merges.txt 0.5 MB


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a tokenizer file: a regular, non-empty file of at most 64 MB, else WeightsError."""
    data = read_bytes(path, what, max_bytes=MAX_TOKENIZER_BYTES, error=WeightsError)
    if not data.strip():
        raise WeightsError(f"{what} {str(path)!r} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None


def _read_vocab(path: Path) -> dict[str, int]:
    """Parse and check a ``vocab.json`` file (see :meth:`Tokenizer.from_files`)."""
    what = "tokenizer vocabulary"
    vocab = parse_json(_read_text(path, what), f"{what} {str(path)!r}", error=WeightsError)
    if not isinstance(vocab, dict):
        raise WeightsError(f"{what} {str(path)!r} must hold a JSON object mapping tokens to ids, "
                           f"got {type(vocab).__name__}")
    return _validated_vocab(vocab, str(path), error=WeightsError)


def _read_merges(path: Path, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Parse and check a ``merges.txt`` file into ``(left, right)`` pairs in rank order."""
    lines = _read_text(path, "tokenizer merges").split("\n")
    merges: list[tuple[str, str]] = []
    line_of_rank: list[int] = []
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        if line.startswith("#version"):
            if line_number == 1:
                continue
            raise WeightsError(f"{path}:{line_number}: a '#version' header belongs on the first line only "
                               "(two merges files joined?)")
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise WeightsError(
                f"{path}:{line_number}: malformed merge line {_show(line)} "
                "(expected two tokens separated by a single space)"
            )
        merges.append((parts[0], parts[1]))
        line_of_rank.append(line_number)
    return _validated_merges(merges, vocab, lambda rank: f"{path}:{line_of_rank[rank]}", error=WeightsError)
