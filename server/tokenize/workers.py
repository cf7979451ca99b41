"""Tokenizer worker processes, so tokenizing never holds the GIL of the process that drives the device.

Each worker holds one pickled encoder (tokenizer and settings, no weights) and tokenizes one slice at a time; a
thread of the server sends it the slice and waits for the packed arrays, releasing the GIL while it waits. A worker
that dies fails only the slice it held (WorkerDied: UNAVAILABLE, retry), is logged, counted and replaced; one that
takes far longer than its slice explains (stopped, stuck) is killed and replaced the same way. Replacing never gives
up: starts that fail are retried with a bounded back-off, and while no worker is alive calls fail at once.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import deque
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
REPLACE_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # pauses between failed starts; the last repeats for ever
# A slice's bound: this much, plus its characters at a rate some 100 times below a busy core's (~8 M chars/s).
SLICE_TIMEOUT_S = 10.0
SLICE_CHARS_PER_S = 100_000.0
STOP_WAIT_S = 2.0  # how long close() waits for workers to exit on their own before killing them


class WorkerStartError(RuntimeError):
    """A tokenizer worker did not start; the message says why."""


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class WorkerEvents:
    """What the server counts and reports (called on the workers' own threads, so they must not block)."""

    died: Callable[[], None] = _nothing
    start_failed: Callable[[], None] = _nothing
    changed: Callable[[], None] = _nothing  # the number of live workers changed


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    dead: threading.Event = field(default_factory=threading.Event)
    abandoned: str = ""  # why the server killed it (a slice past its bound), "" for a death of its own

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
    try:
        conn.send_bytes(payload)
    except OSError:  # died at once; _await_ready says how
        pass
    return _Worker(proc, conn)


def _await_ready(w: _Worker, deadline: float) -> None:
    try:
        if not w.conn.poll(max(0.0, deadline - time.monotonic())):
            w.proc.kill()
            w.proc.wait()
            raise WorkerStartError(f"tokenizer worker pid {w.pid} was not ready within {START_TIMEOUT_S:.0f} s")
        w.conn.recv()  # ("ready", pid)
    except (EOFError, OSError):
        code = w.proc.wait()
        raise WorkerStartError(f"tokenizer worker pid {w.pid} exited with code {code} while starting") from None


def _stop(workers: Sequence[_Worker], timeout_s: float) -> list[int]:
    """Ask each worker to exit (all at once), wait up to `timeout_s` for all of them together, kill the rest;
    returns the pids killed."""
    for w in workers:
        try:
            w.conn.send(None)
            w.conn.close()
        except OSError:  # already gone
            pass
    deadline = time.monotonic() + timeout_s
    killed = []
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # busy with a slice, stopped or stuck: it does not hold up the server
            w.proc.kill()
            w.proc.wait()
            killed.append(w.pid)
    return killed


def slice_timeout(pairs: Sequence[tuple[str, str]], base_s: float = SLICE_TIMEOUT_S) -> float:
    """How long a worker may take over `pairs` before it is deemed stuck."""
    return base_s + sum(len(q) + len(p) for q, p in pairs) / SLICE_CHARS_PER_S


class TokenizerWorkers:
    """`count` worker processes running `encoder.encode`; `encode` is called from threads, one slice each."""

    def __init__(
        self,
        encoder: Any,
        count: int,
        events: WorkerEvents | None = None,
        slice_timeout_s: float = SLICE_TIMEOUT_S,
        backoff_s: Sequence[float] = REPLACE_BACKOFF_S,
    ) -> None:
        self._payload = pickle.dumps(encoder, protocol=pickle.HIGHEST_PROTOCOL)
        self.count = count
        self.events = events or WorkerEvents()
        self.slice_timeout_s = slice_timeout_s
        self.backoff_s = tuple(backoff_s)
        self.failed_starts = 0
        self._last_failure = ""
        self._idle: deque[_Worker] = deque()
        self._workers: set[_Worker] = set()  # started and not yet reaped
        self._cond = threading.Condition()  # guards the three above; notified when a worker is idle or gone
        self._closed = threading.Event()

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
        with self._cond:
            if self._closed.is_set():
                _stop([w], STOP_WAIT_S)
                return
            self._workers.add(w)
            self._idle.append(w)
            self._cond.notify()
        threading.Thread(target=self._reap, args=(w,), name=f"reap-tokenizer-{w.pid}", daemon=True).start()
        self.events.changed()

    @property
    def live(self) -> int:
        """Workers running now (a replacement counts once it is ready)."""
        with self._cond:
            return len(self._workers)

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Any]:
        """The pairs tokenized by a free worker (waiting for one), as views into its packed arrays."""
        w = self._take()
        tracing.worker_taken(w.pid)
        timeout_s = slice_timeout(pairs, self.slice_timeout_s)
        try:
            w.conn.send((list(pairs), options))
            if not w.conn.poll(timeout_s):
                self._abandon(w, f"it took more than {timeout_s:.1f} s over a slice of {len(pairs)} pairs")
            status, value = w.conn.recv()
        except (EOFError, OSError):
            w.dead.set()
            what = f"was stopped: {w.abandoned}" if w.abandoned else "died while tokenizing this request"
            raise WorkerDied(f"the tokenizer worker (pid {w.pid}) {what}; retry, a new one is starting") from None
        self._give_back(w)
        if status != "ok":
            raise RuntimeError(f"tokenizing failed in worker pid {w.pid}: {value}")
        return unpack(value)

    def _abandon(self, w: _Worker, why: str) -> None:
        """Kill a worker that holds a slice far too long (stopped, stuck); its reaper replaces it."""
        w.abandoned = why
        log.error("tokenizer worker pid %d killed: %s", w.pid, why)
        w.proc.kill()

    def _give_back(self, w: _Worker) -> None:
        with self._cond:
            self._idle.append(w)
            self._cond.notify()

    def _take(self) -> _Worker:
        """A free worker; waits while all are busy, fails at once while none is alive."""
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise WorkerDied("the server is shutting down its tokenizer workers")
                while self._idle:
                    w = self._idle.popleft()
                    # An idle worker has sent everything it was asked for: anything to read is the EOF of its exit.
                    if not w.dead.is_set() and not w.conn.poll(0):
                        return w
                    w.dead.set()  # died while idle: its reaper replaces it; take another
                if not self._workers:
                    raise WorkerDied(self.unavailable())
                self._cond.wait()

    def unavailable(self) -> str:
        """Why this model cannot tokenize now, for the callers it fails."""
        failed = f" ({self.failed_starts} failed starts so far, the last: {self._last_failure})"
        return (
            "no tokenizer worker is running for this model"
            + (failed if self._last_failure else "")
            + "; a new one is being started: retry shortly"
        )

    def _reap(self, w: _Worker) -> None:
        """Wait for the worker's exit; an exit the server did not ask for is logged, counted and replaced."""
        code = w.proc.wait()
        w.dead.set()
        with self._cond:
            self._workers.discard(w)
            self._cond.notify_all()  # callers waiting for a worker fail at once if none is left
        self.events.changed()
        if self._closed.is_set():
            return
        if not w.abandoned:
            log.error("tokenizer worker pid %d died (exit code %s); starting a new one", w.pid, code)
        self.events.died()
        self._replace()

    def _replace(self) -> None:
        """Start one worker, retrying with a bounded back-off until one starts or the workers are closed."""
        attempt = 0
        while not self._closed.is_set():
            try:
                fresh = _spawn(self._payload)
                _await_ready(fresh, time.monotonic() + START_TIMEOUT_S)
            except (WorkerStartError, OSError) as exc:
                pause = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                attempt += 1
                with self._cond:
                    self.failed_starts += 1
                    self._last_failure = str(exc)
                self.events.start_failed()
                log.error("could not start a tokenizer worker (%s); trying again in %.1f s", exc, pause)
                self._closed.wait(pause)
                continue
            if attempt:
                log.info("tokenizer worker pid %d started after %d failed attempts", fresh.pid, attempt)
            self._add(fresh)
            return

    def close(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Stop every worker, waiting at most `timeout_s` in all (they also exit on their own if this process dies)."""
        with self._cond:
            self._closed.set()
            workers = list(self._workers)
            self._workers.clear()
            self._cond.notify_all()
        killed = _stop(workers, timeout_s)
        if killed:
            log.warning("killed tokenizer worker(s) %s: still busy when the server stopped", killed)

    @property
    def pids(self) -> list[int]:
        with self._cond:
            return [w.pid for w in self._workers]
