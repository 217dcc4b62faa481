"""Ctrl-C never replaces an existing --out: `tinygpt sae train` and `tinygpt tunedlens train` run as real
processes on the embedded model, interrupted (SIGINT) at several moments from the start of training (the
first round's compilation included), exit with 130 (not -11, a segfault in interpreter teardown), leave the
old --out byte for byte, and leave no temporary or lock file.

The interrupts are timed from the training's progress bar, once the command runs, and from the start of the
process (a Ctrl-C during `import jax`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "weights" / "embedded" / "model.safetensors"
OLD = b"the user's old file, not to be replaced"

pytestmark = pytest.mark.skipif(not EMBEDDED.is_file(), reason="the embedded model is not in weights/embedded")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A harvest of the embedded model's resid_post at layer 0 (4096 tokens), and a token stream."""
    import tinygpt
    from probes.harvest import harvest

    model = tinygpt.load()
    stream = np.random.default_rng(0).integers(0, model.config.vocab_size, 4096).astype(np.int32)
    directory = tmp_path_factory.mktemp("signals")
    harvest(model.params, model.config, stream, "resid_post", 0, seq=128, path=directory / "h", progress=False)
    return directory, ",".join(str(i) for i in stream[:3000])


def command(kind: str, work, out: Path, steps: int) -> list[str]:
    directory, stream = work
    if kind == "sae":
        return ["sae", "train", str(directory / "h"), "--out", str(out), "--steps", str(steps), "--batch-size", "256",
                "--expansion", "2", "--k", "8"]
    return ["tunedlens", "train", "--stream", stream, "--out", str(out), "--steps", str(steps), "--batch", "4",
            "--seq", "32"]


def interrupted_run(argv, *, after: str | None, delay: float) -> tuple[int, str]:
    """Start `python -m tinygpt ARGV`, send SIGINT `delay` seconds after stderr shows `after` (or after the
    start), and return (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "tinygpt", *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, chunks = threading.Event(), []
    if after is None:
        seen.set()

    def read():
        while chunk := process.stderr.read1(4096):
            chunks.append(chunk)
            if after is not None and after.encode() in b"".join(chunks[-2:]):
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(timeout=120), "the command never started training"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


def leftovers(directory: Path) -> list[str]:
    from tinygpt.files import TEMP_MARK

    return sorted(p.name for p in directory.iterdir() if TEMP_MARK in p.name or p.name.endswith(".lock"))


@pytest.mark.parametrize("kind, marker", [("sae", "SAE topk"), ("tunedlens", "tuned lens")])
def test_ctrl_c_while_training_exits_130_and_keeps_the_old_out(work, tmp_path, kind, marker):
    out = tmp_path / "out.safetensors"
    codes = []
    for delay in (0.0, 0.5, 1.5):  # compiling the first round, then training
        out.write_bytes(OLD)
        code, stderr = interrupted_run(command(kind, work, out, 20_000), after=marker, delay=delay)
        codes.append(code)
        assert code == 130, (delay, code, stderr[-2000:])
        assert out.read_bytes() == OLD, delay
        assert leftovers(tmp_path) == [], delay
    assert codes == [130, 130, 130]


def test_ctrl_c_during_start_up_keeps_the_old_out(work, tmp_path):
    out = tmp_path / "out.safetensors"
    """A Ctrl-C during `import jax` used to be dropped by JAX's gc callback (jax._src.lib._xla_gc_callback:
    'Exception ignored in ...') and the command ran on and replaced --out (0.4-1.4 s after start on 2 busy
    cores). `tinygpt.interrupts` now records it from tinygpt's first line, before numpy and jax are imported.
    Earlier still (the interpreter's own start-up, the first ~0.05 s) it is Python's: the process dies of the
    signal (-SIGINT, which a shell reports as 130 too)."""
    for delay in (0.2, 0.4, 0.8, 1.2, 1.6):
        out.write_bytes(OLD)
        code, stderr = interrupted_run(command("sae", work, out, 50), after=None, delay=delay)
        assert code in (130, -signal.SIGINT) and out.read_bytes() == OLD, (delay, code, stderr[-2000:])
        assert leftovers(tmp_path) == []
