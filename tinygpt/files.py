"""Reading and writing files safely: the one way tinygpt touches the disk.

Writing: every artifact (weights, SAE, tuned lens, harvest sidecar, JSON, plots) goes through `atomic_write`:
a temporary file in the destination's directory, flushed and fsynced, then renamed over the destination
(and the directory fsynced), so a reader sees the old file or the new one, never half of one. The temporary
file is removed on any exit through Python (an exception, Ctrl-C, SIGTERM in the CLI). Whoever writes a
file or a directory that another process could write at the same time holds `writer_lock` first: a second
writer gets `LockedError` naming the holder, at once, instead of interleaving its rows with the first's.

Reading: `read_bytes` / `read_json` accept only regular files (a FIFO would hang, /dev/zero would never
end) up to a size cap, and turn every failure (missing, unreadable, not JSON, nested too deeply) into one
error naming the file.

This module imports nothing from tinygpt but its errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from .errors import LockedError, OutputError

TEMP_MARK = ".tinygpt-tmp"  # temporary files are named .NAME.tinygpt-tmp.PID.RANDOM beside their destination
MAX_JSON_BYTES = 64 << 20  # config.json, vocab.json, sidecars: GPT-2's vocab.json is 1 MB


# ------------------------------------------------------------------------------------------------ writing


def check_output_file(path, flag: str, *, suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work is done, an output path that cannot be written: its directory missing or not
    writable, the path a directory, or (given `suffixes`) an extension outside them. Returns the Path."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {str(path)!r}: unknown extension {path.suffix or '(none)'!r}; "
                          f"use one of {', '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a directory; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r}: the directory {str(parent)!r} is not writable")
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """`with atomic_write(path) as f: f.write(...)`: the file appears at `path` complete, or not at all.

    Writes a temporary file beside `path`, fsyncs it, renames it over `path` and fsyncs the directory. On
    any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left as it was.
    The new file gets the permissions a plain `open(path, "w")` would give it."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}{TEMP_MARK}.{os.getpid()}.{os.urandom(4).hex()}"
    umask = os.umask(0)
    os.umask(umask)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path, obj, *, indent: int | None = 1) -> None:
    """JSON with sorted keys (two identical runs give identical bytes), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def _safetensors_parts(tensors: dict, metadata: dict[str, str] | None):
    """(header, data) of the safetensors serialisation of numpy `tensors`, the header deterministic: its keys
    (metadata and tensor names) in sorted order. safetensors' own writer keeps the metadata in a hash map, so
    two runs may order it differently; the data section is the library's, untouched (a view, not a copy)."""
    from safetensors.numpy import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text, memoryview(raw)[8 + n:]


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The whole deterministic safetensors serialisation as bytes (see `save_safetensors`)."""
    header, data = _safetensors_parts(tensors, metadata)
    return header + bytes(data)


def save_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write numpy `tensors` (+ string metadata) as a safetensors file, atomically and deterministically.
    Peak memory: one serialised copy of the tensors (the library's), written out without another."""
    header, data = _safetensors_parts(tensors, metadata)
    with atomic_write(path, "wb") as f:
        f.write(header)
        f.write(data)


def remove_stale_temporaries(directory) -> None:
    """Delete temporary files left in `directory` by a tinygpt writer that was killed (SIGKILL, power loss)
    before it could clean up. Call it while holding the directory's writer lock."""
    for entry in Path(directory).glob(f".*{TEMP_MARK}.*"):
        with contextlib.suppress(OSError):
            entry.unlink()


def remove_own_temporaries(path) -> None:
    """Delete temporary files that an earlier writer of `path` (killed before it could clean up) left beside
    it; only this file's (`.NAME.tinygpt-tmp.*`), never another writer's. Call holding path's writer lock."""
    path = Path(path)
    prefix = f".{path.name}{TEMP_MARK}."
    for entry in (path.parent if str(path.parent) else Path(".")).iterdir():
        if entry.name.startswith(prefix):
            entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ locking


def _holder(lock_path: Path) -> str:
    """Who holds the lock, as its holder wrote it just after taking it (waiting up to a second for that)."""
    for _ in range(20):
        try:
            info = json.loads(lock_path.read_text())
            since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']} on {info['host']} since {since}: {info['command']}"
        except Exception:
            time.sleep(0.05)
    return "another process"


def _is_lock_file(fd: int) -> bool:
    """Empty (just created, or left by a holder killed before it wrote) or a holder's JSON record."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return True
    try:
        return {"pid", "host", "since", "command"} <= set(json.loads(data))
    except (ValueError, TypeError):
        return False


@contextlib.contextmanager
def writer_lock(target, flag: str = "--out"):
    """Hold an exclusive lock on `target` (a file or directory to be written) for the duration of the block.

    The lock is `fcntl.flock` on `TARGET.lock` beside the target (created if missing, removed on release);
    it is released by the kernel when the holder dies, so a killed writer never leaves a stale lock. A
    second writer raises LockedError at once, naming the holder (pid, host, command, start time)."""
    import fcntl

    target = Path(target)
    lock_path = target.parent / f"{target.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{flag} {str(target)!r}: cannot create the lock file {str(lock_path)!r}: "
                              f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{flag} {str(target)!r} is being written by another tinygpt "
                              f"({_holder(lock_path)}); wait for it to finish or choose another {flag}") from None
        if not _is_lock_file(fd):  # a file of the user's that happens to be called TARGET.lock: leave it
            os.close(fd)
            raise OutputError(f"{flag} {str(target)!r}: {str(lock_path)!r} exists and is not a tinygpt lock file; "
                              "move it away")
        # The holder before us may have removed the file between our open and our flock: then we hold a
        # lock on a deleted inode, which protects nothing. Retry until the path is the inode we locked.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(["tinygpt", *sys.argv[1:]]) if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still locked, so no one else can be holding this inode
        os.close(fd)


# ------------------------------------------------------------------------------------------------ reading


def read_bytes(path, what: str, *, max_bytes: int | None = None, error=OutputError) -> bytes:
    """The contents of a regular file, or `error` (an exception class) naming the file: missing, not a
    regular file (FIFO, device, directory), unreadable, or larger than `max_bytes`."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat on the open file then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except PermissionError:
        raise error(f"{what} {str(path)!r} is not readable (permission denied)") from None
    except OSError as e:
        raise error(f"{what} {str(path)!r} cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise error(f"{what} {str(path)!r} is {kind}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{what} {str(path)!r} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as e:
                raise error(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
            if not chunk:
                break
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:  # grew while we read it
                raise error(f"{what} {str(path)!r} is more than the {max_bytes:,} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path, what: str, *, max_bytes: int = MAX_JSON_BYTES, error=OutputError):
    """Parse a JSON file (see `read_bytes`); bad UTF-8, bad JSON or absurd nesting is `error` naming it."""
    data = read_bytes(path, what, max_bytes=max_bytes, error=error)
    return parse_json(data, f"{what} {str(path)!r}", error=error)


def parse_json(data: bytes | str, where: str, *, error=OutputError):
    """json.loads with every failure one `error` naming `where`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to be a tinygpt/GPT-2 file") from None


def save_figure(fig, path, **savefig_kwargs) -> None:
    """A matplotlib figure written atomically, in the format its extension names (.png, .pdf, .svg, ...)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", **savefig_kwargs)
