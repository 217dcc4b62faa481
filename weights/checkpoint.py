"""Reading and writing GPT-2 checkpoints in the official Hugging Face layout (config.json + model.safetensors).

Reading checks every expected tensor for presence, shape and dtype (from the safetensors header) before any
is used, then reads each tensor's bytes from the file straight into its final place: one preallocated buffer
per parameter (the blocks stacked on the layer axis), handed to jax without a copy where the backend allows
it (CPU). Peak memory is about one copy of the weights, plus one tensor when a conversion is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config, ConfigError
from tinygpt.params import check_params, host_to_jax, param_shapes, resolve_dtype

from . import hf
from .errors import WeightsError

# safetensors dtype -> the numpy dtype of its (little-endian) bytes. bfloat16 comes from ml_dtypes (a jax
# dependency).
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(jnp.bfloat16),
                "F64": np.dtype("<f8")}


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
            # safetensors validates the header (and that it covers the file exactly) ...
            with safe_open(str(path), framework="numpy") as f:
                self.names = list(f.keys())
                self.meta = {}
                for name in self.names:
                    sl = f.get_slice(name)
                    self.meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            # ... which then gives each tensor's byte range (the format: u64 header size, JSON header, data).
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size))
        except SafetensorError as e:
            raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e}") from None
        data_start = 8 + header_size
        self.byte_range = {
            name: (data_start + header[name]["data_offsets"][0], data_start + header[name]["data_offsets"][1])
            for name in self.names
        }
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
                raise WeightsError(f"tensor {short!r} in {self.path} has dtype {dtype}, expected a float dtype "
                                   f"({', '.join(FLOAT_DTYPES)})")

    def read(self, f, short: str) -> np.ndarray:
        """Tensor `short` (unprefixed name) as stored, read from `f` (this file, opened unbuffered)."""
        name = self.by_short[short]
        dtype, shape = self.meta[name]
        out = np.empty(shape, FLOAT_DTYPES[dtype])
        self._read_bytes(f, name, out)
        return out

    def read_into(self, f, short: str, out: np.ndarray) -> None:
        """Tensor `short` into `out`, a C-contiguous array of the same size (a reshape of the stored shape),
        cast to out's dtype: straight from the file when the dtypes agree, through one temporary if not."""
        name = self.by_short[short]
        if FLOAT_DTYPES[self.meta[name][0]] == out.dtype:
            self._read_bytes(f, name, out)
        else:
            out[...] = self.read(f, short).reshape(out.shape)

    def _read_bytes(self, f, name: str, out: np.ndarray) -> None:
        start, end = self.byte_range[name]
        view = memoryview(out.reshape(-1).view(np.uint8))  # out is contiguous: a view, never a copy
        assert out.flags.c_contiguous and len(view) == end - start, (name, out.shape, out.dtype)
        f.seek(start)
        done = 0
        while done < len(view):  # a single read may return less than asked for (e.g. > 2 GiB)
            n = f.readinto(view[done:])
            if not n:
                raise WeightsError(f"{self.path} ended early while reading tensor {name!r} (truncated?)")
            done += n


def read(directory: str | os.PathLike, dtype="float32") -> tuple[Config, dict]:
    """(Config, params) from a directory in the official HF GPT-2 layout, params cast to `dtype`."""
    target = _numpy_dtype(resolve_dtype(dtype))
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise WeightsError(
                f"{directory} is a file; pass the directory holding config.json and model.safetensors"
            )
        raise WeightsError(f"no such directory: {directory}")
    config_path = directory / "config.json"
    try:
        config = Config.from_json(config_path)
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{config_path} is not valid JSON (not UTF-8 text: {e})") from None
    except OSError as e:
        raise WeightsError(f"cannot read {config_path}: {e}") from None
    st = SafetensorsFile(directory / "model.safetensors")
    st.check(config)
    try:
        return config, _read_params(st, config, target)
    except OSError as e:
        raise WeightsError(f"cannot read {st.path}: {e}") from None


def _read_params(st: SafetensorsFile, config: Config, target: np.dtype) -> dict:
    """Every tensor read from the file into its place in one preallocated buffer per parameter (the blocks
    stacked [layer, ...]); only c_attn, which is split per head, goes through a temporary. No memory map,
    so no file pages count against the process; then each buffer becomes a jax array, aliased (not copied)
    where the backend can."""
    shapes = param_shapes(config)
    params = {name: _aligned_empty(shapes[name], target) for name in hf.GLOBAL_NAMES}
    blocks = {name: _aligned_empty(shape, target) for name, shape in shapes["blocks"].items()}
    with open(st.path, "rb", buffering=0) as f:
        for ours, theirs in hf.GLOBAL_NAMES.items():
            st.read_into(f, theirs, params[ours])
        for i in range(config.n_layer):
            for theirs, ours in hf.BLOCK_NAMES.items():
                st.read_into(f, f"h.{i}.{theirs}", blocks[ours][i])
            c_attn_w, c_attn_b = st.read(f, f"h.{i}.attn.c_attn.weight"), st.read(f, f"h.{i}.attn.c_attn.bias")
            for name, value in hf.split_qkv(c_attn_w, c_attn_b, config).items():
                blocks[name][i] = value
    params = {name: host_to_jax(params.pop(name)) for name in list(params)}
    params["blocks"] = {name: host_to_jax(blocks.pop(name)) for name in list(blocks)}
    return params


_ALIGNMENT = 64  # XLA's CPU backend aliases host buffers with this alignment instead of copying them


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, but 64-byte aligned (numpy only guarantees 16), so `host_to_jax` can alias it."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------- writing


def write(directory: str | os.PathLike, config: Config, params: dict, *, hf_config: dict | None = None) -> None:
    """Write config.json + model.safetensors in the official HF layout (GPT2LMHeadModel names with the
    `transformer.` prefix, Conv1D weights, lm_head tied and omitted, as `save_pretrained` writes them).
    The files are written to temporary names and renamed, so nothing is half-written."""
    from safetensors.numpy import save_file

    try:
        check_params(params, config)
    except ValueError as e:
        raise WeightsError(f"cannot save: {e}") from None
    directory = Path(directory)
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
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    tmp_st, tmp_cfg = directory / ".model.safetensors.tmp", directory / ".config.json.tmp"
    try:
        save_file(tensors, str(tmp_st), metadata={"format": "pt"})
        tmp_cfg.write_text(json.dumps(hf_json, indent=2) + "\n")
        os.chmod(tmp_st, 0o644)  # safetensors creates its file owner-only; checkpoints are meant to be shared
        os.replace(tmp_st, directory / "model.safetensors")
        os.replace(tmp_cfg, directory / "config.json")
    finally:  # on failure: no temporary left behind, and no directory we created
        for tmp in (tmp_st, tmp_cfg):
            tmp.unlink(missing_ok=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
