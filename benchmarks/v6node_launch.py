"""Start vantage6-node 4.15.2 outside a container: ``vnode-local start`` with two shims.

Runs inside the v6node venv (``scripts/v6node-proxy-setup``), never inside fednode's;
``benchmarks/v6node_compare.py`` starts it as a subprocess. Why the shims (both only make
the node take its documented "outside a container" paths; neither changes how it runs
tasks):

1. ``vnode-local start`` (non-dockerized) builds a ``vantage6.cli.context.node.NodeContext``,
   which in 4.15.2 has no ``running_in_docker`` attribute, while ``Node`` reads
   ``ctx.running_in_docker`` (``_set_task_dir``, the proxy thread): unpatched, the node
   dies at start-up with ``AttributeError: 'NodeContext' object has no attribute
   'running_in_docker'``. It is set to ``False`` here, as ``DockerNodeContext`` sets
   ``True``.
2. vantage6's ``running_in_docker()`` function answers by looking for ``/.dockerenv``;
   this machine is itself a container, so it says ``True`` and the node would mix the
   dockerized paths (data volume, ``/mnt/<db>`` database paths, ``<LABEL>_DATABASE_URI``
   from the environment) into a node that is not in a container. It answers ``False``.

    python benchmarks/v6node_launch.py --config node.yaml
"""

from __future__ import annotations

import sys


def _not_in_docker() -> bool:
    return False


def main() -> None:
    import vantage6.common.docker.addons as addons

    original = addons.running_in_docker
    addons.running_in_docker = _not_in_docker
    from vantage6.cli.context.node import NodeContext
    from vantage6.node.cli.node import cli_node

    # Modules that bound the function by name before the patch: rebind it there too.
    for name, module in list(sys.modules.items()):
        if name.startswith("vantage6") and getattr(module, "running_in_docker", None) is original:
            module.running_in_docker = _not_in_docker
    NodeContext.running_in_docker = False
    sys.argv = ["vnode-local", "start", "--user", *sys.argv[1:]]
    cli_node()


if __name__ == "__main__":
    main()
