"""Ports chosen for servers that bind later stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from quantflow.serving import ports


def test_free_ports_are_below_the_ephemeral_range_and_distinct():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen = [ports.free_port() for _ in range(20)] + [ports.free_port(consecutive=2)]
    assert len(set(chosen)) == len(chosen)
    assert all(10000 <= p < low - 1 for p in chosen), (chosen, low)
    pair = chosen[-1]
    for p in (pair, pair + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # both ends of the pair are really free


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        held = holder.getsockname()[1]
        picks = iter([held, held])
        monkeypatch.setattr(ports, "_ephemeral_low", lambda: 65000)
        monkeypatch.setattr(ports.random, "randint", lambda a, b: next(picks, a + 7))
        p = ports.free_port()
        assert p != held
