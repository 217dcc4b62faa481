"""Shared test setup: float32 matmuls at full precision, hypothesis profiles, tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (hf_oracle, ...)

# Every property test is deterministic in CI (same examples each run); locally hypothesis explores.
settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden"


@pytest.fixture(scope="session")
def tiny_config():
    import tinygpt

    return tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=64, n_ctx=16, vocab_size=50)
