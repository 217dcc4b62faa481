"""The error contract, checked over the whole code base (issue 17, case 11): every error raised for a user's
input, option or file is a named TinyGPTError, which the CLI prints as one line; nothing in the library raises
a bare ValueError / TypeError that the CLI would show as a traceback."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import tinygpt.errors as errors

REPO = Path(__file__).resolve().parents[1]
LIBRARY = [p for package in ("tinygpt", "weights", "probes") for p in sorted((REPO / package).rglob("*.py"))]


def raised_builtins(path: Path):
    """(line, name) of every `raise ValueError(...)` / `raise TypeError(...)` in a file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            if node.exc.func.id in ("ValueError", "TypeError"):
                yield node.lineno, node.exc.func.id


def test_the_library_raises_only_named_errors_for_bad_input():
    found = [f"{path.relative_to(REPO)}:{line} raises {name}" for path in LIBRARY
             for line, name in raised_builtins(path)]
    assert not found, "raise a tinygpt.errors class (InputError, InputTypeError, ...) instead:\n" + "\n".join(found)


def test_every_named_error_is_a_tinygpt_error_and_a_standard_one():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 9
    for cls in classes:
        assert issubclass(cls, errors.TinyGPTError), cls
        if cls is not errors.TinyGPTError:
            assert issubclass(cls, (ValueError, OSError, ImportError, TypeError)), cls


def test_probe_and_weights_errors_join_the_family():
    from probes.harvest import HarvestError
    from probes.sae import SAEError
    from probes.tuned_lens import TunedLensError
    from tinygpt.cli.common import CLIError
    from weights import WeightsError
    from weights.corpus import CorpusError
    from weights.hub import HubError

    for cls in (HarvestError, SAEError, TunedLensError, CLIError, WeightsError, CorpusError, HubError):
        assert issubclass(cls, errors.TinyGPTError), cls
