"""SAELens SAEs both ways (probes.saelens): golden directories written by sae-lens itself and its encode /
decode / forward of fixed inputs (tests/golden/saelens, made by tests/make_saelens_golden.py) against
tinygpt's, every cfg.json field tinygpt cannot honour refused in one line, every TransformerLens hook name of
the site table mapped, `sae eval` and `polysemantic --sae` on a SAELens directory, and, where sae-lens is
installed beside the project, the same comparisons live both ways (sae-lens writes, tinygpt reads; tinygpt
writes, sae-lens' own loader reads)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import tinygpt
from probes import sae as saes
from probes.sae import SAE, SAEConfig, SAEError
from probes.saelens import CFG_FILE, WEIGHTS_FILE, load_any, load_saelens, read_site, save_saelens
from tinygpt.cli import main
from tinygpt.sites import SITES, TL_NAMES, tl_name

from conftest import GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "saelens"
CASES = sorted(path.name for path in GOLDEN.iterdir() if path.is_dir())
TOLERANCE = 1e-5
SAELENS_PATH = Path(os.environ.get("TINYGPT_SAELENS_PATH", "/work/.saelens-target"))
INSTALL = ('pip install --no-deps --target /work/.saelens-target sae-lens "transformer-lens>=2.16.1,<3" better-abc '
           'simple-parsing docstring-parser (or set TINYGPT_SAELENS_PATH to such a target)')


def outputs(sae: SAE, x, g) -> dict[str, np.ndarray]:
    """tinygpt's encode(x), decode(g) (with x's normalisation undone) and reconstruction of x."""
    return {"encode": np.asarray(saes.encode(sae.params, x, sae.config)),
            "decode": np.asarray(saes.decode(sae.params, g, sae.config, x)),
            "forward": np.asarray(saes.reconstruct(sae.params, x, sae.config))}


def assert_outputs_close(ours: dict, theirs: dict, label: str) -> None:
    for name in ("encode", "decode", "forward"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOLERANCE, err_msg=f"{label}: {name}")


def random_sae(kind: str, d_in: int, d_sae: int, site: str, layer, seed: int = 0, **fields) -> SAE:
    """An SAE of `kind` with every tensor random (thresholds positive)."""
    config = SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, site=site, layer=layer, seed=seed, **fields)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape) * (d_in**-0.5 if name == "W_enc" else 0.3)
              for name, shape in saes.param_shapes(config).items()}
    if "threshold" in params:
        params["threshold"] = np.abs(params["threshold"])
    return SAE(config, {name: jnp.asarray(value, jnp.float32) for name, value in params.items()},
               {"model": "random", "harvest": "none"})


def copy_case(case: str, tmp_path: Path) -> Path:
    directory = tmp_path / case
    shutil.copytree(GOLDEN / case, directory)
    return directory


# ------------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", CASES)
def test_golden_saelens_directories_compute_what_saelens_computes(case):
    expected = load_file(str(GOLDEN / case / "expected.safetensors"))
    sae = load_any(GOLDEN / case)  # load_any recognises the directory by its cfg.json
    ours = outputs(sae, expected["x"], expected["g"])
    assert_outputs_close(ours, expected, case)
    assert 0 < (ours["encode"] > 0).mean() < 1  # some latents fire, not all: the comparison means something


def test_golden_cases_cover_every_architecture_and_format():
    kinds = {load_any(GOLDEN / case).config.kind for case in CASES}
    norms = {load_any(GOLDEN / case).config.input_norm for case in CASES}
    assert kinds == set(saes.KINDS) and norms == set(saes.INPUT_NORMS)
    legacy = json.loads((GOLDEN / "shakespeare_resid" / CFG_FILE).read_text())
    assert "hook_point" in legacy and "metadata" not in legacy  # the 3.x form
    assert sum(path.stat().st_size for path in GOLDEN.rglob("*") if path.is_file()) < 1_000_000


def test_golden_reads_hook_z_flattened_and_the_legacy_fields():
    z = load_any(GOLDEN / "hook_z")
    assert (z.config.site, z.config.layer, z.config.d_in) == ("z", 1, 32)
    legacy = load_any(GOLDEN / "shakespeare_resid")
    assert (legacy.config.kind, legacy.config.site, legacy.config.layer) == ("relu", "resid_pre", 1)
    assert legacy.info["saelens"]["model_name"] == "tinygpt-shakespeare"
    topk = load_any(GOLDEN / "legacy_topk_5x")
    assert (topk.config.kind, topk.config.k, topk.config.site, topk.config.layer) == ("topk", 3, "mlp_out", 2)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_a_saelens_directory(case, tmp_path):
    sae = load_any(GOLDEN / case)
    save_saelens(sae, tmp_path / "sae")
    again = load_saelens(tmp_path / "sae")
    assert again.config == sae.config
    for name, value in sae.params.items():
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(value), err_msg=name)
    for name in ("model_name", "context_size", "prepend_bos"):
        assert again.info["saelens"].get(name) == sae.info["saelens"].get(name)


def test_tinygpt_round_trip_keeps_config_provenance_and_function(tmp_path):
    sae = random_sae("topk", 16, 32, "resid_post", 1, k=4, input_scale=0.37, l1_coeff=0.5, steps=77)
    sae.info = {"model": "embedded", "model_fingerprint": "0123abcd", "harvest": "/tmp/h"}
    save_saelens(sae, tmp_path / "sae")
    again = load_saelens(tmp_path / "sae")
    assert again.config == dataclasses.replace(sae.config, input_scale=1.0)  # the scale is folded in
    assert {k: v for k, v in again.info.items() if k != "saelens"} == sae.info
    x = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    g = np.abs(np.random.default_rng(2).standard_normal((9, 32))).astype(np.float32)
    assert_outputs_close(outputs(again, x, g), outputs(sae, x, g), "folded input scale")


@settings(max_examples=8)  # each example saves, loads and runs two SAEs eagerly: about 0.5 s
@given(kind=st.sampled_from(saes.KINDS), norm=st.sampled_from(saes.INPUT_NORMS), apply_b_dec=st.booleans(),
       scale=st.sampled_from([1.0, 0.25, 3.0]), site=st.sampled_from(["resid_pre", "z", "mlp_post", "embed"]),
       seed=st.integers(0, 1000))
def test_any_sae_survives_tinygpt_saelens_tinygpt(kind, norm, apply_b_dec, scale, site, seed, tmp_path_factory):
    sae = random_sae(kind, 16, 24, site, None if site == "embed" else 0, seed=seed, input_norm=norm,
                     apply_b_dec_to_input=apply_b_dec, input_scale=scale if norm == "none" else 1.0,
                     **({"k": 6} if kind == "topk" else {}))
    directory = tmp_path_factory.mktemp("sae") / "sae"
    save_saelens(sae, directory)
    again = load_saelens(directory)
    assert again.config == dataclasses.replace(sae.config, input_scale=1.0)
    x, g = live_inputs(16, 24, site, seed)
    assert_outputs_close(outputs(again, x, g), outputs(sae, x, g), f"{kind} {norm} {apply_b_dec} {scale}")


@pytest.mark.parametrize("kind", saes.KINDS)
def test_tinygpt_format_round_trip_of_every_kind(kind, tmp_path):
    extra = {"k": 3} if kind == "topk" else {}
    sae = random_sae(kind, 8, 12, "mlp_out", 0, apply_b_dec_to_input=kind != "gated",
                     input_norm="layer_norm" if kind == "jumprelu" else "none", **extra)
    saes.save_sae(sae, tmp_path / "sae.safetensors")
    again = load_any(tmp_path / "sae.safetensors")  # a file: tinygpt's format
    assert again.config == sae.config and sorted(again.params) == sorted(sae.params)
    for name, value in sae.params.items():
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(value, np.float32), err_msg=name)
    x, g = live_inputs(8, 12, "mlp_out", 0)
    ours, theirs = outputs(again, x, g), outputs(sae, x, g)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_a_trained_kind_saves_the_same_bytes_as_before_the_saelens_fields(tmp_path):
    """relu and topk SAEs with the new fields at their defaults save the config JSON they saved before the
    fields existed (the same keys, so the same sorted JSON and the same file bytes)."""
    from safetensors import safe_open

    saes.save_sae(random_sae("relu", 8, 12, "mlp_out", 0), tmp_path / "sae.safetensors")
    with safe_open(str(tmp_path / "sae.safetensors"), framework="numpy") as f:
        saved = json.loads(f.metadata()[saes.METADATA_KEY])
    assert set(saved) == {f.name for f in dataclasses.fields(SAEConfig)} - set(saes.LATER_FIELDS)


def test_decode_with_a_per_token_norm_needs_the_input():
    sae = load_any(GOLDEN / "layer_norm")
    with pytest.raises(SAEError, match="needs the input x"):
        saes.decode(sae.params, np.zeros((1, sae.config.d_sae), np.float32), sae.config)


def test_legacy_tensors_are_folded(tmp_path):
    directory = copy_case("jumprelu", tmp_path)
    expected = load_file(str(directory / "expected.safetensors"))
    tensors = load_file(str(directory / WEIGHTS_FILE))
    scale = np.linspace(0.5, 2.0, len(tensors["b_enc"])).astype(np.float32)  # [d_sae]
    tensors["log_threshold"] = np.log(tensors.pop("threshold"))
    tensors["scaling_factor"], tensors["W_dec"] = scale, tensors["W_dec"] / scale[:, None]
    save_file(tensors, str(directory / WEIGHTS_FILE))
    sae = load_saelens(directory)
    assert_outputs_close(outputs(sae, expected["x"], expected["g"]), expected, "log_threshold, scaling_factor")


@pytest.mark.parametrize("dtype, code", [("bfloat16", "BF16"), ("float16", "F16"), ("float64", "F64")])
def test_other_float_weights_are_read_as_float32(dtype, code, tmp_path):
    import ml_dtypes

    directory = copy_case("standard", tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rounded = {name: value.astype(kind) for name, value in tensors.items()}
    header = {name: {"dtype": code, "shape": list(value.shape)} for name, value in rounded.items()}
    offset, data = 0, b""
    for name, value in rounded.items():
        header[name]["data_offsets"] = [offset, offset + value.nbytes]
        offset, data = offset + value.nbytes, data + value.tobytes()
    text = json.dumps(header).encode()
    (directory / WEIGHTS_FILE).write_bytes(len(text).to_bytes(8, "little") + text + data)
    sae = load_saelens(directory)
    for name, value in rounded.items():
        np.testing.assert_array_equal(np.asarray(sae.params[name]), value.astype(np.float32))


@pytest.mark.parametrize("mode", ["expected_average_only_in", True, False, None, "none"])
def test_normalisations_that_are_the_identity_when_used(mode, tmp_path):
    """SAELens applies no normalisation at inference for these (3.x's true is expected_average_only_in,
    whose scale SAELens folds into the weights when training ends)."""
    directory = copy_case("standard", tmp_path)
    rewrite_cfg(directory, normalize_activations=mode)
    expected = load_file(str(directory / "expected.safetensors"))
    sae = load_saelens(directory)
    assert sae.config.input_norm == "none"
    assert_outputs_close(outputs(sae, expected["x"], expected["g"]), expected, str(mode))


# ------------------------------------------------------------------------------------------------- errors

# (field, value, what the one-line error says besides the field and the file)
BAD_FIELDS = [
    ("architecture", "batchtopk", "tinygpt reads standard"),
    ("architecture", "transcoder", "tinygpt reads standard"),
    ("activation_fn_str", "tanh-relu", "tinygpt reads relu"),
    ("hook_name", "blocks.0.hook_mlp_in", "no tinygpt site"),
    ("hook_name", "blocks.0.attn.hook_pattern", "not one vector per token"),
    ("hook_name", "blocks.x.hook_resid_pre", "no tinygpt site"),
    ("hook_name", None, "TransformerLens hook name"),
    ("hook_layer", 3, "is layer 0"),
    ("hook_head_index", 2, "one head's slice"),
    ("reshape_activations", "hook_z", "'hook_z' for attn.hook_z"),
    ("normalize_activations", "covariance_whitening", "tinygpt reads none"),
    ("dtype", "int8", "tinygpt reads float32"),
    ("dtype", "torch.complex64", "tinygpt reads float32"),
    ("d_in", 0, "integer >= 1"),
    ("d_in", "16", "integer >= 1"),
    ("d_sae", -32, "integer >= 1"),
    ("apply_b_dec_to_input", "yes", "true or false"),
    ("tinygpt_training", {"l1": 1}, "expected an object of"),
]


def rewrite_cfg(directory: Path, **changes) -> None:
    """Set (or, with value ..., remove) cfg.json fields, at the top level or in its metadata where they are."""
    cfg = json.loads((directory / CFG_FILE).read_text())
    for name, value in changes.items():
        holder = cfg["metadata"] if name in cfg.get("metadata", {}) or name.startswith("hook") else cfg
        if value is ...:
            holder.pop(name, None)
        else:
            holder[name] = value
    (directory / CFG_FILE).write_text(json.dumps(cfg))


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("field, value, says", BAD_FIELDS)
def test_each_unsupported_cfg_field_is_one_line_naming_field_and_file(field, value, says, tmp_path):
    directory = copy_case("standard", tmp_path)
    rewrite_cfg(directory, **{field: value})
    with pytest.raises(SAEError) as error:
        load_saelens(directory)
    assert_one_line(error, repr(field.removesuffix("_str")), str(directory / CFG_FILE), says)


@pytest.mark.parametrize("k", [0, 49, "5"])
def test_a_bad_top_k_names_k(k, tmp_path):
    directory = copy_case("topk", tmp_path)
    rewrite_cfg(directory, k=k)
    with pytest.raises(SAEError) as error:
        load_saelens(directory)
    assert_one_line(error, "k", str(directory / CFG_FILE))


@pytest.mark.parametrize("field", ["d_in", "d_sae", "hook_name"])
def test_a_missing_field_is_named(field, tmp_path):
    directory = copy_case("standard", tmp_path)
    rewrite_cfg(directory, **{field: ...})
    with pytest.raises(SAEError) as error:
        load_saelens(directory)
    assert_one_line(error, repr(field), str(directory / CFG_FILE))


def test_an_sae_of_another_model_is_refused_with_the_model():
    params = tinygpt.load().params  # the embedded model: 2 layers, d_model 128
    with pytest.raises(SAEError) as error:
        load_any(GOLDEN / "standard", params)  # d_in 16 on resid_pre
    assert_one_line(error, "'d_in'", "is 16", "128 wide")
    with pytest.raises(SAEError) as error:
        load_any(GOLDEN / "legacy_topk_5x", params)  # blocks.2
    assert_one_line(error, "'hook_name'", "2 layers")
    assert load_any(GOLDEN / "shakespeare_resid", params).config.d_in == 128


def damage(tensors: dict, how: str) -> dict:
    """The weights with one thing wrong."""
    tensors = dict(tensors)
    if how == "missing":
        del tensors["b_enc"]
    elif how == "extra":
        tensors["b_mag"] = tensors["b_enc"]
    elif how == "shape":
        tensors["W_dec"] = tensors["W_dec"][:, :-1].copy()
    elif how == "nan":
        tensors["b_dec"] = np.full_like(tensors["b_dec"], np.nan)
    elif how == "integer":
        tensors["b_enc"] = tensors["b_enc"].astype(np.int32)
    return tensors


@pytest.mark.parametrize("how, says", [("missing", "expected ['W_dec', 'W_enc', 'b_dec', 'b_enc']"),
                                       ("extra", "expected ['W_dec', 'W_enc', 'b_dec', 'b_enc']"),
                                       ("shape", "expected float32 [32, 16]"), ("nan", "non-finite"),
                                       ("integer", "I32; tinygpt reads F32"), ("truncated", "truncated"),
                                       ("empty", "not a safetensors file"), ("absent", "does not exist")])
def test_bad_weights_are_one_line_naming_the_file(how, says, tmp_path):
    directory = copy_case("standard", tmp_path)
    weights = directory / WEIGHTS_FILE
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "absent":
        weights.unlink()
    else:
        save_file(damage(load_file(str(weights)), how), str(weights))
    with pytest.raises(SAEError) as error:
        load_saelens(directory)
    assert_one_line(error, str(weights), says)


def test_cfg_that_is_not_an_object_is_one_line(tmp_path):
    directory = copy_case("standard", tmp_path)
    for text in ("[1, 2]", "{not json", '{"metadata": 3}'):
        (directory / CFG_FILE).write_text(text)
        with pytest.raises(SAEError) as error:
            load_saelens(directory)
        assert_one_line(error, str(directory / CFG_FILE))


# ---------------------------------------------------------------------------------------------- hook names


def test_every_hook_name_of_the_site_table_maps_to_its_site_and_layer():
    for site in TL_NAMES:
        for layer in (range(12) if SITES[site].per_layer else [None]):
            hook = tl_name(site, layer)
            if SITES[site].shape[:2] == ("batch", "seq"):
                assert read_site({"hook_name": hook, "hook_layer": layer}, "cfg") == (site, layer)
            else:  # attention scores and patterns: one vector per (query, key), no SAE reads them
                with pytest.raises(SAEError, match="not one vector per token"):
                    read_site({"hook_name": hook}, "cfg")


@pytest.mark.parametrize("site", [s for s in TL_NAMES if SITES[s].shape[:2] == ("batch", "seq")])
def test_save_writes_the_hook_name_of_the_site(site, tmp_path):
    layer = 1 if SITES[site].per_layer else None
    save_saelens(random_sae("relu", 8, 16, site, layer), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / CFG_FILE).read_text())
    assert cfg["metadata"]["hook_name"] == tl_name(site, layer)
    assert cfg["reshape_activations"] == ("hook_z" if site == "z" else "none")
    assert (load_saelens(tmp_path / "sae").config.site, load_saelens(tmp_path / "sae").config.layer) == (site, layer)


# ------------------------------------------------------------------------------------------------- writing


def test_save_replaces_an_sae_directory_and_refuses_anything_else(tmp_path):
    target = tmp_path / "sae"
    save_saelens(random_sae("relu", 8, 16, "resid_pre", 0, seed=1), target)
    save_saelens(random_sae("gated", 8, 16, "resid_pre", 0, seed=2), target)
    assert load_saelens(target).config.kind == "gated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary left behind
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SAEError, match="holds other files"):
        save_saelens(random_sae("relu", 8, 16, "resid_pre", 0), target)
    (tmp_path / "file").write_text("")
    with pytest.raises(SAEError, match="is a file"):
        save_saelens(random_sae("relu", 8, 16, "resid_pre", 0), tmp_path / "file")
    with pytest.raises(SAEError, match="records no site"):
        save_saelens(random_sae("relu", 8, 16, None, None), tmp_path / "new")


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import probes.saelens

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probes.saelens, "write_json", fail)
    with pytest.raises(KeyboardInterrupt):
        save_saelens(random_sae("relu", 8, 16, "resid_pre", 0), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- the CLI


def cli_json(capsys, *argv):
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_sae_eval_and_polysemantic_read_a_saelens_directory(capsys):
    directory = str(GOLDEN / "shakespeare_resid")  # written by sae-lens, 3.x cfg.json, resid_pre L1, d_in 128
    result = cli_json(capsys, "sae", "eval", directory, "--max-tokens", "256", "--seq", "32")
    assert (result["site"], result["layer"]) == ("resid_pre", 1)
    assert result["metrics"]["n_rows"] == 256 and result["metrics"]["l0"] > 0
    lost = result["loss_recovered"]
    assert np.isfinite([lost["ce_clean"], lost["ce_sae"], lost["ce_zero"], lost["recovered"]]).all()
    assert lost["ce_sae"] != lost["ce_clean"]  # the reconstruction was spliced in
    report = cli_json(capsys, "polysemantic", "1.3", "--sae", directory, "--max-tokens", "256", "--seq", "32",
                      "--top", "5", "--features", "3")
    assert len(report["features"]) == 3 and all(f["key_cosine"] is not None for f in report["features"])


def test_cli_refuses_a_saelens_sae_of_another_model_in_one_line(capsys):
    capsys.readouterr()
    assert main(["polysemantic", "1.3", "--sae", str(GOLDEN / "standard"), "--max-tokens", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygpt: error: ") and "\n" not in err and "'d_in'" in err and "cfg.json" in err


# ------------------------------------------------------------------------------------------- live sae-lens

# tinygpt SAEs that sae-lens must read back: (kind, d_in, d_sae, site, layer, config fields)
LIVE = {
    "relu_scaled": ("relu", 16, 32, "resid_pre", 1, {"input_scale": 0.7}),
    "topk": ("topk", 16, 48, "mlp_out", 0, {"k": 5, "input_scale": 1.3}),
    "jumprelu": ("jumprelu", 24, 64, "attn_out", 1, {}),
    "gated_no_b_dec": ("gated", 16, 32, "resid_post", 0, {"apply_b_dec_to_input": False}),
    "norm_rescale": ("relu", 16, 32, "embed", None, {"input_norm": "constant_norm_rescale"}),
    "layer_norm_z": ("jumprelu", 32, 64, "z", 1, {"input_norm": "layer_norm"}),
}


def live_inputs(d_in: int, d_sae: int, site: str, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((10, d_in)) * 1.5 + 0.2).astype(np.float32)  # [n, d_in]
    g = (np.abs(rng.standard_normal((10, d_sae))) * (rng.random((10, d_sae)) < 0.2)).astype(np.float32)
    return x, g


def test_live_against_the_saelens_package(tmp_path):
    """sae-lens writes fresh random SAEs of every case and computes on them; tinygpt writes its SAEs of every
    kind and sae-lens' own `SAE.load_from_disk` reads and runs them. One subprocess with sae-lens on its
    PYTHONPATH: its transformer-lens 2.x must not shadow the 4.x the other tests import."""
    written = {}
    for seed, (name, (kind, d_in, d_sae, site, layer, fields)) in enumerate(LIVE.items()):
        sae = random_sae(kind, d_in, d_sae, site, layer, seed=seed, **fields)
        x, g = live_inputs(d_in, d_sae, site, seed)
        (tmp_path / name).mkdir()
        save_saelens(sae, tmp_path / name / "sae")
        layout = x.reshape(len(x), 4, -1) if site == "z" else x  # sae-lens reads hook_z as [n, head, d_head]
        save_file({"x": layout, "g": g}, str(tmp_path / name / "inputs.safetensors"))
        written[name] = (sae, x, g)
    script = Path(__file__).with_name("make_saelens_golden.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SAELENS_PATH), os.environ.get("PYTHONPATH", "")])}
    env = {k: v for k, v in env.items() if v}
    # whether sae-lens imports is asked on its own; once it does, any failure of the real run is a failure
    probe = subprocess.run([sys.executable, "-c", "import sae_lens, torch"], env=env, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    if probe.returncode:
        pytest.skip(f"sae-lens does not import (install it with: {INSTALL}): "
                    f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "golden"), "--read", *map(str, written)],
                         env={k: v for k, v in env.items() if v}, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, (sae, x, g) in written.items():
        theirs = load_file(str(tmp_path / name / "saelens.safetensors"))
        assert_outputs_close(outputs(sae, x, g), theirs, f"sae-lens reading tinygpt's {name}")
        again = load_saelens(tmp_path / name / "sae")
        assert_outputs_close(outputs(again, x, g), outputs(sae, x, g), f"tinygpt -> SAELens -> tinygpt {name}")
    for case in CASES:  # freshly written by sae-lens: the golden files are what this version computes
        expected = load_file(str(tmp_path / "golden" / case / "expected.safetensors"))
        sae = load_saelens(tmp_path / "golden" / case)
        assert_outputs_close(outputs(sae, expected["x"], expected["g"]), expected, f"live {case}")


# ------------------------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize("field, value", [("architecture", ["topk"]), ("normalize_activations", {"a": 1}),
                                          ("reshape_activations", ["none"]), ("activation_fn", ["relu"])])
def test_a_list_or_object_where_a_string_belongs_names_the_field(field, value, tmp_path):
    directory = copy_case("standard", tmp_path)
    rewrite_cfg(directory, **{field: value})
    with pytest.raises(SAEError) as error:
        load_saelens(directory)
    assert_one_line(error, repr(field), str(directory / CFG_FILE))


def raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("offsets", [
    {"W": [-8, 0]},  # negative
    {"W": [0, 8], "V": [0, 8]},  # overlapping
    {"W": [0, 8], "V": [4, 12]},  # overlapping in part
    {"W": [0, 8], "V": [12, 20]},  # a gap between them
    {"W": [4, 12]},  # not from byte 0
])
def test_safetensors_offsets_must_tile_the_data_section(offsets, tmp_path):
    from probes.saelens import read_weights

    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": pair} for name, pair in offsets.items()}
    path = tmp_path / WEIGHTS_FILE
    raw_safetensors(path, header, bytes(max(pair[1] for pair in offsets.values())))
    with pytest.raises(SAEError) as error:
        read_weights(path)
    assert_one_line(error, str(path), "data_offsets")
    raw_safetensors(path, {"V": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                           "W": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                    np.arange(4, dtype=np.float32).tobytes())
    read = read_weights(path)  # in any order in the header, as long as they tile the data
    np.testing.assert_array_equal(read["W"], [0, 1])
    np.testing.assert_array_equal(read["V"], [2, 3])


def test_a_directory_without_cfg_json_says_so(tmp_path):
    directory = copy_case("standard", tmp_path)
    (directory / CFG_FILE).unlink()
    with pytest.raises(SAEError) as error:
        load_any(directory)
    assert_one_line(error, f"SAELens directory {str(directory)!r} has no cfg.json")


def test_save_takes_the_lock_removes_stale_staging_and_creates_no_parent(tmp_path):
    from tinygpt.errors import LockedError, OutputError
    from tinygpt.files import writer_lock

    sae = random_sae("relu", 8, 16, "resid_pre", 0)
    target = tmp_path / "sae"
    for stale in (".sae.tinygpt-tmp.1.abcd", ".sae.tinygpt-tmp.2.ef01.old"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / CFG_FILE).write_text("{}")
    (tmp_path / ".other.tinygpt-tmp.3.0000").mkdir()  # another output's: left alone
    save_saelens(sae, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tinygpt-tmp.3.0000", "sae"]
    with writer_lock(target):
        with pytest.raises(LockedError):
            save_saelens(sae, target)
    with pytest.raises(OutputError, match="does not exist"):
        save_saelens(sae, tmp_path / "missing" / "sae")
    assert not (tmp_path / "missing").exists()
