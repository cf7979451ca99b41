"""A tokenizer worker process: `python -m server.tokenize.worker FD`, started by TokenizerWorkers.

It receives one pickled encoder (a tokenizer and its settings, no weights) on the socket FD, then answers
(pairs, options) with Packed arrays until the socket closes. It exits when its parent does, even a SIGKILLed one.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from server.tokenize.packed import pack

PARENT_CHECK_S = 0.5


def exit_with_parent(parent: int) -> None:
    """A child busy with its work (a worker tokenizing, an int8 conversion) reads nothing from its parent: notice a
    parent gone (reparented, even after a SIGKILL) anyway, and exit."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(0)


def _unpickle(payload: bytes) -> Any:
    """The encoder; a tokenizer class shipped with its model (--trust-remote-code) lives in transformers' modules
    cache, which the server process put on its path when it loaded that class, and this one must too."""
    try:
        return pickle.loads(payload)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("transformers_modules"):
            raise
    from transformers.dynamic_module_utils import init_hf_modules

    init_hf_modules()
    return pickle.loads(payload)


def serve(conn: Connection) -> None:
    encoder = _unpickle(conn.recv_bytes())
    encoder.copy_tokenizer(1)
    encoder.encode([("warm up", "a short passage to warm up the tokenizer")])
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server closed the socket, or is gone
            return
        if job is None:
            return
        pairs, options = job
        try:
            reply = ("ok", pack(encoder.encode(pairs, options)))
        except Exception as exc:  # the request's error (as text: not every exception pickles)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


def main() -> None:
    # Ctrl-C and the orchestrator's SIGTERM are the server's to handle: it closes the workers when it is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    serve(Connection(int(sys.argv[1])))
    os._exit(0)  # nothing to flush; skip the interpreter's slow teardown


if __name__ == "__main__":
    main()
