"""Tuned lens: identity at initialisation (it is then the logit lens), training lowers KL(final || lens) on
held-out tokens at every layer, translators round-trip through safetensors with their config checked; and
on the embedded model, trained on training plays, it beats the logit lens at every layer on held-out plays."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import tinygpt
from probes import tuned_lens as tl
from probes.lens import logit_lens
from test_lens import CFG, K, random_params, random_tokens

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "weights" / "embedded" / "model.safetensors"
SEQ, BATCH = 8, 4


def stream(seed, n):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.int32)


def test_identity_translators_are_the_logit_lens():
    params, tokens = random_params(1), random_tokens(1)
    identity = tl.init_translators(CFG)
    assert identity["A"].shape == (CFG.n_layer, CFG.d_model, CFG.d_model) and not np.any(identity["A"])
    tuned = tl.tuned_lens(params, CFG, identity, tokens, target=2, k=K)
    logit = logit_lens(params, CFG, tokens, target=2, k=K)
    pre = logit.sites.index("resid_pre")
    assert tuned.sites == ("resid_pre",)
    np.testing.assert_array_equal(tuned.top_ids[0], logit.top_ids[pre])
    np.testing.assert_allclose(tuned.kl[0], logit.kl[pre], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tuned.target_probs[0], logit.target_probs[pre], rtol=1e-5, atol=1e-7)
    comparison = tl.evaluate_lenses(params, CFG, identity, stream(2, 80), seq=SEQ, batch=BATCH)
    np.testing.assert_allclose(comparison.kl_tuned, comparison.kl_logit, rtol=1e-5)
    assert comparison.n_tokens == 8 * (SEQ - 1)  # 10 windows, the 2 beyond a whole batch dropped


def test_loss_is_forward_kl_of_the_translated_residual_through_the_final_layer_norm():
    """With random translators: the loss is KL(final || lens) (not the reverse), the lens reading
    ln_f(h + h A + b) @ wte.T (the translator before the final LayerNorm), computed here in float64."""
    params, tokens = random_params(3), random_tokens(3)
    rng = np.random.default_rng(3)
    translators = {"A": 0.2 * rng.standard_normal((CFG.n_layer, CFG.d_model, CFG.d_model)).astype(np.float32),
                   "b": rng.standard_normal((CFG.n_layer, CFG.d_model)).astype(np.float32)}
    trace = tinygpt.forward(params, tokens, CFG, keep=("resid_pre", "logits"))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    final = log_softmax(np.asarray(trace.logits, np.float64))
    wte, w, b = (np.asarray(params[n], np.float64) for n in ("wte", "lnf_w", "lnf_b"))
    forward_kl, reverse_kl = [], []
    for layer in range(CFG.n_layer):
        h = np.asarray(trace.resid_pre[layer], np.float64)
        h = h + h @ translators["A"][layer] + translators["b"][layer]
        normalized = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + CFG.ln_eps)
        lens = log_softmax((normalized * w + b) @ wte.T)
        forward_kl.append((np.exp(final) * (final - lens)).sum(-1).mean())
        reverse_kl.append((np.exp(lens) * (lens - final)).sum(-1).mean())
    loss = float(tl.loss_fn(translators, params, tokens, CFG))
    assert loss == pytest.approx(np.mean(forward_kl), rel=1e-4)
    assert abs(np.mean(forward_kl) - np.mean(reverse_kl)) > 0.05 * np.mean(forward_kl)  # the two differ here


def test_training_beats_the_logit_lens_on_held_out_tokens_and_round_trips(tmp_path):
    params = random_params(3)
    trained = tl.train_tuned_lens(params, CFG, stream(4, 2000), steps=150, batch=BATCH, seq=SEQ, lr=3e-3)
    assert trained.losses.shape == (150,)
    assert trained.losses[-20:].mean() < 0.8 * trained.losses[:5].mean()
    held_out = tl.evaluate_lenses(params, CFG, trained.translators, stream(5, 400), seq=SEQ, batch=BATCH)
    assert np.all(held_out.kl_tuned < held_out.kl_logit), (held_out.kl_tuned, held_out.kl_logit)
    assert np.all(held_out.ppl_logit > 1) and held_out.ppl_model > 1
    assert [r["layer"] for r in held_out.rows()] == list(range(CFG.n_layer))

    path = tmp_path / "lens.safetensors"
    tl.save_translators(path, trained.translators, CFG, steps=150)
    loaded = tl.load_translators(path, CFG)
    for name in ("A", "b"):
        np.testing.assert_array_equal(loaded[name], trained.translators[name])
    other = dataclasses.replace(CFG, n_ctx=32)
    with pytest.raises(tl.TunedLensError, match="trained for another model: n_ctx=16 \\(model: 32\\)"):
        tl.load_translators(path, other)


def test_bad_files_and_streams_are_clear_errors(tmp_path):
    with pytest.raises(tl.TunedLensError, match="no tuned lens at"):
        tl.load_translators(tmp_path / "missing.safetensors", CFG)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(tl.TunedLensError, match="is not a readable safetensors file"):
        tl.load_translators(tmp_path / "junk.safetensors", CFG)
    with pytest.raises(tl.TunedLensError, match="fewer than one window of 8"):
        tl.train_tuned_lens(random_params(0), CFG, stream(0, 5), steps=1, seq=SEQ)
    with pytest.raises(tl.TunedLensError, match="between 2 and the model's context n_ctx=16"):
        tl.evaluate_lenses(random_params(0), CFG, tl.init_translators(CFG), stream(0, 100), seq=17)


@pytest.mark.skipif(not EMBEDDED.is_file(), reason=f"the embedded model is not built yet ({EMBEDDED} is missing)")
def test_tuned_lens_beats_the_logit_lens_on_the_embedded_models_held_out_plays():
    from weights import corpus

    model = tinygpt.load()
    train_plays, held_out_plays = corpus.split()
    train_stream = tl.token_stream(model.tokenizer, train_plays.values(), max_chars=60_000)
    held_out_stream = tl.token_stream(model.tokenizer, held_out_plays.values(), max_chars=30_000)
    trained = tl.train_tuned_lens(model.params, model.config, train_stream, steps=150, batch=4, seq=32, lr=2e-3)
    result = tl.evaluate_lenses(model.params, model.config, trained.translators, held_out_stream, seq=64, batch=8,
                                max_windows=32)
    assert np.all(result.kl_tuned < result.kl_logit), (result.kl_tuned, result.kl_logit)


# ------------------------------------------------------------------------------------- files: safe, checked


def write_lens_file(path, A=None, b=None, **metadata):
    """A lens file as tinygpt writes it, with parts replaced."""
    from tinygpt.files import save_safetensors

    L, d = CFG.n_layer, CFG.d_model
    tensors = {"A": np.zeros((L, d, d), np.float32) if A is None else A,
               "b": np.zeros((L, d), np.float32) if b is None else b}
    fields = {"format": tl.FORMAT, "site": tl.SITE, "config": json.dumps(tl.config_dict(CFG)), "info": "{}",
              **metadata}
    save_safetensors(path, tensors, fields)
    return path


L_, D_ = CFG.n_layer, CFG.d_model


@pytest.mark.parametrize("parts, message", [
    ({"A": np.zeros((1, D_, D_), np.float32), "b": np.zeros((1, D_), np.float32)},
     f"tensor A is float32 \\[1, {D_}, {D_}\\], expected float32 \\[{L_}, {D_}, {D_}\\]"),
    ({"A": np.zeros((L_, D_, 1), np.float32)}, f"tensor A is float32 \\[{L_}, {D_}, 1\\]"),
    ({"A": np.full((L_, D_, D_), np.nan, np.float32)}, "tensor A has .* non-finite values"),
    ({"b": np.zeros((L_, D_), np.float16)}, "tensor b is float16"),
    ({"config": "{n_layer"}, "metadata 'config' is not valid JSON"),
    ({"info": "]"}, "metadata 'info' is not valid JSON"),
    ({"site": "resid_middle"}, "reads the unknown site 'resid_middle'"),
    ({"format": "other"}, "is not a tuned lens written by tinygpt"),
])
def test_a_damaged_lens_file_is_one_clear_error(tmp_path, parts, message):
    path = write_lens_file(tmp_path / "lens.safetensors", **parts)
    with pytest.raises(tl.TunedLensError, match=message):
        tl.load_translators(path, CFG)


def test_a_lens_is_refused_on_another_model_of_the_same_shape(tmp_path):
    params, other = random_params(1), random_params(2)
    path = tmp_path / "lens.safetensors"
    tl.save_translators(path, tl.init_translators(CFG), CFG, params=params, steps=0)
    tl.load_translators(path, CFG, params)
    with pytest.raises(tl.TunedLensError, match="was made from another model"):
        tl.load_translators(path, CFG, other)


def test_identical_training_runs_write_identical_files_atomically(tmp_path):
    params = random_params(3)
    for name in ("a", "b"):
        trained = tl.train_tuned_lens(params, CFG, stream(4, 400), steps=3, batch=BATCH, seq=SEQ, lr=3e-3)
        tl.save_translators(tmp_path / f"{name}.safetensors", trained.translators, CFG, params=params, steps=3,
                            seq=SEQ, batch=BATCH)
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_training_arguments_are_named():
    from tinygpt.cli.common import cli_message
    from tinygpt.cli.reading import TUNED_LENS_FLAGS

    with pytest.raises(tl.TunedLensError, match="^steps must be at least 1, got 0$") as e:
        tl.train_tuned_lens(random_params(0), CFG, stream(0, 100), steps=0, seq=SEQ)
    assert cli_message(e.value, TUNED_LENS_FLAGS) == "--steps must be at least 1, got 0"
    with pytest.raises(tl.TunedLensError, match="^lr must be a finite number > 0, got nan$"):
        tl.train_tuned_lens(random_params(0), CFG, stream(0, 100), lr=float("nan"), seq=SEQ)
    with pytest.raises(tl.TunedLensError) as e:
        tl.train_tuned_lens(random_params(0), CFG, stream(0, 100), seq=1)
    assert cli_message(e.value, TUNED_LENS_FLAGS).startswith("--seq (the window length) 1 must be between 2")
