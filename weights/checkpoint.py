"""Reading and writing GPT-2 checkpoints in the official Hugging Face layout (config.json + model.safetensors).

Reading goes through safetensors' memory map one parameter group at a time (the file is reopened per
group, so mapped pages are released as we go): peak memory stays near one copy of the weights.
Every expected tensor is checked for presence, shape and dtype before any is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config, ConfigError
from tinygpt.params import param_shapes, resolve_dtype

from . import hf
from .errors import WeightsError

FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}


def _numpy_dtype(dtype):
    """numpy dtype for a jax dtype (bfloat16 comes from ml_dtypes, a jax dependency)."""
    return np.dtype(jnp.dtype(dtype))


class SafetensorsFile:
    """A checked view of one model.safetensors: header parsed and validated up front."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        if not path.is_file():
            raise WeightsError(f"missing {path.name} in {path.parent} (expected GPT-2 weights in safetensors format)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                self.names = list(f.keys())
                self.meta = {}
                for name in self.names:
                    sl = f.get_slice(name)
                    self.meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        except SafetensorError as e:
            raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e}") from None
        # Checkpoints saved with and without GPT2LMHeadModel's `transformer.` prefix are both accepted.
        self.by_short = {}
        for name in self.names:
            if not hf.is_ignored(name):
                self.by_short[hf.strip_prefix(name)] = name

    def check(self, config: Config) -> None:
        """Every expected tensor present, with the shape config.json implies and a float dtype."""
        expected = hf.expected_tensors(config)
        missing = [n for n in expected if n not in self.by_short]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightsError(f"{self.path} is missing tensor {missing[0]!r}{more}")
        for short, shape in expected.items():
            dtype, got = self.meta[self.by_short[short]]
            if got != shape:
                raise WeightsError(
                    f"tensor {short!r} in {self.path} has shape {got}, but config.json implies {shape}"
                )
            if dtype not in FLOAT_DTYPES:
                raise WeightsError(f"tensor {short!r} in {self.path} has dtype {dtype}, expected a float dtype")

    def open(self):
        from safetensors import safe_open

        return safe_open(str(self.path), framework="numpy")


def read(directory: str | os.PathLike, dtype="float32") -> tuple[Config, dict]:
    """(Config, params) from a directory in the official HF GPT-2 layout, params cast to `dtype`."""
    directory = Path(directory)
    try:
        config = Config.from_json(directory / "config.json")
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    target = _numpy_dtype(resolve_dtype(dtype))
    st = SafetensorsFile(directory / "model.safetensors")
    st.check(config)
    return config, _read_params(st, config, target)


def _read_params(st: SafetensorsFile, config: Config, target: np.dtype) -> dict:
    """Layer by layer into preallocated stacked [layer, ...] buffers, then into jax one group at a time, so
    at most one copy of the weights plus one layer (or one group) is held at once. The file is reopened for
    each layer so that the memory-mapped pages already read are released."""

    def reader(f):
        return lambda short: f.get_tensor(st.by_short[short]).astype(target, copy=False)

    params: dict = {}
    with st.open() as f:
        for ours, theirs in hf.GLOBAL_NAMES.items():
            params[ours] = jnp.asarray(reader(f)(theirs))
    buffers = {name: np.empty(shape, target) for name, shape in param_shapes(config)["blocks"].items()}
    for i in range(config.n_layer):
        with st.open() as f:
            layer = hf.block_from_hf(reader(f), i, config)
        for name, value in layer.items():
            buffers[name][i] = value
    params["blocks"] = {name: jnp.asarray(buffers.pop(name)) for name in list(buffers)}
    return params


# ------------------------------------------------------------------------------------------------- writing


def write(directory: str | os.PathLike, config: Config, params: dict, *, hf_config: dict | None = None) -> None:
    """Write config.json + model.safetensors in the official HF layout (GPT2LMHeadModel names with the
    `transformer.` prefix, Conv1D weights, lm_head tied and omitted, as `save_pretrained` writes them).
    The files are written to temporary names and renamed, so nothing is half-written."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for ours, theirs in hf.GLOBAL_NAMES.items():
        tensors["transformer." + theirs] = np.asarray(params[ours])
    blocks = {name: np.asarray(value) for name, value in params["blocks"].items()}
    for i in range(config.n_layer):
        layer = {name: value[i] for name, value in blocks.items()}
        for name, value in hf.block_to_hf(layer, i, config).items():
            tensors["transformer." + name] = np.ascontiguousarray(value)
    hf_json = dict(hf_config or {})
    hf_json.update(config.to_hf())
    hf_json["torch_dtype"] = hf_json["dtype"] = str(np.dtype(params["wte"].dtype))
    tmp_st, tmp_cfg = directory / ".model.safetensors.tmp", directory / ".config.json.tmp"
    save_file(tensors, str(tmp_st), metadata={"format": "pt"})
    tmp_cfg.write_text(json.dumps(hf_json, indent=2) + "\n")
    os.replace(tmp_st, directory / "model.safetensors")
    os.replace(tmp_cfg, directory / "config.json")
