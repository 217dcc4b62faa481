"""tinygpt's own byte-level BPE trainer, producing GPT-2-format `vocab.json` + `merges.txt`.

The files it writes are read by `tinygpt.Tokenizer.from_files` (and by Hugging Face's GPT-2 tokenizers)
exactly like OpenAI's: the same pre-tokenization (`tinygpt.tokenizer.pretokenize`, GPT-2's regex), the
same byte alphabet (`bytes_to_unicode`), the same file formats.

Training, the classic way (Sennrich et al.; GPT-2's vocabulary was built like this):

1. Split the training text into pre-tokens and count how often each distinct pre-token occurs. Merges never
   cross pre-token borders, so the text is a weighted bag of words from here on.
2. Each word starts as its sequence of byte symbols; the vocabulary starts as the 256 byte symbols, with
   ids in GPT-2's order (the `bytes_to_unicode` order, "!" = 0).
3. Repeatedly take the adjacent symbol pair with the highest weighted count, merge every occurrence of it
   (left to right within a word), append the merge to merges.txt and the new symbol to the vocabulary.
   Pair counts are updated incrementally: only the words that contain the merged pair are touched (an
   index from pair to the words containing it), and a max-heap with lazy invalidation yields the best pair.
   Ties go to the pair that sorts first as (left, right) strings, so training is deterministic.
4. `<|endoftext|>` is appended as the last id.

A merge whose result is already a token (e.g. "ab"+"c" after "a"+"bc") is recorded in merges.txt without
a new id, as Hugging Face's trainer does; training stops when the vocabulary (with `<|endoftext|>`) reaches
`vocab_size`, or when no pair occurs twice (a merge of a pair seen once would not compress anything).

    python -m weights.bpe_train --vocab-size 4096 --out DIR    # trains on the corpus's training plays
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from tinygpt.errors import InputError
from tinygpt.tokenizer import ENDOFTEXT, bytes_to_unicode, pretokenize

MERGES_HEADER = "#version: 0.2"


def count_pretokens(texts: Iterable[str]) -> Counter:
    """{pre-token: occurrences} over all texts, pre-tokenized with GPT-2's regex."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    return counts


def train_bpe(texts: Iterable[str] | Counter, vocab_size: int, *, min_frequency: int = 2
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE. Returns (vocab {token: id}, merges [(left, right)] in rank order).

    texts          training texts, or an already counted `Counter` of pre-tokens (`count_pretokens`)
    vocab_size     size of the final vocabulary, 256 byte symbols + merges + `<|endoftext|>` (>= 257)
    min_frequency  stop once the best pair occurs fewer times than this
    """
    if vocab_size < 257:
        raise InputError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    counts = texts if isinstance(texts, Counter) else count_pretokens(texts)
    byte_to_symbol = bytes_to_unicode()
    vocab: dict[str, int] = {symbol: i for i, symbol in enumerate(byte_to_symbol.values())}
    merges: list[tuple[str, str]] = []

    # Distinct words as symbol lists, in a fixed order (sorted), with their frequencies.
    words: list[list[str]] = []
    freqs: list[int] = []
    for pretoken in sorted(counts):
        words.append([byte_to_symbol[b] for b in pretoken.encode("utf-8")])
        freqs.append(counts[pretoken])

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> indices of words containing it
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(index)

    # Max-heap on count, then the smallest (left, right); entries are stale when the count has changed.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    target = vocab_size - 1  # the last id is <|endoftext|>
    while len(vocab) < target and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative_count:
            continue  # stale: a fresher entry for this pair (if it still occurs) is in the heap
        if count < min_frequency:
            break
        left, right = pair
        merged = left + right
        merges.append(pair)
        if merged not in vocab:
            vocab[merged] = len(vocab)

        changed: dict[tuple[str, str], int] = {}  # pairs whose count changed -> their new count
        for index in sorted(where.pop(pair, ())):
            word, freq = words[index], freqs[index]
            new_word = _merge_word(word, left, right, merged)
            if len(new_word) == len(word):
                continue
            for old_pair in zip(word, word[1:]):
                pair_counts[old_pair] -= freq
                changed[old_pair] = pair_counts[old_pair]
            for new_pair in zip(new_word, new_word[1:]):
                pair_counts[new_pair] += freq
                changed[new_pair] = pair_counts[new_pair]
                where[new_pair].add(index)
            words[index] = new_word
        # Words that no longer contain a pair stay in its `where` set; they are skipped when it is merged.
        pair_counts.pop(pair, None)
        for changed_pair, new_count in changed.items():
            if changed_pair == pair:
                continue
            if new_count > 0:
                heapq.heappush(heap, (-new_count, changed_pair))
            else:
                pair_counts.pop(changed_pair, None)
                where.pop(changed_pair, None)

    vocab[ENDOFTEXT] = len(vocab)
    return vocab, merges


def _merge_word(word: list[str], left: str, right: str, merged: str) -> list[str]:
    """`word` with every occurrence of (left, right) replaced by `merged`, scanning left to right."""
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_files(directory: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """`vocab.json` (ids in order, written as GPT-2's encoder.json is: `json.dumps`, ASCII-escaped) and
    `merges.txt` (`#version: 0.2` header, one `left right` per line, trailing newline)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    (directory / "vocab.json").write_text(json.dumps(ordered), encoding="utf-8")
    lines = [MERGES_HEADER] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    from . import corpus

    parser = argparse.ArgumentParser(description="Train the embedded model's BPE on the training plays.")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True, help="directory for vocab.json and merges.txt")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train, _ = corpus.split()
    vocab, merges = train_bpe(train.values(), args.vocab_size)
    write_files(args.out, vocab, merges)
    print(f"{len(vocab)} tokens, {len(merges)} merges in {time.perf_counter() - start:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
