"""Running batched forwards and sweeps on every device, with JAX's own distributed machinery.

A sweep (over heads, layers, positions, ...) and a batched forward are the same computation repeated over
one leading axis, with nothing shared between the entries but the (read-only) parameters. So that axis is
split over a one-axis device `Mesh`, the parameters are replicated to every device, and each device runs
its slice: one CPU, 8 GPUs or a TPU pod slice, with the same call. There is no hand-written communication:
`jax.jit` partitions a batched forward from its inputs' `NamedSharding`s; a sweep's swept axis is reshaped
to [device, entry], vmapped with `spmd_axis_name` and pinned to the devices by sharding constraints, so
XLA's partitioner runs the sweep's own function on each device's entries (tests/test_sharding.py checks
that the compiled program has no collective and that each device does 1/N of the FLOPs).

    mesh = device_mesh()                                  # all devices, one axis named "batch"
    trace = sharded_forward(params, tokens, config, keep=["resid_post"], mesh=mesh)
    scores = sharded_sweep(run_many, heads, params, tokens, mesh=mesh, chunk_size=16)

A leading axis that does not divide by the number of devices is padded by repeating its last entry, and the
padding is cut from the results, so any batch or sweep size works. Results equal the single-device run
(tests/test_sharding.py checks it on 4 simulated CPU devices).

Several processes (a TPU pod slice, several GPU hosts, started with `tinygpt.distributed.initialize`):
`jax.devices()`, and so the default mesh, spans every process's devices. Every process calls with the same
full inputs; `put` builds each global array from the slices its own devices hold. A sweep's results are
gathered to every process: the program ends with one all-gather of its (small) results, so under `jax.jit`
they come out replicated on every device, and an eager `sharded_sweep` returns them as this process's own
arrays, the same on every process. `sharded_forward`'s trace stays split over the processes (a trace is
large: each process reads the rows it holds, or all of them with `gather`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import Config
from . import model
from .compiled import at_top_level
from .inputs import check_inputs
from .recorder import normalize_keep
from .sites import SITES
from .trace import Trace, derived_sites, forward_trace
from .errors import InputError

BATCH = "batch"


# ---------------------------------------------------------------------------------------------- the mesh


def device_mesh(axis: str = BATCH, devices=None) -> Mesh:
    """A one-axis mesh over `devices` (default: every device of every process), the axis named `axis`."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise InputError("device_mesh needs at least one device")
    return Mesh(np.asarray(devices), (axis,))


def mesh_axis(mesh: Mesh) -> str:
    """The name of a one-axis mesh's axis."""
    if len(mesh.axis_names) != 1:
        raise InputError(f"expected a one-axis mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def split_along(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Array axis `axis` split over the mesh's devices, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), mesh_axis(mesh)))


def put(x, sharding: NamedSharding) -> jax.Array:
    """`x` placed with `sharding`. An array already placed so is returned as it is (no copy); a host array
    is built from the slices this process's devices hold, so the same call works with several processes."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Every array of a pytree (the params) on every device of the mesh; a no-op when already there, so
    replicating the params once up front makes later calls free."""
    return jax.tree_util.tree_map(lambda x: put(x, replicated(mesh)), tree)


def shard_batch(x, mesh: Mesh, axis: int = 0) -> jax.Array:
    """`x` with array axis `axis` split over the mesh's devices; its size must divide by the device count
    (see `pad_to_multiple`)."""
    size, n = np.shape(x)[axis], mesh.size
    if size % n:
        raise InputError(f"axis {axis} has size {size}, which does not divide over {n} devices; "
                         "pad it first (pad_to_multiple)")
    return put(x, split_along(mesh, axis))


def gather(x) -> np.ndarray:
    """The whole of a (possibly sharded, possibly multi-process) array as a numpy array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def pad_to_multiple(tree, multiple: int):
    """Pad the leading axis of every array of `tree` (all the same size n) to a multiple of `multiple` by
    repeating the last entry. Returns (padded tree, n)."""
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = {np.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise InputError(f"the arrays to split must share their leading axis, got sizes {sorted(sizes)}")
    (n,) = sizes
    if n == 0:
        raise InputError("nothing to split: the leading axis is empty")
    extra = -n % multiple
    if extra == 0:
        return tree, n

    def pad(x):  # numpy stays numpy (host data for `put`); jax arrays, traced ones included, stay jax
        xp = jnp if isinstance(x, jax.Array) else np
        x = xp.asarray(x)
        return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, tree), n


# ------------------------------------------------------------------------------------- batched forward


def sharded_forward(params, tokens, config: Config, *, keep=None, attention_mask=None,
                    mesh: Mesh | None = None, compact: bool = False) -> Trace:
    """`tinygpt.forward` with the batch split over the mesh's devices (default: all) and the params
    replicated. The trace comes back split along its batch axis (axis 1 of per-layer sites, 0 of the
    others), each device holding its own sequences' values; `jax.jit` partitions the program from those
    shardings. Replicate the params once with `replicate(params, mesh)` to make repeated calls copy-free.
    Called eagerly, like `make_forward`'s function; inside your own `jax.jit`, call `tinygpt.forward` on
    inputs placed with `replicate` / `shard_batch`, and the partitioner splits it the same way."""
    mesh = device_mesh() if mesh is None else mesh
    keep = normalize_keep(keep)
    derived = derived_sites(keep, {}) if compact else frozenset()
    tokens, attention_mask = check_inputs(tokens, attention_mask, config)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    (tokens, attention_mask), batch = pad_to_multiple((tokens, attention_mask), mesh.size)
    run = _sharded_forward_program(config, keep - derived, mesh)
    replicated_params = replicate(params, mesh)
    sites = run(replicated_params, shard_batch(tokens, mesh), shard_batch(attention_mask, mesh))
    if tokens.shape[0] != batch:  # drop the padding rows (before the weights join the trace's leaves)
        sites = {name: x[:, :batch] if SITES[name].per_layer else x[:batch] for name, x in sites.items()}
    return forward_trace(sites, derived, replicated_params, attention_mask[:batch])


@functools.lru_cache(maxsize=32)
def _sharded_forward_program(config: Config, store: frozenset, mesh: Mesh):
    """`model.forward` storing the sites `store`, each split along its batch axis (1 for per-layer sites)."""
    by_layer, by_batch = split_along(mesh, 1), split_along(mesh, 0)
    out_shardings = {name: by_layer if SITES[name].per_layer else by_batch for name in store}

    def run(params, tokens, attention_mask):
        return model.forward(params, tokens, config, attention_mask=attention_mask, keep=store)

    return jax.jit(run, out_shardings=out_shardings)


# ------------------------------------------------------------------------------------------------ sweeps


def sharded_sweep(fn: Callable[..., Any], indices, *args, mesh: Mesh | None = None,
                  chunk_size: int | None = None, out_axis: int = 0):
    """`fn(indices, *args)` with the swept axis split over the mesh's devices (default: all).

    fn          a function of (indices, *args) whose output entry i (along `out_axis` of every output)
                depends only on entry i of `indices` (a vmapped run, or runs batched together): it is
                called on each device's slice. It may close over arrays (the caller's traced values
                under `jax.jit` included): they are replicated like `args`.
    indices     a pytree of arrays sharing their leading (swept) size n: head ids, (layer, position)
                pairs, edit values, ...
    args        replicated to every device (params, tokens, ...): an array already replicated is not copied
    chunk_size  at most this many entries per step on each device, the steps run by `lax.map` inside the
                program: the memory budget of a sweep that would not fit at once (None: all at once)
    out_axis    the axis of fn's outputs that runs over the swept entries

    Returns fn's outputs for all n entries, split over the devices along `out_axis`; each entry computed
    as `fn` computes it on one device. Called eagerly, the compiled program is cached with `fn` as the key
    (pass the same function object to reuse it); under `jax.jit` it becomes part of the caller's program.
    With several processes the results are gathered to every process: eagerly, as arrays of this process
    (the same on every process); under `jax.jit`, replicated over the mesh."""
    mesh = device_mesh() if mesh is None else mesh
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    # every device gets the same number of entries, a whole number of chunks
    indices, n = pad_to_multiple(indices, mesh.size * (chunk_size or 1))
    padded = jax.tree_util.tree_leaves(indices)[0].shape[0]
    if at_top_level():
        program = _compiled_sweep(fn, mesh, chunk_size, out_axis)
        out = program(jax.tree_util.tree_map(lambda x: shard_batch(x, mesh), indices), replicate(args, mesh))
        if _spans_processes(mesh):  # replicated on every device: this process's copy, the padding cut
            return jax.tree_util.tree_map(
                lambda x: jnp.asarray(np.take(gather(x), np.arange(n), axis=out_axis)), out)
    else:  # inside the caller's jit: part of its program
        out = _on_every_device(fn, indices, args, mesh, chunk_size, out_axis)
    if padded == n:
        return out
    return jax.tree_util.tree_map(lambda x: lax.slice_in_dim(x, 0, n, axis=out_axis), out)


def _on_every_device(fn, indices, args, mesh: Mesh, chunk_size: int | None, out_axis: int):
    """fn over each device's slice of `indices`: the swept axis is reshaped to [device, entry], the device
    axis is vmapped with `spmd_axis_name` and pinned to the mesh axis by sharding constraints, so XLA's
    partitioner gives each device its own row and every intermediate (scan and loop carries included)
    stays split the same way; args and arrays fn closes over are replicated."""
    axis = mesh_axis(mesh)

    def on_one_device(indices):  # one device's entries
        if chunk_size is None:
            return fn(indices, *args)
        steps = jax.tree_util.tree_map(lambda x: x.reshape(-1, chunk_size, *x.shape[1:]), indices)
        out = lax.map(lambda chunk: fn(chunk, *args), steps)  # [steps, ..., chunk_size (at out_axis), ...]
        return jax.tree_util.tree_map(lambda x: _merge(jnp.moveaxis(x, 0, out_axis), out_axis), out)

    by_device = NamedSharding(mesh, PartitionSpec(axis))
    rows = jax.tree_util.tree_map(
        lambda x: lax.with_sharding_constraint(x.reshape(mesh.size, -1, *x.shape[1:]), by_device), indices)
    out = jax.vmap(on_one_device, spmd_axis_name=axis)(rows)  # [device, ..., entry (at out_axis + 1), ...]
    # several processes: gathered to every device (one all-gather), so that every process can read them
    if _spans_processes(mesh):
        split = replicated(mesh)
    else:
        split = NamedSharding(mesh, PartitionSpec(*([None] * out_axis), axis))
    return jax.tree_util.tree_map(
        lambda x: lax.with_sharding_constraint(_merge(jnp.moveaxis(x, 0, out_axis), out_axis), split), out)


def _spans_processes(mesh: Mesh) -> bool:
    """Whether the mesh holds devices of more than one process."""
    return len({device.process_index for device in mesh.devices.flat}) > 1


def _merge(x, axis: int):
    """Axes `axis` and `axis + 1` of x merged into one (row-major)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


@functools.lru_cache(maxsize=16)
def _compiled_sweep(fn, mesh: Mesh, chunk_size: int | None, out_axis: int):
    return jax.jit(lambda indices, args: _on_every_device(fn, indices, args, mesh, chunk_size, out_axis))
