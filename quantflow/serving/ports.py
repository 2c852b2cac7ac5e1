"""Free loopback ports for servers that bind some time after the port is chosen.

A port the kernel hands out for bind(0) comes from the ephemeral range, the same range it
uses for the local end of every outgoing connection. A vLLM server binds its port only
after loading the model, tens of seconds later; in that window a client connection (a
Prefect API call, a health probe) can take the port and the server's or nginx's bind fails
with "Address already in use" (seen in CI: nginx on a test's deploy.port). Ports below the
ephemeral range are never given to outgoing connections.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(consecutive: int = 1) -> int:
    """A port p with p .. p + consecutive - 1 free on 127.0.0.1, outside the ephemeral range
    where there is room below it, and not handed out before by this process."""
    high = _ephemeral_low() - consecutive
    if high - _LOWEST >= 1000:
        for _ in range(200):
            p = random.randint(_LOWEST, high)
            span = range(p, p + consecutive)
            if not _handed_out.intersection(span) and all(_bindable(q) for q in span):
                _handed_out.update(span)
                return p
    for _ in range(50):  # no room below the ephemeral range: let the kernel choose
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        span = range(p, p + consecutive)
        if p + consecutive <= 65536 and all(_bindable(q) for q in span[1:]):
            _handed_out.update(span)
            return p
    raise RuntimeError(f"no {consecutive} consecutive free loopback port(s) found")
