"""Sparse autoencoders: the pieces (top-k threshold, decoder-gradient projection, unit rows, resampling,
metrics, the splice into the forward, save/load) and the claim itself: trained on synthetic data made of known
sparse features in superposition, an SAE recovers the true dictionary."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt
from probes import sae as saes
from probes.sae import SAE, SAEConfig, SAEError
from tinygpt.params import param_shapes

CONFIG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=32, n_ctx=8, vocab_size=50)


def random_params(config, seed=0):
    """Random model parameters drawn with numpy (eager jax.random compiles once per shape)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        loc = 1.0 if path[-1].key.startswith("ln") and path[-1].key.endswith("_w") else 0.0
        return jnp.asarray(loc + (0.1 if loc else 0.2) * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def identity_sae(d: int, **kwargs) -> SAE:
    """An exact SAE: latents relu(x) and relu(-x), decoded by +I and -I."""
    eye = jnp.eye(d)
    params = {"W_enc": jnp.concatenate([eye, -eye], axis=1), "b_enc": jnp.zeros(2 * d),
              "W_dec": jnp.concatenate([eye, -eye], axis=0), "b_dec": jnp.zeros(d)}
    return SAE(SAEConfig(d_in=d, d_sae=2 * d, **kwargs), params)


# ---------------------------------------------------------------------------------------------- pieces


@given(st.integers(0, 10_000), st.sampled_from([1, 7, 24]))
def test_kth_largest_selects_what_top_k_selects(seed, k):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((5, 24)), jnp.float32)
    threshold = jax.jit(saes.kth_largest, static_argnums=1)(x, k)  # [5, 1]
    selected = np.asarray(x >= threshold)
    expected = np.zeros_like(selected)
    np.put_along_axis(expected, np.asarray(jax.lax.top_k(x, k)[1]), True, axis=-1)
    np.testing.assert_array_equal(selected, expected)


@given(st.integers(0, 10_000))
def test_decoder_gradient_projection_and_unit_rows(seed):
    rng = np.random.default_rng(seed)
    W = saes.unit_rows(jnp.asarray(rng.standard_normal((6, 5)), jnp.float32))
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, rtol=1e-6)
    g = saes.remove_parallel_component(jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), W)
    np.testing.assert_allclose((g * W).sum(-1), 0.0, atol=1e-6)


def test_topk_codes_have_at_most_k_active():
    config = SAEConfig(d_in=8, d_sae=32, kind="topk", k=3)
    params = saes.init_sae(config, seed=0)
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    f = jax.jit(saes.encode, static_argnames="config")(params, x, config)
    assert int(((f > 0).sum(-1) > 3).sum()) == 0 and bool((f >= 0).all())


def test_train_step_keeps_decoder_rows_unit_norm_and_counts_silence():
    config = SAEConfig(d_in=8, d_sae=16, kind="relu", lr=1e-2)
    params = saes.init_sae(config, seed=0)
    params["b_enc"] = jnp.where(jnp.arange(16) < 5, -1e4, 1e4)  # latents 0-4 never fire, the others always
    optimizer = optax.adam(config.lr)
    run_steps = saes.make_train_steps(config, optimizer)
    state, silent = optimizer.init(params), np.zeros(16, np.int32)
    xs = np.random.default_rng(1).standard_normal((3, 64, 8)).astype(np.float32)  # 3 steps
    params, state, silent, metrics = run_steps(params, state, silent, xs)
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(silent, [3] * 5 + [0] * 11)
    assert float(metrics["l0"]) == 11.0


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs():
    config = SAEConfig(d_in=4, d_sae=6, kind="relu")
    params = saes.init_sae(config, seed=0)
    optimizer = optax.adam(1e-3)
    state = jax.tree.map(np.ones_like, optimizer.init(params))  # nonzero moments
    x = np.zeros((10, 4), np.float32)
    x[3] = [0.0, 0.0, 5.0, 0.0]  # the only input with an error
    silent = np.array([0, config.dead_steps, 3, 0, config.dead_steps + 9, 0])  # latents 1 and 4 are dead
    new, new_state, silent = saes.resample_dead(params, state, silent, x, np.random.default_rng(2),
                                                optimizer=optimizer, config=config)
    np.testing.assert_array_equal(silent, [0, 0, 3, 0, 0, 0])
    for i in (1, 4):
        np.testing.assert_allclose(new["W_dec"][i], [0, 0, 1, 0], atol=1e-6)
        assert float(new["b_enc"][i]) == 0.0
    for i in (0, 2, 3, 5):
        np.testing.assert_array_equal(new["W_dec"][i], params["W_dec"][i])
        np.testing.assert_array_equal(new["W_enc"][:, i], params["W_enc"][:, i])
    mu = new_state[0].mu
    assert float(jnp.abs(mu["W_dec"][1]).max()) == 0.0 and float(jnp.abs(mu["W_enc"][:, 4]).max()) == 0.0
    assert float(jnp.abs(mu["W_dec"][0]).min()) > 0.0


def test_config_errors():
    with pytest.raises(SAEError, match="kind"):
        SAEConfig(d_in=4, d_sae=8, kind="batchtopk")
    with pytest.raises(SAEError, match="exceeds"):
        SAEConfig(d_in=4, d_sae=8, kind="topk", k=9)
    with pytest.raises(SAEError, match="expected"):
        saes.train_sae(np.zeros((100, 5), np.float32), SAEConfig(d_in=4, d_sae=8), progress=False)


def test_config_errors_name_the_argument_and_the_cli_names_its_flag():
    """The API names its argument ("steps must be ..."), not the class; the CLI says "--steps" instead,
    through one table per command (tinygpt.cli.common.cli_message)."""
    from tinygpt.cli.common import cli_message
    from tinygpt.cli.geometry import SAE_TRAIN_FLAGS

    with pytest.raises(SAEError) as e:
        SAEConfig(d_in=4, d_sae=8, steps=0)
    assert str(e.value) == "steps must be an integer >= 1, got 0" and e.value.argument == "steps"
    assert cli_message(e.value, SAE_TRAIN_FLAGS) == "--steps must be an integer >= 1, got 0"
    with pytest.raises(SAEError) as e:
        SAEConfig(d_in=4, d_sae=8, l1_coeff=float("nan"))
    assert cli_message(e.value, SAE_TRAIN_FLAGS) == "--l1 must be a finite number >= 0, got nan"
    with pytest.raises(SAEError, match="^batch_size 64 is more than the 10 activation rows$"):
        saes.train_sae(np.ones((10, 4), np.float32), SAEConfig(d_in=4, d_sae=8, batch_size=64), progress=False)
    for bad in ({"lr": 0.0}, {"d_sae": 2.5}, {"resample_every": -1}, {"site": "resid_middle", "layer": 0},
                {"site": "resid_post"}, {"site": "embed", "layer": 1}, {"site": "attn_pattern", "layer": 0}):
        with pytest.raises(SAEError):
            SAEConfig(**{"d_in": 4, "d_sae": 8, **bad})


# ---------------------------------------------------------------------------------------- dead latents


def test_resampling_revives_latents_when_every_latent_is_dead():
    """With no latent alive there is no 'mean alive encoder norm' to scale the new encoder columns by: they
    get norm 0.2 (x 1), not 0 (a zero column never fires, so the SAE stayed dead forever)."""
    config = SAEConfig(d_in=4, d_sae=6, kind="relu")
    params = saes.init_sae(config, seed=0)
    optimizer = optax.adam(1e-3)
    x = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    silent = np.full(6, config.dead_steps)  # every latent dead
    new, _, silent = saes.resample_dead(params, optimizer.init(params), silent, x, np.random.default_rng(2),
                                        optimizer=optimizer, config=config)
    np.testing.assert_allclose(np.linalg.norm(new["W_enc"], axis=0), 0.2, rtol=1e-5)
    f = saes.encode(new, x, config)  # [50, 6]
    assert bool((f > 0).any(axis=0).all())  # every latent fires again (on its own input at least)
    np.testing.assert_array_equal(silent, 0)


def test_training_stops_with_a_clear_error_when_every_latent_is_dead_for_good():
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    config = SAEConfig(d_in=8, d_sae=16, kind="relu", l1_coeff=1e4, lr=0.1, batch_size=64, steps=100, warmup_steps=0,
                       dead_steps=10, resample_every=0)
    with pytest.raises(SAEError, match="every latent of the SAE is dead at step 40 of 100 .* lower l1_coeff"):
        saes.train_sae(x, config, progress=False, log_every=20)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_of_an_exact_and_of_a_useless_sae():
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    exact = saes.evaluate(identity_sae(6), x, batch_size=128)  # 300 rows: a padded tail chunk
    assert exact.fve == pytest.approx(1.0, abs=1e-6) and exact.mse == pytest.approx(0.0, abs=1e-10)
    assert exact.l0 == pytest.approx(6.0) and exact.dead_fraction == 0.0
    silent = identity_sae(6)
    silent.params["b_enc"] = jnp.full(12, -100.0)
    useless = saes.evaluate(silent, x, batch_size=128)
    assert useless.l0 == 0.0 and useless.dead_fraction == 1.0 and useless.fve < 0.05


def test_loss_recovered_splices_the_reconstruction_into_the_forward():
    params = random_params(CONFIG)
    windows = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (5, 8))
    exact = identity_sae(CONFIG.d_model, site="resid_post", layer=0)
    result = saes.loss_recovered(params, CONFIG, exact, windows, batch=4)
    assert result.ce_sae == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.recovered == pytest.approx(1.0, abs=1e-3)
    zero = identity_sae(CONFIG.d_model, site="resid_post", layer=0)
    zero.params["b_enc"] = jnp.full(2 * CONFIG.d_model, -100.0)  # reconstructs zeros: the zero ablation
    result = saes.loss_recovered(params, CONFIG, zero, windows, batch=4)
    assert result.ce_sae == pytest.approx(result.ce_zero, abs=1e-5) and result.recovered == pytest.approx(0.0, abs=1e-3)
    assert result.ce_zero != pytest.approx(result.ce_clean, abs=1e-3)  # the ablation does change the loss
    # mean ablation: by default the site's mean over every token of the windows (not zeros)
    mean = np.asarray(tinygpt.forward(params, windows, CONFIG, keep=("resid_post",)).resid_post[0]).mean(axis=(0, 1))
    given = saes.loss_recovered(params, CONFIG, zero, windows, batch=4, mean_activation=mean)
    assert result.ce_mean == pytest.approx(given.ce_mean, abs=1e-5)
    assert result.ce_mean != pytest.approx(result.ce_zero, abs=1e-3)


def test_save_load_round_trip(tmp_path):
    sae = identity_sae(5, kind="topk", k=2, site="mlp_post", layer=1, input_scale=0.5)
    saes.save_sae(sae, tmp_path / "s.safetensors", extra={"model": "x"})
    loaded = saes.load_sae(tmp_path / "s.safetensors")
    assert loaded.config == sae.config
    for name in sae.params:
        np.testing.assert_array_equal(loaded.params[name], sae.params[name])
    assert saes.sae_extra(tmp_path / "s.safetensors") == {"model": "x"}
    from safetensors.numpy import save_file

    save_file({"W_enc": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SAEError, match="not an SAE"):
        saes.load_sae(tmp_path / "other.safetensors")
    with pytest.raises(SAEError, match="does not exist"):
        saes.load_sae(tmp_path / "missing.safetensors")


def write_sae_file(path, tensors=None, config=None, extra=None, raw_config=None):
    """An SAE file as tinygpt writes it, with parts replaced."""
    from tinygpt.files import save_safetensors

    sae = identity_sae(3, site="resid_post", layer=0)
    tensors = {name: np.asarray(value, np.float32) for name, value in sae.params.items()} if tensors is None else tensors
    fields = {**dataclasses.asdict(sae.config), **(config or {})}
    metadata = {saes.METADATA_KEY: raw_config if raw_config is not None else json.dumps(fields)}
    if extra is not None:
        metadata[saes.EXTRA_KEY] = extra
    save_safetensors(path, tensors, metadata)
    return path


GOOD = {name: np.asarray(value, np.float32) for name, value in identity_sae(3).params.items()}


@pytest.mark.parametrize("parts, message", [
    ({"raw_config": "{not json"}, "metadata 'tinygpt_sae_config' is not valid JSON"),
    ({"raw_config": "[1, 2]"}, "is not a JSON object"),
    ({"config": {"expansion": 8}}, "unknown SAEConfig key\\(s\\) 'expansion'"),
    ({"config": {"site": "resid_middle"}}, "unknown site 'resid_middle'"),
    ({"config": {"steps": "many"}}, "steps must be an integer >= 1, got 'many'"),
    ({"tensors": {**GOOD, "W_enc": np.full((3, 6), np.nan, np.float32)}}, "tensor W_enc has 18 non-finite values"),
    ({"tensors": {**GOOD, "W_enc": GOOD["W_dec"]}}, "tensor W_enc is float32 \\[6, 3\\], expected float32 \\[3, 6\\]"),
    ({"tensors": {**GOOD, "b_dec": GOOD["b_dec"].astype(np.float64)}}, "tensor b_dec is float64"),
    ({"tensors": {**GOOD, "W_extra": GOOD["b_dec"]}}, "holds tensors"),
    ({"extra": "{oops"}, "metadata 'tinygpt_sae_extra' is not valid JSON"),
])
def test_a_damaged_sae_file_is_one_clear_error(tmp_path, parts, message):
    path = write_sae_file(tmp_path / "s.safetensors", **parts)
    with pytest.raises(SAEError, match=message):
        saes.load_sae(path)


def test_an_sae_is_refused_on_another_model(tmp_path):
    from probes.harvest import fingerprint

    params, other = random_params(CONFIG), random_params(CONFIG, seed=1)
    sae = identity_sae(CONFIG.d_model, site="resid_post", layer=0)
    saes.save_sae(sae, tmp_path / "s.safetensors", extra={"model_fingerprint": fingerprint(params)})
    saes.load_sae(tmp_path / "s.safetensors", params)  # its own model
    with pytest.raises(SAEError, match="was made from another model \\(model fingerprint [0-9a-f]{16}; this model's"):
        saes.load_sae(tmp_path / "s.safetensors", other)


def test_saving_is_atomic_and_deterministic(tmp_path, monkeypatch):
    """The file appears whole or not at all, whatever the safetensors version (the bytes are written by
    tinygpt.files, not by safetensors' save_file); the same SAE gives the same bytes, keys sorted."""
    x = np.random.default_rng(0).standard_normal((512, 6)).astype(np.float32)
    config = SAEConfig(d_in=6, d_sae=12, kind="topk", k=3, batch_size=64, steps=20, warmup_steps=5, site="mlp_out",
                       layer=1)
    first, _ = saes.train_sae(x, config, progress=False, log_every=10)
    second, _ = saes.train_sae(x, config, progress=False, log_every=10)
    extra = {"model": "m", "harvest": "h", "model_fingerprint": "0123456789abcdef"}
    saes.save_sae(first, tmp_path / "a.safetensors", extra=extra)
    saes.save_sae(second, tmp_path / "b.safetensors", extra=dict(reversed(extra.items())))
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])

    import os

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saes.save_sae(identity_sae(6), tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == data  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left


# ---------------------------------------------------------------------------------- recovery in superposition


@pytest.fixture(scope="module")
def superposed():
    """64 true features in 32 dims, each active with probability 0.05 (about 3 per input)."""
    return saes.synthetic_superposition(64, 32, 20_000, p_active=0.05, seed=0)


@pytest.mark.parametrize("kind, extra", [("relu", {"l1_coeff": 2.0, "steps": 3000}),
                                          ("topk", {"k": 4, "steps": 1000})])
def test_sae_recovers_features_in_superposition(superposed, kind, extra):
    x, dictionary, codes = superposed
    config = SAEConfig(d_in=32, d_sae=128, kind=kind, batch_size=256, lr=3e-3, warmup_steps=50, dead_steps=100,
                       resample_every=500, **extra)
    sae, history = saes.train_sae(x, config, progress=False)
    recovery = saes.max_cosines(dictionary, sae.params["W_dec"])  # [64]
    assert recovery.mean() >= 0.95 and (recovery > 0.9).mean() >= 0.9
    random_recovery = saes.max_cosines(dictionary, np.random.default_rng(123).standard_normal((128, 32)))
    assert random_recovery.mean() < 0.7  # what chance alone gives
    metrics = saes.evaluate(sae, x)
    assert metrics.fve > 0.6 and metrics.l0 < 12 and metrics.dead_fraction < 0.2
    assert history[-1]["step"] == config.steps and dataclasses.replace(config, input_scale=sae.config.input_scale) \
        == sae.config
