"""The gRPC port against slow, idle, vanished and excess connections; the in-process bridge's local socket."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import stat
import tempfile

import grpc

from server.config import Config

log = logging.getLogger(__name__)
FD_HEADROOM = 256  # model files, the metrics port, the event loop, pipes
SOCKET_DIR_PREFIX = "reranker-"  # then the owning process's id: reranker-<pid>-<random>


def connection_options(c: Config) -> list[tuple[str, int]]:
    """gRPC core arguments bounding what a connection may hold on to."""
    options = [
        # gRPC sets SO_REUSEPORT by default: a second server on this port would bind too and take half the new
        # connections. Off, a busy port fails the bind, and startup stops with one line.
        ("grpc.so_reuseport", 0),
        # A connection that has not finished TLS and sent its HTTP/2 settings by then is closed.
        ("grpc.server_handshake_timeout_ms", int(c.handshake_timeout_s * 1000)),
        # Past this many open connections (handshakes included) gRPC closes new ones at once.
        ("grpc.max_allowed_incoming_connections", c.max_connections),
        # Ping clients with calls open; one that does not answer within 20 s is gone: its calls are cancelled.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Accept the Python client's 30 s keepalive pings on a quiet stream without a too_many_pings GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ]
    if c.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", int(c.max_connection_idle_s * 1000)))
    return options


def ensure_fd_limit(c: Config) -> None:
    """Raise the soft open-file limit to fit the connection caps (up to the hard limit), or warn."""
    needed = c.max_connections + (c.rest_max_connections if c.rest_port else 0) + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning(
            "the open-file limit is %d but --max-connections and --rest-max-connections need %d; lower them, "
            "or raise the limit (ulimit -n), or the process may run out of file descriptors under load",
            target,
            needed,
        )


def remove_stale_socket_dirs() -> None:
    """Remove this user's socket directories whose process is gone (a SIGKILLed server cannot clean up)."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(SOCKET_DIR_PREFIX) :].partition("-")[0]
        path = os.path.join(root, name)
        if not name.startswith(SOCKET_DIR_PREFIX) or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by process %s", path, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


class LocalSocket:
    """A Unix socket in a fresh 0700 directory: only this user can connect (the in-process REST bridge)."""

    def __init__(self) -> None:
        self._dir: str | None = None

    def bind(self, server: grpc.aio.Server) -> str:
        remove_stale_socket_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")  # mode 0700
        target = f"unix:{self._dir}/grpc.sock"
        server.add_insecure_port(target)
        return target

    def remove(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
