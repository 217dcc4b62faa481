"""Checks of numeric arguments: the one definition of a valid count, probability, seed, ..., used by the
API's argument checks (`generate`, the probes) and by the CLI's option types (which call these with the
flag's name as `argument`), so both refuse the same values with the same words. Imports no jax."""

from __future__ import annotations

import sys

import numpy as np

from .errors import InputError


def _is_tracer(value) -> bool:
    """A jax tracer (under jit / vmap), whose value cannot be checked. Without jax imported there is none."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def check_int(value, argument: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int within [low, high] (bools, floats and strings refused), or InputError naming
    `argument`. A traced value (under jit) is returned as it is."""
    if _is_tracer(value):
        return value
    if getattr(value, "shape", None) == () and np.issubdtype(value.dtype, np.integer):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{argument} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise InputError(f"{argument} must be >= {low}, got {value}")
        raise InputError(f"{argument} must be an integer in {_interval(low, high, False, False)}, got {value}")
    return value


def check_float(value, argument: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within the interval (NaN and infinities refused), or InputError naming
    `argument`. A traced value (under jit) is returned as it is."""
    if _is_tracer(value):
        return value
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{argument} must be a number, got {value!r}")
    value = float(value)
    inside = np.isfinite(value)
    if low is not None:
        inside = inside and (value > low if low_open else value >= low)
    if high is not None:
        inside = inside and (value < high if high_open else value <= high)
    if not inside:
        raise InputError(f"{argument} must be a finite number in {_interval(low, high, low_open, high_open)}, "
                         f"got {value}")
    return value


SEED_RANGE = (0, 2**32 - 1)  # jax.random.PRNGKey keeps 32 bits without x64: 2**32 would silently equal seed 0


def check_seed(value, argument: str = "seed") -> int:
    return check_int(value, argument, low=SEED_RANGE[0], high=SEED_RANGE[1])
