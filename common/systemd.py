"""systemd integration: sd_notify datagrams and the watchdog interval (no libsystemd needed)."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram when systemd asked for it (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # never block the main loop on a listener that does not read (a full queue drops the ping)
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", address, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for us, in seconds (None: no watchdog)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
