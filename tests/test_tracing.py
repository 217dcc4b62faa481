"""probes.tracing: the vectorised causal trace equals ROME's loop (one batch of clean + noised rows per restored
(layer, position), restoring from the clean row in the batch), its invariants, the noise, subject finding,
and `tinygpt trace`.

On the committed tiny checkpoint; the CLI test traces the same prompt with the same arguments as the probe
tests, so the compiled trace is shared.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from conftest import GOLDEN_DIR
from probes import tracing
from tinygpt.tokenizer import Tokenizer, bytes_to_unicode

TOL = 1e-5
MODEL_DIR = str(GOLDEN_DIR / "tiny")
PROMPT = np.array([5, 17, 3, 40, 22, 9, 31, 12], np.int32)
SUBJECT = [2, 3]
KINDS = ("resid_pre", "mlp_out", "attn_out")
WINDOW = 2
SAMPLES = 4


@pytest.fixture(scope="module")
def model():
    return tinygpt.load(MODEL_DIR)


@pytest.fixture(scope="module")
def trace(model):
    return tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=KINDS, samples=SAMPLES,
                                window=WINDOW)


CONFIG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=16, vocab_size=61)


@jax.jit
def rome_run(params, noise, answer, kind, layer, position):
    """ROME's trace_with_patch for one (kind, layer, position): row 0 clean, rows 1.. noised at the subject;
    the site KINDS[kind] of rows 1.. at `position` is overwritten by row 0's, at the layers of ROME's window
    around `layer` (window 1 for the residual stream); returns the mean P(answer) of rows 1.."""
    seq = PROMPT.shape[0]
    tokens = jnp.broadcast_to(PROMPT, (SAMPLES + 1, seq))
    full_noise = jnp.zeros((SAMPLES + 1, seq, CONFIG.d_model)).at[1:, jnp.asarray(SUBJECT)].set(noise)

    def restore(i, site):
        width = 1 if site == "resid_pre" else WINDOW
        lo = jnp.maximum(0, layer - width // 2)
        hi = jnp.minimum(CONFIG.n_layer, layer - (-width // 2))

        def edit(value, at_layer):
            active = (kind == i) & (at_layer >= lo) & (at_layer < hi)
            return jnp.where(active, value.at[1:, position].set(value[0, position]), value)

        return edit

    edits = {"embed": lambda e, at_layer: e + full_noise}
    edits.update({site: restore(i, site) for i, site in enumerate(KINDS)})
    logits = tinygpt.forward(params, tokens, CONFIG, edits=edits, keep=("logits",)).logits
    return jax.nn.softmax(logits[1:, -1])[:, answer].mean()


def test_trace_equals_romes_loop(model, trace):
    assert model.config == CONFIG
    noise, _ = tracing.subject_noise(model.params, PROMPT, SUBJECT, samples=SAMPLES)
    for k, kind in enumerate(KINDS):
        expected = np.array([[rome_run(model.params, noise, trace.answer, k, layer, p) for p in range(len(PROMPT))]
                             for layer in range(CONFIG.n_layer)])
        np.testing.assert_allclose(trace.scores[kind], expected, atol=TOL, rtol=0, err_msg=kind)


def test_trace_invariants(model, trace):
    clean = model(PROMPT[None]).logits[0, -1]
    assert trace.answer == int(jnp.argmax(clean))
    assert trace.clean_prob == pytest.approx(float(jax.nn.softmax(clean)[trace.answer]), abs=TOL)
    assert trace.total_effect == pytest.approx(trace.clean_prob - trace.corrupt_prob)
    for kind in KINDS:
        assert trace.scores[kind].shape == (3, len(PROMPT))
        # before the subject the noise has not arrived: restoring there changes nothing
        np.testing.assert_allclose(trace.scores[kind][:, :SUBJECT[0]], trace.corrupt_prob, atol=TOL)
        np.testing.assert_allclose(trace.indirect_effect(kind), trace.scores[kind] - trace.corrupt_prob)
    # restoring the last subject token's input moves the answer's probability
    assert trace.scores["resid_pre"][0, 3] != pytest.approx(trace.corrupt_prob, abs=1e-4)


def test_noise_is_seeded_and_scaled(model):
    noise, std = tracing.subject_noise(model.params, PROMPT, SUBJECT, samples=10, noise=3.0, seed=7)
    again, _ = tracing.subject_noise(model.params, PROMPT, SUBJECT, samples=10, noise=3.0, seed=7)
    other, _ = tracing.subject_noise(model.params, PROMPT, SUBJECT, samples=10, noise=3.0, seed=8)
    assert noise.shape == (10, 2, 24)
    np.testing.assert_array_equal(noise, again)
    assert not np.allclose(noise, other)
    subject_rows = np.asarray(model.params["wte"], np.float64)[PROMPT[SUBJECT]]
    assert std == pytest.approx(3.0 * subject_rows.std(ddof=1), rel=1e-6)
    _, fixed = tracing.subject_noise(model.params, PROMPT, SUBJECT, noise_std=0.5)
    assert fixed == 0.5
    with pytest.raises(ValueError, match="at least one subject token"):
        tracing.embedding_std(model.params, [])


def test_embedding_std_is_romes_unbiased_std():
    """ROME's collect_embedding_std is torch's `.std()` of every subject token's embedding values (repeats
    counted): the unbiased estimator, dividing by n - 1 (dividing by n is 1% smaller on these 96 values)."""
    params = tinygpt.load(MODEL_DIR).params
    subjects = [[5, 17], [40], [5]]
    rows = np.asarray(params["wte"], np.float64)[[5, 17, 40, 5]]  # [4, d_model]
    n = rows.size
    unbiased = np.sqrt(((rows - rows.mean()) ** 2).sum() / (n - 1))
    assert tracing.embedding_std(params, subjects) == pytest.approx(unbiased, rel=1e-6)
    assert tracing.embedding_std(params, subjects) == pytest.approx(rows.std(ddof=1), rel=1e-6)


def test_explicit_noise_reproduces_romes_algorithm(model, trace):
    """Explicit noise [samples, subject tokens, d_model] is added as given: the trace equals ROME's loop fed the
    same values; ROME's own draw (noise std x numpy RandomState(1).randn(samples, subject tokens, d_model), the
    same values in every run) is that explicit array."""
    rng = np.random.default_rng(3)
    values = (0.2 * rng.standard_normal((SAMPLES, len(SUBJECT), CONFIG.d_model))).astype(np.float32)
    given = tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=KINDS, window=WINDOW,
                                 noise_values=values)
    assert given.samples == SAMPLES and given.noise_draw == "explicit"
    assert given.noise_std == pytest.approx(values.std(), rel=1e-6)
    for k, kind in enumerate(KINDS):
        expected = np.array([[rome_run(model.params, values, given.answer, k, layer, p) for p in range(len(PROMPT))]
                             for layer in range(CONFIG.n_layer)])
        np.testing.assert_allclose(given.scores[kind], expected, atol=TOL, rtol=0, err_msg=kind)
    assert given.corrupt_prob != pytest.approx(trace.corrupt_prob, abs=1e-4)  # other noise, other numbers

    std = 0.3
    rome = tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=KINDS, window=WINDOW,
                                samples=SAMPLES, noise_std=std, noise_values="rome")
    romes_draw = np.float32(std * np.random.RandomState(1).randn(SAMPLES, len(SUBJECT), CONFIG.d_model))
    same = tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=KINDS, window=WINDOW,
                                noise_values=romes_draw)
    assert (rome.noise_draw, rome.seed, rome.noise_std, rome.samples) == ("rome", 1, std, SAMPLES)
    assert rome.corrupt_prob == same.corrupt_prob
    for kind in KINDS:
        np.testing.assert_array_equal(rome.scores[kind], same.scores[kind])
    values_drawn, _ = tracing.subject_noise(model.params, PROMPT, SUBJECT, samples=SAMPLES, noise_std=std,
                                            draw="rome", seed=123)  # the seed does not enter ROME's draw
    np.testing.assert_array_equal(values_drawn, romes_draw)


@pytest.mark.parametrize("values, message", [
    (np.zeros((SAMPLES, 3, 24)),
     r"noise_values must have shape \[samples, 2 subject tokens, d_model=24\], got \[4, 3, 24\]"),
    (np.zeros((2, 24)), r"noise_values must have shape .* got \[2, 24\]"),
    (np.zeros((0, 2, 24)), r"noise_values must have shape .* got \[0, 2, 24\]"),
    (np.full((SAMPLES, 2, 24), np.nan), "noise_values must be finite, got 192 NaN or infinite entries"),
    ("numpy", "noise_values must be None, 'rome' or an array"),
    ([["a"]], "noise_values must be None, 'rome' or an array of numbers"),
], ids=["subject-tokens", "rank", "no-rows", "nan", "string", "not-numbers"])
def test_explicit_noise_is_validated(model, values, message):
    with pytest.raises(ValueError, match=message):
        tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=KINDS, noise_values=values)


def test_explicit_noise_rows_must_match_samples(model):
    with pytest.raises(ValueError, match=r"noise_values must have shape \[3, 2 subject tokens, d_model=24\], got "
                                         r"\[4, 2, 24\]"):
        tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, samples=3,
                             noise_values=np.zeros((SAMPLES, 2, 24)))


def test_restoring_a_block_input_is_restoring_the_previous_blocks_output(model):
    """resid_pre of block l + 1 is resid_post of block l: the two residual maps are one map shifted by a layer
    (ROME restores block outputs, resid_post, the default)."""
    trace = tracing.causal_trace(model.params, PROMPT, model.config, SUBJECT, kinds=("resid_pre", "resid_post"),
                                 samples=SAMPLES)
    np.testing.assert_allclose(trace.scores["resid_pre"][1:], trace.scores["resid_post"][:-1], atol=TOL)
    assert np.abs(trace.scores["resid_post"][-1] - trace.scores["resid_pre"][-1]).max() > 1e-4


def byte_tokenizer() -> Tokenizer:
    byte_chars = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    merges = [("T", "h"), ("Th", "e"), ("Ġ", "E"), ("ĠE", "i"), ("ĠEi", "f")]
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = 256 + i
    return Tokenizer(vocab, merges)


def rome_find_token_range(tokenizer, token_array, substring):
    """ROME's find_token_range (kmeng01/rome, experiments/causal_trace.py): the first occurrence of substring
    in the decoded tokens (`str.index`), as the token range [start, end)."""
    toks = [tokenizer.decode([int(t)]) for t in token_array]
    whole_string = "".join(toks)
    char_loc = whole_string.index(substring)
    loc = 0
    tok_start, tok_end = None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if tok_start is None and loc > char_loc:
            tok_start = i
        if tok_end is None and loc >= char_loc + len(substring):
            tok_end = i + 1
            break
    return (tok_start, tok_end)


def test_find_subject_on_token_bytes():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("The Eiffel Tower is in")
    positions = tracing.find_subject(tokenizer, ids, "Eiffel Tower")
    assert "".join(tokenizer.pieces([ids[p] for p in positions])).strip() == "Eiffel Tower"
    assert tokenizer.pieces([ids[positions[0]]])[0] == " Eif"  # a token only partly inside is included
    with pytest.raises(ValueError, match="does not occur"):
        tracing.find_subject(tokenizer, ids, "Louvre")


def test_subject_occurring_twice_is_the_first_by_default_as_in_rome():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("The Eiffel Tower faces the Eiffel Tower")
    first, second = tracing.subject_occurrences(tokenizer, ids, "Eiffel Tower")
    assert first[-1] < second[0]
    for positions in (first, second):
        assert "".join(tokenizer.pieces([ids[p] for p in positions])).strip() == "Eiffel Tower"
    start, end = rome_find_token_range(tokenizer, ids, "Eiffel Tower")
    assert tracing.find_subject(tokenizer, ids, "Eiffel Tower") == list(range(start, end)) == first
    assert tracing.find_subject(tokenizer, ids, "Eiffel Tower", occurrence=1) == second
    assert tracing.find_subject(tokenizer, ids, "Eiffel Tower", occurrence=-1) == second
    assert tracing.find_subject(tokenizer, ids, "Eiffel Tower", occurrence=-2) == first
    for occurrence in (2, -3):
        with pytest.raises(ValueError, match=rf"occurrence={occurrence} is out of range: subject 'Eiffel Tower' "
                                             r"occurs 2 times in the prompt"):
            tracing.find_subject(tokenizer, ids, "Eiffel Tower", occurrence=occurrence)
    assert len(tracing.subject_occurrences(tokenizer, tokenizer.encode("aaaa"), "aa")) == 2  # as str.count


def test_cli_trace_occurrence(capsys):
    """`tinygpt trace --subject TEXT --occurrence N` corrupts occurrence N (the first, ROME's, by default); a
    missing occurrence is one line naming --occurrence."""
    from tinygpt.cli import main

    prompt = "ROMEO: Juliet is the sun, and Juliet is"
    model = tinygpt.load()
    ids = model.encode(prompt)[0]
    first, second = tracing.subject_occurrences(model.tokenizer, ids, " Juliet")
    argv = ["trace", prompt, "--subject", " Juliet", "--samples", "2", "--kinds", "resid_post", "--json"]
    assert first == tracing.find_subject(model.tokenizer, ids, " Juliet")  # the default (one compile here)
    assert main(argv + ["--occurrence", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subject_positions"] == second and out["noise_draw"] == "jax"
    assert main(argv + ["--occurrence", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygpt: error: --occurrence 2 is out of range: subject ' Juliet' occurs 2 times")
    assert "\n" not in err
    assert main(["trace", "--model", MODEL_DIR, "--tokens", "1,2,3", "--subject-positions", "1", "--occurrence",
                 "1"]) == 2
    assert "--occurrence picks an occurrence of --subject" in capsys.readouterr().err


def test_errors(model):
    with pytest.raises(ValueError, match="outside the prompt"):
        tracing.causal_trace(model.params, PROMPT, model.config, [8])
    with pytest.raises(ValueError, match="unknown kind 'mlp'"):
        tracing.causal_trace(model.params, PROMPT, model.config, [1], kinds=("mlp",))
    with pytest.raises(ValueError, match="one prompt"):
        tracing.causal_trace(model.params, np.stack([PROMPT, PROMPT]), model.config, [1])


def test_cli_trace(capsys, tmp_path):
    from tinygpt.cli import main

    plot = tmp_path / "trace.png"
    argv = ["trace", "--model", MODEL_DIR, "--tokens", ",".join(map(str, PROMPT)), "--subject-positions", "2,3",
            "--samples", str(SAMPLES), "--window", str(WINDOW)]
    assert main(argv + ["--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"clean_prob", "corrupt_prob", "total_effect", "scores", "indirect_effect", "answer", "noise_std",
            "subject_positions"} <= out.keys()
    # the default kinds: block outputs (ROME's hidden-state trace), MLP and attention outputs
    assert set(out["scores"]) == {"resid_post", "mlp_out", "attn_out"} and np.shape(out["scores"]["mlp_out"]) == (3, 8)
    assert plot.stat().st_size > 0
    assert main(argv) == 0 and "largest indirect effect" in capsys.readouterr().out
    assert main(["trace", "--model", MODEL_DIR, "--tokens", "1,2,3"]) == 2
    assert "--subject" in capsys.readouterr().err
