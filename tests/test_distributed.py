"""Two processes x 2 CPU devices on localhost (jax.distributed, gloo) give one process's results.

Each process is tests/distributed_worker.py, started with the process settings in the environment
(TINYGPT_COORDINATOR on a free port, TINYGPT_NUM_PROCESSES, TINYGPT_PROCESS_ID) and 2 CPU devices from
XLA_FLAGS. Two pairs run, one after the other (starting a process imports jax: each pair does several
checks):

    killed  a harvest in which process 1 SIGKILLs itself after its first chunk is written: process 0
            finishes its shard and fails at the barrier once the heartbeat (5 s) reports its peer dead
    main    resumes that harvest, harvests again from scratch, runs a head sweep, a causal trace, a few SAE
            steps on the harvest and `tinygpt sae train`

The same computations run here, in this one-device process, while the killed pair runs.

Every wait is bounded (`TIMEOUT_S`): on a timeout both processes are killed and the test fails with their
stderr, so a stuck peer cannot hang CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_S = 150  # one pair of processes, start to finish, on a busy 2-core machine
sys.path.insert(0, str(WORKER.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_pair(task: str, out: Path, *, reference=None):
    """Both processes of `task`, to the end (at most TIMEOUT_S): ([(exit code, output)] per process, what
    `reference()`, run here meanwhile, returns)."""
    port = free_port()
    workers = []
    for rank in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
               "TINYGPT_COORDINATOR": f"localhost:{port}", "TINYGPT_NUM_PROCESSES": "2",
               "TINYGPT_PROCESS_ID": str(rank)}
        err = open(out / f"{task}-stderr-{rank}.txt", "w+")
        workers.append((subprocess.Popen([sys.executable, str(WORKER), task, str(out)], env=env, stdout=err,
                                         stderr=subprocess.STDOUT), err))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        value = reference() if reference is not None else None
        for worker, _ in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = [w.poll() is None for w, _ in workers]
        for worker, _ in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    logs = []
    for worker, err in workers:
        err.seek(0)
        logs.append(err.read())
        err.close()
    if any(timed_out):
        pytest.fail(f"the {task} processes did not finish within {TIMEOUT_S} s; killed. stderr:\n" +
                    "\n".join(f"--- process {r} ---\n{log[-3000:]}" for r, log in enumerate(logs)))
    return [(worker.returncode, log) for (worker, _), log in zip(workers, logs)], value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import distributed_worker

    out = tmp_path_factory.mktemp("distributed")

    def reference():  # one process, one device, the same computations (the harvest in memory; for the CLI, on disk)
        from probes.harvest import harvest

        config, params, _, _, stream, _ = inputs = distributed_worker.inputs()
        harvest(params, config, stream, progress=False, path=out / "single", **distributed_worker.HARVEST)
        assert distributed_worker.train_sae_cli(out / "single", out / "single-sae.safetensors") == 0
        return distributed_worker.computations(*inputs)

    killed, single = run_pair("killed", out, reference=reference)  # the reference meanwhile: they are independent
    interrupted = {p.name: json.loads(p.read_text()) for p in (out / "resumed").glob("*.json")}
    main, _ = run_pair("main", out)
    for rank, (code, log) in enumerate(main):
        assert code == 0, f"process {rank} of the main run failed:\n{log[-4000:]}"
    results = [dict(np.load(out / f"result-{rank}.npz")) for rank in range(2)]
    return dict(out=out, killed=killed, interrupted=interrupted, results=results, single=single)


def max_difference(runs, name) -> float:
    return max(float(np.abs(r[name] - runs["single"][name]).max()) for r in runs["results"])


def test_both_processes_return_the_same_results(runs):
    first, second = runs["results"]
    assert set(first) == set(second) == set(runs["single"]) | {"fresh", "cli_exit_code"}
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # the figures the checks below bound (shown with pytest -rP)
    print({name: max_difference(runs, name) for name in sorted(runs["single"])})


def test_head_sweep_equals_one_process(runs):
    single = runs["single"]["sweep"]
    assert single.shape == (2, 4) and np.ptp(single) > 0.1  # zeroing a head changes the score
    assert max_difference(runs, "sweep") < 1e-5


def test_eager_sharded_sweep_gathers_to_every_process(runs):
    """`sharding.sharded_sweep` called eagerly: 7 runs padded to 8 over the 4 devices of 2 processes, the
    results gathered to each process as one process computes them."""
    single = runs["single"]["sharded_sweep"]
    assert single.shape == (7, 3) and np.ptp(single[:, 0]) > 0.1
    assert max_difference(runs, "sharded_sweep") < 1e-5


def test_causal_trace_equals_one_process(runs):
    single = runs["single"]["trace"]
    assert single.shape == (2, 8) and np.ptp(single) > 1e-3  # restoring a state changes P(answer)
    assert max_difference(runs, "trace") < 1e-6


def test_harvest_by_two_processes_equals_one_process(runs):
    """The shards, read as one array, hold one process's rows in window order."""
    from probes.harvest import load_harvest

    single = runs["single"]["harvest"]
    assert single.shape == (80, 64)
    assert max_difference(runs, "harvest") < 1e-6
    loaded = load_harvest(runs["out"] / "fresh")  # here: one process reading the two shards
    assert loaded.info["format"] == 2 and [s["rows"] for s in loaded.info["shards"]] == [[0, 40], [40, 80]]
    np.testing.assert_array_equal(np.asarray(loaded.acts), runs["results"][0]["fresh"])
    np.testing.assert_array_equal(loaded.acts[35:45], runs["results"][0]["fresh"][35:45])  # across the shards


def test_sae_steps_on_two_processes_follow_one_process(runs):
    """Data parallel over 4 devices of 2 processes: the same loss curve and SAE as one device, to float
    rounding (the batch's sums run in another order); a resampling at step 4 included."""
    single = runs["single"]["sae_loss"]
    assert len(single) == 4 and single[0] > single[-1]
    assert max_difference(runs, "sae_loss") < 1e-4 * float(np.abs(single).max())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert max_difference(runs, f"sae_{name}") < 1e-4, name


def test_sae_train_command_on_two_processes_writes_one_process_sae(runs):
    """`tinygpt sae train` run by both processes (settings from the environment): process 0 alone writes
    --out (no lock taken by the other), an SAE equal to the one the command trains in one process."""
    from probes.sae import load_sae

    assert [int(r["cli_exit_code"]) for r in runs["results"]] == [0, 0]
    ours, single = load_sae(runs["out"] / "sae.safetensors"), load_sae(runs["out"] / "single-sae.safetensors")
    assert ours.config == single.config
    for name, value in single.params.items():
        np.testing.assert_allclose(np.asarray(ours.params[name]), np.asarray(value), atol=1e-5, err_msg=name)


def test_killed_process_leaves_a_resumable_harvest(runs):
    """Process 1 died after its first chunk (2 windows of 5): its shard records 16 rows done, process 0's
    is complete, there is no manifest; process 0 failed at the barrier (a bounded wait), not hung."""
    (code0, log0), (code1, _) = runs["killed"]
    assert code1 == -signal.SIGKILL
    assert code0 != 0 and "barrier" in log0 and "another process failed" in log0
    interrupted = runs["interrupted"]
    assert sorted(interrupted) == ["shard-00000-of-00002.json", "shard-00001-of-00002.json"]
    assert interrupted["shard-00000-of-00002.json"]["rows_done"] == 40
    assert interrupted["shard-00001-of-00002.json"]["rows_done"] == 16


def test_resumed_harvest_is_the_uninterrupted_one_byte_for_byte(runs):
    resumed, fresh = runs["out"] / "resumed", runs["out"] / "fresh"
    names = sorted(p.name for p in fresh.iterdir() if not p.name.endswith(".lock"))
    assert names == ["harvest.json", "shard-00000-of-00002.json", "shard-00000-of-00002.npy",
                     "shard-00001-of-00002.json", "shard-00001-of-00002.npy", "tokens.npy"]
    assert sorted(p.name for p in resumed.iterdir() if not p.name.endswith(".lock")) == names
    for name in names:
        assert (resumed / name).read_bytes() == (fresh / name).read_bytes(), name


# ------------------------------------------------------------------------------ one process, no peers


def test_incomplete_process_settings_are_refused(monkeypatch):
    from tinygpt import distributed

    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(distributed.COORDINATOR, "localhost:1234")
    with pytest.raises(ValueError, match="set TINYGPT_NUM_PROCESSES, TINYGPT_PROCESS_ID"):
        distributed.initialize()
    monkeypatch.setenv(distributed.NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="TINYGPT_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
        distributed.initialize("localhost:1234", 2, 2)


def test_joining_after_jax_started_is_refused():
    import jax

    from tinygpt import distributed

    jax.devices()  # this process's jax has started (as after loading a model)
    with pytest.raises(ValueError, match="must run before anything else uses jax"):
        distributed.initialize("localhost:1234", 2, 0, timeout_s=2)


def test_sharded_rows_index_like_one_array():
    from probes.harvest import ShardedRows

    whole = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    rows = ShardedRows([whole[:2], whole[2:6], whole[6:]])
    assert rows.shape == (7, 3) and len(rows) == 7
    for index in (0, 5, -1, slice(1, 7), slice(None, None, 2), slice(3, 3), np.array([6, 0, 2, 2]),
                  (np.array([1, 4]), slice(0, 2)), (slice(1, 5), 2)):
        np.testing.assert_array_equal(rows[index], whole[index], err_msg=str(index))
    np.testing.assert_array_equal(np.asarray(rows), whole)
    np.testing.assert_allclose(rows.mean(0), whole.mean(0))
    with pytest.raises(IndexError):
        rows[np.array([7])]


def test_the_cli_refuses_incomplete_process_settings_in_one_line(monkeypatch, capsys, tmp_path):
    from tinygpt import distributed
    from tinygpt.cli import main

    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    code = main(["harvest", str(tmp_path / "h"), "--site", "resid_post", "--layer", "0", "--coordinator",
                 "localhost:1234"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "set TINYGPT_NUM_PROCESSES, TINYGPT_PROCESS_ID" in err and "--num-processes" in err
    assert not (tmp_path / "h").exists()


def test_malformed_process_settings_are_one_input_error_naming_the_argument(monkeypatch):
    from tinygpt import distributed
    from tinygpt.errors import InputError

    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for args, named in [(("localhost", 2, 0), "coordinator_address"), (("localhost:port", 2, 0), "coordinator_address"),
                        ((":1234", 2, 0), "coordinator_address"), (("localhost:1234", True, 0), "num_processes"),
                        (("localhost:1234", 2.0, 0), "num_processes"), (("localhost:1234", 0, 0), "num_processes"),
                        (("localhost:1234", 2, False), "process_id"), (("localhost:1234", 2, -1), "process_id")]:
        with pytest.raises(InputError, match=named) as caught:
            distributed.initialize(*args, timeout_s=2)
        assert len(str(caught.value).splitlines()) == 1, args
