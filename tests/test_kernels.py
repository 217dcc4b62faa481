"""The fast paths of tinygpt/kernels.py equal the reference they stand in for, the reference forward takes them
only where the caller reads nothing they skip, and tinygpt/model.py stays the short, annotated reference.

(The attention kernels are tested against the reference path in test_attention_chunked.py, the decode step's
batched projection in test_decode_layout.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt import kernels, model
from tinygpt.recorder import SiteRecorder
from tinygpt.testing import random_params

MODEL_PY = Path(model.__file__)


@settings(max_examples=20, deadline=None)  # each new shape compiles: a few shapes, many values
@given(batch=st.integers(1, 2), seq=st.sampled_from([1, 5]), n_head=st.integers(1, 3), d_head=st.sampled_from([1, 8]),
       d_model=st.just(12), seed=st.integers(0, 2**16))
def test_batched_head_outputs_equal_each_head_times_its_W_O(batch, seq, n_head, d_head, d_model, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, seq, n_head, d_head)).astype(np.float32)  # [batch, seq, head, d_head]
    W_O = rng.standard_normal((n_head, d_head, d_model)).astype(np.float32)  # [head, d_head, d_model]
    got = np.asarray(jax.jit(kernels.head_outputs_batched)(z, W_O))
    assert got.shape == (batch, seq, n_head, d_model)
    expected = np.einsum("bshd,hdm->bshm", np.float64(z), np.float64(W_O))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for h in range(n_head):  # head h's write is z_h @ W_O[h], whatever the other heads hold
        np.testing.assert_allclose(got[:, :, h], np.float64(z[:, :, h]) @ np.float64(W_O[h]), rtol=1e-5, atol=1e-5)


def test_the_heads_writes_sum_to_the_attention_output_in_a_forward():
    config, params, tokens = small_model()
    trace = tinygpt.forward(params, tokens, config, keep=("head_out", "attn_out"))
    summed = np.float64(trace.head_out).sum(axis=-2) + np.float64(params["blocks"]["b_O"])[:, None, None, :]
    np.testing.assert_allclose(trace.attn_out, summed, rtol=1e-5, atol=1e-5)


def small_model():
    config = tinygpt.Config(n_layer=2, n_head=3, d_model=24, d_head=8, d_mlp=48, n_ctx=16, vocab_size=50)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 0, config.vocab_size)
    return config, random_params(config, seed=5), tokens


def qkv(seed=0, batch=2, seq=6, n_head=3, d_head=8):
    q, k, v = jax.random.normal(jax.random.PRNGKey(seed), (3, batch, seq, n_head, d_head))
    mask = model.causal_mask(jnp.asarray([[1] * seq, [0, 0] + [1] * (seq - 2)]))  # [batch, 1, seq, key]
    return q, k, v, mask


def test_attention_takes_the_fused_kernel_exactly_when_nobody_reads_the_pattern():
    q, k, v, mask = qkv()
    for keep, fused in [((), True), (("z",), True), (("attn_scores",), False), (("attn_pattern",), False)]:
        site = SiteRecorder({}, frozenset(keep), None)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: model.attention(q, k, v, mask, site, causal=True))(q, k, v))
        holds_pattern = "f32[2,3,6,6]" in jaxpr  # [batch, head, seq, key] in float32
        assert holds_pattern != fused, (keep, "fused" if fused else "reference")
    edits = {"attn_pattern": (lambda pattern, layer: pattern,)}  # an edit reads the pattern too
    site = SiteRecorder(edits, frozenset(), None)
    assert "f32[2,3,6,6]" in str(jax.make_jaxpr(lambda q: model.attention(q, k, v, mask, site, causal=True))(q))


def test_both_attention_paths_give_the_same_values():
    q, k, v, mask = qkv(seed=7)
    fused = model.attention(q, k, v, mask, SiteRecorder({}, frozenset(), None), causal=True)
    site = SiteRecorder({}, frozenset({"attn_pattern", "attn_scores"}), None)
    reference = model.attention(q, k, v, mask, site, causal=True)
    np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-6)
    pattern = np.asarray(site.kept["attn_pattern"])
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-6)
    assert (pattern[np.broadcast_to(~np.asarray(mask), pattern.shape)] == 0).all()


# ------------------------------------------------------------------------------------- the reference's form


def test_model_py_is_at_most_200_lines():
    n = len(MODEL_PY.read_text().splitlines())
    assert n <= 200, f"tinygpt/model.py has {n} lines: the reference reads in one sitting at <= 200"


def array_assignments(tree: ast.Module):
    """The assignments inside model.py's functions that make arrays: all but the unpacking of a shape or of
    a scanned tuple, and the recorder and argument normalisation."""
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(function):
            if not isinstance(node, ast.Assign):
                continue
            value = node.value
            if isinstance(value, ast.Name):  # p, layer = xs
                continue
            if isinstance(value, (ast.Attribute, ast.Subscript)) and "shape" in ast.unparse(value):
                continue
            called = value.func if isinstance(value, ast.Call) else None
            if isinstance(value, ast.Tuple):
                called = value.elts[0].func if isinstance(value.elts[0], ast.Call) else None
            if called is not None and ast.unparse(called) in ("SiteRecorder", "normalize_edits"):
                continue
            yield node


def test_every_line_of_model_py_that_makes_an_array_names_its_shape():
    lines = MODEL_PY.read_text().splitlines()
    missing = [f"model.py:{node.end_lineno}: {lines[node.end_lineno - 1].strip()}"
               for node in array_assignments(ast.parse("\n".join(lines)))
               if "[" not in lines[node.end_lineno - 1].partition("  # ")[2]]
    assert not missing, "no shape comment:\n" + "\n".join(missing)


def test_the_shape_check_sees_an_unannotated_line():
    source = "def f(x):\n    y = x @ x\n    batch, seq = x.shape\n    site = SiteRecorder({}, {}, None)\n"
    assert [node.lineno for node in array_assignments(ast.parse(source))] == [2]
