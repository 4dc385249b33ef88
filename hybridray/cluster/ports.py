"""TCP ports for local clusters: find free ones, and refuse pinned ones that are taken.

Ray's fixed defaults (GCS 6379, dashboard 8265, client server 10001, agent 52365) are what
make a second cluster on the same machine fail, sometimes only after a minute of retries, so
every node gets ports picked here. A port found free can still be taken before Ray binds it;
``up`` treats that like any other node failing to start.
"""

from __future__ import annotations

import errno
import socket

from hybridray.exceptions import ClusterError


def free_ports(count: int, exclude: set[int] = frozenset()) -> list[int]:
    """``count`` distinct ports the kernel reports free right now (none from ``exclude``)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("", 0))
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def port_in_use(port: int) -> bool:
    """True if something on this machine listens on (or holds) ``port``."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
        finally:
            s.close()
    return False


def check_pinned(pinned: dict[str, int | None]) -> None:
    """Refuse pinned ports that are out of range, repeated or already in use.

    ``pinned`` maps an option name (``--port``) to the port the user asked for, or None.
    """
    seen: dict[int, str] = {}
    for option, port in pinned.items():
        if port is None:
            continue
        if not 1 <= port <= 65535:
            raise ClusterError(f"{option} {port}: not a TCP port; pick one in 1024-65535 or "
                               f"leave {option} out to get a free one")
        if port in seen:
            raise ClusterError(f"{seen[port]} and {option} are both {port}; give them "
                               "different ports or leave one out")
        seen[port] = option
        if port_in_use(port):
            raise ClusterError(f"{option} {port}: port {port} is already in use on this "
                               f"machine (see: ss -ltnp 'sport = :{port}'); pick another "
                               f"port or leave {option} out to get a free one")
