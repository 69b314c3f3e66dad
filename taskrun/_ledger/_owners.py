"""Owners: who holds a claim, and whether it may still be running it.

An owner is one process using a ledger file; its row in the file's ``owners`` table says how
to tell whether it is alive. On the machine that wrote the row, its pid and the pid's start
time decide (a pid reused by another process has another start time). From another machine
only the lease decides, which the owner's ledger thread renews every ``LEASE / 3`` seconds.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any

#: Seconds a claim stays valid without renewal, for owners on another machine.
LEASE = 30.0

HOST = socket.gethostname()


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ('' where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _machine() -> str:
    """This machine, as far as pids go: host name plus the pid namespace (containers have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{HOST}:{namespace}"


MACHINE = _machine()

_own_start: tuple[int, str] | None = None


def own_process_start() -> str:
    """This process's start time, read once per process (not in every forked child: few need it)."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        _own_start = (pid, process_start(pid))
    return _own_start[1]


def new_owner() -> str:
    """A new owner id: this process in a file's ``owners`` table (a forked child takes a new one)."""
    return secrets.token_hex(8)


def holder_alive(owner: Sequence[Any], now: float) -> bool:
    """:func:`owner_alive` of ``(machine, pid, pid_start, lease_until)`` as read from the ``owners`` table."""
    machine, pid, pid_start, lease_until = owner
    return owner_alive(machine, pid, pid_start, lease_until, now)


def owner_alive(machine: str | None, pid: int | None, pid_start: str | None, lease_until: float | None, now: float) -> bool:
    """Whether the owner of a claim (its row in ``owners``; None if gone) may still be running it.

    On this machine its process decides: gone, a zombie, or another process now using its
    pid (a different start time) is dead. From elsewhere only the lease it renews can tell.
    """
    if machine is None or pid is None:
        return False
    if machine != MACHINE:
        return lease_until is not None and lease_until > now
    if pid == os.getpid():
        return pid_start == own_process_start()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:
        fields = []
    if fields:
        if fields[0] in (b"Z", b"X"):  # a zombie has finished running anything
            return False
        return not pid_start or fields[19].decode() == pid_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
