"""Shared test setup: float32 matmuls at full precision, hypothesis profiles, tiny configs."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (hf_oracle, ...)

# Hypothesis profiles (README, "Tests"). Every property test runs the active profile's max_examples unless it
# sets its own (the heavy ones run fewer); the core invariants (`core_invariant`, listed in
# tests/test_hypothesis_profiles.py) run CORE_EXAMPLES[profile] instead. Shrinking stays on in every profile.
#   dev       the default (`python -m pytest`): random examples; failures are saved in .hypothesis/ and replayed
#   ci        what .ci/run selects (`python -m pytest --hypothesis-profile=ci`): derandomized, so every run
#             tries the same examples; 200 examples per core invariant
#   thorough  for local runs before a release (`python -m pytest --hypothesis-profile=thorough`; the core
#             invariants alone take about 7 minutes on 2 cores): random, 100 examples per property test, 2000
#             per core invariant
# A profile is selected by --hypothesis-profile=NAME (hypothesis' pytest plugin; `pytest_configure` below
# makes sure it wins), else by the environment: HYPOTHESIS_PROFILE=NAME, else "ci" when CI is set, else dev.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILES = {
    "dev": dict(max_examples=15),
    "ci": dict(max_examples=10, derandomize=True, print_blob=True),  # 10: CI has 20 minutes on 2 cores
    "thorough": dict(max_examples=100, print_blob=True),
}
CORE_EXAMPLES = {"dev": 25, "ci": 200, "thorough": 2000}
for _name, _options in PROFILES.items():
    settings.register_profile(_name, **_COMMON, **_options)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    """--hypothesis-profile wins over the environment, also were this file imported after the plugin ran."""
    profile = config.getoption("--hypothesis-profile", default=None)
    if profile:
        settings.load_profile(profile)


def core_examples(profile: str | None = None) -> int:
    """Examples per core invariant under `profile` (default: the active one); a profile not in
    CORE_EXAMPLES (hypothesis' own, or one registered elsewhere) gives its own max_examples."""
    name = profile or settings.get_current_profile_name()
    return CORE_EXAMPLES[name] if name in CORE_EXAMPLES else settings.get_profile(name).max_examples


def core_invariant(test):
    """Decorator, above @given, for the core invariants: CORE_EXAMPLES of the active profile, the
    profile's other settings unchanged. Give them small fixed shapes and draw values (seeds, token ids,
    masks, layers, positions), so the examples reuse a few compiled programs."""
    test = settings(max_examples=core_examples())(test)
    test.core_invariant = True
    return test


REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden"


@pytest.fixture(scope="session")
def tiny_config():
    import tinygpt

    return tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=64, n_ctx=16, vocab_size=50)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. XLA's CPU backend maps each live executable into
    memory (code, constants, data: 3 mappings); the whole suite compiles tens of thousands of programs, and
    one process holding them all passed Linux's vm.max_map_count (65530), where LLVM aborted the run."""
    yield
    jax.clear_caches()
    gc.collect()
