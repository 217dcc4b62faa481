"""Several processes, one computation: tinygpt on JAX's multi-controller runtime (`jax.distributed`).

A TPU pod slice is always several hosts, and a GPU job past one machine is several processes; JAX runs
them as one program: every process runs the same Python, `jax.devices()` lists the devices of all of them,
and a jitted function over arrays placed on a mesh of all those devices runs on every device at once, its
communication compiled in. This module starts that runtime and names the mesh; the rest of tinygpt then
works on it unchanged:

    from tinygpt import distributed
    distributed.initialize()                   # every process, before anything else touches jax
    mesh = distributed.global_mesh()           # every device of every process, one axis "batch"

What each heavy path does with several processes (docs/distributed.md has the launch recipes):

    sweeps    `tinygpt.sharding.sharded_sweep` (and so `tinygpt.sweep`'s unit and position sweeps, and the
              ablation, patching and tracing probes) split the swept axis over every device of every
              process; the results are gathered, so every process gets the whole result, the same values.
    harvest   `probes.harvest.harvest` gives each process a contiguous slice of the corpus windows, written
              to its own shard files of one directory; process 0 writes the manifest after a barrier.
    SAEs      `probes.sae.train_sae` splits every batch over all devices with the SAE's parameters
              replicated: data parallel, the gradient's mean over the whole batch formed by the compiled
              program.

Every process must call these with the same arguments (the same corpus, seed, config): multi-controller
JAX is one program, and a process that takes another branch leaves its peers waiting at a collective.
Every wait here is bounded: joining and barriers by `timeout_s`, and a peer that dies is declared dead after
`heartbeat_timeout_s`, so the others fail with an error, never hang.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh

from .errors import InputError, TinyGPTError
from .sharding import BATCH, device_mesh

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "TINYGPT_COORDINATOR", "TINYGPT_NUM_PROCESSES", "TINYGPT_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300  # waiting for the peers to start, and at a barrier
DEFAULT_HEARTBEAT_S = 100  # a peer silent this long is dead: the others stop with an error


class BarrierError(TinyGPTError, TimeoutError):
    """Not every process reached a barrier in time, or one was reported dead: the run cannot go on."""


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands: its id in [0, count), the number of processes, and the wait bound."""

    process_id: int
    count: int
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes what is written once (a harvest's manifest)."""
        return self.process_id == 0


_state: Processes | None = None
_barriers = 0  # barriers passed so far


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} must be an integer") from None


def _check_settings(address, count, rank) -> None:
    """InputError naming the argument (and its flag and environment variable) for a coordinator address that is
    not "host:port" or a process count or id that is not a whole number in range."""
    if not isinstance(address, str) or address.count(":") < 1 or not address.rpartition(":")[0]:
        raise InputError(f"coordinator_address (--coordinator, {COORDINATOR}) must be 'host:port', got {address!r}")
    port = address.rpartition(":")[2]
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"coordinator_address (--coordinator, {COORDINATOR}) must be 'host:port' with a port in "
                         f"1 .. 65535, got {address!r}")
    for name, flag, env, value in (("num_processes", "--num-processes", NUM_PROCESSES, count),
                                   ("process_id", "--process-id", PROCESS_ID, rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} ({flag}, {env}) must be an int, got {value!r}")
    if count < 1:
        raise InputError(f"num_processes (--num-processes, {NUM_PROCESSES}) must be at least 1, got {count}")
    if not 0 <= rank < count:
        raise InputError(f"process id {rank} is outside [0, {count}): process_id (--process-id, {PROCESS_ID}) "
                         f"must be below num_processes")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout_s: int = DEFAULT_TIMEOUT_S,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S) -> Processes:
    """Join this process to the others: `jax.distributed.initialize`, with tinygpt's defaults.

    coordinator_address  "host:port" of process 0, where the coordination service listens (every process
                         gives the same); default: $TINYGPT_COORDINATOR
    num_processes        how many processes take part; default: $TINYGPT_NUM_PROCESSES
    process_id           this one's id in [0, num_processes); default: $TINYGPT_PROCESS_ID
    local_device_ids     the devices this process drives (default: all it sees), e.g. one GPU per process
    timeout_s            the longest wait for every process to join (past it JAX's runtime ends this process
                         with its own error log) and, through `barrier`, at a barrier
    heartbeat_timeout_s  a process silent this long is considered dead, and the others stop with an error
                         (JAX's runtime ends them)

    With none of the three settings, given or in the environment, JAX detects the cluster itself: SLURM
    (srun sets SLURM_* for every task), Open MPI, TPU pod slices (Cloud TPU metadata), and others. Giving
    some of the three but not all is an error naming the missing one.

    Call it first, before any other use of jax (before a model is loaded): JAX fixes its devices on first
    use. CPU processes talk through gloo (set here: `jax_cpu_collectives_implementation`), so the same
    code runs on one machine's CPUs as on a cluster's accelerators. Calling it again with the same settings
    returns the same `Processes`; with other settings, an error. Returns where this process stands."""
    global _state
    given = {COORDINATOR: coordinator_address, NUM_PROCESSES: num_processes, PROCESS_ID: process_id}
    if given[COORDINATOR] is None:
        given[COORDINATOR] = os.environ.get(COORDINATOR) or None
    for name in (NUM_PROCESSES, PROCESS_ID):
        if given[name] is None:
            given[name] = _env_int(name)
    if not (isinstance(timeout_s, int) and timeout_s >= 1 and isinstance(heartbeat_timeout_s, int)
            and heartbeat_timeout_s >= 1):
        raise InputError(f"timeout_s and heartbeat_timeout_s must be whole seconds >= 1, got {timeout_s!r} and "
                         f"{heartbeat_timeout_s!r}")
    missing = [name for name, value in given.items() if value is None]
    if 0 < len(missing) < 3:
        raise InputError(f"the process settings are incomplete: set {', '.join(missing)} (or pass them) as well as "
                         f"{', '.join(n for n in given if n not in missing)}, or none of the three to let JAX detect "
                         f"the cluster")
    count, rank = given[NUM_PROCESSES], given[PROCESS_ID]
    if count is not None:
        _check_settings(given[COORDINATOR], count, rank)
    if _state is not None:
        if count is not None and (count, rank) != (_state.count, _state.process_id):
            raise InputError(f"this process already joined as process {_state.process_id} of {_state.count}; it "
                             f"cannot become process {rank} of {count}")
        return _state
    # CPU devices of different processes exchange data through gloo; accelerators use their own transport
    # and ignore this setting
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(given[COORDINATOR], count, rank, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "backend" in str(e).lower():
            raise InputError("tinygpt.distributed.initialize must run before anything else uses jax (before a model "
                             "is loaded): call it first") from e
        raise
    except ValueError as e:  # JAX found no cluster to join, or refused the settings given
        if count is None:
            raise InputError(f"no process settings and no cluster detected ({e}): give the coordinator address, "
                             f"the number of processes and this process's id (--coordinator, --num-processes, "
                             f"--process-id, or {COORDINATOR}, {NUM_PROCESSES}, {PROCESS_ID})") from e
        raise InputError(f"JAX refused the process settings coordinator_address={given[COORDINATOR]!r}, "
                         f"num_processes={count}, process_id={rank}: {str(e).splitlines()[0] if str(e) else e!r} "
                         f"(--coordinator, --num-processes, --process-id, or {COORDINATOR}, {NUM_PROCESSES}, "
                         f"{PROCESS_ID})") from e
    _state = Processes(jax.process_index(), jax.process_count(), timeout_s)
    return _state


def processes() -> Processes:
    """Where this process stands: after `initialize`, its settings; otherwise process 0 of 1 (or of
    however many JAX was joined to directly with `jax.distributed.initialize`)."""
    if _state is not None:
        return _state
    return Processes(jax.process_index(), jax.process_count())


def global_mesh(axis: str = BATCH) -> Mesh:
    """A one-axis mesh over every device of every process, process 0's devices first (`jax.devices()`'s
    order): the mesh every sweep, harvest and SAE step spreads over by default."""
    return device_mesh(axis, jax.devices())


def barrier(name: str, timeout_s: int | None = None) -> None:
    """Wait until every process reaches the barrier `name` (each must use the same name, once), at most
    `timeout_s` seconds (default: initialize's); a peer that never arrives, or is reported dead, is a
    BarrierError (a TimeoutError) naming the barrier. One process: returns at once."""
    global _barriers
    if jax.process_count() == 1:
        return
    timeout_s = processes().timeout_s if timeout_s is None else timeout_s
    _barriers += 1  # every process passes the same barriers in the same order: a unique id per use
    name = f"{name} #{_barriers}"
    from jax._src import distributed as jax_distributed  # the coordination service's client: a bounded wait

    client = jax_distributed.global_state.client
    if client is None:  # joined some other way: a collective over every device, bounded by the heartbeat
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    try:
        client.wait_at_barrier(name, timeout_s * 1000)
    except Exception as e:  # jax's runtime error: DEADLINE_EXCEEDED, or a peer reported dead
        why = (f"not every process arrived within {timeout_s} s" if "DEADLINE_EXCEEDED" in str(e) else
               "another process failed")
        raise BarrierError(f"process {jax.process_index()} stopped at barrier {name!r}: {why} (see the other "
                           f"processes' logs): {str(e).splitlines()[0]}") from e


def shutdown() -> None:
    """Leave the runtime (every process, at the end); a no-op when `initialize` was not called."""
    global _state
    if _state is not None:
        jax.distributed.shutdown()
        _state = None
