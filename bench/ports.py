"""Ports for the servers that benchmarks and tests start."""
from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999): a port the kernel picked for "port 0" can be taken
# by any outgoing connection before the server that was meant to bind it does.
_LISTEN_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, not handed out before in this process."""
    for _ in range(200):
        port = random.choice(_LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_LISTEN_PORTS.start}-{_LISTEN_PORTS.stop - 1}")
