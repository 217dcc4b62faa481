"""tinygpt: a minimal GPT-2 in JAX whose every intermediate can be read and edited."""

from .api import Model, load
from .config import Config
from .errors import ConfigError, InputError, SiteError, TinyGPTError
from .generation import Generation, generate
from .inputs import checked
from .model import forward, make_forward
from .params import init_params
from .sites import SITE_NAMES, SITES
from .trace import Trace

__all__ = ["Config", "ConfigError", "Model", "load", "forward", "make_forward", "Trace", "SITES",
           "SITE_NAMES", "SiteError", "InputError", "TinyGPTError", "checked", "init_params", "generate", "Generation", "Tokenizer"]


def __getattr__(name):  # modules written beside the engine, imported on first use
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'tinygpt' has no attribute {name!r}")
