"""Reading and writing GPT-2 checkpoints in the official Hugging Face layout (config.json + model.safetensors).

Reading takes the file's inventory before anything is allocated (`SafetensorsFile.check`): one tensor per
name, every tensor config.json implies present with its shape and a float dtype, nothing else in the file
but the known attention buffers and an lm_head equal to wte. Then it reads each tensor's bytes from the file
straight into its final place: one preallocated buffer per parameter (the blocks stacked on the layer
axis), handed to jax without a copy where the backend allows it (CPU), each checked finite as it lands.
Peak memory is about one copy of the weights, plus one tensor when a conversion is needed.

Errors: anything wrong with config.json is a ConfigError, anything wrong with the directory or
model.safetensors a WeightsError; each names the file and the problem.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config
from tinygpt.files import atomic_write, parse_json, safetensors_bytes
from tinygpt.params import check_params, host_to_jax, param_shapes, resolve_dtype

from . import hf
from .errors import WeightsError

# safetensors dtype -> the numpy dtype of its (little-endian) bytes. bfloat16 comes from ml_dtypes (a jax
# dependency).
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(jnp.bfloat16),
                "F64": np.dtype("<f8")}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def _numpy_dtype(dtype):
    """numpy dtype for a jax dtype (bfloat16 comes from ml_dtypes, a jax dependency)."""
    return np.dtype(jnp.dtype(dtype))


def _open_regular(path: Path):
    """`path` opened for reading (unbuffered), or WeightsError: missing, unreadable, or not a regular file
    (a FIFO would block, /dev/zero would never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not wait for a writer
    except FileNotFoundError:
        raise WeightsError(f"missing {path.name} in {path.parent} (expected GPT-2 weights in safetensors "
                           "format)") from None
    except PermissionError:
        raise WeightsError(f"{path} is not readable (permission denied)") from None
    except OSError as e:
        raise WeightsError(f"cannot open {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise WeightsError(f"{path} is {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}; expected "
                           "GPT-2 weights in safetensors format")
    return os.fdopen(fd, "rb", buffering=0)


def _all_finite(x: np.ndarray) -> bool:
    """No NaN or inf in `x`. The sum is NaN or inf exactly when an element is, or (rarely, for huge finite
    values) when it overflows: only then are the elements tested one by one."""
    total = x.sum(dtype=np.float32 if x.dtype.itemsize < 4 else None)
    return bool(np.isfinite(total)) or bool(np.isfinite(x).all())


class SafetensorsFile:
    """A checked view of one model.safetensors: header parsed and validated up front."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                # safetensors validates the header (and that it covers the file exactly) ...
                with safe_open(str(path), framework="numpy") as st:
                    self.names = list(st.keys())
                    self.meta = {}
                    for name in self.names:
                        sl = st.get_slice(name)
                        self.meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            except SafetensorError as e:
                raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
            except OSError as e:
                raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
            # ... which then gives each tensor's byte range (the format: u64 header size, JSON header, data).
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= min(MAX_HEADER_BYTES, size - 8):  # changed since safe_open read it
                raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?)")
            header = parse_json(f.read(header_size), str(path), error=WeightsError)
        data_start = 8 + header_size
        self.byte_range = {
            name: (data_start + header[name]["data_offsets"][0], data_start + header[name]["data_offsets"][1])
            for name in self.names
        }
        self.by_short = {}  # name without GPT2LMHeadModel's `transformer.` prefix -> name in the file

    def check(self, config: Config) -> None:
        """The checkpoint's inventory against config.json, before anything is allocated: each tensor stored
        once (with or without the `transformer.` prefix, not both); every tensor config.json implies
        present, with its shape and a float dtype; nothing else but the attention buffers of its blocks
        (ignored) and an lm_head of wte's shape (checked equal to wte when read). Costs time in the number
        of tensors in the file, whatever config.json says."""
        by_short = {}
        for name in self.names:
            short = hf.strip_prefix(name)
            if short in by_short:
                raise WeightsError(f"{self.path} holds tensor {short!r} twice, as {by_short[short]!r} and {name!r}: "
                                   "a checkpoint stores each tensor once; remove one of them")
            by_short[short] = name
        expected = {short: shape for short in by_short if (shape := hf.expected_shape(short, config)) is not None}
        n_missing = hf.n_tensors(config) - len(expected)
        if n_missing:  # the first missing name is among the first len(expected) + 1 names: a short walk
            first = next(name for name in hf.tensor_names(config) if name not in expected)
            more = f" (and {n_missing - 1:,} more)" if n_missing > 1 else ""
            raise WeightsError(f"{self.path} is missing tensor {first!r}{more}{self._layers_hint(config)}")
        unexpected = [name for short, name in by_short.items()
                      if short not in expected and short != hf.LM_HEAD and not hf.is_ignored_buffer(short, config)]
        if unexpected:
            shown = ", ".join(repr(n) for n in unexpected[:3])
            more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            raise WeightsError(f"{self.path} holds tensors a GPT-2 checkpoint of config.json's shape does not have: "
                               f"{shown}{more}{self._layers_hint(config)}")
        if hf.LM_HEAD in by_short:
            expected[hf.LM_HEAD] = expected["wte.weight"]
        for short, shape in expected.items():
            dtype, got = self.meta[by_short[short]]
            if got != shape:
                raise WeightsError(
                    f"tensor {short!r} in {self.path} has shape {got}, but config.json implies {shape}"
                )
            if dtype not in FLOAT_DTYPES:
                raise WeightsError(f"tensor {short!r} in {self.path} has dtype {dtype}, expected a float dtype "
                                   f"({', '.join(FLOAT_DTYPES)})")
        self.by_short = {short: by_short[short] for short in expected}

    def _layers_hint(self, config: Config) -> str:
        """'; config.json says n_layer=2, the file holds 3 layers (h.0 to h.2)' when they disagree."""
        layers = {hf.layer_of(hf.strip_prefix(name)) for name in self.names} - {None}
        if len(layers) == config.n_layer:
            return ""
        held = f"{len(layers)} layers (h.{min(layers)} to h.{max(layers)})" if layers else "no layers"
        return f"; config.json says n_layer={config.n_layer:,}, the file holds {held}: is config.json this file's?"

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

    def check_finite(self, f, short: str, value: np.ndarray) -> None:
        """WeightsError unless `value` (tensor `short` as loaded) is free of NaN and inf, naming the tensor and
        whether the file holds them or the conversion to a narrower dtype made them."""
        if _all_finite(value):
            return
        n_bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        stored = FLOAT_DTYPES[self.meta[self.by_short[short]][0]]
        if stored != value.dtype and _all_finite(self.read(f, short)):
            raise WeightsError(
                f"tensor {short!r} in {self.path} holds values beyond {value.dtype}'s range, which become inf "
                f"({n_bad:,} of them) when loaded as {value.dtype}; load it with dtype='float32'"
            )
        raise WeightsError(
            f"tensor {short!r} in {self.path} holds {n_bad:,} NaN or inf values, which make every logit NaN; "
            "pass allow_nonfinite=True to load it anyway"
        )

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


def read(directory: str | os.PathLike, dtype="float32", *, allow_nonfinite: bool = False) -> tuple[Config, dict]:
    """(Config, params) from a directory in the official HF GPT-2 layout, params cast to `dtype`.

    NaN or inf in any weight is a WeightsError unless `allow_nonfinite=True`."""
    target = _numpy_dtype(resolve_dtype(dtype))
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise WeightsError(
                f"{directory} is a file; pass the directory holding config.json and model.safetensors"
            )
        raise WeightsError(f"no such directory: {directory}")
    config = Config.from_json(directory / "config.json")
    st = SafetensorsFile(directory / "model.safetensors")
    st.check(config)
    try:
        return config, _read_params(st, config, target, allow_nonfinite)
    except OSError as e:
        raise WeightsError(f"cannot read {st.path}: {e.strerror or e}") from None


def _read_params(st: SafetensorsFile, config: Config, target: np.dtype, allow_nonfinite: bool) -> dict:
    """Every tensor read from the file into its place in one preallocated buffer per parameter (the blocks
    stacked [layer, ...]); only c_attn, which is split per head, goes through a temporary. No memory map,
    so no file pages count against the process; then each buffer becomes a jax array, aliased (not copied)
    where the backend can. Each tensor is checked finite as loaded (unless `allow_nonfinite`), and a stored
    lm_head equal to wte."""
    shapes = param_shapes(config)
    params = {name: _aligned_empty(shapes[name], target) for name in hf.GLOBAL_NAMES}
    blocks = {name: _aligned_empty(shape, target) for name, shape in shapes["blocks"].items()}
    # errstate: a value beyond a narrower dtype's range becomes inf, which check_finite reports by name
    with open(st.path, "rb", buffering=0) as f, np.errstate(over="ignore"):
        for ours, theirs in hf.GLOBAL_NAMES.items():
            st.read_into(f, theirs, params[ours])
            if not allow_nonfinite:
                st.check_finite(f, theirs, params[ours])
        if hf.LM_HEAD in st.by_short:
            lm_head = np.empty_like(params["wte"])
            st.read_into(f, hf.LM_HEAD, lm_head)
            if not np.array_equal(lm_head, params["wte"], equal_nan=True):
                raise WeightsError(f"{st.path} holds an lm_head.weight that differs from wte.weight: tinygpt, like "
                                   "GPT-2, unembeds with wte (tied), so this untied lm_head would be ignored; remove "
                                   "lm_head.weight from the file if wte is the unembedding you want")
            del lm_head
        for i in range(config.n_layer):
            for theirs, ours in hf.BLOCK_NAMES.items():
                st.read_into(f, f"h.{i}.{theirs}", blocks[ours][i])
            c_attn_w, c_attn_b = st.read(f, f"h.{i}.attn.c_attn.weight"), st.read(f, f"h.{i}.attn.c_attn.bias")
            for name, value in hf.split_qkv(c_attn_w, c_attn_b, config).items():
                blocks[name][i] = value
            if not allow_nonfinite:
                for ours, value in blocks.items():
                    st.check_finite(f, f"h.{i}.{hf.SOURCE_OF[ours]}", value[i])
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
    Both files are written through `tinygpt.files.atomic_write`, each to a temporary file that is renamed
    into place once complete, the config's after the weights', so nothing is half-written; two saves of the
    same model give identical bytes."""
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
    try:
        # both written to temporary files first; config.json renamed into place after model.safetensors
        with atomic_write(directory / "config.json", "w") as config_file:
            config_file.write(json.dumps(hf_json, indent=2, sort_keys=True) + "\n")
            with atomic_write(directory / "model.safetensors") as weights_file:
                weights_file.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    except BaseException:  # no directory we created is left behind
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
