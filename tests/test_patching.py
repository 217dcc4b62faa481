"""probes.patching: activation patching's invariants (no-ops before the first difference, full recovery from
the one differing embedding, noising mirrors denoising), the sweeps against single patched runs, attribution
patching converging to exact patching as the corruption shrinks, errors, and `tinygpt patch`.

On the committed tiny checkpoint; the CLI test uses the same prompt pair and arguments as the sweeps, so
their compiled programs are shared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import tinygpt
from conftest import GOLDEN_DIR
from probes import metrics, patching
from tinygpt.cli import main

TOL = 1e-5
MODEL_DIR = str(GOLDEN_DIR / "tiny")
CLEAN = np.array([[5, 17, 3, 40, 22, 9, 31, 12]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[0, 3] = 50  # one token differs, at position 3
ANSWER, WRONG = 3, 11


@pytest.fixture(scope="module")
def model():
    return tinygpt.load(MODEL_DIR)


def logit_diff(logits):
    return float(metrics.logit_diff(logits[:, -1], ANSWER, WRONG).mean())


@pytest.fixture(scope="module")
def by_position(model):
    return patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, site="resid_pre", answer=ANSWER,
                                   wrong=WRONG)


def test_clean_and_corrupt_metrics(model, by_position):
    assert by_position.clean == pytest.approx(logit_diff(model(CLEAN).logits), abs=TOL)
    assert by_position.corrupt == pytest.approx(logit_diff(model(CORRUPT).logits), abs=TOL)
    assert abs(by_position.clean - by_position.corrupt) > 0.05  # the pair is informative


def test_position_sweep_invariants(by_position):
    recovery = by_position.recovery  # [layer, position]
    np.testing.assert_allclose(recovery[:, :3], 0, atol=1e-4)  # before the differing token: nothing to patch
    assert recovery[0, 3] == pytest.approx(1, abs=1e-4)  # the differing token's whole input: all of it
    np.testing.assert_allclose(recovery[0, 4:], 0, atol=1e-4)  # at layer 0 later inputs are not yet affected


def test_position_sweep_equals_single_patches(model, by_position):
    for layer, position in [(1, 3), (2, 5), (2, 7)]:
        patched = patching.patch(model.params, CLEAN, CORRUPT, model.config, "resid_pre", layers=[layer],
                                 positions=[position])
        assert by_position.values[layer, position] == pytest.approx(logit_diff(patched.logits), abs=TOL)


def test_head_sweep_noising_equals_single_patches(model):
    result = patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, site="z", by="head",
                                     direction="noise", answer=ANSWER, wrong=WRONG)
    assert result.values.shape == (3, 3)
    for layer, head in [(0, 0), (1, 2)]:
        patched = patching.patch(model.params, CLEAN, CORRUPT, model.config, "z", layers=[layer], heads=[head],
                                 direction="noise")
        assert result.values[layer, head] == pytest.approx(logit_diff(patched.logits), abs=TOL)


def test_patching_a_whole_residual_stream_gives_the_clean_run(model):
    """by="layer" on resid_pre puts the clean run's entire block input in: from there on it is the clean run,
    so KL(clean || patched) is 0 at every layer."""
    result = patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, site="resid_pre", by="layer",
                                     metric="kl")
    assert result.values.shape == (3, 1) and result.corrupt > 1e-3
    assert result.clean == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(result.values, 0, atol=1e-6)
    np.testing.assert_allclose(result.recovery, 1, atol=1e-4)


# ------------------------------------------------------------------------------------------- attribution


def nudged(model, scale: float):
    """The model with token 50's embedding moved to token 17's plus `scale` x a fixed random direction, so
    the corrupted prompt (token 50 at position 3) differs from one with token 17 there by O(scale). The
    unembedding moves with it; the metric reads tokens 3 and 11 only."""
    direction = np.random.default_rng(0).standard_normal(model.config.d_model)
    wte = np.asarray(model.params["wte"]).copy()
    wte[50] = wte[17] + scale * direction / np.linalg.norm(direction) * np.linalg.norm(wte[17])
    return {**model.params, "wte": wte}


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_converges_to_exact_patching(model, direction):
    """Attribution patching is the first-order Taylor expansion of patching around the run being patched
    (the corrupted one when denoising, the clean one when noising): its error against the exact sweep
    shrinks like the corruption squared (relative error like the corruption) as the corrupted activations
    approach the clean ones. It is exactly 0 where nothing differs."""
    clean = CLEAN.copy()
    clean[0, 3] = 17
    errors = []
    for scale in (0.1, 0.01):
        params = nudged(model, scale)
        estimate = patching.attribution_patching(params, clean, CORRUPT, model.config, sites=("resid_pre",),
                                                 answer=ANSWER, wrong=WRONG, direction=direction)
        exact = patching.patching_sweep(params, clean, CORRUPT, model.config, site="resid_pre", answer=ANSWER,
                                        wrong=WRONG, direction=direction)
        base, source = (exact.corrupt, exact.clean) if direction == "denoise" else (exact.clean, exact.corrupt)
        effect = exact.values - base  # [layer, position]
        approx = estimate.by("resid_pre", "seq")
        assert np.abs(approx[:, :3]).max() == 0  # the prompts agree there: no difference to patch
        assert estimate.base == pytest.approx(base, abs=TOL)
        assert estimate.source == pytest.approx(source, abs=TOL)
        errors.append(np.abs(approx - effect).max() / np.abs(effect).max())
    assert errors[1] < 0.02 and errors[1] < errors[0] / 5, errors


def test_attribution_by_head_and_layer_sum_the_elements(model):
    result = patching.attribution_patching(model.params, CLEAN, CORRUPT, model.config, sites=("z",),
                                           answer=ANSWER, wrong=WRONG)
    elements = result.elements["z"]  # [layer, seq, head, d_head]
    np.testing.assert_allclose(result.by("z", "head"), elements.sum(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(result.by_layer("z"), elements.sum(axis=(1, 2, 3)), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ errors


def test_errors(model):
    with pytest.raises(ValueError, match="same shape"):
        patching.patching_sweep(model.params, CLEAN, CORRUPT[:, :5], model.config, answer=ANSWER, wrong=WRONG)
    with pytest.raises(ValueError, match="needs the wrong token"):
        patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, answer=ANSWER)
    with pytest.raises(ValueError, match="unknown granularity"):
        patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, by="token", answer=ANSWER, wrong=WRONG)
    with pytest.raises(ValueError, match="no axis 'head'"):
        patching.patching_sweep(model.params, CLEAN, CORRUPT, model.config, site="mlp_out", by="head",
                                answer=ANSWER, wrong=WRONG)
    with pytest.raises(ValueError, match="unknown direction"):
        patching.patch(model.params, CLEAN, CORRUPT, model.config, "z", direction="sideways")
    with pytest.raises(ValueError, match="zero gradient: every estimate would be 0"):
        patching.attribution_patching(model.params, CLEAN, CORRUPT, model.config, metric="kl", direction="noise")


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_patch(capsys, tmp_path):
    ids = lambda t: ",".join(map(str, t[0]))  # noqa: E731
    argv = ["patch", "--model", MODEL_DIR, "--clean-tokens", ids(CLEAN), "--corrupt-tokens", ids(CORRUPT),
            "--answer-id", str(ANSWER), "--wrong-id", str(WRONG), "--site", "resid_pre"]
    plot = tmp_path / "patch.png"
    assert main(argv + ["--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"clean_metric", "corrupt_metric", "results", "layers", "units", "metric", "direction"} <= out.keys()
    assert np.shape(out["results"]["resid_pre"]["recovery"]) == (3, 8) and plot.stat().st_size > 0
    assert main(argv) == 0 and "normalised recovery" in capsys.readouterr().out
    code = main(["patch", "--model", MODEL_DIR, "--clean-tokens", "1,2,3", "--corrupt-tokens", "1,2"])
    assert code == 2 and "same length" in capsys.readouterr().err
