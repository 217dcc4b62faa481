"""probes.massive on a checkpoint with a massive activation planted by construction, and `tinygpt massive`.

The plant (layer 1, residual dim 5, token 7): token 7's embedding points along a trigger dim (17) no other
token uses; neuron 9 of block 1's MLP reads the trigger (and is silent otherwise) and writes 150 x its
activation into dim 5, making W_out's row 9 its top singular direction. Dim 5 is read out (tied unembedding)
as token 11, which follows token 7 in every prompt, so the model needs the massive activation to predict it.
Every stage must report that truth.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from probes import massive
from tinygpt.params import param_shapes

CFG = tinygpt.Config(n_layer=3, n_head=3, d_model=24, d_head=8, d_mlp=40, n_ctx=16, vocab_size=61)
LAYER, DIM, TOKEN, NEXT, NEURON, TRIGGER, GAIN = 1, 5, 7, 11, 9, 17, 150.0
SEQ = 8
POSITIONS = (2, 4, 1)  # where token 7 sits in each prompt


def planted_params(seed=0):
    rng = np.random.default_rng(seed)
    D, M = CFG.d_model, CFG.d_mlp
    std = {"wte": 0.4, "wpe": 0.4, "W_Q": 1 / np.sqrt(D), "W_K": 1 / np.sqrt(D), "W_V": 1 / np.sqrt(D),
           "W_O": 1 / np.sqrt(D), "W_in": 1 / np.sqrt(D), "W_out": 1 / np.sqrt(M)}

    def draw(name, shape):
        if name in std:
            return std[name] * rng.standard_normal(shape)
        return (1.0 if name.endswith("_w") else 0.0) + 0.1 * rng.standard_normal(shape)

    p = {n: {m: draw(m, s) for m, s in shape.items()} if isinstance(shape, dict) else draw(n, shape)
         for n, shape in param_shapes(CFG).items()}
    block = p["blocks"]
    p["wte"][:, TRIGGER] *= 0.1  # the trigger dim is token 7's alone
    p["wte"][TOKEN] = 0.3 * rng.standard_normal(D)
    p["wte"][TOKEN, TRIGGER] = 40.0
    block["W_in"][LAYER][:, NEURON] = 0.0  # neuron 9 reads the trigger, and is silent below ~2.5
    block["W_in"][LAYER][TRIGGER, NEURON] = 10.0
    block["b_in"][LAYER][NEURON] = -25.0
    block["W_out"][LAYER][NEURON] = 0.0  # and writes into dim 5 only
    block["W_out"][LAYER][NEURON, DIM] = GAIN
    p["wte"][NEXT, DIM] = 2.0  # dim 5 predicts token 11
    p["lnf_w"][TRIGGER] = 0.0  # the trigger dim is not read out (token 7's logit stays ordinary)
    return {n: ({m: jnp.asarray(v, jnp.float32) for m, v in x.items()} if isinstance(x, dict)
                else jnp.asarray(x, jnp.float32)) for n, x in p.items()}


def planted_prompts():
    rng = np.random.default_rng(1)
    prompts = []
    for position in POSITIONS:
        tokens = rng.integers(0, CFG.vocab_size, SEQ)
        tokens[(tokens == TOKEN) | (tokens == NEXT)] = 0
        tokens[position], tokens[position + 1] = TOKEN, NEXT
        prompts.append(tokens)
    return prompts


@pytest.fixture(scope="module")
def report():
    return massive.investigate(planted_params(), CFG, planted_prompts())


def test_detects_the_planted_activation(report):
    assert report.activations and report.first_layer == LAYER
    for a in report.activations:
        assert (a.dim, a.token, a.position) == (DIM, TOKEN, POSITIONS[a.prompt])
        assert a.layer >= LAYER and a.value > 1000 and a.ratio >= 1000
    assert {(a.prompt, a.layer) for a in report.activations} == {(p, l) for p in range(3) for l in (1, 2)}
    values = [abs(a.value) for a in report.activations]
    assert values == sorted(values, reverse=True)
    (trajectory,) = report.trajectories
    assert trajectory.dim == DIM and abs(trajectory.values[0]) < 10 and (np.abs(trajectory.values[1:]) > 1000).all()


def test_exclusion_mlps_make_it_attention_does_not(report):
    assert len(report.exclusion) == 3
    for e in report.exclusion:
        np.testing.assert_allclose(e.mlp_off_change[LAYER:], -100, atol=1.0)
        assert np.abs(e.attention_off_change[LAYER:]).max() < 10  # still massive without attention
        assert (np.abs(e.attention_off[LAYER:]) > 1000).all()
        np.testing.assert_allclose(e.baseline, massive.residual_stream(
            planted_params(), jnp.asarray(planted_prompts()[e.prompt]), CFG)[:, e.position, e.dim], rtol=1e-5)


def test_mlp_stages(report):
    m = report.mlp
    assert m.layer == LAYER
    assert m.argmax == {"input": TRIGGER, "after_W_in": NEURON, "after_gelu": NEURON, "output": DIM}
    assert m.massive["after_gelu"] == pytest.approx(m.massive["after_W_in"], rel=1e-3)  # GELU(x) ~ x for x >> 0
    assert m.massive["output"] == pytest.approx(GAIN * m.massive["after_gelu"], rel=0.01)
    assert m.massive["output"] > 20 * m.others["output"]


def test_geometry(report):
    g = report.geometry
    assert (g.layer, g.dim) == (LAYER, DIM)
    assert g.sigma1 == pytest.approx(GAIN, rel=0.01) and g.ratio > 20
    assert abs(g.slope) == pytest.approx(GAIN, rel=0.01) and g.r2 > 0.999
    assert g.projection.shape == (3 * SEQ,) and g.is_massive.sum() == 3


def test_intervention_zero_hurts_mean_does_not(report):
    i = report.intervention
    assert i.layer == LAYER and set(i.means) == {DIM} and i.means[DIM] > 1000
    assert i.change_zero > 0.3
    assert abs(i.change_mean) < 0.05 * i.change_zero


def test_thresholds_are_options():
    params, prompts = planted_params(), planted_prompts()
    assert massive.investigate(params, CFG, prompts, ratio=1e9).activations == []
    low = massive.detect(params, CFG, prompts, threshold=5.0, ratio=5.0)
    assert len(low) > len(massive.detect(params, CFG, prompts))


def test_cli_massive(tmp_path, capsys):
    import weights
    from tinygpt.cli import main

    weights.write(tmp_path, CFG, planted_params())
    plot = tmp_path / "massive.png"
    argv = ["massive", "--model", str(tmp_path)] + [f"--tokens={','.join(map(str, p))}" for p in planted_prompts()]
    assert main(argv + ["--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"activations", "trajectories", "exclusion", "mlp", "geometry", "intervention"} <= out.keys()
    first = out["activations"][0]
    assert {"layer", "dim", "position", "token", "value", "ratio"} <= first.keys()
    assert (min(a["layer"] for a in out["activations"]), first["dim"], first["token"]) == (LAYER, DIM, TOKEN)
    assert out["geometry"]["r2"] > 0.999 and out["intervention"]["change_zero"] > 0.3
    assert plot.stat().st_size > 0
    assert main(argv) == 0 and "set to zero" in capsys.readouterr().out
