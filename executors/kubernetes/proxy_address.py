"""Where run pods reach the node's proxy: the proxy Service's ClusterIP, read from the API.

Runs may not query the cluster DNS (CoreDNS forwards unknown names upstream: a channel
around the proxy, see :mod:`policies.network`), so they are given an *address*. The
address that survives a node restart is the proxy Service's ClusterIP: the node pod's own
IP changes when it is rescheduled, while runs that outlive it keep calling the address
they were started with.

How the node learns it — the choices weighed:

* **read the Service by name** (chosen): one ``get`` on one ``resourceNames`` entry in the
  node's Role. A Service holds no secret (its selector, ports and addresses), the API
  server allocates the address (no service CIDR to know), and it is read fresh at every
  start, so a re-created Service is picked up by the next start;
* a fixed ``spec.clusterIP`` from the chart's values: the operator must know the
  cluster's service range and pick a free address, and a clash fails the install;
* the chart passing the address in after install (``lookup`` of its own Service): at the
  first install the Service does not exist yet when the templates are rendered, so it
  takes a second ``helm upgrade``;
* the kubelet's service links (``<NAME>_SERVICE_HOST``): every Service of the namespace
  in the node's environment, named after the release, and only those that existed when
  the pod started;
* the Downward API: it has no field for a Service.

Pure functions over the Service's JSON; the executor does the request.
"""

from __future__ import annotations

from typing import Any

from executors.spec import ProxyEndpoint

#: The name of the proxy's port in the chart's Service (``service.yaml``).
PROXY_PORT_NAME = "proxy"


class ProxyServiceError(ValueError):
    """The Service cannot carry the runs to the proxy (headless, no such port, ...)."""


def proxy_endpoint_of(service: dict[str, Any], *, proxy_port: int) -> ProxyEndpoint:
    """The ClusterIP and port run pods call, from the proxy Service ``service``.

    ``proxy_port`` is the proxy container's port, the only one the runs' NetworkPolicy
    opens on the node pod: a Service that forwards elsewhere would cut the runs off
    without a word, so it is refused here, at start-up.
    """
    name = (service.get("metadata") or {}).get("name", "?")
    spec = service.get("spec") or {}
    address = spec.get("clusterIP")
    if not address or address == "None":
        raise ProxyServiceError(
            f"Service {name!r} has no cluster IP (headless or ExternalName); runs need an "
            "address, not a name: make it a ClusterIP Service"
        )
    ports = [p for p in spec.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]
    named = [p for p in ports if p.get("name") == PROXY_PORT_NAME]
    if named:
        port = named[0]
    elif len(ports) == 1:
        port = ports[0]
    else:
        raise ProxyServiceError(
            f"Service {name!r} has {len(ports)} TCP ports and none named "
            f"{PROXY_PORT_NAME!r}: name the proxy's port {PROXY_PORT_NAME!r}"
        )
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int) and target != proxy_port:
        raise ProxyServiceError(
            f"Service {name!r} forwards port {port.get('port')} to pod port {target}, but the "
            f"proxy listens on {proxy_port} (executor.proxy_port), the only port the runs' "
            "NetworkPolicy opens"
        )
    return ProxyEndpoint(host=str(address), port=int(port["port"]))
