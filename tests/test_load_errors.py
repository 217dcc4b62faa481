"""Loading damaged or mismatched checkpoints, configs and tokenizers (issue 17, cases 6, 9, 11, 12): every
case is one named exception (ConfigError for config.json, WeightsError for the weights, the tokenizer files
and the directory) whose message names the file and the problem, raised before anything large is allocated
and without hanging; the CLI prints it as one line.

The checkpoints are tiny and written here (weights.write + a 260-token byte-level tokenizer). File-mode
tests need a user without root's privileges: they run in a forked child that drops to uid 65534.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import tinygpt
import weights
from tinygpt.testing import random_params
from tinygpt.config import Config
from tinygpt.errors import ConfigError, WeightsError
from tinygpt.tokenizer import Tokenizer, bytes_to_unicode

MERGES = ["h e", "l l", "he ll"]
VOCAB_SIZE = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>
CONFIG = Config(n_layer=2, n_head=2, d_model=8, d_head=4, d_mlp=16, n_ctx=8, vocab_size=VOCAB_SIZE)


def tiny_vocab() -> dict[str, int]:
    vocab = {symbol: b for b, symbol in bytes_to_unicode().items()}
    for line in MERGES:
        vocab[line.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_checkpoint(directory: Path, config: Config = CONFIG, *, tokenizer: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    weights.write(directory, config, random_params(config, seed=0))
    if tokenizer:
        (directory / "vocab.json").write_text(json.dumps(tiny_vocab()), encoding="utf-8")
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return directory


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt")


def tensors_of(directory):
    return safetensors.numpy.load_file(str(directory / "model.safetensors"))


def write_tensors(directory, tensors):
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def edit_config(directory, **changes):
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


@contextlib.contextmanager
def within(seconds: float):
    """TimeoutError if the block runs longer than `seconds` (a blocking open() of a FIFO included)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (hung?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def unprivileged(fn) -> dict:
    """{"type", "message"} of what `fn()` raises when run without root's file privileges: in this process
    if it is not root, else in a forked child that drops to uid/gid 65534 (nobody). Skips the test if
    privileges cannot be dropped."""
    if os.geteuid() != 0:
        return _outcome(fn)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax warns that fork() and threads do not mix; the child uses no jax
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            try:
                os.setgid(65534)
                os.setuid(65534)
                result = _outcome(fn)
            except OSError as e:
                result = {"skip": f"cannot drop root privileges to uid 65534: {e}"}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data or b'{"skip": "the unprivileged child reported nothing"}')
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="tinygpt-perm-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


# ------------------------------------------------------------------ case 6: checkpoints that load wrong


def test_more_layers_in_file_than_config(ckpt):
    write_checkpoint(ckpt, dataclasses.replace(CONFIG, n_layer=3))
    edit_config(ckpt, n_layer=2)  # h.2.* used to be ignored: a 3-layer model loaded as 2 layers
    with pytest.raises(WeightsError, match=r"holds tensors a GPT-2 checkpoint of config\.json's shape does not "
                                           r"have: 'transformer\.h\.2\.\w+.*' \(and 9 more\); config\.json says "
                                           r"n_layer=2, the file holds 3 layers \(h\.0 to h\.2\)"):
        tinygpt.load(ckpt)


def test_fewer_layers_in_file_than_config(ckpt):
    edit_config(ckpt, n_layer=3)
    with pytest.raises(WeightsError, match=r"is missing tensor 'h\.2\.ln_1\.weight' \(and 11 more\); config\.json "
                                           r"says n_layer=3, the file holds 2 layers"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("name", ["ln_f.weight", "h.1.attn.c_attn.weight", "wte.weight"])
def test_tensor_stored_under_two_names(ckpt, name):
    tensors = tensors_of(ckpt)
    tensors[name] = tensors["transformer." + name] + 1  # which one wins used to depend on the file's order
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=rf"holds tensor '{name}' twice, as '(transformer\.)?{name}' and "
                                           rf"'(transformer\.)?{name}'"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("name", ["score.weight", "transformer.h.0.attn.extra", "transformer.h.2.attn.bias",
                                  "transformer.h.01.ln_1.weight", "model.wte.weight"])
def test_unexpected_tensor(ckpt, name):
    tensors = tensors_of(ckpt)
    tensors[name] = np.zeros(3, np.float32)
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=rf"does not have: '{name}'(;|$)"):
        tinygpt.load(ckpt)


def test_known_buffers_and_tied_lm_head_are_accepted(ckpt):
    expected = tinygpt.load(ckpt).params
    tensors = tensors_of(ckpt)
    for i in range(CONFIG.n_layer):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    write_tensors(ckpt, tensors)
    got = tinygpt.load(ckpt).params
    np.testing.assert_array_equal(got["wte"], expected["wte"])
    np.testing.assert_array_equal(got["blocks"]["W_Q"], expected["blocks"]["W_Q"])


def test_untied_lm_head(ckpt):
    tensors = tensors_of(ckpt)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] * 2
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=r"holds an lm_head\.weight that differs from wte\.weight"):
        tinygpt.load(ckpt)
    tensors["lm_head.weight"] = np.zeros((3, 8), np.float32)
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=r"'lm_head\.weight' .* has shape \(3, 8\), but config\.json implies "
                                           rf"\({VOCAB_SIZE}, 8\)"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name, where", [("wte.weight", (5, 3)), ("ln_f.bias", (0,)),
                                         ("h.1.attn.c_attn.weight", (2, 20)), ("h.0.mlp.c_proj.bias", (7,))])
def test_nonfinite_weights(ckpt, name, where, value):
    tensors = tensors_of(ckpt)
    tensors["transformer." + name][where] = value
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=rf"^tensor '{name}' in .* holds 1 NaN or inf values, which make every "
                                           r"logit NaN; pass allow_nonfinite=True to load it anyway$"):
        tinygpt.load(ckpt)
    with pytest.raises(WeightsError, match="allow_nonfinite=True"):
        weights.read(ckpt)
    model = tinygpt.load(ckpt, allow_nonfinite=True)  # the escape hatch
    leaves = jax.tree_util.tree_leaves(model.params)
    assert sum(int((~np.isfinite(np.asarray(x))).sum()) for x in leaves) == 1


def test_weights_that_overflow_the_requested_dtype(ckpt):
    tensors = tensors_of(ckpt)
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    write_tensors(ckpt, tensors)
    assert float(tinygpt.load(ckpt).params["blocks"]["W_in"][0, 0, 0]) == 1e6
    with pytest.raises(WeightsError, match=r"'h\.0\.mlp\.c_fc\.weight' .* holds values beyond float16's range, which "
                                           r"become inf \(1 of them\) when loaded as float16; load it with "
                                           r"dtype='float32'"):
        tinygpt.load(ckpt, dtype="float16")


# ---------------------------------------------------- case 9: sizes checked before allocating, no hangs


def test_config_with_a_billion_layers_fails_at_once(ckpt):
    edit_config(ckpt, n_layer=1_000_000_000)  # used to build 12e9 tensor names, then MemoryError after 29 s
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"is missing tensor 'h\.2\.ln_1\.weight' \(and 11,999,999,975 more\); "
                                           r"config\.json says n_layer=1,000,000,000, the file holds 2 layers"):
        tinygpt.load(ckpt)
    assert time.perf_counter() - start < 5


def test_config_with_a_huge_vocabulary_fails_before_allocating(ckpt):
    edit_config(ckpt, vocab_size=10**12)
    with pytest.raises(WeightsError, match=r"'wte\.weight' .* has shape \(260, 8\), but config\.json implies "
                                           r"\(1000000000000, 8\)"):
        tinygpt.load(ckpt)


def test_vocab_id_of_1e10_is_refused_without_allocating(ckpt):
    vocab = tiny_vocab()
    vocab["<|endoftext|>"] = 10**10  # used to allocate [None] * 1e10
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(WeightsError, match=r"vocab\.json: token '<\|endoftext\|>' has the id 10000000000, outside "
                                           r"0\.\.259 \(the ids of 260 tokens are 0 to 259, each used once\)"):
        tinygpt.load(ckpt)
    with pytest.raises(ValueError, match="outside 0..1"):
        Tokenizer({"a": 0, "b": 10**10}, [])


# Each file of a checkpoint directory, and the error it gives when it is not a regular file.
CHECKPOINT_FILES = [("config.json", ConfigError), ("model.safetensors", WeightsError), ("vocab.json", WeightsError),
                    ("merges.txt", WeightsError)]


@pytest.mark.parametrize("name, error", CHECKPOINT_FILES)
def test_fifo_instead_of_a_file_does_not_hang(ckpt, name, error):
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    with within(20), pytest.raises(error, match=rf"{name}'? is not a regular file"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("name, error", CHECKPOINT_FILES)
def test_symlink_to_dev_zero(ckpt, name, error):
    (ckpt / name).unlink()
    (ckpt / name).symlink_to("/dev/zero")
    with within(20), pytest.raises(error, match=rf"{name}'? is not a regular file"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("name, error", CHECKPOINT_FILES)
def test_directory_instead_of_a_file(ckpt, name, error):
    (ckpt / name).unlink()
    (ckpt / name).mkdir()
    with pytest.raises(error, match=rf"{name}'? is a directory"):
        tinygpt.load(ckpt)


# ------------------------------------------------------------------- case 11: damaged tokenizer files


def _vocab_with(**changes):
    vocab = tiny_vocab()
    vocab.update(changes)
    return json.dumps(vocab).encode()


DAMAGED_VOCAB = {
    "empty": (b"", r"vocab\.json' is empty"),
    "whitespace only": (b"  \n", r"vocab\.json' is empty"),
    "garbage": (b"{not json", r"vocab\.json' is not valid JSON: Expecting property name"),
    "truncated": (_vocab_with()[:100], r"vocab\.json' is not valid JSON"),
    "not UTF-8": (b'{"\xff": 0}', r"vocab\.json' is not UTF-8 text \(byte 2\)"),
    "a list": (b'["a", "b"]', r"vocab\.json' must hold a JSON object mapping tokens to ids, got list"),
    "a number": (b"42", r"must hold a JSON object mapping tokens to ids, got int"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, r"vocab\.json' is nested too deeply"),
    "empty token": (_vocab_with(**{"": 5}), r"tokens must be non-empty strings, got ''"),
    "string id": (_vocab_with(**{"<|endoftext|>": "259"}), r"token '<\|endoftext\|>' has the id '259'; ids must be"),
    "float id": (_vocab_with(**{"<|endoftext|>": 259.0}), r"has the id 259\.0; ids must be integers"),
    "null id": (_vocab_with(**{"<|endoftext|>": None}), r"has the id None; ids must be integers"),
    "bool id": (_vocab_with(**{"<|endoftext|>": True}), r"has the id True; ids must be integers"),
    "negative id": (_vocab_with(**{"<|endoftext|>": -1}), r"has the id -1, outside 0\.\.259"),
    "id past the end": (_vocab_with(**{"<|endoftext|>": 260}), r"has the id 260, outside 0\.\.259"),
    "duplicate id": (_vocab_with(**{"<|endoftext|>": 7}), r"and '<\|endoftext\|>' share the id 7"),
}


@pytest.mark.parametrize("content, message", DAMAGED_VOCAB.values(), ids=DAMAGED_VOCAB.keys())
def test_damaged_vocab_json(ckpt, content, message):
    (ckpt / "vocab.json").write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        tinygpt.load(ckpt)
    assert str(ckpt / "vocab.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match=message):
        Tokenizer.from_dir(ckpt)


DAMAGED_MERGES = {
    "empty": (b"", r"merges\.txt' is empty"),
    "not UTF-8": (b"#version: 0.2\nh e\n\xe9 l\n", r"merges\.txt' is not UTF-8 text \(byte 18\)"),
    "three parts": (b"#version: 0.2\nh e\nl l l\n", r"merges\.txt:3: malformed merge line 'l l l' \(expected two"),
    "one part": (b"#version: 0.2\nhe\n", r"merges\.txt:2: malformed merge line 'he'"),
    "two spaces": (b"#version: 0.2\nh  e\n", r"merges\.txt:2: malformed merge line 'h  e'"),
    "unknown symbol": (b"#version: 0.2\nh e\nq z\n", r"merges\.txt:3 'q' 'z': token 'qz' is not in the vocabulary"),
    "unknown merge result": (b"#version: 0.2\nh e\nhe l\n",
                             r"merges\.txt:3 'he' 'l': token 'hel' is not in the vocabulary"),
    "header not on line 1": (b"#version: 0.2\nh e\n#version: 0.2\nl l\n",
                             r"merges\.txt:3: a '#version' header belongs on the first line only"),
}


@pytest.mark.parametrize("content, message", DAMAGED_MERGES.values(), ids=DAMAGED_MERGES.keys())
def test_damaged_merges_txt(ckpt, content, message):
    (ckpt / "merges.txt").write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        tinygpt.load(ckpt)
    assert str(ckpt / "merges.txt") in str(e.value) and "\n" not in str(e.value)


def test_merges_without_version_header_load_as_tokenizers_reads_them(ckpt):
    """No `#version` line: every line is a merge (as Hugging Face `tokenizers` reads the file)."""
    with_header = tinygpt.load(ckpt).tokenizer
    (ckpt / "merges.txt").write_text("\n".join(MERGES) + "\n", encoding="utf-8")
    without = tinygpt.load(ckpt).tokenizer
    assert without._merge_ranks == with_header._merge_ranks and len(without._merge_ranks) == len(MERGES)
    assert without.encode("hello") == with_header.encode("hello")


@pytest.mark.parametrize("present, absent", [("vocab.json", "merges.txt"), ("merges.txt", "vocab.json")])
def test_one_tokenizer_file_without_the_other(ckpt, present, absent):
    (ckpt / absent).unlink()  # used to load silently without a tokenizer
    with pytest.raises(WeightsError, match=rf"^{ckpt} has {present} but no {absent}: a GPT-2 tokenizer needs both"):
        tinygpt.load(ckpt)
    with pytest.raises(WeightsError, match=rf"{absent}' does not exist"):
        Tokenizer.from_dir(ckpt)


def test_checkpoint_without_any_tokenizer_loads(ckpt):
    (ckpt / "vocab.json").unlink()
    (ckpt / "merges.txt").unlink()
    assert tinygpt.load(ckpt).tokenizer is None


@pytest.mark.parametrize("model_vocab", [VOCAB_SIZE + 40, VOCAB_SIZE - 4])
def test_tokenizer_and_model_vocabularies_differ(tmp_path, model_vocab):
    """A tokenizer smaller than the model's vocabulary used to load, then crash streaming generation on the
    first id it could not decode; it is refused at load time (so is one larger than the model's)."""
    ckpt = write_checkpoint(tmp_path / "c", dataclasses.replace(CONFIG, vocab_size=model_vocab))
    smaller = model_vocab > VOCAB_SIZE
    problem = (rf"ids 260 to {model_vocab - 1} could be generated and not decoded" if smaller
               else rf"ids {model_vocab} and up have no embedding")
    with pytest.raises(WeightsError, match=rf"^the tokenizer in {ckpt} has 260 tokens \(vocab\.json\) but the model's "
                                           rf"vocab_size is {model_vocab} \(config\.json\): {problem}; use the vocab"
                                           r"\.json made for this model, or load the weights alone: "
                                           r"tinygpt\.Model\(\*weights\.read\("):
        tinygpt.load(ckpt)
    config, params = weights.read(ckpt)  # the way out the message gives
    assert tinygpt.Model(config, params).tokenizer is None


def test_tokenizer_save_is_atomic(ckpt, monkeypatch):
    tokenizer = tinygpt.load(ckpt).tokenizer
    before = {name: (ckpt / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    tokenizer.save(ckpt / "again")
    assert Tokenizer.from_dir(ckpt / "again").encode("hello there") == tokenizer.encode("hello there")

    def failing_fsync(fd):  # the disk fills up while the files are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        Tokenizer(dict(tiny_vocab(), extra=VOCAB_SIZE), [("h", "e")]).save(ckpt)
    assert {name: (ckpt / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["again", "config.json", "merges.txt", "model.safetensors",
                                                      "vocab.json"]


# -------------------------------------------------------------------------- case 11: config.json fields


BAD_FIELDS = [
    ("layer_norm_epsilon", "abc", r"layer_norm_epsilon must be a positive number \(GPT-2 uses 1e-05\), got 'abc'"),
    ("layer_norm_epsilon", None, "layer_norm_epsilon must be a positive number .*got None"),
    ("layer_norm_epsilon", 0, "layer_norm_epsilon must be a positive number .*got 0"),
    ("layer_norm_epsilon", -1e-5, "layer_norm_epsilon must be a positive number .*got -1e-05"),
    ("layer_norm_epsilon", math.inf, "layer_norm_epsilon must be a positive number .*got inf"),
    ("layer_norm_epsilon", math.nan, "layer_norm_epsilon must be a positive number .*got nan"),
    ("layer_norm_epsilon", True, "layer_norm_epsilon must be a positive number .*got True"),
    ("layer_norm_epsilon", [1e-5], r"layer_norm_epsilon must be a positive number .*got \[1e-05\]"),
    ("n_layer", 0, "n_layer must be a positive integer, got 0"),
    ("n_layer", -2, "n_layer must be a positive integer, got -2"),
    ("n_layer", 2.0, r"n_layer must be a positive integer, got 2\.0"),
    ("n_layer", 2.5, r"n_layer must be a positive integer, got 2\.5"),
    ("n_layer", True, "n_layer must be a positive integer, got True"),
    ("n_layer", "2", "n_layer must be a positive integer, got '2'"),
    ("n_layer", None, "n_layer must be a positive integer, got None"),
    ("n_layer", math.inf, "n_layer must be a positive integer, got inf"),
    ("n_head", 0, "n_head must be a positive integer, got 0"),
    ("n_head", 3, "n_embd=8 is not divisible by n_head=3"),
    ("n_embd", -8, "n_embd must be a positive integer, got -8"),
    ("n_embd", "8", "n_embd must be a positive integer, got '8'"),
    ("n_positions", 0, "n_positions must be a positive integer, got 0"),
    ("vocab_size", 260.0, r"vocab_size must be a positive integer, got 260\.0"),
    ("vocab_size", "x" * 1000, r"vocab_size must be a positive integer, got 'xxxxxxxxxx.*\.\.\.$"),
    ("n_inner", 0, "n_inner must be a positive integer or null, got 0"),
    ("n_inner", "16", "n_inner must be a positive integer or null, got '16'"),
    ("activation_function", None, "activation_function=None is not supported"),
    ("tie_word_embeddings", "true", "tie_word_embeddings must be true or false, got 'true'"),
    ("scale_attn_weights", 1, "scale_attn_weights must be true or false, got 1"),
    ("add_cross_attention", True, "sets add_cross_attention=True, which tinygpt does not implement"),
]


@pytest.mark.parametrize("key, value, message", BAD_FIELDS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_FIELDS])
def test_config_field_of_wrong_type_or_range(ckpt, key, value, message):
    edit_config(ckpt, **{key: value})
    with pytest.raises(ConfigError, match=message) as e:
        tinygpt.load(ckpt)
    assert str(ckpt / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply"),  # used to be a RecursionError
    (b"[1, 2]", r"must hold a JSON object, got list"),
    (b"null", r"must hold a JSON object, got NoneType"),
], ids=["nested 100k deep", "a list", "null"])
def test_config_json_that_is_not_a_config(ckpt, content, message):
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("ln_eps", "abc", "Config.ln_eps must be a positive finite number, got 'abc'"),  # used to be a TypeError
    ("ln_eps", None, "Config.ln_eps must be a positive finite number, got None"),
    ("ln_eps", math.inf, "Config.ln_eps must be a positive finite number, got inf"),
    ("ln_eps", 10**400, r"Config.ln_eps must be a positive finite number, got 1000000.*\.\.\."),
    ("n_layer", 2.0, r"Config.n_layer must be a positive integer, got 2\.0"),
    ("d_head", 3, r"n_head \* d_head must equal d_model, got 2 \* 3 != 8"),
], ids=["ln_eps='abc'", "ln_eps=None", "ln_eps=inf", "ln_eps=10**400", "n_layer=2.0", "d_head=3"])
def test_config_dataclass_validates_every_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CONFIG, **{field: value})


# ------------------------------------------------------------------ case 12: messages that name the cause


@pytest.mark.parametrize("name, error", [("model.safetensors", WeightsError), ("config.json", ConfigError),
                                         ("vocab.json", WeightsError), ("merges.txt", WeightsError)])
def test_unreadable_file_says_permission_denied(shared_dir, name, error):
    """Mode 000, read by a user without privileges: model.safetensors used to report 'No such file or
    directory'."""
    ckpt = write_checkpoint(shared_dir / "ckpt")
    (ckpt / name).chmod(0)
    load = (lambda: weights.load_tokenizer(ckpt)) if name in ("vocab.json", "merges.txt") else \
        (lambda: weights.read(ckpt))
    result = unprivileged(load)
    assert result["type"] == error.__name__, result
    assert f"{ckpt / name}" in result["message"] and "not readable (permission denied)" in result["message"], result
    assert "No such file" not in result["message"]


# ---------------------------------------------------------------------------- the CLI: one line, exit 2


@pytest.mark.parametrize("damage", ["config", "weights", "vocab"])
def test_cli_prints_one_line(ckpt, damage):
    if damage == "config":
        edit_config(ckpt, layer_norm_epsilon="abc")
    elif damage == "weights":
        tensors = tensors_of(ckpt)
        tensors["transformer.h.0.ln_1.weight"][0] = np.nan
        write_tensors(ckpt, tensors)
    else:
        (ckpt / "vocab.json").write_text('{"a": 10000000000}')
    result = subprocess.run([sys.executable, "-m", "tinygpt", "inspect", "--model", str(ckpt), "hello"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("tinygpt: error: "), result.stderr
