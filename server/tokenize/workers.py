"""Tokenizer worker processes, so tokenizing never holds the GIL of the process that drives the device.

Each worker holds one pickled encoder (tokenizer and settings, no weights) and tokenizes one slice at a time; a
thread of the server sends it the slice and waits for the packed arrays, releasing the GIL while it waits. A worker
that dies fails only the slice it held (WorkerDied: UNAVAILABLE, retry), is logged, counted and replaced.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from server import tracing
from server.errors import WorkerDied
from server.tokenize.options import Options
from server.tokenize.packed import unpack

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # importing transformers and unpickling a 250k-word tokenizer, on a busy machine
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where `server` imports from
_REPLACE_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class WorkerStartError(RuntimeError):
    """A tokenizer worker did not start; the message says why."""


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    dead: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _spawn(payload: bytes) -> _Worker:
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.tokenize.worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    conn.send_bytes(payload)
    return _Worker(proc, conn)


def _await_ready(w: _Worker, deadline: float) -> None:
    try:
        if not w.conn.poll(max(0.0, deadline - time.monotonic())):
            raise WorkerStartError(f"tokenizer worker pid {w.pid} was not ready within {START_TIMEOUT_S:.0f} s")
        w.conn.recv()  # ("ready", pid)
    except (EOFError, OSError):
        code = w.proc.wait()
        raise WorkerStartError(f"tokenizer worker pid {w.pid} exited with code {code} while starting") from None


def _stop(*workers: _Worker) -> None:
    """Ask each worker to exit (all at once), then wait a moment for each; one that does not exit is killed."""
    for w in workers:
        try:
            w.conn.send(None)
            w.conn.close()
        except OSError:  # already gone
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


class TokenizerWorkers:
    """`count` worker processes running `encoder.encode`; `encode` is called from threads, one slice each."""

    def __init__(self, encoder: Any, count: int, on_death: Callable[[], None] | None = None) -> None:
        self._payload = pickle.dumps(encoder, protocol=pickle.HIGHEST_PROTOCOL)
        self.count = count
        self._on_death = on_death
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start every worker at once and wait until each is ready (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        started = [_spawn(self._payload) for _ in range(self.count)]
        try:
            for w in started:
                _await_ready(w, deadline)
        except BaseException:
            for w in started:
                w.proc.kill()
                w.proc.wait()
            raise
        for w in started:
            self._add(w)

    def _add(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                _stop(w)
                return
            self._workers.add(w)
        threading.Thread(target=self._reap, args=(w,), name=f"reap-tokenizer-{w.pid}", daemon=True).start()
        self._idle.put(w)

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Any]:
        """The pairs tokenized by a free worker (waiting for one), as views into its packed arrays."""
        w = self._take()
        tracing.worker_taken(w.pid)
        try:
            w.conn.send((list(pairs), options))
            status, value = w.conn.recv()
        except (EOFError, OSError):
            w.dead.set()
            raise WorkerDied(
                f"the tokenizer worker (pid {w.pid}) died while tokenizing this request; retry, a new one is starting"
            ) from None
        self._idle.put(w)
        if status != "ok":
            raise RuntimeError(f"tokenizing failed in worker pid {w.pid}: {value}")
        return unpack(value)

    def _take(self) -> _Worker:
        while True:
            w = self._idle.get()
            if w is None or self._closed:
                self._idle.put(None)  # wake the next waiter too
                raise WorkerDied("the server is shutting down its tokenizer workers")
            # An idle worker has sent everything it was asked for: anything to read is the EOF of its exit.
            if not w.dead.is_set() and not w.conn.poll(0):
                return w
            w.dead.set()  # died while idle: its reaper replaces it; take another

    def _reap(self, w: _Worker) -> None:
        """Wait for the worker's exit; an exit the server did not ask for is logged, counted and replaced."""
        code = w.proc.wait()
        w.dead.set()
        with self._lock:
            self._workers.discard(w)
            if self._closed:
                return
        log.error("tokenizer worker pid %d died (exit code %s); starting a new one", w.pid, code)
        if self._on_death is not None:
            self._on_death()
        for pause in _REPLACE_BACKOFF_S:
            try:
                fresh = _spawn(self._payload)
                _await_ready(fresh, time.monotonic() + START_TIMEOUT_S)
            except (WorkerStartError, OSError) as exc:
                log.error("could not start a tokenizer worker (%s); trying again in %.0f s", exc, pause)
                time.sleep(pause)
                continue
            self._add(fresh)
            return
        log.error("gave up replacing tokenizer worker pid %d; %d workers left", w.pid, len(self._workers))

    def close(self) -> None:
        """Stop every worker (they also exit on their own if this process dies)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        self._idle.put(None)
        _stop(*workers)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers]
