"""What every load-test tool needs from the machine: loopback-only targets, enough file
descriptors, enough source ports, and the CPU and memory of the processes under test."""

from __future__ import annotations

import ipaddress
import os
import resource
from urllib.parse import urlsplit

__all__ = [
    "PORTS_PER_ADDRESS",
    "ProcessSample",
    "check_loopback",
    "raise_nofile_limit",
    "sample_process",
    "source_address",
]

PORTS_PER_ADDRESS = 20_000
"""Connections opened from one source address before the next is used: well inside the
ephemeral port range (``net.ipv4.ip_local_port_range``, 28,232 ports by default), with room
for the connections a storm reopens while the old ones close."""


def check_loopback(url: str) -> str:
    """Return the host of ``url`` if it is a loopback address; else raise ``SystemExit``.

    Only 127.0.0.0/8, ::1 and ``localhost`` may be load-test targets.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise SystemExit(f"refusing {url}: only loopback targets (127.0.0.0/8, ::1, localhost)")


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (up to the hard limit, and
    the hard limit too when running as root); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = min(max(soft, wanted), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def source_address(index: int, host: str) -> tuple[str, int] | None:
    """The local address for connection ``index`` to ``host``, so that many connections do
    not run out of ephemeral ports: the kernel's choice (``None``) for the first
    :data:`PORTS_PER_ADDRESS`, then 127.0.0.2, 127.0.0.3 and so on. ``None`` for targets that
    are not IPv4 loopback."""
    try:
        if not ipaddress.ip_address(host).is_loopback or ":" in host:
            return None
    except ValueError:
        return None
    block = index // PORTS_PER_ADDRESS
    if block == 0:
        return None  # binding to port 0 first costs a port search per connect; let connect pick
    return (f"127.0.{block // 254}.{block % 254 + 1}", 0)


class ProcessSample:
    """CPU seconds and resident memory of one process, from ``/proc`` (Linux)."""

    def __init__(self, cpu_seconds: float, rss_bytes: int) -> None:
        self.cpu_seconds = cpu_seconds
        self.rss_bytes = rss_bytes


def sample_process(pid: int) -> ProcessSample | None:
    """Read ``pid``'s user+system CPU seconds and RSS; ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return ProcessSample(cpu, pages * os.sysconf("SC_PAGE_SIZE"))
