"""`tinygpt harvest`, `sae train|eval`, `superposition`, `polysemantic`, `manifold` in-process on the tiny
golden checkpoint (3 layers, d_model 24, d_mlp 40, n_ctx 16, vocab 61, no tokenizer) with a corpus of token
ids: --json output keys, plots written, one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from tinygpt.cli import main

from conftest import GOLDEN_DIR

TINY = str(GOLDEN_DIR / "tiny")


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygpt: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 61, 1600).astype(np.int32))  # 100 windows of 16
    return str(path)


def json_output(*argv):
    """Run a command with --json outside capsys (for module-scoped fixtures) and parse its output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A harvest of mlp_post at layer 1 and a TopK SAE trained on it, made through the CLI:
    (directory, harvest JSON, sae train JSON)."""
    out = tmp_path_factory.mktemp("geometry")
    harvested = json_output("harvest", str(out / "h"), "--site", "mlp_post", "--layer", "1", "--model", TINY,
                            "--corpus", corpus, "--batch", "32")
    sae = json_output("sae", "train", str(out / "h"), "--out", str(out / "sae.safetensors"), "--k", "4",
                      "--expansion", "2", "--steps", "60", "--batch-size", "128", "--resample-every", "0")
    return out, harvested, sae


def test_harvest_and_resume(capsys, corpus, trained):
    out, harvested, _ = trained
    expected = {"site": "mlp_post", "layer": 1, "rows": 1600, "width": 40, "windows": 100, "seq": 16}
    assert {k: harvested[k] for k in expected} == expected
    assert np.load(out / "h" / "activations.npy").shape == (1600, 40)
    again = run_json(capsys, "harvest", str(out / "h"), "--site", "mlp_post", "--layer", "1", "--model", TINY,
                     "--corpus", corpus, "--batch", "32")  # already complete: resumes with nothing left to do
    assert again == harvested
    err = run_error(capsys, "harvest", str(out / "h"), "--site", "resid_post", "--layer", "1", "--model", TINY,
                    "--corpus", corpus)
    assert "different harvest" in err


def test_sae_train_and_eval(capsys, corpus, trained):
    out, _, trained_sae = trained
    assert trained_sae["config"]["kind"] == "topk" and trained_sae["config"]["d_sae"] == 80
    assert (trained_sae["config"]["site"], trained_sae["config"]["layer"]) == ("mlp_post", 1)
    assert set(trained_sae["metrics"]) == {"l0", "fve", "mse", "dead_fraction", "n_rows"}
    assert trained_sae["history"][-1]["step"] == 60 and (out / "sae.safetensors").is_file()

    result = run_json(capsys, "sae", "eval", str(out / "sae.safetensors"), "--model", TINY, "--corpus", corpus,
                      "--max-tokens", "640")
    assert (result["site"], result["layer"]) == ("mlp_post", 1) and result["metrics"]["n_rows"] == 640
    assert result["metrics"]["l0"] <= 4
    assert set(result["loss_recovered"]) == {"ce_clean", "ce_sae", "ce_zero", "ce_mean", "recovered",
                                             "recovered_vs_mean"}


def test_superposition(capsys, trained, tmp_path):
    result = run_json(capsys, "superposition", "--model", TINY, "--layer", "2", "--sae",
                      str(trained[0] / "sae.safetensors"), "--angle", "20", "--plot", str(tmp_path / "cos.png"))
    names = [s["name"] for s in result["sets"]]
    assert names == ["embedding", "neuron_keys L2", "neuron_values L2", "sae_decoder mlp_post L1"]
    assert result["sets"][0]["summary"]["n"] == 61 and result["sets"][0]["gaussian"]["d"] == 24
    assert result["capacity"]["d"] == 24 and result["eps"] == pytest.approx(np.sin(np.radians(20)))
    assert (tmp_path / "cos.png").stat().st_size > 0


def test_polysemantic(capsys, corpus, trained):
    result = run_json(capsys, "polysemantic", "1.3", "--model", TINY, "--corpus", corpus, "--top", "6",
                      "--sae", str(trained[0] / "sae.safetensors"), "--features", "3")
    assert (result["layer"], result["neuron"], result["n_tokens"]) == (1, 3, 1600)
    activations = [c["activation"] for c in result["top"]]
    assert len(activations) == 6 and activations == sorted(activations, reverse=True)
    assert activations[0] == pytest.approx(result["max_activation"])
    assert 0 <= result["token_entropy"] <= np.log2(6) + 1e-9 and result["top"][0]["piece"].startswith("<")
    assert len(result["features"]) == 3 and all(f["share"] is not None for f in result["features"])


def test_manifold(capsys, corpus, tmp_path):
    result = run_json(capsys, "manifold", "--model", TINY, "--corpus", corpus, "--points", "300", "--plot",
                      str(tmp_path / "m.png"))
    assert [g["name"] for g in result["layers"]] == ["embed", "L0", "L1", "L2"]
    assert result["property"] == "repeated"
    probes_ = [g["probe"] for g in result["layers"]]
    # fractions of the held-out tokens (the probe's power is tested in test_manifold.py; these weights are random)
    assert all(0 <= p["test_accuracy"] <= 1 and 0 < p["majority"] <= 1 for p in probes_)
    assert len({p["test_accuracy"] for p in probes_}) > 1  # each layer's own probe
    assert (tmp_path / "m.png").stat().st_size > 0


def test_errors_are_one_line(capsys, corpus, tmp_path):
    (tmp_path / "text.txt").write_text("no tokenizer for this")
    assert "no tokenizer" in run_error(capsys, "harvest", str(tmp_path / "h"), "--site", "resid_post", "--layer",
                                       "0", "--model", TINY, "--corpus", str(tmp_path / "text.txt"))
    assert "LAYER.INDEX" in run_error(capsys, "polysemantic", "1x3", "--model", TINY, "--corpus", corpus)
    assert "outside" in run_error(capsys, "polysemantic", "7.0", "--model", TINY, "--corpus", corpus)
    assert "not a harvest" in run_error(capsys, "sae", "train", str(tmp_path), "--out", str(tmp_path / "s"))
    assert "tokenizer" in run_error(capsys, "manifold", "--model", TINY, "--corpus", corpus, "--property", "line_end")
    assert "action" in run_error(capsys, "sae")
    assert "corpus file" in run_error(capsys, "manifold", "--model", TINY)
    assert "too few" in run_error(capsys, "manifold", "--model", TINY, "--corpus", corpus, "--max-tokens", "32",
                                  "--points", "20")
