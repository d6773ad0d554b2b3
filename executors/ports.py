"""The ports a run takes connections from other runs on, as vantage6 4 declares them.

An algorithm image declares each port with ``EXPOSE <port>`` and may name it with a label
``p<port>=<name>`` (``EXPOSE 8888`` + ``LABEL p8888=shares``). An image that exposes no
port gets 8888, unnamed — vantage6 4's default. Only TCP ports count (peering carries
TCP). Image metadata is the algorithm author's, so it is bounded and checked here: at
most :data:`MAX_PORTS` ports, numbers 1-65535, names of at most 64 printable characters.

Executors that can read the image's configuration (podman) use
:func:`ports_from_image_config`; :class:`PeerEndpoints` is the optional interface through
which the node asks an executor for them and for the address a run listens on. One that
cannot read it (Kubernetes: kubelet pulls the image, the node never sees its
configuration) answers ``None``, and the node's ``peering.image_ports`` decide (8888 for
an image no rule names). Those rules reach executors as :class:`ImagePorts` in the
``ExecutorContext`` (:func:`configured_ports`), for a runtime that must know a run's ports
before it starts it (apptainer: its supervisor listens on them).

A runtime that runs some runs without the isolation peering relies on (apptainer's
``proxy_network: host``) raises :class:`~executors.base.PeeringUnavailable` from
:meth:`PeerEndpoints.run_address`, naming why: the node registers no ports for the run and
refuses streams to and from it with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

DEFAULT_PORT = 8888
MAX_PORTS = 16
_MAX_LABEL = 64


class DeclaredPort(NamedTuple):
    port: int
    label: str | None


DEFAULT_PORTS = (DeclaredPort(DEFAULT_PORT, None),)


class ImagePorts(NamedTuple):
    """One ``peering.image_ports`` rule: images whose whole name matches ``image`` (a
    regular expression) declare ``ports``."""

    image: str
    ports: tuple[DeclaredPort, ...]


def configured_ports(image: str, rules: Sequence[ImagePorts]) -> list[DeclaredPort]:
    """An image's ports by the node's rules: the first matching the whole name, else 8888."""
    for rule in rules:
        if re.fullmatch(rule.image, image):
            return list(rule.ports)
    return list(DEFAULT_PORTS)


def ports_from_image_config(
    exposed: Mapping[str, Any] | None, labels: Mapping[str, Any] | None
) -> list[DeclaredPort]:
    """The declared TCP ports of an image's ``ExposedPorts`` and ``Labels``."""
    ports: list[int] = []
    for key in exposed if isinstance(exposed, Mapping) else ():
        number, _, protocol = str(key).partition("/")
        if protocol not in ("", "tcp") or not number.isdigit():
            continue
        port = int(number)
        if 0 < port < 65536 and port not in ports:
            ports.append(port)
    if not ports:
        return list(DEFAULT_PORTS)
    names = labels if isinstance(labels, Mapping) else {}
    declared = []
    for port in sorted(ports)[:MAX_PORTS]:
        label = names.get(f"p{port}")
        text = str(label) if isinstance(label, str | int) else None
        if text is not None and (not text.isprintable() or len(text) > _MAX_LABEL):
            text = None
        declared.append(DeclaredPort(port, text or None))
    return declared


@runtime_checkable
class PeerEndpoints(Protocol):
    """What an executor tells the node so peer runs can connect to its runs (optional).

    An executor without it runs algorithms as before; peer streams to its runs are refused
    with a reason naming the executor (docs/networking.md).
    """

    async def declared_ports(self, run_id: int, image: str) -> list[DeclaredPort] | None:
        """The declared ports of run ``run_id``'s image (:func:`ports_from_image_config`);
        ``None`` when this runtime cannot read the image's configuration."""
        ...

    async def run_address(self, run_id: int) -> str | None:
        """The address the node connects to for the run's ports, and the one its connections
        to the forwarders come from; ``None`` if not running.
        :class:`~executors.base.PeeringUnavailable` when the run cannot take part in
        peering at all."""
        ...
