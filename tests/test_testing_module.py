"""tinygpt.testing, the public property-testing module: its names, its strategies' draws, that every check
passes on the engine and fails on a deliberately broken input, and that hypothesis stays a test-only
dependency.

One small config and one token shape for the checks (a few compiled programs); the broken inputs are edits
(every check but the sweeps' takes `edits=`) or, for the sweeps, a sweep made wrong by 1e-3.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tinygpt
from tinygpt import sweep, testing
from tinygpt.params import check_params
from tinygpt.sites import SITES
from tinygpt.testing import invariants
from tinygpt.testing.strategies import (EDITABLE_SITES, SiteEdit, configs, edit_values, edits, params,
                                        token_batches)
from conftest import REPO

CFG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=24, n_ctx=10, vocab_size=37)
BATCH, SEQ = 2, 6
PADS = [0, 2]  # row 1 is left-padded


@pytest.fixture(scope="module")
def inputs():
    """(params, tokens, mask) of CFG, row 1 left-padded."""
    tokens = testing.random_tokens(CFG, 1, (BATCH, SEQ))
    return testing.random_params(CFG, 0), tokens, testing.left_padding_mask(PADS, SEQ)


# -------------------------------------------------------------------------------------------------- names


def test_public_names():
    for name in testing.__all__:
        assert getattr(testing, name) is not None, name
    checks = [name for name in testing.__all__ if name.startswith("check_")]
    assert len(checks) == 9 and all(callable(getattr(testing, name)) for name in checks)
    assert testing.configs is configs and testing.strategies.edit_values is edit_values
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        testing.nothing  # noqa: B018


def test_hypothesis_is_a_test_dependency_only():
    """Without hypothesis: tinygpt and the checks import, and a strategy raises one ImportError with the
    install command; importing tinygpt (and running a forward) never imports hypothesis."""
    script = """
import sys
sys.modules["hypothesis"] = None  # as if not installed
import tinygpt, tinygpt.sweep, tinygpt.testing
from tinygpt.testing import check_causal, random_params
from tinygpt.testing import *  # noqa: F403 (no strategy in __all__: works without hypothesis)
assert "check_causal" in dir() and "configs" not in dir()
try:
    from tinygpt.testing import configs
except ImportError as e:
    print(type(e).__name__, e)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("MissingDependencyError"), result.stdout
    assert "hypothesis" in result.stdout and "[test]" in result.stdout and "pip install" in result.stdout
    imports = "import sys, tinygpt, tinygpt.compiled, tinygpt.sweep; print('hypothesis' in sys.modules)"
    clean = subprocess.run([sys.executable, "-c", imports], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert clean.stdout.strip() == "False", clean.stdout + clean.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- strategies


@settings(max_examples=30)
@given(data=st.data())
def test_strategies_draw_what_they_say(data):
    config = data.draw(configs(n_layer=2, n_head=(1, 2), d_head=(4, 5), d_mlp=(3, 7), vocab_size=(5, 9),
                               n_ctx=(3, 6)))
    assert config.n_layer == 2 and 1 <= config.n_head <= 2 and 4 <= config.d_head <= 5
    assert config.d_model == config.n_head * config.d_head and 3 <= config.d_mlp <= 7
    assert 5 <= config.vocab_size <= 9 and 3 <= config.n_ctx <= 6

    weights = data.draw(params(config))
    check_params(weights, config)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(weights))

    tokens, mask = data.draw(token_batches(config, batch=(1, 3)))
    assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == mask.shape
    assert ((0 <= tokens) & (tokens < config.vocab_size)).all()
    assert (np.diff(mask, axis=1) >= 0).all() and (mask[:, -1] == 1).all()  # 0s then 1s, a real token per row
    assert (data.draw(token_batches(config, padding=False))[1] == 1).all()

    for site, edit in data.draw(edits(config)).items():
        assert site in EDITABLE_SITES and isinstance(edit, SiteEdit)
        value = jnp.ones(tuple(range(2, 2 + len(SITES[site].shape))))
        assert edit(value, 0 if SITES[site].per_layer else None).shape == value.shape
    for edit in data.draw(edit_values(config)):
        assert edit.site in EDITABLE_SITES
        edit.check(config)  # every selection inside the model


def test_token_batches_reach_every_bound(tiny_config):
    """The bounds the draw test checks are reached, not only respected: hypothesis' `find` draws the smallest
    and largest batch and sequence, full-length padding (one real token) and a top-of-vocabulary id. A
    strategy stuck at one shape, or one that never pads, fails here."""
    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    strategy = token_batches(tiny_config, batch=(1, 3), seq=(2, 5))
    find_settings = settings(max_examples=2000, database=None)
    shapes = {find(strategy, lambda tm, b=b: tm[0].shape[0] == b, settings=find_settings)[0].shape[0]
              for b in (1, 2, 3)}
    assert shapes == {1, 2, 3}
    assert find(strategy, lambda tm: tm[0].shape[1] == 5, settings=find_settings)[0].shape[1] == 5
    assert find(strategy, lambda tm: tm[0].shape[1] == 2, settings=find_settings)[0].shape[1] == 2
    padded = find(strategy, lambda tm: (tm[1].sum(axis=1) == 1).any(), settings=find_settings)[1]
    assert (padded.sum(axis=1) == 1).any() and (padded[:, -1] == 1).all()
    top = find(strategy, lambda tm: (tm[0] == tiny_config.vocab_size - 1).any(), settings=find_settings)[0]
    assert (top == tiny_config.vocab_size - 1).any()
    beyond = settings(max_examples=300, database=None)
    for outside in (lambda tm: tm[0].shape[1] > 5, lambda tm: tm[0].shape[0] > 3):  # nothing past the bounds
        with pytest.raises(NoSuchExample):
            find(strategy, outside, settings=beyond)
    with pytest.raises(NoSuchExample):  # seq never longer than the config's n_ctx, whatever range is asked
        find(token_batches(tiny_config, seq=(1, 99)), lambda tm: tm[0].shape[1] > tiny_config.n_ctx, settings=beyond)


@settings(max_examples=1)
@given(data=st.data())
def test_strategies_refuse_bad_bounds(data):
    with pytest.raises(ValueError, match="n_layer must be a positive int or a \\(lo, hi\\) pair"):
        data.draw(configs(n_layer=(3, 1)))
    for bad in ((1, 2, 3), "2", 2.0, True):
        with pytest.raises(tinygpt.InputError, match="n_layer must be a positive int or a \\(lo, hi\\) pair"):
            data.draw(configs(n_layer=bad))
    assert data.draw(configs(n_layer=np.int64(2), n_head=[1, 1])).n_layer == 2
    assert all(isinstance(e, tinygpt.edits.Zero) for e in data.draw(edit_values(CFG, kinds="Zero", sites="mlp_out")))
    with pytest.raises(ValueError, match="longer than the config's n_ctx"):
        data.draw(token_batches(CFG, seq=CFG.n_ctx + 1))
    with pytest.raises(ValueError, match="unknown sites \\['nowhere'\\]"):
        data.draw(edits(CFG, sites=["nowhere"]))
    with pytest.raises(ValueError, match="unknown kinds \\['Patch'\\]"):
        data.draw(edit_values(CFG, kinds=["Patch"]))


@settings(max_examples=4)
@given(weights=params(CFG), batch=token_batches(CFG, batch=BATCH, seq=SEQ), edits=edit_values(CFG))
def test_drawn_edit_values_keep_the_forward_causal(weights, batch, edits):
    """Edit values compile once per structure (about 2 s each here): a few examples. An example whose edits
    erase the new tokens (a Zero or Set of the residual stream, a Scale by 0) passes the causality asserts and
    then proves nothing: it is discarded, not counted as a pass."""
    tokens, mask = batch
    try:
        testing.check_causal(weights, CFG, tokens, mask, edits=edits, position=SEQ - 2, require_change=True)
    except AssertionError as error:  # the causality asserts run first: only "proves nothing" is an erasure
        if "proves nothing" not in str(error):
            raise
        assume(False)


# ------------------------------------------------------------------------- every check passes, and can fail


def add_at_index_0(value, layer):
    """Not aimed at tokens: adds to array index 0, a padding position in a padded row."""
    return value.at[:, 0].add(1.0)


def knows_it_is_traced(value, layer):
    """Acts differently under jit (a tracer) and eagerly (an array)."""
    return value + (0.0 if isinstance(value, jax.core.Tracer) else 1.0)


BROKEN = {  # check -> (an input that breaks its property, what the failure names)
    "check_causal": (dict(edits={"attn_pattern": SiteEdit("add", 0.1)}), "at positions < 3"),  # attends later tokens
    "check_residual_decomposition": (dict(edits={"resid_mid": SiteEdit("add", 1.0, layer=1)}),
                                     r"resid_mid\[1\] = resid_pre \+ attn_out"),
    "check_head_sums": (dict(edits={"head_out": SiteEdit("scale", 2.0)}), r"head_out\[0\] = z @ W_O per head"),
    "check_attention_patterns": (dict(edits={"attn_pattern": SiteEdit("scale", 0.5)}), "pattern rows sum to 1"),
    "check_padding_invariance": (dict(edits={"resid_pre": add_at_index_0}), "batch row 1 "),
    "check_identity_edit": (dict(edit=SiteEdit("scale", 1.001), sites=("mlp_out",)),
                            "at mlp_out, keep=None: not bitwise identical"),
    "check_jit_equals_eager": (dict(edits={"embed": knows_it_is_traced}), "jit vs eager"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_check_passes_on_the_engine_and_fails_on_a_broken_input(name, inputs):
    check = getattr(testing, name)
    weights, tokens, mask = inputs
    check(weights, CFG, tokens, mask)
    broken, message = BROKEN[name]
    with pytest.raises(AssertionError, match=message):
        check(weights, CFG, tokens, mask, **broken)


def test_jit_equals_eager_compiles_once_for_repeated_edits(inputs):
    """Equal edits (fresh objects; new numbers in edit values) reuse the check's compiled program: one eager
    run per kind of edits (the costly half), then the jitted half called again as the check calls it."""
    from tinygpt.edits import Scale

    weights, tokens, mask = inputs
    values, functions = invariants._jit_forward_values, invariants._jit_forward_functions
    before = values._cache_size(), functions._cache_size()
    testing.check_jit_equals_eager(weights, CFG, tokens, mask, edits=[Scale("mlp_out", 1.5, layer=1)])
    testing.check_jit_equals_eager(weights, CFG, tokens, mask, edits={"mlp_out": SiteEdit("scale", 1.5)})
    assert (values._cache_size(), functions._cache_size()) == (before[0] + 1, before[1] + 1)
    values(weights, tokens, mask, [Scale("mlp_out", 0.5, layer=1)], config=CFG)
    functions(weights, tokens, mask, config=CFG, edits=invariants._hashable_edits({"mlp_out": SiteEdit("scale", 1.5)}))
    assert (values._cache_size(), functions._cache_size()) == (before[0] + 1, before[1] + 1)


def test_causal_check_needs_the_new_tokens_to_matter(inputs):
    weights, tokens, mask = inputs
    with pytest.raises(AssertionError, match="proves nothing"):  # zeroing the embeddings erases the tokens
        testing.check_causal(weights, CFG, tokens, mask, edits={"embed": SiteEdit("zero")})
    testing.check_causal(weights, CFG, tokens, mask, edits={"embed": SiteEdit("zero")}, require_change=False)


def off_by(function, amount):
    """`function` with `amount` added to its result."""
    return lambda *args, **kwargs: function(*args, **kwargs) + amount


@pytest.mark.parametrize("jitted, patched", [(invariants.unit_sweep, "sweep_units"),
                                             (invariants.position_sweeps, "sweep_positions")])
def test_sweep_checks_pass_on_the_engine_and_fail_on_a_wrong_sweep(inputs, monkeypatch, jitted, patched):
    weights, tokens, mask = inputs
    corrupt = testing.random_tokens(CFG, 2, (BATCH, SEQ))

    def run_check():
        if patched == "sweep_units":
            testing.check_sweep_equals_single_runs(weights, CFG, tokens, mask, site="mlp_post", axis="d_mlp",
                                                   answer=3, entries=[(0, 0), (1, 23)])
        else:
            testing.check_position_sweep_equals_single_runs(weights, CFG, tokens, corrupt,
                                                            sites=("resid_pre", "mlp_out"), windows=2, answer=3,
                                                            z=False, entries=[(0, 1, 4), (1, 0, 5)])

    run_check()
    monkeypatch.setattr(sweep, patched, off_by(getattr(sweep, patched), 1e-3))
    jitted.clear_cache()  # trace again, with the wrong sweep
    try:
        with pytest.raises(AssertionError):
            run_check()
    finally:
        jitted.clear_cache()  # no wrong program left behind


def test_comparisons_say_what_differs():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    testing.assert_close(a, a + 1e-7)
    with pytest.raises(AssertionError, match="the answer"):
        testing.assert_close(a, a + 1e-3, what="the answer")
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(a, a[0])
    testing.assert_bitwise(a, a.copy())
    with pytest.raises(AssertionError, match=r"the row: not bitwise identical \(max \|diff\| 0\.5\)"):
        testing.assert_bitwise(a, a + np.float32(0.5) * (a == 5), what="the row")
    with pytest.raises(AssertionError, match="float32"):
        testing.assert_bitwise(a, a.astype(np.float64))
