"""Property testing for GPT-2 code: hypothesis strategies and the engine's invariants as reusable checks.

    from hypothesis import given, settings, strategies as st
    from tinygpt.testing import check_causal, configs, edit_values, params, token_batches

    @settings(max_examples=10, deadline=None)
    @given(data=st.data())
    def test_edits_keep_the_forward_causal(data):
        config = data.draw(configs())
        tokens, mask = data.draw(token_batches(config, seq=(2, 8)))
        weights, edits = data.draw(params(config)), data.draw(edit_values(config))
        check_causal(weights, config, tokens, mask, edits=edits, require_change=False)  # a Zero may erase tokens

Strategies (`tinygpt.testing.strategies`, need hypothesis: `pip install 'tinygpt[test]'`): `configs`,
`params`, `token_batches`, `edits` (function edits), `edit_values` (`tinygpt.edits` values). Checks
(`tinygpt.testing.invariants`, need only jax and numpy, so they import without hypothesis): `check_causal`,
`check_residual_decomposition`, `check_head_sums`, `check_attention_patterns`, `check_padding_invariance`,
`check_identity_edit`, `check_jit_equals_eager`, `check_sweep_equals_single_runs`,
`check_position_sweep_equals_single_runs`, and the comparisons they use, `assert_close` and `assert_bitwise`.
Random weights and tokens from a seed, without hypothesis: `random_params`, `random_tokens`.

The strategies are imported on first use: without hypothesis, `from tinygpt.testing import check_causal` works
and `from tinygpt.testing import configs` raises `MissingDependencyError` (an ImportError) with the install
command. See docs/engine.md, "Property-testing your own probe".
"""

from __future__ import annotations

import importlib

from .arrays import left_padding_mask, random_params, random_tokens
from .invariants import (assert_bitwise, assert_close, check_attention_patterns, check_causal, check_head_sums,
                         check_identity_edit, check_jit_equals_eager, check_padding_invariance,
                         check_position_sweep_equals_single_runs, check_residual_decomposition,
                         check_sweep_equals_single_runs)

STRATEGIES = ("configs", "params", "token_batches", "edits", "edit_values", "SiteEdit", "EDITABLE_SITES")

__all__ = ["left_padding_mask", "random_params", "random_tokens", "assert_bitwise", "assert_close",
           "check_attention_patterns", "check_causal", "check_head_sums", "check_identity_edit",
           "check_jit_equals_eager", "check_padding_invariance", "check_position_sweep_equals_single_runs",
           "check_residual_decomposition", "check_sweep_equals_single_runs"]
# The strategies stay out of __all__: `from tinygpt.testing import *` must work without hypothesis (they are
# imported by name, `from tinygpt.testing import configs`, on first use).


def __getattr__(name):
    """The strategies, imported from `tinygpt.testing.strategies` when first asked for (it needs hypothesis)."""
    if name in STRATEGIES or name == "strategies":
        strategies = importlib.import_module(".strategies", __name__)
        return strategies if name == "strategies" else getattr(strategies, name)
    raise AttributeError(f"module 'tinygpt.testing' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(STRATEGIES))
