"""The command line refuses bad options while parsing, in one line naming the flag (issue 17, cases 8, 11-13).

The mechanism under test: every numeric option takes one of `tinygpt.cli.common`'s validated types, and the
parser prints `tinygpt: error: ...` instead of argparse's usage + error. The walk below covers every numeric
option of every subcommand, so a new option with a bare `type=int` fails here."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinygpt
from tinygpt.cli import build_parser, main
from tinygpt.cli.common import Number, plot_file
from tinygpt.errors import install_command

REPO = Path(__file__).resolve().parents[1]


def subcommands(parser, path=()):
    """(path of subcommand names, parser) for every leaf subcommand."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subcommands(sub, (*path, name))
    return found or [(path, parser)]


def options():
    """(subcommand path, flag, action) for every option that takes a value."""
    return [(path, action.option_strings[-1], action) for path, parser in subcommands(build_parser())
            for action in parser._actions if action.option_strings and action.nargs != 0
            and not isinstance(action, argparse._HelpAction)]


NUMERIC = [(p, f, a) for p, f, a in options() if a.type in (int, float) or isinstance(a.type, Number)]


def test_every_numeric_option_is_validated():
    bare = [f"{' '.join(p)} {f}" for p, f, a in options() if a.type in (int, float)]
    assert not bare, f"options with a bare int/float type (NaN, negatives and huge values pass): {bare}"
    assert len(NUMERIC) > 50  # the walk sees the whole CLI


def bad_values(number: Number) -> list[str]:
    """Values the option must refuse: not a number, non-finite, outside its bounds, absurdly large."""
    values = ["abc", ""]
    if number.kind is float:
        values += ["nan", "inf", "-inf", "1e400"]
    else:
        values += ["1.5", "99999999999999999999", "-99999999999999999999"]
    if number.low is not None:
        values.append(str(number.low) if number.low_open else str(number.low - 1))
    if number.high is not None:
        values.append(str(number.high) if number.high_open else str(number.high + 1))
    return values


@pytest.mark.parametrize("path, flag, action", NUMERIC, ids=[f"{' '.join(p)} {f}" for p, f, _ in NUMERIC])
def test_numeric_option_refuses_bad_values_in_one_line(path, flag, action, capsys):
    for value in bad_values(action.type):
        code = main([*path, f"{flag}={value}"])
        err = capsys.readouterr().err
        assert code == 2, (flag, value)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tinygpt: error:"), (flag, value, err)
        assert flag in lines[0], (flag, value, err)


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--top-p", "1.5"], "--top-p: must be a finite number in (0.0, 1.0], got 1.5"),
    (["generate", "x", "--top-p", "0"], "--top-p: must be a finite number in (0.0, 1.0], got 0.0"),
    (["generate", "x", "--top-k", "0"], "--top-k: must be >= 1, got 0"),
    (["generate", "x", "--top-k", "-3"], "--top-k: must be >= 1, got -3"),
    (["generate", "x", "--seed", "99999999999999999999"], "--seed: must be an integer in [0, 4294967295]"),
    (["generate", "x", "--temperature", "nan"], "--temperature: must be a finite number in [0.0, inf), got nan"),
    (["inspect", "x", "--top", "-1"], "--top: must be >= 1, got -1"),
    (["ablate", "x", "--top", "-3"], "--top: must be >= 1, got -3"),
])
def test_the_issues_samples(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_parse_errors_are_one_line(capsys):
    for argv in (["generate", "x", "--no-such-flag"], ["ablate", "x", "--method", "bogus"], ["nonsense"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tinygpt: error:"), err


# ---------------------------------------------------------------------------------------------------- --plot


PLOTTING = [(p, f, a) for p, f, a in options() if f == "--plot"]


def test_every_plot_option_is_checked_while_parsing():
    assert len(PLOTTING) >= 9
    assert all(a.type is plot_file for _, _, a in PLOTTING)


@pytest.mark.parametrize("path, flag, action", PLOTTING, ids=[" ".join(p) for p, _, _ in PLOTTING])
def test_plot_into_a_missing_directory_or_unknown_extension_fails_before_any_work(path, flag, action, tmp_path,
                                                                                    capsys):
    for target, message in ((tmp_path / "missing" / "x.png", "does not exist"),
                            (tmp_path / "x.docx", "unknown extension '.docx'"),
                            (tmp_path / "x", "unknown extension '(none)'"),
                            (tmp_path, "unknown extension")):
        assert main([*path, "--plot", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--plot" in err and message in err, err


def test_plot_without_matplotlib_names_the_install_command(tmp_path):
    """Run in a subprocess where matplotlib cannot be imported; the parse fails at once with the command."""
    code = ("import sys, importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'matplotlib' else real(name, *a)\n"
            "from tinygpt.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "svd", "--layer", "0", "--matrix", "OV", "--head", "0",
                             "--plot", str(tmp_path / "s.png")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "matplotlib" in result.stderr and "pip install" in result.stderr and "[plot]" in result.stderr


def test_install_command_is_spelled_for_how_tinygpt_was_installed(monkeypatch, tmp_path):
    import importlib.metadata as metadata

    class Dist:
        def __init__(self, text):
            self.text = text

        def read_text(self, name):
            return self.text

    checkout = json.dumps({"url": f"file://{tmp_path}", "dir_info": {"editable": True}})
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(checkout))
    monkeypatch.chdir(tmp_path)
    assert install_command("plot") == "pip install -e '.[plot]'"
    monkeypatch.chdir("/")
    assert install_command("plot") == f"pip install -e '{tmp_path}[plot]'"
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(None))  # from an index: no direct_url.json
    assert install_command("plot") == "pip install 'tinygpt[plot]'"


# ------------------------------------------------------------------------------------------ flags in messages


@pytest.mark.parametrize("argv, flag", [
    (["steer", "--tokens", "1,2,3", "--layer", "0", "--positive-tokens", "1", "--negative-tokens", "2",
      "--positions", "foo"], "--positions"),
    (["patch"], "--clean-tokens"),
    (["patch", "--clean-tokens", "1,x"], "--clean-tokens"),
    (["patch", "--clean-tokens", "1,2", "--corrupt-tokens", "99999"], "--corrupt-tokens"),
    (["ablate", "--tokens", "1,2", "--reference-tokens", "1,q", "--method", "mean"], "--reference-tokens"),
])
def test_messages_name_the_flag_at_fault(argv, flag, capsys):
    assert main([*argv, "--model", str(REPO / "tests" / "golden" / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err
    assert "--tokens " not in err.replace(flag, ""), err  # not another flag's name


def test_cli_and_api_share_the_default_temperature():
    (_, _, action), = [o for o in options() if o[0] == ("generate",) and o[1] == "--temperature"]
    assert action.default == inspect.signature(tinygpt.generate).parameters["temperature"].default


# -------------------------------------------------------------------------------------------- broken pipes


def test_generate_into_a_closed_pipe_stops_quietly():
    """`tinygpt generate ... | head -c 1`: no traceback (it was 38 lines of JaxRuntimeError), exit 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gen = subprocess.Popen([sys.executable, "-m", "tinygpt", "generate", "ROMEO:", "-n", "100", "--seed", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    gen.stdout.read(1)
    gen.stdout.close()  # the reader leaves after one byte
    err = gen.stderr.read().decode()
    assert gen.wait(timeout=300) == 0, err
    assert err == "", err


def test_a_bug_is_not_hidden_as_a_one_liner(monkeypatch, capsys):
    """Only tinygpt's own errors (and the OS's) become one line: a programming error keeps its traceback."""
    import tinygpt.cli.core as core

    monkeypatch.setattr(core, "load_model", lambda args: math.sqrt(-1))
    with pytest.raises(ValueError, match="math domain error"):
        main(["inspect", "x"])
