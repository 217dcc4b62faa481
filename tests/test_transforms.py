"""Weight transforms: folding LayerNorm and centering writing weights leave the logits unchanged; centering
the unembedding shifts each position's logits by one constant (the documented shift)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

import tinygpt
from probes import transforms
from test_lens import CFG, KEEP, random_params, random_tokens, seeds



def run(params, tokens):
    return tinygpt.forward(params, tokens, CFG, keep=KEEP)


@settings(max_examples=5)
@given(seed=seeds)
def test_fold_layer_norm_keeps_every_value_after_the_reading_matrices(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    original = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    folded_params = transforms.fold_layer_norm(params)
    folded = run(folded_params, tokens)
    for name in ("q", "k", "v", "mlp_pre", "resid_post", "logits"):
        np.testing.assert_allclose(folded[name], original[name], rtol=1e-4, atol=1e-4, err_msg=name)
    blocks = folded_params["blocks"]
    for name in ("ln1_w", "ln2_w"):
        np.testing.assert_array_equal(blocks[name], 1.0)
    for name in ("ln1_b", "ln2_b"):
        np.testing.assert_array_equal(blocks[name], 0.0)
    np.testing.assert_array_equal(folded_params["lnf_w"], 1.0)
    np.testing.assert_array_equal(folded_params["lnf_b"], 0.0)
    # the final LayerNorm output is now pure normalisation, (x - mean) / scale: zero mean, unit variance
    ln_final = np.asarray(folded.ln_final, np.float64)
    np.testing.assert_allclose(ln_final.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ln_final.var(-1), 1.0, rtol=1e-3)


@settings(max_examples=5)
@given(seed=seeds)
def test_center_writing_weights_keeps_logits_and_centers_the_residual(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    original = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    centered_params = transforms.center_writing_weights(params)
    centered = run(centered_params, tokens)
    np.testing.assert_allclose(centered.logits, original.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(centered.ln_final, original.ln_final, rtol=1e-4, atol=1e-4)
    resid = np.asarray(centered.resid_post, np.float64)
    np.testing.assert_allclose(resid.mean(-1), 0.0, atol=1e-4)
    # the residual itself changed by exactly its mean
    expected = np.asarray(original.resid_post, np.float64)
    np.testing.assert_allclose(resid, expected - expected.mean(-1, keepdims=True), rtol=1e-4, atol=1e-4)
    for name in ("W_O", "b_O", "W_out", "b_out"):
        np.testing.assert_allclose(np.asarray(centered_params["blocks"][name]).mean(-1), 0.0, atol=1e-6)

    both = run(transforms.center_writing_weights(transforms.fold_layer_norm(params)), tokens)
    np.testing.assert_allclose(both.logits, original.logits, rtol=1e-4, atol=1e-4)


@settings(max_examples=5)
@given(seed=seeds)
def test_center_unembedding_shifts_each_positions_logits_by_their_mean(seed):
    params, tokens = random_params(seed), random_tokens(seed)
    original = np.asarray(tinygpt.forward(params, tokens, CFG, keep=KEEP).logits, np.float64)
    shifted = np.asarray(run(transforms.center_unembedding(params), tokens).logits, np.float64)
    # documented shift: minus the mean logit of the original model at that position
    np.testing.assert_allclose(shifted, original - original.mean(-1, keepdims=True), rtol=1e-4, atol=1e-4)
    assert np.abs(original.mean(-1)).max() > 1e-3  # a real shift, not zero by accident


def test_untied_params_run_like_tied_ones_and_logit_edits_apply():
    params, tokens = random_params(3), random_tokens(3)
    untied = transforms.untie_unembedding(params)
    assert untied["W_U"].shape == (CFG.d_model, CFG.vocab_size) and untied["b_U"].shape == (CFG.vocab_size,)
    assert transforms.untie_unembedding(untied) is untied
    original = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    np.testing.assert_allclose(run(untied, tokens).logits, original.logits, rtol=1e-5, atol=1e-5)
    shift = jax.jit(lambda p, t: tinygpt.forward(p, t, CFG, keep=("logits",), edits={"logits": lambda x, _: x + 1}))
    shifted = shift(untied, tokens)
    np.testing.assert_allclose(shifted.logits, original.logits + 1.0, rtol=1e-5, atol=1e-5)
    assert shifted.kept() == ("logits",)


def test_unembedding_matrix_and_bias_give_the_logits_from_normalised_residual():
    params, tokens = random_params(4), random_tokens(4)
    trace = tinygpt.forward(params, tokens, CFG, keep=KEEP)
    x = np.asarray(trace.resid_post[-1], np.float64)
    normalised = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + CFG.ln_eps)
    for p in (params, transforms.fold_layer_norm(params)):
        logits = normalised @ np.asarray(transforms.unembedding_matrix(p)) + np.asarray(transforms.unembedding_bias(p))
        np.testing.assert_allclose(logits, trace.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(transforms.unembedding_bias(params),
                               jnp.asarray(params["wte"]) @ params["lnf_b"], rtol=1e-5, atol=1e-6)


def test_every_path_unembeds_through_an_explicit_unembedding():
    """Folded and centered params carry W_U, b_U; generation, the sweeps, the lens and the SAE loss give the
    original model's answers on them (before, paths that unembedded with wte.T were silently wrong)."""
    from probes import ablation, lens, sae

    params, tokens = random_params(5), random_tokens(5)
    transformed = transforms.center_writing_weights(transforms.fold_layer_norm(params))
    assert "W_U" in transformed
    original = tinygpt.generate(params, CFG, tokens[:, :6], 5, temperature=0.0, return_logits=True)
    same = tinygpt.generate(transformed, CFG, tokens[:, :6], 5, temperature=0.0, return_logits=True)
    np.testing.assert_array_equal(same.tokens, original.tokens)
    np.testing.assert_allclose(same.logits, original.logits, rtol=1e-4, atol=1e-4)
    answer = tokens[:, -1]
    expected = ablation.ablation_sweep(params, tokens, CFG, answer=answer)  # unembeds the read position only
    sweep = ablation.ablation_sweep(transformed, tokens, CFG, answer=answer)
    np.testing.assert_allclose(sweep.values, expected.values, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sweep.baseline, expected.baseline, rtol=1e-4, atol=1e-4)
    lens_original = lens.logit_lens(params, CFG, tokens, target=tokens)
    lens_transformed = lens.logit_lens(transformed, CFG, tokens, target=tokens)
    np.testing.assert_allclose(lens_transformed.target_probs, lens_original.target_probs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.next_token_loss(transformed, tokens, CFG), sae.next_token_loss(params, tokens, CFG),
                               rtol=1e-5, atol=1e-5)
    # the centered unembedding moves every logit of a position by one constant: log-probs are unchanged
    centered = transforms.center_unembedding(transformed)
    np.testing.assert_allclose(sae.next_token_loss(centered, tokens, CFG), sae.next_token_loss(params, tokens, CFG),
                               rtol=1e-5, atol=1e-5)


def test_an_explicit_unembedding_is_checked_whole():
    from tinygpt.params import check_params

    params = transforms.untie_unembedding(random_params(6))
    check_params(params, CFG)
    with np.testing.assert_raises_regex(ValueError, "missing 'b_U'"):
        check_params({k: v for k, v in params.items() if k != "b_U"}, CFG)
    with np.testing.assert_raises_regex(ValueError, r"\['W_U'\] has shape \(61, 24\)"):
        check_params({**params, "W_U": params["W_U"].T}, CFG)
