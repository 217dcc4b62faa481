"""Sharded forwards and sweeps (tinygpt.sharding) give the single-device results.

The sharded runs happen in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=4
(the flag must be set before jax starts, and this process's jax already has one device): it runs this file
as a script, which saves every result and where its pieces lived. The tests compare them here, against the
same computations on this process's single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 4
CONFIG = dict(n_layer=2, n_head=4, d_model=32, d_head=8, d_mlp=128, n_ctx=16, vocab_size=97)
KEEP = ("resid_pre", "attn_pattern", "z", "mlp_post", "resid_post", "logits")


def inputs():
    """Everything both processes compute from: config, params, token batches, sweep indices."""
    import jax

    import tinygpt

    config = tinygpt.Config(**CONFIG)
    params = tinygpt.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens8 = rng.integers(0, config.vocab_size, (8, 16)).astype(np.int32)  # 2 sequences per device
    tokens6 = rng.integers(0, config.vocab_size, (6, 16)).astype(np.int32)  # padded to 8
    mask6 = np.ones((6, 16), np.int32)
    mask6[1, :5] = 0  # a left-padded row
    targets = rng.integers(0, config.vocab_size, (6,)).astype(np.int32)
    heads = np.stack(np.meshgrid(np.arange(config.n_layer), np.arange(config.n_head), indexing="ij"), -1)
    heads = np.concatenate([heads.reshape(-1, 2), [[1, 3], [0, 0]]]).astype(np.int32)  # 10 runs: 4 x 3 padded
    return config, params, tokens8, tokens6, mask6, targets, heads


def ablation_scores(heads, params, tokens, targets, config):
    """Log-prob of the targets at the last position with head (layer, head) of each row of `heads` zeroed:
    a vmapped reference forward with an edit.  -> [n, batch]"""
    import jax
    import jax.numpy as jnp

    import tinygpt

    def one(layer_head):
        def zero_head(z, layer):  # z [batch, seq, head, d_head]
            hit = (layer == layer_head[0]) & (jnp.arange(z.shape[2]) == layer_head[1])
            return jnp.where(hit[None, None, :, None], 0.0, z)

        logits = tinygpt.forward(params, tokens, config, edits={"z": zero_head}, keep=("logits",)).logits
        return jnp.take_along_axis(jax.nn.log_softmax(logits[:, -1]), targets[:, None], axis=-1)[:, 0]

    return jax.vmap(one)(heads)


# --------------------------------------------------------------------------------- the 4-device process


def sharded_runs(out_path: str) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets it here
    from tinygpt import sharding

    assert len(jax.devices()) == DEVICES, jax.devices()
    config, params, tokens8, tokens6, mask6, targets, heads = inputs()
    mesh = sharding.device_mesh()
    params = sharding.replicate(params, mesh)
    out, spread = {}, {}

    def record(name, value):
        out[name] = np.asarray(value)
        spread[name] = len(value.sharding.device_set)

    trace8 = sharding.sharded_forward(params, tokens8, config, keep=KEEP, mesh=mesh)
    trace6 = sharding.sharded_forward(params, tokens6, config, keep=KEEP, attention_mask=mask6, mesh=mesh)
    for site in KEEP:
        record(f"forward8/{site}", getattr(trace8, site))
        record(f"forward6/{site}", getattr(trace6, site))
    compact6 = sharding.sharded_forward(params, tokens6, config, attention_mask=mask6, mesh=mesh, compact=True)
    out["compact6/derived"] = np.asarray(compact6.derived())
    for site in compact6.kept():  # derived sites computed from the split stored ones (the padding cut first)
        record(f"compact6/{site}", getattr(compact6, site))

    def sweep_fn(chunk, params, tokens, targets):
        return ablation_scores(chunk, params, tokens, targets, config)

    record("sweep/whole", sharding.sharded_sweep(sweep_fn, heads, params, tokens6, targets, mesh=mesh))
    record("sweep/chunks_out_axis1", sharding.sharded_sweep(lambda h, *a: sweep_fn(h, *a).T, heads, params,
                                                            tokens6, targets, mesh=mesh, chunk_size=2, out_axis=1))

    @jax.jit
    def inside_jit(params, tokens, targets):  # fn closes over the caller's traced values
        return sharding.sharded_sweep(lambda h: ablation_scores(h, params, tokens, targets, config),
                                      jnp.asarray(heads), mesh=mesh, chunk_size=2)

    record("sweep/inside_jit", inside_jit(params, tokens6, targets))

    @jax.jit
    def even_sweep(params, tokens, targets):  # 8 runs: 2 per device, no padding to cut
        return sharding.sharded_sweep(lambda h: ablation_scores(h, params, tokens, targets, config),
                                      jnp.asarray(heads[:8]), mesh=mesh)

    compiled = even_sweep.lower(params, tokens6, targets).compile()
    hlo = compiled.as_text()
    one_device = jax.jit(lambda p: ablation_scores(jnp.asarray(heads[:8]), p, tokens6, targets, config)).lower(
        jax.device_put(inputs()[1], jax.devices()[0])).compile()
    flops_share = _flops(compiled) / _flops(one_device)
    # the probes' sweeps split their swept axis over every device (tinygpt.sweep.sweep_grid)
    from probes.ablation import ablation_sweep

    out["probe/head_sweep"] = ablation_sweep(params, tokens6, config, metric="log_prob", answer=3).values
    errors = {}
    try:
        sharding.shard_batch(tokens6[:5], mesh)
    except ValueError as e:
        errors["shard_batch"] = str(e)
    np.savez(out_path, **out)
    collectives = sum(hlo.count(op) for op in ("all-reduce(", "all-gather(", "all-to-all(", "collective-permute("))
    print(json.dumps({"spread": spread, "errors": errors, "collectives_in_sweep": collectives,
                      "flops_share": flops_share}))


def _flops(compiled) -> float:
    """FLOPs of one device's program, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("sharding") / "sharded.npz"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, str(out_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(np.load(out_path)), report


@pytest.fixture(scope="module")
def single():
    return inputs()


def test_every_result_was_split_over_all_devices(sharded):
    _, report = sharded
    assert report["spread"] and set(report["spread"].values()) == {DEVICES}, report["spread"]


def test_sharded_forward_equals_each_devices_slice_run_alone(sharded, single):
    """Each device runs its 2 sequences as one device runs them: bitwise the same values."""
    import tinygpt

    values, _ = sharded
    config, params, tokens8, *_ = single
    for device in range(DEVICES):
        rows = slice(2 * device, 2 * device + 2)
        alone = tinygpt.forward(params, tokens8[rows], config, keep=KEEP)
        for site in KEEP:
            ours = values[f"forward8/{site}"]
            ours = ours[:, rows] if site != "logits" else ours[rows]
            np.testing.assert_array_equal(ours, np.asarray(getattr(alone, site)), err_msg=site)


def test_sharded_forward_equals_single_device_forward(sharded, single):
    """The whole batch at once on one device (different matrix shapes, so equal to float rounding), with an
    uneven batch padded and cut and a left-padded row."""
    import tinygpt

    values, _ = sharded
    config, params, tokens8, tokens6, mask6, *_ = single
    for name, tokens, mask in (("forward8", tokens8, None), ("forward6", tokens6, mask6)):
        reference = tinygpt.forward(params, tokens, config, keep=KEEP, attention_mask=mask)
        for site in KEEP:
            expected = np.asarray(getattr(reference, site))
            assert values[f"{name}/{site}"].shape == expected.shape, (name, site)
            np.testing.assert_allclose(values[f"{name}/{site}"], expected, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} {site}")


def test_sharded_compact_trace_equals_single_device_forward(sharded, single):
    """A compact trace of every site, sharded over an uneven batch: the derived sites (computed from the
    split, cut stored sites and the replicated weights) equal the single-device forward's."""
    import tinygpt
    from tinygpt.sites import SITE_NAMES

    values, _ = sharded
    config, params, _, tokens6, mask6, *_ = single
    assert set(values["compact6/derived"]) == {"ln1", "attn_scores", "attn_pattern", "head_out", "resid_mid", "ln2",
                                               "mlp_post", "resid_post"}
    reference = tinygpt.forward(params, tokens6, config, attention_mask=mask6)
    for site in SITE_NAMES:
        expected = np.asarray(getattr(reference, site))
        np.testing.assert_allclose(values[f"compact6/{site}"], expected, rtol=1e-5, atol=1e-5, err_msg=site)


def test_sharded_sweep_equals_single_device_sweep(sharded, single):
    import jax

    values, _ = sharded
    config, params, _, tokens6, _, targets, heads = single
    reference = np.asarray(jax.jit(ablation_scores, static_argnums=4)(heads, params, tokens6, targets, config))
    assert reference.shape == (len(heads), 6)
    for name in ("sweep/whole", "sweep/inside_jit"):
        np.testing.assert_allclose(values[name], reference, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(values["sweep/chunks_out_axis1"], reference.T, rtol=1e-5, atol=1e-5)
    # zeroing a head changes the scores: the sweep is not comparing an unedited run with itself
    assert np.ptp(reference, axis=0).min() > 0


def test_sweep_splits_the_work_without_communication(sharded):
    """Each device computes its own entries: a quarter of the one-device FLOPs, and no collective in the
    program (a swept size that needs padding adds one gather of the result, to cut the padding)."""
    _, report = sharded
    assert report["collectives_in_sweep"] == 0
    assert abs(report["flops_share"] - 1 / DEVICES) < 0.02, report["flops_share"]


def test_uneven_shard_is_refused(sharded):
    _, report = sharded
    assert "does not divide over 4 devices" in report["errors"]["shard_batch"]


def test_one_device_mesh_is_the_plain_forward(single):
    import jax

    import tinygpt
    from tinygpt import sharding

    config, params, tokens8, *_ = single
    mesh = sharding.device_mesh(devices=jax.devices()[:1])
    ours = sharding.sharded_forward(params, tokens8, config, keep=("resid_post", "logits"), mesh=mesh)
    plain = tinygpt.forward(params, tokens8, config, keep=("resid_post", "logits"))
    np.testing.assert_array_equal(np.asarray(ours.resid_post), np.asarray(plain.resid_post))
    np.testing.assert_array_equal(np.asarray(ours.logits), np.asarray(plain.logits))


def test_bad_arguments():
    from tinygpt import sharding

    with pytest.raises(ValueError, match="share their leading axis"):
        sharding.pad_to_multiple((np.zeros(3), np.zeros(4)), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        sharding.sharded_sweep(lambda i: i, np.arange(4), chunk_size=0)
    padded, n = sharding.pad_to_multiple(np.arange(5), 4)
    assert n == 5 and padded.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


if __name__ == "__main__":
    sharded_runs(sys.argv[1])


def test_probe_head_sweep_on_four_devices_equals_one_device(sharded, single):
    """tinygpt.sweep shards a probe's swept axis when several devices exist: same scores as on one."""
    from probes.ablation import ablation_sweep

    values, _ = sharded
    config, params, _, tokens6, *_ = single
    reference = ablation_sweep(params, tokens6, config, metric="log_prob", answer=3).values
    np.testing.assert_allclose(values["probe/head_sweep"], reference, rtol=1e-5, atol=1e-5)
    assert np.ptp(reference) > 0
