"""The errors tinygpt raises for things a user can fix, and nothing else.

Every one of them derives from `TinyGPTError`, so a caller can catch the whole family in one clause, and the
`tinygpt` command prints any of them as one line (`tinygpt: error: ...`, exit code 2) instead of a traceback.
Each also derives from ValueError (bad values) or OSError (files), so code written against the standard
exceptions keeps working. The message names the argument, flag or file at fault and what to do.

This module imports nothing from tinygpt: every other module (weights/ and probes/ included) may use it.
"""

from __future__ import annotations

import importlib.util
import json
import os


class TinyGPTError(Exception):
    """Base of every error tinygpt raises for bad input, files or options (never for its own bugs)."""


class InputError(TinyGPTError, ValueError):
    """Token ids, masks or arguments a function cannot run on."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong kind (e.g. edits that are not a mapping of functions)."""


class ConfigError(TinyGPTError, ValueError):
    """A config.json (or Config) that does not describe a GPT-2 model tinygpt can run."""


class SiteError(TinyGPTError, ValueError):
    """An unknown site name in `keep=`, `edits=` or an artifact."""


class WeightsError(TinyGPTError, ValueError):
    """A checkpoint or tokenizer file that cannot be found or read: the message names the file and the problem."""


class ArtifactError(TinyGPTError, ValueError):
    """A file tinygpt wrote (SAE, tuned lens, harvest) that is damaged, of the wrong shape, or for another model."""


class OutputError(TinyGPTError, OSError):
    """An output path that cannot be written, or that holds files tinygpt did not create."""


class LockedError(OutputError):
    """Another writer holds the output's lock."""


class MissingDependencyError(TinyGPTError, ImportError):
    """An optional package a feature needs is not installed; the message gives the install command."""


def install_command(extra: str) -> str:
    """The pip command that adds `extra`, spelled for the way tinygpt was installed: from a checkout
    (`pip install -e '.[plot]'`, run in the checkout) or from a package index (`pip install 'tinygpt[plot]'`)."""
    try:
        from importlib.metadata import distribution

        direct_url = distribution("tinygpt").read_text("direct_url.json")
    except Exception:  # not installed at all (run from a source tree) or no metadata
        direct_url = None
    if direct_url:
        try:
            info = json.loads(direct_url)
        except ValueError:
            info = {}
        url = info.get("url", "")
        if url.startswith("file://") and "dir_info" in info:
            path = url[len("file://"):]
            editable = info["dir_info"].get("editable", False)
            here = os.path.abspath(os.getcwd()) == os.path.abspath(path)
            target = "." if here else path
            return f"pip install {'-e ' if editable else ''}'{target}[{extra}]'"
    return f"pip install 'tinygpt[{extra}]'"


def require(module: str, extra: str, purpose: str):
    """Import and return an optional dependency, or raise MissingDependencyError naming the install command."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise MissingDependencyError(f"{purpose} needs the package '{module.split('.')[0]}', which is not installed: "
                                     f"{install_command(extra)}")
    return importlib.import_module(module)
