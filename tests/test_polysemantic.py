"""probes.polysemantic against direct computations: the top contexts are the neuron's largest activations,
the entropies count token types, and with an SAE the features' Pearson correlations, shares of the top
activations and key cosines are the documented formulas (checked with an exact SAE, whose latents are
relu(x) and relu(-x) of each input dimension). The neuron's activation and key are probes.memory's one
definition each: `tinygpt polysemantic` and `tinygpt neuron` report the same numbers on the same text."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tinygpt
from conftest import GOLDEN_DIR
from probes import memory, polysemantic
from probes.sae import SAE, SAEConfig

LAYER, NEURON, K = 1, 3, 6


@pytest.fixture(scope="module")
def model():
    return tinygpt.load(str(GOLDEN_DIR / "tiny"))


@pytest.fixture(scope="module")
def windows(model):
    return np.random.default_rng(0).integers(0, model.config.vocab_size, (10, 9)).astype(np.int32)


def exact_sae(d: int, site: str, layer: int) -> SAE:
    eye = np.eye(d, dtype=np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], axis=1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": np.concatenate([eye, -eye], axis=0), "b_dec": np.zeros(d, np.float32)}
    return SAE(SAEConfig(d_in=d, d_sae=2 * d, site=site, layer=layer), params)


def pearson(x, y):
    return float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])


def test_top_contexts_and_entropies(model, windows):
    report = polysemantic.neuron_report(model.params, model.config, windows, LAYER, NEURON, k=K, context=4)
    a = np.asarray(model(windows, keep=("mlp_post",)).mlp_post[LAYER, ..., NEURON])  # [window, seq]
    order = np.argsort(-a.reshape(-1), kind="stable")[:K]
    assert [(c.window, c.position) for c in report.top] == [divmod(int(r), windows.shape[1]) for r in order]
    np.testing.assert_allclose([c.activation for c in report.top], a.reshape(-1)[order], rtol=1e-5)
    tokens = [int(windows.reshape(-1)[r]) for r in order]
    assert [c.token for c in report.top] == tokens
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    assert report.token_entropy == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert report.fire_rate == pytest.approx(float((a > 0).mean()))
    assert all(c.context[-1] == c.token and len(c.context) <= 4 for c in report.top)


def test_features_of_an_sae_on_the_neurons_own_layer(model, windows):
    """Latent NEURON is relu(a): the most correlated, and all of the top activations (share 1 when they are
    positive); its mirror relu(-a) has share 0 there."""
    d_mlp = model.config.d_mlp
    report = polysemantic.neuron_report(model.params, model.config, windows, LAYER, NEURON, k=K,
                                        sae=exact_sae(d_mlp, "mlp_post", LAYER), n_features=3)
    a = np.asarray(model(windows, keep=("mlp_post",)).mlp_post[LAYER, ..., NEURON]).reshape(-1)
    best = report.features[0]
    assert best.feature == NEURON and best.key_cosine is None
    assert best.correlation == pytest.approx(pearson(np.maximum(a, 0), a), abs=1e-5)
    assert all(c.activation > 0 for c in report.top)
    assert best.share == pytest.approx(1.0, abs=1e-5)
    for f in report.features[1:]:  # other latents decode to other neurons, or are relu(-a) = 0 at the top
        assert f.share == pytest.approx(0.0, abs=1e-6)
        i, sign = (f.feature, 1.0) if f.feature < d_mlp else (f.feature - d_mlp, -1.0)
        a_i = np.asarray(model(windows, keep=("mlp_post",)).mlp_post[LAYER, ..., i]).reshape(-1)
        assert f.correlation == pytest.approx(pearson(np.maximum(sign * a_i, 0), a), abs=1e-5)


def test_features_of_an_sae_on_the_residual_stream(model, windows):
    """Latent i of an exact SAE on resid_mid reads dimension i: its correlation is Pearson's of relu(x_i) with
    the neuron, and its key cosine is the neuron's centred key's i-th component over the key's norm."""
    d_model = model.config.d_model
    report = polysemantic.neuron_report(model.params, model.config, windows, LAYER, NEURON, k=K,
                                        sae=exact_sae(d_model, "resid_mid", LAYER), n_features=4)
    trace = model(windows, keep=("mlp_post", "resid_mid"))
    a = np.asarray(trace.mlp_post[LAYER, ..., NEURON]).reshape(-1)
    x = np.asarray(trace.resid_mid[LAYER]).reshape(-1, d_model)
    key = memory.residual_keys(model.params, LAYER)[NEURON]  # the one centred key (geometry's too)
    blocks = model.params["blocks"]
    raw = np.asarray(blocks["ln2_w"][LAYER], np.float64) * np.asarray(blocks["W_in"][LAYER][:, NEURON], np.float64)
    np.testing.assert_allclose(key, raw - raw.mean(), rtol=1e-6, atol=1e-9)
    correlations = []
    for f in report.features:
        i, sign = (f.feature, 1.0) if f.feature < d_model else (f.feature - d_model, -1.0)
        expected = pearson(np.maximum(sign * x[:, i], 0), a)
        assert f.correlation == pytest.approx(expected, abs=1e-5)
        assert f.key_cosine == pytest.approx(sign * key[i] / np.linalg.norm(key), abs=1e-6)
        assert f.share is None
        correlations.append(f.correlation)
    assert correlations == sorted(correlations, reverse=True)


def test_activations_are_memorys_one_definition(model, windows):
    """neuron_report's activations are probes.memory.neuron_activations', bit for bit: its top contexts are
    memory.top_activations', and a window run as a prompt (neuron_on_prompt) gives the same numbers."""
    report = polysemantic.neuron_report(model.params, model.config, windows, LAYER, NEURON, k=K)
    top = memory.top_activations(model.params, model.config, windows, LAYER, NEURON, k=K)
    assert [(c.window, c.position) for c in report.top] == list(zip(top.windows.tolist(), top.positions.tolist()))
    np.testing.assert_array_equal([c.activation for c in report.top], top.activations)
    c = report.top[0]
    on_prompt = memory.neuron_on_prompt(model.params, model.config, windows[c.window][None], LAYER, NEURON)
    assert on_prompt.activations[c.position] == c.activation


def cli_json(capsys, *argv):
    from tinygpt.cli import main

    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_neuron_and_polysemantic_commands_report_the_same_activations(capsys, tmp_path):
    """The issue's case: `tinygpt neuron 1.31` and `tinygpt polysemantic 1.31` on the same text. A prompt is run
    as one document (<|endoftext|> first, as each document of a corpus), and both commands cut a corpus into
    the same windows, so every activation agrees."""
    text = tmp_path / "paid.txt"
    text.write_text("paid, one time or another.", encoding="utf-8")
    on_prompt = cli_json(capsys, "neuron", "1.31", "paid, one time or another.", "--corpus", str(text), "--seq",
                         "4", "--top", "3")
    n = len(on_prompt["prompt"]["tokens"])  # <|endoftext|> and the prompt's tokens
    whole = cli_json(capsys, "polysemantic", "1.31", "--corpus", str(text), "--seq", str(n), "--top", str(n))
    assert whole["seq"] == n and whole["n_tokens"] == n
    by_position = {c["position"]: c["activation"] for c in whole["top"]}
    assert [by_position[p] for p in range(n)] == pytest.approx(on_prompt["prompt"]["activations"], abs=1e-6)

    # a corpus: the same windows (of --seq 4 here, and of n_ctx by default), the same top activations
    plays = tmp_path / "plays.txt"
    plays.write_text("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is "
                     "the sun.\n\nJULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse "
                     "thy name.\n" * 12, encoding="utf-8")
    for seq in ([], ["--seq", "4"]):
        neuron = cli_json(capsys, "neuron", "1.31", "--corpus", str(plays), "--top", "5", *seq)
        poly = cli_json(capsys, "polysemantic", "1.31", "--corpus", str(plays), "--top", "5", *seq)
        assert neuron["seq"] == poly["seq"] == (4 if seq else 128)
        assert [(a["window"], a["position"]) for a in neuron["top_activations"]] == \
            [(c["window"], c["position"]) for c in poly["top"]]
        assert [a["activation"] for a in neuron["top_activations"]] == \
            pytest.approx([c["activation"] for c in poly["top"]], abs=1e-6)


def test_non_unit_decoders_and_per_token_input_norms(model, windows):
    """A SAELens-style SAE: decoder rows of norm g_i (encoder columns / g_i, so the same reconstruction) and
    an input normalised per token (constant_norm_rescale). Latent NEURON still reconstructs the neuron
    exactly: share 1; on the residual stream the key cosine does not depend on the decoder rows' norms."""
    for site, d in (("mlp_post", model.config.d_mlp), ("resid_mid", model.config.d_model)):
        sae = exact_sae(d, site, LAYER)
        g = np.linspace(0.5, 3.0, 2 * d).astype(np.float32)  # [d_sae]
        params = {**sae.params, "W_enc": sae.params["W_enc"] / g, "W_dec": sae.params["W_dec"] * g[:, None]}
        sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, site=site, layer=LAYER, input_norm="constant_norm_rescale"),
                  params)
        report = polysemantic.neuron_report(model.params, model.config, windows, LAYER, NEURON, k=K, sae=sae,
                                            n_features=4)
        if site == "mlp_post":
            best = report.features[0]
            assert best.feature == NEURON and best.share == pytest.approx(1.0, abs=1e-5)
            continue
        key = memory.residual_keys(model.params, LAYER)[NEURON]
        for f in report.features:
            i, sign = (f.feature, 1.0) if f.feature < d else (f.feature - d, -1.0)
            assert f.key_cosine == pytest.approx(sign * key[i] / np.linalg.norm(key), abs=1e-6)
