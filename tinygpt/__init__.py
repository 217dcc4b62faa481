"""tinygpt: a minimal GPT-2 in JAX whose every intermediate can be read and edited.

The names below are imported on first use (PEP 562), so `import tinygpt` and the `tinygpt` command's start-up
do not import jax until something needs it: the command installs its Ctrl-C handling first (see
`tinygpt.cli.main`), and a Ctrl-C during jax's import is then never lost."""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "Model": "api", "load": "api",
    "Config": "config",
    "TinyGPTError": "errors", "InputError": "errors", "ConfigError": "errors", "SiteError": "errors",
    "Generation": "generation", "generate": "generation",
    "checked": "inputs",
    "forward": "compiled", "make_forward": "compiled",
    "init_params": "params",
    "SITE_NAMES": "sites", "SITES": "sites",
    "Tokenizer": "tokenizer",
    "Trace": "trace",
}

__all__ = list(_EXPORTS) + ["version"]


def version() -> str:
    """tinygpt's installed version, else the one in pyproject.toml beside the package, else "unknown"."""
    import importlib.metadata
    from pathlib import Path

    try:
        return importlib.metadata.version("tinygpt")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except Exception:  # no pyproject (an unusual install): say so rather than fail
        return "unknown"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:  # a submodule: tinygpt.sites, tinygpt.sweep, ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'tinygpt' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
