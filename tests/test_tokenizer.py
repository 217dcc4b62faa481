"""Tests for tinygpt.tokenizer: a self-written GPT-2 byte-level BPE tokenizer.

The oracle is Hugging Face's ``tokenizers`` library, built from the same
``vocab.json`` / ``merges.txt`` as our tokenizer, with ``<|endoftext|>`` added
as a special token.  One test checks that this oracle agrees with
``transformers.GPT2Tokenizer.from_pretrained`` on the fixed corpus.
"""

from __future__ import annotations

import json
import os
import random
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.errors import WeightsError
from conftest import core_invariant
from tinygpt.tokenizer import (
    ENDOFTEXT,
    WHITESPACE,
    Tokenizer,
    bytes_to_unicode,
    pretokenize,
)

EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
HYPOTHESIS = settings(max_examples=200, deadline=None)

# --------------------------------------------------------------------------
# Locating GPT-2's files and building the oracles
# --------------------------------------------------------------------------

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"
_ENV_VAR = "TINYGPT_GPT2_TOKENIZER_DIR"


def _has_files(directory: Path) -> bool:
    return (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    candidates = [_DEFAULT_DIR]
    if os.environ.get(_ENV_VAR):
        candidates.append(Path(os.environ[_ENV_VAR]))
    for directory in candidates:
        if _has_files(directory):
            return directory
    pytest.skip(
        f"GPT-2 tokenizer files not found at {_DEFAULT_DIR} "
        f"(nor at ${_ENV_VAR}={os.environ.get(_ENV_VAR, '<unset>')}); "
        "they need vocab.json and merges.txt"
    )


@pytest.fixture(scope="module")
def tok(gpt2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(gpt2_dir)


@pytest.fixture(scope="module")
def oracle(gpt2_dir: Path):
    """Hugging Face ``tokenizers`` configured exactly like GPT-2's tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers.models import BPE

    hf = tokenizers.Tokenizer(BPE.from_file(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    return hf


def oracle_ids(oracle, text: str) -> list[int]:
    return oracle.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

CORPUS = {
    "empty": "",
    "prose": (
        "The quick brown fox jumps over the lazy dog. It was the best of times, it was the "
        "worst of times; it was the age of wisdom, it was the age of foolishness...\n"
        "\"Well,\" she said, \u201cI can\u2019t\u201d \u2014 and then (quietly) left."
    ),
    "contractions": "I'll go, you'd say; we've seen, they're here, it's fine, I'm ok. DON'T STOP. 'tis ''s '",
    "python": (
        "def fib(n: int) -> int:\n"
        "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
        "    if n < 2:\n"
        "        return n\n"
        "\treturn fib(n - 1) + fib(n - 2)  # recursion!\n"
        "\n\n"
        "x = {'a': [1, 2.5e-3, 0x1F], \"b\": None}\n"
        "print(f\"{x!r:>10}\")\t\t\n"
    ),
    "digits": "3.14159 2026 1,000,000 0007 12345678901234567890 \u0663\u0664\u0665 \u00bd \u2167 \u2460",
    "cjk": "今日はいい天气です。我爱北京天安门！ 한국어 텍스트",
    "emoji": (  # plain, ZWJ family, flags (regional indicator pairs), skin tone, variation selector
        "😀 👩\u200d👩\u200d👧\u200d👦 🇺🇸🇯🇵 👍🏽 ❤\ufe0f ok🔥"
    ),
    "combining": "e\u0301 a\u0308 n\u0303o Z\u0351\u0352\u0353alg\u0300o \u0915\u094d\u0937 cafe\u0301",
    "rtl": "שלום עולם! مرحبا بالعالم \u200fabc\u200e",  # with RLM / LRM marks
    "whitespace_runs": "a  b   c\t\td \t e\n\nf\n \n g    \n\n\n   ",
    "trailing_spaces": "end with spaces   ",
    "trailing_newlines": "end with newlines\n\n\n",
    "only_spaces": "     ",
    "crlf": "line one\r\nline two\r\n\r\nline four\r\n",
    "unicode_spaces": "a\u00a0b\u2009c\u3000d\u202fe\u2028f\u2029g\u0085h\u1680i\u205fj \u00a0k",
    "info_separators": "a\x1cb\x1d c\x1e\x1f d \x1c",  # str.isspace() but not GPT-2 whitespace
    "controls": "a\x00b\x07c\x1bd\x7f e\x0bf\x0cg",
    "eot_alone": "<|endoftext|>",
    "eot_start": "<|endoftext|>Hello world",
    "eot_middle": "Hello <|endoftext|> world",
    "eot_end": "The end.<|endoftext|>",
    "eot_adjacent": "a<|endoftext|>b",
    "eot_repeated": "<|endoftext|><|endoftext|><|endoftext|>",
    "eot_whitespace": "  <|endoftext|>  x\n<|endoftext|>\n\n<|endoftext|>\t",
    "eot_contraction": "<|endoftext|>'s <|endoftext|>'ll",
    "eot_partial": "<|endoftext| <|endoftext endoftext|> |endoftext|> <|endoftext|",
    "eot_nested": "<|<|endoftext|>|> <<|endoftext|>>",
    "eot_like": "<|endofprompt|> <|ENDOFTEXT|> < |endoftext| >",
    "long_word": "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "repeats": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ================================= !!!!!!!! ........",
    "mixed_scripts": "café naïve Γειά σου Привет สวัสดี გამარჯობა",
}


# --------------------------------------------------------------------------
# Building blocks (no oracle needed)
# --------------------------------------------------------------------------


def test_bytes_to_unicode_is_a_printable_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord(" ")] == "\u0120"  # "Ġ"
    assert mapping[ord("\n")] == "\u010a"  # "Ċ"
    assert all(mapping[b] == chr(b) for b in range(ord("!"), ord("~") + 1))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello world", ["Hello", " world"]),
        ("a   b", ["a", "  ", " b"]),  # \s+(?!\S) leaves the last space for the word
        ("a \tb", ["a", " ", "\t", "b"]),
        ("x  ", ["x", "  "]),  # trailing whitespace stays together
        ("\n\nThe", ["\n", "\n", "The"]),
        ("I'll DON'T", ["I", "'ll", " DON", "'", "T"]),  # contractions are lower-case only
        ("!!'s", ["!!'", "s"]),  # punctuation runs swallow the apostrophe
        (" 123abc", [" 123", "abc"]),
        ("a\x1cb", ["a", "\x1c", "b"]),  # U+001C is str.isspace() but not \s for GPT-2
        ("", []),
    ],
)
def test_pretokenize_examples(text, expected):
    assert pretokenize(text) == expected


def test_whitespace_is_unicode_white_space_not_str_isspace():
    is_space = {chr(cp) for cp in range(0x110000) if chr(cp).isspace()}
    assert WHITESPACE == is_space - set("\x1c\x1d\x1e\x1f")
    regex = pytest.importorskip("regex")
    assert WHITESPACE == {chr(cp) for cp in range(0x3001) if regex.match(r"\s", chr(cp))}


_ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))

# Text biased towards the places where pre-tokenization has edge cases.
_FRAGMENTS = [
    " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\xa0", "\u3000", "\u2009", "\x1c", "\x85",
    "a", "Z", "the", " the", "\u00e9", "e\u0301", "\u4e2d", "\u0645", "\u05e9",
    "1", "42", "\u0663", "\u00bd",
    "!", ".", ",", "'", "\"", "-", "_", "(", ")", "#", "\u2014", "\U0001f600", "\u200d", "\U0001f1fa",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL",
    ENDOFTEXT, "<|", "|>", "endoftext", "<", "|",
]
_BIASED_TEXT = st.lists(st.sampled_from(_FRAGMENTS) | _ASSIGNED, max_size=40).map("".join)


@HYPOTHESIS
@given(text=st.text(alphabet=_ASSIGNED) | _BIASED_TEXT)
def test_pretokenize_matches_regex_module(text):
    """Our re-based pattern agrees with GPT-2's original \\p{L}/\\p{N} regex."""
    regex = pytest.importorskip("regex")
    gpt2_pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    assert pretokenize(text) == gpt2_pattern.findall(text)


# --------------------------------------------------------------------------
# Equality with the Hugging Face oracle
# --------------------------------------------------------------------------


def test_oracle_agrees_with_transformers(gpt2_dir, oracle):
    """Sanity check of the oracle against transformers' GPT-2 tokenizer."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Tokenizer.from_pretrained(str(gpt2_dir))
    assert len(hf) == GPT2_VOCAB_SIZE and hf.eos_token_id == EOT_ID
    for name, text in CORPUS.items():
        assert hf(text)["input_ids"] == oracle_ids(oracle, text), name


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_matches_oracle(tok, oracle, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert ids == oracle_ids(oracle, text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


def test_endoftext_handling(tok, gpt2_dir):
    """Literal <|endoftext|> is one id; the text around it is tokenized on its own."""
    assert tok.eos_id == EOT_ID
    assert tok.encode(ENDOFTEXT) == [EOT_ID]
    # The space before the special token is not stripped and cannot merge with
    # it, so it becomes a lone " " (220); the space after it starts " world".
    assert tok.encode("Hello <|endoftext|> world") == [15496, 220, EOT_ID, 995]
    assert tok.encode("a<|endoftext|><|endoftext|>b") == [64, EOT_ID, EOT_ID, 65]
    assert EOT_ID not in tok.encode("<|endoftext|")
    # split_special_tokens=True treats it as plain text.
    plain = tok.encode(ENDOFTEXT, split_special_tokens=True)
    assert len(plain) > 1 and EOT_ID not in plain
    assert tok.decode(plain) == ENDOFTEXT
    assert Tokenizer.from_dir(gpt2_dir, special_tokens=[]).encode(ENDOFTEXT) == plain


def test_all_assigned_code_points_pretokenize_like_oracle():
    """Exhaustive: every assigned, non-private-use code point gets the same
    letter / number / whitespace / other class as in Hugging Face ``tokenizers``.

    Each code point ``c`` is embedded as ``a c 1 c . c`` (without spaces); the
    split points differ for each of the four classes.  Unassigned code points
    (category Cn in Python's Unicode database) are excluded: newer Unicode
    versions used by the oracle may have made them letters.
    """
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    chars = [
        chr(cp)
        for cp in range(0x110000)
        if unicodedata.category(chr(cp)) not in ("Cs", "Cn", "Co")
    ]
    text = "".join(f"a{c}1{c}.{c}" for c in chars)
    ours = np.cumsum([len(p) for p in pretokenize(text)]).tolist()
    theirs = [end for _, (_, end) in byte_level.pre_tokenize_str(text)]
    assert ours == theirs


@HYPOTHESIS
@given(text=st.text(alphabet=_ASSIGNED))
def test_random_text_matches_oracle(tok, oracle, text):
    assert tok.encode(text) == oracle_ids(oracle, text)


@HYPOTHESIS
@given(text=_BIASED_TEXT)
def test_biased_text_matches_oracle(tok, oracle, text):
    assert tok.encode(text) == oracle_ids(oracle, text)


@HYPOTHESIS
@given(ids=st.lists(st.integers(0, GPT2_VOCAB_SIZE - 1) | st.integers(0x0, 0xFF), max_size=20))
def test_decode_matches_oracle_for_any_ids(tok, oracle, ids):
    """Including ids whose bytes are not valid UTF-8 (replacement characters)."""
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


def test_large_text_is_fast_and_matches_oracle(tok, oracle):
    rng = random.Random(1234)
    words = []
    for _ in range(60_000):
        length = rng.randint(1, 10)
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDE\u00e9\u4e2d0123456789") for _ in range(length))
        words.append(word + rng.choice([" ", " ", " ", ", ", ".\n", "  ", "\t", "'s "]))
    text = "".join(words)
    assert len(text) > 300_000
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == oracle_ids(oracle, text)
    assert elapsed < 20, f"encoding {len(text)} chars took {elapsed:.1f} s"


# --------------------------------------------------------------------------
# Round trips and pieces
# --------------------------------------------------------------------------


def check_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


@core_invariant
@given(text=st.text() | _BIASED_TEXT)
def test_decode_encode_round_trip(tok, text):
    check_round_trip(tok, text)


@pytest.fixture(scope="module")
def embedded_tok() -> Tokenizer:
    """The embedded model's own 2048-token vocabulary (always present, unlike GPT-2's files)."""
    from weights import EMBEDDED_DIR

    return Tokenizer.from_dir(EMBEDDED_DIR)


@core_invariant
@given(text=st.text() | _BIASED_TEXT)
def test_embedded_tokenizer_round_trip(embedded_tok, text):
    check_round_trip(embedded_tok, text)


def test_pieces(tok):
    text = "Hello world, the cat's<|endoftext|>\n"
    ids = tok.encode(text)
    assert tok.pieces(ids) == ["Hello", " world", ",", " the", " cat", "'s", ENDOFTEXT, "\n"]
    assert tok.decode_tokens(ids) == tok.pieces(ids)
    for name in ("python", "contractions", "whitespace_runs", "crlf", "eot_whitespace"):  # ASCII only
        assert "".join(tok.pieces(tok.encode(CORPUS[name]))) == CORPUS[name]
    # A character whose UTF-8 bytes are split across tokens shows as U+FFFD pieces.
    ids = tok.encode("\U0001f917")
    assert len(ids) > 1 and "\ufffd" in "".join(tok.pieces(ids))
    assert tok.decode(ids) == "\U0001f917"


def test_sizes_and_lookups(tok):
    assert tok.vocab_size == len(tok) == GPT2_VOCAB_SIZE
    assert tok.special_tokens == (ENDOFTEXT,)
    assert tok.token_to_id("\u0120the") == 262 and tok.id_to_token(262) == "\u0120the"
    assert tok.token_to_id("not a token") is None
    assert tok.decode(np.array([15496, 995], dtype=np.int64)) == "Hello world"


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def test_encode_batch_left_pads_by_default(tok):
    texts = ["Hello world", "a", "", "The quick brown fox"]
    ids, mask = tok.encode_batch(texts)
    encodings = [tok.encode(t) for t in texts]
    seq = max(len(e) for e in encodings)
    assert ids.shape == mask.shape == (4, seq)
    assert ids.dtype == mask.dtype == np.int32
    for row, enc in enumerate(encodings):
        pad = seq - len(enc)
        assert ids[row, pad:].tolist() == enc
        assert (ids[row, :pad] == EOT_ID).all()
        assert mask[row].tolist() == [0] * pad + [1] * len(enc)


def test_encode_batch_right_padding_and_custom_pad(tok):
    ids, mask = tok.encode_batch(["Hello world", "a"], pad_id=0, padding_side="right")
    assert ids.tolist() == [[15496, 995], [64, 0]]
    assert mask.tolist() == [[1, 1], [1, 0]]


def test_encode_batch_edge_cases(tok):
    ids, mask = tok.encode_batch([])
    assert ids.shape == mask.shape == (0, 0)
    ids, mask = tok.encode_batch(["", ""])
    assert ids.shape == (2, 0)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode_batch(["a"], pad_id=GPT2_VOCAB_SIZE)


# --------------------------------------------------------------------------
# Project-trained vocabularies and error handling (tiny files, no GPT-2 needed)
# --------------------------------------------------------------------------


def _write_tiny_tokenizer(directory: Path, extra_vocab=(), merges=("h e", "l l", "he ll", "hell o")) -> Path:
    """A byte-level vocabulary of all 256 bytes plus a few merges."""
    vocab = {symbol: b for b, symbol in bytes_to_unicode().items()}
    for line in merges:
        left, right = line.split(" ")
        vocab.setdefault(left + right, len(vocab))
    for token in extra_vocab:
        vocab[token] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def test_project_vocabulary_with_custom_special_token(tmp_path):
    directory = _write_tiny_tokenizer(tmp_path, extra_vocab=["<|pad|>"])
    plain = Tokenizer.from_dir(directory)
    assert plain.eos_id is None and plain.special_tokens == ()
    assert plain.vocab_size == 256 + 4 + 1
    hello = plain.encode("hello")
    assert plain.pieces(hello) == ["hello"]
    with pytest.raises(ValueError, match="pad_id"):
        plain.encode_batch(["hello"])

    special = Tokenizer.from_dir(directory, special_tokens=["<|pad|>"])
    pad = special.token_to_id("<|pad|>")
    assert special.encode("hello<|pad|> hello") == hello + [pad] + special.encode(" hello")
    assert special.decode(special.encode("x<|pad|>")) == "x<|pad|>"
    ids, mask = special.encode_batch(["hello", "hello hello"], pad_id=pad)
    assert ids[0, 0] == pad and mask[0, 0] == 0


def test_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="directory not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(WeightsError, match=r"vocab\.json' does not exist"):
        Tokenizer.from_dir(tmp_path)
    directory = _write_tiny_tokenizer(tmp_path / "t")
    (directory / "merges.txt").unlink()
    with pytest.raises(WeightsError, match=r"merges\.txt' does not exist"):
        Tokenizer.from_dir(directory)


def test_malformed_files(tmp_path):
    directory = _write_tiny_tokenizer(tmp_path)
    merges = directory / "merges.txt"
    merges.write_text("#version: 0.2\nh e\nl l l\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:3: malformed merge line 'l l l'"):
        Tokenizer.from_dir(directory)
    merges.write_text("#version: 0.2\nh e\nq z\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'qz' is not in the vocabulary"):
        Tokenizer.from_dir(directory)
    (directory / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WeightsError, match=r"vocab\.json' is not valid JSON"):
        Tokenizer.from_dir(directory)
    (directory / "vocab.json").write_text('{"a": 0, "b": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="share the id 0"):
        Tokenizer.from_dir(directory)


def test_special_token_must_be_in_vocabulary(tmp_path):
    directory = _write_tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="special token '<\\|sep\\|>' is not in the vocabulary"):
        Tokenizer.from_dir(directory, special_tokens=["<|sep|>"])


def test_decode_rejects_ids_outside_vocabulary(tok):
    for bad in (GPT2_VOCAB_SIZE, -1, 10**9):
        with pytest.raises(ValueError, match=rf"token id {bad} .*vocab_size={GPT2_VOCAB_SIZE}"):
            tok.decode([15496, bad])
    with pytest.raises(ValueError, match="vocab_size"):
        tok.pieces([GPT2_VOCAB_SIZE])
    with pytest.raises(TypeError):
        tok.decode([1.5])
