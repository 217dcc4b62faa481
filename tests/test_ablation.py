"""probes.ablation: what zero / mean / resample ablation of heads, neurons, dims, positions and whole components
does to the forward, the sweep against single ablated runs, the neuron study, errors, and `tinygpt ablate`.

All on the committed tiny checkpoint (3 layers, 3 heads, d_model 24, d_mlp 40) and one prompt shape, so the
compiled programs are shared between tests (and with tests/test_patching.py, tests/test_tracing.py).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from conftest import GOLDEN_DIR
from probes import ablation, metrics
from tinygpt.cli import main

TOL = 1e-5
MODEL_DIR = str(GOLDEN_DIR / "tiny")
TOKENS = np.array([[5, 17, 3, 40, 22, 9, 31, 12, 8], [44, 2, 19, 7, 60, 13, 27, 33, 1]], np.int32)
PROMPT = TOKENS[:1]  # what the CLI tests run: the probes' compiled programs are shared with them
OTHER = np.array([[6, 16, 30, 1, 2, 50, 4, 10, 11], [9, 9, 9, 9, 9, 9, 9, 9, 9]], np.int32)
ANSWER = 3


@pytest.fixture(scope="module")
def model():
    return tinygpt.load(MODEL_DIR)


def run(model, **kwargs):
    return ablation.ablate(model.params, TOKENS, model.config, keep="all", **kwargs)


# ---------------------------------------------------------------------------------------- what is removed


def test_zero_head_ablation_removes_exactly_that_heads_write(model):
    clean = model(TOKENS)
    layer, heads = 1, [0, 2]
    ablated = run(model, site="z", layers=[layer], heads=heads)
    np.testing.assert_allclose(ablated.resid_post[:layer], clean.resid_post[:layer], atol=TOL)
    np.testing.assert_array_equal(ablated.z[layer][..., heads, :], 0)
    np.testing.assert_allclose(ablated.z[layer][..., 1, :], clean.z[layer][..., 1, :], atol=TOL)
    expected = clean.attn_out[layer] - clean.head_out[layer][..., heads, :].sum(axis=-2)
    np.testing.assert_allclose(ablated.attn_out[layer], expected, atol=1e-4)


def test_component_ablation_keeps_the_residual_stream(model):
    """All MLPs off: each block's output is its attention-updated input (one layer's attention sublayer is
    checked against HF hooks in tests/test_causal_oracle.py)."""
    no_mlps = run(model, site="mlp_out")
    np.testing.assert_allclose(no_mlps.resid_post, no_mlps.resid_mid, atol=TOL)
    np.testing.assert_allclose(no_mlps.resid_pre[1:], no_mlps.resid_post[:-1], atol=TOL)
    assert np.abs(np.asarray(no_mlps.attn_out)).max() > 0.1


def test_neuron_dim_and_position_selection(model):
    clean = model(TOKENS)
    ablated = run(model, site="mlp_post", layers=[2], neurons=[3, 7], positions=[4])
    np.testing.assert_array_equal(ablated.mlp_post[2][:, 4, [3, 7]], 0)
    untouched = np.ones(ablated.mlp_post[2].shape, bool)
    untouched[:, 4, [3, 7]] = False
    np.testing.assert_allclose(ablated.mlp_post[2][untouched], clean.mlp_post[2][untouched], atol=TOL)
    np.testing.assert_allclose(ablated.resid_post[2][:, :4], clean.resid_post[2][:, :4], atol=TOL)  # causal


def test_site_where_selects_on_named_axes(model):
    config = model.config
    dims = ablation.site_where("resid_pre", config, 9, dims=[5], positions=[0, 2])
    assert dims.shape == (1, 9, 24) and int(dims.sum()) == 2 and bool(dims[0, 2, 5])
    heads = ablation.site_where("attn_pattern", config, 9, heads=[1], positions=[4])
    assert heads.shape == (1, 3, 9, 1) and bool(heads[0, 1, 4, 0]) and int(heads.sum()) == 1
    assert ablation.site_where("z", config, 9).shape == (1, 1, 1, 1)


def test_mean_and_resample_from_the_prompt_itself_change_nothing(model):
    prompt = TOKENS[:1]
    clean = model(prompt, keep=("logits",)).logits
    for method in ("mean", "resample"):
        ablated = ablation.ablate(model.params, prompt, model.config, "z", method=method, reference=TOKENS[[0, 0, 0]])
        np.testing.assert_allclose(ablated.logits, clean, atol=1e-4)


def test_mean_over_positions_skips_padding(model):
    mask = np.ones(OTHER.shape, np.int32)
    mask[1, :4] = 0
    source = ablation.ablation_source(model.params, model.config, "mlp_out", "mean", seq=5, batch=2,
                                      reference=OTHER, reference_mask=mask, per_position=False)
    values = np.asarray(model(OTHER, attention_mask=mask, keep=("mlp_out",)).mlp_out)  # [layer, batch, seq, d]
    expected = values[:, mask.astype(bool)].mean(axis=1)  # [layer, d_model] over real tokens
    assert source.shape == (model.config.n_layer, 1, 1, model.config.d_model)
    np.testing.assert_allclose(source[:, 0, 0], expected, atol=1e-5)


def test_resample_draws_reference_rows(model):
    source = ablation.ablation_source(model.params, model.config, "z", "resample", seq=9, batch=2, reference=OTHER,
                                      seed=3)
    rows = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2,), 0, 2))
    np.testing.assert_allclose(source, model(OTHER, keep=("z",)).z[:, rows], atol=TOL)


# ------------------------------------------------------------------------------------------------ sweeps


def test_head_sweep_equals_single_ablations(model):
    result = ablation.ablation_sweep(model.params, PROMPT, model.config, metric="log_prob", answer=ANSWER)
    assert result.values.shape == (3, 3)
    clean = model(PROMPT, keep=("logits",)).logits[:, -1]
    assert result.baseline == pytest.approx(float(metrics.log_prob(clean, ANSWER).mean()), abs=TOL)
    for layer, head in [(0, 1), (2, 2)]:
        logits = ablation.ablate(model.params, PROMPT, model.config, "z", layers=[layer], heads=[head]).logits
        assert result.values[layer, head] == pytest.approx(float(metrics.log_prob(logits[0, -1], ANSWER)), abs=TOL)
    np.testing.assert_allclose(result.effect, result.values - result.baseline)


def test_mean_neuron_sweep_with_kl(model):
    result = ablation.ablation_sweep(model.params, TOKENS, model.config, site="mlp_post", axis="d_mlp", metric="kl",
                                     method="mean", reference=OTHER, layers=[1], units=[0, 5, 39])
    assert result.values.shape == (1, 3) and result.baseline == pytest.approx(0, abs=1e-6)
    clean = model(TOKENS, keep=("logits",)).logits[:, -1]
    logits = run(model, site="mlp_post", layers=[1], neurons=[5], method="mean", reference=OTHER).logits[:, -1]
    assert result.values[0, 1] == pytest.approx(float(metrics.kl_div(clean, logits).mean()), abs=TOL)
    assert (result.values >= -1e-6).all()


# ---------------------------------------------------------------------------------------- one neuron


def test_neuron_study(model):
    layer, neuron = 1, 6
    same = ablation.neuron_study(model.params, PROMPT, model.config, layer, neuron, action="scale", value=1.0)
    np.testing.assert_allclose(same.change.kl, 0, atol=1e-5)
    study = ablation.neuron_study(model.params, PROMPT, model.config, layer, neuron, action="set", value=0.0)
    zeroed = ablation.neuron_study(model.params, PROMPT, model.config, layer, neuron, action="ablate")
    np.testing.assert_allclose(study.change.edited, zeroed.change.edited, atol=1e-6)
    doubled = ablation.neuron_study(model.params, PROMPT, model.config, layer, neuron, action="scale", value=2.0)

    def double(mlp_post, at_layer):
        return jnp.where(at_layer == layer, mlp_post.at[..., neuron].multiply(2.0), mlp_post)

    expected = tinygpt.forward(model.params, PROMPT, model.config, edits={"mlp_post": double}).logits[:, -1]
    np.testing.assert_allclose(doubled.change.edited, metrics.log_probs(expected), atol=1e-5)
    assert doubled.change.kl.max() > 1e-4
    np.testing.assert_allclose(study.activation, model(PROMPT).mlp_post[layer][..., neuron], atol=TOL)
    np.testing.assert_allclose(study.direct_logits,
                               model.params["wte"] @ model.params["blocks"]["W_out"][layer, neuron], atol=1e-5)
    (up, up_by), (down, down_by) = doubled.change.top_changes(3)
    assert (np.diff(up_by) <= 0).all() and (np.diff(down_by) >= 0).all() and up_by[0] >= down_by[0]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(site="mlp_out", heads=[0]), "site 'mlp_out' has no head axis"),
    (dict(site="z", heads=[3]), r"heads \[3\] out of range for head of size 3"),
    (dict(site="z", method="mean"), "needs a reference batch"),
    (dict(site="z", method="mean", reference=OTHER[:, :5]), "reference prompts of the prompt's length 9"),
    (dict(site="z", method="median"), "unknown ablation method 'median'"),
    (dict(site="z", layers=[3]), r"layers \[3\] out of range for a model of 3 layers"),
    (dict(site="logits"), "global"),
])
def test_errors_say_what_to_fix(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ablation.ablation_edits(model.params, TOKENS, model.config, **kwargs)


# --------------------------------------------------------------------------------------------------- CLI


def cli_json(capsys, *argv):
    assert main(list(argv) + ["--model", MODEL_DIR, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_ablate(capsys):
    tokens = ",".join(map(str, PROMPT[0]))
    out = cli_json(capsys, "ablate", "--tokens", tokens, "--heads", "1", "--layers", "0,2")
    assert {"kl_last", "kl_mean", "top_before", "top_after", "promoted", "suppressed"} <= out.keys()
    assert out["site"] == "z" and out["layers"] == [0, 2] and out["kl_last"] >= 0
    out = cli_json(capsys, "ablate", "--tokens", tokens, "--sweep", "heads", "--answer-id", str(ANSWER))
    assert out["metric"] == "log_prob" and np.shape(out["values"]) == (3, 3)
    assert {"baseline", "effect", "top", "layers", "units"} <= out.keys()
    out = cli_json(capsys, "ablate", "--tokens", tokens, "--layers", "1", "--neurons", "6", "--neuron-action",
                   "scale", "--value", "2")
    assert out["kl_last"] > 0
    assert out["neuron"] == 6 and len(out["activation"]) == 9 and len(out["direct_logits_top"]) == 10


def test_cli_ablate_errors_are_one_line(capsys):
    code = main(["ablate", "--model", MODEL_DIR, "--tokens", "1,2,3", "--heads", "7"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--heads 7 is out of range" in err
    code = main(["ablate", "--model", MODEL_DIR, "--tokens", "1,2,3", "--method", "mean"])
    assert code == 2 and "needs --reference" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- left padding

PAD = 2  # row 1 of the padded batch is TOKENS[1, PAD:] after PAD padding slots


def padded_batch():
    tokens = TOKENS.copy()
    tokens[1, :PAD] = 0
    mask = np.ones_like(tokens)
    mask[1, :PAD] = 0
    return tokens, mask


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
@pytest.mark.parametrize("site, selected", [("mlp_out", {"positions": [1, 4]}), ("z", {"heads": [1]}),
                                            ("mlp_post", {"neurons": [3], "positions": [0]})])
def test_a_padded_row_is_ablated_at_its_token_positions(model, method, site, selected):
    """The padded row's result equals the same ablation of its prompt run alone: positions and per-position
    reference values follow the tokens, not the slots (before, position 1 of the padded row hit a padding
    slot and changed nothing)."""
    tokens, mask = padded_batch()
    reference = OTHER[:1]  # one reference row: resample draws it for every row
    kwargs = dict(site=site, layers=[1], method=method, keep=("logits",), **selected)
    if method != "zero":
        kwargs["reference"] = reference
    padded = ablation.ablate(model.params, tokens, model.config, attention_mask=mask, **kwargs)
    if method != "zero":  # the unpadded prompt is PAD shorter: so is its reference (causality: same values)
        kwargs["reference"] = reference[:, :-PAD]
    alone = ablation.ablate(model.params, TOKENS[1:, PAD:], model.config, **kwargs)
    np.testing.assert_allclose(padded.logits[1, PAD:], alone.logits[0], atol=1e-4)
    unpadded_row = ablation.ablate(model.params, TOKENS[:1], model.config,
                                   **{**kwargs, **({"reference": reference} if method != "zero" else {})})
    np.testing.assert_allclose(padded.logits[0], unpadded_row.logits[0], atol=1e-4)
    clean = model(TOKENS[1:, PAD:], keep=("logits",)).logits[0]
    assert np.abs(np.asarray(alone.logits[0]) - np.asarray(clean)).max() > 1e-3  # the ablation does something


def test_resampling_the_prompt_batch_never_draws_a_row_itself(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (8, 9)).astype(np.int32)
    values = model(tokens, keep=("mlp_out",)).mlp_out
    for seed in range(5):
        source = ablation.ablation_source(model.params, model.config, "mlp_out", "resample", seq=9, batch=8,
                                          reference=tokens, tokens=tokens, seed=seed)
        same = [bool(np.allclose(source[:, b], values[:, b])) for b in range(8)]
        assert not any(same), (seed, same)


def test_padding_that_cannot_be_followed_is_refused(model):
    tokens, mask = padded_batch()
    with pytest.raises(ValueError, match="key axis"):
        ablation.ablate(model.params, tokens, model.config, site="attn_pattern", method="mean",
                        reference=OTHER, attention_mask=mask)
    with pytest.raises(ValueError, match="sweep over positions of a left-padded batch"):
        ablation.ablation_sweep(model.params, tokens, model.config, site="mlp_out", axis="seq", answer=ANSWER,
                                attention_mask=mask)
