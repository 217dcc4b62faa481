"""Ctrl-C for the `tinygpt` command: remembered from the process's first line of tinygpt, raised once the
command runs.

Python runs a signal handler at the next line of Python code; when that line belongs to a garbage-collector or
weakref callback (JAX registers one, jax._src.lib._xla_gc_callback; importlib has others), the
KeyboardInterrupt is printed as "Exception ignored in ..." and dropped, and a command ran on and replaced its
--out; raised inside an extension module's import, it can abort the interpreter or surface as another
exception. So while the command starts (imports, parsing) a Ctrl-C is only remembered (`install`); `arm`,
called when the command is about to run, stops at once if one came, and from then on a Ctrl-C is remembered
and raised. Commands also call `InterruptLatch.check` between steps and before writing. Imports nothing heavy:
it runs before numpy and jax are loaded."""

from __future__ import annotations

import signal
import threading


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """While the command starts: a Ctrl-C is remembered, not raised (see the module's doc)."""
    if _main_thread():
        signal.signal(signal.SIGINT, InterruptLatch.remember)


def arm() -> None:
    """The command is about to run: raise KeyboardInterrupt now if a Ctrl-C came during start-up, and make
    every later one raise (and be remembered)."""
    if _main_thread():
        signal.signal(signal.SIGINT, InterruptLatch.record)
    InterruptLatch.check_process()


class InterruptLatch:
    """Remembers a Ctrl-C (SIGINT) while a command prepares a file, so that it is never written after one.

    Ctrl-C raises KeyboardInterrupt as usual; the latch also records it, because a KeyboardInterrupt can be
    lost: Python runs the signal handler at the next line of Python code, and when that line belongs to a
    garbage-collector callback (JAX registers one, jax._src.lib._xla_gc_callback) the exception is printed as
    "Exception ignored in ..." and dropped, and the command ran on and replaced its --out. `check()` raises
    KeyboardInterrupt if a Ctrl-C was ever received: call it before writing and between steps."""

    received = False  # a Ctrl-C reached the process (set by `record`, which `install` puts first)

    def __init__(self):
        self.interrupted = False
        self._previous = None

    @classmethod
    def remember(cls, signum, frame):
        """The process's SIGINT handler while the command starts: remember only."""
        cls.received = True

    @classmethod
    def record(cls, signum, frame):
        """The process's SIGINT handler while the command runs: remember, then raise KeyboardInterrupt."""
        cls.received = True
        raise KeyboardInterrupt

    @classmethod
    def check_process(cls) -> None:
        if cls.received:
            raise KeyboardInterrupt

    def _handler(self, signum, frame):
        if self._previous == signal.SIG_IGN:
            return
        self.interrupted = True
        if callable(self._previous):
            self._previous(signum, frame)  # signal.default_int_handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt

    def check(self, *_) -> None:
        if self.interrupted or InterruptLatch.received:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
