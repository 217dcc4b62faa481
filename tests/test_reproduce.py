"""benchmarks/reproduce.py: the checks against published GPT-2 figures, tested where the hub is out of reach.

Official gpt2 cannot be downloaded here, so the checks run on random checkpoints written the official way
(transformers' `save_pretrained`, with GPT-2's tokenizer files beside them): every check must run and report
measurements of the right kind, the rows a small model cannot have must say "n/a (model too small ...)", and
the table and the JSON must be well-formed. A planted truth shows that a row turns to "matches" when the
model does give the published figure: a one-layer checkpoint built by hand whose greedy continuation of
"The dog" is HF's. The comparisons of the other checks are tested on measurements set to the published
picture and just off it, and the direct-path patching the IOI check computes is tested against the same
patch done as an edit of the forward pass. Without the hub, `--model gpt2` prints one line and exits 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import reproduce

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "gpt2-tokenizer"
VOCAB = 50257


def write_checkpoint(directory: Path, *, n_layer: int, n_head: int, d_model: int, tokenizer: bool = True,
                     edit=None) -> Path:
    """A random GPT2LMHeadModel saved by transformers (official names and layout), GPT-2's tokenizer beside
    it; `edit(model)` may set weights by hand first."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=d_model, n_positions=64,
                                     vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(directory)
    if tokenizer:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_DIR / name, directory / name)
    return directory


needs_tokenizer = pytest.mark.skipif(not (TOKENIZER_DIR / "vocab.json").is_file(),
                                     reason=f"GPT-2's tokenizer files are not at {TOKENIZER_DIR}")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """3 layers x 2 heads x d_model 32: too shallow for layers 9 and 10, too narrow for dim 447."""
    return write_checkpoint(tmp_path_factory.mktemp("small"), n_layer=3, n_head=2, d_model=32)


# ------------------------------------------------------------------------------ every check on a random model


@needs_tokenizer
def test_every_check_runs_and_writes_a_table_and_json(small_checkpoint, tmp_path, capsys, monkeypatch):
    """Every check on a 3-layer random checkpoint. One of the two traced facts is left out here (each prompt
    length compiles its own trace program, ~8 s of CPU); test_trace_comparison covers the comparison."""
    monkeypatch.setattr(reproduce, "FACTS", reproduce.FACTS[1:])
    out = tmp_path / "reproduce.json"
    assert reproduce.main(["--model", str(small_checkpoint), "--out", str(out)]) == reproduce.EXIT_OK
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]

    # one row per published figure, each family present, every field filled
    assert [r["check"] for r in rows] == ["greedy"] + ["massive"] * 7 + ["ioi"] + ["trace"] * 2
    fields = {f.name for f in dataclasses.fields(reproduce.Row)}
    for row in rows:
        assert set(row) == fields
        assert row["name"] and row["published"] and row["tolerance"] and row["source"]
        assert row["status"] in ("matches", "differs") or row["status"].startswith("n/a (")
    assert data["config"] == {"n_layer": 3, "n_head": 2, "d_model": 32, "vocab_size": VOCAB}
    assert data["summary"] == {key: sum(1 for r in rows if (r["status"] if not r["status"].startswith("n/a")
                                                            else "n/a") == key)
                               for key in ("matches", "differs", "n/a")}

    by_name = {r["name"]: r for r in rows}
    greedy = rows[0]
    assert len(greedy["value"]) == 18 and all(isinstance(t, int) and 0 <= t < VOCAB for t in greedy["value"])
    assert greedy["status"] == "differs"  # random weights do not write "was found in a field"

    # massive: measured where the model has layer 2; n/a where it lacks dim 447
    first = by_name["first layer holding a massive activation"]
    assert first["status"] == ("matches" if first["value"] == 2 else "differs")
    assert first["value"] is None or 0 <= first["value"] < 3
    import tinygpt

    W_out = np.asarray(tinygpt.load(str(small_checkpoint)).params["blocks"]["W_out"][2], np.float64)  # [d_mlp, d]
    singular = np.linalg.svd(W_out, compute_uv=False)
    for name, expected in (("sigma1 of W_out, layer 2", singular[0]), ("sigma2 of W_out, layer 2", singular[1])):
        assert by_name[name]["value"] == pytest.approx(expected, rel=1e-6), name
        assert by_name[name]["status"] == "differs"  # a random W_out is nowhere near 38.3 / 15.2
    for name in ("massive dims at that layer", "slope of mlp_out[447] on h . v1, layer 2", "R^2 of that fit"):
        assert by_name[name]["status"] == "n/a (model too small: d_model 32, dim 447 needed)"

    # IOI: the model's own top heads are measured, the comparison is n/a (no layer 10)
    ioi = rows[8]
    assert ioi["status"].startswith("n/a (model too small: 3 layers x 2 heads")
    assert len(ioi["value"]) == 3 and all(0 <= l < 3 and 0 <= h < 2 for l, h, _ in ioi["value"])

    # traces: a peak (layer, position) inside the prompt for each kind of each prompt
    for row in rows[9:]:
        seq = 9  # "Megan Rapinoe plays the sport of"
        assert 0 <= row["value"]["layer"] < 3 and 0 <= row["value"]["position"] < seq
        assert np.isfinite(row["value"]["effect"]) and np.isfinite(row["value"]["total_effect"])

    # the table: header, one line per row, then one footnote per row, then the counts
    lines = printed.splitlines()
    assert lines[0] == "| # | figure | measured | published | status |"
    assert [line.split(" | ")[0] for line in lines[2:13]] == [f"| {i}" for i in range(1, 12)]
    assert all(line.count(" | ") == 4 for line in lines[2:13])  # no cell breaks the table
    assert [line.split("]")[0] for line in lines[14:25]] == [f"[{i}" for i in range(1, 12)]
    assert lines[-1].startswith(f"{data['summary']['matches']} match, {data['summary']['differs']} differ")


@needs_tokenizer
def test_only_runs_the_named_checks(small_checkpoint, capsys):
    assert reproduce.main(["--model", str(small_checkpoint), "--only", "ioi"]) == 0
    assert "IOI name movers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--model", str(small_checkpoint), "--only", "ioi,lens"])
    assert e.value.code == 2
    assert "unknown check 'lens'" in capsys.readouterr().err


def test_a_checkpoint_without_tokenizer_gives_n_a_rows(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "bare", n_layer=1, n_head=1, d_model=16, tokenizer=False)
    assert reproduce.main(["--model", str(directory), "--only", "massive,ioi,trace"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:5]
    assert all(row.endswith("| n/a (the checkpoint has no tokenizer; the prompts are text) |") for row in rows)


# ---------------------------------------------------------------------------------------- a planted truth


def plant_the_dog(model):
    """Blocks that write nothing (every c_proj zero), so the final residual is wte[token] + wpe[position];
    wpe[p] = 50 e_p and wte[v] has a 1 at e_p for every position p whose published next token is v (the
    embedding is tied: it is also the unembedding). At position p the logit of v is LN(x) . wte[v], largest
    for the published next token."""
    sequence = reproduce.DOG_PROMPT + reproduce.DOG_CONTINUATION
    t = model.transformer
    t.wte.weight.zero_()
    t.wpe.weight.zero_()
    for position in range(1, len(sequence) - 1):
        t.wpe.weight[position, position] = 50.0
        t.wte.weight[sequence[position + 1], position] += 1.0
    t.wpe.weight[0, 0] = 50.0
    for block in t.h:
        for projection in (block.attn.c_proj, block.mlp.c_proj):
            projection.weight.zero_()
            projection.bias.zero_()
    t.ln_f.weight.fill_(1.0)
    t.ln_f.bias.zero_()


def test_a_planted_greedy_continuation_matches(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "dog", n_layer=1, n_head=1, d_model=32, tokenizer=False,
                                 edit=plant_the_dog)
    out = tmp_path / "dog.json"
    assert reproduce.main(["--model", str(directory), "--only", "greedy", "--out", str(out), "--strict"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["value"] == reproduce.DOG_CONTINUATION and row["status"] == "matches"
    assert "| matches |" in capsys.readouterr().out


def test_greedy_comparison_reports_the_first_difference():
    off = list(reproduce.DOG_CONTINUATION)
    off[5] = 0
    row = reproduce.compare_greedy(off)
    assert row.status == "differs" and "17/18 equal" in row.measured and row.detail.endswith("new token 5")


# ------------------------------------------------------------------------------- the other comparisons


def test_ioi_comparison():
    effects = np.zeros((12, 12))
    effects[9, 9], effects[9, 6], effects[10, 0], effects[10, 7] = -0.6, -0.4, -0.3, +0.2
    assert reproduce.compare_ioi(effects, 40).status == "matches"
    effects[7, 3] = -0.35  # an S-inhibition-like head ranks third: 10.0 drops to fourth
    row = reproduce.compare_ioi(effects, 40)
    assert row.status == "differs" and "'10.0': 4" in row.detail
    assert row.value == [[9, 9, -0.6], [9, 6, -0.4], [7, 3, -0.35]]
    assert reproduce.compare_ioi(np.zeros((12, 8)), 40).status.startswith("n/a (model too small")


def test_trace_comparison():
    effect = np.zeros((12, 10))
    effect[4, 3] = 0.3  # MLP: last subject token (3), first half
    assert reproduce.compare_trace("p", "mlp_out", effect, 3, 0.5).status == "matches"
    assert reproduce.compare_trace("p", "mlp_out", effect, 3, -0.01).status == "differs"  # no fact to trace
    assert reproduce.compare_trace("p", "mlp_out", effect, 2, 0.5).status == "differs"  # another position
    late = np.zeros((12, 10))
    late[6, 3] = 0.3
    assert reproduce.compare_trace("p", "mlp_out", late, 3, 0.5).status == "differs"  # second half
    attention = np.zeros((12, 10))
    attention[8, 9] = 0.2  # attention: last token, second half
    assert reproduce.compare_trace("p", "attn_out", attention, 3, 0.5).status == "matches"
    attention[8, 9], attention[3, 9] = 0.0, 0.2
    assert reproduce.compare_trace("p", "attn_out", attention, 3, 0.5).status == "differs"
    assert reproduce.rome_window(48) == 10 and reproduce.rome_window(12) == 3 and reproduce.rome_window(2) == 1


def test_massive_comparison():
    seed = reproduce.MassiveMeasurement(12, 768, [(2, 447, 0, 2500.0, 5e4), (2, 138, 0, -700.0, 1.4e4),
                                                  (5, 447, 0, 3000.0, 6e4)], 2, 38.31, 15.18, 38.2, 38.9, 0.9975)
    assert [r.status for r in reproduce.compare_massive(seed)] == ["matches"] * 7
    off = dataclasses.replace(seed, activations=seed.activations + [(3, 447, 4, 150.0, 2e3)], sigma1=38.5,
                              r2=0.99)
    statuses = {r.name: r.status for r in reproduce.compare_massive(off)}
    assert statuses["massive activations (|x| > 100, >= 1000x median) sit on the first token only"] == "differs"
    assert statuses["sigma1 of W_out, layer 2"] == "differs" and statuses["R^2 of that fit"] == "differs"
    assert statuses["sigma2 of W_out, layer 2"] == "matches"
    none = reproduce.MassiveMeasurement(2, 64, [], None, None, None, None, None, None)
    assert [r.status.split(":")[0] for r in reproduce.compare_massive(none)] == (
        ["differs"] + ["n/a (model too small"] * 6)


@needs_tokenizer
def test_direct_path_patching_equals_the_patch_as_an_edit(small_checkpoint):
    """The IOI check's path patching to the logits = the clean run with the head's output difference added to
    the last residual at the last position (the final LayerNorm then runs as usual), read from the logits."""
    import jax.numpy as jnp

    import tinygpt

    model = tinygpt.load(str(small_checkpoint))
    batches = [tuple(part[:15] for part in reproduce.ioi_prompts(model.tokenizer)[0])]  # one chunk
    clean, corrupt, io, s = batches[0]
    effects, clean_diff = reproduce.direct_path_effects(model.params, model.config, batches)
    assert effects.shape == (3, 2)
    heads = [np.asarray(model(tokens, keep=("head_out", "resid_post")).head_out[:, :, -1])
             for tokens in (clean, corrupt)]
    patched = [(0, 1), (2, 0)]
    # one run: the clean batch unpatched, then once per patched head with its head's difference added
    delta = np.concatenate([np.zeros_like(heads[0][0, :, 0])]
                           + [heads[1][l, :, h] - heads[0][l, :, h] for l, h in patched])
    last_layer = model.config.n_layer - 1

    def add(resid, layer):  # resid_post [batch, seq, d_model]
        return jnp.where(layer == last_layer, resid.at[:, -1].add(jnp.asarray(delta)), resid)

    n, rows = len(io), np.arange(len(io))
    logits = np.asarray(model(np.concatenate([clean] * 3), edits={"resid_post": add}, keep=("logits",)).logits)
    diffs = [(part[rows, -1, io] - part[rows, -1, s]).sum() for part in np.split(logits, 3)]
    assert clean_diff == pytest.approx(diffs[0] / n, abs=1e-4)
    for (layer, head), diff in zip(patched, diffs[1:]):
        assert effects[layer, head] == pytest.approx(diff / diffs[0] - 1.0, abs=1e-4)


@needs_tokenizer
def test_ioi_prompts_are_pairs_of_equal_length():
    import tinygpt

    tokenizer = tinygpt.Tokenizer.from_dir(TOKENIZER_DIR)
    batches = reproduce.ioi_prompts(tokenizer)
    assert len(batches) == 1  # every template is 14 tokens: one batch
    for clean, corrupt, io, s in batches:
        assert clean.shape == corrupt.shape == (12 * len(reproduce.IOI_TEMPLATES), 14)
        assert len(io) == len(s) == len(clean)
        assert (io != s).all()
        for row, a, b in zip(clean, io, s):  # IO once, S twice, in the clean prompt
            assert list(row).count(a) == 1 and list(row).count(b) == 2
        for row, a, b in zip(corrupt, io, s):  # neither in the ABC prompt
            assert a not in row and b not in row


# ------------------------------------------------------------------------------------------- no hub


def test_without_the_hub_one_line_and_exit_3(tmp_path):
    """The hub is unreachable on the machines this was written on; HF_HUB_OFFLINE and an empty cache make the
    same failure certain (and fast) anywhere."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--model", "gpt2", "--out",
                             str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == reproduce.EXIT_NO_HUB == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "reproduce: the Hugging Face hub cannot provide 'gpt2', so nothing was measured: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "r.json").exists()


def test_a_missing_directory_is_one_line_and_exit_2(tmp_path, capsys):
    assert reproduce.main(["--model", str(tmp_path / "nowhere" / "model")]) == reproduce.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reproduce: error: ")
