"""Start and stop a throw-away etcd (Debian's ``/usr/bin/etcd``) for one topology run.

Layout under ``<state_dir>/etcd/``: ``data/`` (≈125 MB of pre-allocated WAL, removed on
stop), ``etcd.sock:0`` (client Unix socket, reachable from any network namespace),
``peer.sock:0`` (raft peer socket, so no TCP port can clash), ``etcd.pid`` and ``etcd.log``.
The process is stopped by its PID only: SIGTERM, then SIGKILL after a bounded wait.
"""
from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from ..errors import ReadinessTimeout
from .base import RegistryError
from .etcd import EtcdRegistry

ETCD_BINARY = "/usr/bin/etcd"
CLIENT_SOCKET = "etcd.sock:0"     # etcd's unix://name:port form; the file is named "name:port"
PEER_SOCKET = "peer.sock:0"
SUN_PATH_MAX = 107                # AF_UNIX path limit (108 bytes with the NUL)


@dataclass
class EtcdServer:
    """A running etcd. ``url`` is the registry URL to give agents (Unix socket if any)."""

    url: str
    urls: tuple[str, ...]
    pid: int
    home: str
    data_dir: str
    log_path: str
    started_in: float                         # seconds from exec to healthy
    _proc: subprocess.Popen = field(repr=False)
    stop_timeout: float = 5.0                 # SIGTERM grace before SIGKILL

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, SIGKILL after ``timeout``; then remove data dir, sockets and PID file."""
        atexit.unregister(self.stop)
        timeout = self.stop_timeout if timeout is None else timeout
        if self._proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._proc.wait(timeout)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for name in (CLIENT_SOCKET, PEER_SOCKET, "etcd.pid"):
            _unlink(os.path.join(self.home, name))

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid_file: str) -> int:
    """The PID in ``pid_file`` if that process still runs (a zombie does not count)."""
    try:
        pid = int(open(pid_file).read().strip())
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return 0
        return pid
    except (OSError, ValueError, IndexError):
        return 0


def start_etcd(state_dir: str, *, unix_socket: bool = True, listen: str | None = None,
               name: str = "netsim", timeout: float = 10.0, stop_timeout: float = 5.0,
               keep_data: bool = False,
               binary: str = ETCD_BINARY) -> EtcdServer:
    """Start etcd with its files under ``state_dir``/etcd and wait until ``/health`` is true.

    ``unix_socket`` serves clients on ``<state_dir>/etcd/etcd.sock:0``; ``listen="host:port"``
    also (or instead) on TCP. Timings are tuned for one local member (10 ms heartbeat,
    100 ms election timeout), so a fresh start takes about a tenth of a second.
    """
    if not (unix_socket or listen):
        raise RegistryError("start_etcd needs unix_socket=True or listen='host:port'")
    if not os.access(binary, os.X_OK):
        raise RegistryError(f"etcd binary {binary} not found (apt-get install etcd-server)")
    home = os.path.join(os.path.abspath(state_dir), "etcd")
    os.makedirs(home, exist_ok=True)
    pid_file = os.path.join(home, "etcd.pid")
    if (other := _pid_alive(pid_file)):
        raise RegistryError(f"an etcd (pid {other}) already runs from {home}; stop it first")
    sock_path = os.path.join(home, CLIENT_SOCKET)
    if unix_socket and len(sock_path) > SUN_PATH_MAX:
        raise RegistryError(f"socket path {sock_path} is longer than {SUN_PATH_MAX} bytes; "
                            "use a shorter state dir")
    data_dir = os.path.join(home, "data")
    restart = keep_data and os.path.isdir(data_dir)
    if not restart:
        shutil.rmtree(data_dir, ignore_errors=True)        # throw-away: start fresh
    for stale in (CLIENT_SOCKET, PEER_SOCKET):
        _unlink(os.path.join(home, stale))

    client_urls = ([f"unix://{CLIENT_SOCKET}"] if unix_socket else []) + \
                  ([f"http://{listen}"] if listen else [])
    registry_urls = tuple(([f"etcd+unix://{sock_path}"] if unix_socket else []) +
                          ([f"etcd+http://{listen}"] if listen else []))
    peer = f"unix://{PEER_SOCKET}"
    argv = [binary, "--name", name, "--data-dir", data_dir,
            "--listen-client-urls", ",".join(client_urls),
            "--advertise-client-urls", ",".join(client_urls),
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval=10", "--election-timeout=100",
            "--logger=zap", "--log-outputs=stderr", "--log-level=warn"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    log_path = os.path.join(home, "etcd.log")
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=home, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    with open(pid_file, "w") as f:
        f.write(f"{proc.pid}\n")
    server = EtcdServer(registry_urls[0], registry_urls, proc.pid, home, data_dir, log_path, 0.0,
                        proc, stop_timeout)
    atexit.register(server.stop)
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    server.started_in = time.monotonic() - t0
    return server


def _wait_healthy(server: EtcdServer, timeout: float) -> None:
    """Poll GET /health every 10 ms until it says true, the process dies, or time runs out."""
    client = EtcdRegistry(server.url, timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if server._proc.poll() is not None:
                raise RegistryError(f"etcd exited with status {server._proc.returncode} during "
                                    f"start-up: {_tail(server.log_path)}")
            if _healthy(client):
                return
            if time.monotonic() > deadline:
                raise ReadinessTimeout(f"etcd /health at {server.url} to report true "
                                       f"(log {server.log_path})", timeout)
            time.sleep(0.01)
    finally:
        client.close()


def _healthy(client: EtcdRegistry) -> bool:
    conn = client.new_connection(0.5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"
