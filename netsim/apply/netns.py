"""Named network namespaces: create, enter, remove, and find the processes inside.

Namespaces are pinned under /run/netns like ``ip netns add`` does, so a lab outlives the
command that built it. Creation happens in this thread (unshare + bind mount), which
takes microseconds, instead of forking a helper per namespace.
"""
from __future__ import annotations

import ctypes
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import IPRoute, netns as pr_netns

RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def listed(prefix: str) -> list[str]:
    """Pinned namespaces whose name starts with ``prefix`` (a lab's marker)."""
    try:
        return sorted(n for n in os.listdir(RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create and pin an empty namespace (only ``lo``, down) named ``name``."""
    if exists(name):
        raise FileExistsError(f"network namespace {name} already exists")
    pr_netns.pushns()
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        pr_netns.attach(name, "self")
    finally:
        pr_netns.popns()


def remove(name: str) -> bool:
    """Unpin ``name``; the kernel frees it (and its links) once no process is inside."""
    if not exists(name):
        return False
    pr_netns.remove(name)
    return True


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread inside namespace ``name``."""
    pr_netns.pushns(path(name))
    try:
        yield
    finally:
        pr_netns.popns()


def iproute(name: str) -> IPRoute:
    """An rtnetlink handle bound to namespace ``name`` (the socket keeps its namespace)."""
    with entered(name):
        return IPRoute()


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    with entered(name):
        return socket.socket(family, kind, proto)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set ``key`` (dotted, e.g. net.ipv4.ip_forward) inside namespace ``name``."""
    with entered(name):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def read_sysctl(name: str, key: str) -> str:
    with entered(name):
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()


def inode(name: str) -> int | None:
    try:
        return os.stat(path(name)).st_ino
    except FileNotFoundError:
        return None


def pids_inside(inodes: set[int]) -> list[int]:
    """PIDs of every process whose network namespace is one of ``inodes``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found
