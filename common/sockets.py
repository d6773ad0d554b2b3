"""Who owns the other end of a loopback TCP connection (Linux ``/proc/net/tcp``).

A loopback address proves nothing about who connected: any local user can bind any
``127.x.y.z``. Where a loopback source stands for a run (apptainer's host-side run
addresses, docs/networking.md), the node also checks that the connecting socket belongs to
its own uid — the supervisor's dialer — as podman's firewall does with ``meta skuid``.
(executors/apptainer/supervisor.py carries the same lookup: it runs by path, stdlib only.)
"""

from __future__ import annotations

import ipaddress
import struct


def tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid of the IPv4 TCP socket bound to ``peer`` and connected to ``local``, from
    ``/proc/net/tcp`` of this process's network namespace (``None``: no such socket)."""
    wanted = (_proc_address(*peer), _proc_address(*local))
    try:
        with open("/proc/net/tcp") as table:  # noqa: PTH123 - read line by line
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) > 7 and (fields[1], fields[2]) == wanted:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


def _proc_address(host: str, port: int) -> str:
    """``/proc/net/tcp``'s spelling: the IPv4 address as a native-endian hex word, ``:`` port."""
    packed = ipaddress.IPv4Address(host).packed
    return f"{struct.unpack('=I', packed)[0]:08X}:{port:04X}"
