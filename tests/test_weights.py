"""Reading and writing official Hugging Face GPT-2 checkpoints (weights/checkpoint.py, weights/hf.py).

The oracle is transformers: checkpoints are written by `GPT2LMHeadModel.save_pretrained` (tests/hf_oracle.py)
and the tensors tinygpt loads are compared, exactly, with the torch tensors they came from.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
import weights
from tinygpt.errors import ConfigError
from weights import WeightsError
from conftest import core_invariant

# Deliberately lopsided: 3 heads of width 4, a non-default MLP width (n_inner), vocab not a multiple of 8.
SHAPE = dict(n_layer=2, n_head=3, n_embd=12, n_positions=16, vocab_size=50, n_inner=20)
DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory written by save_pretrained, the torch model it came from)."""
    from hf_oracle import make_hf_checkpoint

    directory = tmp_path_factory.mktemp("hf")
    model = make_hf_checkpoint(directory, **SHAPE)
    return directory, model


@pytest.fixture(scope="module")
def hf_dir(hf_model):
    return hf_model[0]


@pytest.fixture(scope="module")
def state(hf_model):
    """The torch model's tensors, as float32 numpy, by unprefixed HF name."""
    return {k.removeprefix("transformer."): v.detach().numpy().copy() for k, v in hf_model[1].state_dict().items()}


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    """A private copy of the checkpoint directory, for tests that damage it."""
    return Path(shutil.copytree(hf_dir, tmp_path / "ckpt"))


def assert_same_params(a, b):
    """Bitwise equality of two params pytrees (same structure, dtypes, shapes and bytes)."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


def tensors_of(directory):
    return safetensors.numpy.load_file(str(Path(directory) / "model.safetensors"))


def write_tensors(directory, tensors):
    safetensors.numpy.save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


# ------------------------------------------------------------------------------------------------ loading


def test_load_matches_hf_tensors(hf_dir, state):
    model = tinygpt.load(hf_dir)
    c = model.config
    D, H, Dh = SHAPE["n_embd"], SHAPE["n_head"], SHAPE["n_embd"] // SHAPE["n_head"]
    assert (c.n_layer, c.n_head, c.d_model, c.d_head, c.d_mlp, c.n_ctx, c.vocab_size) == (2, 3, 12, 4, 20, 16, 50)
    p = {k: np.asarray(v) for k, v in model.params.items() if k != "blocks"}
    b = {k: np.asarray(v) for k, v in model.params["blocks"].items()}
    assert all(x.dtype == np.float32 for x in [*p.values(), *b.values()])
    np.testing.assert_array_equal(p["wte"], state["wte.weight"])
    np.testing.assert_array_equal(p["wpe"], state["wpe.weight"])
    np.testing.assert_array_equal(p["lnf_w"], state["ln_f.weight"])
    np.testing.assert_array_equal(p["lnf_b"], state["ln_f.bias"])
    for i in range(c.n_layer):
        t = {k.removeprefix(f"h.{i}."): v for k, v in state.items() if k.startswith(f"h.{i}.")}
        c_attn_w, c_attn_b, c_proj_w = t["attn.c_attn.weight"], t["attn.c_attn.bias"], t["attn.c_proj.weight"]
        assert c_attn_w.shape == (D, 3 * D) and c_proj_w.shape == (D, D)  # Conv1D: x @ W
        for h in range(H):
            heads = slice(h * Dh, (h + 1) * Dh)
            # c_attn's columns are [q | k | v], each [head 0 | head 1 | ...]
            for j, (W, bias) in enumerate([("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")]):
                cols = slice(j * D + h * Dh, j * D + (h + 1) * Dh)
                np.testing.assert_array_equal(b[W][i, h], c_attn_w[:, cols], err_msg=f"{W}[{i}, {h}]")
                np.testing.assert_array_equal(b[bias][i, h], c_attn_b[cols], err_msg=f"{bias}[{i}, {h}]")
            # c_proj's rows are the concatenated heads' outputs
            np.testing.assert_array_equal(b["W_O"][i, h], c_proj_w[heads, :], err_msg=f"W_O[{i}, {h}]")
        for ours, theirs in [("ln1_w", "ln_1.weight"), ("ln1_b", "ln_1.bias"), ("b_O", "attn.c_proj.bias"),
                             ("ln2_w", "ln_2.weight"), ("ln2_b", "ln_2.bias"), ("W_in", "mlp.c_fc.weight"),
                             ("b_in", "mlp.c_fc.bias"), ("W_out", "mlp.c_proj.weight"),
                             ("b_out", "mlp.c_proj.bias")]:
            np.testing.assert_array_equal(b[ours][i], t[theirs], err_msg=f"{ours}[{i}]")


def test_unprefixed_checkpoint_with_buffers_and_lm_head(hf_dir, ckpt):
    """The official hub gpt2 file has no `transformer.` prefix and carries the attention-mask buffers; other
    checkpoints also store the tied lm_head. All load to the same params."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors_of(hf_dir).items()}
    assert "wte.weight" in tensors and "h.0.attn.c_attn.weight" in tensors
    n_pos = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n_pos, n_pos), bool))  # not a float: ignored
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    write_tensors(ckpt, tensors)
    assert_same_params(tinygpt.load(ckpt).params, tinygpt.load(hf_dir).params)


def test_params_do_not_alias_the_file(ckpt):
    """Loaded params are the process's own memory: rewriting (or deleting) the file afterwards changes
    nothing (a memory-mapped load would)."""
    model = tinygpt.load(ckpt)
    before = jax.tree_util.tree_map(np.array, model.params)
    path = ckpt / "model.safetensors"
    write_tensors(ckpt, {k: np.full_like(v, 7.0) for k, v in tensors_of(ckpt).items()})
    assert float(tinygpt.load(ckpt).params["wte"][0, 0]) == 7.0
    path.unlink()
    assert_same_params(model.params, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_dtype(hf_dir, state, dtype):
    model = tinygpt.load(hf_dir, dtype=dtype)
    leaves = jax.tree_util.tree_leaves(model.params)
    assert len(leaves) == 20 and {str(x.dtype) for x in leaves} == {dtype}
    # the float32 values rounded to `dtype` (round to nearest even), nothing else
    expected = state["h.1.mlp.c_fc.weight"].astype(np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype))
    assert np.asarray(model.params["blocks"]["W_in"][1]).tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", "bf16"])
def test_bad_dtype(hf_dir, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be one of float32, bfloat16, float16, got '{dtype}'"):
        tinygpt.load(hf_dir, dtype=dtype)


def test_bad_dtype_fails_before_any_download(monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("snapshot_download called before the dtype was checked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tinygpt.load("someorg/some-gpt2", dtype="float64")


@pytest.mark.parametrize("disk_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(hf_model, tmp_path, disk_dtype):
    """A checkpoint saved by torch in bfloat16 / float16 loads exactly: upcast to float32 on request, or
    kept bit for bit."""
    import torch

    half = copy.deepcopy(hf_model[1]).to(getattr(torch, disk_dtype))
    half.save_pretrained(tmp_path)
    stored = tensors_of(tmp_path)["transformer.h.0.mlp.c_proj.weight"]
    assert str(stored.dtype) == disk_dtype
    torch_w = half.state_dict()["transformer.h.0.mlp.c_proj.weight"]

    up = tinygpt.load(tmp_path)  # float32 is the default
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(up.params)} == {"float32"}
    np.testing.assert_array_equal(np.asarray(up.params["blocks"]["W_out"][0]), torch_w.float().numpy())

    same = tinygpt.load(tmp_path, dtype=disk_dtype)
    assert np.asarray(same.params["blocks"]["W_out"][0]).tobytes() == stored.tobytes()
    assert_same_params(weights.read(tmp_path, dtype=disk_dtype)[1], same.params)


# ------------------------------------------------------------------------------------------------ saving


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_round_trip(hf_dir, tmp_path, dtype):
    model = tinygpt.load(hf_dir, dtype=dtype)
    weights.save(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    again = tinygpt.load(tmp_path / "out", dtype=dtype)
    assert again.config == model.config
    assert_same_params(again.params, model.params)
    assert {str(v.dtype) for v in tensors_of(tmp_path / "out").values()} == {dtype}


# The round trip's files go to memory where there is a tmpfs: the saver fsyncs, which on a busy disk costs more
# than everything else in an example.
MEMORY_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@st.composite
def models(draw):
    """A random-shaped model (no forward runs, so any shape costs nothing to compile): random weights in a
    drawn dtype with a few extreme finite values planted (-0.0, the smallest subnormal, the largest finite)."""
    n_head, d_head = draw(st.integers(1, 3), label="n_head"), draw(st.integers(1, 4), label="d_head")
    config = tinygpt.Config(n_layer=draw(st.integers(1, 3), label="n_layer"), n_head=n_head, d_model=n_head * d_head,
                            d_head=d_head, d_mlp=draw(st.integers(1, 9), label="d_mlp"),
                            n_ctx=draw(st.integers(1, 9), label="n_ctx"), vocab_size=draw(st.integers(1, 17), label="vocab"),
                            ln_eps=draw(st.floats(1e-12, 0.5), label="ln_eps"))
    dtype = np.dtype(ml_dtypes.bfloat16) if (name := draw(st.sampled_from(DTYPES), label="dtype")) == "bfloat16" \
        else np.dtype(name)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    info = ml_dtypes.finfo(dtype)
    specials = np.array([-0.0, info.smallest_subnormal, -info.max, info.max], np.float64).astype(dtype)

    def draw_tensor(shape):
        x = rng.standard_normal(shape).astype(dtype)
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, 2)] = rng.choice(specials, 2)
        return jax.device_put(x)  # (jnp.asarray would compile a copy per shape)

    def walk(shapes):
        return {n: walk(v) if isinstance(v, dict) else draw_tensor(v) for n, v in shapes.items()}

    return tinygpt.Model(config=config, params=walk(tinygpt.params.param_shapes(config))), name


@core_invariant
@given(model_dtype=models())
def test_save_load_round_trip_is_exact(model_dtype):
    """save then load gives the same config and the same parameters, bit for bit, in every dtype."""
    model, dtype = model_dtype
    with tempfile.TemporaryDirectory(dir=MEMORY_TMP) as tmp:
        weights.save(model, Path(tmp) / "model")
        again = tinygpt.load(Path(tmp) / "model", dtype=dtype)
    assert again.config == model.config
    assert_same_params(again.params, model.params)


def test_saved_tensors_equal_the_original_file(hf_dir, tmp_path):
    weights.save(tinygpt.load(hf_dir), tmp_path)
    original, saved = tensors_of(hf_dir), tensors_of(tmp_path)
    assert sorted(saved) == sorted(original)  # same names: `transformer.` prefix, lm_head omitted
    for name, value in original.items():
        assert saved[name].dtype == value.dtype and saved[name].shape == value.shape, name
        assert saved[name].tobytes() == value.tobytes(), name
    with open(tmp_path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_saved_checkpoint_loads_in_transformers(hf_model, tmp_path):
    import torch
    import transformers

    hf_dir, _ = hf_model
    weights.save(tinygpt.load(hf_dir), tmp_path)
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"])))
    with torch.no_grad():
        expected, got = original.eval()(tokens).logits, reloaded.eval()(tokens).logits
    assert torch.equal(got, expected)


def test_failed_save_leaves_existing_files_untouched(hf_dir, tmp_path, monkeypatch):
    model = tinygpt.load(hf_dir)
    out = tmp_path / "out"
    weights.save(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_fsync(fd):  # as if the disk filled up while the files were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    edited = tinygpt.Model(config=model.config, params=jax.tree_util.tree_map(lambda x: x * 2, model.params))
    with pytest.raises(OSError, match="No space left"):
        weights.save(edited, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either

    with pytest.raises(OSError, match="No space left"):
        weights.save(edited, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_rejects_params_that_disagree_with_config(hf_dir, tmp_path):
    model = tinygpt.load(hf_dir)
    params = dict(model.params, blocks=dict(model.params["blocks"]))
    params["blocks"]["W_in"] = params["blocks"]["W_in"][:, :, :10]
    with pytest.raises(WeightsError, match=r"W_in.*\(2, 12, 10\).*\(2, 12, 20\)"):
        weights.save(tinygpt.Model(config=model.config, params=params), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ errors


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match=rf"no such directory: {tmp_path / 'nope'}"):
        tinygpt.load(tmp_path / "nope")
    with pytest.raises(WeightsError, match=rf"no such directory: {tmp_path / 'nope'}"):
        weights.read(tmp_path / "nope")


def test_path_is_a_file(ckpt):
    for load in (tinygpt.load, weights.read):
        with pytest.raises(WeightsError, match=r"config\.json is a file; pass the directory"):
            load(ckpt / "config.json")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=rf"^config file '{ckpt / 'config.json'}' does not exist$"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("content, problem", [(b'{"model_type": "gpt2",', "is not valid JSON"),
                                              (b"", "is not valid JSON"),
                                              (b"\xff\xfe\x00garbage", r"is not UTF-8 text \(byte 0\)")])
def test_invalid_config_json(ckpt, content, problem):
    """config.json problems are ConfigErrors (model.safetensors, vocab.json, merges.txt ones WeightsErrors)."""
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"config file '{ckpt / 'config.json'}' {problem}"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="llama"), "model_type='llama', not a GPT-2 model"),
        (dict(activation_function="relu"), "activation_function='relu' is not supported"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
        (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
    ],
)
def test_config_that_is_not_gpt2(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=message):
        tinygpt.load(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=rf"missing model\.safetensors in {ckpt}"):
        tinygpt.load(ckpt)


def _damage(path, how):
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    if how == "truncated":
        return data[: len(data) - 100]
    if how == "truncated header":
        return data[: 8 + header_size // 2]
    if how == "garbage header":
        garbage = (bytes(range(256)) * (header_size // 256 + 1))[:header_size]  # same length, not JSON
        return data[:8] + garbage + data[8 + header_size:]
    if how == "garbage":
        return np.random.default_rng(0).bytes(len(data))
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "truncated header", "garbage header", "garbage", "empty"])
def test_damaged_safetensors(ckpt, how):
    path = ckpt / "model.safetensors"
    path.write_bytes(_damage(path, how))
    with pytest.raises(WeightsError, match=rf"{path} is not a valid safetensors file \(truncated or corrupt\?\)"):
        tinygpt.load(ckpt)


def test_missing_tensor(ckpt):
    tensors = tensors_of(ckpt)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=r"model\.safetensors is missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        tinygpt.load(ckpt)


def test_tensor_shape_disagrees_with_config(ckpt):
    edit_config(ckpt, n_positions=32)  # config.json says 32 positions; wpe has 16
    with pytest.raises(WeightsError, match=r"tensor 'wpe\.weight' in .* has shape \(16, 12\), but config\.json "
                                           r"implies \(32, 12\)"):
        tinygpt.load(ckpt)


def test_tensor_shape_wrong_in_file(ckpt):
    tensors = tensors_of(ckpt)
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((12, 11), np.float32)
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=r"'h\.0\.attn\.c_proj\.weight' .* shape \(12, 11\), .* \(12, 12\)"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool])
def test_integer_tensor(ckpt, dtype):
    tensors = tensors_of(ckpt)
    tensors["transformer.ln_f.weight"] = np.ones(12, dtype)
    write_tensors(ckpt, tensors)
    with pytest.raises(WeightsError, match=r"tensor 'ln_f\.weight' in .* has dtype \w+, expected a float dtype"):
        tinygpt.load(ckpt)
