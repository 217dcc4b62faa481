"""Random GPT-2 weights for property tests: now `tinygpt.testing.random_params` (tinygpt/testing/arrays.py).

Kept so that test files importing `random_weights` still run; import from `tinygpt.testing` instead."""

from tinygpt.testing import random_params  # noqa: F401
