"""The hypothesis profiles (tests/conftest.py): CI selects the ci profile explicitly, and under it each core
invariant runs at least 200 examples, with shrinking on. Nobody can lower a count, drop a core invariant's
decorator, or change .ci/run's command without a failure here."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from conftest import CORE_EXAMPLES, PROFILES, REPO, core_examples

# Each core invariant of the engine and of its files -> its property tests (module, function).
CORE_INVARIANTS = {
    "causality": [("test_invariants", "test_causality_future_tokens_do_not_change_the_past")],
    "residual decomposition": [("test_invariants", "test_residual_stream_decomposes_into_component_writes")],
    "head sums": [("test_invariants", "test_attn_out_is_the_sum_of_head_writes")],
    "pattern rows": [("test_invariants", "test_attention_pattern_is_causal_and_normalized")],
    "padding invariance": [("test_invariants", "test_left_padding_matches_unpadded_single_runs")],
    "identity edits": [("test_invariants", "test_identity_edits_at_every_site_under_jit_are_bitwise")],
    "jit = eager": [("test_invariants", "test_jit_equals_no_jit")],
    "sweep = single runs": [("test_sweep", "test_sweep_entries_equal_single_runs")],
    "save/load round trip": [("test_weights", "test_save_load_round_trip_is_exact")],
    "tokenizer round trip": [("test_tokenizer", "test_embedded_tokenizer_round_trip"),
                             ("test_tokenizer", "test_decode_encode_round_trip")],  # GPT-2's files, when present
}
CI_MIN_EXAMPLES = 200
THOROUGH_MIN_EXAMPLES = 1000

# Set in the child pytest runs below: the profile the child must find active.
EXPECTED_ENV = "TINYGPT_EXPECTED_HYPOTHESIS_PROFILE"


def ci_command() -> str:
    """The line of .ci/run that runs the tests."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
             if "python -m pytest" in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f".ci/run should run `python -m pytest` exactly once, found {lines}"
    return lines[0]


def pytest_args(command: str) -> list[str]:
    """The arguments given to `python -m pytest` in a shell command line."""
    tail = command.split("python -m pytest", 1)[1]
    return shlex.split(re.split(r"&&|\|\||;", tail)[0])


def readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"Install the test extras and run the tests[^\n]*\n+```bash\n(.*?)\n```", readme, re.S)
    assert match, "README.md lost its 'Install the test extras and run the tests' command"
    return match.group(1).strip()


def run_child_pytest(args: list[str], expected_profile: str, selection: str, n_tests: int, **env) -> None:
    """`python -m pytest *args` on this file's `selection` (-k) in a fresh process, with CI and
    HYPOTHESIS_PROFILE unset (or set by `env`); the child checks that `expected_profile` is active."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    child_env.update(env, **{EXPECTED_ENV: expected_profile})
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-W", "ignore",
           str(Path(__file__).relative_to(REPO)), "-k", selection]
    result = subprocess.run(cmd, cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert re.search(rf"\b{n_tests} passed", result.stdout), result.stdout[-2000:]
    assert "skipped" not in result.stdout, result.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ selection


def test_ci_runs_the_readme_command_with_the_ci_profile():
    assert ci_command() == readme_test_command(), ".ci/run must run exactly the README's test command"
    assert "--hypothesis-profile=ci" in pytest_args(ci_command())


def test_active_profile():
    """In a child run below: the profile that its command line and environment select."""
    assert settings.get_current_profile_name() == os.environ.get(EXPECTED_ENV, settings.get_current_profile_name())


@pytest.mark.skipif(EXPECTED_ENV in os.environ, reason="in a child run already")
def test_ci_command_runs_every_core_invariant_with_200_examples():
    """.ci/run's own pytest arguments, in an environment without CI: the ci profile, and every core
    invariant's settings as they are when its module is imported under it."""
    run_child_pytest(pytest_args(ci_command()), "ci", "test_active_profile or test_core_invariants_run",
                     1 + len(CORE_INVARIANTS))


@pytest.mark.skipif(EXPECTED_ENV in os.environ, reason="in a child run already")
def test_plain_pytest_is_dev_and_the_option_beats_the_environment():
    run_child_pytest([], "dev", "test_active_profile", 1)
    run_child_pytest(["--hypothesis-profile=ci"], "ci", "test_active_profile", 1, HYPOTHESIS_PROFILE="thorough")
    run_child_pytest([], "thorough", "test_active_profile", 1, HYPOTHESIS_PROFILE="thorough")


# ------------------------------------------------------------------------------------------------- profiles


def test_profiles():
    assert set(PROFILES) == set(CORE_EXAMPLES) == {"dev", "ci", "thorough"}
    assert core_examples("ci") >= CI_MIN_EXAMPLES
    assert core_examples("thorough") >= THOROUGH_MIN_EXAMPLES
    for name in PROFILES:
        profile = settings.get_profile(name)
        assert Phase.shrink in profile.phases, f"profile {name!r} turns shrinking off"
        assert profile.deadline is None, f"profile {name!r}: a deadline makes slow compiles flaky"
        assert core_examples(name) >= profile.max_examples
    assert settings.get_profile("ci").derandomize, "CI must try the same examples on every run"
    assert settings.get_profile("thorough").max_examples > settings.get_profile("ci").max_examples


@pytest.mark.parametrize("invariant", list(CORE_INVARIANTS))
def test_core_invariants_run_the_profile_examples(invariant):
    """Each core invariant's tests carry `@core_invariant`: the active profile's CORE_EXAMPLES, >= 200 under
    ci, shrinking on."""
    active = settings.get_current_profile_name()
    for name, test in ((f"{m}.{n}", getattr(importlib.import_module(m), n)) for m, n in CORE_INVARIANTS[invariant]):
        assert getattr(test, "is_hypothesis_test", False), f"{name} is not a hypothesis test"
        assert getattr(test, "core_invariant", False), f"{name} lost its @core_invariant"
        own = test._hypothesis_internal_use_settings
        assert own.max_examples == core_examples(), f"{name}: {own.max_examples} examples under {active!r}"
        assert Phase.shrink in own.phases, f"{name} does not shrink"
        if active == "ci":
            assert own.max_examples >= CI_MIN_EXAMPLES
