"""SAEs in SAELens' on-disk format, both ways: `load_saelens(path)` and `save_saelens(sae, path)`.

A SAELens SAE is a directory of two files:

    cfg.json                  what the SAE is: architecture, d_in, d_sae, hook_name, normalisation, ...
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and per architecture
                              b_enc [d_sae] ("standard", "topk"), b_enc and threshold [d_sae] ("jumprelu"),
                              b_gate, r_mag, b_mag [d_sae] ("gated")

SAELens 6.x nests the model-side fields under "metadata" (hook_name, model_name, context_size, ...); the
3.x-5.x files, in which most published GPT-2 small SAEs were saved, keep them at the top level and some under
older names (hook_point, hook_point_layer, hook_point_head_index, activation_fn_str), with top-k written as
activation_fn "topk" and activation_fn_kwargs {"k": ...}. `saelens_fields` reads both into one flat dict,
the way SAELens' own loader does (`handle_pre_6_0_config`).

The fields that decide what the SAE computes are read; every other field (training settings, dataset,
device, ...) is kept in `sae.info["saelens"]` or ignored:

    architecture            standard -> kind "relu", topk (with k) -> "topk", jumprelu, gated
    activation_fn(_str)     "relu", or "topk" with activation_fn_kwargs.k (3.x-5.x)
    hook_name, hook_layer   a TransformerLens hook name, mapped to a tinygpt site and layer by
                            `tinygpt.sites.site_of_tl` (hook_layer, when present, must agree)
    hook_head_index         must be null: an SAE on one head's slice is not read
    d_in, d_sae             the sizes; d_in must be the site's width (head * d_head for attn.hook_z, whose
                            [batch, pos, head, d_head] values the SAE reads flattened, as tinygpt's z is)
    apply_b_dec_to_input    SAEConfig.apply_b_dec_to_input
    normalize_activations   none / expected_average_only_in (identity at inference, as in SAELens: its scale
                            is folded into the weights when training ends) / constant_norm_rescale /
                            layer_norm -> SAEConfig.input_norm; true / false as in 3.x
    rescale_acts_by_decoder_norm (topk)   folded into the weights: W_enc and b_enc times ||W_dec row||,
                            W_dec divided by it (the same codes and reconstruction)
    dtype                   float32, float64, float16 or bfloat16 (or "torch.float32", ...): read as float32

Weights are computed in float32 whatever the file's dtype. A 3.x-5.x `scaling_factor` tensor (the fine-tuning
scale of the codes before decoding) is folded into W_dec's rows; a `log_threshold` (older JumpReLU files)
becomes threshold = exp(log_threshold).

`load_any(path, params)` reads either a SAELens directory or a tinygpt SAE file; the CLI's SAE arguments
(`sae eval`, `polysemantic --sae`, `superposition --sae`) go through it.

`save_saelens` writes the 6.x format (readable by SAELens' `SAE.load_from_disk`), with tinygpt's own input
scale folded into the weights (W_enc * s, W_dec / s, b_dec / s: the same codes and reconstruction) and the
tinygpt training settings and provenance under metadata "tinygpt_training" / "tinygpt_extra", so that
tinygpt -> SAELens -> tinygpt gives back the same SAE.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tinygpt.errors import OutputError, SiteError
from tinygpt.files import TEMP_MARK, parse_json, read_bytes, read_json, save_safetensors, write_json, writer_lock
from tinygpt.sites import SITES, site_of_tl, tl_name

from .harvest import check_tensors, is_integer
from .sae import SAE, SAEConfig, SAEError, check_sae_model, load_sae, param_shapes

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # metadata.sae_lens_version written: the format; SAELens reads a file without it as 3.x-5.x

ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}  # SAELens -> kind
NORMALIZATIONS = {"none": "none", "expected_average_only_in": "none", "constant_norm_rescale": "constant_norm_rescale",
                  "layer_norm": "layer_norm"}  # SAELens' normalize_activations -> SAEConfig.input_norm
OLD_NAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index",
             "activation_fn_str": "activation_fn"}  # SAELens 3.x-5.x name -> 6.x name
DTYPES = ("float32", "float64", "float16", "bfloat16")
TRAINING_FIELDS = ("l1_coeff", "lr", "batch_size", "steps", "warmup_steps", "dead_steps", "resample_every", "seed")


def is_saelens_dir(path) -> bool:
    """Whether `path` is a directory holding a cfg.json (SAELens' layout)."""
    path = Path(path)
    return path.is_dir() and (path / CFG_FILE).exists()


def load_any(path: str | os.PathLike, params=None) -> SAE:
    """An SAE from a SAELens directory (`load_saelens`) or a tinygpt SAE file (`probes.sae.load_sae`): what
    the CLI's SAE arguments read."""
    if Path(path).is_dir() and not is_saelens_dir(path):
        raise SAEError(f"SAELens directory {str(path)!r} has no {CFG_FILE}: a SAELens SAE is a directory of "
                       f"{CFG_FILE} and {WEIGHTS_FILE}; a tinygpt SAE is one .safetensors file")
    return load_saelens(path, params) if is_saelens_dir(path) else load_sae(path, params)


# ------------------------------------------------------------------------------------------------- reading


def saelens_fields(cfg: dict) -> dict:
    """cfg.json of any SAELens version as one flat dict of 6.x names: the "metadata" fields lifted to the top
    level, the 3.x-5.x names renamed, top-k given as an architecture and k, a boolean normalize_activations
    given as its mode."""
    fields = {**(cfg.get("metadata") or {}), **{k: v for k, v in cfg.items() if k != "metadata"}}
    fields = {OLD_NAMES.get(name, name): value for name, value in fields.items()}
    kwargs = fields.get("activation_fn_kwargs") or {}
    if fields.get("activation_fn") == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
        fields.update(architecture="topk", k=kwargs["k"])  # 5.x wrote architecture "standard" beside it
    if isinstance(fields.get("normalize_activations"), bool):
        fields["normalize_activations"] = "expected_average_only_in" if fields["normalize_activations"] else "none"
    return fields


def field_error(where: str, name: str, problem: str) -> SAEError:
    """One line naming the file and the field (and its 3.x-5.x name, if it had another):
    "SAELens cfg.json '...': field 'hook_name' ('hook_point' in 3.x-5.x files) ..."."""
    old = [old for old, new in OLD_NAMES.items() if new == name]
    return SAEError(f"{where}: field {name!r}" + (f" ({old[0]!r} in 3.x-5.x files)" if old else "") + f" {problem}")


def read_kind(fields: dict, where: str) -> tuple[str, int | None]:
    """(SAEConfig.kind, k for top-k) from architecture / activation_fn."""
    architecture = fields.get("architecture") or "standard"
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise field_error(where, "architecture", f"is {architecture!r}; tinygpt reads {', '.join(ARCHITECTURES)}")
    activation = fields.get("activation_fn")
    if not isinstance(activation, (str, type(None))) or activation not in (None, "relu", "topk") or (activation == "topk" and architecture != "topk"):
        raise field_error(where, "activation_fn", f"is {activation!r}; tinygpt reads relu, or topk with "
                                                  f"activation_fn_kwargs.k")
    if architecture != "topk":
        return ARCHITECTURES[architecture], None
    k = fields.get("k")
    if not is_integer(k) or k < 1:
        raise field_error(where, "k", f"is {k!r}; a top-k SAE needs an integer k >= 1")
    return "topk", k


def read_site(fields: dict, where: str) -> tuple[str, int | None]:
    """(site, layer) of hook_name, checked against hook_layer, hook_head_index and reshape_activations."""
    hook = fields.get("hook_name")
    if not isinstance(hook, str):
        raise field_error(where, "hook_name", f"is {hook!r}; expected a TransformerLens hook name such as "
                                              f"'blocks.8.hook_resid_pre'")
    try:
        site, layer = site_of_tl(hook)
    except SiteError as e:
        raise field_error(where, "hook_name", f"has no tinygpt site ({e})") from None
    if SITES[site].shape[:2] != ("batch", "seq"):
        raise field_error(where, "hook_name", f"is {hook!r} ({site}), which is not one vector per token")
    if fields.get("hook_layer") is not None and fields["hook_layer"] != layer:
        raise field_error(where, "hook_layer", f"is {fields['hook_layer']!r} but hook_name {hook!r} is layer {layer}")
    if fields.get("hook_head_index") is not None:
        raise field_error(where, "hook_head_index", f"is {fields['hook_head_index']!r}; tinygpt reads SAEs on a "
                                                    f"whole site, not on one head's slice")
    reshape = fields.get("reshape_activations") or "none"
    if not isinstance(reshape, str) or reshape not in ("none", "hook_z") or (reshape == "hook_z" and site != "z"):
        raise field_error(where, "reshape_activations", f"is {reshape!r} with hook_name {hook!r}; expected 'none', "
                                                        f"or 'hook_z' for attn.hook_z")
    return site, layer


def read_input_norm(fields: dict, where: str) -> str:
    """SAEConfig.input_norm from normalize_activations."""
    mode = fields.get("normalize_activations") or "none"
    if not isinstance(mode, str) or mode not in NORMALIZATIONS:
        raise field_error(where, "normalize_activations", f"is {mode!r}; tinygpt reads {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[mode]


def check_dtype(fields: dict, where: str) -> None:
    """The cfg's dtype (with or without a "torch." prefix) must be a float type tinygpt reads; whatever it is,
    tinygpt computes in float32."""
    dtype = fields.get("dtype") or "float32"
    if (dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype) not in DTYPES:
        raise field_error(where, "dtype", f"is {dtype!r}; tinygpt reads {', '.join(DTYPES)}")


def read_config(fields: dict, where: str) -> SAEConfig:
    """The SAEConfig that computes what the cfg describes (tinygpt's training settings restored when the
    file was written by `save_saelens`)."""
    kind, k = read_kind(fields, where)
    site, layer = read_site(fields, where)
    for name in ("d_in", "d_sae"):
        if not is_integer(fields.get(name)) or fields[name] < 1:
            raise field_error(where, name, f"is {fields.get(name)!r}; expected an integer >= 1")
    apply_b_dec = fields.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise field_error(where, "apply_b_dec_to_input", f"is {apply_b_dec!r}; expected true or false")
    check_dtype(fields, where)
    training = fields.get("tinygpt_training") or {}
    if not isinstance(training, dict) or set(training) - set(TRAINING_FIELDS):
        raise field_error(where, "tinygpt_training", f"is {training!r}; expected an object of {TRAINING_FIELDS}")
    try:
        return SAEConfig(d_in=fields["d_in"], d_sae=fields["d_sae"], kind=kind, **({"k": k} if k else {}),
                         site=site, layer=layer, apply_b_dec_to_input=apply_b_dec,
                         input_norm=read_input_norm(fields, where), **training)
    except SAEError as e:
        raise SAEError(f"{where}: {e}") from None


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """{name: float32 array} of a safetensors file of float tensors (F32, F64, F16 or BF16: numpy alone cannot
    read bfloat16, so the file is parsed here: 8 bytes of header length, a JSON header of each tensor's dtype,
    shape and byte offsets, then the data)."""
    import ml_dtypes

    where = f"SAELens weights {str(path)!r}"
    data = read_bytes(path, "SAELens weights", error=SAEError)
    types = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    header = parse_json(data[8:8 + n], where, error=SAEError) if 0 < n <= len(data) - 8 else None
    if not isinstance(header, dict):
        raise SAEError(f"{where} is not a safetensors file (no readable header)")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = types.get(entry["dtype"]), entry["shape"]
            start, end = entry["data_offsets"]
            if not (isinstance(shape, list) and all(is_integer(size) and size >= 0 for size in shape)
                    and is_integer(start) and is_integer(end)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise SAEError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype is None:
            raise SAEError(f"{where}: tensor {name!r} is {entry['dtype']}; tinygpt reads {', '.join(types)}")
        entries.append((int(start), int(end), name, dtype, tuple(int(size) for size in shape), entry["dtype"]))
    # safetensors' layout: the tensors' byte ranges tile the data section, in order, from 0 to its end
    data_size, offset = len(data) - 8 - n, 0
    tensors = {}
    for start, end, name, dtype, shape, dtype_name in sorted(entries):
        if start != offset or end < start or end > data_size:
            raise SAEError(f"{where}: tensor {name!r} has data_offsets [{start}, {end}], but the tensors' data must "
                           f"follow one another from byte 0 to the data section's end ({data_size} bytes), this "
                           f"one from byte {offset} (the file is truncated or damaged)")
        if end - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise SAEError(f"{where}: tensor {name!r} has {end - start} bytes of data, not a {list(shape)} "
                           f"{dtype_name} (the file is truncated or damaged)")
        tensors[name] = np.frombuffer(data[8 + n + start: 8 + n + end], dtype).reshape(shape).astype(np.float32)
        offset = end
    if offset != data_size:
        raise SAEError(f"{where}: the tensors' data ends at byte {offset} of the {data_size}-byte data section "
                       f"(the file is damaged)")
    return tensors


def fold_legacy_tensors(tensors: dict, fields: dict) -> dict:
    """SAELens' older tensors in today's terms: threshold = exp(log_threshold); a fine-tuning scaling_factor
    s [d_sae] (the codes times s before decoding) folded into W_dec's rows; a top-k SAE's
    rescale_acts_by_decoder_norm folded into the weights (pre-activations times ||W_dec row|| before top-k,
    codes divided by it before decoding)."""
    tensors = dict(tensors)
    if "log_threshold" in tensors:
        tensors["threshold"] = np.exp(tensors.pop("log_threshold"))  # [d_sae]
    W_dec = tensors.get("W_dec")
    if W_dec is not None and tensors.get("scaling_factor", np.zeros(0)).shape == W_dec.shape[:1]:
        tensors["W_dec"] = W_dec * tensors.pop("scaling_factor")[:, None]  # [d_sae, d_in]
    if fields.get("rescale_acts_by_decoder_norm") and {"W_enc", "b_enc", "W_dec"} <= set(tensors):
        norms = np.linalg.norm(tensors["W_dec"], axis=-1)  # [d_sae]
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]  # [d_sae, d_in]
    return tensors


def model_site_width(params, site: str) -> int:
    """Width of one token's row at `site` in the model whose parameters are `params`."""
    W_Q = params["blocks"]["W_Q"]  # [layer, head, d_model, d_head]
    sizes = {"d_model": params["wte"].shape[1], "head": W_Q.shape[1], "d_head": W_Q.shape[3],
             "d_mlp": params["blocks"]["W_in"].shape[2], "vocab": params["wte"].shape[0], "1": 1}
    return math.prod(sizes[d] for d in SITES[site].shape[2:])


def check_against_model(config: SAEConfig, params, where: str) -> None:
    """The SAE's layer exists in the model and its d_in is the site's width there."""
    n_layer = params["blocks"]["W_Q"].shape[0]
    if config.layer is not None and config.layer >= n_layer:
        raise field_error(where, "hook_name", f"is {tl_name(config.site, config.layer)!r}, but the model has "
                                              f"{n_layer} layers")
    width = model_site_width(params, config.site)
    if width != config.d_in:
        raise field_error(where, "d_in", f"is {config.d_in} but {config.site} of this model is {width} wide: the "
                                         f"SAE belongs to another model")


def load_saelens(path: str | os.PathLike, params=None) -> SAE:
    """An SAE from a SAELens directory (cfg.json + sae_weights.safetensors, any SAELens version), checked:
    every field that decides what it computes, its tensors, and given the model's `params`, that its layer
    and d_in fit the model (and, for an SAE written by tinygpt, the model fingerprint). Any problem is one
    SAEError naming the field or tensor and the file."""
    path = Path(path)
    where = f"SAELens cfg.json {str(path / CFG_FILE)!r}"
    cfg = read_json(path / CFG_FILE, "SAELens cfg.json", error=SAEError)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("metadata", {}), dict):
        raise SAEError(f"{where} is not a JSON object with an object 'metadata'")
    fields = saelens_fields(cfg)
    config = read_config(fields, where)
    tensors = fold_legacy_tensors(read_weights(path / WEIGHTS_FILE), fields)
    check_tensors(tensors, param_shapes(config), f"SAELens weights {str(path / WEIGHTS_FILE)!r}", error=SAEError)
    extra = fields.get("tinygpt_extra") or {}
    if not isinstance(extra, dict):
        raise field_error(where, "tinygpt_extra", f"is {extra!r}; expected an object")
    kept = {name: value for name, value in fields.items() if name not in ("tinygpt_extra", "tinygpt_training")}
    sae = SAE(config, {name: jnp.asarray(tensors[name]) for name in param_shapes(config)}, {**extra, "saelens": kept})
    if params is not None:
        check_against_model(config, params, where)
        check_sae_model(sae, params, where)
    return sae


# ------------------------------------------------------------------------------------------------- writing


def saelens_tensors(sae: SAE) -> dict[str, np.ndarray]:
    """The SAE's tensors as SAELens computes them: float32, tinygpt's input scale s folded in (W_enc * s,
    W_dec / s, b_dec / s: SAELens' `fold_activation_norm_scaling_factor`)."""
    s = sae.config.input_scale
    tensors = {name: np.asarray(value, np.float32) for name, value in sae.params.items()}
    if s != 1.0:
        tensors.update(W_enc=tensors["W_enc"] * np.float32(s), W_dec=tensors["W_dec"] / np.float32(s),
                       b_dec=tensors["b_dec"] / np.float32(s))
    return tensors


def saelens_cfg(sae: SAE) -> dict:
    """cfg.json in SAELens 6.x's format for `sae` (its site as hook_name; the model-side fields that came with
    a loaded SAELens SAE kept)."""
    config = sae.config
    if config.site is None:
        raise SAEError("save_saelens: the SAE records no site (SAEConfig.site): SAELens needs its hook_name")
    try:
        hook = tl_name(config.site, config.layer)
    except SiteError as e:
        raise SAEError(f"save_saelens: {e}") from None
    import tinygpt

    loaded = sae.info.get("saelens", {})
    kept = {name: loaded[name] for name in ("model_name", "context_size", "prepend_bos", "dataset_path",
                                            "model_from_pretrained_kwargs") if name in loaded}
    extra = {name: value for name, value in sae.info.items() if name != "saelens"}
    metadata = {"model_name": extra.get("model"), **kept, "hook_name": hook, "hook_head_index": None,
                "sae_lens_version": FORMAT_VERSION, "tinygpt_version": tinygpt.version(),
                "tinygpt_training": {name: getattr(config, name) for name in TRAINING_FIELDS},
                "tinygpt_extra": extra}
    architecture = {kind: name for name, kind in ARCHITECTURES.items()}[config.kind]
    cfg = {"architecture": architecture, "d_in": config.d_in, "d_sae": config.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": config.apply_b_dec_to_input,
           "normalize_activations": config.input_norm,
           "reshape_activations": "hook_z" if config.site == "z" else "none", "metadata": metadata}
    if config.kind == "topk":
        cfg.update(k=config.k, rescale_acts_by_decoder_norm=False)
    return cfg


def save_saelens(sae: SAE, path: str | os.PathLike) -> None:
    """Write `sae` as a SAELens directory (6.x format, float32). The directory appears complete or not at
    all: both files are written into a temporary directory beside `path`, which is then renamed to `path`.
    An existing `path` is replaced only when it is empty or holds just a SAELens SAE's two files."""
    path = Path(path)
    cfg, tensors = saelens_cfg(sae), saelens_tensors(sae)
    check_directory(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():  # as check_output_file: a missing directory is the caller's mistake, not created
        raise OutputError(f"cannot write a SAELens SAE to {str(path)!r}: the directory {str(parent)!r} does not "
                          f"exist")
    with writer_lock(path):
        check_directory(path)  # again, now that no other tinygpt can be writing it
        remove_stale_staging(path)
        staging = parent / f".{path.name}{TEMP_MARK}.{os.getpid()}.{os.urandom(4).hex()}"
        staging.mkdir()
        try:
            save_safetensors(staging / WEIGHTS_FILE, tensors)
            write_json(staging / CFG_FILE, cfg)
            replace_directory(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_directory(path: Path) -> None:
    """`path` may be written: missing, an empty directory or one holding just a SAELens SAE's two files."""
    if path.exists():
        if not path.is_dir():
            raise SAEError(f"cannot write a SAELens SAE to {str(path)!r}: it is a file, not a directory")
        others = sorted(entry.name for entry in path.iterdir() if entry.name not in (CFG_FILE, WEIGHTS_FILE))
        if others:
            raise SAEError(f"cannot write a SAELens SAE to {str(path)!r}: the directory holds other files "
                           f"({', '.join(others[:3])}); give a new or empty directory")


def remove_stale_staging(path: Path) -> None:
    """Delete the staging directories (.NAME.tinygpt-tmp.*, and the *.old ones being replaced) that an earlier
    save of `path`, killed before it could clean up, left beside it. Called holding path's writer lock."""
    prefix = f".{path.name}{TEMP_MARK}."
    for entry in (path.parent if str(path.parent) else Path(".")).iterdir():
        if entry.name.startswith(prefix):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def replace_directory(new: Path, path: Path) -> None:
    """Rename directory `new` to `path`; an existing `path` is first renamed aside, then removed."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".{path.name}{TEMP_MARK}.{os.getpid()}.{os.urandom(4).hex()}.old"
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
