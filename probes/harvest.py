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

    activations.npy   float32 [n_tokens, width], preallocated and written in place (np.lib.format.open_memmap)
    tokens.npy        int32 [n_windows, seq], the windows
    harvest.json      what was harvested (site, layer, seq, width, fingerprints of the model and the windows)
                      and `rows_done`, the progress

After each chunk the activations are flushed, then `rows_done` is replaced atomically, so an interrupted
harvest restarts at its first unfinished chunk; the same call resumes it. Without `path` the harvest is kept
in memory, within a budget of `max_bytes`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config
from tinygpt.errors import ArtifactError
from tinygpt.model import causal_mask, forward, run_blocks
from tinygpt.sites import SITES, check_site_names

ACTIVATIONS, TOKENS, SIDECAR = "activations.npy", "tokens.npy", "harvest.json"
FORMAT = 1


class HarvestError(ArtifactError):
    """A site that cannot be harvested, a corpus too short, or a harvest directory that does not match."""


@dataclasses.dataclass
class Harvest:
    """A site's activations, one row per token of `windows` (row w * seq + p = window w, position p)."""

    acts: np.ndarray  # [n_tokens, width] float32 (np.memmap when harvested to disk)
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
            raise HarvestError(f"site {site!r} is not per layer; give no layer")
        return None
    if layer is None:
        raise HarvestError(f"site {site!r} is per layer: give a layer in [0, {config.n_layer})")
    if not 0 <= int(layer) < config.n_layer:
        raise HarvestError(f"layer {layer} is outside [0, {config.n_layer})")
    return int(layer)


def embed_tokens(params, tokens):
    """The residual stream entering block 0 for unpadded windows: wte[tokens] + wpe[positions].
    tokens [batch, seq] -> [batch, seq, d_model]"""
    positions = jnp.arange(tokens.shape[1])  # [seq]
    return params["wte"][tokens] + params["wpe"][positions]


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
    the padding dropped), so one compiled program serves every chunk."""
    run = site_function(config, site, layer)
    for first in range(start, len(windows), batch):
        chunk = windows[first: first + batch]  # [<= batch, seq]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])  # [batch, seq]
        yield first, np.asarray(run(params, padded))[: len(chunk)]


# ---------------------------------------------------------------------------------------------- corpus


def token_windows(stream, seq: int, n_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `seq` tokens covering the stream (or its first `n_tokens`), the tail shorter
    than a window dropped.  [stream] -> [n_windows, seq]"""
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise HarvestError(f"the token stream must be a 1-d array of token ids, got {stream.dtype} {stream.shape}")
    if seq < 1:
        raise HarvestError(f"the window length must be at least 1, got {seq}")
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


def corpus_stream(model, corpus: str | os.PathLike | None = None, *, split: str = "val",
                  max_tokens: int | None = None) -> tuple[np.ndarray, str]:
    """The token stream to harvest over, and a one-line description of it.

    corpus      a text file (tokenised with the model's tokenizer) or a .npy file of token ids; None: the
                embedded model's own Shakespeare corpus (`weights.corpus`), only for the embedded model
    split       "val" (the held-out plays, the default) or "train", for the embedded corpus
    max_tokens  stop tokenising once the stream has this many tokens
    """
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise HarvestError(f"corpus file {path} does not exist")
        if path.suffix == ".npy":
            stream = np.load(path)
            if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
                raise HarvestError(f"{path} must hold a 1-d array of token ids, got {stream.dtype} {stream.shape}")
            if stream.size and (stream.min() < 0 or stream.max() >= model.config.vocab_size):
                raise HarvestError(f"{path} has token ids outside the vocabulary [0, {model.config.vocab_size})")
            return stream[:max_tokens].astype(np.int32), f"{path} ({len(stream):,} token ids)"
        if model.tokenizer is None:
            raise HarvestError(f"model {model.source!r} has no tokenizer: give the corpus as a .npy file of token ids")
        stream = text_stream(model.tokenizer, [path.read_text(encoding="utf-8")])
        return stream[:max_tokens], f"{path}"
    if model.source != "embedded":
        raise HarvestError(f"give a corpus file (text, or .npy token ids) for model {model.source!r}; only the "
                           f"embedded model has a default corpus")
    if split not in ("train", "val"):
        raise HarvestError(f"split must be 'train' or 'val', got {split!r}")
    from weights import corpus as shakespeare

    train, val = shakespeare.split()
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


# ------------------------------------------------------------------------------------------------ harvest


def fingerprint(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes (a pytree's leaves, in order)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(arrays):
        leaf = np.asarray(leaf)
        digest.update(f"{leaf.dtype}{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def default_batch(seq: int, width: int, chunk_bytes: int = 64 << 20) -> int:
    """Windows per chunk so that one chunk's activations take at most `chunk_bytes` (1 to 64 windows)."""
    return int(np.clip(chunk_bytes // (seq * width * 4), 1, 64))


def harvest(params, config: Config, stream, site: str, layer: int | None = None, *, seq: int | None = None,
            batch: int | None = None, n_tokens: int | None = None, path: str | os.PathLike | None = None,
            max_bytes: int = 4 << 30, progress: bool = True, source: str = "",
            on_chunk: Callable[[int, int], None] | None = None) -> Harvest:
    """Activations of `site` (at block `layer`) at every token of `stream`, in windows of `seq` tokens.

    stream     1-d token ids, cut into non-overlapping windows (default seq: the model's context n_ctx)
    batch      windows per chunk (default: about 64 MiB of activations per chunk)
    n_tokens   harvest only the first n_tokens of the stream
    path       a directory: activations go to a memory-mapped activations.npy, progress to harvest.json, and
               an interrupted harvest resumes where it stopped (same arguments); None: in memory, failing if
               the result would exceed `max_bytes`
    progress   show a tqdm progress bar
    source     a name for the model, recorded in harvest.json
    on_chunk   called as on_chunk(rows_done, n_rows) after each chunk is safely written
    """
    layer = check_layer(config, site, layer)
    width = site_width(config, site)
    seq = config.n_ctx if seq is None else int(seq)
    if not 1 <= seq <= config.n_ctx:
        raise HarvestError(f"window length {seq} must be in [1, n_ctx={config.n_ctx}]")
    windows = token_windows(stream, seq, n_tokens)
    if windows.max() >= config.vocab_size or windows.min() < 0:
        raise HarvestError(f"the corpus has token ids outside the vocabulary [0, {config.vocab_size})")
    batch = default_batch(seq, width) if batch is None else int(batch)
    if batch < 1:
        raise HarvestError(f"batch must be at least 1, got {batch}")
    n_rows = windows.size
    info = {"format": FORMAT, "site": site, "layer": layer, "seq": seq, "width": width, "n_rows": n_rows,
            "model": fingerprint(params), "windows": fingerprint(windows), "source": source, "rows_done": 0}

    if path is None:
        needed = n_rows * width * 4
        if needed > max_bytes:
            raise HarvestError(f"{n_rows:,} rows x {width} floats need {needed / 2**30:.2f} GiB, over the memory "
                               f"budget of {max_bytes / 2**30:.2f} GiB: harvest to a directory (path=) or use "
                               f"fewer tokens")
        acts = np.empty((n_rows, width), np.float32)
    else:
        path = Path(path)
        acts, info = _open_store(path, windows, info)

    from tqdm.auto import tqdm

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
                _write_json(path / SIDECAR, info)
            bar.update(rows.stop - rows.start)
            if on_chunk is not None:
                on_chunk(rows.stop, n_rows)
    finally:
        bar.close()
    return Harvest(acts=acts, windows=windows, site=site, layer=layer, path=path, info=info)


def _open_store(path: Path, windows: np.ndarray, info: dict):
    """Create the harvest directory's files, or reopen them to resume when harvest.json matches `info`."""
    sidecar = path / SIDECAR
    shape = (info["n_rows"], info["width"])
    if sidecar.is_file():
        old = json.loads(sidecar.read_text())
        differs = [k for k in ("format", "site", "layer", "seq", "width", "n_rows", "model", "windows")
                   if old.get(k) != info[k]]
        if differs:
            raise HarvestError(f"{path} holds a different harvest ({', '.join(differs)} differ): remove it or "
                               f"choose another directory")
        acts = np.lib.format.open_memmap(path / ACTIVATIONS, mode="r+")
        if acts.shape != shape or acts.dtype != np.float32:
            raise HarvestError(f"{path / ACTIVATIONS} has shape {acts.shape} {acts.dtype}, expected {shape} float32: "
                               f"remove {path} and harvest again")
        return acts, {**info, "rows_done": int(old["rows_done"])}
    path.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in path.iterdir()}
    if present and present <= {TOKENS, ACTIVATIONS, sidecar.with_suffix(".tmp").name}:
        # a creation interrupted before its sidecar (written last, before any row): nothing was harvested
        for name in present:
            (path / name).unlink()
    elif present:
        raise HarvestError(f"{path} is not empty and holds no {SIDECAR}: choose an empty or new directory")
    np.save(path / TOKENS, windows)
    acts = np.lib.format.open_memmap(path / ACTIVATIONS, mode="w+", dtype=np.float32, shape=shape)
    _write_json(sidecar, info)
    return acts, info


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (a temporary file, then rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_harvest(path: str | os.PathLike) -> Harvest:
    """A finished harvest from its directory; activations memory-mapped read-only."""
    path = Path(path)
    if not (path / SIDECAR).is_file():
        raise HarvestError(f"{path} is not a harvest directory (no {SIDECAR}); create one with `tinygpt harvest`")
    info = json.loads((path / SIDECAR).read_text())
    if info["rows_done"] < info["n_rows"]:
        raise HarvestError(f"the harvest in {path} is incomplete ({info['rows_done']:,} of {info['n_rows']:,} rows): "
                           f"run the same harvest again to resume it")
    acts = np.load(path / ACTIVATIONS, mmap_mode="r")
    windows = np.load(path / TOKENS)
    return Harvest(acts=acts, windows=windows, site=info["site"], layer=info["layer"], path=path, info=info)
