"""Shared pytest set-up: the real test peers are pytest plugins under ``tests/peers``.

Each peer module owns one session-scoped fixture that starts (or reuses) a real peer:
the Kubernetes testbed, the podman API service with the local images, the vantage6
server, a container registry and Jaeger. A peer that cannot start fails its tests with the
reason; nothing is mocked.
"""

pytest_plugins = [
    "tests.peers.kubernetes",
    "tests.peers.kueue",
    "tests.peers.podman",
    "tests.peers.postgres",
    "tests.peers.registry",
    "tests.peers.v6server",
    "tests.peers.jaeger",
]
