"""tinygpt.files: the one way tinygpt writes and reads files (issue 17, cases 1, 3, 9, 15)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygpt.errors import LockedError, OutputError, WeightsError
from tinygpt.files import (TEMP_MARK, atomic_write, check_output_file, read_json, safetensors_bytes,
                           save_figure, save_safetensors, write_json, writer_lock)


def leftovers(directory):
    return [p.name for p in directory.iterdir() if TEMP_MARK in p.name]


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, exception):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(exception):
        with atomic_write(target) as f:
            f.write(b"half of the new")
            raise exception()
    assert target.read_bytes() == b"old contents"
    assert leftovers(tmp_path) == []


def test_a_completed_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@given(st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=6), st.text(max_size=5), max_size=8),
       st.permutations(["w_a", "w_b", "w_c"]))
def test_safetensors_bytes_do_not_depend_on_insertion_order(metadata, names):
    """safetensors keeps metadata in a hash map (4 SAE runs gave 2 digests); sorted headers give one file."""
    tensors = {name: np.full((2, i + 1), i, np.float32) for i, name in enumerate(sorted(names))}
    shuffled_tensors = {name: tensors[name] for name in names}
    shuffled_metadata = dict(reversed(list(metadata.items())))
    a = safetensors_bytes(tensors, metadata or None)
    b = safetensors_bytes(shuffled_tensors, shuffled_metadata or None)
    assert a == b
    assert int.from_bytes(a[:8], "little") % 8 == 0


def test_saved_safetensors_read_back_and_repeat_byte_for_byte(tmp_path):
    from safetensors import safe_open

    tensors = {"W": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
    metadata = {f"key{i}": str(i) for i in range(20)}
    digests = set()
    for i in range(4):
        save_safetensors(tmp_path / f"x{i}.safetensors", tensors, metadata)
        digests.add(hashlib.sha256((tmp_path / f"x{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "x0.safetensors"), framework="numpy") as f:
        assert f.metadata() == metadata
        np.testing.assert_array_equal(f.get_tensor("W"), tensors["W"])


def test_json_is_written_with_sorted_keys(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": {"d": 2, "c": 3}})
    write_json(tmp_path / "b.json", {"a": {"c": 3, "d": 2}, "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_figures_are_written_atomically_in_the_extensions_format(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    for name, magic in (("f.png", b"\x89PNG"), ("f.pdf", b"%PDF"), ("f.svg", b"<?xml")):
        save_figure(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(magic)
    plt.close(fig)
    assert leftovers(tmp_path) == []


def test_output_paths_are_checked_before_any_work(tmp_path):
    assert check_output_file(tmp_path / "x.png", "--plot", suffixes=(".png",)) == tmp_path / "x.png"
    with pytest.raises(OutputError, match="--out .*does not exist"):
        check_output_file(tmp_path / "missing" / "x.safetensors", "--out")
    with pytest.raises(OutputError, match="unknown extension '.txt'"):
        check_output_file(tmp_path / "x.txt", "--plot", suffixes=(".png",))
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path, "--out")


# ---------------------------------------------------------------------------------------------- locking


def _hold_lock(target, barrier, results, hold):
    barrier.wait()
    try:
        with writer_lock(target):
            results.put("held")
            time.sleep(hold)
    except LockedError as e:
        results.put(str(e))


# Spawned, not forked: the test process runs JAX's threads, and a forked child can deadlock on their locks.
@pytest.mark.parametrize("trial", range(5))
def test_two_writers_released_together_one_wins_and_the_other_is_told_who(tmp_path, trial):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    target = tmp_path / "harvest"
    procs = [ctx.Process(target=_hold_lock, args=(target, barrier, results, 0.5)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted((results.get(timeout=60) for _ in procs), key=lambda o: o != "held")
    for p in procs:
        p.join(timeout=60)
    assert outcomes[0] == "held", outcomes
    assert "is being written by another tinygpt (pid" in outcomes[1], outcomes
    assert not (tmp_path / "harvest.lock").exists()  # released and removed


def _take_lock_and_die(target):
    writer_lock(target).__enter__()
    os._exit(9)


def test_the_lock_is_free_again_after_its_holder_dies(tmp_path):
    ctx = mp.get_context("spawn")
    target = tmp_path / "out.safetensors"
    child = ctx.Process(target=_take_lock_and_die, args=(target,))
    child.start()
    child.join(timeout=60)
    with writer_lock(target):  # the kernel dropped the dead holder's flock
        pass


# ---------------------------------------------------------------------------------------------- reading


def test_reads_refuse_what_is_not_a_regular_file_within_the_cap(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    big = tmp_path / "big.json"
    big.write_text(" " * 2000)
    cases = [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (tmp_path, "is a directory"),
             (tmp_path / "none.json", "does not exist"), (deep, "nested too deeply")]
    for path, message in cases:
        with pytest.raises(WeightsError, match=message):
            read_json(path, "config.json", error=WeightsError)
    with pytest.raises(WeightsError, match="2,000 bytes, more than the 1,000 allowed"):
        read_json(big, "config.json", max_bytes=1000, error=WeightsError)


def test_a_users_file_named_like_the_lock_is_never_touched(tmp_path):
    user = tmp_path / "out.safetensors.lock"
    user.write_text("my notes")
    with pytest.raises(OutputError, match="not a tinygpt lock file"):
        with writer_lock(tmp_path / "out.safetensors"):
            pass
    assert user.read_text() == "my notes"
