"""The reading subcommands, run in-process on the committed tiny checkpoint (no tokenizer, so --tokens):
each prints the JSON its probe returns, writes its plot, and turns bad arguments into one-line errors
with exit code 2.

Prompt lengths match the probe tests' shapes where that is free (the golden checkpoint has their config),
so compiled programs are shared."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinygpt.cli import main

from test_lens import CFG

GOLDEN = "tests/golden/tiny"
PNG = b"\x89PNG\r\n\x1a\n"


def run_json(capsys, *argv):
    assert main([*argv, "--model", GOLDEN, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    assert main([*argv, "--model", GOLDEN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygpt: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_lens_json_rows_and_grid_image(capsys, tmp_path):
    plot = tmp_path / "lens.png"
    out = run_json(capsys, "lens", "--tokens", "1,2,3,4,5", "--target-id", "3", "--plot", str(plot))
    assert out["lens"] == "logit" and out["sites"] == ["resid_pre", "resid_mid", "resid_post"]
    rows = out["rows"]
    assert len(rows) == 3 * CFG.n_layer * 5
    assert {"layer", "site", "position", "top"} <= set(rows[0])
    assert all(len(r["top"]) == 5 and r["top"][0][1] >= r["top"][-1][1] and r["target"] == 3 for r in rows)
    last = [r for r in rows if r["layer"] == CFG.n_layer - 1 and r["site"] == "resid_post"]
    assert [r["top"][0][0] for r in last] == [f["top"][0][0] for f in out["final"]]  # the lens of the output
    assert plot.read_bytes()[:8] == PNG


def test_tuned_lens_train_eval_and_read(capsys, tmp_path):
    lens = tmp_path / "lens.safetensors"
    stream = ",".join(str(i) for i in np.random.default_rng(0).integers(0, CFG.vocab_size, 120))
    # shapes and learning rate as in test_tuned_lens, so the compiled step and evaluation are shared
    trained = run_json(capsys, "tunedlens", "train", "--stream", stream, "--seq", "8", "--batch", "4",
                       "--steps", "5", "--lr", "3e-3", "--out", str(lens))
    assert trained["steps"] == 5 and trained["stream_tokens"] == 120 and lens.is_file()
    four_windows = ",".join(stream.split(",")[:32])
    evaluated = run_json(capsys, "tunedlens", "eval", "--stream", four_windows, "--seq", "8", "--lens", str(lens))
    assert [r["layer"] for r in evaluated["rows"]] == list(range(CFG.n_layer))
    assert {"kl_logit", "kl_tuned", "ppl_logit", "ppl_tuned"} <= set(evaluated["rows"][0])
    read = run_json(capsys, "lens", "--tokens", "1,2,3", "--tuned", str(lens))
    assert read["lens"] == "tuned" and read["sites"] == ["resid_pre"] and len(read["rows"]) == CFG.n_layer * 3


def test_patchscope_json(capsys):
    out = run_json(capsys, "patchscope", "--tokens", "1,2,3,4,5,6", "--target-tokens", "7,8,9,10,11,12", "-n", "2")
    assert out["source_position"] == 5 and out["target_position"] == 5
    assert [(r["source_layer"], r["target_layer"]) for r in out["rows"]] == [(0, 0), (1, 1), (2, 2)]
    assert all(len(r["top"]) == 5 and len(r["generated"]) == 2 for r in out["rows"])
    assert out["rows"][0]["generated"][0] == out["rows"][0]["top"][0][0]  # greedy: the first is the top token


def test_attribute_json_sums_to_the_logit(capsys):
    out = run_json(capsys, "attribute", "--tokens", "1,2,3,4,5,6,7", "--target-id", "9", "--baseline-id", "4",
                   "--neurons", "1")
    total = sum(c["contribution"] for c in out["components"]) + out["bias_term"]
    assert total == pytest.approx(out["logit"], abs=1e-4)
    assert len(out["components"]) == 2 + CFG.n_layer * (CFG.n_head + 2)
    mlp = next(c for c in out["components"] if c["name"] == "L1.mlp")
    assert out["neurons"]["total"] == pytest.approx(mlp["contribution"], abs=1e-5)
    assert out["neurons"]["layer"] == 1 and len(out["neurons"]["top"]) == 12


def test_neuron_json(capsys):
    out = run_json(capsys, "neuron", "1.7", "--tokens", "1,2,3,4,5,6,7", "--top", "3")
    assert (out["layer"], out["neuron"]) == (1, 7)
    assert len(out["promoted"]) == 3 and out["promoted"][0]["value"] >= out["promoted"][-1]["value"]
    assert len(out["prompt"]["activations"]) == 7 and "top_activations" not in out  # no corpus for this model


def test_svd_json_and_spectrum(capsys, tmp_path):
    plot = tmp_path / "spectrum.png"
    out = run_json(capsys, "svd", "OV", "--layer", "1", "--head", "0", "--vectors", "2", "--top", "3",
                   "--plot", str(plot))
    assert len(out["singular_values"]) == CFG.d_head and len(out["directions"]) == 2
    assert {"positive", "negative"} == set(out["directions"][0]["input"])
    assert len(out["directions"][0]["output"]["positive"]) == 3
    assert plot.read_bytes()[:8] == PNG
    heads = run_json(capsys, "svd", "QK", "--layer", "0", "--fold-ln")
    assert np.asarray(heads["singular_values"]).shape == (CFG.n_head, CFG.d_head) and "directions" not in heads


def test_steer_json(capsys):
    # contrast prompts shaped as in test_steering (two of 7 tokens, one of 4): shared compiled programs
    out = run_json(capsys, "steer", "--tokens", "1,2,3,4", "--positive-tokens", "5,6,7,8,9,10,11",
                   "--positive-tokens", "1,3,5,7,9,11,13", "--negative-tokens", "2,4,6,8", "--layer", "1",
                   "--coef", "8", "-n", "5")
    assert len(out["steered"]) == 5 and len(out["baseline"]) == 5 and out["positions"] is None
    assert out["vector_norm"] > 0
    generated = run_json(capsys, "steer", "--tokens", "1,2,3,4", "--positive-tokens", "5,6,7,8,9,10,11",
                         "--positive-tokens", "1,3,5,7,9,11,13", "--negative-tokens", "2,4,6,8", "--layer", "1",
                         "--coef", "8", "-n", "5", "--positions", "generated")
    assert generated["positions"] == "generated" and generated["baseline"] == out["baseline"]


def test_attention_json_and_patterns(capsys, tmp_path):
    plot = tmp_path / "patterns.png"
    out = run_json(capsys, "attention", "--tokens", "1,2,3,4,5", "--plot", str(plot), "--layers", "0")
    assert len(out["heads"]) == CFG.n_layer * CFG.n_head
    assert {"layer", "head", "first", "previous", "diagonal", "induction"} == set(out["heads"][0])
    assert plot.read_bytes()[:8] == PNG


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert "no tokenizer: use --target-id" in run_error(capsys, "lens", "--tokens", "1,2", "--target", "x")
    assert "neuron index 40 is out of range" in run_error(capsys, "neuron", "1.40")
    assert "neuron must be LAYER.INDEX" in run_error(capsys, "neuron", "7")
    assert "leave out --head" in run_error(capsys, "svd", "W_in", "--layer", "0", "--head", "0")
    assert "--layer 5 is out of range" in run_error(capsys, "svd", "OV", "--layer", "5")
    assert "give --target-tokens" in run_error(capsys, "patchscope", "--tokens", "1,2")
    assert "give at least one --positive" in run_error(capsys, "steer", "--tokens", "1,2", "--layer", "0")
    assert main(["tunedlens"]) == 2 and "choose an action" in capsys.readouterr().err
    assert "no tuned lens at" in run_error(capsys, "tunedlens", "eval", "--lens", str(tmp_path / "x"),
                                           "--stream", "1,2,3")
    assert "only the embedded model has a default corpus" in run_error(capsys, "tunedlens", "train", "--out",
                                                                       str(tmp_path / "y"))
    assert "--position 9 is outside the prompt" in run_error(capsys, "attribute", "--tokens", "1,2", "--position", "9")


def test_generate_greedy_with_and_without_prompt_lookup(capsys):
    plain = run_json(capsys, "generate", "--tokens", "1,2,3,1,2,3", "-n", "10", "--temperature", "0")
    fast = run_json(capsys, "generate", "--tokens", "1,2,3,1,2,3", "-n", "10", "--temperature", "0",
                    "--prompt-lookup", "4")
    assert fast["tokens"] == plain["tokens"] and len(plain["tokens"]) == 10
    assert plain["passes"] == 10 and 1 < fast["passes"] <= 10
    for extra in ([], ["--prompt-lookup", "4"]):  # text mode: streamed, or printed when complete
        assert main(["generate", "--tokens", "1,2,3,1,2,3", "-n", "10", "--temperature", "0", *extra,
                     "--model", GOLDEN]) == 0
        printed = capsys.readouterr().out.split()
        assert printed == [f"<{i}>" for i in [1, 2, 3, 1, 2, 3, *plain["tokens"]]]
    assert "add --temperature 0" in run_error(capsys, "generate", "--tokens", "1,2", "--prompt-lookup", "4")
    assert "--prompt-lookup: must be >= 0" in run_error(capsys, "generate", "--tokens", "1,2", "--temperature", "0",
                                                        "--prompt-lookup", "-1")
